#!/usr/bin/env python
"""Offline proof that Diffusion-DPO aligns a model, on a 2-core CPU in a few minutes.

The base model (examples/assets/tiny-shapes-sd, made by examples/pretrain_tiny_ldm.py) draws warm (red, orange,
yellow) and cool (blue, cyan, green) shapes about half and half. We build preference pairs in which the warm image
always wins, train a LoRA with the real train_diffusion_dpo.py through `accelerate launch`, and report before -> after:

- held-out implicit accuracy and DPO loss (the trainer's own held-out evaluation: 0.5 and ln 2 before training);
- the fraction of generated samples of the preferred (warm) kind, by tiny_assets.classify_warm;
- and two guards against "winning" by collapse: the fraction of plausible samples (tiny_assets.is_plausible: gray
  background mostly intact, one flat shape) and the policy's held-out error on winners relative to the reference's.

It saves base-vs-DPO samples from the same seeds side by side (samples.png) and the training curves (curves.png).

    python examples/alignment_demo.py                 # one seed, about 2-3 minutes on 2 CPU cores
    python examples/alignment_demo.py --seeds 0 1 2   # the README's acceptance figures
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import tiny_assets
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import make_image_grid
from PIL import Image, ImageDraw
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


ROOT = Path(__file__).resolve().parents[1]
BASE_MODEL = ROOT / "examples" / "assets" / "tiny-shapes-sd"
SAMPLING = dict(num_inference_steps=20, guidance_scale=1.0, height=32, width=32)
# What "aligned without collapse" means here (stated in README): held-out implicit accuracy, warm-fraction gain in
# points, the largest allowed drop of plausible samples in points, the largest policy/reference winner-error ratio.
TARGETS = {"heldout_acc": 0.90, "warm_gain": 0.30, "plausible_drop": 0.10, "winner_error_ratio": 1.5}


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base_model", default=str(BASE_MODEL), help="the pretrained shapes model")
    parser.add_argument("--work_dir", default="demo-output", help="data, runs and pictures go here")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one training run per seed")
    parser.add_argument("--n_pairs", type=int, default=512, help="preference pairs, of which --n_heldout held out")
    parser.add_argument("--n_heldout", type=int, default=64)
    parser.add_argument("--n_samples", type=int, default=64, help="samples per model for the warm/plausible counts")
    parser.add_argument("--max_train_steps", type=int, default=300)
    parser.add_argument("--beta_dpo", type=float, default=5000.0)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=8)
    return parser.parse_args(input_args)


def train(args, data_dir, run_dir, seed):
    """The real trainer through `accelerate launch`, with held-out pairs evaluated every 25 steps."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(ROOT / "train_diffusion_dpo.py"),
        "--pretrained_model_name_or_path",
        args.base_model,
        "--dataset_name",
        str(data_dir),
        "--resolution",
        "32",
        "--train_batch_size",
        "16",
        "--max_train_steps",
        str(args.max_train_steps),
        "--beta_dpo",
        str(args.beta_dpo),
        "--learning_rate",
        str(args.learning_rate),
        "--lr_scheduler",
        "constant",
        "--rank",
        str(args.rank),
        "--num_validation_pairs",
        str(args.n_heldout),
        "--validation_steps",
        "25",
        "--report_to",
        "tensorboard",
        "--checkpointing_steps",
        "100000",
        "--seed",
        str(seed),
        "--output_dir",
        str(run_dir),
        "--precompute_cache_dir",
        str(Path(args.work_dir) / "cache"),
    ]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    completed = subprocess.run(command, env=environment, capture_output=True, text=True)
    if completed.returncode != 0:
        sys.exit(f"training failed:\n{completed.stderr[-3000:]}")


def logged_scalars(run_dir):
    """{tag: [(step, value), ...]} from the run's tensorboard logs."""
    events = EventAccumulator(str(run_dir / "logs" / "diffusion-dpo")).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@torch.no_grad()
def sample(pipeline, n_samples, seed):
    """n_samples images over the caption pool, sample i from generator seed (seed, i): the same for both models."""
    captions = [tiny_assets.CAPTION_POOL[i % len(tiny_assets.CAPTION_POOL)] for i in range(n_samples)]
    generators = [torch.Generator().manual_seed(10_000 * seed + i) for i in range(n_samples)]
    return pipeline(captions, generator=generators, **SAMPLING).images


def sample_statistics(images):
    return {
        "warm": sum(map(tiny_assets.classify_warm, images)) / len(images),
        "plausible": sum(map(tiny_assets.is_plausible, images)) / len(images),
    }


def plot_curves(scalars, path, size=(640, 300)):
    """Training loss and held-out implicit accuracy against steps, drawn with PIL (no plotting dependency)."""
    panels = [
        ("train loss", scalars["loss"], None),
        ("held-out implicit accuracy", scalars["eval/implicit_acc"], (0.0, 1.0)),
    ]
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    width = size[0] // len(panels)
    for number, (title, points, y_range) in enumerate(panels):
        left, top, right, bottom = number * width + 40, 30, (number + 1) * width - 10, size[1] - 30
        steps, values = zip(*points)
        low, high = y_range or (min(values), max(values) if max(values) > min(values) else min(values) + 1e-6)
        x = lambda s: left + (right - left) * (s - min(steps)) / max(1, max(steps) - min(steps))  # noqa: E731
        y = lambda v: bottom - (bottom - top) * (v - low) / (high - low)  # noqa: E731
        draw.rectangle((left, top, right, bottom), outline="gray")
        draw.line([(x(s), y(v)) for s, v in points], fill="crimson", width=2)
        draw.text((left, 8), title, fill="black")
        draw.text((left - 36, top), f"{high:.3g}", fill="black")
        draw.text((left - 36, bottom - 10), f"{low:.3g}", fill="black")
        draw.text((right - 40, bottom + 6), f"step {max(steps)}", fill="black")
    image.save(path)


def run_seed(args, data_dir, seed):
    run_dir = Path(args.work_dir) / f"run-seed{seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    start = time.time()
    train(args, data_dir, run_dir, seed)
    scalars = logged_scalars(run_dir)
    before, after = (
        {t: v[0][1] for t, v in scalars.items() if t.startswith("eval/")},
        {t: v[-1][1] for t, v in scalars.items() if t.startswith("eval/")},
    )

    pipeline = StableDiffusionPipeline.from_pretrained(
        args.base_model, safety_checker=None, requires_safety_checker=False
    )
    pipeline.set_progress_bar_config(disable=True)
    base_images = sample(pipeline, args.n_samples, seed)
    pipeline.load_lora_weights(str(run_dir))
    dpo_images = sample(pipeline, args.n_samples, seed)
    base, dpo = sample_statistics(base_images), sample_statistics(dpo_images)

    shown = min(16, args.n_samples)
    make_image_grid(
        [im.resize((64, 64), Image.NEAREST) for im in base_images[:shown] + dpo_images[:shown]], rows=2, cols=shown
    ).save(run_dir / "samples.png")  # top: base, bottom: DPO, same seeds
    plot_curves(scalars, run_dir / "curves.png")
    result = {
        "seed": seed,
        "run_dir": str(run_dir),
        "seconds": round(time.time() - start, 1),
        "heldout_acc": [before["eval/implicit_acc"], after["eval/implicit_acc"]],
        "heldout_loss": [before["eval/loss"], after["eval/loss"]],
        "warm_fraction": [base["warm"], dpo["warm"]],
        "plausible_fraction": [base["plausible"], dpo["plausible"]],
        "winner_error_ratio": after["eval/model_mse_w"] / after["eval/ref_mse_w"],
    }
    result["passed"] = {
        "heldout_acc": result["heldout_acc"][1] >= TARGETS["heldout_acc"],
        "warm_gain": dpo["warm"] - base["warm"] >= TARGETS["warm_gain"],
        "plausible_drop": base["plausible"] - dpo["plausible"] <= TARGETS["plausible_drop"],
        "winner_error_ratio": result["winner_error_ratio"] <= TARGETS["winner_error_ratio"],
    }
    (run_dir / "demo_result.json").write_text(json.dumps(result, indent=2))
    return result


def verdict(passed):
    return "PASS" if all(passed.values()) else "FAIL: " + ", ".join(name for name, ok in passed.items() if not ok)


def main(args):
    data_dir = Path(args.work_dir) / f"pairs-{args.n_pairs}"
    if not data_dir.exists():
        tiny_assets.build_pickapic_dataset(str(data_dir), n_pairs=args.n_pairs, n_ties=0, seed=1234)
    results = [run_seed(args, data_dir, seed) for seed in args.seeds]
    print(
        f"\nDiffusion-DPO on {args.n_pairs - args.n_heldout} pairs (warm preferred), {args.max_train_steps} steps, "
        f"beta {args.beta_dpo:g}, LoRA rank {args.rank}, lr {args.learning_rate:g}; before -> after:"
    )
    for r in results:
        print(
            f"seed {r['seed']} ({r['seconds']} s): held-out implicit accuracy {r['heldout_acc'][0]:.3f} -> "
            f"{r['heldout_acc'][1]:.3f}, held-out DPO loss {r['heldout_loss'][0]:.4f} -> {r['heldout_loss'][1]:.4f}, "
            f"warm samples {r['warm_fraction'][0]:.2f} -> {r['warm_fraction'][1]:.2f}, plausible samples "
            f"{r['plausible_fraction'][0]:.2f} -> {r['plausible_fraction'][1]:.2f}, winner error vs reference "
            f"x{r['winner_error_ratio']:.3f}  [{verdict(r['passed'])}]"
        )
        print(f"  pictures: {r['run_dir']}/samples.png (top base, bottom DPO), {r['run_dir']}/curves.png")
    return results


if __name__ == "__main__":
    main(parse_args())
