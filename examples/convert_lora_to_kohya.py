#!/usr/bin/env python
"""Writes the kohya-format LoRA (for ComfyUI, Automatic1111 and Forge) of a run made without --output_kohya_format:
pytorch_lora_weights_kohya.safetensors beside pytorch_lora_weights.safetensors, in an output folder or a checkpoint
of a trainer script, exactly as the flag would have.

    python examples/convert_lora_to_kohya.py diffusion-dpo
    python examples/convert_lora_to_kohya.py diffusion-dpo-sdxl/checkpoint-500 \\
        --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0

The base model's family decides the key layout (SDXL: kohya's SGM block names, see docs/outputs.md); by default the
base model is the `base_model` of the run's model card (README.md in the folder or the one above it: a finished run
writes one).

An SD3 LoRA (train_diffusion_dpo_sd3.py) is refused, as --output_kohya_format is: diffusers' kohya conversion gives
SD3 keys that neither ComfyUI nor diffusers load, and ComfyUI loads the file as it is (docs/sd3.md).
"""

import argparse
import os
import sys
from pathlib import Path

import repo_paths  # noqa: F401  (puts the trainer scripts on sys.path)
from evaluate_dpo import denoiser_class, trainer_for
from huggingface_hub import ModelCard

from diffusion_dpo import InputError
from diffusion_dpo.outputs import KOHYA_WEIGHT_NAME, LORA_WEIGHT_NAME, save_kohya_lora


def base_model_of(folder):
    """The base model named by the model card in `folder` or its parent (a checkpoint's run folder), or None."""
    for candidate in (Path(folder), Path(folder).parent):
        card = candidate / "README.md"
        if card.exists():
            base_model = ModelCard.load(card).data.base_model
            if base_model:
                return base_model
    return None


def convert(folder, base_model=None):
    """Writes KOHYA_WEIGHT_NAME into `folder` in the layout of the base model's family; returns the family."""
    lora_file = os.path.join(folder, LORA_WEIGHT_NAME)
    if not os.path.exists(lora_file):
        raise InputError(f"{lora_file} does not exist (a full fine-tune has no LoRA to convert)")
    base_model = base_model or base_model_of(folder)
    if base_model is None:
        raise InputError(
            f"no model card names the base model of {folder}; pass --pretrained_model_name_or_path (the model "
            "the run trained)"
        )
    family = trainer_for(base_model).FAMILY
    if family.kohya_lora is None:
        raise InputError(
            f"{lora_file} is a {family.name} LoRA, which has no kohya format (diffusers' conversion gives keys that "
            f"ComfyUI and diffusers do not load); ComfyUI loads {LORA_WEIGHT_NAME} as it is (docs/sd3.md)"
        )
    save_kohya_lora(folder, family, denoiser_class(family).load_config(base_model, subfolder=family.denoiser))
    return family


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="An output folder or checkpoint holding pytorch_lora_weights.safetensors.")
    parser.add_argument(
        "--pretrained_model_name_or_path",
        default=None,
        help="The base model the LoRA was trained on (default: the model card's base_model).",
    )
    args = parser.parse_args(argv)
    try:
        family = convert(args.folder, args.pretrained_model_name_or_path)
    except InputError as error:
        sys.exit(f"error: {error}")
    print(f"wrote {os.path.join(args.folder, KOHYA_WEIGHT_NAME)} ({family.name} layout)")


if __name__ == "__main__":
    main()
