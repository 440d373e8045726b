"""The DPO loss and what it is computed from: per-sample denoising errors of the trained model and its reference on
the same corruption of the winner and the loser of each pair.

    model_diff = err_theta(w) - err_theta(l),  ref_diff = err_ref(w) - err_ref(l)
    inside = -0.5 * beta * (model_diff - ref_diff),  loss = -logsigmoid(inside)

(the paper's code's convention, in which its beta, 2000 for SD 1.5 and 5000 for SDXL, applies), implicit accuracy =
the fraction of pairs with inside > 0. While the trained model equals the reference the loss is exactly ln 2.
"""

import numpy as np
import torch
import torch.nn.functional as F

from diffusion_dpo.family import reference_model


def implicit_reward_margin(model_err_w, model_err_l, ref_err_w, ref_err_l, beta):
    """inside = -0.5 * beta * ((err_theta(w) - err_theta(l)) - (err_ref(w) - err_ref(l))), per pair."""
    return -0.5 * beta * ((model_err_w - model_err_l) - (ref_err_w - ref_err_l))


def implicit_accuracy(inside):
    """The fraction of pairs whose implicit reward margin `inside` favours the winner; exact ties (inside == 0, e.g.
    while the model equals the reference) count half."""
    return ((inside > 0).float() + 0.5 * (inside == 0).float()).mean()


def accuracy_by_noise_level(model_err_w, model_err_l, ref_err_w, ref_err_l, beta, levels, buckets=4):
    """Implicit accuracy of single (noise level, noise) draws per bucket of noise levels in [0, 1] (quarters): where
    on the denoising path the preference is learnt, or lost. {"implicit_acc_noise_0_25": ..., ...}, filled buckets."""
    inside = implicit_reward_margin(model_err_w, model_err_l, ref_err_w, ref_err_l, beta)
    bucket = (levels * buckets).long().clamp(max=buckets - 1)
    names = {b: f"implicit_acc_noise_{100 * b // buckets}_{100 * (b + 1) // buckets}" for b in range(buckets)}
    return {names[b]: implicit_accuracy(inside[bucket == b]) for b in bucket.unique().tolist()}


def dpo_loss(model_err_w, model_err_l, ref_err_w, ref_err_l, beta, loss_type="sigmoid", label_smoothing=0.0):
    """Diffusion-DPO loss from four per-sample denoising errors (MSE averaged over latent dims): sigmoid (the paper's)
    -logsigmoid(inside), hinge relu(1 - inside), ipo (inside / beta - 1 / (2 beta))^2. label_smoothing eps (sigmoid
    only) is conservative DPO (Mitchell 2023; TRL's `label_smoothing`): each label flipped with probability eps, the
    expected loss -(1 - eps) logsigmoid(inside) - eps logsigmoid(-inside); eps = 0 is the paper's loss exactly. A
    tensor eps = 1 - p per pair is --soft_labels: p the probability that the pair's winner is preferred (SmPO)."""
    inside = implicit_reward_margin(model_err_w, model_err_l, ref_err_w, ref_err_l, beta)
    if loss_type == "sigmoid":
        losses = -(1.0 - label_smoothing) * F.logsigmoid(inside) - label_smoothing * F.logsigmoid(-inside)
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - inside)
    elif loss_type == "ipo":
        losses = (inside / beta - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    metrics = {
        "implicit_acc": implicit_accuracy(inside),
        "reward_margin": inside.mean(),
        "negative_margin_share": (inside < 0).float().mean(),
        # run health: above 1 the model denoises worse than the reference; DPO's loss also falls in a collapse that
        # makes winners worse, as long as losers get worse faster (docs/held-out-evaluation.md)
        "winner_ratio": model_err_w.mean() / ref_err_w.mean(),
        "loser_ratio": model_err_l.mean() / ref_err_l.mean(),
        "model_mse_w": model_err_w.mean(),
        "model_mse_l": model_err_l.mean(),
        "ref_mse_w": ref_err_w.mean(),
        "ref_mse_l": ref_err_l.mean(),
    }
    return losses.mean(), {name: value.detach() for name, value in metrics.items()}


def mapo_loss(model_err_w, model_err_l, beta_mapo, num_train_timesteps, snr_value=0.5):
    """MaPO loss (Hong et al. 2024, arXiv 2406.06424) from the trained model's errors alone (no reference), as its
    reference code computes it (mapo-t2i/mapo, utils.py `compute_loss`; s = snr_value = 0.5), T = num_train_timesteps:
        log_odds = s * err(w) / (exp(s * err(w)) - 1) - s * err(l) / (exp(s * err(l)) - 1)   (> 0 when err(w) < err(l))
        loss = mean(err(w)) + beta_mapo * mean(-logsigmoid(T * log_odds))
    i.e. SFT on the winners plus a margin term weighed by beta_mapo (outside the sigmoid, unlike DPO's beta). Metrics:
    the policy's own policy_margin = mean(err(l) - err(w)) and policy_acc (ties half). For rectified flow the formula
    is carried over to velocity errors unchanged; 0.1 is a start, not tuned (docs/sd3.md).
    """

    def score(err):  # s * err / (exp(s * err) - 1): 1 at err = 0, falling with the error
        scaled = snr_value * err
        return scaled / torch.expm1(scaled)

    log_odds = score(model_err_w) - score(model_err_l)
    margin_losses = -F.logsigmoid(num_train_timesteps * log_odds)
    loss = model_err_w.mean() + beta_mapo * margin_losses.mean()
    metrics = {
        "policy_acc": implicit_accuracy(model_err_l - model_err_w),
        "policy_margin": (model_err_l - model_err_w).mean(),
        "margin_loss": margin_losses.mean(),
        "model_mse_w": model_err_w.mean(),
        "model_mse_l": model_err_l.mean(),
    }
    return loss, {name: value.detach() for name, value in metrics.items()}


def denoising_errors(model, family, noisy_latents, levels, conditioning, target):
    """Per-sample MSE of the model's prediction over latent dims, in fp32 (weighted where the noise scheme says)."""
    prediction = family.predict(model, noisy_latents, levels.timesteps, conditioning)
    errors = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=tuple(range(1, target.ndim)))
    return errors if levels.weighting is None else levels.weighting.float() * errors


def step_seed(*parts):
    """A 63-bit seed mixed from the run seed, rank and position, so noise needs no RNG state to resume."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def compute_loss(batch, model, reference, noise, family, args, generator):
    """The loss of a batch of pairs (the reference: None for LoRA, the adapter off); --sft: winners only."""
    device = model.device
    pair_latents = batch["pair_latents"].to(device, torch.float32, non_blocking=True)
    winners, losers = pair_latents[:, 0], pair_latents[:, 1]
    # One noise and one noise level per pair, shared by its two images: DPO compares their errors on one corruption.
    pair_noise = torch.randn(winners.shape, generator=generator, device=device)
    levels = noise.draw(len(winners), generator, device)
    conditioning = {**family.conditioning(batch, device, stacked=not args.sft), **family.fixed_inputs(args)}
    if args.sft:
        noisy_latents, target = noise.corrupt(winners, pair_noise, levels)
        model_err = denoising_errors(model, family, noisy_latents, levels, conditioning, target)
        return model_err.mean(), {"model_mse_w": model_err.detach().mean()}

    latents, pair_noise, levels = torch.cat([winners, losers]), torch.cat([pair_noise, pair_noise]), levels.twice()
    noisy_latents, target = noise.corrupt(latents, pair_noise, levels)
    model_err_w, model_err_l = denoising_errors(model, family, noisy_latents, levels, conditioning, target).chunk(2)
    if args.loss_type == "mapo":
        return mapo_loss(model_err_w, model_err_l, args.beta_mapo, noise.num_train_timesteps)

    with reference_model(model, reference, training=True) as ref:
        ref_err = denoising_errors(ref, family, noisy_latents, levels, conditioning, target)
    ref_err = ref_err.detach().clone()  # clone: an ordinary tensor, usable next to the graph
    smoothing = 1 - batch["preference"].to(device) if args.soft_labels else args.label_smoothing
    return dpo_loss(model_err_w, model_err_l, *ref_err.chunk(2), args.beta_dpo, args.loss_type, smoothing)
