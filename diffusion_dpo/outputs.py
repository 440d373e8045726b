"""What a run leaves for its user: LoRA files (diffusers format, and kohya format where the family offers it),
validation images, the model card, the Hub upload."""

import inspect
import os
from pathlib import Path

import numpy as np
import torch
from diffusers.training_utils import free_memory
from diffusers.utils import convert_unet_state_dict_to_peft, make_image_grid
from diffusers.utils.hub_utils import populate_model_card
from huggingface_hub import ModelCard, ModelCardData, upload_folder
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from diffusion_dpo import InputError
from diffusion_dpo.family import lora_disabled
from diffusion_dpo.run import OUTPUT_DIR_LOCK_NAME


LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"  # --output_kohya_format: for ComfyUI, A1111, Forge


def save_lora(model, family, directory, kohya=False):
    """The LoRA as the family's pipeline saves it (LORA_WEIGHT_NAME, for load_lora_weights), and with `kohya` also
    in kohya's format beside it."""
    family.pipeline_class.save_lora_weights(
        directory,
        weight_name=LORA_WEIGHT_NAME,
        **{
            f"{family.denoiser}_lora_layers": family.lora_state_dict(model),
            f"{family.denoiser}_lora_adapter_metadata": model.peft_config["default"].to_dict(),
        },
    )
    if kohya:
        save_kohya_lora(directory, family, model.config)


def save_kohya_lora(directory, family, denoiser_config):
    """Writes KOHYA_WEIGHT_NAME beside the diffusers-format LoRA in `directory` (an output folder or a checkpoint);
    examples/convert_lora_to_kohya.py calls it for a run made without --output_kohya_format. Written under a
    temporary name, then renamed: a conversion or write that fails leaves the file that was there."""
    kohya = family.kohya_lora(load_file(os.path.join(directory, LORA_WEIGHT_NAME)), denoiser_config)
    path = os.path.join(directory, KOHYA_WEIGHT_NAME)
    partial = f"{path}.partial-{os.getpid()}"
    try:
        save_file(kohya, partial, metadata={"format": "pt"})
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def load_lora_into(model, family, directory):
    """Loads the LoRA file of `directory` into `model`'s adapter; a LoRA of another rank or model is one line."""
    state_dict = family.pipeline_class.lora_state_dict(directory, weight_name=LORA_WEIGHT_NAME)
    state_dict = state_dict[0] if isinstance(state_dict, tuple) else state_dict  # (weights, alphas) for UNets
    prefix = f"{family.denoiser}."
    state_dict = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
    try:
        result = set_peft_model_state_dict(model, convert_unet_state_dict_to_peft(state_dict), adapter_name="default")
    except RuntimeError as error:  # shapes differ: another --rank or another model
        raise InputError(
            f"checkpoint {directory} does not match this model's LoRA layers ({str(error).splitlines()[-1].strip()})"
        ) from None
    if getattr(result, "unexpected_keys", None):
        raise InputError(f"checkpoint {directory} does not match this model's LoRA layers")


@torch.no_grad()
def decode_outside_autocast(pipeline, latents, size):
    """PIL images (size x size) from a pipeline's latents, decoded with autocast off: under fp16 autocast a
    force_upcast VAE (SDXL's) would overflow into black images."""
    vae, config = pipeline.vae, pipeline.vae.config
    if latents.ndim == 3:  # Flux's: packed 2 x 2 into tokens
        latents = pipeline._unpack_latents(latents, size, size, pipeline.vae_scale_factor)
    latents = latents.to(vae.dtype)
    if config.get("latents_mean") is not None and config.get("latents_std") is not None:
        mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents)
        std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents)
        latents = latents * std / config.scaling_factor + mean
    elif "scaling_factor" in config:  # FLUX.2's VAE has none: its pipeline hands back latents as the VAE made them
        latents = latents / config.scaling_factor + (config.get("shift_factor") or 0.0)
    with torch.autocast(latents.device.type, enabled=False):
        image = vae.decode(latents, return_dict=False)[0]
    if getattr(pipeline, "watermark", None) is not None:
        image = pipeline.watermark.apply_watermark(image)
    return pipeline.image_processor.postprocess(image, output_type="pil")


def render_validation(args, accelerator, family, model, reference, weight_dtype, global_step):
    """Renders --validation_prompts with fixed seeds into output_dir/validation (first also reference.png)."""
    trained = accelerator.unwrap_model(model)
    # A VAE that is not fp16-safe (diffusers' signal: force_upcast in its config) decodes in fp32, outside autocast.
    fp16_safe_vae = not family.vae_config(args).get("force_upcast", True)
    vae = family.load_vae(args, family.vae_dtype(args, weight_dtype) if fp16_safe_vae else torch.float32)
    options = {"vae": vae, "torch_dtype": weight_dtype}
    if "safety_checker" in inspect.signature(family.pipeline_class.__init__).parameters:
        options.update(safety_checker=None, requires_safety_checker=False)  # of no use for validation images
    pipeline = family.load_pipeline(args, trained, **options).to(accelerator.device)
    pipeline.set_progress_bar_config(disable=True)

    def render(pipeline):
        images = []
        for number, prompt in enumerate(args.validation_prompts):
            generator = torch.Generator(accelerator.device).manual_seed(args.seed + number)
            with accelerator.autocast():
                output = pipeline(
                    prompt=prompt,  # by name: Flux2KleinPipeline's first argument is a conditioning image
                    num_inference_steps=args.num_validation_inference_steps,
                    guidance_scale=args.validation_guidance_scale,
                    generator=generator,
                    height=args.resolution,
                    width=args.resolution,
                    output_type="pil" if fp16_safe_vae else "latent",
                    **family.validation_kwargs(args),
                ).images
            if not fp16_safe_vae:
                output = decode_outside_autocast(pipeline, output, args.resolution)
            images.append(output[0])
        return images

    out_dir = Path(args.output_dir, "validation")
    out_dir.mkdir(parents=True, exist_ok=True)
    reference_grid = out_dir / "reference.png"
    # the untuned model, same seeds, once (not for SFT, nor MaPO: it switches no adapter off)
    if not reference_grid.exists() and not args.sft and args.loss_type != "mapo":
        if reference is None:
            with lora_disabled(trained):
                reference_images = render(pipeline)
        else:
            setattr(pipeline, family.denoiser, reference)
            reference_images = render(pipeline)
            setattr(pipeline, family.denoiser, trained)
        make_image_grid(reference_images, rows=1, cols=len(reference_images)).save(reference_grid)
    images = render(pipeline)
    make_image_grid(images, rows=1, cols=len(images)).save(out_dir / f"step-{global_step:06d}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(
                "validation", np.stack([np.asarray(im) for im in images]), global_step, dataformats="NHWC"
            )
        elif tracker.name == "wandb":
            import wandb

            tracker.log(
                {"validation": [wandb.Image(im, caption=p) for im, p in zip(images, args.validation_prompts)]},
                step=global_step,
            )
    del pipeline
    free_memory()
    return images


def training_objective(args):
    """The objective in words, for the model card's title."""
    if args.sft:
        return "SFT on preferred images"
    if args.loss_type == "mapo":
        return f"MaPO (β_mapo = {args.beta_mapo:g})"
    smoothing = f", label smoothing ε = {args.label_smoothing:g}" if args.label_smoothing else ""
    smoothing = ", soft preference labels" if args.soft_labels else smoothing
    return f"Diffusion-DPO ({args.loss_type} loss, β = {args.beta_dpo:g}{smoothing})"


def lora_files_section(args, family, location):
    """The model card's list of the LoRA files and where each one loads."""
    if args.output_kohya_format:
        kohya = f"""- `{KOHYA_WEIGHT_NAME}`: the same LoRA in kohya format, for ComfyUI (`ComfyUI/models/loras`, a
  `LoraLoader` node), Automatic1111 and Forge (`models/Lora`, `<lora:{Path(KOHYA_WEIGHT_NAME).stem}:1>` in the
  prompt)."""
    elif family.kohya_lora is not None:
        kohya = (
            "- For ComfyUI, Automatic1111 or Forge, write the kohya-format file with the training repository's "
            "`python examples/convert_lora_to_kohya.py <this folder>`."
        )
    else:
        kohya = f"- ComfyUI loads `{LORA_WEIGHT_NAME}` as it is (copy it into `ComfyUI/models/loras`)."
    return f"""
## Files

- `{LORA_WEIGHT_NAME}`: diffusers format, for `pipeline.load_lora_weights` as above.
{kohya}
"""


def base_model(args):
    """The base model as the card names it: a Hub id as given, a local folder as an absolute path (a relative one
    would not load from anywhere else)."""
    model = args.pretrained_model_name_or_path
    return os.path.abspath(model) if os.path.isdir(model) else model


def save_model_card(args, family, location, global_step):
    """Writes README.md (metadata + how to load) into output_dir; `location` is the Hub repo or the local folder."""
    lora = args.train_mode == "lora"
    details = family.card_details(args)
    pipeline, dtype, load_options = family.pipeline_class.__name__, details["dtype"], details.get("load_options", "")
    if lora:
        load = (
            f'pipeline = {pipeline}.from_pretrained("{base_model(args)}"{load_options}, torch_dtype=torch.{dtype})'
            f'.to("cuda")\npipeline.load_lora_weights("{location}")'
        )
    else:
        load = f'pipeline = {pipeline}.from_pretrained("{location}", torch_dtype=torch.{dtype}).to("cuda")'
    method = (
        "[MaPO](https://arxiv.org/abs/2406.06424) (Hong et al.)"
        if args.loss_type == "mapo"
        else "[Diffusion-DPO](https://arxiv.org/abs/2311.12908) (Wallace et al.)"
    )
    description = f"""
# {"LoRA" if lora else "Full"} {training_objective(args)} fine-tune of {base_model(args)}

Trained with {method}{details.get("method_note", "")} on `{args.dataset_name}` (split
`{args.dataset_split_name}`) for {global_step} steps at {args.resolution}px:
{args.train_batch_size} pairs per device x {args.gradient_accumulation_steps} accumulation steps,
learning rate {args.learning_rate:g} ({args.lr_scheduler}){f", LoRA rank {args.rank}" if lora else ""}.
{details.get("notes", "")}
## How to use

```python
import torch
from diffusers import {pipeline}

{load}
image = pipeline("a cozy cabin in a snowy forest at dusk"{details.get("call_options", "")}).images[0]
```
"""
    if lora:
        description += lora_files_section(args, family, location)
    data = ModelCardData(
        license=details["license"],
        library_name="diffusers",
        base_model=base_model(args),
        inference=True,
        datasets=None if os.path.exists(args.dataset_name) else [args.dataset_name],
    )
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{description}")
    tags = [*details["tags"], "text-to-image", "diffusers", "diffusers-training", "diffusion-dpo"]
    populate_model_card(card, tags=tags + (["lora"] if lora else [])).save(os.path.join(args.output_dir, "README.md"))


def push_to_hub(args, repo_id):
    """Uploads the result; checkpoints, partial writes and the run's lock file stay local."""
    return upload_folder(
        repo_id=repo_id,
        folder_path=args.output_dir,
        commit_message="End of Diffusion-DPO training",
        ignore_patterns=["checkpoint-*", ".checkpoint-*", "checkpoint-*/**", ".checkpoint-*/**", OUTPUT_DIR_LOCK_NAME],
        token=args.hub_token,
    )
