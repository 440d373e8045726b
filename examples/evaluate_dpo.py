#!/usr/bin/env python
# Copyright 2026 The Diffusion-DPO toolkit authors. Licensed under the Apache License, Version 2.0.
"""Compare a Diffusion-DPO fine-tune with its base model: same prompts, same seeds, scored by preference models.

Top to bottom: arguments -> prompts -> images of the base model, then of the tuned one (one model in memory at a
time) -> scores per scorer (one scorer in memory at a time) -> mean scores, win rates with 95% Wilson intervals,
results.json, the printed table, and grids of the biggest wins and losses.

    python examples/evaluate_dpo.py --base_model stable-diffusion-v1-5/stable-diffusion-v1-5 --tuned sd15-dpo-lora \
        --prompts_dataset yuvalkirstain/pickapic_v2 --prompts_split validation_unique --mixed_precision fp16

`--mode implicit_accuracy` instead measures the paper's implicit-reward accuracy of the tuned model on a split of
preference pairs, with the held-out evaluation of the trainer script of the base model's family (SD 1.x/2.x, SDXL or
SD3, from its model_index.json; no images are generated). Flags this script does not know are that trainer's, passed
on as the run was trained with (e.g. --is_turbo, --no_t5, --max_sequence_length 77):

    python examples/evaluate_dpo.py --mode implicit_accuracy --base_model stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --tuned sd15-dpo-lora --preference_dataset yuvalkirstain/pickapic_v2 --preference_split validation
"""

import gc
import inspect
import json
import math
import os
import sys
import textwrap
from pathlib import Path

import repo_paths  # noqa: F401  (puts the trainer scripts on sys.path)
import datasets
import torch
from diffusers import AutoPipelineForText2Image, DiffusionPipeline
from PIL import Image, ImageDraw, ImageFont
from reward_models import SCORERS, add_scorer_model_arguments, check_scorer_available, load_scorer, score_images
from safetensors import safe_open
from tqdm.auto import tqdm

import train_diffusion_dpo
import train_diffusion_dpo_flux
import train_diffusion_dpo_flux2
import train_diffusion_dpo_sd3
import train_diffusion_dpo_sdxl
from diffusion_dpo import InputError
from diffusion_dpo.args import OneLineErrorParser
from diffusion_dpo.cache import CacheRequest, load_or_precompute
from diffusion_dpo.data import load_preference_pairs
from diffusion_dpo.evaluation import evaluate_held_out
from diffusion_dpo.family import build_models
from diffusion_dpo.outputs import LORA_WEIGHT_NAME, load_lora_into


# one per model family
TRAINERS = (
    train_diffusion_dpo,
    train_diffusion_dpo_sdxl,
    train_diffusion_dpo_sd3,
    train_diffusion_dpo_flux,
    train_diffusion_dpo_flux2,
)
Z_95 = 1.959963984540054  # standard normal quantile for a two-sided 95% interval
GRID_CELL = 384  # side of one image in the wins/losses grids, in pixels


# ----------------------------------------------------------------------------------------------------------------
# 1. Arguments
# ----------------------------------------------------------------------------------------------------------------


def parse_args(input_args=None):
    parser = OneLineErrorParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mode",
        default="generate",
        choices=["generate", "implicit_accuracy"],
        help="generate: images from both models, scored by reward models; implicit_accuracy: the paper's "
        "implicit-reward accuracy on preference pairs (see the preference-pairs flags).",
    )
    models = parser.add_argument_group("models")
    models.add_argument("--base_model", required=True, help="Hub id or local folder of the base diffusers pipeline.")
    models.add_argument("--revision", default=None, help="Revision of --base_model.")
    models.add_argument("--variant", default=None, help="Weight variant of --base_model, e.g. 'fp16'.")
    models.add_argument(
        "--tuned",
        required=True,
        help="Local folder of the tuned model: a LoRA output or checkpoint folder (pytorch_lora_weights.safetensors), "
        "a full pipeline folder (model_index.json), or a full fine-tuning checkpoint folder (unet/ or transformer/).",
    )

    prompts = parser.add_argument_group("prompts (one source)")
    source = prompts.add_mutually_exclusive_group()
    source.add_argument("--prompts_file", help="Text file, one prompt per line (blank lines are skipped).")
    source.add_argument("--prompts_dataset", help="Hub id, local folder or .parquet file of a dataset of prompts.")
    prompts.add_argument("--prompts_split", default="train", help="Split of --prompts_dataset.")
    prompts.add_argument("--prompts_column", default="caption", help="Column of --prompts_dataset with the prompts.")
    prompts.add_argument("--num_prompts", type=int, default=None, help="Use the first N prompts (default: all).")

    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--seed", type=int, default=0, help="Prompt i is rendered with seed + i by both models.")
    sampling.add_argument("--num_inference_steps", type=int, default=50)
    sampling.add_argument(
        "--guidance_scale", type=float, default=None, help="Default: the pipeline's own (7.5 for SD 1.5, 5 for SDXL)."
    )
    sampling.add_argument("--resolution", type=int, default=None, help="Square side in pixels (default: the model's).")
    sampling.add_argument(
        "--mixed_precision",
        default="no",
        choices=["no", "fp16", "bf16"],
        help="Weights dtype of the pipeline and the scorers.",
    )
    sampling.add_argument("--batch_size", type=int, default=4, help="Prompts per pipeline call and per scorer call.")

    scoring = parser.add_argument_group("scoring")
    scoring.add_argument(
        "--scorers",
        default="pickscore",
        help=f"Comma-separated, from {', '.join(SCORERS)}. The first one picks the grids' prompts.",
    )
    add_scorer_model_arguments(scoring)

    pairs = parser.add_argument_group("preference pairs (--mode implicit_accuracy)")
    pairs.add_argument(
        "--preference_dataset", help="Hub id, local folder or .parquet file in any layout the trainers read."
    )
    pairs.add_argument("--preference_split", default="validation", help="Split of --preference_dataset.")
    pairs.add_argument("--num_pairs", type=int, default=None, help="A seeded random subset of this many pairs.")
    pairs.add_argument(
        "--validation_timesteps",
        type=int,
        default=10,
        help="Fixed (timestep, noise) draws per pair; errors are averaged over them (paper: 10).",
    )
    pairs.add_argument(
        "--beta_dpo",
        type=float,
        default=None,
        help="Only changes the reported loss and margin (default: the trainer's: 2000, SDXL 5000, SD3 and Flux 500, "
        "FLUX.2 [klein] 200).",
    )
    pairs.add_argument("--precompute_cache_dir", default=None, help="Where the trainer caches latents of the pairs.")

    output = parser.add_argument_group("output")
    output.add_argument("--output_dir", default="dpo-eval")
    output.add_argument(
        "--num_grid_prompts", type=int, default=8, help="Rows of biggest_wins.png and biggest_losses.png."
    )

    parser.epilog = (
        "--mode implicit_accuracy: any other flag is the trainer script's own, passed on to it as the run was trained "
        "with (--is_turbo for SDXL-Turbo, --no_t5 and --max_sequence_length for SD3, ...)."
    )
    args, args.trainer_flags = parser.parse_known_args(input_args)
    try:
        validate_args(args)
    except InputError as error:
        parser.error(str(error))
    return args


def validate_args(args):
    """Rejects bad input before any model or data is loaded."""
    if args.trainer_flags and args.mode != "implicit_accuracy":
        raise InputError(f"unrecognized arguments: {' '.join(args.trainer_flags)}")
    if args.mode == "implicit_accuracy":
        if args.preference_dataset is None:
            raise InputError("--mode implicit_accuracy needs --preference_dataset")
        args.tuned_kind = tuned_kind(args.tuned)
        if os.path.exists(os.path.join(args.output_dir, "implicit_accuracy.json")):
            raise InputError(f"--output_dir {args.output_dir} already holds an evaluation; choose a new --output_dir")
        return
    if args.prompts_file is None and args.prompts_dataset is None:
        raise InputError("one of the arguments --prompts_file --prompts_dataset is required")
    args.scorers = [name.strip() for name in args.scorers.split(",") if name.strip()]
    unknown = [name for name in args.scorers if name not in SCORERS]
    if unknown or not args.scorers:
        raise InputError(f"--scorers: unknown {unknown or 'empty list'}; choose from {', '.join(SCORERS)}")
    for name in ("num_prompts", "num_inference_steps", "batch_size", "num_grid_prompts"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise InputError(f"--{name} must be at least 1")
    if args.resolution is not None and (args.resolution < 8 or args.resolution % 8 != 0):
        raise InputError(f"--resolution must be a positive multiple of 8, got {args.resolution}")
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise InputError("--mixed_precision fp16 needs a CUDA GPU; use bf16 or no on the CPU")
    if args.prompts_file is not None and not os.path.isfile(args.prompts_file):
        raise InputError(f"--prompts_file {args.prompts_file}: no such file")
    args.tuned_kind = tuned_kind(args.tuned)
    if os.path.exists(os.path.join(args.output_dir, "results.json")) or os.path.exists(
        os.path.join(args.output_dir, "images")
    ):
        raise InputError(f"--output_dir {args.output_dir} already holds an evaluation; choose a new --output_dir")
    for name in args.scorers:  # last: importing them can take seconds
        check_scorer_available(name)


def tuned_kind(path):
    """'lora', 'pipeline', or the trained component of a full fine-tuning checkpoint ('unet' or 'transformer'), from
    what the folder holds."""
    if not os.path.isdir(path):
        raise InputError(
            f"--tuned {path}: no such folder (download a Hub model first, e.g. `hf download ID --local-dir DIR`)"
        )
    if os.path.isfile(os.path.join(path, LORA_WEIGHT_NAME)):
        return "lora"
    if os.path.isfile(os.path.join(path, "model_index.json")):
        return "pipeline"
    for denoiser in ("unet", "transformer"):
        if os.path.isfile(os.path.join(path, denoiser, "config.json")):
            return denoiser
    raise InputError(
        f"--tuned {path} holds neither {LORA_WEIGHT_NAME} (LoRA) nor model_index.json (pipeline) "
        "nor unet/ or transformer/ (full fine-tuning checkpoint)"
    )


def trainer_for(model, revision=None):
    """The trainer script of the model's family, from the pipeline class its model_index.json names."""
    try:
        class_name = DiffusionPipeline.load_config(model, revision=revision)["_class_name"]
    except Exception as error:  # no such folder or Hub id, no model_index.json
        raise InputError(f"cannot read the pipeline config of {model}: {str(error).splitlines()[0]}") from None
    for trainer in TRAINERS:
        if trainer.FAMILY.pipeline_class.__name__ == class_name:
            return trainer
    families = ", ".join(trainer.FAMILY.pipeline_class.__name__ for trainer in TRAINERS)
    raise InputError(f"{model} is a {class_name}; the trainer scripts train {families}")


def denoiser_class(family):
    """The class of the family's trained component (UNet2DConditionModel, SD3Transformer2DModel), as its pipeline
    declares it."""
    return inspect.signature(family.pipeline_class.__init__).parameters[family.denoiser].annotation


# ----------------------------------------------------------------------------------------------------------------
# 2. Prompts
# ----------------------------------------------------------------------------------------------------------------


def load_prompts(args):
    """The first --num_prompts prompts of --prompts_file or --prompts_dataset, in their order."""
    if args.prompts_file is not None:
        with open(args.prompts_file, encoding="utf-8") as file:
            prompts = [line.strip() for line in file if line.strip()]
        source = args.prompts_file
    else:
        # Streamed: only this split's files are read, and only as far as needed (Pick-a-Pic's train split is
        # hundreds of GB, and a plain load_dataset would download every split).
        name, column = args.prompts_dataset, args.prompts_column
        try:
            if os.path.isfile(name):
                dataset = datasets.load_dataset("parquet", data_files=name, split="train", streaming=True)
            else:
                dataset = datasets.load_dataset(name, split=args.prompts_split, streaming=True)
            columns = dataset.column_names or list(next(iter(dataset), {}))
        except Exception as error:
            raise InputError(f"cannot load dataset '{name}' split '{args.prompts_split}': {error}".splitlines()[0])
        if column not in columns:
            raise InputError(
                f"dataset '{name}' has no column '{column}' (it has {columns}); name it with --prompts_column"
            )
        prompts = []
        for row in dataset.select_columns([column]):
            if isinstance(row[column], str) and row[column].strip():
                prompts.append(row[column].strip())
            if len(prompts) == args.num_prompts:
                break
        source = f"dataset '{name}' split '{args.prompts_split}' column '{column}'"
    if not prompts:
        raise InputError(f"no prompts in {source}")
    return prompts[: args.num_prompts]


# ----------------------------------------------------------------------------------------------------------------
# 3. Images: the base model, then the tuned one, in one pipeline where possible
# ----------------------------------------------------------------------------------------------------------------


def load_pipeline(model, dtype, device, revision=None, variant=None):
    """Any text-to-image diffusers pipeline (SD 1.x/2.x, SDXL, ...); the safety checker is left out, since a
    blacked-out image would count as a loss for whichever model happened to trigger it."""
    config = DiffusionPipeline.load_config(model, revision=revision)
    no_safety_checker = (
        {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in config else {}
    )
    pipeline = AutoPipelineForText2Image.from_pretrained(
        model, dtype=dtype, revision=revision, variant=variant, **no_safety_checker
    ).to(device)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def load_tuned_weights(pipeline, args, dtype, device):
    """Turns the base pipeline into the tuned model in place: the LoRA on top of its UNet or transformer, or a
    trained one instead of its own (swapped while the new one is still on the CPU, so the device never holds both)."""
    if args.tuned_kind == "lora":
        pipeline.load_lora_weights(args.tuned, weight_name=LORA_WEIGHT_NAME)
    else:
        denoiser = args.tuned_kind  # unet or transformer
        trained = type(getattr(pipeline, denoiser)).from_pretrained(args.tuned, subfolder=denoiser, dtype=dtype)
        setattr(pipeline, denoiser, trained)
        free_memory()
        trained.to(device)


def generate(
    pipeline, prompts, seed, image_dir, num_inference_steps, guidance_scale=None, resolution=None, batch_size=4
):
    """Renders prompt i with its own CPU generator seeded seed + i (so the starting noise does not depend on the
    batching or the device) and saves it as image_dir/iiii.png; returns the paths."""
    image_dir.mkdir(parents=True, exist_ok=True)
    extra = {} if guidance_scale is None else {"guidance_scale": guidance_scale}
    paths = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=f"Generating {image_dir.name}"):
        batch = prompts[start : start + batch_size]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(batch))]
        images = pipeline(
            prompt=batch,
            generator=generators,
            num_inference_steps=num_inference_steps,
            height=resolution,
            width=resolution,
            **extra,
        ).images
        for index, image in enumerate(images, start=start):
            paths.append(image_dir / f"{index:04d}.png")
            image.save(paths[-1])
    return paths


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------
# 4. Statistics and reports
# ----------------------------------------------------------------------------------------------------------------


def win_rate_with_ci(base_scores, tuned_scores, z=Z_95):
    """Fraction of prompts where the tuned image scores higher than the base image (exact ties count half), with a
    Wilson score interval (95% by default) on that fraction. Returns a dict: win_rate, ci_low, ci_high, wins, ties,
    losses, n. Counting a tie as half a win slightly overstates the variance when there are many ties."""
    if len(base_scores) != len(tuned_scores) or not base_scores:
        raise ValueError("need the same positive number of base and tuned scores")
    pairs = list(zip(base_scores, tuned_scores))
    wins = sum(tuned > base for base, tuned in pairs)
    ties = sum(tuned == base for base, tuned in pairs)
    n = len(pairs)
    rate = (wins + 0.5 * ties) / n
    center = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half_width = z / (1 + z * z / n) * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
    return {
        "win_rate": rate,
        "ci_low": max(0.0, center - half_width),
        "ci_high": min(1.0, center + half_width),
        "wins": wins,
        "ties": ties,
        "losses": n - wins - ties,
        "n": n,
    }


def summary_table(summary):
    lines = [
        f"{'scorer':<14}{'base mean':>12}{'tuned mean':>12}{'win rate':>10}  {'95% CI (Wilson)':<16}"
        f"{'wins/ties/losses':>18}"
    ]
    for name, s in summary.items():
        interval, counts = f"[{s['ci_low']:.3f}, {s['ci_high']:.3f}]", f"{s['wins']}/{s['ties']}/{s['losses']}"
        lines.append(
            f"{name:<14}{s['base_mean']:>12.4f}{s['tuned_mean']:>12.4f}{s['win_rate']:>10.3f}  "
            f"{interval:<16}{counts:>18}"
        )
    return "\n".join(lines)


def comparison_grid(rows, scorer, title):
    """One row per prompt: base | tuned, under a line with the index, the scores and the prompt."""
    font = ImageFont.load_default(size=15)
    width, text_height = 2 * GRID_CELL, 68
    grid = Image.new("RGB", (width, 30 + max(1, len(rows)) * (text_height + GRID_CELL)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((6, 6), f"{title} ({scorer}): base (left) | tuned (right)", fill="black", font=font)
    if not rows:
        draw.text((6, 40), "none", fill="black", font=font)
    for number, row in enumerate(rows):
        top = 30 + number * (text_height + GRID_CELL)
        header = (
            f"#{row['index']}  base {row['base']:.4g}  tuned {row['tuned']:.4g}  ({row['tuned'] - row['base']:+.4g})"
        )
        prompt = textwrap.shorten(row["prompt"], width=2 * 85, placeholder=" ...")
        draw.multiline_text(
            (6, top + 4), "\n".join([header, *textwrap.wrap(prompt, width=85)]), fill="black", font=font, spacing=2
        )
        for column, path in enumerate((row["base_path"], row["tuned_path"])):
            image = Image.open(path).convert("RGB").resize((GRID_CELL, GRID_CELL))
            grid.paste(image, (column * GRID_CELL, top + text_height))
    return grid


# ----------------------------------------------------------------------------------------------------------------
# 5. main: prompts -> images -> scores -> report
# ----------------------------------------------------------------------------------------------------------------


def implicit_accuracy(args):
    """The paper's implicit-reward accuracy of the tuned model (reference: the base model) on preference pairs,
    computed by the code the trainer script of the base model's family evaluates held-out pairs with: its data
    loading and latent cache, its noise (load_noise), its model and reference (build_models) and evaluate_held_out
    (fixed noise and noise levels per pair, exact ties counting half). Writes implicit_accuracy.json."""
    from accelerate import Accelerator

    trainer = trainer_for(args.base_model, args.revision)
    family = trainer.FAMILY
    lora = args.tuned_kind == "lora"
    if not lora and args.tuned_kind != "pipeline" and args.tuned_kind != family.denoiser:
        raise InputError(f"--tuned {args.tuned} holds a {args.tuned_kind}; {args.base_model} has a {family.denoiser}")
    rank, targets = lora_settings(args.tuned, family) if lora else (None, None)
    # The trainer's own flags, parsed by its parse_args (which reads nothing but configs): its defaults fill in the
    # rest. No --output_dir: nothing is trained or written there.
    argv = [
        *("--pretrained_model_name_or_path", args.base_model, "--dataset_name", args.preference_dataset),
        *("--dataset_split_name", args.preference_split, "--validation_timesteps", str(args.validation_timesteps)),
        *("--seed", str(args.seed), "--report_to", "none", "--train_mode", "lora" if lora else "full"),
        *("--train_batch_size", str(args.batch_size), "--no_hflip"),
    ]
    for flag, value in (  # unset here: the trainer's own default
        ("--beta_dpo", args.beta_dpo),
        ("--resolution", args.resolution),
        ("--revision", args.revision),
        ("--variant", args.variant),
        ("--precompute_cache_dir", args.precompute_cache_dir),
        ("--rank", rank),
    ):
        if value is not None:
            argv += [flag, str(value)]
    trainer_args = trainer.parse_args(argv + args.trainer_flags)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)

    dataset = load_preference_pairs(trainer_args, args.preference_split)
    if args.num_pairs is not None:
        dataset = dataset.subset(dataset.sample(args.num_pairs, args.seed))
    (pairs,) = load_or_precompute(trainer_args, family, [CacheRequest(dataset)], accelerator, weight_dtype)
    noise = trainer.load_noise(trainer_args)  # the noise the trainer trains and evaluates with
    # LoRA: the base model with the tuned adapter, its reference the same model with the adapter off; full: the
    # tuned weights in the trained copy, the base model as the frozen reference, both held as the trainer holds them
    model_class = denoiser_class(family)
    targets = targets or default_lora_targets(trainer, trainer_args)
    model, reference = build_models(trainer_args, family, model_class, targets, accelerator)
    if lora:
        load_lora_into(model, family, args.tuned)
    else:
        model.load_state_dict(model_class.from_pretrained(args.tuned, subfolder=family.denoiser).state_dict())
    model = accelerator.prepare_model(model, evaluation_mode=True)  # mixed precision: autocast, as in training
    metrics, _ = evaluate_held_out(accelerator, model, reference, family, noise, pairs, trainer_args)
    results = {
        "base_model": args.base_model,
        "tuned": args.tuned,
        "tuned_kind": args.tuned_kind,
        "preference_dataset": args.preference_dataset,
        "preference_split": args.preference_split,
        "num_pairs": len(pairs),
        "validation_timesteps": args.validation_timesteps,
        "seed": args.seed,
        **{name.removeprefix("eval/"): value for name, value in metrics.items()},
    }
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "implicit_accuracy.json"), "w") as file:
        json.dump(results, file, indent=2)
    print(
        f"Implicit-reward accuracy of {args.tuned} on {len(pairs)} pairs of {args.preference_dataset} "
        f"({args.preference_split}): {results['implicit_acc']:.4f} (reward margin {results['reward_margin']:.4g}, "
        f"loss {results['loss']:.4f})"
    )
    return results


def default_lora_targets(trainer, trainer_args):
    """The modules the trainer puts LoRA layers on by default (SD3: --lora_target_modules)."""
    if hasattr(trainer, "lora_target_modules"):
        return trainer.lora_target_modules(trainer_args)
    return trainer.LORA_TARGET_MODULES


def lora_settings(folder, family):
    """(rank, target modules) of a saved LoRA: from the adapter config diffusers stores in the file, or, in a file
    without one, the rank read off its weight shapes and no targets (the trainer's default ones)."""
    with safe_open(os.path.join(folder, LORA_WEIGHT_NAME), framework="pt") as weights:
        config = json.loads((weights.metadata() or {}).get("lora_adapter_metadata", "{}"))
        prefix = f"{family.denoiser}."
        if f"{prefix}r" in config:
            return config[f"{prefix}r"], sorted(config.get(f"{prefix}target_modules") or []) or None
        name = next(k for k in weights.keys() if "lora_A" in k or "lora.down" in k)
        return weights.get_slice(name).get_shape()[0], None


def main(args):
    """Generates, scores and reports; returns the results dict that is also written to results.json."""
    if args.mode == "implicit_accuracy":
        return implicit_accuracy(args)
    prompts = load_prompts(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    output_dir = Path(args.output_dir)
    print(
        f"Evaluating {args.tuned} ({args.tuned_kind}) against {args.base_model} on {len(prompts)} prompts, "
        f"device {device}, {dtype}."
    )

    # The same prompts and seeds for both models; the base model first, then the tuned one in its place.
    sampling = dict(
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        resolution=args.resolution,
        batch_size=args.batch_size,
    )
    pipeline = load_pipeline(args.base_model, dtype, device, args.revision, args.variant)
    base_paths = generate(pipeline, prompts, args.seed, output_dir / "images" / "base", **sampling)
    if args.tuned_kind == "pipeline":  # a pipeline of its own: drop the base one first
        del pipeline
        free_memory()
        pipeline = load_pipeline(args.tuned, dtype, device)
    else:
        load_tuned_weights(pipeline, args, dtype, device)
    tuned_paths = generate(pipeline, prompts, args.seed, output_dir / "images" / "tuned", **sampling)
    del pipeline
    free_memory()

    scores = {}
    for name in args.scorers:
        scorer = load_scorer(name, args, device, dtype)
        scores[name] = {
            "base": score_images(scorer, base_paths, prompts, args.batch_size),
            "tuned": score_images(scorer, tuned_paths, prompts, args.batch_size),
        }
        del scorer
        free_memory()

    summary = {}
    for name, s in scores.items():
        summary[name] = {
            "base_mean": sum(s["base"]) / len(prompts),
            "tuned_mean": sum(s["tuned"]) / len(prompts),
            **win_rate_with_ci(s["base"], s["tuned"]),
        }
    results = {
        "base_model": args.base_model,
        "tuned": args.tuned,
        "tuned_kind": args.tuned_kind,
        "num_prompts": len(prompts),
        "settings": {
            k: getattr(args, k)
            for k in (
                "seed",
                "num_inference_steps",
                "guidance_scale",
                "resolution",
                "mixed_precision",
                "prompts_file",
                "prompts_dataset",
                "prompts_split",
                "prompts_column",
            )
        },
        "win_rate_definition": "fraction of prompts where tuned scores higher than base, exact ties count half; "
        "95% Wilson score interval",
        "scorers": summary,
        "per_prompt": [
            {
                "index": i,
                "prompt": prompt,
                "base_image": str(base_paths[i]),
                "tuned_image": str(tuned_paths[i]),
                "scores": {name: {"base": s["base"][i], "tuned": s["tuned"][i]} for name, s in scores.items()},
            }
            for i, prompt in enumerate(prompts)
        ],
    }
    with open(output_dir / "results.json", "w") as file:
        json.dump(results, file, indent=2)

    # The prompts where the first scorer moved most, in each direction.
    first = args.scorers[0]
    rows = [
        {
            "index": i,
            "prompt": prompts[i],
            "base": scores[first]["base"][i],
            "tuned": scores[first]["tuned"][i],
            "base_path": base_paths[i],
            "tuned_path": tuned_paths[i],
        }
        for i in range(len(prompts))
    ]
    rows.sort(key=lambda row: row["tuned"] - row["base"], reverse=True)
    wins = [row for row in rows if row["tuned"] > row["base"]][: args.num_grid_prompts]
    losses = [row for row in reversed(rows) if row["tuned"] < row["base"]][: args.num_grid_prompts]
    comparison_grid(wins, first, "Biggest wins of the tuned model").save(output_dir / "biggest_wins.png")
    comparison_grid(losses, first, "Biggest losses of the tuned model").save(output_dir / "biggest_losses.png")

    print(
        f"\n{len(prompts)} prompts; win rate = tuned beats base on a prompt (ties count half), 95% Wilson interval\n"
    )
    print(summary_table(summary))
    print(
        f"\nWrote {output_dir / 'results.json'}, {output_dir / 'biggest_wins.png'}, "
        f"{output_dir / 'biggest_losses.png'} and the images under {output_dir / 'images'}"
    )
    return results


if __name__ == "__main__":
    try:
        main(parse_args())
    except InputError as error:
        sys.exit(f"error: {error}")
