"""ModelFamily: everything the shared code needs to know about a model family, set in that family's trainer script;
and the trained model with its reference, built the same way for every family."""

import contextlib
import os
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import transformers
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers import AutoencoderKL, BitsAndBytesConfig
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from diffusion_dpo import InputError


logger = get_logger(__name__)


def from_model(args, load, subfolder=None, **options):
    """`load` (a from_pretrained or load_config) applied to `subfolder` of --pretrained_model_name_or_path."""
    model = args.pretrained_model_name_or_path
    return load(model, subfolder=subfolder, revision=args.revision, cache_dir=args.cache_dir, **options)


def model_vae_config(args):
    return from_model(args, AutoencoderKL.load_config, "vae")


def load_model_vae(args, dtype):
    return from_model(args, AutoencoderKL.from_pretrained, "vae", variant=args.variant, torch_dtype=dtype)


def weight_dtype_vae(args, weight_dtype):
    return weight_dtype


def scaled_latents(vae, means):
    """The VAE's mean latents as its pipeline denoises them: (mean - shift_factor) * scaling_factor."""
    return (means - (vae.config.get("shift_factor") or 0.0)) * vae.config.scaling_factor


def vae_dtype_from_config(args, weight_dtype):
    """fp32 unless the VAE's config says it is safe in half precision (force_upcast false): SD3's and Flux's VAEs."""
    return torch.float32 if model_vae_config(args).get("force_upcast", True) else weight_dtype


def prompt_conditioning(batch, device, stacked=True):
    """A denoiser's one text input (SD 1.x/2.x's UNet, FLUX.2's transformer) from the cached prompt embeddings, for
    the stacked (winners; losers) batch or the winners alone: one caption a pair."""
    prompt_embeds = batch["prompt_embeds"].to(device, torch.float32, non_blocking=True)
    return {"encoder_hidden_states": prompt_embeds.repeat(2, 1, 1) if stacked else prompt_embeds}


def transformer_text_conditioning(batch, device, stacked=True):
    """An MMDiT's text inputs (SD3, Flux) from the cached caption arrays, for the stacked (winners; losers) batch or
    the winners alone."""
    prompt_embeds = batch["prompt_embeds"].to(device, torch.float32, non_blocking=True)
    pooled_prompt_embeds = batch["pooled_prompt_embeds"].to(device, torch.float32, non_blocking=True)
    if stacked:
        prompt_embeds, pooled_prompt_embeds = prompt_embeds.repeat(2, 1, 1), pooled_prompt_embeds.repeat(2, 1)
    return {"encoder_hidden_states": prompt_embeds, "pooled_projections": pooled_prompt_embeds}


def unet_prediction(unet, noisy_latents, timesteps, conditioning):
    return unet(noisy_latents, timesteps, **conditioning, return_dict=False)[0]


def diffusers_lora_layers(model):
    """The LoRA weights in diffusers' naming, as diffusers' UNet LoRA scripts save them."""
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(model))


def no_options(args):
    return {}


class ModelFamily(NamedTuple):
    """What a trainer script tells the shared code about its model family (docs/architecture.md); the defaults
    are those of the Stable Diffusion UNet families."""

    name: str  # "Stable Diffusion 1.x/2.x": in messages and on the model card
    pipeline_class: type  # renders validation images, holds a full fine-tune, writes and reads LoRA files
    denoiser: str  # the trained component: "unet" or "transformer" (subfolder and pipeline argument)
    # captions and images, encoded once into the cache
    cache_key: Callable  # (args, weight_dtype) -> what the cached encodings depend on besides data and crops
    load_text_encoder: Callable  # (args, device, dtype) -> encode(captions) -> {array name: (n, ...) tensor}
    caption_bytes: Callable  # (args) -> bytes one caption's arrays take in the cache (float16)
    # the denoiser's inputs: (batch, device, stacked) -> keyword inputs for the (winners; losers) batch or winners
    conditioning: Callable
    # the result: (args, denoiser, **components) -> the family's pipeline; (args) -> the model card's particulars
    load_pipeline: Callable
    card_details: Callable  # {license, tags, dtype, and optionally load_options, call_options, method_note, notes}
    vae_config: Callable = model_vae_config  # (args) -> the VAE's config, read without loading it
    load_vae: Callable = load_model_vae  # (args, dtype) -> the VAE
    vae_dtype: Callable = weight_dtype_vae  # (args, weight_dtype) -> the dtype the VAE encodes in
    vae_latents: Callable = scaled_latents  # (vae, its mean latents) -> the latents cached and trained on
    predict: Callable = unet_prediction  # (model, noisy_latents, timesteps, conditioning) -> eps, v or velocity
    lora_state_dict: Callable = diffusers_lora_layers  # (model) -> the LoRA weights as the pipelines save them
    kohya_lora: Callable | None = None  # (diffusers-format LoRA, denoiser config) -> kohya format; None: refused
    fixed_inputs: Callable = no_options  # (args) -> conditioning the same for every sample (Flux's guidance scale)
    validation_kwargs: Callable = no_options  # (args) -> more options of the pipeline call for validation images
    # beta x this = the epsilon-error beta of the same strength, for full fine-tuning's learning-rate rule (rectified
    # flow: an epsilon error is (1 - sigma)^2 x the velocity error; 1 / E[(1 - sigma)^2] ~ 9)
    epsilon_beta_factor: float = 1.0
    resume_flags: tuple = ()  # the script's flags that change what is trained on: a resume must keep them


def folder_identity(path, args, subfolders):
    """What identifies the weights under `subfolders` of a model, without loading them: a local folder's file names,
    sizes and modification times, or a Hub id resolved to its commit (an updated repository is another model)."""
    if os.path.isdir(path):
        files = []
        for sub in subfolders:
            for file in sorted(Path(path, sub).glob("*")):
                stat = file.stat()
                files.append([f"{sub}/{file.name}".lstrip("/"), stat.st_size, stat.st_mtime_ns])
        return {"path": os.path.abspath(path), "files": files}
    identity = {"hub_id": path, "revision": args.revision, "variant": args.variant}
    try:
        from huggingface_hub import snapshot_download

        snapshot = snapshot_download(
            path, revision=args.revision, allow_patterns=["model_index.json"], cache_dir=args.cache_dir
        )
        identity["commit"] = Path(snapshot).name
    except Exception as error:  # offline, gated, a typo: the load itself reports what matters
        logger.warning(f"Could not resolve {path} to a commit ({type(error).__name__}); caching by id and revision.")
    return identity


def check_model_folder(args, parts, hint=""):
    """A local model folder must hold every subfolder in `parts`; a path that is no folder is named in one line."""
    model = args.pretrained_model_name_or_path
    if os.path.isdir(model):
        missing = [part for part in parts if not os.path.isdir(os.path.join(model, part))]
        if missing:
            raise InputError(
                f"model folder '{model}' lacks {missing}: expected a diffusers pipeline folder with "
                f"{', '.join(parts)}{hint}"
            )
    elif model.startswith((".", "/", "~")) or os.path.exists(model):
        raise InputError(
            f"--pretrained_model_name_or_path {model}: no such model folder (a diffusers pipeline folder or a Hub id)"
        )


def loads_reference(args):
    """Whether the run needs a reference model: DPO does; SFT only to report held-out implicit accuracy; MaPO never
    (reference-free: no frozen copy, and a LoRA's adapter is never switched off)."""
    if args.loss_type == "mapo":
        return False
    return not args.sft or args.validation_split_name is not None or args.num_validation_pairs > 0


def build_models(args, family, model_class, lora_targets, accelerator, **load_options):
    """(trained denoiser, frozen reference or None). LoRA: the base frozen in the weight dtype, LoRA weights in
    fp32, and no reference (the same model with its adapter off is one). Full fine-tuning: the trained copy and the
    reference both in fp32, the reference run under the trained copy's autocast (reference_model), so that the two
    compute identically and the first step's loss is ln 2 in every precision (in half-precision weights, norms and
    modulations that use the weights outside matmuls would compute differently; with beta in the thousands that is
    a visible bias). `load_options` go to from_pretrained; --quantize_base nf4 (the Flux scripts) loads the base in
    4 bits, computed in the weight dtype."""
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    device = accelerator.device
    if getattr(args, "quantize_base", None) == "nf4":
        nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=weight_dtype)
        load_options = {"quantization_config": nf4, "device_map": {"": str(device)}, **load_options}
    set_seed(args.seed)  # the precompute draws random numbers: the LoRA's init must not depend on a cache hit

    def load_denoiser(dtype=None):
        load = model_class.from_pretrained
        return from_model(args, load, family.denoiser, variant=args.variant, torch_dtype=dtype, **load_options)

    reference = None
    if args.train_mode == "lora":
        model = load_denoiser(weight_dtype).to(device)
        model.requires_grad_(False)  # freeze the base before adding the adapter: only LoRA weights train
        config = LoraConfig(
            r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian", target_modules=lora_targets
        )
        try:
            model.add_adapter(config)
        except ValueError as error:  # PEFT: "Target modules {...} not found in the base model"
            raise InputError(f"LoRA target modules: {str(error).splitlines()[0]}") from None
        cast_training_params(model, dtype=torch.float32)  # trainable weights stay fp32 under mixed precision
    else:
        model = load_denoiser().to(device).requires_grad_(True)
        if loads_reference(args):
            reference = load_denoiser().to(device).eval().requires_grad_(False)
            reference.autocast_dtype = weight_dtype
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    for module in filter(None, (model, reference)):
        if getattr(args, "channels_last", False):
            module.to(memory_format=torch.channels_last)
        if getattr(args, "enable_xformers_memory_efficient_attention", False):
            module.enable_xformers_memory_efficient_attention()
        if args.torch_compile:  # regional compilation, in place: parameter names, hooks and saving are unchanged
            if module._repeated_blocks:
                module.compile_repeated_blocks()
            else:
                for block in module.transformer_blocks:
                    block.compile()
    return model, reference


@contextlib.contextmanager
def lora_disabled(model):
    """The LoRA reference model: the same model with its adapter off.

    PEFT's disable also clears requires_grad on the LoRA weights and enable sets it again, so the adapter is
    re-enabled even if the forward raises; otherwise training would silently stop updating anything.
    """
    model.disable_adapters()
    try:
        yield model
    finally:
        model.enable_adapters()


@contextlib.contextmanager
def frozen_as_trained(reference):
    """Runs the frozen copy as autograd runs the trained one beside it: its weights requiring grad, nothing saved for
    a backward that never comes. PyTorch picks some kernels by whether a weight needs a gradient (a Linear on a
    non-contiguous 3D input is one folded mm without, a bmm with); where the two round differently (bf16 without
    oneDNN's bf16 kernels: AVX2-only CPUs, or ONEDNN_MAX_CPU_ISA=AVX2) an SDXL bf16 full fine-tune's step-1 loss was
    0.558, not ln 2."""
    reference.requires_grad_(True)
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda tensor: None, lambda _: None):
            yield
    finally:
        reference.requires_grad_(False)


@contextlib.contextmanager
def reference_model(model, reference, training=False):
    """The model that gives reference predictions: the frozen copy, run under the autocast the trained model runs
    in, or the LoRA model itself with its adapter off. `training`: beside a training step's forward, which records
    gradients: the frozen copy runs as the trained one does (frozen_as_trained), the LoRA model in inference mode;
    its outputs are to be detached. Otherwise the caller's grad mode holds."""
    if reference is not None:
        dtype = reference.autocast_dtype
        # cache_enabled=False as the trained model's autocast (run.setup_accelerator): the same kernels on both
        with torch.autocast(reference.device.type, dtype=dtype, enabled=dtype != torch.float32, cache_enabled=False):
            with frozen_as_trained(reference) if training else contextlib.nullcontext():
                yield reference
    else:
        base = model.module if hasattr(model, "module") else model  # bypass DDP: no gradients flow here
        with torch.inference_mode() if training else contextlib.nullcontext(), lora_disabled(base):
            yield base


def check_denoiser_config(args, denoiser_class, subfolder, expected, hint):
    """Refuses, before any data is read, a model whose denoiser's config differs from `expected` (the values this
    script relies on): it would fail only at the first training step, after the precompute."""
    try:
        config = from_model(args, denoiser_class.load_config, subfolder)
    except Exception:  # nothing to read (offline, a typo in a Hub id): loading the model reports it
        return
    differing = {name: config.get(name) for name, value in expected.items() if config.get(name) != value}
    if differing:
        found = ", ".join(f"{name} {value!r}" for name, value in differing.items())
        raise InputError(
            f"model '{args.pretrained_model_name_or_path}' has a {subfolder} of another kind ({found}): {hint}"
        )


def text_encoder_config(args, subfolder):
    return from_model(args, transformers.AutoConfig.from_pretrained, subfolder)


def load_text_encoders(args, suffixes, device, dtype):
    """[(text encoder, its tokenizer)] from the subfolders text_encoder<suffix> and tokenizer<suffix>, frozen, each of
    the class its config names."""
    loaded = []
    for suffix in suffixes:
        encoder_class = getattr(transformers, text_encoder_config(args, f"text_encoder{suffix}").architectures[0])
        load_encoder = encoder_class.from_pretrained
        encoder = from_model(args, load_encoder, f"text_encoder{suffix}", variant=args.variant, torch_dtype=dtype)
        tokenizer = from_model(args, transformers.AutoTokenizer.from_pretrained, f"tokenizer{suffix}")
        loaded.append((encoder.to(device).eval().requires_grad_(False), tokenizer))
    return loaded


def tokens(tokenizer, captions, max_length=None, device=None):
    """Token ids of `captions`, padded to the tokenizer's length (or max_length) and truncated, as pipelines encode."""
    ids = tokenizer(
        captions,
        padding="max_length",
        max_length=max_length or tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return ids.to(device)
