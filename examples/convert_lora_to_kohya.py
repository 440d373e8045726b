#!/usr/bin/env python
"""Writes the kohya-format LoRA (for ComfyUI, Automatic1111 and Forge) of a run made without --output_kohya_format:
pytorch_lora_weights_kohya.safetensors beside pytorch_lora_weights.safetensors, in an output folder or a checkpoint
of a trainer script, exactly as the flag would have.

    python examples/convert_lora_to_kohya.py diffusion-dpo
    python examples/convert_lora_to_kohya.py diffusion-dpo-sdxl/checkpoint-500 \\
        --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0

The base model's family decides the key layout (SDXL: kohya's SGM block names, see docs/outputs.md); by default the
base model is the `base_model` of the run's model card (README.md in the folder or the one above it: a finished run
writes one). Every LoRA layer must be a layer of the base model's denoiser with the same sizes (read from its config,
no weights loaded): a LoRA of another model is refused, and the file is replaced only once the new one is written.

An SD3 LoRA (train_diffusion_dpo_sd3.py) is refused, as --output_kohya_format is: diffusers' kohya conversion gives
SD3 keys that neither ComfyUI nor diffusers load, and ComfyUI loads the file as it is (docs/sd3.md).
"""

import argparse
import os
import re
import sys
from pathlib import Path

import repo_paths  # noqa: F401  (puts the trainer scripts on sys.path)
from accelerate import init_empty_weights
from evaluate_dpo import denoiser_class, trainer_for
from huggingface_hub import ModelCard
from safetensors import SafetensorError
from safetensors.torch import load_file

from diffusion_dpo import InputError
from diffusion_dpo.outputs import KOHYA_WEIGHT_NAME, LORA_WEIGHT_NAME, save_kohya_lora
from diffusion_dpo.run import first_line


def base_model_of(folder):
    """The base model named by the model card in `folder` or its parent (a checkpoint's run folder) and that card,
    or (None, None)."""
    for candidate in (Path(folder), Path(folder).parent):
        card = candidate / "README.md"
        if card.exists():
            base_model = ModelCard.load(card).data.base_model
            if base_model:
                return base_model, card
    return None, None


def read_lora(lora_file):
    try:
        return load_file(lora_file)
    except (SafetensorError, OSError) as error:
        raise InputError(f"{lora_file} is damaged or truncated: {first_line(error)}") from None


def check_lora_fits(lora, lora_file, family, config, base_model):
    """Every LoRA layer must be a layer of the base model's denoiser with the same in and out sizes; a LoRA of
    another model would be converted without complaint into a file no UI applies correctly."""
    with init_empty_weights():  # the layers and their shapes only: nothing is read or allocated
        layers = dict(denoiser_class(family).from_config(config).named_modules())
    layer_key = re.compile(re.escape(f"{family.denoiser}.") + r"(.+)\.lora(\.down|_A|\.up|_B)\.weight")
    for key, weights in lora.items():
        match = layer_key.fullmatch(key)
        base_weight = getattr(layers.get(match[1]), "weight", None) if match else None
        size = 1 if match and match[2] in (".down", "_A") else 0  # lora_A: (rank, in, ...), lora_B: (out, rank, ...)
        if base_weight is None or weights.shape[size] != base_weight.shape[size]:
            found = "has no such layer" if base_weight is None else f"has {tuple(base_weight.shape)} weights there"
            raise InputError(
                f"{lora_file} is not a LoRA of {base_model} ({family.name}): its {key} is {tuple(weights.shape)} and "
                f"the model {found}; pass the model the run trained as --pretrained_model_name_or_path"
            )


def convert(folder, base_model=None):
    """Writes KOHYA_WEIGHT_NAME into `folder` in the layout of the base model's family; returns the family."""
    lora_file = os.path.join(folder, LORA_WEIGHT_NAME)
    if not os.path.exists(lora_file):
        raise InputError(f"{lora_file} does not exist (a full fine-tune has no LoRA to convert)")
    card = None
    if base_model is None:
        base_model, card = base_model_of(folder)
    if base_model is None:
        raise InputError(
            f"no model card names the base model of {folder}; pass --pretrained_model_name_or_path (the model "
            "the run trained)"
        )
    try:
        family = trainer_for(base_model).FAMILY
        config = denoiser_class(family).load_config(base_model, subfolder=family.denoiser)
    except (InputError, OSError) as error:
        if card is None:
            raise InputError(first_line(error)) from None
        raise InputError(
            f"{card} names the base model {base_model}, which cannot be read from {os.getcwd()} (a relative path "
            "is read from the current folder); pass --pretrained_model_name_or_path"
        ) from None
    if family.kohya_lora is None:
        raise InputError(
            f"{lora_file} is a {family.name} LoRA, which has no kohya format (diffusers' conversion gives keys that "
            f"ComfyUI and diffusers do not load); ComfyUI loads {LORA_WEIGHT_NAME} as it is (docs/outputs.md)"
        )
    check_lora_fits(read_lora(lora_file), lora_file, family, config, base_model)
    save_kohya_lora(folder, family, config)
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
