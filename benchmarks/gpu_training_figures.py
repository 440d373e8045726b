"""Measures a trainer on random-weight models: time to the first step (precompute), steady-state step time, peak
memory, with a cold and then a warm latent cache.

    python benchmarks/gpu_training_figures.py --preset sd15 --resolution 512 --n_pairs 256 -- --mixed_precision fp16
    python benchmarks/gpu_training_figures.py --sdxl --preset sdxl --resolution 1024 -- --mixed_precision bf16

Everything after `--` is passed to the trainer. The first steps (CUDA warm-up, allocator growth) are
excluded from the step time. Prints one line of figures per run.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]

import tiny_assets  # noqa: E402
import train_diffusion_dpo  # noqa: E402
import train_diffusion_dpo_sdxl  # noqa: E402


def measure(dpo, model_dir, data_dir, work_dir, cache_dir, resolution, steps, warmup, trainer_flags):
    step_times = []
    original_compute_loss = dpo.compute_loss

    def timed_compute_loss(*args, **kwargs):  # one call per micro-batch; times the whole step from here
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        step_times.append(time.perf_counter())
        return original_compute_loss(*args, **kwargs)

    dpo.compute_loss = timed_compute_loss
    argv = ["--pretrained_model_name_or_path", model_dir, "--dataset_name", data_dir, "--resolution", str(resolution),
            "--output_dir", str(work_dir / "out"), "--precompute_cache_dir", str(cache_dir),
            "--max_train_steps", str(steps), "--report_to", "none", "--checkpointing_steps", "1000000", *trainer_flags]
    args = dpo.parse_args(argv)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = dpo.main(args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    end = time.perf_counter()
    dpo.compute_loss = original_compute_loss
    step_times.append(end)
    steady = step_times[warmup:]
    per_step = (steady[-1] - steady[0]) / (len(steady) - 1)
    pairs_per_step = args.train_batch_size * args.gradient_accumulation_steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    return {"total_s": end - start, "to_first_step_s": step_times[0] - start, "step_s": per_step, "pairs_per_s": pairs_per_step / per_step,
            "peak_gib": peak, "first_loss": result["history"][0]["loss"], "last_loss": result["history"][-1]["loss"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sdxl", action="store_true", help="measure train_diffusion_dpo_sdxl.py (SDXL_PRESETS)")
    parser.add_argument("--preset", default="tiny", help="a key of tiny_assets.PRESETS, or SDXL_PRESETS with --sdxl")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--n_pairs", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--work_dir", default=None, help="reuse the model and data built here by an earlier run")
    args, trainer_flags = parser.parse_known_args()
    trainer_flags = [f for f in trainer_flags if f != "--"]

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="dpo-bench-"))
    runs = work / f"runs-{time.time_ns()}"
    dpo = train_diffusion_dpo_sdxl if args.sdxl else train_diffusion_dpo
    build = tiny_assets.build_tiny_sdxl_pipeline if args.sdxl else tiny_assets.build_tiny_sd_pipeline
    model_dir, data_dir = str(work / "model"), str(work / "data")
    if not os.path.exists(os.path.join(model_dir, "model_index.json")):
        build(model_dir, preset=args.preset)
        tiny_assets.build_pickapic_dataset(data_dir, n_pairs=args.n_pairs, n_ties=0, image_size=args.resolution)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU x{os.cpu_count()}"
    print(f"device: {device}; {dpo.__name__}; preset {args.preset}; {args.resolution}px; {args.n_pairs} pairs; "
          f"flags {trainer_flags}")

    from accelerate.state import AcceleratorState, GradientState

    for run in ("cold cache", "warm cache"):  # the second run reuses the first one's precomputed latents
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        figures = measure(dpo, model_dir, data_dir, runs / run.replace(" ", "-"), runs / "cache", args.resolution,
                          args.steps, args.warmup, trainer_flags)
        print(f"{run}: " + ", ".join(f"{k} {v:.4g}" for k, v in figures.items()), flush=True)

if __name__ == "__main__":
    main()
