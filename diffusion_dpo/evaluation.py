"""Held-out preference metrics and run health during training, on pairs the run does not train on: each pair's
errors averaged over fixed (noise level, noise) draws, so that the same weights always give the same numbers."""

import torch
from accelerate.utils import gather_object

from diffusion_dpo.family import reference_model
from diffusion_dpo.losses import accuracy_by_noise_level, denoising_errors, dpo_loss, mapo_loss, step_seed
from diffusion_dpo.noise import NoiseLevels


@torch.no_grad()
def held_out_errors(model, family, noise, cached, indices, args, batch_size):
    """(3, pairs, draws): winners' errors, losers' errors and noise levels in [0, 1] (DDPM's t / T, flow's sigma) at
    --validation_timesteps draws per pair fixed by (seed, pair, k)."""
    errors = []
    for start in range(0, len(indices), batch_size):
        chunk = [int(i) for i in indices[start : start + batch_size]]
        # outside the reference's autocast: CPU autocast refuses to stack the cache's float16 tensors
        with torch.autocast(model.device.type, enabled=False):
            batch = torch.utils.data.default_collate([cached[(index, 0, False)] for index in chunk])
        pair_latents = batch["pair_latents"].to(model.device, torch.float32)
        latents = torch.cat([pair_latents[:, 0], pair_latents[:, 1]])
        conditioning = {**family.conditioning(batch, model.device), **family.fixed_inputs(args)}
        draws = []
        for k in range(args.validation_timesteps):
            generators = [torch.Generator().manual_seed(step_seed(args.seed, index, k)) for index in chunk]
            pair_noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in generators])
            levels = NoiseLevels.cat([noise.draw(1, g, "cpu") for g in generators]).to(model.device).twice()
            noisy_latents, target = noise.corrupt(latents, pair_noise.to(model.device).repeat(2, 1, 1, 1), levels)
            pair_errors = denoising_errors(model, family, noisy_latents, levels, conditioning, target).view(2, -1)
            draws.append(torch.cat([pair_errors, levels.timesteps[None, : len(chunk)] / noise.num_train_timesteps]))
        errors.append(torch.stack(draws, dim=-1))
    # a rank may get no pairs
    return torch.cat(errors, dim=1) if errors else torch.empty(3, 0, args.validation_timesteps, device=model.device)


def gathered_errors(errors):
    """Every process's (k, pairs, draws) errors on each, in rank order (a few floats per pair)."""
    rows = [row for rank_rows in gather_object([errors.transpose(0, 1).tolist()]) for row in rank_rows]
    return torch.tensor(rows).reshape(-1, len(errors), errors.shape[-1]).transpose(0, 1)


def evaluate_held_out(accelerator, model, reference, family, noise, held_out_pairs, args, reference_errors=None):
    """({"eval/...": value}, reference errors) on the held-out pairs, split across processes: dpo_loss's metrics (DPO,
    SFT) or mapo_loss's (MaPO: no reference). The reference's errors never change: pass them back in next time."""
    indices = held_out_pairs.valid_indices[accelerator.process_index :: accelerator.num_processes]
    batch_size = 2 * args.train_batch_size  # no activations are kept for backward
    model = accelerator.unwrap_model(model)
    model_errors = held_out_errors(model, family, noise, held_out_pairs, indices, args, batch_size)
    if args.loss_type == "mapo":
        model_err_w, model_err_l = gathered_errors(model_errors)[:2].mean(dim=-1)
        loss, metrics = mapo_loss(model_err_w, model_err_l, args.beta_mapo, noise.num_train_timesteps)
        return {f"eval/{name}": value.item() for name, value in {"loss": loss, **metrics}.items()}, None
    if reference_errors is None:
        with reference_model(model, reference) as ref:
            reference_errors = held_out_errors(ref, family, noise, held_out_pairs, indices, args, batch_size)
    model_err_w, model_err_l, levels, *ref_errors = gathered_errors(torch.cat([model_errors, reference_errors[:2]]))
    mean_errors = (errors.mean(dim=-1) for errors in (model_err_w, model_err_l, *ref_errors))
    smoothing = args.label_smoothing
    if args.soft_labels:  # each pair's 1 - p, in the order gathered_errors gathers the pairs: rank by rank
        n, valid = accelerator.num_processes, held_out_pairs.valid_indices
        smoothing = 1 - torch.cat([torch.from_numpy(held_out_pairs.preference[valid[r::n]]) for r in range(n)])
    loss, metrics = dpo_loss(*mean_errors, args.beta_dpo, args.loss_type, smoothing)
    metrics.update(accuracy_by_noise_level(model_err_w, model_err_l, *ref_errors, args.beta_dpo, levels))
    return {f"eval/{name}": value.item() for name, value in {"loss": loss, **metrics}.items()}, reference_errors
