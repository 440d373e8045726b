#!/usr/bin/env python
# Copyright 2026 The Diffusion-DPO toolkit authors. Licensed under the Apache License, Version 2.0.
"""Diffusion-DPO fine-tuning of Stable Diffusion 3 / 3.5 (Wallace et al., arXiv 2311.12908), in its rectified-flow
form (Flow-DPO, Liu et al., arXiv 2501.13918): the DPO loss on velocity errors.

Top to bottom as the data flows: flags -> how captions and images are encoded (once, into a cache) -> the noise
-> the MMDiT transformer (LoRA, or full fine-tuning against a frozen copy) -> the training loop -> saving. What
every model family shares (data, cache, loss, checkpoints, outputs) is in diffusion_dpo/, one module per concern.

    accelerate launch train_diffusion_dpo_sd3.py \\
        --pretrained_model_name_or_path stabilityai/stable-diffusion-3.5-medium --beta_dpo 500

SD3's own: three text encoders (CLIP-L and CLIP-G penultimate states side by side, zero-padded to T5-XXL's width and
followed by T5's states along the sequence; the pooled input is both CLIP projections), T5 optional (--no_t5: zeros
in its place, as the pipeline does without it); a 16-channel VAE whose latents are (mean - shift) * scale;
rectified flow: noisy = (1 - sigma) x0 + sigma eps, the transformer predicts the velocity eps - x0, sigma drawn by
--weighting_scheme as in diffusers' SD3 DreamBooth script.
"""

import os

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from peft.utils import get_peft_model_state_dict

from diffusion_dpo import InputError
from diffusion_dpo.args import add_flow_options, check_args, lora_target_modules, shared_parser
from diffusion_dpo.family import (
    ModelFamily,
    build_models,
    check_denoiser_config,
    check_model_folder,
    folder_identity,
    from_model,
    load_text_encoders,
    model_vae_config,
    text_encoder_config,
    tokens,
    transformer_text_conditioning,
    vae_dtype_from_config,
)
from diffusion_dpo.losses import compute_loss
from diffusion_dpo.noise import FlowMatchNoise
from diffusion_dpo.run import one_line_errors
from diffusion_dpo.training import TrainingRun, cached_pairs, training_session


MODEL_PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
T5_PARTS = ("text_encoder_3", "tokenizer_3")
# the joint attention's projections of the image stream (to_*) and of the text stream (add_* and to_add_out)
LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
OTHER_MODELS_HINT = (
    "this script trains Stable Diffusion 3 / 3.5 models; train SD 1.x/2.x models with train_diffusion_dpo.py, "
    "SDXL models with train_diffusion_dpo_sdxl.py and FLUX.1 models with train_diffusion_dpo_flux.py"
)


# ----------------------------------------------------------------------------------------------------------------
# 1. Flags: the shared ones (diffusion_dpo/args.py), SD3's defaults, and its own
# ----------------------------------------------------------------------------------------------------------------


def parse_args(input_args=None):
    parser, groups = shared_parser(
        "Diffusion-DPO (Flow-DPO) fine-tuning of Stable Diffusion 3 / 3.5 models.",
        model="stabilityai/stable-diffusion-3.5-medium",
        resolution=1024,
        # SDXL's 5000 on epsilon errors is ~500 on velocity errors: eps error = (1 - sigma)^2 x velocity error, and
        # E[(1 - sigma)^2] = 0.11 under SD3's sigmas; sweep 200-2000 (docs/loss-and-learning-rates.md)
        beta_dpo=500.0,
        output_dir="diffusion-dpo-sd3",
        validation_steps=28,
        guidance_scale=5.0,
    )
    groups["model"].add_argument(
        "--no_t5",
        action="store_true",
        help="Leave the T5-XXL text encoder out (4.7B parameters): its part of the prompt embedding is zeros, as "
        "StableDiffusion3Pipeline(text_encoder_3=None) makes it; validation and a saved pipeline go without T5 too.",
    )
    groups["model"].add_argument(
        "--max_sequence_length",
        type=int,
        default=256,
        help="T5 tokens per caption (the pipeline's default, 256; at most 512).",
    )
    groups["loss"].add_argument(
        "--lora_target_modules",
        default=",".join(LORA_TARGET_MODULES),
        help="Comma-separated transformer modules that get LoRA layers (default: the joint attention's image and "
        "text projections).",
    )
    add_flow_options(groups)
    return parser.parse_and_check(input_args, check_flags)


def check_flags(args):
    model = args.pretrained_model_name_or_path
    if os.path.isdir(os.path.join(model, "unet")):
        raise InputError(f"model folder '{model}' holds a UNet, not an SD3 transformer: {OTHER_MODELS_HINT}")
    # first: a Flux or PixArt folder has the same layout, and lacking text_encoder_3 would be sent to --no_t5
    expected = {"_class_name": "SD3Transformer2DModel"}
    check_denoiser_config(args, SD3Transformer2DModel, "transformer", expected, OTHER_MODELS_HINT)
    missing_t5 = not args.no_t5 and os.path.isdir(model) and not all(os.path.isdir(f"{model}/{p}") for p in T5_PARTS)
    parts = MODEL_PARTS + (() if args.no_t5 else T5_PARTS)
    check_model_folder(args, parts, "; pass --no_t5 to train without T5" if missing_t5 else "")
    check_args(args, FAMILY, resolution_multiple=16)  # the VAE's 8 x the transformer's 2 x 2 patches


# ----------------------------------------------------------------------------------------------------------------
# 2. Captions and images, as the SD3 pipeline encodes them (into the cache, once)
# ----------------------------------------------------------------------------------------------------------------


def joint_attention_dim(args):
    """The width of the prompt embedding: T5's hidden size, which the transformer's config records."""
    return SD3Transformer2DModel.load_config(
        args.pretrained_model_name_or_path, subfolder="transformer", revision=args.revision, cache_dir=args.cache_dir
    )["joint_attention_dim"]


def load_text_encoder(args, device, dtype):
    """encode(captions) -> {"prompt_embeds", "pooled_prompt_embeds"} as StableDiffusion3Pipeline.encode_prompt
    computes them: CLIP-L's and CLIP-G's penultimate hidden states side by side, zero-padded to T5's width and
    followed along the sequence by T5's last hidden states (zeros without T5); pooled: both CLIP projections."""
    encoders = load_text_encoders(args, ["", "_2"] if args.no_t5 else ["", "_2", "_3"], device, dtype)
    t5_width = joint_attention_dim(args)

    def encode(captions):
        clip = [
            encoder(tokens(tokenizer, captions, device=device), output_hidden_states=True)
            for encoder, tokenizer in encoders[:2]
        ]
        clip_embeds = torch.cat([output.hidden_states[-2] for output in clip], dim=-1)
        if args.no_t5:
            t5_embeds = clip_embeds.new_zeros(len(captions), args.max_sequence_length, t5_width)
        else:
            t5, t5_tokenizer = encoders[2]
            t5_embeds = t5(tokens(t5_tokenizer, captions, args.max_sequence_length, device))[0].to(clip_embeds.dtype)
        clip_embeds = F.pad(clip_embeds, (0, t5_embeds.shape[-1] - clip_embeds.shape[-1]))
        pooled = torch.cat([output.text_embeds for output in clip], dim=-1)
        return {"prompt_embeds": torch.cat([clip_embeds, t5_embeds], dim=-2), "pooled_prompt_embeds": pooled}

    return encode


def caption_bytes(args):
    first, second = text_encoder_config(args, "text_encoder"), text_encoder_config(args, "text_encoder_2")
    length = first.max_position_embeddings + args.max_sequence_length
    return 2 * (length * joint_attention_dim(args) + first.projection_dim + second.projection_dim)


def cache_key(args, weight_dtype):
    """What the cached encodings depend on besides the data and image settings: the encoders' files and T5's use."""
    encoders = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2") + (() if args.no_t5 else T5_PARTS)
    return {
        "model": folder_identity(args.pretrained_model_name_or_path, args, encoders),
        "t5": not args.no_t5,
        "max_sequence_length": args.max_sequence_length,  # also the length of T5's zeros without it
    }


# ----------------------------------------------------------------------------------------------------------------
# 3. The transformer: text conditioning, velocity prediction
# ----------------------------------------------------------------------------------------------------------------


def load_noise(args):
    """Rectified flow at the scheduler's (shifted) sigmas, drawn and weighted by --weighting_scheme. Also what
    examples/evaluate_dpo.py evaluates with. A scheduler with use_dynamic_shifting (none of Stability's SD3 / 3.5
    configs: they shift by 3.0) gets the shift the pipeline computes from the image's patches, (1024 / 16)^2 at
    1024 px: (resolution / (the VAE's factor x the transformer's patch size))^2."""
    scheduler = from_model(args, FlowMatchEulerDiscreteScheduler.from_pretrained, "scheduler")
    vae_factor = 2 ** (len(model_vae_config(args)["block_out_channels"]) - 1)
    patch_size = from_model(args, SD3Transformer2DModel.load_config, "transformer")["patch_size"]
    options = (args.weighting_scheme, args.logit_mean, args.logit_std, args.mode_scale)
    return FlowMatchNoise(scheduler, *options, image_seq_len=(args.resolution // (vae_factor * patch_size)) ** 2)


def predict(transformer, noisy_latents, timesteps, conditioning):
    return transformer(hidden_states=noisy_latents, timestep=timesteps, **conditioning, return_dict=False)[0]


# ----------------------------------------------------------------------------------------------------------------
# 4. Saving: the pipeline it loads in (without T5 under --no_t5), the LoRA, the model card
# ----------------------------------------------------------------------------------------------------------------


def load_pipeline(args, transformer, **components):
    without_t5 = {"text_encoder_3": None, "tokenizer_3": None} if args.no_t5 else {}
    return StableDiffusion3Pipeline.from_pretrained(
        args.pretrained_model_name_or_path,
        transformer=transformer,
        revision=args.revision,
        variant=args.variant,
        cache_dir=args.cache_dir,
        **without_t5,
        **components,
    )


def card_details(args):
    flow_dpo = "" if args.loss_type == "mapo" else "[Flow-DPO](https://arxiv.org/abs/2501.13918), "
    return {
        "license": "other",
        "tags": ["sd3", "sd3-diffusers"],
        "dtype": "bfloat16",
        "load_options": ", text_encoder_3=None, tokenizer_3=None" if args.no_t5 else "",
        "method_note": f" in its rectified-flow form ({flow_dpo}velocity errors, noise levels by "
        f"`{args.weighting_scheme}`)",
        "notes": "\nTrained without T5 (its part of the prompt embedding zeros), so it is loaded without T5.\n"
        if args.no_t5
        else "",
    }


FAMILY = ModelFamily(
    name="Stable Diffusion 3",
    pipeline_class=StableDiffusion3Pipeline,
    denoiser="transformer",
    cache_key=cache_key,
    load_text_encoder=load_text_encoder,
    caption_bytes=caption_bytes,
    conditioning=transformer_text_conditioning,
    load_pipeline=load_pipeline,
    card_details=card_details,
    vae_dtype=vae_dtype_from_config,
    predict=predict,
    # PEFT's names, as diffusers' SD3 scripts save them (diffusers' older naming covers only the to_* projections)
    lora_state_dict=get_peft_model_state_dict,
    validation_kwargs=lambda args: {"max_sequence_length": args.max_sequence_length},
    epsilon_beta_factor=9.0,  # velocity errors: 1 / E[(1 - sigma)^2] (docs/loss-and-learning-rates.md)
    resume_flags=("no_t5", "max_sequence_length", "weighting_scheme", "logit_mean", "logit_std", "mode_scale"),
)


# ----------------------------------------------------------------------------------------------------------------
# 5. The run: pairs -> cache -> transformer and reference -> training loop -> saved LoRA or pipeline
# ----------------------------------------------------------------------------------------------------------------


def main(args):
    """Trains and saves; returns {'global_step', 'history': [per-step metrics], 'evaluations': [held-out metrics]}."""
    with training_session(args, FAMILY) as session:
        accelerator = session.accelerator

        # Data: the pairs, then their latents and caption embeddings, encoded once into the cache.
        data = cached_pairs(args, accelerator, FAMILY)

        # The transformer and its reference (LoRA: the same transformer, adapter off), and the noise: rectified
        # flow at the scheduler's (shifted) sigmas, drawn by --weighting_scheme.
        targets = lora_target_modules(args)
        transformer, reference = build_models(args, FAMILY, SD3Transformer2DModel, targets, accelerator)
        noise = load_noise(args)

        # Every step: the DPO loss on the velocity errors of winner and loser, corrupted alike.
        run = TrainingRun(args, session, FAMILY, transformer, reference, noise, data)
        for batch, generator in run.batches():
            with accelerator.accumulate(run.model):
                loss, metrics = compute_loss(batch, run.model, reference, noise, FAMILY, args, generator)
                run.backward_and_step(loss, metrics)
            run.end_step()  # logs; checkpoints, held-out metrics and validation images when due; stop on a signal
        return run.finish()  # held-out metrics, validation images, the LoRA or pipeline, the model card, the Hub


if __name__ == "__main__":
    with one_line_errors():
        main(parse_args())
