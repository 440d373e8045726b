#!/usr/bin/env python
# Copyright 2026 The Diffusion-DPO toolkit authors. Licensed under the Apache License, Version 2.0.
"""Diffusion-DPO fine-tuning of FLUX.2 [klein] (Wallace et al., arXiv 2311.12908), in its rectified-flow form
(Flow-DPO, Liu et al., arXiv 2501.13918): the DPO loss on velocity errors.

Top to bottom as the data flows: flags -> how captions and images are encoded (once, into a cache) -> the noise
-> the FLUX.2 transformer (LoRA, optionally on a 4-bit base, or full fine-tuning against a frozen copy) -> the
training loop -> saving. What every model family shares (data, cache, loss, checkpoints, outputs) is in
diffusion_dpo/, one module per concern.

    accelerate launch train_diffusion_dpo_flux2.py \\
        --pretrained_model_name_or_path black-forest-labs/FLUX.2-klein-base-4B --resolution 512    # docs/flux.md

klein's own: one text encoder, Qwen3, whose hidden states after layers 9, 18 and 27 (of the prompt in Qwen's chat
template) are stacked side by side into the text input; a 32-channel VAE whose latents are patched 2 x 2 and
normalised by the VAE's batch-norm statistics, then packed into the transformer's tokens with 4-axis positions;
rectified flow at the scheduler's sigmas, shifted as Flux2KleinPipeline shifts them (its empirical mu, from the
image's token count); the transformer takes sigma as its timestep and has no guidance input (klein is not
guidance-distilled).
"""

import os

import torch
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
)
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu
from peft.utils import get_peft_model_state_dict

from diffusion_dpo import InputError
from diffusion_dpo.args import (
    add_flow_options,
    add_quantize_base_option,
    check_args,
    check_quantize_base,
    lora_target_modules,
    shared_parser,
)
from diffusion_dpo.cache import image_latent_shape
from diffusion_dpo.family import (
    ModelFamily,
    build_models,
    check_denoiser_config,
    check_model_folder,
    folder_identity,
    from_model,
    load_text_encoders,
    model_vae_config,
    prompt_conditioning,
    text_encoder_config,
    vae_dtype_from_config,
)
from diffusion_dpo.losses import compute_loss
from diffusion_dpo.noise import FlowMatchNoise
from diffusion_dpo.run import one_line_errors
from diffusion_dpo.training import TrainingRun, cached_pairs, training_session


MODEL_PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
TEXT_ENCODER_LAYERS = (9, 18, 27)  # Flux2KleinPipeline's text_encoder_out_layers, BFL's OUTPUT_LAYERS_QWEN3
# The shift of Flux2KleinPipeline's sigmas depends on its number of steps: its default, klein base's 50
PIPELINE_STEPS = 50
# diffusers' klein LoRA trainer's (train_dreambooth_lora_flux2_klein.py): the double-stream blocks' image attention
# and the single-stream blocks' fused projections (q, k, v and the MLP's input in to_qkv_mlp_proj, both outputs in
# to_out); klein 9B has 24 single-stream blocks, 4B 20 (names of blocks a model lacks match nothing)
LORA_TARGET_MODULES = [
    *("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.to_qkv_mlp_proj"),
    *(f"single_transformer_blocks.{block}.attn.to_out" for block in range(24)),
]
OTHER_MODELS_HINT = (
    "this script trains FLUX.2 [klein] models (not the guidance-distilled FLUX.2 [dev]); train FLUX.1 models with "
    "train_diffusion_dpo_flux.py, SD3 models with train_diffusion_dpo_sd3.py, SDXL models with "
    "train_diffusion_dpo_sdxl.py and SD 1.x/2.x models with train_diffusion_dpo.py"
)


# ----------------------------------------------------------------------------------------------------------------
# 1. Flags: the shared ones (diffusion_dpo/args.py), klein's defaults, and its own
# ----------------------------------------------------------------------------------------------------------------


def parse_args(input_args=None):
    parser, groups = shared_parser(
        "Diffusion-DPO (Flow-DPO) fine-tuning of FLUX.2 [klein] models.",
        model="black-forest-labs/FLUX.2-klein-base-4B",
        resolution=1024,
        # eps error = (1 - sigma)^2 x velocity error: SDXL's 5000 x E[(1 - sigma)^2] (0.038 at 1024 px) ~ 200
        beta_dpo=200.0,
        output_dir="diffusion-dpo-flux2",
        validation_steps=PIPELINE_STEPS,
        guidance_scale=4.0,
    )
    groups["model"].add_argument(
        "--max_sequence_length",
        type=int,
        default=512,
        help="Qwen3 tokens per caption, its chat template included (at most 512): Flux2KleinPipeline's default. "
        "The model card records it: inference must use the same.",
    )
    add_quantize_base_option(groups)
    groups["loss"].add_argument(
        "--lora_target_modules",
        default=",".join(LORA_TARGET_MODULES),
        help="Comma-separated transformer modules that get LoRA layers (default: diffusers' klein LoRA trainer's, "
        "the double-stream blocks' image attention and the single-stream blocks' fused projections).",
    )
    add_flow_options(groups)
    return parser.parse_and_check(input_args, check_flags)


def check_flags(args):
    model = args.pretrained_model_name_or_path
    if os.path.isdir(os.path.join(model, "unet")):
        raise InputError(f"model folder '{model}' holds a UNet, not a FLUX.2 transformer: {OTHER_MODELS_HINT}")
    check_model_folder(args, MODEL_PARTS)
    check_quantize_base(args)
    check_args(args, FAMILY, resolution_multiple=16)  # the VAE's 8 x the 2 x 2 patches


# ----------------------------------------------------------------------------------------------------------------
# 2. Captions and images, as Flux2KleinPipeline encodes them (into the cache, once)
# ----------------------------------------------------------------------------------------------------------------


def load_text_encoder(args, device, dtype):
    """encode(captions) -> {"prompt_embeds"} as Flux2KleinPipeline.encode_prompt computes it: each caption in Qwen's
    chat template (thinking off), padded to --max_sequence_length tokens, and Qwen3's hidden states after layers 9,
    18 and 27 side by side. Their positions, text_ids, follow from the length: nothing more to cache."""
    ((qwen3, tokenizer),) = load_text_encoders(args, [""], device, dtype)

    def encode(captions):
        embeds = Flux2KleinPipeline._get_qwen3_prompt_embeds(
            qwen3,
            tokenizer,
            captions,
            device=device,
            max_sequence_length=args.max_sequence_length,
            hidden_states_layers=TEXT_ENCODER_LAYERS,
        )
        return {"prompt_embeds": embeds}

    return encode


def caption_bytes(args):
    width = len(TEXT_ENCODER_LAYERS) * text_encoder_config(args, "text_encoder").hidden_size
    return 2 * args.max_sequence_length * width


def cache_key(args, weight_dtype):
    """What the cached encodings depend on besides the data and image settings: the encoders' files and the length."""
    return {
        "model": folder_identity(args.pretrained_model_name_or_path, args, ("vae", "text_encoder", "tokenizer")),
        "max_sequence_length": args.max_sequence_length,
        "text_encoder_layers": TEXT_ENCODER_LAYERS,
    }


def load_vae(args, dtype):
    return from_model(args, AutoencoderKLFlux2.from_pretrained, "vae", variant=args.variant, torch_dtype=dtype)


def normalized_latents(vae, means):
    """The VAE's mean latents as Flux2KleinPipeline denoises them: patched 2 x 2 (4 x the channels at half the size),
    each patched channel normalised by the VAE's batch-norm running statistics. Cached unpatched again, at the VAE's
    own size (predict patches them): patching only moves numbers, so noise and errors are the same either way."""
    patched = Flux2KleinPipeline._patchify_latents(means)
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(patched)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(patched)
    return Flux2KleinPipeline._unpatchify_latents((patched - mean) / std)


# ----------------------------------------------------------------------------------------------------------------
# 3. The transformer: patched and packed latents, 4-axis positions, velocity prediction
# ----------------------------------------------------------------------------------------------------------------


def load_noise(args):
    """Rectified flow at the scheduler's sigmas, shifted as Flux2KleinPipeline shifts them for images of
    --resolution sampled in its default 50 steps (compute_empirical_mu of the image's tokens), drawn and weighted by
    --weighting_scheme. Also what examples/evaluate_dpo.py evaluates with."""
    scheduler = from_model(args, FlowMatchEulerDiscreteScheduler.from_pretrained, "scheduler")
    _, height, width = image_latent_shape(args, FAMILY)  # tokens: one per 2 x 2 patch
    mu = compute_empirical_mu(image_seq_len=(height // 2) * (width // 2), num_steps=PIPELINE_STEPS)
    weighting = (args.weighting_scheme, args.logit_mean, args.logit_std, args.mode_scale)
    return FlowMatchNoise(scheduler, *weighting, mu=mu)


def predict(transformer, noisy_latents, timesteps, conditioning):
    """The velocity for (n, C, h, w) latents, as Flux2KleinPipeline calls its transformer: patched 2 x 2 and packed
    into tokens with positions (t, h, w, l) = (0, row, column, 0), the text at (0, 0, 0, index), the timestep as
    sigma (timestep / 1000), no guidance; unpacked and unpatched again."""
    patched = Flux2KleinPipeline._patchify_latents(noisy_latents)
    n, channels, height, width = patched.shape
    text = conditioning["encoder_hidden_states"]
    velocity = transformer(
        hidden_states=Flux2KleinPipeline._pack_latents(patched),
        encoder_hidden_states=text,
        timestep=timesteps / 1000,
        img_ids=Flux2KleinPipeline._prepare_latent_ids(patched).to(patched.device),
        txt_ids=Flux2KleinPipeline._prepare_text_ids(text).to(patched.device),
        guidance=None,
        return_dict=False,
    )[0]
    # tokens are in row-major order, as _pack_latents made them
    return Flux2KleinPipeline._unpatchify_latents(velocity.transpose(1, 2).reshape(n, channels, height, width))


# ----------------------------------------------------------------------------------------------------------------
# 4. Saving: the pipeline it loads in, the LoRA, the model card
# ----------------------------------------------------------------------------------------------------------------


def load_pipeline(args, transformer, **components):
    options = dict(revision=args.revision, variant=args.variant, cache_dir=args.cache_dir)
    return Flux2KleinPipeline.from_pretrained(
        args.pretrained_model_name_or_path, transformer=transformer, **options, **components
    )


def card_details(args):
    length = args.max_sequence_length
    quantized = ""
    if args.quantize_base:
        quantized = " on a 4-bit (NF4) base transformer; it loads on the bfloat16 base as shown"
    loss = "velocity errors" if args.loss_type == "mapo" else "[Flow-DPO](https://arxiv.org/abs/2501.13918)"
    return {
        "license": "other",
        "tags": ["flux2", "flux2-klein", "flux2-klein-diffusers"],
        "dtype": "bfloat16",
        "call_options": f", max_sequence_length={length}",
        "method_note": f" in its rectified-flow form ({loss}, noise levels by `{args.weighting_scheme}`)",
        "notes": f"\nTrained on captions of {length} Qwen3 tokens (`--max_sequence_length {length}`){quantized}: "
        f"call the pipeline with `max_sequence_length={length}`.\n",
    }


FAMILY = ModelFamily(
    name="FLUX.2 [klein]",
    pipeline_class=Flux2KleinPipeline,
    denoiser="transformer",
    cache_key=cache_key,
    load_text_encoder=load_text_encoder,
    caption_bytes=caption_bytes,
    conditioning=prompt_conditioning,
    load_pipeline=load_pipeline,
    card_details=card_details,
    load_vae=load_vae,
    vae_dtype=vae_dtype_from_config,
    vae_latents=normalized_latents,
    predict=predict,
    # PEFT's names under `transformer.`, as diffusers' klein LoRA trainer saves them (Flux2KleinPipeline loads them)
    lora_state_dict=get_peft_model_state_dict,
    validation_kwargs=lambda args: {"max_sequence_length": args.max_sequence_length},
    epsilon_beta_factor=26.0,  # velocity errors: 1 / E[(1 - sigma)^2] at 1024 px (docs/loss-and-learning-rates.md)
    resume_flags=(
        *("max_sequence_length", "quantize_base"),
        *("weighting_scheme", "logit_mean", "logit_std", "mode_scale"),
    ),
)


# ----------------------------------------------------------------------------------------------------------------
# 5. The run: pairs -> cache -> transformer and reference -> training loop -> saved LoRA or pipeline
# ----------------------------------------------------------------------------------------------------------------


def main(args):
    """Trains and saves; returns {'global_step', 'history': [per-step metrics], 'evaluations': [held-out metrics]}."""
    with training_session(args, FAMILY) as session:
        accelerator = session.accelerator
        # a FLUX.1 folder has the same layout; FLUX.2 [dev]'s transformer has a guidance input (and Mistral's text)
        expected = {
            "_class_name": "Flux2Transformer2DModel",
            "in_channels": 4 * model_vae_config(args)["latent_channels"],
            "guidance_embeds": False,
        }
        check_denoiser_config(args, Flux2Transformer2DModel, "transformer", expected, OTHER_MODELS_HINT)

        # Data: the pairs, then their latents and caption embeddings, encoded once into the cache.
        data = cached_pairs(args, accelerator, FAMILY)

        # The transformer and its reference (LoRA: the same transformer, adapter off; --quantize_base: held in 4
        # bits), and the noise: rectified flow at the sigmas Flux2KleinPipeline samples at this resolution.
        model_class, targets = Flux2Transformer2DModel, lora_target_modules(args)
        transformer, reference = build_models(args, FAMILY, model_class, targets, accelerator)
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
