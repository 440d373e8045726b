"""What a Diffusion-DPO step costs: against plain fine-tuning (SFT) in this process, and against the diffusers
research scripts in separate processes.

A DPO step runs the trained UNet forward and backward on 2B latents (B winners, B losers) and the reference forward
on the same 2B latents: about 4 forward-units against 3 for an SFT step on 2B latents, so DPO/SFT = 4/3 is the floor.

    python benchmarks/benchmark_dpo.py --preset mini                      # CPU: LoRA and full, DPO vs SFT
    python benchmarks/benchmark_dpo.py --preset sd15 --resolution 512 --train_batch_size 8 -- --mixed_precision fp16
    python benchmarks/benchmark_dpo.py --sdxl --preset sdxl --resolution 1024 --train_batch_size 2 \\
        --modes lora -- --mixed_precision bf16 --gradient_checkpointing
    python benchmarks/benchmark_dpo.py --sd3 --preset sd35m --resolution 1024 --train_batch_size 2 \\
        --modes lora -- --mixed_precision bf16 --gradient_checkpointing   # SD 3.5 Medium's shapes, without T5
    python benchmarks/benchmark_dpo.py --preset mini --compare_with PATH/TO/diffusers/examples/research_projects/\\
        diffusion_dpo/train_diffusion_dpo.py

Ratio table (default): for each --modes entry, the real trainer (`main(args)`) runs on the same model, data and
cache: DPO at --train_batch_size B, and the trainer's --sft at batch 2B, i.e. the same 2B images through the trained
UNet with no reference; --repeats interleaved rounds, the fastest of each kept. Step time is per optimizer step (with
--gradient_accumulation_steps G after `--`, G micro-batches; pairs/s counts all of them), the steady state between
the --warmup-th and the last step. The first run also measures precompute from a cold cache: captions/s
(tokenizer + text encoder, from the first call to the last) and images/s (everything after: VAE load, JPEG decode
and resize in the loader, VAE encode, cache write). Peak memory is CUDA max allocated on a GPU, and on a CPU the
process's resident set sampled every 5 ms during the run (so it includes what earlier runs left allocated).

Comparison (--compare_with SCRIPT): ours and SCRIPT as separate processes with the same flags (model, data,
resolution, batch, LoRA rank, learning rate, seed): one epoch with everything cold (fresh datasets cache; ours also
precomputes), then warm one-epoch and half-epoch runs; steady-state s/step = (epoch - half epoch) / steps between
them. Peak memory: each process's max RSS (from wait4), and with a GPU, the largest use nvidia-smi reported for it
(sampled every 0.2 s). Needs what SCRIPT imports (torchvision, wandb). On a shared 2-core machine keep it otherwise
idle; OMP_NUM_THREADS is passed through unchanged.

Everything after `--` goes to both trainers (ours only, in the ratio table). Models and data are built once in
--work_dir (random weights of the preset's real shapes) and reused.
"""

import argparse
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # for repo_paths: the rest of the repository

import repo_paths
import testing_utils
import tiny_assets

import diffusion_dpo.cache
import train_diffusion_dpo
import train_diffusion_dpo_sd3
import train_diffusion_dpo_sdxl


IMPORT_STAND_INS = Path(__file__).resolve().with_name("import_stand_ins")


class PeakMemory:
    """Peak memory during a `with` block: CUDA max allocated, or resident set sampled from /proc on a CPU."""

    def __enter__(self):
        self.peak = 0
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return self
        self.running = True
        self.sampler = threading.Thread(target=self._sample, daemon=True)
        self.sampler.start()
        return self

    def _sample(self):
        page = os.sysconf("SC_PAGE_SIZE")
        while self.running:
            with open("/proc/self/statm") as statm:
                self.peak = max(self.peak, int(statm.read().split()[1]) * page)
            time.sleep(0.005)

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.running = False
            self.sampler.join()

    @property
    def gib(self):
        return self.peak / 2**30


class Timers:
    """Wraps functions, each looked up by name in a module's globals at call time, to record when they are called.
    `targets`: {name: the module whose global it is}, where its caller finds it (a trainer script for compute_loss,
    which the script's loop calls; diffusion_dpo.cache for what the precompute calls)."""

    def __init__(self, targets):
        self.targets = targets
        self.calls = {name: [] for name in targets}

    def __enter__(self):
        self.originals = {name: getattr(module, name) for name, module in self.targets.items()}
        for name, original in self.originals.items():
            setattr(self.targets[name], name, self._timed(name, original))
        return self

    def _timed(self, name, original):
        def timed(*args, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            result = original(*args, **kwargs)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.calls[name].append((start, time.perf_counter()))
            return result

        return timed

    def __exit__(self, *exc):
        for name, original in self.originals.items():
            setattr(self.targets[name], name, original)


def run_trainer(dpo, argv):
    """One `main(args)` of a trainer in this process: (result, timers, peak memory, wall seconds)."""
    timed = {
        "create_missing_caches": diffusion_dpo.cache,  # text encoder load + every unique caption
        "encode_latents": diffusion_dpo.cache,  # VAE load + streaming, decoding and encoding the images
        "compute_loss": dpo,  # once per micro-batch, from the script's loop
    }
    with Timers(timed) as timers, PeakMemory() as memory:
        start = time.perf_counter()
        result = testing_utils.run_trainer(dpo, argv)
        wall = time.perf_counter() - start
    return result, timers, memory, wall


def steady_step_seconds(compute_loss_calls, accumulation_steps, warmup):
    """Seconds per optimizer step between the start of step `warmup` and the start of the last step.

    compute_loss runs once per micro-batch, accumulation_steps times per optimizer step: an optimizer step starts
    with the first of its micro-batches."""
    starts = [start for start, _ in compute_loss_calls][::accumulation_steps][warmup:]
    if len(starts) < 2:
        steps = len(compute_loss_calls) // accumulation_steps
        raise SystemExit(f"error: --steps must exceed --warmup + 1 (got {steps} optimizer steps)")
    return (starts[-1] - starts[0]) / (len(starts) - 1)


def precompute_figures(timers, cache_root):
    """(images/s, captions/s, images, captions) of a cold-cache precompute, from the timed calls and the cache."""
    ((text_start, text_end),) = timers.calls["create_missing_caches"]  # text encoder load + every unique caption
    ((start, end),) = timers.calls["encode_latents"]  # VAE load + streaming, decoding and encoding the images
    caches = [p.parent for p in Path(cache_root).glob("*/cache_info.json")]
    n_images = sum(2 * int(np.load(c / "encoded.npy").sum()) for c in caches)  # winner and loser of each latent
    n_captions = sum(json.loads((c / "cache_info.json").read_text())["unique_captions"] + 1 for c in caches)
    return n_images / (end - start), n_captions / (text_end - text_start), n_images, n_captions


# Dense bf16/fp16 tensor-core peaks (TFLOP/s) for model FLOP utilisation; others: pass --peak_tflops.
PEAK_TFLOPS = {"H100 80GB HBM3": 989.4, "H100 PCIe": 756.0, "H200": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0}


def model_gflops(model_dir, resolution, sdxl, sd3=False):
    """(UNet or SD3 transformer forward GFLOP per latent, VAE encoder GFLOP per image), counted on meta tensors
    (nothing is computed)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(model_dir, subfolder="vae"))
        size = resolution // 2 ** (len(vae.config.block_out_channels) - 1)
        image = torch.randn(1, 3, resolution, resolution)
        if sd3:  # 77 CLIP tokens and the trainer's default 256 T5 tokens
            unet = SD3Transformer2DModel.from_config(
                SD3Transformer2DModel.load_config(model_dir, subfolder="transformer")
            )
            inputs = dict(
                hidden_states=torch.randn(1, unet.config.in_channels, size, size),
                encoder_hidden_states=torch.randn(1, 77 + 256, unet.config.joint_attention_dim),
                pooled_projections=torch.randn(1, unet.config.pooled_projection_dim),
                timestep=torch.tensor([500.0]),
            )
        else:
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(model_dir, subfolder="unet"))
            inputs = dict(
                sample=torch.randn(1, 4, size, size),
                timestep=torch.tensor([500]),
                encoder_hidden_states=torch.randn(1, 77, unet.config.cross_attention_dim),
            )
        if sdxl:
            pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
            inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled), "time_ids": torch.randn(1, 6)}
    with FlopCounterMode(display=False) as unet_flops:
        unet(**inputs)
    with FlopCounterMode(display=False) as vae_flops:
        vae.encode(image)
    return unet_flops.get_total_flops() / 1e9, vae_flops.get_total_flops() / 1e9


def step_tflops(unet_gflops, mode, kind, batch):
    """Model FLOPs of one step, per latent: forward 1, backward 2 (LoRA: 1, no weight gradients), reference 1 (DPO)."""
    latents = 2 * batch if kind == "DPO" else batch
    per_latent = (1 + (1 if mode == "lora" else 2) + (1 if kind == "DPO" else 0)) * unet_gflops
    return latents * per_latent / 1e3


def ratio_table(args, dpo, model_dir, data_dir, run_dir, trainer_flags):
    common = [
        "--pretrained_model_name_or_path",
        model_dir,
        "--dataset_name",
        data_dir,
        "--resolution",
        str(args.resolution),
        "--precompute_cache_dir",
        str(run_dir / "cache"),
        "--max_train_steps",
        str(args.steps),
        "--report_to",
        "none",
        "--checkpointing_steps",
        "1000000",
        "--seed",
        "0",
        *trainer_flags,
    ]
    best, precompute = {}, None
    for repeat in range(args.repeats):  # interleaved repeats, fastest kept: this machine's timing noise is a few %
        for mode in args.modes:
            kinds = [("DPO", args.train_batch_size), ("SFT", 2 * args.train_batch_size)]
            if args.mapo:  # MaPO: the same B pairs as DPO, no reference forward
                kinds.append(("MaPO", args.train_batch_size))
            for kind, batch in kinds:
                argv = [
                    *common,
                    "--train_mode",
                    mode,
                    "--train_batch_size",
                    str(batch),
                    "--output_dir",
                    str(run_dir / f"{mode}-{kind}-{repeat}"),
                ] + {"SFT": ["--sft"], "MaPO": ["--loss_type", "mapo"]}.get(kind, [])
                result, timers, memory, wall = run_trainer(dpo, argv)
                accumulation = dpo.parse_args(argv).gradient_accumulation_steps
                step = steady_step_seconds(timers.calls["compute_loss"], accumulation, args.warmup)
                if precompute is None:  # the first run found the cache empty
                    precompute = precompute_figures(timers, run_dir / "cache")
                row = {
                    "mode": mode,
                    "kind": kind,
                    "batch": batch,
                    "accumulation": accumulation,
                    "step_s": step,
                    "pairs_per_s": batch * accumulation / step,
                    "peak_gib": memory.gib,
                    "first_loss": result["history"][0]["loss"],
                    "wall_s": wall,
                }
                kept = best.setdefault((mode, kind), row)
                if step < kept["step_s"]:
                    best[(mode, kind)] = {**row, "peak_gib": max(row["peak_gib"], kept["peak_gib"])}
                print(
                    f"  {mode} {kind} run {repeat + 1}: {step:.4f} s/step, first loss {row['first_loss']:.4f}",
                    flush=True,
                )
    rows = [best[(mode, kind)] for mode in args.modes for kind in ("DPO", "SFT")]
    rows[0]["precompute"] = precompute

    unet_gflops, vae_gflops = model_gflops(model_dir, args.resolution, args.sdxl, args.sd3)
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in device_name()), None)
    real_ratio = "SDXL at 1024 px: 0.72" if args.sdxl else "SD 1.5 at 512 px: 1.39"
    if args.sd3:  # counted on meta tensors with the sd35m preset's configs, 333 text tokens
        real_ratio = "SD 3.5 Medium at 1024 px: 0.43"
    print(
        f"\nUNet forward {unet_gflops:.1f} GFLOP per latent, VAE encoder {vae_gflops:.1f} GFLOP per image "
        f"(VAE/UNet {vae_gflops / unet_gflops:.2f}; {real_ratio})"
    )
    print(
        f"| mode | DPO s/step (B={args.train_batch_size}) | SFT s/step (2B images) | DPO/SFT | DPO pairs/s | "
        f"DPO TFLOP/s{' (MFU)' if peak else ''} | peak memory DPO | SFT |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for dpo_row, sft_row in zip(rows[::2], rows[1::2]):
        pairs = args.train_batch_size * dpo_row["accumulation"]
        achieved = step_tflops(unet_gflops, dpo_row["mode"], "DPO", pairs) / dpo_row["step_s"]
        utilisation = f" ({achieved / peak:.1%})" if peak else ""
        print(
            f"| {dpo_row['mode']} | {dpo_row['step_s']:.4f} | {sft_row['step_s']:.4f} | "
            f"{dpo_row['step_s'] / sft_row['step_s']:.3f} | {dpo_row['pairs_per_s']:.2f} | "
            f"{achieved:.3g}{utilisation} | {dpo_row['peak_gib']:.2f} GiB | {sft_row['peak_gib']:.2f} GiB |"
        )
    if args.mapo:
        print(f"\n| mode | MaPO s/step (B={args.train_batch_size}) | DPO s/step | MaPO/DPO | peak memory MaPO |")
        print("|---|---|---|---|---|")
        for mode in args.modes:
            mapo, dpo_row = best[(mode, "MaPO")], best[(mode, "DPO")]
            print(
                f"| {mode} | {mapo['step_s']:.4f} | {dpo_row['step_s']:.4f} | "
                f"{mapo['step_s'] / dpo_row['step_s']:.3f} | {mapo['peak_gib']:.2f} GiB |"
            )
    images_per_s, captions_per_s, n_images, n_captions = rows[0]["precompute"]
    print(
        f"\nprecompute (cold cache): {images_per_s:.1f} images/s ({n_images} images), "
        f"{captions_per_s:.1f} captions/s ({n_captions} unique captions); "
        f"DPO first-step loss {rows[0]['first_loss']:.4f} (ln 2 = 0.6931)"
    )


STEPS_PROGRESS = re.compile(rb"Steps:\s*\d+%\|[^|\r\n]*\|\s*(\d+)/(\d+)")


def run_process(command, log_path, env):
    """Runs a command to completion, its output into log_path. Returns {wall_s, rss_gib: peak RSS of it and its
    waited-for children, gpu_gib: largest nvidia-smi figure, cuda_allocated_gib / cuda_reserved_gib: its
    torch.cuda.max_memory_* (written by peak_memory_runner.py), steps: [(seconds since start, step)] as its "Steps"
    progress bar showed them, each step at its first appearance}."""
    peak_file = Path(f"{log_path}.peak.json")
    peak_file.unlink(missing_ok=True)
    env = {**env, "PEAK_MEMORY_FILE": str(peak_file)}
    steps, seen = [], set()
    with open(log_path, "wb") as log:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        gpu_peak = [0.0]
        sampler = None
        if shutil.which("nvidia-smi") and torch.cuda.is_available():
            sampler = threading.Thread(target=_sample_gpu_memory, args=(process, gpu_peak), daemon=True)
            sampler.start()
        pending = b""
        while chunk := os.read(process.stdout.fileno(), 65536):
            now = time.perf_counter() - start
            log.write(chunk)
            *pieces, pending = re.split(rb"[\r\n]", pending + chunk)
            for match in map(STEPS_PROGRESS.search, pieces):
                if match and int(match.group(1)) not in seen:
                    seen.add(int(match.group(1)))
                    steps.append((now, int(match.group(1))))
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        if sampler is not None:
            sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"error: {command[2]} failed (exit {process.returncode}); see {log_path}")
    cuda = json.loads(peak_file.read_text()) if peak_file.exists() else {}
    return {
        "wall_s": wall,
        "rss_gib": usage.ru_maxrss / 2**20,
        "gpu_gib": gpu_peak[0],
        "cuda_allocated_gib": cuda.get("max_memory_allocated", 0) / 2**30,
        "cuda_reserved_gib": cuda.get("max_memory_reserved", 0) / 2**30,
        "steps": steps,
    }


def progress_step_seconds(steps, total, warmup):
    """Steady-state s/step from a run's progress-bar times: from the first step shown at or after `warmup` to the
    last one shown before the final step (whose display can wait for the end of the run), or None if too few."""
    shown = [(t, n) for t, n in steps if warmup <= n < total] or [(t, n) for t, n in steps if n >= warmup]
    if len(shown) < 2 or shown[-1][1] == shown[0][1]:
        return None
    (first_t, first_n), (last_t, last_n) = shown[0], shown[-1]
    return (last_t - first_t) / (last_n - first_n)


def _sample_gpu_memory(process, peak):
    """Largest GPU memory (GiB) nvidia-smi reports for the process or its children while it runs."""
    while process.poll() is None:
        children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
        pids = {str(process.pid), *children}
        query = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
        ).stdout
        used = [
            int(mib) for pid, mib in (line.split(", ") for line in query.splitlines() if ", " in line) if pid in pids
        ]
        peak[0] = max(peak[0], sum(used) / 1024)
        time.sleep(0.2)


def comparison(args, model_dir, data_dir, run_dir, trainer_flags):
    """Ours and the diffusers research script, each in its own processes, on the same model, data and flags.

    Per script: one epoch with everything cold (a fresh datasets cache, and for ours a fresh latent cache): its wall
    time, precompute included, and its steady-state s/step from the "Steps" progress bar (the times at which steps
    --warmup and the last but one were shown). With --repeats N > 0, N warm one-epoch and N warm half-epoch runs
    follow (fastest of each kept), and s/step = (epoch - half epoch) / (steps in half an epoch) is reported too:
    start-up, loading and saving cancel out, and both runs stay in the first epoch, whose latents the cold run
    precomputed.
    """
    wandb_stand_in = importlib.util.find_spec("wandb") is None
    epoch_steps = -(-args.n_pairs // args.train_batch_size)
    half_steps = epoch_steps // 2
    common = [
        "--pretrained_model_name_or_path",
        model_dir,
        "--dataset_name",
        data_dir,
        "--resolution",
        str(args.resolution),
        "--train_batch_size",
        str(args.train_batch_size),
        "--rank",
        str(args.rank),
        "--learning_rate",
        "1e-5",
        "--seed",
        "0",
        "--report_to",
        "tensorboard",
        "--checkpointing_steps",
        "1000000",
        "--dataloader_num_workers",
        str(args.dataloader_num_workers),
        *trainer_flags,
    ]
    ours = repo_paths.ROOT / ("train_diffusion_dpo_sdxl.py" if args.sdxl else "train_diffusion_dpo.py")
    scripts = {
        "ours": [str(ours), "--precompute_cache_dir", str(run_dir / "latent-cache")],
        "diffusers": [args.compare_with, *args.baseline_flags],
    }
    run_dir.mkdir(parents=True)
    figures, commands = {}, {}
    for name, script in scripts.items():
        env = {**os.environ, "HF_DATASETS_CACHE": str(run_dir / f"{name}-datasets-cache"), "WANDB_MODE": "disabled"}
        if name == "diffusers" and wandb_stand_in:  # wandb is imported, and unused with --report_to tensorboard
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(IMPORT_STAND_INS), env.get("PYTHONPATH")]))
        runs = {"cold epoch": [], "epoch": [], "half epoch": []}
        plan = [("cold epoch", epoch_steps)] + [("epoch", epoch_steps), ("half epoch", half_steps)] * args.repeats
        for number, (run, steps) in enumerate(plan):
            tag = f"{name}-{number}-{run.replace(' ', '-')}"
            command = [
                sys.executable,
                str(Path(__file__).with_name("peak_memory_runner.py")),
                script[0],
                *script[1:],
                *common,
                "--max_train_steps",
                str(steps),
                "--output_dir",
                str(run_dir / tag),
            ]
            commands.setdefault(name, shlex.join(command))
            runs[run].append(run_process(command, run_dir / f"{tag}.log", env))
            result = runs[run][-1]
            print(
                f"  {name} {run} ({steps} steps): {result['wall_s']:.1f} s, peak RSS {result['rss_gib']:.2f} GiB, "
                f"CUDA max allocated {result['cuda_allocated_gib']:.2f} GiB",
                flush=True,
            )
        every_run = [r for rs in runs.values() for r in rs]
        cold = runs["cold epoch"][0]
        figures[name] = {
            "cold_epoch_s": cold["wall_s"],
            "step_s": progress_step_seconds(cold["steps"], epoch_steps, args.warmup),
            **{f"{k}_max": max(r[k] for r in every_run) for k in ("rss_gib", "gpu_gib")},
            **{f"{k}_max": max(r[k] for r in every_run) for k in ("cuda_allocated_gib", "cuda_reserved_gib")},
        }
        if args.repeats:
            epoch = min(r["wall_s"] for r in runs["epoch"])
            half = min(r["wall_s"] for r in runs["half epoch"])
            figures[name] |= {
                "warm_epoch_s": epoch,
                "step_s_epoch_difference": (epoch - half) / (epoch_steps - half_steps),
            }
    ours_f, theirs = figures["ours"], figures["diffusers"]

    def ratio(key, inverse=False):
        if not ours_f.get(key) or not theirs.get(key):
            return None
        return theirs[key] / ours_f[key] if inverse else ours_f[key] / theirs[key]

    summary = {
        "script": args.compare_with,
        "wandb_stand_in": wandb_stand_in,
        "n_pairs": args.n_pairs,
        "train_batch_size": args.train_batch_size,
        "rank": args.rank,
        "resolution": args.resolution,
        "epoch_steps": epoch_steps,
        "trainer_flags": trainer_flags,
        "baseline_flags": args.baseline_flags,
        "figures": figures,
        "speed_ours_over_theirs": ratio("step_s", inverse=True),
        "cold_epoch_time_ours_over_theirs": ratio("cold_epoch_s"),
        "cuda_allocated_ours_over_theirs": ratio("cuda_allocated_gib_max"),
        "gpu_memory_ours_over_theirs": ratio("gpu_gib_max"),
        "rss_ours_over_theirs": ratio("rss_gib_max"),
        "commands": commands,
    }
    print(
        f"\n{args.n_pairs} pairs, batch {args.train_batch_size}, LoRA rank {args.rank}, {args.resolution}px, "
        f"one epoch = {epoch_steps} steps, flags {trainer_flags}"
        + ("; wandb: import-only stand-in for the research script" if wandb_stand_in else "")
    )
    print("| | ours | diffusers research script | ours / theirs |")
    print("|---|---|---|---|")
    rows = [
        ("steady-state s/step (cold run's progress bar)", "step_s", "{:.3f}", "speed_ours_over_theirs", "x the speed"),
        (
            "one epoch, all cold (ours precomputes)",
            "cold_epoch_s",
            "{:.1f} s",
            "cold_epoch_time_ours_over_theirs",
            "x the time",
        ),
        ("peak CUDA max allocated", "cuda_allocated_gib_max", "{:.2f} GiB", "cuda_allocated_ours_over_theirs", "x"),
        ("peak GPU memory (nvidia-smi)", "gpu_gib_max", "{:.2f} GiB", "gpu_memory_ours_over_theirs", "x"),
        ("peak RSS, any run", "rss_gib_max", "{:.2f} GiB", "rss_ours_over_theirs", "x"),
    ]
    for label, key, form, ratio_key, unit in rows:
        cells = [form.format(f[key]) if f.get(key) is not None else "n/a" for f in (ours_f, theirs)]
        shown = f"{summary[ratio_key]:.2f}{unit}" if summary[ratio_key] is not None else "n/a"
        print(f"| {label} | {cells[0]} | {cells[1]} | {shown} |")
    if args.repeats:
        print(
            f"| s/step, (epoch - half epoch) of warm runs | {ours_f['step_s_epoch_difference']:.3f} | "
            f"{theirs['step_s_epoch_difference']:.3f} | |"
        )
    return summary


def build_assets(work, sdxl, preset, n_pairs, resolution, sd3=False):
    """(model folder, data folder) in `work`: random weights of the preset's real shapes and a Pick-a-Pic-format
    dataset, built once and reused. Weights are initialised on the GPU when there is one (seconds, not a minute)."""
    tag = f"{'sd3' if sd3 else 'sdxl' if sdxl else 'sd'}-{preset}"
    model_dir, data_dir = Path(work) / f"model-{tag}", Path(work) / f"data-{n_pairs}-{resolution}px"
    if not (model_dir / "model_index.json").exists():
        build = tiny_assets.build_tiny_sd_pipeline
        if sd3 or sdxl:
            build = tiny_assets.build_tiny_sd3_pipeline if sd3 else tiny_assets.build_tiny_sdxl_pipeline
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            build(str(model_dir), preset=preset)
    if not data_dir.exists():
        tiny_assets.build_pickapic_dataset(str(data_dir), n_pairs=n_pairs, n_ties=0, image_size=resolution)
    return model_dir, data_dir


def device_name():
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU x{os.cpu_count()}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sdxl", action="store_true", help="benchmark train_diffusion_dpo_sdxl.py (SDXL presets)")
    parser.add_argument("--sd3", action="store_true", help="benchmark train_diffusion_dpo_sd3.py (SD3 presets)")
    parser.add_argument(
        "--preset", default="mini", help="tiny, mini, sd15 (sdxl with --sdxl, sd35m with --sd3): tiny_assets presets"
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="default: 32 for tiny; 384 for mini, where its VAE/UNet FLOP ratio (1.47) is near SD 1.5's "
        "at 512 px (1.39); 512 for sd15, 1024 for sdxl",
    )
    parser.add_argument("--n_pairs", type=int, default=64)
    parser.add_argument("--train_batch_size", type=int, default=2, help="B: pairs per DPO step (SFT gets 2B)")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per ratio-table run")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the steady-state time")
    parser.add_argument("--modes", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    parser.add_argument(
        "--mapo",
        action="store_true",
        help="ratio table: also time --loss_type mapo at batch B (reference-free: no reference forward) and print "
        "MaPO/DPO step time",
    )
    parser.add_argument("--compare_with", default=None, help="path of the diffusers research script to compare")
    parser.add_argument("--baseline_flags", nargs="*", default=[], help="extra flags for the compared script only")
    parser.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="runs of each kind (ratio table) or warm runs of each length (comparison, where 0 keeps only the "
        "cold run); fastest kept",
    )
    parser.add_argument("--rank", type=int, default=8, help="comparison: LoRA rank of both scripts")
    parser.add_argument("--dataloader_num_workers", type=int, default=0, help="comparison: for both scripts")
    parser.add_argument(
        "--peak_tflops",
        type=float,
        default=None,
        help="the device's peak, for MFU (default: known GPUs' dense bf16 peak)",
    )
    parser.add_argument("--work_dir", default=None, help="builds models and data here once, reused later")
    parser.add_argument("--json_out", default=None, help="comparison: also write its figures to this JSON file")
    args, trainer_flags = parser.parse_known_args()
    trainer_flags = [f for f in trainer_flags if f != "--"]
    presets = tiny_assets.SDXL_PRESETS if args.sdxl else tiny_assets.PRESETS
    if args.sd3:
        if args.sdxl or args.compare_with:
            parser.error("--sd3 goes without --sdxl and --compare_with (diffusers has no SD3 DPO script to compare)")
        presets = tiny_assets.SD3_PRESETS
        if presets.get(args.preset, {}).get("t5", {}) is None:  # a preset built without T5
            trainer_flags.append("--no_t5")
    if args.preset not in presets:
        parser.error(f"--preset must be one of {sorted(presets)}")
    if args.resolution is None:
        args.resolution = {"tiny": 32, "mini": 384}.get(args.preset, 1024 if args.sdxl or args.sd3 else 512)

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="dpo-bench-"))
    tag = f"{'sd3' if args.sd3 else 'sdxl' if args.sdxl else 'sd'}-{args.preset}"
    model_dir, data_dir = build_assets(work, args.sdxl, args.preset, args.n_pairs, args.resolution, args.sd3)
    run_dir = work / f"runs-{time.strftime('%Y%m%d-%H%M%S')}"
    device = device_name()
    threads = torch.get_num_threads()
    print(
        f"{device}, torch {torch.__version__} ({threads} threads); {tag}; {args.resolution}px; {args.n_pairs} pairs; "
        f"trainer flags {trainer_flags}",
        flush=True,
    )
    if args.compare_with:
        summary = comparison(args, str(model_dir), str(data_dir), run_dir, trainer_flags)
        if args.json_out:
            summary |= {"device": device, "torch": torch.__version__, "command": shlex.join(sys.argv)}
            Path(args.json_out).write_text(json.dumps(summary, indent=1))
    else:
        dpo = train_diffusion_dpo_sd3 if args.sd3 else train_diffusion_dpo_sdxl if args.sdxl else train_diffusion_dpo
        ratio_table(args, dpo, str(model_dir), str(data_dir), run_dir, trainer_flags)


if __name__ == "__main__":
    main()
