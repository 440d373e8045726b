"""How a family corrupts latents and what its denoiser predicts: DDPM's discrete timesteps with epsilon- or
v-prediction (SD 1.x/2.x, SDXL), or rectified flow's noise levels with velocity prediction (SD3, Flux).

A noise scheme draws NoiseLevels for n pairs; the DPO step stacks (winners; losers) and uses each pair's draw, and
one noise, for both of its images (`NoiseLevels.twice`)."""

from typing import NamedTuple

import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3


class NoiseLevels(NamedTuple):
    """One draw per sample: the timesteps the denoiser is conditioned on, and for rectified flow the noise levels
    sigma and each error's weight (None: unweighted)."""

    timesteps: torch.Tensor
    sigmas: torch.Tensor | None = None
    weighting: torch.Tensor | None = None

    def twice(self):
        """The same draws for the stacked (winners; losers) batch."""
        return NoiseLevels(*(None if value is None else value.repeat(2) for value in self))

    def to(self, device):
        return NoiseLevels(*(None if value is None else value.to(device) for value in self))

    @staticmethod
    def cat(draws):
        return NoiseLevels(*(None if values[0] is None else torch.cat(values) for values in zip(*draws)))


class DDPMNoise:
    """The scheduler's forward process at a uniformly drawn timestep; the target is the noise (epsilon-prediction)
    or the velocity (v-prediction), as the scheduler's prediction_type says. `timestep_grid`: draw only these
    timesteps (SDXL-Turbo's 4-step grid)."""

    def __init__(self, scheduler, timestep_grid=None):
        self.scheduler = scheduler
        self.timestep_grid = None if timestep_grid is None else torch.tensor(timestep_grid)
        self.num_train_timesteps = scheduler.config.num_train_timesteps

    def draw(self, n, generator, device):
        if self.timestep_grid is None:
            timesteps = torch.randint(0, self.num_train_timesteps, (n,), generator=generator, device=device)
        else:
            choice = torch.randint(0, len(self.timestep_grid), (n,), generator=generator, device=device)
            timesteps = self.timestep_grid.to(device)[choice]
        return NoiseLevels(timesteps)

    def corrupt(self, latents, noise, levels):
        """(noisy latents, the prediction target)."""
        noisy_latents = self.scheduler.add_noise(latents, noise, levels.timesteps)
        if self.scheduler.config.prediction_type == "v_prediction":
            return noisy_latents, self.scheduler.get_velocity(latents, noise, levels.timesteps)
        return noisy_latents, noise


class FlowMatchNoise:
    """Rectified flow: the point at noise level sigma on the straight line from the image to the noise, and the
    velocity along it (the target). sigma is the scheduler's sigma at an index drawn from `weighting_scheme`'s
    density, shifted as the family's pipeline shifts it: by the scheduler's static shift (SD3), or, where the
    scheduler shifts dynamically (Flux), by the shift its pipeline computes from the image's sequence length
    (`image_seq_len` tokens; FLUX.2's pipelines compute their own exponent, passed as `mu`). Errors are weighted as
    the scheme says (diffusers' compute_loss_weighting_for_sd3)."""

    def __init__(self, scheduler, weighting_scheme, logit_mean, logit_std, mode_scale, image_seq_len=None, mu=None):
        self.density = dict(
            weighting_scheme=weighting_scheme, logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale
        )
        self.weighting_scheme = weighting_scheme
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        self.sigmas = scheduler.sigmas[: self.num_train_timesteps]
        if scheduler.config.get("use_dynamic_shifting"):  # its sigmas are unshifted until a pipeline shifts them
            config = scheduler.config
            if mu is None:  # FluxPipeline's, from the image's token count
                mu = calculate_shift(
                    image_seq_len,
                    config.get("base_image_seq_len", 256),
                    config.get("max_image_seq_len", 4096),
                    config.get("base_shift", 0.5),
                    config.get("max_shift", 1.15),
                )
            self.sigmas = scheduler.time_shift(mu, 1.0, self.sigmas)
        self.timesteps = self.sigmas * self.num_train_timesteps

    def draw(self, n, generator, device):
        u = compute_density_for_timestep_sampling(batch_size=n, device=device, generator=generator, **self.density)
        # the mode density reaches u = 1 (one past the last index): clamped
        indices = (u.cpu() * self.num_train_timesteps).long().clamp(0, len(self.sigmas) - 1)
        sigmas = self.sigmas[indices].to(device)
        weighting = compute_loss_weighting_for_sd3(self.weighting_scheme, sigmas)
        return NoiseLevels(self.timesteps[indices].to(device), sigmas, weighting)

    def corrupt(self, latents, noise, levels):
        sigmas = levels.sigmas.view(-1, *[1] * (latents.ndim - 1)).to(latents.dtype)
        return (1.0 - sigmas) * latents + sigmas * noise, noise - latents
