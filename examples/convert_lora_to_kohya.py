#!/usr/bin/env python
"""Writes the kohya-format LoRA (for ComfyUI, Automatic1111 and Forge) of a run made without --output_kohya_format:
pytorch_lora_weights_kohya.safetensors beside pytorch_lora_weights.safetensors, in an output folder or a checkpoint
of either trainer, exactly as the flag would have.

    python examples/convert_lora_to_kohya.py diffusion-dpo
    python examples/convert_lora_to_kohya.py diffusion-dpo-sdxl/checkpoint-500 \\
        --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0

The base model decides the key layout (SDXL: kohya's SGM block names, see docs/outputs.md); by default it is the
`base_model` of the run's model card (README.md in the folder or the one above it: a finished run writes one).

An SD3 LoRA (train_diffusion_dpo_sd3.py, keys `transformer.<module>.lora_A/B.weight`) is refused: diffusers' kohya
conversion gives SD3 keys that neither ComfyUI nor diffusers load, and ComfyUI loads the file as it is
(docs/sd3.md).
"""

import argparse
import os
import sys
from pathlib import Path

import repo_paths  # noqa: F401  (puts the trainer scripts on sys.path)
from diffusers import UNet2DConditionModel
from huggingface_hub import ModelCard
from safetensors import safe_open

import train_diffusion_dpo
import train_diffusion_dpo_sdxl


def base_model_of(folder):
    """The base model named by the model card in `folder` or its parent (a checkpoint's run folder), or None."""
    for candidate in (Path(folder), Path(folder).parent):
        card = candidate / "README.md"
        if card.exists():
            base_model = ModelCard.load(card).data.base_model
            if base_model:
                return base_model
    return None


def trainer_for(unet_config):
    """The trainer whose kohya layout fits the UNet: SDXL's has added text and time embeddings."""
    is_sdxl = unet_config.get("addition_embed_type") == "text_time"
    return train_diffusion_dpo_sdxl if is_sdxl else train_diffusion_dpo


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="An output folder or checkpoint holding pytorch_lora_weights.safetensors.")
    parser.add_argument(
        "--pretrained_model_name_or_path",
        default=None,
        help="The base model the LoRA was trained on (default: the model card's base_model).",
    )
    args = parser.parse_args(argv)
    lora_file = os.path.join(args.folder, train_diffusion_dpo.LORA_WEIGHT_NAME)
    if not os.path.exists(lora_file):
        sys.exit(f"error: {lora_file} does not exist (a full fine-tune has no LoRA to convert)")
    with safe_open(lora_file, framework="pt") as weights:
        is_sd3 = any(name.startswith("transformer.") for name in weights.keys())
    if is_sd3:
        sys.exit(
            f"error: {lora_file} is an SD3 transformer LoRA: ComfyUI loads it as it is (LoraLoader), and diffusers' "
            "kohya conversion gives SD3 keys nothing loads (docs/sd3.md)"
        )
    base_model = args.pretrained_model_name_or_path or base_model_of(args.folder)
    if base_model is None:
        sys.exit(
            f"error: no model card names the base model of {args.folder}; pass --pretrained_model_name_or_path "
            "(the model the run trained)"
        )
    unet_config = UNet2DConditionModel.load_config(base_model, subfolder="unet")
    trainer = trainer_for(unet_config)
    trainer.save_kohya_lora(args.folder, unet_config)
    layout = "SDXL" if trainer is train_diffusion_dpo_sdxl else "SD 1.x/2.x"
    print(f"wrote {os.path.join(args.folder, trainer.KOHYA_WEIGHT_NAME)} ({layout} layout)")


if __name__ == "__main__":
    main()
