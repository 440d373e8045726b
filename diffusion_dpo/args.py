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
    """The parser with every shared flag (the arguments: the script's defaults), and its groups by title."""
    parser = OneLineErrorParser(description=description)
    titles = ("model", "data", "cache", "held-out pairs", "loss", "training", "optimizer", "performance")
    groups = {title: parser.add_argument_group(title) for title in titles + ("checkpointing", "logging", "hub")}

    def adder(title):
        def add(name, default=None, help=None, **options):
            if default is not None:  # else argparse's own: False for a store_true switch, not None
                options["default"] = default
            groups[title].add_argument(name, help=help, **options)

        return add

    base, data, cache, held_out, loss, training, optimizer, performance, checkpointing, log, hub = map(adder, groups)

    base("--pretrained_model_name_or_path", model, f"Hub id or local pipeline folder ({model}).")
    base("--revision", help="Revision (branch, tag or commit) of the model.")
    base("--variant", help="Weight variant to load, e.g. 'fp16'.")

    data("--dataset_name", DEFAULT_DATASET, "Hub id, local folder, .parquet file or image folder of pairs.")
    data("--dataset_config_name", help="Config name of the dataset, if any.")
    data("--dataset_split_name", "train", "Split to train on.")
    data("--cache_dir", help="Where Hub models are downloaded (datasets are streamed).")
    data("--data_layout", "auto", "How rows hold a pair (docs/data.md).", choices=["auto", *DATA_LAYOUTS])
    data("--image_0_column", help="The first image's column (default: jpg_0, chosen or image1).")
    data("--image_1_column", help="The second image's column (default: jpg_1, rejected or image2).")
    data("--label_column", help="pickapic: 1 = first image preferred, 0 = second, 0.5 = tie (label_0).")
    data("--caption_column", help="The prompt's column (default: caption, prompt or txt).")
    data("--vote_0_column", help="votes: the first image's votes (votes_image1).")
    data("--vote_1_column", help="votes: the second image's votes (votes_image2).")
    data("--min_vote_margin", 1, "votes: this many more votes win; closer pairs are ties.", type=float)
    data("--max_train_samples", help="Train on a random subset of this many pairs.", type=int)
    data("--resolution", resolution, f"Square training resolution ({resolution}).", type=int)
    data("--random_crop", help="Crop at a random position (drawn once per image).", action="store_true")
    data("--no_hflip", help="No horizontal flips: halves precompute time and cache size.", action="store_true")
    data("--proportion_empty_prompts", 0.0, "Pairs trained with the unconditional input (CFG dropout).", type=float)

    cache(
        "--precompute_cache_dir",
        help="Latent and text-embedding cache (<--cache_dir or datasets cache>/diffusion_dpo).",
    )
    cache("--vae_encode_batch_size", 8, "Images per VAE forward while precomputing.", type=int)
    cache("--precompute_commit_seconds", 60, "Save precompute progress this often.", type=float)

    held_out("--validation_split_name", help="A split of held-out pairs (e.g. Pick-a-Pic's validation).")
    held_out("--num_validation_pairs", 0, "Hold out this many pairs (or use this many of the split).", type=int)
    held_out("--validation_timesteps", 10, "Fixed noise draws per held-out pair.", type=int)
    held_out("--collapse_threshold", 1.5, "Warn when held-out winner error / reference's passes this.", type=float)
    held_out("--stop_on_collapse", help="Then checkpoint and stop (exit 0), saving no result.", action="store_true")

    loss("--beta_dpo", beta_dpo, f"Diffusion-DPO's beta ({beta_dpo:g}; docs/loss-and-learning-rates.md).", type=float)
    loss("--loss_type", "sigmoid", "sigmoid is the paper's; mapo: MaPO.", choices=["sigmoid", "hinge", "ipo", "mapo"])
    loss("--label_smoothing", 0.0, "Conservative DPO: the probability a label is flipped, [0, 0.5).", type=float)
    loss(
        "--soft_labels",
        help="Train on each pair's preference probability p, ties kept (p = 0.5): label_0; votes (v1 + 1) / (v1 + v2 "
        "+ 2), a Laplace prior; --data_layout scores sigmoid((score_0 - score_1) / tau).",
        action="store_true",
    )
    loss("--soft_label_temperature", 1.0, "tau of --soft_labels on scores (1: PickScore's probability).", type=float)
    loss("--beta_mapo", help="--loss_type mapo: the margin term's weight (0.1).", type=float)
    loss("--sft", help="Supervised fine-tuning on the preferred images (a baseline).", action="store_true")
    loss("--train_mode", "lora", "lora (reference: adapter off) or full (a frozen copy).", choices=["lora", "full"])
    loss("--rank", 8, "LoRA rank (alpha = rank).", type=int)

    training("--output_dir", output_dir, f"Where weights and checkpoints go ({output_dir}).")
    training("--seed", 0, "Seed for initialisation, data order, noise and crops.", type=int)
    training("--output_kohya_format", help=f"LoRA: also write {KOHYA_WEIGHT_NAME}.", action="store_true")
    training("--train_batch_size", 4, "Preference pairs per device per step.", type=int)
    training("--num_train_epochs", 1, type=int)
    training("--max_train_steps", help="Optimizer steps; overrides the epochs.", type=int)
    training("--gradient_accumulation_steps", 1, type=int)
    training("--gradient_checkpointing", help="Trade compute for activation memory.", action="store_true")

    optimizer("--learning_rate", help="LoRA: 1e-5; full: 1e-8 * (2000 / beta) * pairs per step.", type=float)
    optimizer("--scale_lr", help="Multiply the learning rate by pairs per step.", action="store_true")
    schedules = [schedule.value for schedule in SchedulerType if schedule.value != "piecewise_constant"]
    optimizer("--lr_scheduler", "constant_with_warmup", choices=schedules)
    optimizer("--lr_warmup_steps", 0, type=int)
    optimizer("--lr_num_cycles", 1, "Hard restarts of cosine_with_restarts.", type=int)
    optimizer("--lr_power", 1.0, "Power of the polynomial schedule.", type=float)
    optimizer("--use_8bit_adam", help="bitsandbytes 8-bit AdamW (less memory).", action="store_true")
    optimizer("--use_adafactor", help="Adafactor (the paper's optimizer for SDXL).", action="store_true")
    optimizer("--adam_beta1", 0.9, type=float)
    optimizer("--adam_beta2", 0.999, type=float)
    optimizer("--adam_weight_decay", 1e-2, type=float)
    optimizer("--adam_epsilon", 1e-8, type=float)
    optimizer("--max_grad_norm", 1.0, "Gradient clipping norm (0 disables).", type=float)
    optimizer("--max_consecutive_skipped_steps", 20, "Stop after this many non-finite steps in a row.", type=int)

    performance("--dataloader_num_workers", 0, "Worker processes for data loading.", type=int)
    performance(
        "--mixed_precision", help="no, fp16 or bf16 (overrides accelerate's config).", choices=["no", "fp16", "bf16"]
    )
    performance("--allow_tf32", help="Allow TF32 matmuls on Ampere and newer GPUs.", action="store_true")
    performance("--torch_compile", help="torch.compile the denoiser's repeated blocks.", action="store_true")

    checkpointing("--checkpointing_steps", 500, "A resumable checkpoint every N steps.", type=int)
    checkpointing("--checkpoints_total_limit", help="Keep at most this many checkpoints.", type=int)
    checkpointing("--resume_from_checkpoint", help="'latest' or a checkpoint folder to continue from.")

    log("--report_to", "tensorboard", "tensorboard, wandb, comet_ml, all or none.")
    log("--logging_dir", "logs", "Tracker folder, relative to --output_dir.")
    log("--tracker_name", "diffusion-dpo", "Project name for the trackers.")
    log("--run_validation", help="Render --validation_prompts during training.", action="store_true")
    log("--validation_steps", 200, "Held-out metrics and validation images every N steps.", type=int)
    log("--validation_prompts", DEFAULT_VALIDATION_PROMPTS, nargs="+")
    log("--num_validation_inference_steps", validation_steps, "Validation sampling steps.", type=int)
    log("--validation_guidance_scale", guidance_scale, "Validation guidance scale.", type=float)

    hub("--push_to_hub", help="Upload the result (not the checkpoints).", action="store_true")
    hub("--hub_model_id", help="Repository id (default: output_dir's name).")
    hub("--hub_token", help="Token for the Hub (prefer `hf auth login`).")
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
        "cosmap, --sft only; others not): diffusers' compute_density_for_timestep_sampling and "
        "compute_loss_weighting_for_sd3.",
    )
    flow("--logit_mean", type=float, default=0.0, help="Mean of the logit_normal scheme.")
    flow("--logit_std", type=float, default=1.0, help="Standard deviation of the logit_normal scheme.")
    flow("--mode_scale", type=float, default=1.29, help="Scale of the mode scheme.")


def add_quantize_base_option(groups):
    """--quantize_base (the Flux scripts' flag): a LoRA on a frozen base transformer held in 4 bits."""
    groups["model"].add_argument(
        "--quantize_base",
        choices=["nf4"],
        help="LoRA: hold the frozen transformer in 4 bits (bitsandbytes NF4, computed in the mixed-precision dtype), "
        "as diffusers' flux_lora_quantization example does; the LoRA weights stay fp32 and the reference is the same "
        "4-bit model with the adapter off. Needs a GPU and bitsandbytes.",
    )


def check_quantize_base(args):
    """--quantize_base needs LoRA, bitsandbytes, and what diffusers' 4-bit quantizer checks (a GPU)."""
    if args.quantize_base is None:
        return
    if args.train_mode != "lora":
        raise InputError("--quantize_base holds a frozen base in 4 bits under a LoRA: it needs --train_mode lora")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise InputError("--quantize_base nf4 needs `pip install bitsandbytes`")
    from diffusers import BitsAndBytesConfig
    from diffusers.quantizers.bitsandbytes import BnB4BitDiffusersQuantizer

    try:  # diffusers' own check of the machine (a GPU) and of the versions it needs
        BnB4BitDiffusersQuantizer(BitsAndBytesConfig(load_in_4bit=True)).validate_environment()
    except (RuntimeError, ImportError) as error:
        raise InputError(f"--quantize_base nf4: {str(error).splitlines()[0]}") from None


def lora_target_modules(args):
    """--lora_target_modules (the transformer scripts' flag) as a list of module names."""
    return [name.strip() for name in args.lora_target_modules.split(",") if name.strip()]


def finite_number(args, name, low=None, open_low=False):
    """Refuses a NaN or infinite value, and one below `low` (or at it, with `open_low`)."""
    value = getattr(args, name)
    if not math.isfinite(value) or (low is not None and (value < low or (open_low and value == low))):
        bound = "" if low is None else f" {'above' if open_low else 'at least'} {low:g}"
        raise InputError(f"--{name} must be a finite number{bound}, got {value}")


def check_args(args, family, resolution_multiple=8):
    """Refuses bad flag values and combinations before anything is loaded; fills defaults that depend on others."""
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
    for name in ("beta_dpo", "min_vote_margin", "adam_epsilon", "soft_label_temperature"):
        finite_number(args, name, 0, open_low=True)
    for name in ("adam_weight_decay", "max_grad_norm", "precompute_commit_seconds"):
        finite_number(args, name, 0)
    for name in ("lr_power", "validation_guidance_scale"):
        finite_number(args, name)
    if args.learning_rate is not None:
        finite_number(args, "learning_rate", 0, open_low=True)
    finite_number(args, "collapse_threshold", 1, open_low=True)  # 1: the model equals its reference
    held_out = args.num_validation_pairs or args.validation_split_name
    if args.stop_on_collapse and (args.loss_type == "mapo" or not held_out):
        raise InputError(
            "--stop_on_collapse compares held-out errors with the reference's: it needs --num_validation_pairs or "
            "--validation_split_name, and a reference (not --loss_type mapo)"
        )
    if getattr(args, "max_sequence_length", 1) not in range(1, 513):  # the transformer families' text length
        raise InputError(f"--max_sequence_length must lie in [1, 512], got {args.max_sequence_length}")
    if hasattr(args, "lora_target_modules") and not lora_target_modules(args):
        raise InputError("--lora_target_modules names no module")
    if hasattr(args, "weighting_scheme"):
        if args.weighting_scheme in ("sigma_sqrt", "cosmap") and not args.sft:  # sigma_sqrt: up to 1e5 at small sigma
            raise InputError(
                f"--weighting_scheme {args.weighting_scheme} weights both errors of a pair by its sigma, so beta "
                "would depend on the noise level; DPO and MaPO take logit_normal, mode or none (they draw sigma)"
            )
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
    if args.soft_labels and (
        args.label_smoothing or args.sft or args.loss_type != "sigmoid" or args.min_vote_margin != 1
    ):
        raise InputError(
            "--soft_labels weighs the sigmoid DPO loss by each pair's p: it needs --loss_type sigmoid, no --sft, no "
            "--label_smoothing (one p for all pairs) and no --min_vote_margin (votes give p)"
        )
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
