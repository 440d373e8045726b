#!/usr/bin/env python
"""Offline proof that Diffusion-DPO aligns a model, on a 2-core CPU in a few minutes.

The base model (examples/assets/tiny-shapes-sd, made by examples/pretrain_tiny_ldm.py) draws warm (red, orange,
yellow) and cool (blue, cyan, green) shapes about half and half. We build preference pairs in which the warm image
always wins, train a LoRA with the real train_diffusion_dpo.py through `accelerate launch`, and report before -> after:

- held-out implicit accuracy and DPO loss (the trainer's own held-out evaluation: 0.5 and ln 2 before training);
- the fraction of generated samples of the preferred (warm) kind, by demo_scoring.classify_warm;
- and two guards against "winning" by collapse: the fraction of plausible samples (demo_scoring.is_plausible: gray
  background mostly intact, one flat shape) and the policy's held-out error on winners relative to the reference's.

While the trainer runs, its progress bar (step, loss, last held-out accuracy) is shown; everything it logs goes to
train.log in the run folder. It saves base-vs-DPO samples from the same seeds side by side (samples.png) and the
training curves (curves.png, drawn with matplotlib: examples/requirements.txt).

    python examples/alignment_demo.py                     # one seed, about 3 minutes on 2 CPU cores
    python examples/alignment_demo.py --seeds 0 1 2 3 4   # docs/alignment-demo.md's table
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import quiet_notices  # noqa: F401  (before the libraries: their notices mean nothing to someone watching the demo)
import repo_paths
import tiny_assets
import torch
from demo_scoring import classify_warm, is_plausible
from diffusers import StableDiffusionPipeline
from diffusers.utils import make_image_grid
from matplotlib.figure import Figure
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


BASE_MODEL = repo_paths.ROOT / "examples" / "assets" / "tiny-shapes-sd"
SAMPLING = dict(num_inference_steps=20, guidance_scale=1.0, height=32, width=32)
SAMPLING_BATCH = 64
VALIDATION_STEPS = 25  # held-out evaluation, and a progress line when the output is not a terminal
VALIDATION_TIMESTEPS = 5  # (timestep, noise) draws per held-out pair: the accuracy saturates early, 5 is plenty
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
    parser.add_argument(
        "--n_samples", type=int, default=256, help="samples per model for the warm/plausible fractions (1/256 each)"
    )
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
        "--num_cpu_threads_per_process",  # accelerate's default on a CPU without `--cpu` is 1 thread
        str(torch.get_num_threads()),
        str(repo_paths.ROOT / "train_diffusion_dpo.py"),
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
        str(VALIDATION_STEPS),
        "--validation_timesteps",
        str(VALIDATION_TIMESTEPS),
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
    run_dir.mkdir(parents=True)
    log_path = run_dir / "train.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        show_progress(process.stdout, log)
        if process.wait() != 0:
            sys.exit(f"training failed (exit {process.returncode}); the end of {log_path}:\n{tail(log_path)}")


def show_progress(output, log):
    """Copies the trainer's output to `log`; of it, shows only the trainer's progress bar ("Steps: ... loss=...,
    eval_acc=..."): redrawn in place on a terminal, otherwise as it stood when it left each VALIDATION_STEPS-th step
    (after that step's held-out evaluation) and at the end."""
    on_terminal = sys.stdout.isatty()
    pending, latest, latest_step = b"", None, None
    while chunk := output.read1(65536):
        log.write(chunk)
        log.flush()  # train.log can be followed while the trainer runs
        *segments, pending = re.split(rb"[\r\n]", pending + chunk)  # tqdm redraws its bar after a carriage return
        for segment in segments:
            text = segment.decode(errors="replace").strip()
            bar = re.match(r"Steps:.*?\|\s*(\d+)/\d+", text)
            if bar is None:
                continue
            if on_terminal:
                print(f"\r  {text}\x1b[K", end="", flush=True)  # ESC [K: clear the rest of a longer bar
            elif latest_step is not None and int(bar.group(1)) != latest_step and latest_step % VALIDATION_STEPS == 0:
                print(f"  {latest}", flush=True)
            latest, latest_step = text, int(bar.group(1))
    if on_terminal:
        print()
    elif latest is not None:
        print(f"  {latest}", flush=True)


def tail(path, lines=30):
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])


def logged_scalars(run_dir):
    """{tag: [(step, value), ...]} from the run's tensorboard logs."""
    events = EventAccumulator(str(run_dir / "logs" / "diffusion-dpo")).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@torch.no_grad()
def sample(pipeline, n_samples, seed):
    """n_samples images over the caption pool, sample i from generator seed (seed, i): the same for both models."""
    images = []
    for start in range(0, n_samples, SAMPLING_BATCH):
        numbers = range(start, min(n_samples, start + SAMPLING_BATCH))
        captions = [tiny_assets.CAPTION_POOL[i % len(tiny_assets.CAPTION_POOL)] for i in numbers]
        generators = [torch.Generator().manual_seed(10_000 * seed + i) for i in numbers]
        images += pipeline(captions, generator=generators, **SAMPLING).images
    return images


def sample_statistics(images):
    return {
        "warm": sum(map(classify_warm, images)) / len(images),
        "plausible": sum(map(is_plausible, images)) / len(images),
    }


def plot_curves(scalars, path):
    """Training loss (per step, and its running mean), held-out implicit accuracy and loss, and the held-out error
    ratios policy/reference on winners and losers (run health) against steps."""
    figure = Figure(figsize=(13, 3.6), layout="constrained")
    loss_axes, accuracy_axes, heldout_loss_axes, ratio_axes = figure.subplots(1, 4)
    steps, losses = zip(*scalars["loss"])
    window = 10
    running = [
        sum(losses[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(losses))
    ]
    loss_axes.plot(steps, losses, color="tab:gray", alpha=0.4, linewidth=0.8, label="per step")
    loss_axes.plot(steps, running, color="tab:red", label=f"mean of last {window}")
    loss_axes.set(title="training DPO loss", xlabel="optimizer step", ylabel="loss")
    loss_axes.legend()

    eval_steps, accuracy = zip(*scalars["eval/implicit_acc"])
    accuracy_axes.plot(eval_steps, accuracy, marker="o", color="tab:blue")
    accuracy_axes.axhline(
        TARGETS["heldout_acc"], color="tab:green", linestyle="--", label=f"target {TARGETS['heldout_acc']}"
    )
    accuracy_axes.axhline(0.5, color="tab:gray", linestyle=":", label="chance (0.5)")
    accuracy_axes.set(title="held-out implicit accuracy", xlabel="optimizer step", ylabel="accuracy", ylim=(0, 1.02))
    accuracy_axes.legend(loc="lower right")

    eval_steps, heldout_loss = zip(*scalars["eval/loss"])
    heldout_loss_axes.plot(eval_steps, heldout_loss, marker="o", color="tab:purple")
    heldout_loss_axes.axhline(0.6931, color="tab:gray", linestyle=":", label="ln 2 (untrained)")
    heldout_loss_axes.set(title="held-out DPO loss", xlabel="optimizer step", ylabel="loss")
    heldout_loss_axes.legend()

    # healthy: losers' error rises (the preference), winners' stays near the reference's; collapse: both rise
    for tag, label, color in (("winner", "winners", "tab:green"), ("loser", "losers", "tab:red")):
        eval_steps, ratio = zip(*scalars[f"eval/{tag}_ratio"])
        ratio_axes.plot(eval_steps, ratio, marker="o", color=color, label=label)
    ratio_axes.axhline(
        TARGETS["winner_error_ratio"], color="tab:green", linestyle="--", label="collapse threshold (winners)"
    )
    ratio_axes.axhline(1.0, color="tab:gray", linestyle=":", label="reference (1)")
    ratio_axes.set(title="held-out error, policy / reference", xlabel="optimizer step", ylabel="ratio")
    ratio_axes.legend(fontsize="small")
    for axes in (loss_axes, accuracy_axes, heldout_loss_axes, ratio_axes):
        axes.grid(alpha=0.3)
    figure.savefig(path, dpi=100)


def run_seed(args, data_dir, seed):
    run_dir = Path(args.work_dir) / f"run-seed{seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    start = time.time()
    print(f"seed {seed}: training {args.max_train_steps} steps ({run_dir / 'train.log'})", flush=True)
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
    print(f"seed {seed}: sampling {args.n_samples} images from the base and the DPO model", flush=True)
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
        "winner_error_ratio": after["eval/winner_ratio"],  # what the trainer's --collapse_threshold watches
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
            f"warm samples {r['warm_fraction'][0]:.3f} -> {r['warm_fraction'][1]:.3f}, plausible samples "
            f"{r['plausible_fraction'][0]:.3f} -> {r['plausible_fraction'][1]:.3f} (of {args.n_samples} each), "
            f"winner error vs reference "
            f"x{r['winner_error_ratio']:.3f}  [{verdict(r['passed'])}]"
        )
        print(f"  pictures: {r['run_dir']}/samples.png (top base, bottom DPO), {r['run_dir']}/curves.png")
    return results


if __name__ == "__main__":
    main(parse_args())
