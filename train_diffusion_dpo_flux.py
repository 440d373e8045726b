#!/usr/bin/env python
# Copyright 2026 The Diffusion-DPO toolkit authors. Licensed under the Apache License, Version 2.0.
"""Diffusion-DPO fine-tuning of FLUX.1 [dev] / [schnell] (Wallace et al., arXiv 2311.12908), in its rectified-flow
form (Flow-DPO, Liu et al., arXiv 2501.13918): the DPO loss on velocity errors.

Top to bottom as the data flows: flags -> how captions and images are encoded (once, into a cache) -> the noise
-> the Flux transformer (LoRA, optionally on a 4-bit base, or full fine-tuning against a frozen copy) -> the
training loop -> saving. What every model family shares (data, cache, loss, checkpoints, outputs) is in
diffusion_dpo/, one module per concern.

    accelerate launch train_diffusion_dpo_flux.py --pretrained_model_name_or_path black-forest-labs/FLUX.1-dev \\
        --resolution 512 --quantize_base nf4 --gradient_checkpointing --use_8bit_adam    # docs/flux.md

Flux's own: CLIP-L's pooled output and T5-XXL's hidden states as the text input (the token positions of the text,
text_ids, are zeros); a 16-channel VAE whose latents are (mean - shift) * scale, packed 2 x 2 into the tokens the
transformer sees; rectified flow at the scheduler's sigmas, shifted by the image's token count as FluxPipeline
shifts them ([dev]'s use_dynamic_shifting); the transformer takes sigma as its timestep and, in the guidance-distilled
[dev], the guidance scale (--guidance_scale) as one more input.
"""

import os

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from peft.utils import get_peft_model_state_dict

from diffusion_dpo import InputError
from diffusion_dpo.args import (
    add_flow_options,
    add_quantize_base_option,
    check_args,
    check_quantize_base,
    finite_number,
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
    tokens,
    transformer_text_conditioning,
    vae_dtype_from_config,
)
from diffusion_dpo.losses import compute_loss
from diffusion_dpo.noise import FlowMatchNoise
from diffusion_dpo.run import one_line_errors
from diffusion_dpo.training import TrainingRun, cached_pairs, training_session


MODEL_PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
# diffusers' Flux LoRA trainer's (train_dreambooth_lora_flux.py): the joint attention's image projections (to_*, also
# the single blocks' q, k, v), its text projections (add_*, to_add_out), and both streams' feed-forward layers
LORA_TARGET_MODULES = [
    *("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0"),
    *("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out"),
    *("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"),
]
OTHER_MODELS_HINT = (
    "this script trains FLUX.1 models; train SD 1.x/2.x models with train_diffusion_dpo.py, SDXL models with "
    "train_diffusion_dpo_sdxl.py and SD3 models with train_diffusion_dpo_sd3.py"
)


# ----------------------------------------------------------------------------------------------------------------
# 1. Flags: the shared ones (diffusion_dpo/args.py), Flux's defaults, and its own
# ----------------------------------------------------------------------------------------------------------------


def parse_args(input_args=None):
    parser, groups = shared_parser(
        "Diffusion-DPO (Flow-DPO) fine-tuning of FLUX.1 [dev] / [schnell] models.",
        model="black-forest-labs/FLUX.1-dev",
        resolution=1024,
        # eps error = (1 - sigma)^2 x velocity error: SDXL's 5000 x E[(1 - sigma)^2] (0.107 at 1024 px) ~ 500
        beta_dpo=500.0,
        output_dir="diffusion-dpo-flux",
        validation_steps=28,
        guidance_scale=3.5,
    )
    model = groups["model"].add_argument
    model(
        "--max_sequence_length",
        type=int,
        default=512,
        help="T5 tokens per caption (at most 512): FluxPipeline's default, 512, for [dev]; [schnell] was trained "
        "with 256, which its model card calls it with. The model card records it: inference must use the same.",
    )
    model(
        "--guidance_scale",
        type=float,
        default=3.5,
        help="The guidance input of a guidance-distilled transformer ([dev]) while training, as diffusers' Flux LoRA "
        "trainer passes it (3.5, [dev]'s inference default); [schnell] has no such input and ignores it.",
    )
    add_quantize_base_option(groups)
    groups["loss"].add_argument(
        "--lora_target_modules",
        default=",".join(LORA_TARGET_MODULES),
        help="Comma-separated transformer modules that get LoRA layers (default: diffusers' Flux LoRA trainer's, the "
        "attention's image and text projections and both feed-forward layers).",
    )
    add_flow_options(groups)
    return parser.parse_and_check(input_args, check_flags)


def check_flags(args):
    model = args.pretrained_model_name_or_path
    if os.path.isdir(os.path.join(model, "unet")):
        raise InputError(f"model folder '{model}' holds a UNet, not a Flux transformer: {OTHER_MODELS_HINT}")
    check_model_folder(args, MODEL_PARTS)
    finite_number(args, "guidance_scale")
    check_quantize_base(args)
    check_args(args, FAMILY, resolution_multiple=16)  # the VAE's 8 x the 2 x 2 packing


# ----------------------------------------------------------------------------------------------------------------
# 2. Captions and images, as FluxPipeline encodes them (into the cache, once)
# ----------------------------------------------------------------------------------------------------------------


def transformer_config(args):
    return from_model(args, FluxTransformer2DModel.load_config, "transformer")


def load_text_encoder(args, device, dtype):
    """encode(captions) -> {"prompt_embeds", "pooled_prompt_embeds"} as FluxPipeline.encode_prompt computes them:
    T5's last hidden states over --max_sequence_length tokens, and CLIP-L's pooled output."""
    (clip, clip_tokenizer), (t5, t5_tokenizer) = load_text_encoders(args, ["", "_2"], device, dtype)

    def encode(captions):
        pooled = clip(tokens(clip_tokenizer, captions, device=device)).pooler_output
        prompt_embeds = t5(tokens(t5_tokenizer, captions, args.max_sequence_length, device))[0]
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}

    return encode


def caption_bytes(args):
    config = transformer_config(args)
    return 2 * (args.max_sequence_length * config["joint_attention_dim"] + config["pooled_projection_dim"])


def cache_key(args, weight_dtype):
    """What the cached encodings depend on besides the data and image settings: the encoders' files and T5's length."""
    encoders = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    return {
        "model": folder_identity(args.pretrained_model_name_or_path, args, encoders),
        "max_sequence_length": args.max_sequence_length,
    }


# ----------------------------------------------------------------------------------------------------------------
# 3. The transformer: packed latents, text and guidance inputs, velocity prediction
# ----------------------------------------------------------------------------------------------------------------


def image_tokens(args):
    """The transformer's tokens per image: one per 2 x 2 latent patch ((resolution / 16)^2 with FLUX.1's VAE)."""
    _, height, width = image_latent_shape(args, FAMILY)
    return (height // 2) * (width // 2)


def load_noise(args):
    """Rectified flow at the scheduler's sigmas, shifted as FluxPipeline shifts them for images of --resolution
    (the scheduler's use_dynamic_shifting), drawn and weighted by --weighting_scheme. Also what
    examples/evaluate_dpo.py evaluates with."""
    scheduler = from_model(args, FlowMatchEulerDiscreteScheduler.from_pretrained, "scheduler")
    weighting = (args.weighting_scheme, args.logit_mean, args.logit_std, args.mode_scale)
    return FlowMatchNoise(scheduler, *weighting, image_seq_len=image_tokens(args))


def predict(transformer, noisy_latents, timesteps, conditioning):
    """The velocity for (n, 16, h, w) latents: packed into 2 x 2 patches with their positions as FluxPipeline packs
    them, the timestep as the pipeline passes it (sigma = timestep / 1000), the guidance where the transformer has a
    guidance input ([dev]), unpacked again."""
    n, channels, height, width = noisy_latents.shape
    inputs = dict(conditioning)
    guidance_scale = inputs.pop("guidance_scale")
    device, dtype = noisy_latents.device, noisy_latents.dtype
    guidance = None
    if getattr(transformer, "module", transformer).config.guidance_embeds:  # under DDP: the wrapped model's config
        guidance = torch.full((n,), guidance_scale, device=device, dtype=torch.float32)
    velocity = transformer(
        hidden_states=FluxPipeline._pack_latents(noisy_latents, n, channels, height, width),
        timestep=timesteps / 1000,
        guidance=guidance,
        img_ids=FluxPipeline._prepare_latent_image_ids(n, height // 2, width // 2, device, dtype),
        txt_ids=torch.zeros(inputs["encoder_hidden_states"].shape[1], 3, device=device, dtype=dtype),
        **inputs,
        return_dict=False,
    )[0]
    return FluxPipeline._unpack_latents(velocity, height, width, vae_scale_factor=1)


# ----------------------------------------------------------------------------------------------------------------
# 4. Saving: the pipeline it loads in, the LoRA, the model card
# ----------------------------------------------------------------------------------------------------------------


def load_pipeline(args, transformer, **components):
    model = args.pretrained_model_name_or_path
    options = dict(revision=args.revision, variant=args.variant, cache_dir=args.cache_dir)
    return FluxPipeline.from_pretrained(model, transformer=transformer, **options, **components)


def card_details(args):
    flow_dpo = "" if args.loss_type == "mapo" else "[Flow-DPO](https://arxiv.org/abs/2501.13918), "
    length = args.max_sequence_length
    quantized = (
        " on a 4-bit (NF4) base transformer; it loads on the bfloat16 base as shown" if args.quantize_base else ""
    )
    return {
        "license": "other",
        "tags": ["flux", "flux-diffusers"],
        "dtype": "bfloat16",
        "call_options": f", max_sequence_length={length}",
        "method_note": f" in its rectified-flow form ({flow_dpo}velocity errors, noise levels by "
        f"`{args.weighting_scheme}`, guidance input {args.guidance_scale:g})",
        "notes": f"\nTrained on captions of {length} T5 tokens (`--max_sequence_length {length}`){quantized}: "
        f"call the pipeline with `max_sequence_length={length}`.\n",
    }


FAMILY = ModelFamily(
    name="FLUX.1",
    pipeline_class=FluxPipeline,
    denoiser="transformer",
    cache_key=cache_key,
    load_text_encoder=load_text_encoder,
    caption_bytes=caption_bytes,
    conditioning=transformer_text_conditioning,
    load_pipeline=load_pipeline,
    card_details=card_details,
    vae_dtype=vae_dtype_from_config,
    predict=predict,
    # PEFT's names under `transformer.`, as diffusers' Flux LoRA trainer saves them; ComfyUI maps them to its Flux
    # weights (comfy/lora.py's "diffusers flux lora format"), so no kohya file is needed
    lora_state_dict=get_peft_model_state_dict,
    fixed_inputs=lambda args: {"guidance_scale": args.guidance_scale},
    validation_kwargs=lambda args: {"max_sequence_length": args.max_sequence_length},
    epsilon_beta_factor=9.0,  # velocity errors: 1 / E[(1 - sigma)^2] (docs/loss-and-learning-rates.md)
    resume_flags=(
        *("max_sequence_length", "guidance_scale", "quantize_base"),
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
        # an SD3 or PixArt folder has the same layout; FLUX.1 Fill's transformer takes more input channels
        packed_channels = 4 * model_vae_config(args)["latent_channels"]
        expected = {"_class_name": "FluxTransformer2DModel", "in_channels": packed_channels}
        check_denoiser_config(args, FluxTransformer2DModel, "transformer", expected, OTHER_MODELS_HINT)

        # Data: the pairs, then their latents and caption embeddings, encoded once into the cache.
        data = cached_pairs(args, accelerator, FAMILY)

        # The transformer and its reference (LoRA: the same transformer, adapter off; --quantize_base: held in 4
        # bits), and the noise: rectified flow at the scheduler's sigmas shifted for this resolution.
        targets = lora_target_modules(args)
        transformer, reference = build_models(args, FAMILY, FluxTransformer2DModel, targets, accelerator)
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
