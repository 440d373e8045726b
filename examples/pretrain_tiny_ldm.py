"""Pretrain the tiny text-to-image latent diffusion model that the offline Diffusion-DPO demo starts from.

One sitting, top to bottom, reproducible from --seed, on a CPU in a few minutes:
  1. data:  32x32 warm and cool shapes (exactly 50/50) from tiny_assets.make_shape_image, captions from CAPTION_POOL;
  2. VAE:   AutoencoderKL trained for reconstruction (MSE + a small KL term); scaling_factor set so latents have
            unit standard deviation;
  3. UNet:  UNet2DConditionModel trained with the DDPM epsilon objective on the VAE latents, conditioned through
            the frozen tiny CLIP text encoder, with captions dropped (empty) now and then so classifier-free
            guidance works;
  4. save:  a complete StableDiffusionPipeline folder (safetensors; UNet and VAE stored in fp16, ~4.6 MiB in all),
            loadable with from_pretrained; its DDPMScheduler samples well in 20 steps;
  5. eval:  samples from the saved pipeline: the fraction classified warm (target ~0.5) and the fraction plausible
            (demo_scoring.is_plausible, target >= 0.8), and a grid of 32 samples, samples.png, next to the weights.

The model learns the unconditional mix of shapes: no caption mentions a colour, so a ~50/50 warm/cool sampler is
what the DPO demo then shifts towards warm.

    OMP_NUM_THREADS=2 python examples/pretrain_tiny_ldm.py [--output_dir examples/assets/tiny-shapes-sd]
"""

import argparse
import copy
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from demo_scoring import classify_warm, is_plausible
from diffusers import DDPMScheduler, StableDiffusionPipeline
from diffusers.utils import make_image_grid
from tiny_assets import CAPTION_POOL, build_tiny_sd_components, make_shape_image


# -- settings (the defaults produce the committed examples/assets/tiny-shapes-sd) --------------------------------
PRESET = "shapes"
IMAGE_SIZE = 32
N_IMAGES = 4096  # half warm, half cool
VAE_STEPS, VAE_BATCH, VAE_LR, VAE_WARMUP = 400, 32, 2e-3, 20
KL_WEIGHT = 1e-3  # per latent element; smaller (1e-4) left latents the UNet learnt worse (more stray blobs)
UNET_STEPS, UNET_BATCH, UNET_LR, UNET_WARMUP = 1500, 64, 1e-3, 100
SNR_GAMMA = 5.0  # Min-SNR loss weighting (Hang et al. 2023): less weight on the easy, low-noise timesteps
EMA_DECAY = 0.995  # samples come from an exponential moving average of the UNet weights
CAPTION_DROPOUT = 0.1  # empty caption, so classifier-free guidance is possible
EVAL_SEEDS, EVAL_PER_SEED, EVAL_STEPS = 8, 8, 20
EVAL_GUIDANCE = 1.0  # no CFG: the captions say nothing of colour, and guidance 2-3 changed nothing measurable


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default=str(Path(__file__).resolve().parent / "assets" / "tiny-shapes-sd"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae_steps", type=int, default=VAE_STEPS)
    parser.add_argument("--unet_steps", type=int, default=UNET_STEPS)
    parser.add_argument("--unet_lr", type=float, default=UNET_LR)
    parser.add_argument("--guidance_scale", type=float, default=EVAL_GUIDANCE, help="for the evaluation samples")
    parser.add_argument("--device", default="cpu", help="random numbers are drawn on the CPU whatever the device")
    return parser.parse_args(input_args)


def to_tensor(images):
    """PIL images -> (N, 3, H, W) float tensor in [-1, 1], as the Stable Diffusion VAE expects."""
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


def warmup_cosine(optimizer, warmup_steps, total_steps):
    """Learning rate: linear warmup, then a cosine decay to zero (short runs end on small, careful steps)."""

    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + np.cos(np.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def log(message, start):
    print(f"[{time.time() - start:6.1f}s] {message}", flush=True)


def evaluate(pipeline, guidance_scale):
    """Samples EVAL_SEEDS x EVAL_PER_SEED images (captions cycling through CAPTION_POOL) from a pipeline; returns
    (images, fraction warm, fraction plausible)."""
    pipeline.set_progress_bar_config(disable=True)
    samples = []
    for seed in range(EVAL_SEEDS):
        prompts = [CAPTION_POOL[(seed * EVAL_PER_SEED + i) % len(CAPTION_POOL)] for i in range(EVAL_PER_SEED)]
        samples += pipeline(
            prompts,
            height=IMAGE_SIZE,
            width=IMAGE_SIZE,
            num_inference_steps=EVAL_STEPS,
            guidance_scale=guidance_scale,
            generator=torch.Generator().manual_seed(seed),
        ).images
    return samples, np.mean([classify_warm(image) for image in samples]), np.mean([is_plausible(i) for i in samples])


def main(input_args=None):
    args = parse_args(input_args)
    device = torch.device(args.device)
    start = time.time()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    output_dir = Path(args.output_dir)

    # 1. Data -----------------------------------------------------------------------------------------------------
    warm = [index < N_IMAGES // 2 for index in range(N_IMAGES)]
    rng.shuffle(warm)
    images = to_tensor([make_shape_image(is_warm, rng, IMAGE_SIZE) for is_warm in warm])
    caption_ids = torch.tensor([rng.randrange(len(CAPTION_POOL)) for _ in warm])
    log(f"data: {N_IMAGES} images of {IMAGE_SIZE}x{IMAGE_SIZE}, {sum(warm)} warm", start)

    # The model's components, random: the pipeline saved at the end holds exactly these (text encoder untrained).
    components = build_tiny_sd_components(str(output_dir / "tokenizer"), seed=args.seed, preset=PRESET)
    vae, unet, text_encoder, tokenizer = (components[k] for k in ("vae", "unet", "text_encoder", "tokenizer"))
    noise_scheduler: DDPMScheduler = components["scheduler"]
    text_encoder.requires_grad_(False).eval()
    vae.to(device)
    unet.to(device)

    # 2. VAE ------------------------------------------------------------------------------------------------------
    optimizer = torch.optim.AdamW(vae.parameters(), lr=VAE_LR, weight_decay=0.0)
    schedule = warmup_cosine(optimizer, VAE_WARMUP, args.vae_steps)
    vae.train()
    for step in range(1, args.vae_steps + 1):
        batch = images[torch.randint(0, N_IMAGES, (VAE_BATCH,))].to(device)
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        mse = F.mse_loss(reconstruction, batch)
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = mse + KL_WEIGHT * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == args.vae_steps:
            log(f"vae step {step}/{args.vae_steps}: mse {mse.item():.5f} kl {kl.item():.3f}", start)
    vae.eval().requires_grad_(False)

    # Latents as the DPO trainer computes them (posterior mean), scaled to unit standard deviation.
    with torch.no_grad():
        latents = torch.cat([vae.encode(chunk.to(device)).latent_dist.mean.cpu() for chunk in images.split(256)])
        check = images[:256].to(device)
        reconstruction_mse = F.mse_loss(vae.decode(latents[:256].to(device)).sample, check).item()
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    latents = latents * vae.config.scaling_factor
    log(
        f"latents {tuple(latents.shape[1:])}, scaling_factor {vae.config.scaling_factor:.4f}, "
        f"reconstruction mse (posterior mean) {reconstruction_mse:.5f}",
        start,
    )

    # 3. UNet -----------------------------------------------------------------------------------------------------
    with torch.no_grad():  # row 0 is the empty caption, rows 1.. the pool, as the pipeline encodes prompts
        tokens = tokenizer(
            [""] + list(CAPTION_POOL),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        caption_embeds = text_encoder(tokens.input_ids)[0].to(device)
    snr = noise_scheduler.alphas_cumprod / (1 - noise_scheduler.alphas_cumprod)
    min_snr_weight = (snr.clamp(max=SNR_GAMMA) / snr if SNR_GAMMA else torch.ones_like(snr)).to(device)
    ema_unet = copy.deepcopy(unet).requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.unet_lr, weight_decay=0.0)
    schedule = warmup_cosine(optimizer, UNET_WARMUP, args.unet_steps)
    unet.train()
    running = []
    for step in range(1, args.unet_steps + 1):
        index = torch.randint(0, N_IMAGES, (UNET_BATCH,))
        rows = torch.where(torch.rand(UNET_BATCH) < CAPTION_DROPOUT, 0, caption_ids[index] + 1)
        noise = torch.randn(UNET_BATCH, *latents.shape[1:])
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (UNET_BATCH,))
        noise, timesteps, rows = noise.to(device), timesteps.to(device), rows.to(device)
        noisy = noise_scheduler.add_noise(latents[index].to(device), noise, timesteps)
        per_sample = F.mse_loss(unet(noisy, timesteps, caption_embeds[rows]).sample, noise, reduction="none")
        loss = (per_sample.mean(dim=(1, 2, 3)) * min_snr_weight[timesteps]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():  # EMA, warmed up so early steps are not averaged with the random init for long
            decay = min(EMA_DECAY, (1 + step) / (10 + step))
            for ema_param, param in zip(ema_unet.parameters(), unet.parameters()):
                ema_param.lerp_(param, 1 - decay)
        running.append(loss.item())
        if step % 100 == 0 or step == args.unet_steps:
            log(f"unet step {step}/{args.unet_steps}: loss {np.mean(running):.4f}", start)
            running = []

    # 4. Save -----------------------------------------------------------------------------------------------------
    # UNet and VAE weights are stored in fp16 (half the size; diffusers loads them back as fp32 unless told
    # otherwise, and the samples are unchanged). The text encoder stays fp32: transformers would load it as fp16,
    # and a plain from_pretrained pipeline would then mix dtypes.
    pipeline = StableDiffusionPipeline(
        vae=vae.to("cpu").half(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=ema_unet.to("cpu").half(),
        scheduler=noise_scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(output_dir, safe_serialization=True)
    sizes = {p.relative_to(output_dir): p.stat().st_size for p in output_dir.rglob("*.safetensors")}
    log(f"saved {output_dir}: " + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in sorted(sizes.items())), start)

    # 5. Evaluate the saved pipeline ------------------------------------------------------------------------------
    pipeline = StableDiffusionPipeline.from_pretrained(output_dir, safety_checker=None, requires_safety_checker=False)
    samples, warm_fraction, plausible_fraction = evaluate(pipeline.to(device), args.guidance_scale)
    make_image_grid(samples[:32], rows=4, cols=8).save(output_dir / "samples.png")
    log(
        f"eval: {len(samples)} samples ({EVAL_STEPS} steps, guidance {args.guidance_scale}): "
        f"warm {warm_fraction:.3f} (target 0.3-0.7), plausible {plausible_fraction:.3f} (target >= 0.8); "
        f"grid {output_dir / 'samples.png'}",
        start,
    )
    return pipeline


if __name__ == "__main__":
    main()
