"""A tiny, offline Diffusion-DPO run on the CPU: the real trainer end to end, in well under a minute.

Builds (once, reused afterwards) a random-weight SD 1.x-style model and a small Pick-a-Pic-format dataset with
examples/tiny_assets.py, trains a LoRA with `accelerate launch train_diffusion_dpo.py`, prints where everything
was written and the first/last logged loss and implicit accuracy, then reloads the LoRA into a diffusers pipeline
and renders one image. The model is random and tiny: this shows the machinery working, not image quality.

    python examples/tiny_demo.py [--work_dir demo-output] [--max_train_steps 40]
"""

import argparse
import glob
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_assets import CAPTION_POOL, build_pickapic_dataset, build_tiny_sd_pipeline  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
N_PAIRS = 64


def build_assets(assets_dir):
    """The tiny model and dataset, built once: a complete folder is reused, a half-written one rebuilt."""
    model_dir, data_dir = assets_dir / "model", assets_dir / "data"
    if not (assets_dir / "complete").exists():
        print(f"Building tiny model and dataset in {assets_dir}")
        build_tiny_sd_pipeline(str(model_dir))
        build_pickapic_dataset(str(data_dir), n_pairs=N_PAIRS, n_ties=4, corrupt_pairs=2)
        (assets_dir / "complete").touch()
    return model_dir, data_dir


def new_run_dir(work_dir):
    """A fresh folder per run: the trainer refuses an output_dir that already holds a run."""
    base = work_dir / time.strftime("run-%Y%m%d-%H%M%S")
    run_dir, number = base, 1
    while run_dir.exists():
        run_dir, number = Path(f"{base}-{number}"), number + 1
    return run_dir


def scalars(log_dir, tag):
    """All (step, value) pairs logged under `tag` in the tensorboard event files below log_dir."""
    values = []
    for event_file in sorted(glob.glob(str(log_dir / "**" / "events.out.tfevents.*"), recursive=True)):
        accumulator = EventAccumulator(event_file)
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            values += [(event.step, event.value) for event in accumulator.Scalars(tag)]
    return sorted(values)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", default="demo-output", help="Assets, cache and run folders go here.")
    parser.add_argument("--max_train_steps", type=int, default=40)
    args = parser.parse_args()
    work_dir = Path(args.work_dir).resolve()
    model_dir, data_dir = build_assets(work_dir / "assets")
    run_dir = new_run_dir(work_dir)
    steps = args.max_train_steps
    prompts = list(CAPTION_POOL[:2])

    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "train_diffusion_dpo.py"),
        "--pretrained_model_name_or_path", str(model_dir),
        "--dataset_name", str(data_dir),
        "--cache_dir", str(work_dir / "hf-cache"),
        "--precompute_cache_dir", str(work_dir / "precomputed"),
        "--output_dir", str(run_dir),
        "--resolution", "32",
        "--train_batch_size", "8",
        "--max_train_steps", str(steps),
        "--checkpointing_steps", str(max(1, steps // 2)),
        "--run_validation",
        "--validation_steps", str(max(1, steps // 2)),
        "--validation_prompts", *prompts,
        "--num_validation_inference_steps", "3",
        "--report_to", "tensorboard",
    ]  # fmt: skip
    print("Running:", " ".join(command), flush=True)
    start = time.time()
    subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    train_seconds = time.time() - start

    loss, accuracy = scalars(run_dir / "logs", "loss"), scalars(run_dir / "logs", "implicit_acc")
    print(f"\nTrained {steps} steps in {train_seconds:.0f} s (including precompute and validation).")
    print(f"  LoRA weights:      {run_dir / 'pytorch_lora_weights.safetensors'}")
    print(f"  model card:        {run_dir / 'README.md'}")
    print(f"  checkpoints:       {', '.join(sorted(p.name for p in run_dir.glob('checkpoint-*')))}")
    print(f"  validation grids:  {run_dir / 'validation'} "
          f"({', '.join(sorted(p.name for p in (run_dir / 'validation').glob('*.png')))})")
    print(f"  tensorboard logs:  tensorboard --logdir {run_dir / 'logs'}")
    for name, values in (("loss", loss), ("implicit_acc", accuracy)):
        (first_step, first), (last_step, last) = values[0], values[-1]
        print(f"  {name:<13} step {first_step}: {first:.4f}   step {last_step}: {last:.4f}")
    print("  (step 1 starts at loss ln 2 = 0.6931 and implicit_acc 0: the fresh LoRA equals the reference. A random\n"
          "   tiny model trained for a few dozen steps is not expected to learn the preference; the loss stays near ln 2.)")

    # The output must load in plain diffusers: base pipeline + LoRA from the run folder.
    pipeline = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    pipeline.load_lora_weights(run_dir)
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline(prompts[0], num_inference_steps=3, height=32, width=32,
                     generator=torch.Generator().manual_seed(0)).images[0]
    image.save(run_dir / "reloaded.png")
    print(f"Reloaded the LoRA with StableDiffusionPipeline.load_lora_weights; rendered {run_dir / 'reloaded.png'}")


if __name__ == "__main__":
    main()
