#!/usr/bin/env python
# Copyright 2026 The Diffusion-DPO toolkit authors. Licensed under the Apache License, Version 2.0.
"""Diffusion-DPO fine-tuning of Stable Diffusion 3 / 3.5 models (Wallace et al., arXiv 2311.12908), in its
rectified-flow form (Flow-DPO, Liu et al., arXiv 2501.13918).

The file reads top to bottom in the order the data flows through it:
arguments -> preference pairs -> precomputed latents and text embeddings (cached on disk) -> MMDiT transformer (LoRA
or full) -> training loop with the DPO loss -> saved weights, model card, optional push to the Hub.

    accelerate launch train_diffusion_dpo_sd3.py \
        --pretrained_model_name_or_path stabilityai/stable-diffusion-3.5-medium --beta_dpo 5000

SD3 specifics: three text encoders (CLIP-L and CLIP-G penultimate states side by side, zero-padded to T5-XXL's width
and joined with T5's states along the sequence; the pooled input is both CLIP projections), T5 optional (--no_t5:
zeros in its place, as the pipeline does without it); a 16-channel VAE whose latents are (mean - shift_factor) *
scaling_factor; rectified flow: noisy = (1 - sigma) x0 + sigma eps, the transformer predicts the velocity eps - x0,
sigma drawn by --weighting_scheme as in diffusers' SD3 DreamBooth script. The DPO loss is unchanged: its errors are
the velocity errors.
"""

import argparse
import contextlib
import errno
import hashlib
import importlib.util
import io
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import datasets
import diffusers
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import (
    DistributedType,
    ProjectConfiguration,
    broadcast_object_list,
    gather_object,
    set_seed,
)
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.optimization import SchedulerType, get_scheduler
from diffusers.training_utils import (
    cast_training_params,
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
    free_memory,
)
from diffusers.utils import convert_unet_state_dict_to_peft, make_image_grid
from diffusers.utils.hub_utils import populate_model_card
from filelock import FileLock, Timeout
from huggingface_hub import ModelCard, ModelCardData, create_repo, upload_folder
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from PIL import Image, ImageOps
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm


logger = get_logger(__name__)

DEFAULT_DATASET = "yuvalkirstain/pickapic_v2"
DATASET_ALTERNATIVES = (
    "the original yuvalkirstain/pickapic_v2 has been reported unavailable since 2025; community mirrors with the "
    "same columns exist (e.g. liuhuohuo2/pick-a-pic-v2; kashif/pickascore is a small subset), or pass a local "
    "folder or .parquet file in Pick-a-Pic format (yuvalkirstain/pickapic_v2_no_images holds metadata only and "
    "cannot be trained on)"
)
DEFAULT_VALIDATION_PROMPTS = [
    "a portrait photo of an old fisherman, detailed face, soft light",
    "a cozy cabin in a snowy forest at dusk, warm light in the windows",
    "an astronaut riding a horse on the moon, digital art",
    "a bowl of ramen on a wooden table, studio photograph",
]
# subfolders of a pipeline folder the trainer reads (T5's only without --no_t5)
MODEL_PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
T5_PARTS = ("text_encoder_3", "tokenizer_3")
# the joint attention's projections of the image stream (to_*) and of the text stream (add_* and to_add_out)
LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
CACHE_FORMAT_VERSION = 1
TRANSFORMER_CLASS = "SD3Transformer2DModel"
OTHER_MODELS_HINT = (
    "this script trains Stable Diffusion 3 / 3.5 models; train SD 1.x/2.x models with train_diffusion_dpo.py and "
    "SDXL models with train_diffusion_dpo_sdxl.py"
)
# the .npy files of a cache folder
CACHE_ARRAYS = (
    "caption_index",
    "prompt_embeds",
    "pooled_prompt_embeds",
    "pair_latents",
    "encoded",
    "undecodable",
)
# Precompute streams the source shard by shard, spread over processes and loader workers: a split with fewer files
# than this is split into its parquet row groups instead (a split of many files is not: that costs a read per file).
MIN_SOURCE_SHARDS = 64
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
MAPO_SNR_VALUE = 0.5  # the constant `snr_value` of MaPO's log-odds in its reference code (mapo-t2i/mapo)
# Written into every checkpoint before it is renamed complete: what decides its data position, and each file's size.
CHECKPOINT_RECORD_NAME = "checkpoint_record.json"
CHECKPOINT_RECORD_FORMAT = 1
# What a failed write of weights raises; a full disk reads as any of them, depending on who wrote.
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)
# held by a run for its lifetime, so that a second run on the same --output_dir stops instead of overwriting it
OUTPUT_DIR_LOCK_NAME = ".diffusion-dpo-run.lock"


class InputError(ValueError):
    """Bad input from the user: reported as one line, never as a traceback."""


class TrainingStopped(RuntimeError):
    """Training cannot usefully go on (e.g. only non-finite steps): reported as one line."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM ended the run at once (before training, or a second signal during it): reported as one line.
    A KeyboardInterrupt, so that what handles Ctrl-C (precompute committing its progress) handles SIGTERM alike."""


class OneLineErrorParser(argparse.ArgumentParser):
    """Reports a bad flag in one line (`--help` still shows the full usage)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")

    def parse_and_validate(self, input_args, validate):
        """Parses, then runs `validate` (which raises InputError), so every bad input reads the same way."""
        args = self.parse_args(input_args)
        try:
            validate(args)
        except InputError as error:
            self.error(str(error))
        return args


# ----------------------------------------------------------------------------------------------------------------
# 1. Arguments
# ----------------------------------------------------------------------------------------------------------------


def parse_args(input_args=None):
    parser = OneLineErrorParser(description="Diffusion-DPO (Flow-DPO) fine-tuning of Stable Diffusion 3 / 3.5 models.")

    model = parser.add_argument_group("model")
    model.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default="stabilityai/stable-diffusion-3.5-medium",
        help="Hub id or local folder of a diffusers Stable Diffusion 3 / 3.5 pipeline.",
    )
    model.add_argument("--revision", type=str, default=None, help="Revision (branch, tag or commit) of the model.")
    model.add_argument("--variant", type=str, default=None, help="Weight variant to load, e.g. 'fp16'.")
    model.add_argument(
        "--no_t5",
        action="store_true",
        help="Leave the T5-XXL text encoder out (4.7B parameters, about 9.5 GB in half precision): its part of the "
        "prompt embedding is zeros, as StableDiffusion3Pipeline(text_encoder_3=None) makes it; validation images "
        "and a saved full pipeline go without T5 too.",
    )
    model.add_argument(
        "--max_sequence_length",
        type=int,
        default=256,
        help="T5 tokens per caption (the pipeline's default, 256; at most 512). Each caption's cached embedding is "
        "(77 + this) x 4096 values.",
    )

    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset_name",
        type=str,
        default=DEFAULT_DATASET,
        help="Hub id, local folder, .parquet file or image folder (with metadata.jsonl or metadata.csv) of "
        "preference pairs in one of the layouts of --data_layout (docs/data.md).",
    )
    data.add_argument("--dataset_config_name", type=str, default=None, help="Config name of the dataset, if any.")
    data.add_argument("--dataset_split_name", type=str, default="train", help="Split to train on.")
    data.add_argument(
        "--cache_dir", type=str, default=None, help="Where Hub models are downloaded (datasets are streamed)."
    )
    data.add_argument(
        "--data_layout",
        type=str,
        default="auto",
        choices=["auto", *DATA_LAYOUTS],
        help="How rows hold a pair: pickapic (jpg_0, jpg_1, label_0, caption), chosen_rejected (chosen, rejected, "
        "prompt; the chosen image wins), votes (image1, image2, votes_image1, votes_image2, prompt; more votes wins). "
        "auto: the one layout whose columns the dataset has.",
    )
    data.add_argument(
        "--image_0_column",
        type=str,
        default=None,
        help="Column with the first image (bytes, an Image, or a path in an image folder); default: the layout's "
        "(jpg_0, chosen, image1).",
    )
    data.add_argument(
        "--image_1_column",
        type=str,
        default=None,
        help="Column with the second image; default: the layout's (jpg_1, rejected, image2).",
    )
    data.add_argument(
        "--label_column",
        type=str,
        default=None,
        help="pickapic layout: column with the preference, 1 = first image preferred, 0 = second preferred, 0.5 = "
        "tie (dropped); default label_0.",
    )
    data.add_argument(
        "--caption_column", type=str, default=None, help="Column with the prompt; default: caption, prompt or txt."
    )
    data.add_argument(
        "--vote_0_column", type=str, default=None, help="votes layout: the first image's votes; default votes_image1."
    )
    data.add_argument(
        "--vote_1_column", type=str, default=None, help="votes layout: the second image's votes; default votes_image2."
    )
    data.add_argument(
        "--min_vote_margin",
        type=float,
        default=1,
        help="votes layout: the image with at least this many more votes wins; closer pairs are ties (dropped). The "
        "default, 1, takes any strict majority of whole votes.",
    )
    data.add_argument(
        "--max_train_samples",
        type=int,
        default=None,
        help="Train on a random subset of this many pairs (after dropping ties); for quick runs.",
    )
    data.add_argument(
        "--resolution", type=int, default=1024, help="Training resolution (square, divisible by 16: VAE x patch)."
    )
    data.add_argument(
        "--random_crop",
        action="store_true",
        help="Crop at a random position instead of the centre. The crop is drawn once per image, when latents are "
        "precomputed (seeded by --seed), not at every epoch.",
    )
    data.add_argument(
        "--no_hflip",
        action="store_true",
        help="Do not flip images horizontally. By default both orientations are encoded once and each epoch picks "
        "one at random; --no_hflip halves precompute time and cache size.",
    )
    data.add_argument(
        "--proportion_empty_prompts",
        type=float,
        default=0.0,
        help="Fraction of pairs trained with the pipeline's unconditional input (classifier-free-guidance prompt "
        "dropout): the empty caption's embedding, which StableDiffusion3Pipeline uses as its negative prompt.",
    )

    cache = parser.add_argument_group("precomputed latents and text embeddings")
    cache.add_argument(
        "--precompute_cache_dir",
        type=str,
        default=None,
        help="Where the precomputed latents / text embeddings are cached (default: <datasets cache>/diffusion_dpo). "
        "A later run with the same model, data and image settings reuses them without loading the VAE or text "
        "encoders.",
    )
    cache.add_argument(
        "--vae_encode_batch_size", type=int, default=8, help="Images per VAE forward while precomputing latents."
    )
    cache.add_argument(
        "--precompute_commit_seconds",
        type=float,
        default=60,
        help="While precomputing, save progress this often: an interrupted precompute resumes from the last save.",
    )

    held_out = parser.add_argument_group("held-out preference validation")
    held_out.add_argument(
        "--validation_split_name",
        type=str,
        default=None,
        help="A split of --dataset_name with held-out pairs (e.g. Pick-a-Pic 'validation'), evaluated every "
        "--validation_steps, before training and at the end.",
    )
    held_out.add_argument(
        "--num_validation_pairs",
        type=int,
        default=0,
        help="Without --validation_split_name: hold this many pairs out of the training split. With it: use at most "
        "this many of its pairs (0 = all).",
    )
    held_out.add_argument(
        "--validation_timesteps",
        type=int,
        default=10,
        help="Fixed noise levels (each with its own fixed noise) per held-out pair; errors are averaged over them, as "
        "in the paper's implicit-reward accuracy.",
    )

    dpo = parser.add_argument_group("DPO")
    dpo.add_argument(
        "--beta_dpo",
        type=float,
        default=5000.0,
        help="KL-regularisation strength beta, in Diffusion-DPO's convention: inside = -beta/2 * ((err_theta(w) - "
        "err_theta(l)) - (err_ref(w) - err_ref(l))), errors the per-sample mean squared velocity error. Flow-DPO "
        "(arXiv 2501.13918) keeps this form with a constant beta; the default is the Diffusion-DPO paper's SDXL "
        "value, carried over (no published SD3 image value; see docs/sd3.md): sweep 1000-10000.",
    )
    dpo.add_argument(
        "--loss_type",
        type=str,
        default="sigmoid",
        choices=["sigmoid", "hinge", "ipo", "mapo"],
        help="sigmoid: the paper's DPO loss; hinge: SLiC-style relu(1 - inside); ipo: (inside/beta - 1/(2 beta))^2; "
        "mapo: reference-free MaPO (Hong et al. 2024): no reference forward, no frozen copy (see --beta_mapo).",
    )
    dpo.add_argument(
        "--label_smoothing",
        type=float,
        default=0.0,
        help="Conservative DPO (--loss_type sigmoid): the probability epsilon that a pair's label is flipped; the "
        "loss becomes -(1 - eps) logsigmoid(inside) - eps logsigmoid(-inside). 0 (default) is the paper's loss; "
        "must lie in [0, 0.5).",
    )
    dpo.add_argument(
        "--beta_mapo",
        type=float,
        default=0.1,
        help="--loss_type mapo: weight of MaPO's margin term next to the SFT term on the preferred images "
        "(loss = mse_w + beta_mapo * margin loss; 0.1 is the MaPO code's default).",
    )
    dpo.add_argument(
        "--sft",
        action="store_true",
        help="Supervised fine-tuning on the preferred images only (the paper's SFT baseline); no reference model.",
    )
    dpo.add_argument(
        "--train_mode",
        type=str,
        default="lora",
        choices=["lora", "full"],
        help="lora: train a LoRA adapter (reference = the same transformer with the adapter off); full: train every "
        "transformer weight against a frozen copy.",
    )
    dpo.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = rank).")
    dpo.add_argument(
        "--lora_target_modules",
        type=str,
        default=",".join(LORA_TARGET_MODULES),
        help="Comma-separated transformer modules that get LoRA layers (default: the joint attention's image and text "
        "projections).",
    )

    flow = parser.add_argument_group(
        "noise levels (as in diffusers' examples/dreambooth/train_dreambooth_lora_sd3.py)"
    )
    flow.add_argument(
        "--weighting_scheme",
        type=str,
        default="logit_normal",
        choices=["logit_normal", "mode", "sigma_sqrt", "cosmap", "none"],
        help="How sigma is drawn (logit_normal, mode; others uniformly) and how errors are weighted (sigma_sqrt, "
        "cosmap; others not): diffusers' compute_density_for_timestep_sampling and compute_loss_weighting_for_sd3.",
    )
    flow.add_argument("--logit_mean", type=float, default=0.0, help="Mean of the logit_normal scheme.")
    flow.add_argument("--logit_std", type=float, default=1.0, help="Standard deviation of the logit_normal scheme.")
    flow.add_argument("--mode_scale", type=float, default=1.29, help="Scale of the mode scheme.")

    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", type=str, default="diffusion-dpo-sd3", help="Where weights and checkpoints go.")
    train.add_argument("--seed", type=int, default=0, help="Seed for initialisation, data order, noise and crops.")
    train.add_argument(
        "--output_kohya_format",
        action="store_true",
        help="Not for SD3 (refused): diffusers' kohya conversion gives SD3 keys that neither ComfyUI nor diffusers "
        "load; ComfyUI loads this script's diffusers-format LoRA file as it is (docs/sd3.md).",
    )
    train.add_argument("--train_batch_size", type=int, default=4, help="Preference pairs per device per step.")
    train.add_argument("--num_train_epochs", type=int, default=1)
    train.add_argument(
        "--max_train_steps", type=int, default=None, help="Total optimizer steps; overrides --num_train_epochs."
    )
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for transformer memory.")

    optim = parser.add_argument_group("optimizer")
    optim.add_argument(
        "--learning_rate",
        type=float,
        default=None,
        help="Learning rate. Default: 1e-5 for LoRA; for full fine-tuning the paper's rule "
        "1e-8 * (2000 / beta_dpo) * pairs per optimizer step (2.048e-5 at 2048 pairs and beta 2000).",
    )
    optim.add_argument(
        "--scale_lr",
        action="store_true",
        help="Multiply the learning rate by pairs per optimizer step (batch x accumulation x processes).",
    )
    optim.add_argument(
        "--lr_scheduler",
        type=str,
        default="constant_with_warmup",
        choices=[s.value for s in SchedulerType if s.value != "piecewise_constant"],
        help="Learning-rate schedule.",
    )
    optim.add_argument("--lr_warmup_steps", type=int, default=0)
    optim.add_argument("--lr_num_cycles", type=int, default=1, help="Hard restarts of cosine_with_restarts.")
    optim.add_argument("--lr_power", type=float, default=1.0, help="Power of the polynomial schedule.")
    optim.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes 8-bit AdamW (less memory).")
    optim.add_argument("--use_adafactor", action="store_true", help="Adafactor (the DPO paper's for SDXL).")
    optim.add_argument("--adam_beta1", type=float, default=0.9)
    optim.add_argument("--adam_beta2", type=float, default=0.999)
    optim.add_argument("--adam_weight_decay", type=float, default=1e-2)
    optim.add_argument("--adam_epsilon", type=float, default=1e-8)
    optim.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm (0 disables).")
    optim.add_argument(
        "--max_consecutive_skipped_steps",
        type=int,
        default=20,
        help="A step with a non-finite loss or gradient is skipped (weights untouched); stop after this many in "
        "a row.",
    )

    perf = parser.add_argument_group("performance")
    perf.add_argument("--dataloader_num_workers", type=int, default=0, help="Worker processes for data loading.")
    perf.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Overrides accelerate's config. Trainable weights and the loss stay in fp32.",
    )
    perf.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere and newer GPUs.")
    perf.add_argument(
        "--torch_compile",
        action="store_true",
        help="torch.compile each of the transformer's blocks (regional compilation: most of the speed-up of "
        "compiling the whole model, a fraction of the compile time).",
    )

    ckpt = parser.add_argument_group("checkpointing")
    ckpt.add_argument(
        "--checkpointing_steps", type=int, default=500, help="Save a resumable checkpoint every N steps."
    )
    ckpt.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    ckpt.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help="'latest' or a checkpoint folder (path, or name inside --output_dir) to continue from.",
    )

    log = parser.add_argument_group("logging and validation")
    log.add_argument("--report_to", type=str, default="tensorboard", help="tensorboard, wandb, comet_ml, all or none.")
    log.add_argument("--logging_dir", type=str, default="logs", help="Tracker folder, relative to --output_dir.")
    log.add_argument("--tracker_name", type=str, default="diffusion-dpo", help="Project name for the trackers.")
    log.add_argument("--run_validation", action="store_true", help="Render --validation_prompts during training.")
    log.add_argument("--validation_steps", type=int, default=200, help="Render validation images every N steps.")
    log.add_argument("--validation_prompts", type=str, nargs="+", default=DEFAULT_VALIDATION_PROMPTS)
    log.add_argument("--num_validation_inference_steps", type=int, default=28, help="Sampling steps.")
    log.add_argument("--validation_guidance_scale", type=float, default=5.0, help="Classifier-free guidance.")

    hub = parser.add_argument_group("hub")
    hub.add_argument("--push_to_hub", action="store_true", help="Upload the result (not the checkpoints).")
    hub.add_argument("--hub_model_id", type=str, default=None, help="Repository id (default: output_dir's name).")
    hub.add_argument("--hub_token", type=str, default=None, help="Token for the Hub (prefer `hf auth login`).")

    return parser.parse_and_validate(input_args, validate_args)


def validate_args(args):
    """Rejects bad flag combinations before anything heavy is loaded."""
    model = args.pretrained_model_name_or_path
    if os.path.isdir(model):
        if os.path.isdir(os.path.join(model, "unet")):
            raise InputError(f"model folder '{model}' holds a UNet, not an SD3 transformer: {OTHER_MODELS_HINT}")
        parts = list(MODEL_PARTS) + ([] if args.no_t5 else list(T5_PARTS))
        missing = [part for part in parts if not os.path.isdir(os.path.join(model, part))]
        if missing:
            without_t5 = "; pass --no_t5 to train without T5" if set(missing) <= set(T5_PARTS) else ""
            raise InputError(
                f"model folder '{model}' lacks {missing}: expected a diffusers pipeline folder with "
                f"{', '.join(parts)}{without_t5}"
            )
    elif model.startswith((".", "/", "~")) or os.path.exists(model):
        raise InputError(
            f"--pretrained_model_name_or_path {model}: no such model folder (a diffusers pipeline folder or a Hub id)"
        )
    if args.resolution < 16 or args.resolution % 16 != 0:
        raise InputError(f"--resolution must be a positive multiple of 16, got {args.resolution}")
    if not 1 <= args.max_sequence_length <= 512:
        raise InputError(f"--max_sequence_length must lie in [1, 512], got {args.max_sequence_length}")
    if not [name for name in args.lora_target_modules.split(",") if name.strip()]:
        raise InputError("--lora_target_modules names no module")
    for name in ("logit_mean", "logit_std", "mode_scale"):
        if not math.isfinite(getattr(args, name)):
            raise InputError(f"--{name} must be a finite number, got {getattr(args, name)}")
    if not args.logit_std > 0:
        raise InputError(f"--logit_std must be positive, got {args.logit_std}")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        raise InputError(f"--max_train_steps must be at least 1, got {args.max_train_steps}")
    if not 0.0 <= args.proportion_empty_prompts <= 1.0:
        raise InputError("--proportion_empty_prompts must lie in [0, 1]")
    if not (math.isfinite(args.min_vote_margin) and args.min_vote_margin > 0):
        raise InputError(f"--min_vote_margin must be a positive number, got {args.min_vote_margin}")
    for name in (
        "train_batch_size",
        "num_train_epochs",
        "gradient_accumulation_steps",
        "rank",
        "checkpointing_steps",
        "validation_steps",
        "vae_encode_batch_size",
        "num_validation_inference_steps",
        "lr_num_cycles",
        "validation_timesteps",
        "max_consecutive_skipped_steps",
    ):
        if getattr(args, name) < 1:
            raise InputError(f"--{name} must be at least 1")
    for name in ("dataloader_num_workers", "lr_warmup_steps", "num_validation_pairs"):
        if getattr(args, name) < 0:
            raise InputError(f"--{name} must not be negative")
    if args.max_train_samples is not None and args.max_train_samples < 1:
        raise InputError("--max_train_samples must be at least 1")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise InputError("--checkpoints_total_limit must be at least 1")
    if args.beta_dpo <= 0:
        raise InputError("--beta_dpo must be positive")
    # NaN compares false to everything: each check below is written so that NaN fails it
    if not math.isfinite(args.beta_dpo):
        raise InputError(f"--beta_dpo must be a finite number, got {args.beta_dpo}")
    if not 0.0 <= args.label_smoothing < 0.5:
        raise InputError(f"--label_smoothing must lie in [0, 0.5), got {args.label_smoothing}")
    if args.label_smoothing > 0 and (args.loss_type != "sigmoid" or args.sft):
        raise InputError("--label_smoothing is conservative DPO: it needs --loss_type sigmoid and no --sft")
    if not (math.isfinite(args.beta_mapo) and args.beta_mapo > 0):
        raise InputError(f"--beta_mapo must be a positive finite number, got {args.beta_mapo}")
    if args.sft and args.loss_type == "mapo":
        raise InputError("choose one of --sft and --loss_type mapo (MaPO already includes the SFT term)")
    if args.output_kohya_format:
        raise InputError(
            "--output_kohya_format: not for SD3 (diffusers' conversion gives keys ComfyUI and diffusers do not load); "
            f"ComfyUI loads {LORA_WEIGHT_NAME} as it is (docs/sd3.md)"
        )
    if args.learning_rate is not None and not (math.isfinite(args.learning_rate) and args.learning_rate > 0):
        raise InputError(f"--learning_rate must be a positive finite number, got {args.learning_rate}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(args, name) < 1:
            raise InputError(f"--{name} must lie in [0, 1), got {getattr(args, name)}")
    if not args.max_grad_norm >= 0:
        raise InputError(f"--max_grad_norm must not be negative (0 disables clipping), got {args.max_grad_norm}")
    if "wandb" in args.report_to.split(",") and args.hub_token is not None:
        raise InputError(
            "--report_to wandb with --hub_token would log your token to wandb; log in with `hf auth login` instead"
        )
    for tracker, package in (("wandb", "wandb"), ("tensorboard", "tensorboard"), ("comet_ml", "comet_ml")):
        if tracker in args.report_to.split(",") and importlib.util.find_spec(package) is None:
            raise InputError(f"--report_to {tracker} needs `pip install {package}`")
    if args.use_8bit_adam and args.use_adafactor:
        raise InputError("choose one of --use_8bit_adam and --use_adafactor")
    if args.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise InputError("--use_8bit_adam needs `pip install bitsandbytes`")


def check_output_dir(args):
    """Refuses to train over an earlier run's results unless resuming it (reads the disk, so main calls it)."""
    if args.resume_from_checkpoint not in (None, "latest"):
        checkpoint = resolve_checkpoint(args)
        if checkpoint is None:
            raise InputError(f"--resume_from_checkpoint {args.resume_from_checkpoint}: no such checkpoint folder")
        if not CHECKPOINT_PATTERN.match(Path(checkpoint).name):
            raise InputError(f"--resume_from_checkpoint {checkpoint}: expected a folder named checkpoint-<step>")
    if (
        args.resume_from_checkpoint == "latest"
        and resolve_checkpoint(args) is None
        and holds_earlier_run(args.output_dir)
    ):
        raise InputError(
            f"--output_dir {args.output_dir} holds a finished model but no checkpoint to resume from; "
            "choose a new --output_dir"
        )
    if args.resume_from_checkpoint is None and holds_earlier_run(args.output_dir):
        raise InputError(
            f"--output_dir {args.output_dir} already holds a trained model or checkpoints; pass "
            "--resume_from_checkpoint latest to continue that run, or choose a new --output_dir"
        )


def transformer_config(args):
    """The transformer's config, or None when it cannot be read here (offline, a typo in a Hub id: loading the
    transformer reports it)."""
    try:
        return SD3Transformer2DModel.load_config(
            args.pretrained_model_name_or_path,
            subfolder="transformer",
            revision=args.revision,
            cache_dir=args.cache_dir,
        )
    except Exception:
        return None


def check_transformer(args):
    """Refuses, before any data is read, a model whose transformer is not an SD3 MMDiT (a Flux or PixArt folder has
    the same layout): it would fail only at the first training step, after the precompute."""
    config = transformer_config(args)
    if config is not None and config.get("_class_name", TRANSFORMER_CLASS) != TRANSFORMER_CLASS:
        raise InputError(
            f"model '{args.pretrained_model_name_or_path}' has a {config['_class_name']}, not an "
            f"{TRANSFORMER_CLASS}: {OTHER_MODELS_HINT}"
        )


def has_validation_pairs(args):
    return args.validation_split_name is not None or args.num_validation_pairs > 0


def complete_checkpoints(output_dir):
    """Checkpoint folders that were written to the end, oldest first (partial writes carry another name)."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir) if (m := CHECKPOINT_PATTERN.match(name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found)]


def resolve_checkpoint(args):
    """The checkpoint folder to resume from, or None when there is none."""
    if args.resume_from_checkpoint == "latest":
        checkpoints = complete_checkpoints(args.output_dir)
        return checkpoints[-1] if checkpoints else None
    for candidate in (args.resume_from_checkpoint, os.path.join(args.output_dir, args.resume_from_checkpoint)):
        if os.path.isdir(candidate):
            return candidate
    return None


def holds_earlier_run(output_dir):
    saved = [LORA_WEIGHT_NAME, "model_index.json", "transformer"]
    return bool(complete_checkpoints(output_dir)) or any(os.path.exists(os.path.join(output_dir, s)) for s in saved)


# ----------------------------------------------------------------------------------------------------------------
# 2. Preference pairs
# ----------------------------------------------------------------------------------------------------------------


# The row layouts the trainer reads: each role's column names, the first one a dataset has wins (--image_0_column,
# --label_column... name others). Every layout reduces a row to a label (1: the first image won, 0: the second, 0.5:
# a tie, NaN: invalid) and a caption, so the rest of the trainer never sees the layout.
DATA_LAYOUTS = {
    "pickapic": {
        "image_0": ("jpg_0",),
        "image_1": ("jpg_1",),
        "label": ("label_0",),
        "caption": ("caption", "prompt", "txt"),
    },
    "chosen_rejected": {"image_0": ("chosen",), "image_1": ("rejected",), "caption": ("prompt", "caption", "txt")},
    "votes": {
        "image_0": ("image1",),
        "image_1": ("image2",),
        "vote_0": ("votes_image1",),
        "vote_1": ("votes_image2",),
        "caption": ("prompt", "caption", "txt"),
    },
}
ROLE_FLAGS = {
    "image_0": "image_0_column",
    "image_1": "image_1_column",
    "label": "label_column",
    "vote_0": "vote_0_column",
    "vote_1": "vote_1_column",
    "caption": "caption_column",
}
# an image folder: a local folder whose metadata file's rows name image files relative to it
IMAGE_FOLDER_METADATA = ("metadata.jsonl", "metadata.csv")
INVALID_ROWS = {  # what a NaN label means, per layout
    "pickapic": "pairs with labels outside {0, 0.5, 1}",
    "chosen_rejected": "invalid pairs",
    "votes": "pairs with missing, NaN or negative votes",
}


class DataLayout(NamedTuple):
    """How the rows of a dataset hold a pair: the layout's name, the column each role reads as (column, field), field
    None for a column itself or a field of a struct column (a webdataset sample's .json file), and for an image folder
    the folder its image paths are relative to."""

    name: str
    columns: dict
    image_folder: str | None = None
    min_vote_margin: float = 1

    @property
    def image_columns(self):
        return [self.columns["image_0"][0], self.columns["image_1"][0]]

    @property
    def source_columns(self):
        """The columns the labels and captions pass streams: all but the images."""
        return sorted({column for role, (column, _) in self.columns.items() if not role.startswith("image")})

    def cache_fields(self, roles):
        """The layout as a cache key holds it. For Pick-a-Pic's top-level columns, the names of `roles`' columns, as
        before other layouts were read (so those caches stay valid); otherwise the layout and all its columns."""
        if self.name == "pickapic" and all(field is None for _, field in self.columns.values()):
            return [self.columns[role][0] for role in roles]
        fields = {"layout": self.name, "columns": {role: list(column) for role, column in self.columns.items()}}
        if self.name == "votes":
            fields["min_vote_margin"] = self.min_vote_margin
        return fields

    def images(self, row):
        """The first and second image of a row (a dict of its image columns) as decode_image reads them: an image
        folder's paths become {"path": file} (ValueError for a path that is missing or leaves the folder)."""
        values = [row[column] for column in self.image_columns]
        return values if self.image_folder is None else [image_in_folder(self.image_folder, v) for v in values]


def image_in_folder(folder, path):
    """An image folder's image as a datasets Image dict. Paths are relative to the folder: an absolute path or one
    with `..` is refused (its pair is skipped), so that a metadata file never reads outside its folder."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"no image path ({path!r})")
    if os.path.isabs(path) or ".." in Path(path.replace("\\", "/")).parts:
        raise ValueError(f"image path '{path}' leaves the dataset folder")
    return {"path": os.path.join(folder, path), "bytes": None}


def image_folder_metadata(name):
    """The metadata file of an image folder dataset, or None when `name` is not one."""
    if not os.path.isdir(name):
        return None
    found = [file for file in IMAGE_FOLDER_METADATA if os.path.isfile(os.path.join(name, file))]
    if len(found) > 1:
        raise InputError(f"image folder '{name}' holds both {' and '.join(found)}; keep one")
    return os.path.join(name, found[0]) if found else None


def image_folder_fingerprint(folder):
    """[files, hash of their names, sizes and modification times] of an image folder: its images are not in the
    data files that identify other datasets, and a replaced image must not reuse a cached latent."""
    digest, n_files = hashlib.sha256(), 0
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for file in sorted(files):
            with contextlib.suppress(OSError):  # vanished or unreadable: its pair is skipped when read
                stat = os.stat(os.path.join(root, file))
                digest.update(f"{os.path.relpath(os.path.join(root, file), folder)}\0{stat.st_size}\0".encode())
                digest.update(f"{stat.st_mtime_ns}\n".encode())
                n_files += 1
    return [n_files, digest.hexdigest()[:16]]


def readable_columns(stream):
    """Every name a layout's role can read in `stream`, {name: (column, field)}: a column answers to its name, and
    without its extension (a webdataset names columns after its sample files' extensions: 000001.jpg_0.jpg is
    column "jpg_0.jpg", read as jpg_0); a field of a struct column (a webdataset sample's .json) to its name and to
    "column.field"."""
    features = stream.features
    if features is None:  # csv and other sources that do not state their features: the first row's values
        features = {name: value for name, value in next(iter(stream), {}).items()}
    names = {column: (column, None) for column in features}
    for column, feature in features.items():
        if isinstance(feature, dict) and set(feature) != {"bytes", "path"}:  # a struct, not an image
            for field in feature:
                names.setdefault(f"{column}.{field}", (column, field))
                names.setdefault(field, (column, field))
    for column in features:
        names.setdefault(column.rsplit(".", 1)[0], (column, None))
    return names, list(features)


def layout_summary():
    return "; ".join(
        f"{name} ({', '.join(' or '.join(names) for names in roles.values())})" for name, roles in DATA_LAYOUTS.items()
    )


def data_layout(args, stream):
    """The layout of `stream`'s rows: --data_layout's, or (auto) the one layout whose columns the dataset has.
    Stops in one line naming the dataset's columns when no layout, or more than one, fits."""
    readable, present = readable_columns(stream)
    named = {role: getattr(args, flag) for role, flag in ROLE_FLAGS.items() if getattr(args, flag) is not None}
    candidates = list(DATA_LAYOUTS) if args.data_layout == "auto" else [args.data_layout]
    fits, partial = {}, {}
    for name in candidates:
        roles = DATA_LAYOUTS[name]
        unread = [f"--{ROLE_FLAGS[role]}" for role in named if role not in roles]
        if unread and args.data_layout != "auto":
            raise InputError(f"the {name} layout does not read {' and '.join(unread)}")
        if unread:  # a column flag this layout has no use for: the user means another layout
            continue
        columns, lacking = {}, []
        for role, defaults in roles.items():
            wanted = [named[role]] if role in named else defaults
            found = next((readable[column] for column in wanted if column in readable), None)
            if found is None:
                lacking.append(" or ".join(wanted))
            else:
                columns[role] = found
        if not lacking:
            fits[name] = columns
        elif "image_0" in columns or "image_1" in columns or args.data_layout != "auto":
            partial[name] = lacking
    flags = "/".join(f"--{flag}" for flag in ROLE_FLAGS)
    if not fits and partial:
        name, lacking = min(partial.items(), key=lambda item: len(item[1]))
        raise InputError(
            f"dataset '{args.dataset_name}' lacks column(s) {lacking} of the {name} layout (it has {present}); name "
            f"yours with {flags}"
        )
    if not fits:
        raise InputError(
            f"dataset '{args.dataset_name}' fits no layout (it has columns {present}); layouts accepted: "
            f"{layout_summary()}; name your columns with {flags}, or choose a layout with --data_layout"
        )
    if len(fits) > 1:
        raise InputError(
            f"dataset '{args.dataset_name}' has the columns of the {' and '.join(fits)} layouts; choose one with "
            "--data_layout"
        )
    ((name, columns),) = fits.items()
    if any(columns[role][1] is not None for role in ("image_0", "image_1")):
        raise InputError(f"dataset '{args.dataset_name}': the images must be columns, not fields of {columns}")
    metadata = image_folder_metadata(args.dataset_name)
    folder = os.path.abspath(args.dataset_name) if metadata else None
    return DataLayout(name, columns, folder, args.min_vote_margin)


def stream_split(args, split, columns=None):
    """`split` of --dataset_name as a datasets stream (nothing is downloaded up front; rows are read as they are
    iterated), and what identifies its data. With `columns`, parquet sources (Pick-a-Pic's among them) read only
    those columns' bytes: the captions and labels of 851k pairs without a JPEG."""
    name = args.dataset_name
    metadata = image_folder_metadata(name)
    if (os.path.isfile(name) or metadata) and split != args.dataset_split_name:
        raise InputError(
            f"'{name}' is {'an image folder' if metadata else 'a single file'}, so it has no split '{split}'; hold "
            "pairs out of it with --num_validation_pairs instead"
        )
    if metadata:  # an image folder: its metadata file is the split; images are read from their paths
        location = dict(path="json" if metadata.endswith(".jsonl") else "csv", data_files={split: metadata})
    elif os.path.isfile(name):
        location = dict(path="parquet", data_files=name)
    else:
        location = dict(path=name, name=args.dataset_config_name)
    try:
        builder = datasets.load_dataset_builder(**location, cache_dir=args.cache_dir)
        if columns is not None and hasattr(builder.config, "columns"):
            builder = datasets.load_dataset_builder(**location, cache_dir=args.cache_dir, columns=columns)
        stream = builder.as_streaming_dataset(split=split)
        if stream.num_shards < MIN_SOURCE_SHARDS:  # few large files: their parquet row groups become the shards
            with contextlib.suppress(Exception):  # a file that cannot be read: keep whole files (it is skipped later)
                stream = stream.reshard()
    except Exception as error:  # the datasets library raises many types; all mean "cannot load this"
        reason = str(error).strip().splitlines()[0].rstrip(".") if str(error).strip() else type(error).__name__
        raise InputError(
            f"cannot load dataset '{name}' split '{split}': {reason}. Note: {DATASET_ALTERNATIVES}"
        ) from None
    data_files = (getattr(builder.config, "data_files", None) or {}).get(split)
    identity = {
        "dataset": os.path.abspath(name) if os.path.exists(name) else name,
        "config": builder.config.name,
        "split": split,
        "shards": stream.num_shards,
    }
    if data_files is not None:  # Hub files are pinned to a commit, local ones carry their modification time
        identity.update(
            files=list(data_files),
            origin=[list(origin) for origin in data_files.origin_metadata],
            contents=[local_file_fingerprint(file) for file in data_files],
        )
    if columns is not None:
        stream = stream.select_columns(columns)
        for column in columns:  # images as raw bytes even in an Image column, so a broken file is a counted skip
            if stream.features is not None and isinstance(stream.features[column], datasets.Image):
                stream = stream.cast_column(column, datasets.Image(decode=False))
    return stream, identity


def local_file_fingerprint(file, tail_bytes=65536):
    """[size, hash of the last bytes] of a local file (None for a remote one): a file rewritten with other rows keeps
    its modification time when it is restored by a copy or sync, or rewritten within the clock's resolution, but
    not its footer (a parquet file's footer holds its row groups' offsets and statistics). Cheap for any size."""
    if not os.path.isfile(file):
        return None
    with contextlib.suppress(OSError), open(file, "rb") as handle:  # an unreadable file is skipped when read
        size = handle.seek(0, os.SEEK_END)
        handle.seek(max(0, size - tail_bytes))
        return [size, hashlib.sha256(handle.read()).hexdigest()[:16]]
    return None


def source_file(identity, shard):
    files = identity.get("files")
    return f"source file {files[shard]}" if files and len(files) == identity["shards"] else f"source shard {shard}"


def cache_root(args):
    return Path(
        args.precompute_cache_dir or os.path.join(args.cache_dir or datasets.config.HF_DATASETS_CACHE, "diffusion_dpo")
    )


def check_cache_root_writable(args):
    """Stops in one line when the cache folder cannot be created or written to (a path under a file, a read-only
    mount, no permission), before any data is read or model loaded."""
    root = cache_root(args)
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as error:
        raise InputError(
            f"cannot write to the cache folder {root} ({error.strerror or error}); choose a writable one with "
            "--precompute_cache_dir"
        ) from None


def format_bytes(n_bytes):
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n_bytes < 1024 or unit == "GiB":
            return f"{n_bytes:.0f} {unit}" if unit == "bytes" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024


@contextlib.contextmanager
def removed_on_failure(partial):
    """Yields `partial`, a file or folder being written under a temporary name, and removes it when the writing fails
    or is interrupted. A full disk is reported in one line."""
    try:
        yield partial
    except BaseException as error:
        # numpy reports a short write without an errno: then the disk is (all but) full
        disk_full = isinstance(error, OSError) and (
            error.errno in (errno.ENOSPC, errno.EDQUOT) or shutil.disk_usage(partial.parent).free < 2**20
        )
        if partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)
        else:
            partial.unlink(missing_ok=True)
        if disk_full:
            raise InputError(
                f"the disk of {partial.parent} is full ({format_bytes(shutil.disk_usage(partial.parent).free)} "
                "free); free some space or choose another folder with --precompute_cache_dir"
            ) from None
        raise


def parse_label(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan  # an invalid label: counted and dropped


def layout_column(batch, column):
    """The values of a layout's (column, field) in an arrow batch."""
    name, field = column
    values = batch.column(name)
    return values if field is None else pc.struct_field(values, field)


def numbers(values):
    """Arrow values as float64, row by row: a value that is not a number (e.g. "left") becomes NaN."""
    try:
        return values.cast(pa.float64())
    except pa.ArrowException:  # not all numbers: parsed one by one
        return pa.array([parse_label(value) for value in values.to_pylist()], pa.float64())


def vote_labels(votes_0, votes_1, min_margin):
    """Labels from vote counts: 1 or 0 for the image with at least `min_margin` more votes, 0.5 (a tie) for closer
    pairs, NaN (invalid) where a count is missing, not a number, infinite or negative."""
    votes_0, votes_1 = (votes.to_numpy(zero_copy_only=False).astype(np.float64) for votes in (votes_0, votes_1))
    margin = votes_0 - votes_1
    labels = np.where(margin >= min_margin, 1.0, np.where(margin <= -min_margin, 0.0, 0.5))
    valid = np.isfinite(votes_0) & np.isfinite(votes_1) & (votes_0 >= 0) & (votes_1 >= 0)
    return pa.array(np.where(valid, labels, np.nan), pa.float64())


def parse_labels_and_captions(batch, layout):
    """A batch's labels as float64 and captions as strings, row by row, as `layout` reads them (see DATA_LAYOUTS): a
    label that is not a number (e.g. "left") becomes NaN, an invalid label; a missing caption (null, or a float NaN
    as pandas writes one) becomes null, which is trained as the empty caption."""
    captions = layout_column(batch, layout.columns["caption"])
    if layout.name == "pickapic":
        labels = numbers(layout_column(batch, layout.columns["label"]))
    elif layout.name == "votes":
        votes = [numbers(layout_column(batch, layout.columns[role])) for role in ("vote_0", "vote_1")]
        labels = vote_labels(*votes, layout.min_vote_margin)
    else:  # chosen_rejected: the first image, the chosen one, won
        labels = pa.array(np.ones(len(batch)), pa.float64())
    if pa.types.is_floating(captions.type):  # not "nan"
        captions = pc.if_else(pc.is_nan(captions), pa.scalar(None, captions.type), captions)
    return pa.table({"label": labels, "caption": captions.cast(pa.string())})


def read_labels_and_captions(path):
    """The labels and captions cache at `path`, or None when there is none or it is damaged (a truncated copy, a full
    disk): it is then read from the data again, and replaced."""
    if not path.exists():
        return None
    try:
        table = pq.read_table(path)
        json.loads(table.schema.metadata[b"shard_starts"])
        return table
    except Exception as error:  # pyarrow raises several types for a damaged file
        logger.warning(
            f"The labels and captions cache {path} is damaged ({type(error).__name__}); reading them again.",
            main_process_only=False,
        )
        return None


def labels_and_captions(args, split, identity, num_shards, layout):
    """Every row's label and caption, read shard by shard (so each shard's first row is known), and kept beside the
    latent caches: a later run, or another process of this one, starts without reading the data again."""
    key_fields = [identity, layout.cache_fields(("label", "caption"))]
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:20]
    path = cache_root(args) / f"pairs-{key}.parquet"
    table = read_labels_and_captions(path)
    if table is None:
        stream, _ = stream_split(args, split, layout.source_columns)
        schema = pa.schema([("label", pa.float64()), ("caption", pa.string())])

        def read_shard(shard):
            try:
                batches = stream.shard(num_shards, shard, contiguous=True).with_format("arrow").iter(10_000)
                return pa.concat_tables(
                    [schema.empty_table()] + [parse_labels_and_captions(b, layout).cast(schema) for b in batches]
                )
            except Exception as error:  # a broken file costs its pairs, not the run
                logger.warning(
                    f"Skipping {source_file(identity, shard)} of split '{split}': unreadable "
                    f"({type(error).__name__}: {error})",
                    main_process_only=False,
                )
                return schema.empty_table()

        with ThreadPoolExecutor(max_workers=8) as pool:  # the shards' reads overlap (remote files: round trips)
            shards = list(
                tqdm(
                    pool.map(read_shard, range(num_shards)),
                    total=num_shards,
                    desc="Reading labels and captions",
                    disable=num_shards < 2,
                )
            )
        shard_starts = np.cumsum([0] + [len(shard) for shard in shards]).tolist()
        table = pa.concat_tables([schema.empty_table()] + shards).replace_schema_metadata(
            {"shard_starts": json.dumps(shard_starts)}
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        with removed_on_failure(path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:8]}")) as partial:
            pq.write_table(table, partial)
            os.replace(partial, path)
    shard_starts = np.asarray(json.loads(table.schema.metadata[b"shard_starts"]), dtype=np.int64)
    return table.column("label").to_numpy(zero_copy_only=False), table.column("caption").to_pylist(), shard_starts


class PreferencePairs:
    """The decided pairs of one split, or a subset of them: each pair's row in the split, caption and which image
    won, from one pass over the label and caption columns. Images stay in the source until precompute streams them.

    Names used throughout: these source pairs are `source_pairs` (`train_source`, `held_out_source`); the pairs
    read back from their cache, CachedPreferencePairs, are `cached` (`train_pairs`, `held_out_pairs`).
    """

    def __init__(self, identity, rows, captions, second_is_winner, shard_starts, layout):
        self.identity = identity  # what identifies the split's data (see stream_split)
        self.rows = rows
        self.captions = captions
        self.second_is_winner = second_is_winner  # label 0: the second image won (pairs are stored winner first)
        self.shard_starts = shard_starts  # the first row of each source shard (file), then the number of rows
        self.layout = layout  # which columns hold the images (DataLayout)

    def __len__(self):
        return len(self.rows)

    def subset(self, positions):
        positions = np.asarray(positions, dtype=np.int64)
        return PreferencePairs(
            self.identity,
            self.rows[positions],
            [self.captions[i] for i in positions],
            self.second_is_winner[positions],
            self.shard_starts,
            self.layout,
        )

    def sample(self, n, seed):
        """Positions of n pairs drawn at random from as few source shards as hold them (shards in a seeded random
        order): a subset of a large dataset then streams a fraction of its files, not all of them."""
        rng = np.random.default_rng(seed)
        shard_rank = np.argsort(rng.permutation(len(self.shard_starts) - 1))
        shard_of_pair = np.searchsorted(self.shard_starts, self.rows, side="right") - 1
        order = np.lexsort((rng.random(len(self)), shard_rank[shard_of_pair]))
        return np.sort(order[:n])

    @property
    def fingerprint(self):
        digest = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode())
        digest.update(self.rows.astype(np.int64).tobytes())
        return digest.hexdigest()[:20]


def load_preference_pairs(args, split):
    """The decided pairs of one split: ties and invalid labels dropped, images not read yet."""
    stream, identity = stream_split(args, split)
    layout = data_layout(args, stream)
    if layout.image_folder is not None:
        identity["images"] = image_folder_fingerprint(layout.image_folder)
    labels, captions, shard_starts = labels_and_captions(args, split, identity, stream.num_shards, layout)
    is_tie = labels == 0.5
    is_decided = (labels == 0.0) | (labels == 1.0)
    n_invalid = int((~is_tie & ~is_decided).sum())
    logger.info(
        f"Split '{split}' ({layout.name} layout): dropped {int(is_tie.sum())} tied pairs and {n_invalid} "
        f"{INVALID_ROWS[layout.name]}."
    )
    rows = np.flatnonzero(is_decided)
    if len(rows) == 0:
        raise InputError(
            f"dataset '{args.dataset_name}' split '{split}' has no preference pairs left after dropping "
            f"{int(is_tie.sum())} ties and {n_invalid} invalid labels"
        )
    return PreferencePairs(
        identity,
        rows,
        ["" if captions[r] is None else captions[r] for r in rows],
        labels[rows] == 0.0,
        shard_starts,
        layout,
    )


class PreferenceRow(NamedTuple):
    """A row of a dataset as read_preference_rows yields it."""

    row: int  # its position in the split (PreferencePairs.rows counts the same way)
    caption: str | None
    image_0: object  # the layout's first image (jpg_0, chosen, image1), as decode_image takes it; None: unreadable
    image_1: object  # the second (jpg_1, rejected, image2)
    label: float  # 1: the first image won, 0: the second, 0.5: a tie, NaN: an invalid label or votes


def read_preference_rows(args, split=None):
    """Every row of `split` (default --dataset_split_name) of --dataset_name as the trainer reads it, in any layout,
    streamed in order and nothing written: PreferenceRow(row, caption, image_0, image_1, label). Images are raw
    (encoded bytes, or a datasets Image dict {"bytes", "path"}, an image folder's files as {"path": file}): pass
    them to decode_image. `args`: the trainer's parse_args(...) result, of which the data flags are read."""
    split = split or args.dataset_split_name
    layout = data_layout(args, stream_split(args, split)[0])
    stream, _ = stream_split(args, split, sorted({column for column, _ in layout.columns.values()}))
    row = 0
    for batch in stream.with_format("arrow").iter(64):
        parsed = parse_labels_and_captions(batch, layout)
        images = [batch.column(column).to_pylist() for column in layout.image_columns]
        for caption, label, *pair in zip(
            parsed.column("caption").to_pylist(), parsed.column("label").to_pylist(), *images
        ):
            try:
                pair = layout.images(dict(zip(layout.image_columns, pair)))
            except ValueError:  # an image folder's row whose path is missing or leaves the folder
                pair = [None, None]
            yield PreferenceRow(row, caption, *pair, label)
            row += 1


def training_and_validation_pairs(args):
    """The training pairs and the held-out validation pairs (None without --validation_split_name or
    --num_validation_pairs). Held-out pairs come from their own split, or are set aside from the training split."""
    check_transformer(args)
    check_cache_root_writable(args)
    train_source = load_preference_pairs(args, args.dataset_split_name)
    held_out_source = None
    if args.validation_split_name is not None:
        held_out_source = load_preference_pairs(args, args.validation_split_name)
        if args.num_validation_pairs:
            held_out_source = held_out_source.subset(held_out_source.sample(args.num_validation_pairs, args.seed))
    elif args.num_validation_pairs:
        if args.num_validation_pairs >= len(train_source):
            raise InputError(
                f"--num_validation_pairs {args.num_validation_pairs} leaves no training pairs "
                f"(the split has {len(train_source)})"
            )
        held_out = train_source.sample(args.num_validation_pairs, args.seed)
        held_out_source = train_source.subset(held_out)
        train_source = train_source.subset(np.setdiff1d(np.arange(len(train_source)), held_out))
    if args.max_train_samples is not None:
        train_source = train_source.subset(train_source.sample(args.max_train_samples, args.seed))
    logger.info(
        f"Training on {len(train_source)} preference pairs"
        + (f", validating on {len(held_out_source)} held-out pairs." if held_out_source is not None else ".")
    )
    return train_source, held_out_source


# ----------------------------------------------------------------------------------------------------------------
# 3. Precompute latents and text embeddings once, cached on disk
# ----------------------------------------------------------------------------------------------------------------


def model_identity(args):
    """What identifies the VAE and text encoders' weights, without loading them."""
    parts = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2") + (() if args.no_t5 else T5_PARTS)
    return folder_identity(args.pretrained_model_name_or_path, args, parts)


def folder_identity(path, args, subfolders):
    if os.path.isdir(path):
        files = []
        for sub in subfolders:
            for file in sorted(Path(path, sub).glob("*")):
                stat = file.stat()
                files.append([f"{sub}/{file.name}", stat.st_size, stat.st_mtime_ns])
        return {"path": os.path.abspath(path), "files": files}
    identity = {"hub_id": path, "revision": args.revision, "variant": args.variant}
    try:  # resolve the revision to a commit, so an updated repo invalidates the cache
        from huggingface_hub import snapshot_download

        snapshot = snapshot_download(
            path, revision=args.revision, allow_patterns=["model_index.json"], cache_dir=args.cache_dir
        )
        identity["commit"] = Path(snapshot).name
    except Exception as error:
        logger.warning(f"Could not resolve {path} to a commit ({type(error).__name__}); caching by id and revision.")
    return identity


class CacheRequest(NamedTuple):
    """A request for the cache of some source pairs, holding the latents that `epochs` training epochs read; epochs
    None: a held-out set, each pair read as stored."""

    source_pairs: PreferencePairs
    epochs: int | None = None


class CacheAddress(NamedTuple):
    """A cache folder and the fields its name is hashed from (everything its contents depend on)."""

    path: Path
    key_fields: dict


class PlannedCache(NamedTuple):
    """A cache request resolved: the source pairs, their cache folder and key fields, and the latents the run reads
    ((pairs, orientations) bool, see latents_read)."""

    source_pairs: PreferencePairs
    path: Path
    key_fields: dict
    needed: np.ndarray


def precompute_cache_path(args, source_pairs, encode_dtype):
    """The CacheAddress of the cache of `source_pairs`: its name changes with anything its contents depend on."""
    key_fields = {
        "format": CACHE_FORMAT_VERSION,
        "model": model_identity(args),
        "t5": None if args.no_t5 else {"max_sequence_length": args.max_sequence_length},
        "max_sequence_length": args.max_sequence_length,  # also the length of T5's zeros without it
        "encode_dtype": [str(encode_dtype), str(vae_dtype(args, encode_dtype))],  # text encoders, VAE
        "resolution": args.resolution,
        "crop": f"random(seed={args.seed})" if args.random_crop else "center",
        "hflip": not args.no_hflip,
        "pairs": source_pairs.fingerprint,  # changes with the data, the split, the subset and the order
        "columns": source_pairs.layout.cache_fields(("image_0", "image_1", "label", "caption")),
    }
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:20]
    return CacheAddress(cache_root(args) / key, key_fields)


def decode_image(value):
    """Raw bytes, a datasets Image dict, or a PIL image -> RGB PIL image as an image viewer shows it (raises on
    undecodable data): turned as its EXIF orientation says, the first frame of an animation, 16-bit and float images
    scaled to 8 bit (float images in [0, 1] taken as 0..1, others as 0..255), transparency composited on white."""
    if isinstance(value, dict):
        value = value["bytes"] if value.get("bytes") is not None else Path(value["path"]).read_bytes()
    image = value if isinstance(value, Image.Image) else Image.open(io.BytesIO(value))
    image.seek(0)
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):  # convert("RGB") would clip these, not scale them
        pixels = np.nan_to_num(np.asarray(image, dtype=np.float64))
        if image.mode == "F":
            scale = 255.0 if pixels.max() <= 1.0 else 1.0
        elif image.mode == "I" and pixels.max() <= 255:
            scale = 1.0
        else:
            scale = 255.0 / 65535.0
        image = Image.fromarray(np.clip(np.round(pixels * scale), 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")  # also forces the full decode, so truncated files fail here


def resize_and_crop(image, resolution, crop_rng):
    """Resizes the short side to `resolution` and crops a square (centred, or where crop_rng says)."""
    scale = resolution / min(image.size)
    width, height = max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))
    image = image.resize((width, height), Image.BILINEAR)
    if crop_rng is None:
        left, top = (width - resolution) // 2, (height - resolution) // 2
    else:
        left, top = (
            int(crop_rng.integers(0, width - resolution + 1)),
            int(crop_rng.integers(0, height - resolution + 1)),
        )
    return image.crop((left, top, left + resolution, top + resolution))


class PairsToDecode(NamedTuple):
    """Source pairs for PairPixels to decode: those at `positions` (None: all)."""

    source_pairs: PreferencePairs
    positions: np.ndarray | None = None


class PairPixels(torch.utils.data.IterableDataset):
    """Streams the source shards that hold pending pairs (each DataLoader worker its own shards) and yields those
    pairs decoded and cropped, winner first, plus their mirrored copies. `to_decode`: a list of PairsToDecode; items
    carry the number of theirs in it ("group") and the pair's position in its source pairs ("index")."""

    def __init__(self, args, to_decode, part=0, parts=1):
        self.args = args
        self.resolution = args.resolution
        self.random_crop = args.random_crop
        self.hflip = not args.no_hflip
        self.seed = args.seed
        self.image_processor = VaeImageProcessor(do_resize=False)
        self.num_orientations = 2 if self.hflip else 1
        self.to_decode = to_decode
        self.tasks = {}  # (split, shard) -> {row in the split: [(group, position), ...]}
        self.splits = {}  # per split: its source pairs (identity, shard starts)
        for group, (source_pairs, positions) in enumerate(to_decode):
            split = source_pairs.identity["split"]
            self.splits[split] = source_pairs
            positions = np.arange(len(source_pairs)) if positions is None else positions
            shards = np.searchsorted(source_pairs.shard_starts, source_pairs.rows[positions], side="right") - 1
            for position, shard in zip(positions.tolist(), shards.tolist()):
                rows = self.tasks.setdefault((split, shard), {})
                rows.setdefault(int(source_pairs.rows[position]), []).append((group, position))
        self.tasks = {task: self.tasks[task] for task in sorted(self.tasks)[part::parts]}  # this process's shards
        self.num_pairs = sum(len(found) for rows in self.tasks.values() for found in rows.values())

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        tasks = list(self.tasks)[worker.id :: worker.num_workers] if worker is not None else list(self.tasks)
        streams = {}
        for split, shard in tasks:
            source_pairs = self.splits[split]
            columns = source_pairs.layout.image_columns
            if split not in streams:
                streams[split] = stream_split(self.args, split, columns)[0]
            stream, wanted = streams[split], self.tasks[(split, shard)]
            row, unseen = int(source_pairs.shard_starts[shard]), {found for rows in wanted.values() for found in rows}
            # .iter(), not a for loop over the stream: inside a DataLoader worker the latter splits the (one) shard
            # among the workers again, and all but one would see nothing
            batches = stream.shard(stream.num_shards, shard, contiguous=True).iter(batch_size=64)
            while True:
                try:
                    batch = next(batches, None)
                except Exception as error:  # a broken file costs its pairs (counted skips), not the run
                    logger.warning(
                        f"Skipping {len(unseen)} pairs of {source_file(source_pairs.identity, shard)}: "
                        f"unreadable ({type(error).__name__}: {error})",
                        main_process_only=False,
                    )
                    yield from (self.skipped(group, position) for group, position in sorted(unseen))
                    break
                if batch is None:
                    break
                for offset in range(len(batch[columns[0]])):
                    for group, position in wanted.get(row + offset, ()):
                        unseen.discard((group, position))
                        yield self.decode(group, position, {column: batch[column][offset] for column in columns})
                row += len(batch[columns[0]])

    def skipped(self, group, position):
        shape = (self.num_orientations, 2, 3, self.resolution, self.resolution)
        return {
            "group": group,
            "index": position,
            "ok": False,
            "pixels": torch.zeros(shape),
        }

    def decode(self, group, position, example):
        item = self.skipped(group, position)
        try:
            images = [decode_image(value) for value in self.to_decode[group].source_pairs.layout.images(example)]
        except Exception as error:  # PIL raises OSError, ValueError, SyntaxError... for broken files
            logger.warning(
                f"Skipping pair {position}: undecodable image ({type(error).__name__}: {error})",
                main_process_only=False,
            )
            return item
        if self.to_decode[group].source_pairs.second_is_winner[position]:
            images.reverse()
        crop_rng = np.random.default_rng([self.seed, position]) if self.random_crop else None
        pixels = self.image_processor.preprocess(
            [resize_and_crop(image, self.resolution, crop_rng) for image in images]
        )
        return {**item, "ok": True, "pixels": torch.stack([pixels, pixels.flip(-1)][: self.num_orientations])}


def load_text_encoders(args, device, dtype):
    """SD3's text encoders and their tokenizers: CLIP-L and CLIP-G (both with projections), then T5 unless --no_t5."""
    encoders, tokenizers = [], []
    for suffix in ("", "_2") if args.no_t5 else ("", "_2", "_3"):
        config = transformers.AutoConfig.from_pretrained(
            args.pretrained_model_name_or_path,
            subfolder=f"text_encoder{suffix}",
            revision=args.revision,
            cache_dir=args.cache_dir,
        )
        encoder = getattr(transformers, config.architectures[0]).from_pretrained(
            args.pretrained_model_name_or_path,
            subfolder=f"text_encoder{suffix}",
            revision=args.revision,
            variant=args.variant,
            cache_dir=args.cache_dir,
            torch_dtype=dtype,
        )
        encoders.append(encoder.to(device).eval().requires_grad_(False))
        tokenizers.append(
            transformers.AutoTokenizer.from_pretrained(
                args.pretrained_model_name_or_path,
                subfolder=f"tokenizer{suffix}",
                revision=args.revision,
                cache_dir=args.cache_dir,
            )
        )
    return encoders, tokenizers


@torch.inference_mode()
def encode_captions(captions, text_encoders, tokenizers, max_sequence_length, joint_attention_dim, batch_size=64):
    """Prompt embeddings as StableDiffusion3Pipeline.encode_prompt computes them: both CLIP encoders' penultimate
    hidden states side by side, zero-padded to T5's width and followed along the sequence by T5's last hidden states
    (zeros of max_sequence_length x joint_attention_dim without T5); the pooled embedding is both CLIP projections
    side by side."""
    prompt_embeds, pooled_prompt_embeds = [], []
    clip_encoders, clip_tokenizers = text_encoders[:2], tokenizers[:2]
    for start in range(0, len(captions), batch_size):
        batch = captions[start : start + batch_size]
        hidden_states, pooled = [], []
        for text_encoder, tokenizer in zip(clip_encoders, clip_tokenizers):
            tokens = tokenizer(
                batch,
                padding="max_length",
                truncation=True,
                max_length=tokenizer.model_max_length,
                return_tensors="pt",
            )
            output = text_encoder(tokens.input_ids.to(text_encoder.device), output_hidden_states=True)
            hidden_states.append(output.hidden_states[-2])
            pooled.append(output.text_embeds)
        clip_embeds = torch.cat(hidden_states, dim=-1)
        if len(text_encoders) == 3:
            tokens = tokenizers[2](
                batch,
                padding="max_length",
                truncation=True,
                max_length=max_sequence_length,
                add_special_tokens=True,
                return_tensors="pt",
            )
            t5_embeds = text_encoders[2](tokens.input_ids.to(text_encoders[2].device))[0].to(clip_embeds.dtype)
        else:
            t5_embeds = clip_embeds.new_zeros(len(batch), max_sequence_length, joint_attention_dim)
        clip_embeds = F.pad(clip_embeds, (0, t5_embeds.shape[-1] - clip_embeds.shape[-1]))
        prompt_embeds.append(torch.cat([clip_embeds, t5_embeds], dim=-2).cpu())
        pooled_prompt_embeds.append(torch.cat(pooled, dim=-1).cpu())
    return torch.cat(prompt_embeds), torch.cat(pooled_prompt_embeds)


def load_vae(args, dtype):
    return AutoencoderKL.from_pretrained(
        args.pretrained_model_name_or_path,
        subfolder="vae",
        revision=args.revision,
        variant=args.variant,
        cache_dir=args.cache_dir,
        torch_dtype=dtype,
    )


def load_vae_config(args):
    return AutoencoderKL.load_config(
        args.pretrained_model_name_or_path, subfolder="vae", revision=args.revision, cache_dir=args.cache_dir
    )


def vae_dtype(args, weight_dtype):
    """The VAE encodes in fp32 unless its config says it is safe in half precision (force_upcast false)."""
    return torch.float32 if load_vae_config(args).get("force_upcast", True) else weight_dtype


def drawn_orientations(n_pairs, n_orientations, seed, epoch):
    """The orientation (0: as stored, 1: mirrored) each pair is read in during `epoch`, a function of (seed, epoch)
    alone. The sampler reads it and the precompute encodes exactly these latents, so a one-epoch run encodes every
    image once even with flipping on."""
    return np.random.default_rng([seed, epoch, 1]).integers(0, n_orientations, n_pairs)


def latents_read(n_pairs, args, epochs=None):
    """(pairs, orientations) bool: the latents a run reads in `epochs` training epochs; None: a held-out set (read
    as stored, orientation 0)."""
    needed = np.zeros((n_pairs, 1 if args.no_hflip else 2), dtype=bool)
    if epochs is None:
        needed[:, 0] = True
    for epoch in range(epochs or 0):
        needed[np.arange(n_pairs), drawn_orientations(n_pairs, needed.shape[1], args.seed, epoch)] = True
    return needed


def image_latent_shape(args):
    """(channels, height, width) of one image's latent, from the VAE's config alone."""
    vae_config = load_vae_config(args)
    latent_size = args.resolution // 2 ** (len(vae_config["block_out_channels"]) - 1)
    return (vae_config["latent_channels"], latent_size, latent_size)


def joint_attention_dim(args):
    """The width of the prompt embedding: T5's hidden size, which the transformer's config records."""
    return SD3Transformer2DModel.load_config(
        args.pretrained_model_name_or_path, subfolder="transformer", revision=args.revision, cache_dir=args.cache_dir
    )["joint_attention_dim"]


def caption_embedding_bytes(args):
    """Bytes one caption's text embeddings take in the cache (float16): the joint prompt embedding (CLIP tokens and
    T5 tokens) and the pooled embedding, from the configs alone."""
    first, second = (
        transformers.AutoConfig.from_pretrained(
            args.pretrained_model_name_or_path,
            subfolder=f"text_encoder{suffix}",
            revision=args.revision,
            cache_dir=args.cache_dir,
        )
        for suffix in ("", "_2")
    )
    tokens = first.max_position_embeddings + args.max_sequence_length
    return 2 * (tokens * joint_attention_dim(args) + first.projection_dim + second.projection_dim)


def latent_chunk_bytes(args):
    """{cache file: bytes one (pair, orientation) takes in it}: the winner's and loser's latents (float16)."""
    return {"pair_latents": 2 * 2 * math.prod(image_latent_shape(args))}


def precompute_bytes(args, planned_caches):
    """Bytes the precompute will write to disk for `planned_caches`: a new cache's text embeddings, caption index and
    masks, and the latents still to encode. The latent files are sparse: each latent written takes whole disk
    blocks, but all of them no more than the file's full size."""

    def on_disk(n_bytes, block=4096):
        return -(-n_bytes // block) * block

    total = 0
    for planned in planned_caches:
        (n_pairs, n_orientations), todo = planned.needed.shape, planned.needed
        if planned.path.exists():
            todo = todo & ~np.load(planned.path / "encoded.npy") & ~np.load(planned.path / "undecodable.npy")[:, None]
        else:
            n_captions = len({str(caption) for caption in planned.source_pairs.captions} | {""})
            total += on_disk(n_captions * caption_embedding_bytes(args))
            total += 3 * on_disk(n_pairs * (4 + n_orientations + 1))  # caption index, masks and their copies
        if todo.any():
            for chunk in latent_chunk_bytes(args).values():
                total += min(on_disk(n_pairs * n_orientations * chunk), int(todo.sum()) * on_disk(chunk + 4096))
    return total


def check_free_space(args, planned_caches):
    """Stops in one line, before any encoder is loaded, when the cache folder's disk cannot hold what the precompute
    writes (the latents are memory-mapped: a full disk would kill the process with SIGBUS, without a message)."""
    root = cache_root(args)
    needed, free = precompute_bytes(args, planned_caches), shutil.disk_usage(root).free
    if needed > free:
        raise InputError(
            f"not enough disk space for the precompute cache in {root}: it needs {format_bytes(needed)}, "
            f"{format_bytes(free)} are free; free some space or choose another folder with --precompute_cache_dir"
        )


def save_atomically(path, array):
    with removed_on_failure(path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:8]}.npy")) as partial:
        np.save(partial, array)
        os.replace(partial, path)


def create_cache(args, planned, text_encoders, tokenizers, latent_shape, joint_dim):
    """The new cache folder of a PlannedCache with its text part and empty latent storage, written under a temporary
    name and renamed when complete (an interrupted run never leaves a folder that looks valid)."""
    partial_name = f".{planned.path.name}.partial-{uuid.uuid4().hex[:8]}"
    with removed_on_failure(planned.path.with_name(partial_name)) as partial:
        partial.mkdir(parents=True)
        captions = [str(caption) for caption in planned.source_pairs.captions]
        # Row 0 is the empty caption: the SD3 pipeline's unconditional input (its default negative prompt), which
        # prompt dropout trains.
        captioned = sorted(set(captions) - {""})
        unique_captions = ["", *captioned]
        row_of = {"": 0, **{caption: row for row, caption in enumerate(captioned, start=1)}}
        np.save(partial / "caption_index.npy", np.array([row_of[c] for c in captions], dtype=np.int32))
        prompt_embeds, pooled_prompt_embeds = encode_captions(
            unique_captions, text_encoders, tokenizers, args.max_sequence_length, joint_dim
        )
        np.save(partial / "prompt_embeds.npy", prompt_embeds.to(torch.float16).numpy())
        np.save(partial / "pooled_prompt_embeds.npy", pooled_prompt_embeds.to(torch.float16).numpy())
        logger.info(
            f"Encoded {len(unique_captions) - 1} unique captions for {len(captions)} pairs "
            f"({captions.count('')} empty)."
        )
        n_orientations = 1 if args.no_hflip else 2
        # allocated, not written: the file stays sparse on disk until latents are encoded into it
        np.lib.format.open_memmap(
            partial / "pair_latents.npy",
            mode="w+",
            dtype=np.float16,
            shape=(len(captions), n_orientations, 2, *latent_shape),
        )
        np.save(partial / "encoded.npy", np.zeros((len(captions), n_orientations), dtype=bool))
        np.save(partial / "undecodable.npy", np.zeros(len(captions), dtype=bool))
        (partial / "cache_info.json").write_text(
            json.dumps(
                {**planned.key_fields, "pairs": len(captions), "unique_captions": len(unique_captions) - 1}, indent=2
            )
        )
        os.replace(partial, planned.path)


def create_missing_caches(args, planned_caches, accelerator, encode_dtype):
    """Creates the caches of `planned_caches` (PlannedCache) that do not exist yet: the text part, each unique caption
    encoded once with the text encoders (loaded only if a cache is missing), and empty latent storage that
    encode_latents fills. A cache folder holds:
      caption_index.npy  (pairs,) int32 row of prompt_embeds; row 0 is the empty caption (prompt dropout)
      prompt_embeds.npy  (unique captions + 1, 77 + max_sequence_length, joint dim) float16: CLIP then T5 tokens
      pooled_prompt_embeds.npy  (unique captions + 1, dim) float16, both CLIP projections side by side
      pair_latents.npy   (pairs, orientations, 2 = winner/loser, 16, h, w) float16, (mean - shift) * scaling
      encoded.npy        (pairs, orientations) bool: which latents pair_latents.npy holds
      undecodable.npy    (pairs,) bool: pairs with an image that could not be decoded (skipped)
      encoded.part-<k>.npy, undecodable.part-<k>.npy  what process k of a machine encoded, until folded in
    """
    new_caches = [planned for planned in planned_caches if not planned.path.exists()]
    if new_caches:
        latent_shape, joint_dim = image_latent_shape(args), joint_attention_dim(args)
        text_encoders, tokenizers = load_text_encoders(args, accelerator.device, encode_dtype)
        for planned in new_caches:
            logger.info(f"Creating the latent and text-embedding cache {planned.path}")
            create_cache(args, planned, text_encoders, tokenizers, latent_shape, joint_dim)
        del text_encoders
        free_memory()


class LatentCache:
    """The latent storage of one cache, open for encoding: its masks, the latents this process encodes into it
    (`todo`, (pairs, orientations) bool), and once `open`, the memory-mapped latents. Masks are saved as
    encoded<suffix>.npy / undecodable<suffix>.npy (see fold_parts)."""

    def __init__(self, path, needed, suffix=""):
        self.path = path
        self.suffix = suffix
        self.encoded = np.load(path / "encoded.npy")
        self.undecodable = np.load(path / "undecodable.npy")
        self.todo = needed & ~self.encoded & ~self.undecodable[:, None]
        self.pair_latents = None

    def open(self):
        self.pair_latents = np.load(self.path / "pair_latents.npy", mmap_mode="r+")

    def store(self, index, orientation, latent):
        self.pair_latents[index, orientation] = latent
        self.encoded[index, orientation] = True

    def commit(self):
        """Latents reach the disk before the masks that say they are there."""
        if self.pair_latents is not None:
            self.pair_latents.flush()
        save_atomically(self.path / f"encoded{self.suffix}.npy", self.encoded)
        save_atomically(self.path / f"undecodable{self.suffix}.npy", self.undecodable)


class VaeEncoder:
    """VAE latents (distribution means) of images, `batch_size` images per forward (--vae_encode_batch_size). On
    CUDA out-of-memory the batch size halves (logged once) and the failed batch is encoded again, down to one image;
    the smaller size is kept for the rest of the precompute."""

    def __init__(self, vae, batch_size, device, dtype, memory_format):
        self.vae, self.batch_size = vae, batch_size
        self.device, self.dtype, self.memory_format = device, dtype, memory_format
        self.backed_off = False

    @torch.inference_mode()
    def __call__(self, images):
        latents, start = [], 0
        while start < len(images):
            chunk = images[start : start + self.batch_size]
            try:
                pixels = chunk.to(self.device, self.dtype, memory_format=self.memory_format)
                latents.append(self.vae.encode(pixels).latent_dist.mean)
                start += len(chunk)
                continue
            except torch.cuda.OutOfMemoryError:
                if len(chunk) == 1:
                    raise
            # outside the except clause: the failed forward's tensors, held by its traceback, are released by now
            self.batch_size = len(chunk) // 2
            free_memory()
            if not self.backed_off:
                logger.warning(
                    f"CUDA out of memory encoding {len(chunk)} images at once: VAE batch halved to "
                    f"{self.batch_size} (halved again if needed); a lower --vae_encode_batch_size avoids the retry",
                    main_process_only=False,
                )
                self.backed_off = True
        return torch.cat(latents)


def encode_latents(args, planned_caches, accelerator, encode_dtype, part=0, parts=1):
    """Encodes the latents the PlannedCaches need and lack. With `parts` > 1 the processes of a machine share the
    work: each streams its own source shards and saves its masks as encoded.part-<part>.npy (see fold_parts).
    Latents are committed every --precompute_commit_seconds: flushed to disk first, then the masks replaced
    atomically, so an interrupted precompute loses at most that much work and the next run resumes it."""
    device = accelerator.device
    encode_dtype = vae_dtype(args, encode_dtype)
    # channels-last convolutions encode 1.4x faster on CPU (measured with the SD 1.5 VAE)
    memory_format = torch.channels_last if device.type == "cpu" else torch.contiguous_format
    caches = [
        LatentCache(planned.path, planned.needed, f".part-{part}" if parts > 1 else "") for planned in planned_caches
    ]
    if part == 0:
        for cache in caches:
            logger.info(
                f"Cache {cache.path.name}: {int(cache.encoded.sum())} pair latents present, {int(cache.todo.sum())} "
                f"to encode{f' by {parts} processes' if parts > 1 else ''}"
            )
    # The source is streamed shard by shard, reading only shards with pending pairs; JPEG decoding and resizing
    # run in loader workers (each its own shards), overlapping the VAE.
    to_decode = [
        PairsToDecode(planned.source_pairs, np.flatnonzero(cache.todo.any(axis=1)))
        for planned, cache in zip(planned_caches, caches)
    ]
    pixels = PairPixels(args, to_decode, part, parts)
    if pixels.num_pairs == 0:
        return
    vae = load_vae(args, encode_dtype).to(device).eval().requires_grad_(False).to(memory_format=memory_format)
    for cache in caches:
        cache.open()

    # without --dataloader_num_workers: up to 4 decoders per process, sharing the machine's cores (one decodes ~110
    # 1024 px JPEGs/s, measured on CPU; a GPU's VAE encodes several times that)
    decoders = args.dataloader_num_workers or max(1, min(4, (os.cpu_count() or 1) // parts))
    loader = torch.utils.data.DataLoader(
        pixels, batch_size=max(1, args.vae_encode_batch_size // 2), num_workers=min(len(pixels.tasks), decoders)
    )
    encoder = VaeEncoder(vae, args.vae_encode_batch_size, device, encode_dtype, memory_format)
    started = last_commit = time.monotonic()
    n_images = 0
    progress = tqdm(total=pixels.num_pairs, desc="Encoding images", disable=not accelerator.is_local_main_process)
    try:
        for batch in loader:
            progress.update(len(batch["index"]))
            group, index, ok = batch["group"].numpy(), batch["index"].numpy(), batch["ok"].numpy()
            for g, i in zip(group[~ok], index[~ok]):
                caches[g].undecodable[i] = True
            if not ok.any():
                continue
            group, index = group[ok], index[ok]
            wanted = np.stack([caches[g].todo[i] for g, i in zip(group, index)])  # (pairs, orientations) to encode
            images = batch["pixels"][torch.from_numpy(ok)][torch.from_numpy(wanted)]  # (n, 2, 3, H, W)
            latents = encoder(images.flatten(0, 1)).float()
            # as the SD3 pipeline's decode inverts it: latents / scaling_factor + shift_factor
            latents = (latents - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor
            latents = latents.view(*images.shape[:2], *latents.shape[1:]).cpu().to(torch.float16).numpy()
            n_images += 2 * len(latents)
            # in the boolean indexing's order
            for latent, (row, orientation) in zip(latents, zip(*np.nonzero(wanted))):
                caches[group[row]].store(index[row], orientation, latent)
            if time.monotonic() - last_commit > args.precompute_commit_seconds:
                for cache in caches:
                    cache.commit()
                last_commit = time.monotonic()
    finally:  # interrupted (Ctrl-C, SIGTERM) or failed: what was encoded is kept, and the next run goes on from there
        progress.close()
        for cache in caches:
            cache.commit()
    seconds = time.monotonic() - started
    logger.info(
        f"Process {accelerator.process_index} encoded {n_images} images of {len(pixels.tasks)} source shards "
        f"in {seconds:.1f} s ({n_images / seconds:.1f} images/s)"
        + (f"; VAE batch {encoder.batch_size} after out-of-memory" if encoder.backed_off else ""),
        main_process_only=False,
    )
    del vae  # the caches' memmaps close with this function
    free_memory()


def fold_parts(cache_path):
    """Folds the masks that the processes of a machine saved for their parts into encoded.npy / undecodable.npy.
    A part is saved only after its latents reached the disk, so parts left by a killed run are folded in as well."""
    for name in ("encoded", "undecodable"):
        parts = sorted(cache_path.glob(f"{name}.part-*.npy"))
        if parts:
            save_atomically(
                cache_path / f"{name}.npy",
                np.logical_or.reduce([np.load(cache_path / f"{name}.npy"), *map(np.load, parts)]),
            )
            for part in parts:
                part.unlink()


def damaged_cache_file(file, reason):
    return InputError(
        f"the cache file {file} is damaged ({reason}); delete the folder {file.parent} and run again to rebuild it"
    )


def check_cache_files(cache_path):
    """Opens every array of an existing cache folder and checks that their shapes agree, so that a damaged file (a
    truncated copy, a disk that filled up) stops the run here, before any encoding or training, in one line."""
    arrays = {}
    part_names = [part.name[: -len(".npy")] for part in sorted(cache_path.glob("*.part-*.npy"))]
    for name in [*CACHE_ARRAYS, *part_names]:
        file = cache_path / f"{name}.npy"
        try:
            arrays[name] = np.load(file, mmap_mode="r")
        except Exception as error:  # numpy raises ValueError, OSError, EOFError... for a damaged file
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise damaged_cache_file(file, f"{type(error).__name__}: {reason}" if reason else type(error).__name__)
    if arrays["encoded"].ndim != 2:
        raise damaged_cache_file(cache_path / "encoded.npy", f"shape {arrays['encoded'].shape}")
    n_pairs, n_orientations = arrays["encoded"].shape
    n_captions = len(arrays["prompt_embeds"])
    leading_dims = {  # what each array's shape must start with
        "encoded": (n_pairs, n_orientations),
        "undecodable": (n_pairs,),
        "caption_index": (n_pairs,),
        "pair_latents": (n_pairs, n_orientations, 2),
        "pooled_prompt_embeds": (n_captions,),
    }
    for name, array in arrays.items():
        expected = leading_dims.get(name.split(".")[0], ())
        if array.shape[: len(expected)] != expected:
            raise damaged_cache_file(cache_path / f"{name}.npy", f"shape {array.shape}, expected {expected} first")
    caption_index = np.asarray(arrays["caption_index"])
    if n_pairs and not 0 <= caption_index.min() <= caption_index.max() < n_captions:
        raise damaged_cache_file(cache_path / "caption_index.npy", f"rows outside the {n_captions} embeddings")


def remove_leftover_partials(args, planned_caches):
    """Removes what runs killed while writing (SIGKILL; SIGBUS on a full disk) left under temporary names: cache
    folders and their mask files are written only under the precompute lock, which this process holds."""
    leftovers = [p for p in cache_root(args).glob(".*.partial-*") if p.is_dir()]
    for planned in planned_caches:
        leftovers += planned.path.glob(".*.partial-*") if planned.path.is_dir() else []
    for leftover in leftovers:
        logger.info(f"Removing {leftover}, left by an interrupted run")
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def plan_cache(args, request, encode_dtype):
    """The PlannedCache of a CacheRequest."""
    address = precompute_cache_path(args, request.source_pairs, encode_dtype)
    needed = latents_read(len(request.source_pairs), args, request.epochs)
    return PlannedCache(request.source_pairs, address.path, address.key_fields, needed)


def load_or_precompute(args, requests, accelerator, encode_dtype):
    """The CachedPreferencePairs of each CacheRequest in `requests`, precomputing what their caches lack.

    The local main process of each machine creates missing caches (text embeddings); then every process of the
    machine encodes its share of the missing latents (its own source shards, on its own GPU). A file lock makes runs
    that share a cache folder (other machines on a shared disk, other jobs) take turns instead of encoding twice;
    inside it only the machine's own processes synchronise, so machines never wait for each other under it.
    """
    planned_caches = [plan_cache(args, request, encode_dtype) for request in requests]
    per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    machine = None
    if accelerator.num_processes > 1:  # a process group of this machine's processes (every process takes part)
        machine, _ = torch.distributed.new_subgroups(group_size=per_machine)
    lock = FileLock(cache_root(args) / ".precompute.lock")
    try:
        if accelerator.is_local_main_process:
            cache_root(args).mkdir(parents=True, exist_ok=True)
            try:
                lock.acquire(timeout=0)
            except Timeout:  # another run holds it: say why nothing happens, then take turns as always
                logger.info(
                    f"Waiting for the cache lock {lock.lock_file}: another run is precomputing into "
                    f"{cache_root(args)}",
                    main_process_only=False,
                )
                lock.acquire()
            remove_leftover_partials(args, planned_caches)
            for planned in planned_caches:
                if planned.path.exists():
                    check_cache_files(planned.path)
                    fold_parts(planned.path)
            check_free_space(args, planned_caches)
            create_missing_caches(args, planned_caches, accelerator, encode_dtype)
        if machine is not None:
            torch.distributed.barrier(group=machine)
        encode_latents(args, planned_caches, accelerator, encode_dtype, accelerator.local_process_index, per_machine)
        if machine is not None:
            torch.distributed.barrier(group=machine)
        if accelerator.is_local_main_process:
            for planned in planned_caches:
                fold_parts(planned.path)
                undecodable = np.load(planned.path / "undecodable.npy")
                if undecodable.any():
                    logger.warning(
                        f"Cache {planned.path.name}: skipping {int(undecodable.sum())} of {len(undecodable)} "
                        "pairs with an undecodable image."
                    )
    finally:
        if lock.is_locked:
            lock.release()
    accelerator.wait_for_everyone()
    if machine is not None:
        torch.distributed.destroy_process_group(machine)
    return [CachedPreferencePairs(planned.path, planned.needed) for planned in planned_caches]


class CachedPreferencePairs(torch.utils.data.Dataset):
    """Reads precomputed pairs from the memory-mapped cache; keys are (pair index, orientation, drop caption).

    The pairs are those with every latent in `needed` encoded (None: any) and both images decodable.
    """

    def __init__(self, cache_path, needed=None):
        self.cache_path = Path(cache_path)
        self.encoded = np.load(self.cache_path / "encoded.npy")
        usable = ~np.load(self.cache_path / "undecodable.npy")
        usable &= self.encoded.any(axis=1) if needed is None else (self.encoded | ~needed).all(axis=1)
        self.valid_indices = np.flatnonzero(usable)
        self.num_pairs, self.num_orientations = self.encoded.shape
        self._arrays = None  # opened lazily, once per DataLoader worker

    def __len__(self):
        return len(self.valid_indices)

    def __getitem__(self, key):
        if self._arrays is None:
            self._arrays = {
                name: np.load(self.cache_path / f"{name}.npy", mmap_mode="r")
                for name in ("pair_latents", "caption_index", "prompt_embeds", "pooled_prompt_embeds")
            }
        index, orientation, drop_caption = key
        if not self.encoded[index, orientation]:  # never read the zeros of a latent that was not encoded
            raise RuntimeError(f"pair {index} orientation {orientation} is not in the cache {self.cache_path}")
        caption_row = 0 if drop_caption else int(self._arrays["caption_index"][index])
        return {
            "pair_latents": torch.from_numpy(np.array(self._arrays["pair_latents"][index, orientation])),
            "prompt_embeds": torch.from_numpy(np.array(self._arrays["prompt_embeds"][caption_row])),
            "pooled_prompt_embeds": torch.from_numpy(np.array(self._arrays["pooled_prompt_embeds"][caption_row])),
        }


class PairSampler(torch.utils.data.Sampler):
    """Shuffles the pairs every epoch and draws each pair's flip and caption dropout from (seed, epoch) alone.

    Keeping every data-side random choice here (not in workers or global RNG state) makes the data order of a
    resumed run identical to an uninterrupted one.
    """

    def __init__(self, cached, seed, proportion_empty_prompts):
        self.cached = cached
        self.seed = seed
        self.proportion_empty_prompts = proportion_empty_prompts
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.cached)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.cached))
        drop_caption = rng.random(len(order)) < self.proportion_empty_prompts
        orientations = drawn_orientations(self.cached.num_pairs, self.cached.num_orientations, self.seed, self.epoch)
        for position, pair in enumerate(order):
            index = int(self.cached.valid_indices[pair])
            yield index, int(orientations[index]), bool(drop_caption[position])


def steps_per_epoch(args, n_pairs, num_processes):
    """Optimizer steps in one epoch over `n_pairs` pairs, batched as accelerate's prepared loader batches them."""
    return math.ceil(math.ceil(n_pairs / args.train_batch_size / num_processes) / args.gradient_accumulation_steps)


def planned_epochs(args, n_pairs, num_processes):
    """Epochs a run over `n_pairs` pairs covers (the count the training loop arrives at)."""
    if args.max_train_steps is None:
        return args.num_train_epochs
    return math.ceil(args.max_train_steps / steps_per_epoch(args, n_pairs, num_processes))


# ----------------------------------------------------------------------------------------------------------------
# 4. The transformer: LoRA (reference = adapter off) or full fine-tuning (reference = frozen copy)
# ----------------------------------------------------------------------------------------------------------------


def load_transformer(args, dtype=None):
    return SD3Transformer2DModel.from_pretrained(
        args.pretrained_model_name_or_path,
        subfolder="transformer",
        revision=args.revision,
        variant=args.variant,
        cache_dir=args.cache_dir,
        torch_dtype=dtype,
    )


def lora_target_modules(args):
    return [name.strip() for name in args.lora_target_modules.split(",") if name.strip()]


def build_transformers(args, device, weight_dtype):
    """Returns (trained transformer, reference transformer or None). With LoRA the reference is the trained
    transformer itself."""
    reference = None
    if args.train_mode == "lora":
        transformer = load_transformer(args, weight_dtype).to(device)
        transformer.requires_grad_(False)  # freeze the base before adding the adapter: only LoRA weights train
        try:
            transformer.add_adapter(
                LoraConfig(
                    r=args.rank,
                    lora_alpha=args.rank,
                    init_lora_weights="gaussian",
                    target_modules=lora_target_modules(args),
                )
            )
        except ValueError as error:  # PEFT: "Target modules {...} not found in the base model"
            raise InputError(f"--lora_target_modules: {str(error).splitlines()[0]}") from None
        cast_training_params(transformer, dtype=torch.float32)  # trainable weights stay fp32 under mixed precision
    else:
        transformer = load_transformer(args).to(device).requires_grad_(True)
        if loads_reference(args):
            # fp32 like the trained copy, run under the same autocast: in half-precision weights the transformer's
            # RMS qk-norm and modulations compute in another dtype, which beta = 5000 turns into a step-1 loss
            # off ln 2 (0.49 measured on the tiny model in bf16)
            reference = load_transformer(args).to(device).eval().requires_grad_(False)
            reference.autocast_dtype = weight_dtype
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    if args.torch_compile:
        for model in filter(None, (transformer, reference)):
            for block in model.transformer_blocks:  # in place: parameter names, hooks and saving are unchanged
                block.compile()
    return transformer, reference


def loads_reference(args):
    """Whether the run needs a reference model: DPO does; SFT only to report held-out implicit accuracy; MaPO never
    (it is reference-free: no frozen copy, and a LoRA's adapter is never switched off)."""
    if args.loss_type == "mapo":
        return False
    return not args.sft or has_validation_pairs(args)


@contextlib.contextmanager
def lora_disabled(transformer):
    """The LoRA reference model: the same transformer with its adapter off.

    PEFT's disable also clears requires_grad on the LoRA weights and enable sets it again, so the adapter is
    re-enabled even if the forward raises; otherwise training would silently stop updating anything.
    """
    transformer.disable_adapters()
    try:
        yield transformer
    finally:
        transformer.enable_adapters()


# ----------------------------------------------------------------------------------------------------------------
# 5. The loss
# ----------------------------------------------------------------------------------------------------------------


def implicit_reward_margin(model_err_w, model_err_l, ref_err_w, ref_err_l, beta):
    """inside = -0.5 * beta * ((err_theta(w) - err_theta(l)) - (err_ref(w) - err_ref(l))), per pair."""
    model_diff = model_err_w - model_err_l
    ref_diff = ref_err_w - ref_err_l
    return -0.5 * beta * (model_diff - ref_diff)


def implicit_accuracy(inside):
    """The fraction of pairs whose implicit reward margin `inside` favours the winner; exact ties (inside == 0, e.g.
    while the model equals the reference) count half."""
    return ((inside > 0).float() + 0.5 * (inside == 0).float()).mean()


def dpo_loss(model_err_w, model_err_l, ref_err_w, ref_err_l, beta, loss_type="sigmoid", label_smoothing=0.0):
    """Diffusion-DPO loss from four per-sample denoising errors (MSE averaged over latent dims).

    inside = -0.5 * beta * ((err_theta(w) - err_theta(l)) - (err_ref(w) - err_ref(l)));
    sigmoid (the paper): -logsigmoid(inside); hinge: relu(1 - inside); ipo: (inside / beta - 1 / (2 beta))^2.
    label_smoothing eps (sigmoid only) is conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences";
    TRL's `label_smoothing`): each label is assumed flipped with probability eps, so the loss is the expected one,
    -(1 - eps) * logsigmoid(inside) - eps * logsigmoid(-inside); eps = 0 is the paper's loss exactly.
    `inside` is the implicit reward margin of winner over loser; implicit accuracy is the fraction with inside > 0,
    exact ties (inside == 0, e.g. while the model equals the reference) counting half, in training logs and held-out
    metrics alike.
    """
    inside = implicit_reward_margin(model_err_w, model_err_l, ref_err_w, ref_err_l, beta)
    if loss_type == "sigmoid":
        losses = -(1.0 - label_smoothing) * F.logsigmoid(inside) - label_smoothing * F.logsigmoid(-inside)
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - inside)
    elif loss_type == "ipo":
        losses = (inside / beta - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    metrics = {
        "implicit_acc": implicit_accuracy(inside),
        "reward_margin": inside.mean(),
        "model_mse_w": model_err_w.mean(),
        "model_mse_l": model_err_l.mean(),
        "ref_mse_w": ref_err_w.mean(),
        "ref_mse_l": ref_err_l.mean(),
    }
    return losses.mean(), {name: value.detach() for name, value in metrics.items()}


def mapo_loss(model_err_w, model_err_l, beta_mapo, num_train_timesteps, snr_value=MAPO_SNR_VALUE):
    """MaPO loss (margin-aware preference optimization, Hong et al. 2024, arXiv 2406.06424) from the trained model's
    per-sample denoising errors alone: reference-free.

    As the reference code computes it (mapo-t2i/mapo, utils.py `compute_loss`), with s = snr_value = 0.5 and
    T = num_train_timesteps (1000):
        log_odds = s * err(w) / (exp(s * err(w)) - 1) - s * err(l) / (exp(s * err(l)) - 1)   (> 0 when err(w) < err(l))
        margin_loss = -logsigmoid(T * log_odds)   (T scales the margin up over the whole denoising process)
        loss = mean(err(w)) + beta_mapo * mean(margin_loss)
    i.e. the SFT loss on the preferred images plus the margin term; beta_mapo (the code's `beta_mapo`, default 0.1)
    weighs the margin term and sits outside the sigmoid, unlike DPO's beta. Metrics: the policy's own preference,
    policy_margin = mean(err(l) - err(w)) and policy_acc (fraction with err(w) < err(l), ties half); no implicit
    accuracy, which needs a reference.

    SD3: MaPO was published for epsilon-prediction (SDXL); this carries its formula unchanged to rectified flow, with
    err the per-sample velocity error as weighted by --weighting_scheme (so the SFT term is SD3's own flow-matching
    loss) and T = the flow scheduler's num_train_timesteps (1000, as in SDXL). The beta_mapo convention still fits in
    form (a weight on the margin term, outside the sigmoid); its value is the code's default carried over, not tuned
    for SD3: velocity errors are of the same order as epsilon errors (docs/sd3.md), so 0.1 is a start, not an optimum.
    """

    def score(err):  # s * err / (exp(s * err) - 1): 1 at err = 0, falling with the error
        scaled = snr_value * err
        return scaled / torch.expm1(scaled)

    log_odds = score(model_err_w) - score(model_err_l)
    margin_losses = -F.logsigmoid(num_train_timesteps * log_odds)
    loss = model_err_w.mean() + beta_mapo * margin_losses.mean()
    metrics = {
        "policy_acc": implicit_accuracy(model_err_l - model_err_w),
        "policy_margin": (model_err_l - model_err_w).mean(),
        "margin_loss": margin_losses.mean(),
        "model_mse_w": model_err_w.mean(),
        "model_mse_l": model_err_l.mean(),
    }
    return loss, {name: value.detach() for name, value in metrics.items()}


@contextlib.contextmanager
def reference_model(transformer, reference):
    """The model that gives reference predictions: the frozen copy, run under the autocast the trained transformer
    runs in (so step 1 gives ln 2 under mixed precision too), or the LoRA transformer itself with its adapter off."""
    if reference is not None:
        dtype = reference.autocast_dtype
        with torch.autocast(reference.device.type, dtype=dtype, enabled=dtype != torch.float32):
            yield reference
    else:
        base = transformer.module if hasattr(transformer, "module") else transformer  # bypass DDP: no gradients here
        with lora_disabled(base):
            yield base


def noisy_latents_and_target(latents, noise, sigmas):
    """Rectified flow: the point at noise level sigma on the straight line from the image to the noise, and the
    velocity along it, which SD3 predicts."""
    sigmas = sigmas.view(-1, *[1] * (latents.ndim - 1)).to(latents.dtype)
    return (1.0 - sigmas) * latents + sigmas * noise, noise - latents


def transformer_conditioning(batch, device, stacked=True):
    """The transformer's text inputs, for the stacked (winners; losers) batch, or for the winners alone."""
    prompt_embeds = batch["prompt_embeds"].to(device, torch.float32, non_blocking=True)
    pooled_prompt_embeds = batch["pooled_prompt_embeds"].to(device, torch.float32, non_blocking=True)
    if stacked:
        prompt_embeds, pooled_prompt_embeds = prompt_embeds.repeat(2, 1, 1), pooled_prompt_embeds.repeat(2, 1)
    return {"encoder_hidden_states": prompt_embeds, "pooled_projections": pooled_prompt_embeds}


def sample_sigmas(n, noise_scheduler, args, generator, device):
    """n noise levels and their timesteps, drawn as diffusers' SD3 DreamBooth script draws them: u from
    --weighting_scheme's density, then the scheduler's (shifted) sigma at index u * num_train_timesteps."""
    u = compute_density_for_timestep_sampling(
        weighting_scheme=args.weighting_scheme,
        batch_size=n,
        logit_mean=args.logit_mean,
        logit_std=args.logit_std,
        mode_scale=args.mode_scale,
        device=device,
        generator=generator,
    )
    # the mode density reaches u = 1 (index num_train_timesteps, one past the end): clamped
    indices = (u.cpu() * noise_scheduler.config.num_train_timesteps).long()
    indices = indices.clamp(0, len(noise_scheduler.timesteps) - 1)
    return noise_scheduler.sigmas[indices].to(device), noise_scheduler.timesteps[indices].to(device)


def denoising_errors(transformer, noisy_latents, timesteps, conditioning, target, weighting):
    """Per-sample MSE of the transformer's velocity prediction, weighted by --weighting_scheme and averaged over
    latent dims, in fp32."""
    prediction = transformer(hidden_states=noisy_latents, timestep=timesteps, **conditioning, return_dict=False)[0]
    errors = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return weighting.float() * errors


def step_seed(*parts):
    """A 63-bit seed mixed from the run seed, rank and position, so noise needs no RNG state to resume."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def compute_loss(batch, transformer, reference, noise_scheduler, args, generator):
    """One forward of the trained transformer on the stacked (winners; losers) batch, one of the reference, the loss.

    `reference` is None for LoRA (the adapter is switched off instead) and unused with --sft; --loss_type mapo runs
    no reference forward at all.
    """
    pair_latents = batch["pair_latents"].to(transformer.device, torch.float32, non_blocking=True)
    winners, losers = pair_latents[:, 0], pair_latents[:, 1]
    conditioning = transformer_conditioning(batch, transformer.device, stacked=not args.sft)
    # One noise and one noise level per pair, shared by its two images: DPO compares their errors on the same
    # corruption.
    noise = torch.randn(winners.shape, generator=generator, device=winners.device)
    sigmas, timesteps = sample_sigmas(len(winners), noise_scheduler, args, generator, winners.device)
    if args.sft:
        latents = winners
    else:
        latents, noise = torch.cat([winners, losers]), noise.repeat(2, 1, 1, 1)
        sigmas, timesteps = sigmas.repeat(2), timesteps.repeat(2)
    noisy_latents, target = noisy_latents_and_target(latents, noise, sigmas)
    weighting = compute_loss_weighting_for_sd3(args.weighting_scheme, sigmas)

    model_err = denoising_errors(transformer, noisy_latents, timesteps, conditioning, target, weighting)
    if args.sft:
        return model_err.mean(), {"model_mse_w": model_err.detach().mean()}

    model_err_w, model_err_l = model_err.chunk(2)
    if args.loss_type == "mapo":
        return mapo_loss(model_err_w, model_err_l, args.beta_mapo, noise_scheduler.config.num_train_timesteps)

    with torch.inference_mode(), reference_model(transformer, reference) as model:
        ref_err = denoising_errors(model, noisy_latents, timesteps, conditioning, target, weighting)
    ref_err = ref_err.clone()  # an ordinary tensor again, usable next to the graph
    ref_err_w, ref_err_l = ref_err.chunk(2)
    return dpo_loss(
        model_err_w, model_err_l, ref_err_w, ref_err_l, args.beta_dpo, args.loss_type, args.label_smoothing
    )


@torch.no_grad()
def held_out_errors(model, cached, indices, noise_scheduler, args, batch_size):
    """Errors of `model` on the winners and losers of the given held-out pairs (indices into `cached`), each averaged
    over --validation_timesteps (noise level, noise) draws fixed by (seed, pair, k): the same weights give the same
    numbers. Returns a (2, pairs) tensor: winners' errors, losers' errors."""
    errors = []
    for start in range(0, len(indices), batch_size):
        chunk = [int(i) for i in indices[start : start + batch_size]]
        # outside the reference's autocast: CPU autocast refuses to stack the cache's float16 tensors
        with torch.autocast(model.device.type, enabled=False):
            batch = torch.utils.data.default_collate([cached[(index, 0, False)] for index in chunk])
        pair_latents = batch["pair_latents"].to(model.device, torch.float32)
        latents = torch.cat([pair_latents[:, 0], pair_latents[:, 1]])
        conditioning = transformer_conditioning(batch, model.device)
        total = torch.zeros(len(latents), device=model.device)
        for k in range(args.validation_timesteps):
            generators = [torch.Generator().manual_seed(step_seed(args.seed, index, k)) for index in chunk]
            noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in generators])
            drawn = [sample_sigmas(1, noise_scheduler, args, g, "cpu") for g in generators]
            sigmas = torch.cat([sigma for sigma, _ in drawn]).to(model.device).repeat(2)
            timesteps = torch.cat([timestep for _, timestep in drawn]).to(model.device).repeat(2)
            noisy_latents, target = noisy_latents_and_target(
                latents, noise.to(model.device).repeat(2, 1, 1, 1), sigmas
            )
            weighting = compute_loss_weighting_for_sd3(args.weighting_scheme, sigmas)
            total += denoising_errors(model, noisy_latents, timesteps, conditioning, target, weighting)
        errors.append((total / args.validation_timesteps).view(2, -1))
    return torch.cat(errors, dim=1) if errors else torch.empty(2, 0, device=model.device)  # a rank may get no pairs


def gathered_errors(errors):
    """Every process's (k, pairs) errors, gathered in rank order (a few floats per pair): (k, all pairs) on each."""
    rows = [row for rank_rows in gather_object([errors.T.tolist()]) for row in rank_rows]
    return torch.tensor(rows).reshape(-1, len(errors)).T


def evaluate_held_out(
    accelerator, transformer, reference, held_out_pairs, noise_scheduler, args, reference_errors=None
):
    """The run's loss and what it means on the held-out pairs (CachedPreferencePairs), split across processes: for
    DPO (and SFT) dpo_loss's metrics, implicit accuracy and reward margin against the reference; for MaPO, which has no
    reference, mapo_loss's: the policy's own policy_margin and policy_acc, and no reference errors are computed.

    The reference's errors never change, so they are returned and passed back in on the next call (None for MaPO).
    """
    indices = held_out_pairs.valid_indices[accelerator.process_index :: accelerator.num_processes]
    batch_size = 2 * args.train_batch_size  # no activations are kept for backward
    model = accelerator.unwrap_model(transformer)
    model_errors = held_out_errors(model, held_out_pairs, indices, noise_scheduler, args, batch_size)
    if args.loss_type == "mapo":
        model_err_w, model_err_l = gathered_errors(model_errors)
        num_train_timesteps = noise_scheduler.config.num_train_timesteps
        loss, metrics = mapo_loss(model_err_w, model_err_l, args.beta_mapo, num_train_timesteps)
        return {f"eval/{name}": value.item() for name, value in {"loss": loss, **metrics}.items()}, None
    if reference_errors is None:
        with reference_model(model, reference) as ref:
            reference_errors = held_out_errors(ref, held_out_pairs, indices, noise_scheduler, args, batch_size)
    model_err_w, model_err_l, ref_err_w, ref_err_l = gathered_errors(torch.cat([model_errors, reference_errors]))
    loss, metrics = dpo_loss(
        model_err_w, model_err_l, ref_err_w, ref_err_l, args.beta_dpo, args.loss_type, args.label_smoothing
    )
    return {f"eval/{name}": value.item() for name, value in {"loss": loss, **metrics}.items()}, reference_errors


class HeldOutEvaluation:
    """Held-out preference metrics during training (nothing without held-out pairs): logged as eval/... to the
    trackers, the log and the progress bar, and kept in `evaluations`. Keeps the reference's errors, which never
    change."""

    def __init__(self, accelerator, reference, held_out_pairs, noise_scheduler, args, progress):
        self.accelerator = accelerator
        self.reference = reference
        self.held_out_pairs = held_out_pairs
        self.noise_scheduler = noise_scheduler
        self.args = args
        self.progress = progress
        self.reference_errors = None
        self.evaluations = []

    def __call__(self, transformer, global_step):
        if self.held_out_pairs is None:
            return
        metrics, self.reference_errors = evaluate_held_out(
            self.accelerator,
            transformer,
            self.reference,
            self.held_out_pairs,
            self.noise_scheduler,
            self.args,
            self.reference_errors,
        )
        self.evaluations.append({"step": global_step, **metrics})
        self.accelerator.log(metrics, step=global_step)
        logger.info(f"Held-out pairs at step {global_step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        accuracy = metrics.get("eval/implicit_acc", metrics.get("eval/policy_acc"))  # policy_acc: MaPO
        self.progress.show(eval_acc=f"{accuracy:.3f}")


# ----------------------------------------------------------------------------------------------------------------
# 6. Saving: checkpoints, final weights, validation images, model card, Hub
# ----------------------------------------------------------------------------------------------------------------


def lora_layers(transformer):
    """The LoRA weights in PEFT naming, as diffusers' SD3 training scripts save them (load_lora_weights reads it;
    the older diffusers naming covers only the to_* projections, not the add_* ones)."""
    return get_peft_model_state_dict(transformer)


def size_text(n_bytes):
    return f"{n_bytes / 2**20:.1f} MiB"


def current_umask():
    """The process umask, read without changing it where Linux allows (os.umask can only set it)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def give_usual_file_modes(folder):
    """safetensors files are written through a temporary file, created 0600: give every file saved under `folder` the
    mode a plain write gives (0644 under umask 022), so others who may read the output folder can read the weights."""
    mode = 0o666 & ~current_umask()
    for root, _, files in os.walk(folder):
        for name in files:
            os.chmod(os.path.join(root, name), mode)


def folder_files(folder):
    """{path relative to `folder`: size in bytes} of every file under it."""
    return {
        os.path.relpath(os.path.join(root, name), folder): os.path.getsize(os.path.join(root, name))
        for root, _, files in os.walk(folder)
        for name in files
    }


def data_order(args, num_processes, source_pairs=None, cached=None):
    """What decides which batches step N reads: a resumed run must agree with its checkpoint on all of it, or it
    would skip other batches than those already trained on. Flags first, so a mismatch names the flag to fix; the
    pairs themselves only once they are known (without them: the flags alone, checked before the precompute)."""
    order = {
        "--train_batch_size": args.train_batch_size,
        "--gradient_accumulation_steps": args.gradient_accumulation_steps,
        "number of processes": num_processes,
        "--seed": args.seed,
        "--no_hflip": args.no_hflip,
        "--proportion_empty_prompts": args.proportion_empty_prompts,
        "--dataset_name": os.path.abspath(args.dataset_name)
        if os.path.exists(args.dataset_name)
        else args.dataset_name,
        "--dataset_config_name": args.dataset_config_name,
        "--dataset_split_name": args.dataset_split_name,
        "--max_train_samples": args.max_train_samples,
        "--validation_split_name": args.validation_split_name,
        "--num_validation_pairs": args.num_validation_pairs,
    }
    if cached is not None:  # the pairs themselves (source files, rows, which decoded): a dataset changed in place
        usable = hashlib.sha256(source_pairs.fingerprint.encode())
        usable.update(np.asarray(cached.valid_indices, dtype=np.int64).tobytes())
        order["training pairs"] = f"{len(cached)} usable, fingerprint {usable.hexdigest()[:16]}"
    return order


def write_checkpoint_record(folder, args, global_step):
    record = {
        "format": CHECKPOINT_RECORD_FORMAT,
        "step": global_step,
        "train_mode": args.train_mode,
        "data_order": getattr(args, "data_order", None),
        "files": folder_files(folder),
    }
    with open(os.path.join(folder, CHECKPOINT_RECORD_NAME), "w") as file:
        json.dump(record, file, indent=2)


def checkpoint_record(checkpoint):
    """The record a checkpoint was written with, or None for a checkpoint written before records existed."""
    path = os.path.join(checkpoint, CHECKPOINT_RECORD_NAME)
    if not os.path.exists(path):
        return None
    with open(path) as file:
        return json.load(file)


def refuse_other_train_mode(checkpoint, written_by, args):
    if written_by is not None and written_by != args.train_mode:
        raise InputError(
            f"checkpoint {checkpoint} was not written by a --train_mode {args.train_mode} run (it holds a "
            f"--train_mode {written_by} run's state)"
        )


def checkpoint_damage(checkpoint, args):
    """What is wrong with a checkpoint folder (a missing, truncated or unreadable file), or None when it is intact.
    Reads file sizes and headers only. Raises InputError for an intact checkpoint of the other --train_mode."""
    try:
        record = checkpoint_record(checkpoint)
        files = None if record is None else dict(record["files"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"its {CHECKPOINT_RECORD_NAME} is unreadable ({type(error).__name__}: {error})"
    if files is not None:
        refuse_other_train_mode(checkpoint, record.get("train_mode"), args)
        for name, size in files.items():
            path = os.path.join(checkpoint, name)
            if not os.path.isfile(path):
                return f"{name} is missing"
            if os.path.getsize(path) != size:
                return f"{name} has {os.path.getsize(path)} bytes, {size} were written (truncated or overwritten)"
        return None
    # A checkpoint from before records: the files resume reads must be there and open.
    has_lora, has_full = (os.path.exists(os.path.join(checkpoint, n)) for n in (LORA_WEIGHT_NAME, "transformer"))
    if has_lora != has_full:
        refuse_other_train_mode(checkpoint, "lora" if has_lora else "full", args)
    weights = [LORA_WEIGHT_NAME] if args.train_mode == "lora" else ["transformer/config.json"]
    full_folder = os.path.join(checkpoint, "transformer")
    if args.train_mode == "full" and os.path.isdir(full_folder):
        weights += [f"transformer/{n}" for n in sorted(os.listdir(full_folder)) if "safetensors" in n]
    for name in [*weights, "optimizer.bin", "scheduler.bin"]:
        path = os.path.join(checkpoint, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        try:
            if name.endswith(".safetensors"):
                with safe_open(path, framework="pt"):
                    pass
            elif name.endswith(".bin"):
                zipfile.ZipFile(path).close()  # torch.save writes a zip archive; its directory is at the end
        except Exception as error:  # safetensors and zipfile raise their own types; all mean "unreadable"
            return f"{name} is unreadable ({str(error).strip().splitlines()[0] if str(error).strip() else error!r})"
    return None


def checkpoint_to_resume(args):
    """The checkpoint folder to resume from, or None when there is none. `latest` passes over damaged checkpoints
    (newest first) with a warning naming what is wrong; a damaged checkpoint named explicitly is refused."""
    if args.resume_from_checkpoint != "latest":
        checkpoint = resolve_checkpoint(args)
        if checkpoint is not None and (damage := checkpoint_damage(checkpoint, args)):
            raise InputError(f"cannot resume from damaged checkpoint {checkpoint}: {damage}")
        return checkpoint
    damaged = []
    for checkpoint in reversed(complete_checkpoints(args.output_dir)):
        damage = checkpoint_damage(checkpoint, args)
        if damage is None:
            if damaged:
                logger.warning(f"Passed over damaged checkpoints ({'; '.join(damaged)}); resuming from {checkpoint}.")
            return checkpoint
        damaged.append(f"{checkpoint}: {damage}")
    if damaged:
        raise InputError(f"no intact checkpoint in {args.output_dir} to resume from ({'; '.join(damaged)})")
    return None


def check_data_order(checkpoint, record, expected, warn=True):
    """Refuses to resume with anything that moves the data position (see data_order) changed."""
    recorded = None if record is None else record.get("data_order")
    if recorded is None and warn:
        logger.warning(
            f"{checkpoint} does not record its data order (an older checkpoint): the data position cannot be checked; "
            "resume with the same batch size, accumulation, processes, data, --seed and flips as the run that wrote it"
        )
        return
    for name, value in expected.items():
        if recorded is not None and name in recorded and recorded[name] != value:
            raise InputError(
                f"cannot resume from {checkpoint}: it was written with {name} {recorded[name]}, this run has "
                f"{value}; the resumed run would skip other batches than those trained on (resume with the same "
                "value, or start a new --output_dir)"
            )


def check_resume_flags(args, num_processes):
    """Refuses a resume with a changed data flag before the precompute (hours on a large dataset) instead of after
    it; resume checks the pairs themselves, and warns about a checkpoint without a record."""
    if args.resume_from_checkpoint is None:
        return
    checkpoint = checkpoint_to_resume(args)
    if checkpoint is not None:
        check_data_order(checkpoint, checkpoint_record(checkpoint), data_order(args, num_processes), warn=False)


def trained_parameters(accelerator):
    return [p for model in accelerator._models for p in model.parameters() if p.requires_grad]


def weights_finite(params):
    """Whether every trained weight is finite (each process holds the same weights, so all decide alike)."""
    with torch.no_grad():
        return all(bool(torch.isfinite(p).all()) for p in params)


def last_checkpoint_note(args):
    checkpoints = complete_checkpoints(args.output_dir)
    if not checkpoints:
        return "no checkpoint was written"
    step = CHECKPOINT_PATTERN.match(Path(checkpoints[-1]).name).group(1)
    return f"the last checkpoint, {checkpoints[-1]}, still holds the weights of step {step}"


def checkpoint_bytes_needed(args, params):
    """About what the next checkpoint takes: the last one's size, or without one the trained weights x 3 (the weights
    and AdamW's two moments), plus room for the small files."""
    checkpoints = complete_checkpoints(args.output_dir)
    if checkpoints:
        return sum(folder_files(checkpoints[-1]).values())
    return 3 * sum(p.numel() * p.element_size() for p in params) + 2**16


def write_into_output_dir(args, write, bytes_needed, global_step):
    """Runs write(folder) on a hidden folder inside --output_dir, then moves what it wrote in (model_index.json
    last), so a failed save never leaves a half-written weights file that looks finished. A full disk is one line
    naming the space needed and the checkpoint that still holds the weights."""
    partial = os.path.join(args.output_dir, ".result.partial")
    free = shutil.disk_usage(args.output_dir).free
    if free < bytes_needed:
        raise TrainingStopped(
            f"not enough space to save the result of step {global_step} in {args.output_dir}: about "
            f"{size_text(bytes_needed)} needed, {size_text(free)} free; {last_checkpoint_note(args)} "
            "(free space, then resume with --resume_from_checkpoint latest)"
        )
    try:
        if os.path.exists(partial):
            shutil.rmtree(partial)
        os.makedirs(partial)
        write(partial)
        give_usual_file_modes(partial)
        for name in sorted(os.listdir(partial), key=lambda name: name == "model_index.json"):
            target = os.path.join(args.output_dir, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            os.replace(os.path.join(partial, name), target)
        os.rmdir(partial)
    except WRITE_ERRORS as error:
        shutil.rmtree(partial, ignore_errors=True)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TrainingStopped(
            f"saving the result of step {global_step} to {args.output_dir} failed ({reason}); about "
            f"{size_text(bytes_needed)} needed, {size_text(shutil.disk_usage(args.output_dir).free)} free; nothing "
            f"half-written was left; {last_checkpoint_note(args)} (free space, then resume with "
            "--resume_from_checkpoint latest)"
        ) from None


def save_lora(transformer, directory):
    StableDiffusion3Pipeline.save_lora_weights(
        directory,
        transformer_lora_layers=lora_layers(transformer),
        weight_name=LORA_WEIGHT_NAME,
        transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict(),
    )


def load_lora_into(transformer, directory):
    state_dict = StableDiffusion3Pipeline.lora_state_dict(directory, weight_name=LORA_WEIGHT_NAME)
    state_dict = {k.removeprefix("transformer."): v for k, v in state_dict.items() if k.startswith("transformer.")}
    try:
        peft_state_dict = convert_unet_state_dict_to_peft(state_dict)
        result = set_peft_model_state_dict(transformer, peft_state_dict, adapter_name="default")
    except RuntimeError as error:  # shapes differ: another --rank or another model
        raise InputError(
            f"checkpoint {directory} does not match this model's LoRA layers ({str(error).splitlines()[-1].strip()})"
        ) from None
    if getattr(result, "unexpected_keys", None):
        raise InputError(f"checkpoint {directory} does not match this model's LoRA layers")


def register_checkpoint_hooks(accelerator, transformer, args):
    """accelerator.save_state writes the LoRA in diffusers format (loadable as is) or the full transformer folder."""
    transformer_class = type(accelerator.unwrap_model(transformer))

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                if isinstance(model, transformer_class):
                    if args.train_mode == "lora":
                        save_lora(model, output_dir)
                    else:
                        model.save_pretrained(os.path.join(output_dir, "transformer"))
        while weights:  # saved above; keep accelerate from writing the whole model again
            weights.pop()

    def load_hook(models, input_dir):
        expected = LORA_WEIGHT_NAME if args.train_mode == "lora" else "transformer"
        if not os.path.exists(os.path.join(input_dir, expected)):
            raise InputError(f"checkpoint {input_dir} was not written by a --train_mode {args.train_mode} run")
        while models:
            model = models.pop()
            if args.train_mode == "lora":
                load_lora_into(model, input_dir)
            else:
                model.load_state_dict(
                    transformer_class.from_pretrained(input_dir, subfolder="transformer").state_dict()
                )

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator, args, global_step):
    """Writes checkpoint-N atomically (a partial write never looks complete), then rotates old ones."""
    final = os.path.join(args.output_dir, f"checkpoint-{global_step}")
    partial = os.path.join(args.output_dir, f".checkpoint-{global_step}.partial")
    params = trained_parameters(accelerator)
    if not weights_finite(params):
        raise TrainingStopped(
            f"the weights of step {global_step} are not finite, so {final} was not written; "
            f"{last_checkpoint_note(args)}"
        )
    if accelerator.is_main_process and os.path.exists(partial):
        shutil.rmtree(partial)
    needed, free = checkpoint_bytes_needed(args, params), shutil.disk_usage(args.output_dir).free
    if free < needed:
        raise TrainingStopped(
            f"not enough space to write {final}: about {size_text(needed)} needed, {size_text(free)} free; "
            f"{last_checkpoint_note(args)}"
        )
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(partial)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_checkpoint_record(partial, args, global_step)  # last: it lists every file the others wrote
            give_usual_file_modes(partial)
    except WRITE_ERRORS as error:  # a full disk: torch's writer says "enforce fail ... unexpected pos"
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TrainingStopped(
            f"writing {final} failed ({reason[:200]}); about {size_text(needed)} needed, "
            f"{size_text(shutil.disk_usage(args.output_dir).free)} free; {last_checkpoint_note(args)}"
        ) from None
    if accelerator.is_main_process:
        if os.path.exists(final):  # a rerun of the same step after a resume: replace it
            shutil.rmtree(final)
        os.replace(partial, final)
        if args.checkpoints_total_limit is not None:
            for old in complete_checkpoints(args.output_dir)[: -args.checkpoints_total_limit]:
                logger.info(f"Removing old checkpoint {old}")
                doomed = os.path.join(args.output_dir, f".{os.path.basename(old)}.deleting")
                os.replace(old, doomed)  # renamed first: a half-deleted folder never looks like a checkpoint
                shutil.rmtree(doomed)
        logger.info(f"Saved checkpoint {final}")
    accelerator.wait_for_everyone()


@torch.no_grad()
def decode_outside_autocast(pipeline, latents):
    """PIL images from the SD3 pipeline's latents, decoded as the pipeline decodes them but with autocast off: under
    fp16 autocast an fp32 VAE's convolutions would run in half precision, which a VAE marked force_upcast is not
    safe in."""
    vae = pipeline.vae
    latents = latents.to(vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
    with torch.autocast(latents.device.type, enabled=False):
        image = vae.decode(latents, return_dict=False)[0]
    return pipeline.image_processor.postprocess(image, output_type="pil")


def load_pipeline(args, transformer, **components):
    """StableDiffusion3Pipeline around `transformer`, without T5 under --no_t5 (zeros in its place, as trained)."""
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


def run_validation(args, accelerator, transformer, reference, weight_dtype, global_step):
    """Renders --validation_prompts with fixed seeds, logs them and saves a PNG grid under output_dir/validation."""
    trained = accelerator.unwrap_model(transformer)
    # A VAE that is not fp16-safe (diffusers' signal: force_upcast in its config) decodes in fp32, outside autocast.
    fp16_safe_vae = not load_vae_config(args).get("force_upcast", True)
    pipeline = load_pipeline(
        args,
        trained,
        vae=load_vae(args, vae_dtype(args, weight_dtype)),
        torch_dtype=weight_dtype,
    ).to(accelerator.device)
    pipeline.set_progress_bar_config(disable=True)

    def render(pipeline):
        images = []
        for number, prompt in enumerate(args.validation_prompts):
            generator = torch.Generator(accelerator.device).manual_seed(args.seed + number)
            with accelerator.autocast():
                output = pipeline(
                    prompt,
                    num_inference_steps=args.num_validation_inference_steps,
                    guidance_scale=args.validation_guidance_scale,
                    generator=generator,
                    height=args.resolution,
                    width=args.resolution,
                    max_sequence_length=args.max_sequence_length,
                    output_type="pil" if fp16_safe_vae else "latent",
                ).images
            images.append(output[0] if fp16_safe_vae else decode_outside_autocast(pipeline, output)[0])
        return images

    out_dir = Path(args.output_dir, "validation")
    out_dir.mkdir(parents=True, exist_ok=True)
    reference_grid = out_dir / "reference.png"
    # the untuned model, same seeds, once, for comparison (not for SFT, nor MaPO: it switches no adapter off)
    if not reference_grid.exists() and not args.sft and args.loss_type != "mapo":
        if reference is None:
            with lora_disabled(trained):
                reference_images = render(pipeline)
        else:
            pipeline.transformer = reference
            reference_images = render(pipeline)
            pipeline.transformer = trained
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
    return f"Diffusion-DPO ({args.loss_type} loss, β = {args.beta_dpo:g}{smoothing})"


def method_link(args):
    if args.loss_type == "mapo":
        return "[MaPO](https://arxiv.org/abs/2406.06424) (Hong et al.)"
    return "[Diffusion-DPO](https://arxiv.org/abs/2311.12908) (Wallace et al.)"


def save_model_card(args, location, global_step):
    """Writes README.md (metadata + how to load) into output_dir; `location` is the Hub repo or the local folder."""
    lora = args.train_mode == "lora"
    without_t5 = ", text_encoder_3=None, tokenizer_3=None" if args.no_t5 else ""
    if lora:
        load = (
            f'pipeline = StableDiffusion3Pipeline.from_pretrained("{args.pretrained_model_name_or_path}"'
            f'{without_t5}, torch_dtype=torch.bfloat16).to("cuda")\npipeline.load_lora_weights("{location}")'
        )
    else:
        load = (
            f'pipeline = StableDiffusion3Pipeline.from_pretrained("{location}", torch_dtype=torch.bfloat16).to("cuda")'
        )
    t5_note = "\nTrained without T5 (its part of the prompt embedding zeros), so it is loaded without T5.\n"
    description = f"""
# {"LoRA" if lora else "Full"} {training_objective(args)} fine-tune of {args.pretrained_model_name_or_path}

Trained with {method_link(args)} in its rectified-flow form
({"velocity errors" if args.loss_type == "mapo" else "[Flow-DPO](https://arxiv.org/abs/2501.13918), velocity errors"})
on `{args.dataset_name}` (split
`{args.dataset_split_name}`) for {global_step} steps at {args.resolution}px:
{args.train_batch_size} pairs per device x {args.gradient_accumulation_steps} accumulation steps,
learning rate {args.learning_rate:g} ({args.lr_scheduler}){f", LoRA rank {args.rank}" if lora else ""},
noise levels drawn by `{args.weighting_scheme}`.
{t5_note if args.no_t5 else ""}
## How to use

```python
import torch
from diffusers import StableDiffusion3Pipeline

{load}
image = pipeline("a cozy cabin in a snowy forest at dusk").images[0]
```
"""
    data = ModelCardData(
        license="other",
        library_name="diffusers",
        base_model=args.pretrained_model_name_or_path,
        inference=True,
        datasets=None if os.path.exists(args.dataset_name) else [args.dataset_name],
    )
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{description}")
    tags = [
        "sd3",
        "sd3-diffusers",
        "text-to-image",
        "diffusers",
        "diffusers-training",
        "diffusion-dpo",
    ] + (["lora"] if lora else [])
    populate_model_card(card, tags=tags).save(os.path.join(args.output_dir, "README.md"))


def push_to_hub(args, repo_id):
    """Uploads the result; checkpoints and partial writes stay local."""
    return upload_folder(
        repo_id=repo_id,
        folder_path=args.output_dir,
        commit_message="End of Diffusion-DPO training",
        ignore_patterns=["checkpoint-*", ".checkpoint-*", "checkpoint-*/**", ".checkpoint-*/**", OUTPUT_DIR_LOCK_NAME],
        token=args.hub_token,
    )


# ----------------------------------------------------------------------------------------------------------------
# 7. main: load -> precompute -> train -> save, and the parts it is made of, in the order it calls them
# ----------------------------------------------------------------------------------------------------------------


class StopSignals:
    """SIGTERM and SIGINT (preemption, SLURM, Ctrl-C) for the run's lifetime; the previous handlers come back on exit.

    Before training (loading, precompute) a signal ends the run at once, as Ctrl-C does: an Interrupted (a
    KeyboardInterrupt, on which precompute commits its progress). During training the first signal only sets
    `requested`: the training loop folds it into the step's metric reduction, so that every process finishes the same
    optimizer step, writes a checkpoint and stops (`stop`). A second signal ends the run at once.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.phase = "before training"
        self.requested = None  # the name of the first signal received during training
        self.previous_handlers = {}
        self.pid = os.getpid()

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for signum in self.SIGNALS:
                self.previous_handlers[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self.previous_handlers.items():
            signal.signal(signum, handler)

    def training_started(self):
        self.phase = "training"

    def training_ended(self):
        self.phase = "final save"

    def handle(self, signum, frame):
        if os.getpid() != self.pid:  # a forked data loader worker: the run's own process decides, workers carry on
            return
        name = signal.Signals(signum).name
        if self.phase == "before training":
            raise Interrupted(
                f"interrupted by {name} before training started; run the same command again to continue (latents "
                "precomputed so far are kept)"
            )
        if self.requested is not None:
            raise Interrupted(
                f"stopped at once by a second {name}; --resume_from_checkpoint latest continues from the last "
                "complete checkpoint"
            )
        self.requested = name
        then = "finishing the final save" if self.phase == "final save" else "stopping after this optimizer step"
        logger.warning(f"{name} received: {then}; a second signal stops at once.", main_process_only=False)

    def stop(self, accelerator, args, global_step):
        """Ends a run that was asked to stop: checkpoints this step (unless its scheduled checkpoint was just written)
        and raises TrainingStopped. Every process calls it at the same step."""
        if global_step % args.checkpointing_steps != 0:
            save_checkpoint(accelerator, args, global_step)
        accelerator.end_training()
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{global_step}")
        raise TrainingStopped(
            f"stopped by {self.requested or 'a signal to another process'} after step {global_step} of "
            f"{args.max_train_steps}; saved {checkpoint}; --resume_from_checkpoint latest continues the run"
        )


def setup_accelerator(args):
    """The Accelerator, with logging configured, the seed set and TF32 allowed if asked."""
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > accelerator.num_processes:  # each process would train alone and overwrite the others' output
        raise InputError(
            f"launched as {launched} processes, but each runs alone: on a machine without GPUs launch with "
            "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu ...` (gloo), otherwise check that every "
            "process sees a GPU"
        )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    for library in (datasets, transformers, diffusers):
        verbosity = "warning" if accelerator.is_local_main_process else "error"
        getattr(library.utils.logging, f"set_verbosity_{verbosity}")()
    set_seed(args.seed)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator


def output_dir_problem(output_dir, error):
    """One line on why --output_dir could not be created or written (`error`: the OSError that said so)."""
    blocking = next((p for p in (Path(output_dir), *Path(output_dir).parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        where = "is a file" if blocking == Path(output_dir) else f"is under the file {blocking}"
        return f"--output_dir {output_dir} {where}; choose a folder"
    return f"--output_dir {output_dir} cannot be written ({error.strerror or error}); choose a writable folder"


@contextlib.contextmanager
def locked_output_dir(args, accelerator):
    """Creates --output_dir and, on the main process, holds a lock file in it for the run's lifetime: a second run on
    the same folder would silently overwrite this one's checkpoints and weights, so it stops instead. Also stops a
    run whose folder cannot be created or written, before anything is loaded."""
    lock, problem = None, None
    if accelerator.is_main_process:
        try:
            os.makedirs(args.output_dir, exist_ok=True)
            lock = FileLock(os.path.join(args.output_dir, OUTPUT_DIR_LOCK_NAME))
            lock.acquire(timeout=0)
        except Timeout:
            lock = None
            problem = f"--output_dir {args.output_dir} is in use by another run; wait for it to end or choose another"
        except OSError as error:
            lock, problem = None, output_dir_problem(args.output_dir, error)
    if accelerator.num_processes > 1:  # every process stops, not only the main one
        problem = broadcast_object_list([problem])[0]
    if problem is not None:
        raise InputError(problem)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def create_output(args, accelerator):
    """Creates the output folder, and the Hub repo with --push_to_hub (failing on a bad token before hours of
    training). Returns the repo id, or None."""
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    if args.push_to_hub and accelerator.is_main_process:
        return create_repo(
            repo_id=args.hub_model_id or Path(args.output_dir).name, exist_ok=True, token=args.hub_token
        ).repo_id
    return None


def precompute_pairs(args, accelerator, train_source, held_out_source, encode_dtype):
    """The cached training pairs and held-out pairs (None without held-out source pairs), precomputed as needed.

    Pairs with an undecodable image are skipped, which shortens the epochs; when the usable pairs then need more
    epochs than were planned for, the latents of the extra epochs are encoded too.
    """
    held_out_requests = [CacheRequest(held_out_source)] if held_out_source is not None else []
    epochs = planned_epochs(args, len(train_source), accelerator.num_processes)
    train_pairs, *held_out = load_or_precompute(
        args, [CacheRequest(train_source, epochs), *held_out_requests], accelerator, encode_dtype
    )
    usable_epochs = planned_epochs(args, len(train_pairs), accelerator.num_processes)
    if usable_epochs > epochs:
        train_pairs, *held_out = load_or_precompute(
            args, [CacheRequest(train_source, usable_epochs), *held_out_requests], accelerator, encode_dtype
        )
    if len(train_pairs) == 0:
        raise InputError(f"no pair of dataset '{args.dataset_name}' has two decodable images")
    if len(train_pairs) < args.train_batch_size * accelerator.num_processes:
        raise InputError(
            f"--train_batch_size {args.train_batch_size} needs at least "
            f"{args.train_batch_size * accelerator.num_processes} usable pairs"
            f"{f' on {accelerator.num_processes} processes' if accelerator.num_processes > 1 else ''}; "
            f"the data has {len(train_pairs)}"
        )
    return train_pairs, held_out[0] if held_out else None


def training_dataloader(args, train_pairs):
    return torch.utils.data.DataLoader(
        train_pairs,
        batch_size=args.train_batch_size,
        sampler=PairSampler(train_pairs, args.seed, args.proportion_empty_prompts),
        num_workers=args.dataloader_num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=args.dataloader_num_workers > 0,
    )


def load_noise_scheduler(args):
    """The model's FlowMatchEulerDiscreteScheduler: its sigmas carry SD3's timestep shift (3.0)."""
    return FlowMatchEulerDiscreteScheduler.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="scheduler", revision=args.revision, cache_dir=args.cache_dir
    )


def learning_rate(args, pairs_per_step):
    """--learning_rate, scaled with --scale_lr; without it, the default of --train_mode."""
    if args.learning_rate is None:
        return 1e-5 if args.train_mode == "lora" else 1e-8 * (2000.0 / args.beta_dpo) * pairs_per_step
    return args.learning_rate * pairs_per_step if args.scale_lr else args.learning_rate


def build_optimizer(args, params, device):
    if args.use_adafactor:
        return transformers.Adafactor(
            params,
            lr=args.learning_rate,
            weight_decay=args.adam_weight_decay,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
        )
    optimizer_class, optimizer_options = torch.optim.AdamW, {}
    if args.use_8bit_adam:
        import bitsandbytes

        optimizer_class = bitsandbytes.optim.AdamW8bit
    else:  # one fused kernel for the whole update instead of a few per parameter tensor
        optimizer_options["fused"] = device.type in ("cuda", "cpu")
    return optimizer_class(
        params,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
        **optimizer_options,
    )


def resume(accelerator, args):
    """Loads weights, optimizer and schedule from the checkpoint to resume from, if any; returns its step (or 0)."""
    checkpoint = checkpoint_to_resume(args) if args.resume_from_checkpoint else None
    if checkpoint is None:
        if args.resume_from_checkpoint:
            logger.info("No checkpoint to resume from; starting a new run.")
        return 0
    global_step = int(CHECKPOINT_PATTERN.match(Path(checkpoint).name).group(1))
    check_data_order(checkpoint, checkpoint_record(checkpoint), args.data_order)
    if global_step > args.max_train_steps:  # its weights are past the steps asked for: saving them would mislabel
        raise InputError(
            f"{checkpoint} is already past --max_train_steps {args.max_train_steps}: nothing to train; resume from an "
            "earlier checkpoint (--resume_from_checkpoint checkpoint-N) or raise --max_train_steps"
        )
    accelerator.load_state(checkpoint)
    logger.info(f"Resumed from {checkpoint} at step {global_step}")
    if global_step == args.max_train_steps:  # e.g. the final save had failed: saving is all that is left
        logger.warning(
            f"Nothing to train: {checkpoint} is at --max_train_steps {global_step}; saving its weights as the result."
        )
    return global_step


class TrainingProgress:
    """The steps bar; its postfix shows the last step's loss, implicit_acc and lr, and the last held-out accuracy."""

    def __init__(self, args, accelerator, global_step):
        self.bar = tqdm(
            range(args.max_train_steps),
            initial=global_step,
            desc="Steps",
            disable=not accelerator.is_local_main_process,
        )
        self.postfix = {}

    def step(self, logs):
        self.bar.update(1)
        self.show(
            **{name: f"{logs[name]:.4g}" for name in ("loss", "implicit_acc", "policy_acc", "lr") if name in logs}
        )

    def show(self, **values):
        self.postfix.update(values)
        self.bar.set_postfix(self.postfix)


def backward_and_step(accelerator, loss, params, optimizer, lr_scheduler, args):
    """Backward, and on the last micro-batch of a step gradient clipping and the optimizer step, skipped when the
    gradients are not finite. Returns False for a skipped step."""
    accelerator.backward(loss)
    finite = True
    if accelerator.sync_gradients:  # gradients are all-reduced by now: every process decides the same
        grad_norm = accelerator.clip_grad_norm_(params, args.max_grad_norm or math.inf)
        # a NaN/inf loss gives NaN gradients; DeepSpeed clips and skips overflows itself
        if accelerator.distributed_type != DistributedType.DEEPSPEED:
            finite = bool(torch.isfinite(grad_norm))
    if finite or accelerator.scaler is not None:  # fp16: the grad scaler skips and lowers its scale
        optimizer.step()
        lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return finite


class SkippedSteps:
    """Counts the optimizer steps skipped for a non-finite loss or gradient (the weights keep their last finite
    values; the step still consumed its data) and stops the run after --max_consecutive_skipped_steps in a row."""

    def __init__(self, max_consecutive):
        self.max_consecutive = max_consecutive
        self.total = self.consecutive = self.succeeded = 0

    def record(self, global_step, skipped):
        if not skipped:
            self.consecutive = 0
            self.succeeded += 1
            return
        self.total, self.consecutive = self.total + 1, self.consecutive + 1
        logger.warning(
            f"Step {global_step}: non-finite loss or gradient, optimizer step skipped "
            f"({self.total} so far, {self.consecutive} in a row)."
        )
        if self.consecutive >= self.max_consecutive:
            raise TrainingStopped(
                f"stopped at step {global_step}: {self.consecutive} steps in a row had a non-finite loss or "
                f"gradient (the weights are those of step {global_step - self.consecutive}; checkpoints are "
                "intact); lower --learning_rate, prefer bf16 to fp16, or check the data"
            )

    def check_something_trained(self, global_step):
        """A run whose every optimizer step was skipped trained nothing: it must not end as a success."""
        if self.total and not self.succeeded:
            raise TrainingStopped(
                f"no optimizer step of this run had a finite loss and gradient ({self.total} skipped, up to step "
                f"{global_step}), so nothing was saved as trained; lower --learning_rate, prefer bf16 to fp16, or "
                "check the data"
            )


class StepMetrics:
    """Sums the metrics of a step's micro-batches; `reduce` gives their means over micro-batches and processes."""

    def __init__(self):
        self.sums, self.micro_batches = {}, 0

    def add(self, metrics):
        for name, value in metrics.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.micro_batches += 1

    def reduce(self, accelerator, stop_requested=False):
        """The step's metric means, and whether any process was asked to stop: the flag rides in the same
        all-reduce, so every process learns it at the same step without another collective."""
        names = list(self.sums)
        means = torch.stack([self.sums[n] for n in names]) / self.micro_batches
        means = torch.cat([means, means.new_tensor([float(bool(stop_requested))])])
        means = accelerator.reduce(means, reduction="mean").tolist()
        self.sums, self.micro_batches = {}, 0
        return dict(zip(names, means[:-1])), means[-1] > 0


def check_weights_identical(accelerator, params):
    """Only the main process saves: makes sure it holds what every process trained (warns if not)."""
    with torch.no_grad():
        checksum = [
            sum(p.double().sum().item() for p in params),
            sum(p.double().square().sum().item() for p in params),
        ]
    checksums = gather_object([checksum])
    if all(c == checksums[0] for c in checksums):
        logger.info(f"Trained weights identical on all {accelerator.num_processes} processes.")
    else:
        logger.warning(f"Trained weights differ between processes (checksums {checksums}); saving the main one's.")


def save_final(args, accelerator, transformer, reference, params, weight_dtype, global_step, repo_id):
    """Saves the result (LoRA weights in diffusers format, or a complete pipeline folder) and its model card, renders
    the last validation images, and pushes to the Hub if asked."""
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1:
        check_weights_identical(accelerator, params)
    if not weights_finite(params):
        raise TrainingStopped(
            f"the trained weights of step {global_step} are not finite, so nothing was saved; "
            f"{last_checkpoint_note(args)}"
        )
    if accelerator.is_main_process:
        trained = accelerator.unwrap_model(transformer)
        if args.run_validation and global_step % args.validation_steps != 0:
            run_validation(args, accelerator, transformer, reference, weight_dtype, global_step)

        def write(folder):
            if args.train_mode == "lora":
                save_lora(trained, folder)
            else:  # the trained transformer in the base pipeline (without T5 under --no_t5)
                load_pipeline(args, trained).save_pretrained(folder)

        saved = lora_layers(trained) if args.train_mode == "lora" else trained.state_dict()
        write_into_output_dir(args, write, sum(t.numel() * t.element_size() for t in saved.values()), global_step)
        save_model_card(args, repo_id or os.path.abspath(args.output_dir), global_step)
        if args.push_to_hub:
            push_to_hub(args, repo_id)
        logger.info(f"Saved the trained {'LoRA' if args.train_mode == 'lora' else 'pipeline'} to {args.output_dir}")
    accelerator.wait_for_everyone()  # the others wait for the main process to finish saving before the group ends


def main(args):
    """Trains and saves; returns {'global_step', 'history': [per-step metrics], 'evaluations': [held-out metrics]}.

    For the run's lifetime SIGTERM and SIGINT are handled (StopSignals) and --output_dir is locked; both are released
    when main returns or raises (tests call it in-process)."""
    with contextlib.ExitStack() as run_lifetime:
        stop_signals = run_lifetime.enter_context(StopSignals())
        accelerator = setup_accelerator(args)
        run_lifetime.enter_context(locked_output_dir(args, accelerator))
        check_output_dir(args)  # under the lock: no other run can write an earlier run's results meanwhile
        return train_and_save(args, accelerator, stop_signals)


def train_and_save(args, accelerator, stop_signals):
    """Loads, precomputes, trains and saves: main's work once the run holds its output folder."""
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    repo_id = create_output(args, accelerator)
    check_resume_flags(args, accelerator.num_processes)

    # Data: pairs, then latents and text embeddings from the cache (encoded once, and only what this run reads).
    with accelerator.local_main_process_first():  # labels and captions are read once per machine, then cached
        train_source, held_out_source = training_and_validation_pairs(args)
    train_pairs, held_out_pairs = precompute_pairs(args, accelerator, train_source, held_out_source, weight_dtype)
    train_dataloader = training_dataloader(args, train_pairs)

    # Models: the trained transformer and its reference.
    noise_scheduler = load_noise_scheduler(args)
    set_seed(args.seed)  # precomputing draws random numbers: re-seed so LoRA init does not depend on a cache hit
    transformer, reference = build_transformers(args, accelerator.device, weight_dtype)
    register_checkpoint_hooks(accelerator, transformer, args)

    # Optimizer and schedule.
    pairs_per_step = args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    args.learning_rate = learning_rate(args, pairs_per_step)
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = build_optimizer(args, params, accelerator.device)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch(
            args, len(train_pairs), accelerator.num_processes
        )
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )
    transformer, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        transformer, optimizer, train_dataloader, lr_scheduler
    )
    updates_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    num_epochs = math.ceil(args.max_train_steps / updates_per_epoch)

    if accelerator.is_main_process:
        tracker_config = {k: v for k, v in vars(args).items() if not isinstance(v, list) and k != "hub_token"}
        accelerator.init_trackers(args.tracker_name, config=tracker_config)
    logger.info(
        f"***** Diffusion-DPO ({args.train_mode}{', SFT' if args.sft else ''}) *****\n"
        f"  pairs = {len(train_pairs)}, pairs per optimizer step = {pairs_per_step}, steps = {args.max_train_steps}, "
        f"epochs = {num_epochs}, learning rate = {args.learning_rate:g}, beta = {args.beta_dpo:g}"
    )

    # Resume: weights, optimizer and schedule from the checkpoint; data position from the step count.
    args.data_order = data_order(args, accelerator.num_processes, train_source, train_pairs)  # checkpoints record it
    global_step = resume(accelerator, args)
    first_epoch = global_step // updates_per_epoch
    batches_to_skip = (global_step % updates_per_epoch) * args.gradient_accumulation_steps

    # Train.
    progress = TrainingProgress(args, accelerator, global_step)
    evaluate = HeldOutEvaluation(accelerator, reference, held_out_pairs, noise_scheduler, args, progress)
    skipped_steps, step_metrics, history = SkippedSteps(args.max_consecutive_skipped_steps), StepMetrics(), []
    if global_step == 0:
        evaluate(transformer, global_step)  # the starting point: implicit accuracy 0.5, loss ln 2
    stop_signals.training_started()  # from here a first signal stops after the current step, with a checkpoint
    transformer.train()
    for epoch in range(first_epoch, num_epochs):
        if global_step >= args.max_train_steps:
            break
        skip = batches_to_skip if epoch == first_epoch else 0
        epoch_batches = accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader
        epoch_batches.set_epoch(epoch)  # accelerate's loaders pass their own epoch counter to the sampler
        for batch_index, batch in enumerate(epoch_batches, start=skip):
            generator = torch.Generator(accelerator.device).manual_seed(
                step_seed(args.seed, accelerator.process_index, epoch, batch_index)
            )
            with accelerator.accumulate(transformer):
                loss, metrics = compute_loss(batch, transformer, reference, noise_scheduler, args, generator)
                finite = backward_and_step(accelerator, loss, params, optimizer, lr_scheduler, args)
            step_metrics.add({"loss": loss.detach(), **metrics})
            if not accelerator.sync_gradients:
                continue

            global_step += 1
            skipped_steps.record(global_step, skipped=not finite or accelerator.optimizer_step_was_skipped)
            step_means, stop_requested = step_metrics.reduce(accelerator, stop_signals.requested)
            logs = {
                **step_means,
                "lr": lr_scheduler.get_last_lr()[0],
                "skipped_steps": skipped_steps.total,
            }
            history.append({"step": global_step, **logs})
            accelerator.log(logs, step=global_step)
            progress.step(logs)

            if global_step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, args, global_step)
            if stop_requested:
                progress.bar.close()  # the one-line message that follows gets a line of its own
                stop_signals.stop(accelerator, args, global_step)
            if global_step % args.validation_steps == 0:
                evaluate(transformer, global_step)
                if args.run_validation and accelerator.is_main_process:
                    run_validation(args, accelerator, transformer, reference, weight_dtype, global_step)
            if global_step >= args.max_train_steps:
                break

    stop_signals.training_ended()
    skipped_steps.check_something_trained(global_step)
    if global_step % args.validation_steps != 0:
        evaluate(transformer, global_step)
    save_final(args, accelerator, transformer, reference, params, weight_dtype, global_step, repo_id)
    accelerator.end_training()
    if accelerator.num_processes > 1:
        # gloo's worker thread frees the last collectives' tensors, which needs the GIL; if the process group is torn
        # down (when the DDP model is freed) before it has, the exit deadlocks. Seen on CPU; a second avoids it.
        time.sleep(1)
    return {"global_step": global_step, "history": history, "evaluations": evaluate.evaluations}


if __name__ == "__main__":
    try:
        main(parse_args())
    except (InputError, TrainingStopped) as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt as interrupted:  # Ctrl-C or SIGTERM (an Interrupted says when and what is kept)
        sys.exit(f"error: {interrupted or 'interrupted'}")
