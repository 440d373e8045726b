#!/usr/bin/env python
# Copyright 2026 The Diffusion-DPO toolkit authors. Licensed under the Apache License, Version 2.0.
"""Diffusion-DPO fine-tuning of Stable Diffusion 1.x/2.x models (Wallace et al., arXiv 2311.12908).

Top to bottom as the data flows: flags -> how captions and images are encoded (once, into a cache) -> the noise
-> the UNet (LoRA, or full fine-tuning against a frozen copy) -> the training loop -> saving. What every model family
shares (data, cache, loss, checkpoints, outputs) is in diffusion_dpo/, one module per concern.

    accelerate launch train_diffusion_dpo.py --beta_dpo 2000
"""

from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import (
    convert_all_state_dict_to_peft,
    convert_state_dict_to_kohya,
)

from diffusion_dpo.args import add_unet_options, check_args, shared_parser
from diffusion_dpo.family import (
    ModelFamily,
    build_models,
    check_denoiser_config,
    check_model_folder,
    folder_identity,
    load_text_encoders,
    prompt_conditioning,
    text_encoder_config,
)
from diffusion_dpo.losses import compute_loss
from diffusion_dpo.noise import DDPMNoise
from diffusion_dpo.run import one_line_errors
from diffusion_dpo.training import TrainingRun, cached_pairs, training_session


MODEL_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")  # subfolders of a pipeline folder it reads
LORA_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]
OTHER_MODELS_HINT = "this script trains SD 1.x/2.x-class models; train SDXL models with train_diffusion_dpo_sdxl.py"


# ----------------------------------------------------------------------------------------------------------------
# 1. Flags: the shared ones (diffusion_dpo/args.py), SD 1.x/2.x's defaults, and its own
# ----------------------------------------------------------------------------------------------------------------


def parse_args(input_args=None):
    parser, groups = shared_parser(
        "Diffusion-DPO fine-tuning of Stable Diffusion 1.x/2.x models.",
        model="stable-diffusion-v1-5/stable-diffusion-v1-5",
        resolution=512,
        beta_dpo=2000.0,  # the paper's SD 1.5 value
        output_dir="diffusion-dpo",
    )
    groups["model"].add_argument(
        "--prediction_type",
        default=None,
        choices=["epsilon", "v_prediction"],
        help="Override the scheduler's prediction type (default: the model's own, e.g. v_prediction for SD 2.x-768).",
    )
    add_unet_options(groups)
    return parser.parse_and_check(input_args, check_flags)


def check_flags(args):
    check_model_folder(args, MODEL_PARTS)
    check_args(args, FAMILY)


# ----------------------------------------------------------------------------------------------------------------
# 2. Captions and images, as the Stable Diffusion pipeline encodes them (into the cache, once)
# ----------------------------------------------------------------------------------------------------------------


def load_text_encoder(args, device, dtype):
    """encode(captions) -> {"prompt_embeds": the CLIP text encoder's last hidden state}, as the pipeline's."""
    ((text_encoder, tokenizer),) = load_text_encoders(args, [""], device, dtype)
    with_mask = getattr(text_encoder.config, "use_attention_mask", False)

    def encode(captions):
        inputs = tokenizer(captions, padding="max_length", truncation=True, return_tensors="pt").to(device)
        mask = inputs.attention_mask if with_mask else None
        return {"prompt_embeds": text_encoder(inputs.input_ids, attention_mask=mask)[0]}

    return encode


def caption_bytes(args):
    config = text_encoder_config(args, "text_encoder")
    return 2 * config.max_position_embeddings * config.hidden_size


def cache_key(args, weight_dtype):
    """What the cached encodings depend on besides the data and image settings: the VAE and text encoder's files."""
    return {"model": folder_identity(args.pretrained_model_name_or_path, args, ("vae", "text_encoder", "tokenizer"))}


# ----------------------------------------------------------------------------------------------------------------
# 3. Noise and the UNet: DDPM timesteps, epsilon- or v-prediction, conditioned on the caption
# ----------------------------------------------------------------------------------------------------------------


def load_noise(args):
    """DDPM noise at uniform timesteps; the target epsilon or v, as the scheduler (or --prediction_type) says. Also
    what examples/evaluate_dpo.py evaluates with."""
    scheduler = DDPMScheduler.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="scheduler", revision=args.revision, cache_dir=args.cache_dir
    )
    if args.prediction_type is not None:
        scheduler.register_to_config(prediction_type=args.prediction_type)
    return DDPMNoise(scheduler)


# ----------------------------------------------------------------------------------------------------------------
# 4. Saving: the pipeline it loads in, the LoRA's formats, the model card
# ----------------------------------------------------------------------------------------------------------------


def load_pipeline(args, unet, **components):
    return StableDiffusionPipeline.from_pretrained(
        args.pretrained_model_name_or_path,
        unet=unet,
        revision=args.revision,
        variant=args.variant,
        cache_dir=args.cache_dir,
        **components,
    )


def kohya_lora(diffusers_lora, unet_config):
    """The LoRA in kohya's format (`lora_unet_<module>` keys with lora_down, lora_up and alpha = rank), which
    ComfyUI, Automatic1111 and Forge load: diffusers' conversion, as its DreamBooth LoRA scripts do. For SD 1.x
    kohya's sd-scripts keep diffusers' block names, so nothing is renamed."""
    return convert_state_dict_to_kohya(convert_all_state_dict_to_peft(diffusers_lora))


def card_details(args):
    return {
        "license": "creativeml-openrail-m",
        "tags": ["stable-diffusion", "stable-diffusion-diffusers"],
        "dtype": "float16",
    }


FAMILY = ModelFamily(
    name="Stable Diffusion 1.x/2.x",
    pipeline_class=StableDiffusionPipeline,
    denoiser="unet",
    cache_key=cache_key,
    load_text_encoder=load_text_encoder,
    caption_bytes=caption_bytes,
    conditioning=prompt_conditioning,
    load_pipeline=load_pipeline,
    card_details=card_details,
    kohya_lora=kohya_lora,
    resume_flags=("prediction_type",),
)


# ----------------------------------------------------------------------------------------------------------------
# 5. The run: pairs -> cache -> UNet and reference -> training loop -> saved LoRA or pipeline
# ----------------------------------------------------------------------------------------------------------------


def main(args):
    """Trains and saves; returns {'global_step', 'history': [per-step metrics], 'evaluations': [held-out metrics]}."""
    with training_session(args, FAMILY) as session:
        accelerator = session.accelerator
        # the UNet config this script conditions: text embeddings alone (an SDXL UNet also takes pooled text, sizes)
        conditioned_on = {"addition_embed_type": None, "class_embed_type": None}
        check_denoiser_config(args, UNet2DConditionModel, "unet", conditioned_on, OTHER_MODELS_HINT)

        # Data: the pairs, then their latents and caption embeddings, encoded once into the cache.
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
