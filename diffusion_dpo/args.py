"""The flags every trainer script shares (diffusers' names where the meaning is the same), in groups a script adds its
own flags to, and their checks: every flag value is checked here, before any model or data is loaded."""

import argparse
import importlib.util
import math

from diffusers.optimization import SchedulerType
from diffusers.utils.import_utils import is_xformers_available

from diffusion_dpo import InputError
from diffusion_dpo.data import DATA_LAYOUTS, DEFAULT_DATASET
from diffusion_dpo.outputs import KOHYA_WEIGHT_NAME


DEFAULT_VALIDATION_PROMPTS = [
    "a portrait photo of an old fisherman, detailed face, soft light",
    "a cozy cabin in a snowy forest at dusk, warm light in the windows",
    "an astronaut riding a horse on the moon, digital art",
    "a bowl of ramen on a wooden table, studio photograph",
]


class OneLineErrorParser(argparse.ArgumentParser):
    """Reports a bad flag in one line (`--help` still shows the full usage)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")

    def parse_and_check(self, input_args, check):
        """Parses, then runs `check` (which raises InputError), so that every bad input reads the same way."""
        args = self.parse_args(input_args)
        try:
            check(args)
        except InputError as error:
            self.error(str(error))
        return args


def shared_parser(description, model, resolution, beta_dpo, output_dir, validation_steps=25, guidance_scale=7.5):
    """The parser with every shared flag, and its groups by title ("model", "data", ..., "hub") for a script's own
    flags. The arguments are the script's defaults."""
    parser = OneLineErrorParser(description=description)
    groups = {
        title: parser.add_argument_group(title)
        for title in ("model", "data", "cache", "held-out pairs", "loss", "training", "optimizer", "performance")
        + ("checkpointing", "logging and validation images", "hub")
    }
    add = {title: group.add_argument for title, group in groups.items()}

    add["model"]("--pretrained_model_name_or_path", default=model, help=f"Hub id or local pipeline folder ({model}).")
    add["model"]("--revision", default=None, help="Revision (branch, tag or commit) of the model.")
    add["model"]("--variant", default=None, help="Weight variant to load, e.g. 'fp16'.")

    add["data"](
        "--dataset_name",
        default=DEFAULT_DATASET,
        help="Hub id, local folder, .parquet file or image folder (with metadata.jsonl or metadata.csv) of "
        "preference pairs in one of the layouts of --data_layout (docs/data.md).",
    )
    add["data"]("--dataset_config_name", default=None, help="Config name of the dataset, if any.")
    add["data"]("--dataset_split_name", default="train", help="Split to train on.")
    add["data"]("--cache_dir", default=None, help="Where Hub models are downloaded (datasets are streamed).")
    add["data"](
        "--data_layout",
        default="auto",
        choices=["auto", *DATA_LAYOUTS],
        help="How rows hold a pair: pickapic (jpg_0, jpg_1, label_0, caption), chosen_rejected (chosen, rejected, "
        "prompt; the chosen image wins), votes (image1, image2, votes_image1, votes_image2, prompt; more votes wins). "
        "auto: the one layout whose columns the dataset has.",
    )
    add["data"]("--image_0_column", default=None, help="The first image's column (default: jpg_0, chosen, image1).")
    add["data"]("--image_1_column", default=None, help="The second image's column (default: jpg_1, rejected, image2).")
    add["data"](
        "--label_column",
        default=None,
        help="pickapic layout: 1 = first image preferred, 0 = second, 0.5 = tie (dropped); default label_0.",
    )
    add["data"]("--caption_column", default=None, help="The prompt's column; default: caption, prompt or txt.")
    add["data"]("--vote_0_column", default=None, help="votes layout: the first image's votes; default votes_image1.")
    add["data"]("--vote_1_column", default=None, help="votes layout: the second image's votes; default votes_image2.")
    add["data"](
        "--min_vote_margin",
        type=float,
        default=1,
        help="votes layout: the image with at least this many more votes wins; closer pairs are ties (dropped).",
    )
    add["data"]("--max_train_samples", type=int, default=None, help="Train on a random subset of this many pairs.")
    add["data"]("--resolution", type=int, default=resolution, help=f"Square training resolution ({resolution}).")
    add["data"](
        "--random_crop",
        action="store_true",
        help="Crop at a random position instead of the centre, drawn once per image when it is encoded.",
    )
    add["data"](
        "--no_hflip",
        action="store_true",
        help="Do not flip images horizontally. By default both orientations are encoded (as a run reads them) and "
        "each epoch picks one at random; --no_hflip halves precompute time and cache size.",
    )
    add["data"](
        "--proportion_empty_prompts",
        type=float,
        default=0.0,
        help="Fraction of pairs trained with the pipeline's unconditional input (classifier-free-guidance dropout).",
    )

    add["cache"](
        "--precompute_cache_dir",
        default=None,
        help="Where the latents and text embeddings are cached (default: <--cache_dir or the datasets cache>/"
        "diffusion_dpo). A later run with the same model, data and image settings reuses them.",
    )
    add["cache"]("--vae_encode_batch_size", type=int, default=8, help="Images per VAE forward while precomputing.")
    add["cache"](
        "--precompute_commit_seconds",
        type=float,
        default=60,
        help="Save precompute progress this often: an interrupted precompute resumes from the last save.",
    )

    add["held-out pairs"](
        "--validation_split_name",
        default=None,
        help="A split of --dataset_name with held-out pairs (e.g. Pick-a-Pic 'validation'), evaluated every "
        "--validation_steps, before training and at the end.",
    )
    add["held-out pairs"](
        "--num_validation_pairs",
        type=int,
        default=0,
        help="Without --validation_split_name: hold this many pairs out of the training split. With it: use at most "
        "this many of its pairs (0 = all).",
    )
    add["held-out pairs"](
        "--validation_timesteps",
        type=int,
        default=10,
        help="Fixed (noise level, noise) draws per held-out pair; its errors are averaged over them.",
    )

    add["loss"](
        "--beta_dpo",
        type=float,
        default=beta_dpo,
        help=f"Diffusion-DPO's beta, in the paper's code's convention inside = -beta/2 * (model_diff - ref_diff) "
        f"({beta_dpo:g}; docs/loss-and-learning-rates.md).",
    )
    add["loss"](
        "--loss_type",
        default="sigmoid",
        choices=["sigmoid", "hinge", "ipo", "mapo"],
        help="sigmoid: the paper's DPO loss; hinge: relu(1 - inside); ipo: (inside/beta - 1/(2 beta))^2; "
        "mapo: reference-free MaPO (Hong et al. 2024), no reference forward and no frozen copy.",
    )
    add["loss"](
        "--label_smoothing",
        type=float,
        default=0.0,
        help="Conservative DPO (sigmoid loss): the probability eps that a label is flipped, in [0, 0.5).",
    )
    add["loss"]("--beta_mapo", type=float, default=None, help="--loss_type mapo: the margin term's weight (0.1).")
    add["loss"]("--sft", action="store_true", help="Supervised fine-tuning on the preferred images (a baseline).")
    add["loss"](
        "--train_mode",
        default="lora",
        choices=["lora", "full"],
        help="lora: train a LoRA adapter (reference = the same model with the adapter off); full: train every "
        "weight of the denoiser against a frozen copy.",
    )
    add["loss"]("--rank", type=int, default=8, help="LoRA rank (alpha = rank).")

    add["training"]("--output_dir", default=output_dir, help=f"Where weights and checkpoints go ({output_dir}).")
    add["training"]("--seed", type=int, default=0, help="Seed for initialisation, data order, noise and crops.")
    add["training"](
        "--output_kohya_format",
        action="store_true",
        help=f"LoRA only: also write {KOHYA_WEIGHT_NAME} (kohya-style keys) for ComfyUI, Automatic1111 and Forge "
        "(SD 1.x/2.x and SDXL; ComfyUI loads the other families' diffusers-format file as it is).",
    )
    add["training"]("--train_batch_size", type=int, default=4, help="Preference pairs per device per step.")
    add["training"]("--num_train_epochs", type=int, default=1)
    add["training"]("--max_train_steps", type=int, default=None, help="Optimizer steps; overrides the epochs.")
    add["training"]("--gradient_accumulation_steps", type=int, default=1)
    add["training"]("--gradient_checkpointing", action="store_true", help="Trade compute for activation memory.")

    add["optimizer"](
        "--learning_rate",
        type=float,
        default=None,
        help="Default: 1e-5 for LoRA; for full fine-tuning the paper's 1e-8 * (2000 / beta_dpo) * pairs per "
        "optimizer step.",
    )
    add["optimizer"]("--scale_lr", action="store_true", help="Multiply the learning rate by pairs per step.")
    add["optimizer"](
        "--lr_scheduler",
        default="constant_with_warmup",
        choices=[s.value for s in SchedulerType if s.value != "piecewise_constant"],
    )
    add["optimizer"]("--lr_warmup_steps", type=int, default=0)
    add["optimizer"]("--lr_num_cycles", type=int, default=1, help="Hard restarts of cosine_with_restarts.")
    add["optimizer"]("--lr_power", type=float, default=1.0, help="Power of the polynomial schedule.")
    add["optimizer"]("--use_8bit_adam", action="store_true", help="bitsandbytes 8-bit AdamW (less memory).")
    add["optimizer"]("--use_adafactor", action="store_true", help="Adafactor (the paper's optimizer for SDXL).")
    add["optimizer"]("--adam_beta1", type=float, default=0.9)
    add["optimizer"]("--adam_beta2", type=float, default=0.999)
    add["optimizer"]("--adam_weight_decay", type=float, default=1e-2)
    add["optimizer"]("--adam_epsilon", type=float, default=1e-8)
    add["optimizer"]("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm (0 disables).")
    add["optimizer"](
        "--max_consecutive_skipped_steps",
        type=int,
        default=20,
        help="A step with a non-finite loss or gradient is skipped; stop after this many in a row.",
    )

    add["performance"]("--dataloader_num_workers", type=int, default=0, help="Worker processes for data loading.")
    add["performance"](
        "--mixed_precision",
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Overrides accelerate's config. Trainable weights and the loss stay in fp32.",
    )
    add["performance"]("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere and newer GPUs.")
    add["performance"](
        "--torch_compile",
        action="store_true",
        help="torch.compile the denoiser's repeated blocks (regional compilation: most of the speed-up of "
        "compiling the whole model, a fraction of the compile time).",
    )

    add["checkpointing"]("--checkpointing_steps", type=int, default=500, help="A resumable checkpoint every N steps.")
    add["checkpointing"]("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many.")
    add["checkpointing"](
        "--resume_from_checkpoint",
        default=None,
        help="'latest' or a checkpoint folder (a path, or a name inside --output_dir) to continue from.",
    )

    log = add["logging and validation images"]
    log("--report_to", default="tensorboard", help="tensorboard, wandb, comet_ml, all or none.")
    log("--logging_dir", default="logs", help="Tracker folder, relative to --output_dir.")
    log("--tracker_name", default="diffusion-dpo", help="Project name for the trackers.")
    log("--run_validation", action="store_true", help="Render --validation_prompts during training.")
    log("--validation_steps", type=int, default=200, help="Held-out metrics and validation images every N steps.")
    log("--validation_prompts", nargs="+", default=DEFAULT_VALIDATION_PROMPTS)
    log("--num_validation_inference_steps", type=int, default=validation_steps, help="Validation sampling steps.")
    log("--validation_guidance_scale", type=float, default=guidance_scale, help="Validation guidance scale.")

    add["hub"]("--push_to_hub", action="store_true", help="Upload the result (not the checkpoints).")
    add["hub"]("--hub_model_id", default=None, help="Repository id (default: output_dir's name).")
    add["hub"]("--hub_token", default=None, help="Token for the Hub (prefer `hf auth login`).")
    return parser, groups


def add_unet_options(groups):
    """The speed options of the UNet families."""
    groups["performance"].add_argument("--enable_xformers_memory_efficient_attention", action="store_true")
    groups["performance"].add_argument(
        "--channels_last",
        action="store_true",
        help="Channels-last memory format for the UNet, and for the VAE while precomputing (on a CPU the VAE "
        "always encodes channels-last: measured 1.4x faster).",
    )


def add_flow_options(groups):
    """How the rectified-flow families draw noise levels, as diffusers' SD3 and Flux DreamBooth scripts do."""
    flow = groups["loss"].add_argument
    flow(
        "--weighting_scheme",
        default="logit_normal",
        choices=["logit_normal", "mode", "sigma_sqrt", "cosmap", "none"],
        help="How sigma is drawn (logit_normal, mode; others uniformly) and how errors are weighted (sigma_sqrt, "
        "cosmap; others not): diffusers' compute_density_for_timestep_sampling and compute_loss_weighting_for_sd3.",
    )
    flow("--logit_mean", type=float, default=0.0, help="Mean of the logit_normal scheme.")
    flow("--logit_std", type=float, default=1.0, help="Standard deviation of the logit_normal scheme.")
    flow("--mode_scale", type=float, default=1.29, help="Scale of the mode scheme.")


def finite_number(args, name, low=None, open_low=False):
    """Refuses a NaN or infinite value, and one below `low` (or at it, with `open_low`)."""
    value = getattr(args, name)
    if not math.isfinite(value) or (low is not None and (value < low or (open_low and value == low))):
        bound = "" if low is None else f" {'above' if open_low else 'at least'} {low:g}"
        raise InputError(f"--{name} must be a finite number{bound}, got {value}")


def check_args(args, family, resolution_multiple=8):
    """Refuses bad flag values and combinations before anything heavy is loaded; fills the defaults that depend on
    other flags."""
    if args.resolution < resolution_multiple or args.resolution % resolution_multiple != 0:
        raise InputError(f"--resolution must be a positive multiple of {resolution_multiple}, got {args.resolution}")
    for name in (
        *("train_batch_size", "num_train_epochs", "gradient_accumulation_steps", "rank", "checkpointing_steps"),
        *("validation_steps", "vae_encode_batch_size", "num_validation_inference_steps", "lr_num_cycles"),
        *("validation_timesteps", "max_consecutive_skipped_steps"),
    ):
        if getattr(args, name) < 1:
            raise InputError(f"--{name} must be at least 1")
    for name in ("max_train_steps", "max_train_samples", "checkpoints_total_limit"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise InputError(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("dataloader_num_workers", "lr_warmup_steps", "num_validation_pairs"):
        if getattr(args, name) < 0:
            raise InputError(f"--{name} must not be negative")
    finite_number(args, "beta_dpo", 0, open_low=True)
    finite_number(args, "min_vote_margin", 0, open_low=True)
    finite_number(args, "adam_epsilon", 0, open_low=True)
    finite_number(args, "adam_weight_decay", 0)
    finite_number(args, "max_grad_norm", 0)
    finite_number(args, "precompute_commit_seconds", 0)
    finite_number(args, "lr_power")
    finite_number(args, "validation_guidance_scale")
    if args.learning_rate is not None:
        finite_number(args, "learning_rate", 0, open_low=True)
    if hasattr(args, "weighting_scheme"):
        finite_number(args, "logit_mean")
        finite_number(args, "logit_std", 0, open_low=True)
        finite_number(args, "mode_scale")
    if not 0.0 <= args.proportion_empty_prompts <= 1.0:
        raise InputError(f"--proportion_empty_prompts must lie in [0, 1], got {args.proportion_empty_prompts}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(args, name) < 1:
            raise InputError(f"--{name} must lie in [0, 1), got {getattr(args, name)}")
    if not 0.0 <= args.label_smoothing < 0.5:
        raise InputError(f"--label_smoothing must lie in [0, 0.5), got {args.label_smoothing}")
    if args.label_smoothing > 0 and (args.loss_type != "sigmoid" or args.sft):
        raise InputError("--label_smoothing is conservative DPO: it needs --loss_type sigmoid and no --sft")
    if args.beta_mapo is not None and args.loss_type != "mapo":
        raise InputError("--beta_mapo weighs MaPO's margin term: it needs --loss_type mapo")
    if args.loss_type == "mapo":
        args.beta_mapo = 0.1 if args.beta_mapo is None else args.beta_mapo
        finite_number(args, "beta_mapo", 0, open_low=True)
    if args.sft and args.loss_type == "mapo":
        raise InputError("choose one of --sft and --loss_type mapo (MaPO already includes the SFT term)")
    if args.output_kohya_format and family.kohya_lora is None:
        raise InputError(
            f"--output_kohya_format: not for {family.name} (diffusers' conversion gives keys that ComfyUI and "
            "diffusers do not load); ComfyUI loads pytorch_lora_weights.safetensors as it is"
        )
    if args.output_kohya_format and args.train_mode != "lora":
        raise InputError("--output_kohya_format converts a LoRA: it needs --train_mode lora")
    trackers = args.report_to.split(",")
    if "wandb" in trackers and args.hub_token is not None:
        raise InputError(
            "--report_to wandb with --hub_token would log your token to wandb; log in with `hf auth login` instead"
        )
    for tracker in ("wandb", "tensorboard", "comet_ml"):
        if tracker in trackers and importlib.util.find_spec(tracker) is None:
            raise InputError(f"--report_to {tracker} needs `pip install {tracker}`")
    if args.use_8bit_adam and args.use_adafactor:
        raise InputError("choose one of --use_8bit_adam and --use_adafactor")
    if args.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise InputError("--use_8bit_adam needs `pip install bitsandbytes`")
    if getattr(args, "enable_xformers_memory_efficient_attention", False) and not is_xformers_available():
        raise InputError(
            "--enable_xformers_memory_efficient_attention needs xformers (CUDA only: `pip install xformers`); "
            "without the flag PyTorch's SDPA attention is used, which is as fast on recent PyTorch"
        )
