#!/usr/bin/env python
# Copyright 2026 The Diffusion-DPO toolkit authors. Licensed under the Apache License, Version 2.0.
"""Diffusion-DPO fine-tuning of Stable Diffusion XL and SDXL-Turbo (Wallace et al., arXiv 2311.12908).

Top to bottom as the data flows: flags -> how captions and images are encoded (once, into a cache) -> the noise
-> the UNet (LoRA, or full fine-tuning against a frozen copy) -> the training loop -> saving. What every model family
shares (data, cache, loss, checkpoints, outputs) is in diffusion_dpo/, one module per concern.

    accelerate launch train_diffusion_dpo_sdxl.py --beta_dpo 5000

SDXL's own: two text encoders (penultimate hidden states side by side, the pooled embedding from the second), the
unconditional input all zeros, micro-conditioning on each image's original size and crop, a VAE that overflows in
fp16 (it encodes in fp32 unless --pretrained_vae_model_name_or_path gives a safe one), and SDXL-Turbo's timesteps.
"""

import os
import re

import torch
from accelerate.logging import get_logger
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.utils import (
    convert_all_state_dict_to_peft,
    convert_state_dict_to_kohya,
)

from diffusion_dpo import InputError
from diffusion_dpo.args import add_unet_options, check_args, shared_parser
from diffusion_dpo.family import (
    ModelFamily,
    build_models,
    check_denoiser_config,
    check_model_folder,
    folder_identity,
    load_text_encoders,
    text_encoder_config,
    tokens,
)
from diffusion_dpo.losses import compute_loss
from diffusion_dpo.noise import DDPMNoise
from diffusion_dpo.run import one_line_errors
from diffusion_dpo.training import TrainingRun, cached_pairs, training_session


logger = get_logger(__name__)

MODEL_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
LORA_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]
OTHER_MODELS_HINT = "this script trains SDXL-class models; train SD 1.x/2.x models with train_diffusion_dpo.py"
TURBO_TIMESTEPS = (249, 499, 749, 999)  # SDXL-Turbo's 4-step grid, which it was distilled to sample on


# ----------------------------------------------------------------------------------------------------------------
# 1. Flags: the shared ones (diffusion_dpo/args.py), SDXL's defaults, and its own
# ----------------------------------------------------------------------------------------------------------------


def parse_args(input_args=None):
    parser, groups = shared_parser(
        "Diffusion-DPO fine-tuning of Stable Diffusion XL models.",
        model="stabilityai/stable-diffusion-xl-base-1.0",
        resolution=1024,
        beta_dpo=5000.0,  # the paper's SDXL value
        output_dir="diffusion-dpo-sdxl",
        validation_steps=None,  # 25, or 4 with --is_turbo
        guidance_scale=None,  # 5, or 0 with --is_turbo
    )
    groups["model"].add_argument(
        "--pretrained_vae_model_name_or_path",
        default=None,
        help="A VAE that is safe in half precision (e.g. madebyollin/sdxl-vae-fp16-fix) to encode in the weight "
        "dtype; without it the SDXL VAE encodes in fp32 (it overflows in fp16).",
    )
    groups["model"].add_argument(
        "--is_turbo",
        action="store_true",
        help="SDXL-Turbo: train on its 4-step timestep grid (249, 499, 749, 999) with zero terminal SNR, as it was "
        "distilled; validation defaults to 4 steps and guidance 0.",
    )
    add_unet_options(groups)
    return parser.parse_and_check(input_args, check_flags)


def check_flags(args):
    if args.num_validation_inference_steps is None:
        args.num_validation_inference_steps = 4 if args.is_turbo else 25
    if args.validation_guidance_scale is None:
        args.validation_guidance_scale = 0.0 if args.is_turbo else 5.0
    vae, model = args.pretrained_vae_model_name_or_path, args.pretrained_model_name_or_path
    # a folder with one text encoder is an SD 1.x/2.x pipeline: say which script trains it
    single_encoder = os.path.isdir(model) and not os.path.isdir(os.path.join(model, "text_encoder_2"))
    hint = f"; {OTHER_MODELS_HINT}" if single_encoder else ""
    check_model_folder(args, [part for part in MODEL_PARTS if part != "vae" or vae is None], hint)
    if vae is not None and not os.path.isdir(vae) and (vae.startswith((".", "/", "~")) or os.path.exists(vae)):
        raise InputError(f"--pretrained_vae_model_name_or_path {vae}: no such VAE folder (an AutoencoderKL folder)")
    check_args(args, FAMILY)


# ----------------------------------------------------------------------------------------------------------------
# 2. Captions and images, as the SDXL pipeline encodes them (into the cache, once)
# ----------------------------------------------------------------------------------------------------------------


def load_text_encoder(args, device, dtype):
    """encode(captions) -> {"prompt_embeds": both CLIP encoders' penultimate hidden states side by side,
    "pooled_prompt_embeds": the second one's projected pooled output}, as the pipeline's encode_prompt."""
    encoders = load_text_encoders(args, ["", "_2"], device, dtype)

    def encode(captions):
        outputs = [
            encoder(tokens(tokenizer, captions, device=device), output_hidden_states=True)
            for encoder, tokenizer in encoders
        ]
        prompt_embeds = torch.cat([output.hidden_states[-2] for output in outputs], dim=-1)
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": outputs[-1].text_embeds}

    return encode


def caption_bytes(args):
    first, second = text_encoder_config(args, "text_encoder"), text_encoder_config(args, "text_encoder_2")
    return 2 * (first.max_position_embeddings * (first.hidden_size + second.hidden_size) + second.projection_dim)


def zeros_for_empty_prompt(args):
    """The pipeline's `force_zeros_for_empty_prompt` (model_index.json; unset: the pipeline's default, True): whether
    its unconditional input for classifier-free guidance is all zeros, rather than the encoding of ""."""
    try:
        config = StableDiffusionXLPipeline.load_config(
            args.pretrained_model_name_or_path, revision=args.revision, cache_dir=args.cache_dir
        )
    except OSError as error:
        logger.warning(f"Could not read model_index.json ({error}); taking the pipeline's default, zeros.")
        config = {}
    return bool(config.get("force_zeros_for_empty_prompt", True))


def vae_source(args):
    """(where the VAE is, its subfolder): the model's own, or --pretrained_vae_model_name_or_path."""
    if args.pretrained_vae_model_name_or_path is not None:
        return args.pretrained_vae_model_name_or_path, None
    return args.pretrained_model_name_or_path, "vae"


def vae_config(args):
    path, subfolder = vae_source(args)
    return AutoencoderKL.load_config(path, subfolder=subfolder, revision=args.revision, cache_dir=args.cache_dir)


def load_vae(args, dtype):
    path, subfolder = vae_source(args)
    variant = args.variant if subfolder else None
    return AutoencoderKL.from_pretrained(
        path, subfolder=subfolder, revision=args.revision, variant=variant, cache_dir=args.cache_dir, torch_dtype=dtype
    )


def vae_dtype(args, weight_dtype):
    """The SDXL VAE overflows in fp16, so it encodes in fp32 unless a half-precision-safe VAE is given."""
    return weight_dtype if args.pretrained_vae_model_name_or_path is not None else torch.float32


def cache_key(args, weight_dtype):
    """What the cached encodings depend on besides the data and image settings: the encoders' files, and what
    the unconditional row holds."""
    encoders = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    key = {
        "model": folder_identity(args.pretrained_model_name_or_path, args, encoders),
        "unconditional": "zeros" if zeros_for_empty_prompt(args) else "empty caption",
    }
    if args.pretrained_vae_model_name_or_path is not None:
        key["vae"] = folder_identity(args.pretrained_vae_model_name_or_path, args, ("",))
    return key


# ----------------------------------------------------------------------------------------------------------------
# 3. Noise and the UNet: DDPM timesteps (SDXL-Turbo: its grid, zero terminal SNR), micro-conditioning
# ----------------------------------------------------------------------------------------------------------------


def load_noise(args):
    """DDPM noise at uniform timesteps (epsilon target). SDXL-Turbo was distilled with zero terminal SNR (ADD, Sauer
    et al. 2023) on a 4-step grid: at t = 999 it sees pure noise, as at inference; its scheduler config's schedule
    would leave 7 % of the signal there. Also what examples/evaluate_dpo.py evaluates with."""
    scheduler = DDPMScheduler.from_pretrained(
        args.pretrained_model_name_or_path,
        subfolder="scheduler",
        revision=args.revision,
        cache_dir=args.cache_dir,
        **({"rescale_betas_zero_snr": True} if args.is_turbo else {}),
    )
    return DDPMNoise(scheduler, timestep_grid=TURBO_TIMESTEPS if args.is_turbo else None)


def conditioning(batch, device, stacked=True):
    """The UNet's inputs besides latents and timesteps, for the stacked (winners; losers) batch or the winners
    alone: the caption's embeddings, and each image's own size and crop (its time ids)."""
    prompt_embeds = batch["prompt_embeds"].to(device, torch.float32, non_blocking=True)
    pooled_prompt_embeds = batch["pooled_prompt_embeds"].to(device, torch.float32, non_blocking=True)
    time_ids = batch["crops"].to(device, torch.float32, non_blocking=True)  # (pairs, winner/loser, 6)
    if stacked:
        prompt_embeds, pooled_prompt_embeds = prompt_embeds.repeat(2, 1, 1), pooled_prompt_embeds.repeat(2, 1)
        time_ids = torch.cat([time_ids[:, 0], time_ids[:, 1]])
    else:
        time_ids = time_ids[:, 0]
    added = {"text_embeds": pooled_prompt_embeds, "time_ids": time_ids}
    return {"encoder_hidden_states": prompt_embeds, "added_cond_kwargs": added}


# ----------------------------------------------------------------------------------------------------------------
# 4. Saving: the pipeline it loads in, the LoRA's formats, the model card
# ----------------------------------------------------------------------------------------------------------------


def load_pipeline(args, unet, **components):
    """StableDiffusionXLPipeline around `unet`, with the VAE this run used."""
    if args.pretrained_vae_model_name_or_path is not None and "vae" not in components:
        components["vae"] = load_vae(args, torch.float32)
    return StableDiffusionXLPipeline.from_pretrained(
        args.pretrained_model_name_or_path,
        unet=unet,
        revision=args.revision,
        variant=args.variant,
        cache_dir=args.cache_dir,
        **components,
    )


def sgm_block_name(kohya_key, layers_per_block):
    """`lora_unet_down_blocks_1_attentions_0_...` -> `lora_unet_input_blocks_4_1_...` (2 layers per block): the
    original SGM UNet's names, which kohya's sd-scripts write for SDXL. SGM numbers the layers of its input and output
    blocks consecutively, layers_per_block + 1 per block (input: the downsampler, after input_blocks_0 = conv_in;
    output: one more layer), each layer's resnet is sub-module 0 and its attention 1; the middle block is resnet,
    attention, resnet. The inverse of diffusers' _maybe_map_sgm_blocks_to_diffusers, which loads these names."""
    down_or_up = re.match(r"lora_unet_(down|up)_blocks_(\d+)_(resnets|attentions)_(\d+)_(.*)", kohya_key)
    if down_or_up:
        side, block, kind, layer, rest = down_or_up.groups()
        index = int(block) * (layers_per_block + 1) + int(layer) + (side == "down")
        return f"lora_unet_{'input' if side == 'down' else 'output'}_blocks_{index}_{int(kind == 'attentions')}_{rest}"
    middle = re.match(r"lora_unet_mid_block_(resnets|attentions)_(\d+)_(.*)", kohya_key)
    if middle:
        kind, layer, rest = middle.groups()
        return f"lora_unet_middle_block_{1 if kind == 'attentions' else 2 * int(layer)}_{rest}"
    raise ValueError(f"no SGM name for the LoRA layer {kohya_key}")  # LORA_TARGET_MODULES are all in blocks


def kohya_lora(diffusers_lora, unet_config):
    """The LoRA in kohya's format (`lora_unet_<module>` keys with lora_down, lora_up and alpha = rank), which
    ComfyUI, Automatic1111 and Forge load: diffusers' conversion, as its DreamBooth LoRA scripts do, with diffusers'
    block names renamed to the SGM names kohya's SDXL LoRAs use."""
    layers_per_block = unet_config["layers_per_block"]
    if not isinstance(layers_per_block, int):
        raise ValueError(f"kohya format needs one layers_per_block for every UNet block, got {layers_per_block}")
    kohya = convert_state_dict_to_kohya(convert_all_state_dict_to_peft(diffusers_lora))
    return {sgm_block_name(key, layers_per_block): value for key, value in kohya.items()}


def card_details(args):
    return {
        "license": "openrail++",
        "tags": ["stable-diffusion-xl", "stable-diffusion-xl-diffusers"],
        "dtype": "float16",
        "call_options": ", num_inference_steps=4, guidance_scale=0.0" if args.is_turbo else "",
    }


FAMILY = ModelFamily(
    name="Stable Diffusion XL",
    pipeline_class=StableDiffusionXLPipeline,
    denoiser="unet",
    cache_key=cache_key,
    load_text_encoder=load_text_encoder,
    caption_bytes=caption_bytes,
    vae_config=vae_config,
    load_vae=load_vae,
    vae_dtype=vae_dtype,
    conditioning=conditioning,
    load_pipeline=load_pipeline,
    card_details=card_details,
    kohya_lora=kohya_lora,
    resume_flags=("is_turbo", "pretrained_vae_model_name_or_path"),
)


# ----------------------------------------------------------------------------------------------------------------
# 5. The run: pairs -> cache -> UNet and reference -> training loop -> saved LoRA or pipeline
# ----------------------------------------------------------------------------------------------------------------


def main(args):
    """Trains and saves; returns {'global_step', 'history': [per-step metrics], 'evaluations': [held-out metrics]}."""
    with training_session(args, FAMILY) as session:
        accelerator = session.accelerator
        # the UNet config this script conditions: text, pooled text and image sizes (SDXL's micro-conditioning)
        conditioned_on = {"addition_embed_type": "text_time", "class_embed_type": None}
        check_denoiser_config(args, UNet2DConditionModel, "unet", conditioned_on, OTHER_MODELS_HINT)

        # Data: the pairs, then their latents, sizes, crops and caption embeddings, encoded once into the cache.
        data = cached_pairs(args, accelerator, FAMILY)

        # The UNet and its reference (LoRA: the same UNet, adapter off), and the noise it learns to remove.
        unet, reference = build_models(args, FAMILY, UNet2DConditionModel, LORA_TARGET_MODULES, accelerator)
        noise = load_noise(args)

        # Every step: the DPO loss on the UNet's and the reference's errors on winner and loser, corrupted alike.
        run = TrainingRun(args, session, FAMILY, unet, reference, noise, data)
        for batch, generator in run.batches():
            with accelerator.accumulate(run.model):
                loss, metrics = compute_loss(batch, run.model, reference, noise, FAMILY, args, generator)
                run.backward_and_step(loss, metrics)
            run.end_step()  # logs; checkpoints, held-out metrics and validation images when due; stop on a signal
        return run.finish()  # held-out metrics, validation images, the LoRA or pipeline, the model card, the Hub


if __name__ == "__main__":
    with one_line_errors():
        main(parse_args())
