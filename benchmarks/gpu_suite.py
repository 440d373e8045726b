"""The steps of benchmarks/gpu_suite.sh, one subcommand each; every step writes its figures to WORK/<step>.json.

    python benchmarks/gpu_suite.py env WORK                     # device, versions, importable packages
    python benchmarks/gpu_suite.py build WORK                   # random-weight models (real shapes) and data
    python benchmarks/gpu_suite.py compare WORK sd15|sdxl RESEARCH_DIR   # benchmark_dpo.py --compare_with
    python benchmarks/gpu_suite.py variants WORK                # SD 1.5 LoRA speed options: s/step, MFU, memory
    python benchmarks/gpu_suite.py memory WORK                  # low-memory recipes under a memory cap
    python benchmarks/gpu_suite.py merge WORK OUT_JSON          # everything, with each step's status and command

--preset tiny (every subcommand) uses the tiny models at 32 px: the CPU rehearsal of the suite.
"""

import argparse
import contextlib
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path

import benchmark_dpo
import testing_utils
import torch

import diffusion_dpo.cache
import train_diffusion_dpo


# model preset, resolution, pairs, pairs per step and steps per timed run, per suite preset and model family
SUITE_PRESETS = {
    "gpu": {
        "sd15": dict(preset="sd15", resolution=512, n_pairs=128, batch=8, steps=14, warmup=4),
        "sdxl": dict(preset="sdxl", resolution=1024, n_pairs=32, batch=2, steps=10, warmup=3),
        "variant_batches": (8, 16),
        "memory_caps_gb": {"sd15": 12, "sdxl": 24},
    },
    "tiny": {
        "sd15": dict(preset="tiny", resolution=32, n_pairs=8, batch=2, steps=4, warmup=1),
        "sdxl": dict(preset="tiny", resolution=32, n_pairs=8, batch=2, steps=4, warmup=1),
        "variant_batches": (2,),
        "memory_caps_gb": {"sd15": 12, "sdxl": 24},
    },
}
PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "peft", "datasets", "torchvision", "wandb")
OPTIONAL_IMPORTS = ("torchvision", "wandb", "bitsandbytes", "xformers")
FP16_FIX_VAE = "vae-fp16-fix"  # stand-in for madebyollin/sdxl-vae-fp16-fix: the same config, random weights


def write_json(path, data):
    Path(path).write_text(json.dumps(data, indent=1, default=str))


def assets(work, family, suite_preset):
    config = SUITE_PRESETS[suite_preset][family]
    return benchmark_dpo.build_assets(
        work, family == "sdxl", config["preset"], config["n_pairs"], config["resolution"]
    )


def env_step(args):
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    importable = {name: importlib.util.find_spec(name) is not None for name in OPTIONAL_IMPORTS}
    smi = (
        subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        if torch.cuda.is_available()
        else None
    )
    figures = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": benchmark_dpo.device_name(),
        "nvidia_smi": smi,
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "versions": versions,
        "importable": importable,
        "commit": os.environ.get("GPU_SUITE_COMMIT") or git_commit(),
    }
    for name, ok in importable.items():
        print(f"{name}: {'importable' if ok else 'NOT importable'}")
    print(json.dumps(figures, indent=1))
    return figures


def git_commit():
    result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=testing_utils.ROOT)
    return result.stdout.strip() or None


def build_step(args):
    """Both model families and their data, and the fp16-fix SDXL VAE stand-in; seconds per part."""
    from diffusers import AutoencoderKL

    seconds = {}
    for family in ("sd15", "sdxl"):
        start = time.perf_counter()
        model_dir, data_dir = assets(args.work, family, args.preset)
        seconds[family] = time.perf_counter() - start
        print(f"{family}: {model_dir}, {data_dir} ({seconds[family]:.1f} s)", flush=True)
    sdxl_model, _ = assets(args.work, "sdxl", args.preset)
    fix_dir = Path(args.work) / f"{FP16_FIX_VAE}-{SUITE_PRESETS[args.preset]['sdxl']['preset']}"
    if not (fix_dir / "config.json").exists():
        config = dict(AutoencoderKL.load_config(sdxl_model, subfolder="vae"))
        config["force_upcast"] = False  # what sdxl-vae-fp16-fix changes in the config; its weights keep fp16 finite
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            AutoencoderKL.from_config(config).save_pretrained(fix_dir)
    return {"seconds": seconds, "fp16_fix_vae": str(fix_dir)}


def compare_step(args):
    config = SUITE_PRESETS[args.preset][args.family]
    script = Path(args.research_dir) / (
        "train_diffusion_dpo_sdxl.py" if args.family == "sdxl" else "train_diffusion_dpo.py"
    )
    json_out = Path(args.work) / f"compare-{args.family}.details.json"
    precision = "bf16" if args.family == "sdxl" else "fp16"
    command = [
        sys.executable,
        str(Path(__file__).with_name("benchmark_dpo.py")),
        *(["--sdxl"] if args.family == "sdxl" else []),
        f"--preset={config['preset']}",
        f"--resolution={config['resolution']}",
        f"--n_pairs={config['n_pairs']}",
        f"--train_batch_size={config['batch']}",
        f"--warmup={config['warmup']}",
        "--rank=8",
        "--repeats=0",
        f"--work_dir={args.work}",
        f"--compare_with={script}",
        "--baseline_flags=--dataset_split_name=train",
        f"--json_out={json_out}",
        "--",
        *([f"--mixed_precision={precision}"] if torch.cuda.is_available() else []),
    ]
    print(shlex.join(command), flush=True)
    subprocess.run(command, check=True)
    return json.loads(json_out.read_text())


@contextlib.contextmanager
def unet_compiled_whole():
    """The trainer's --torch_compile, with the whole UNet compiled (nn.Module.compile, in place) instead of its
    repeated blocks (diffusion_dpo.family.build_models calls compile_repeated_blocks): full-graph compilation
    measured without a trainer flag."""
    from diffusers import UNet2DConditionModel

    original = UNet2DConditionModel.compile_repeated_blocks
    UNet2DConditionModel.compile_repeated_blocks = lambda self, *args, **kwargs: self.compile()
    try:
        yield
    finally:
        UNet2DConditionModel.compile_repeated_blocks = original


def sdpa_backend(name):
    if name is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, name)])


def variant_list(suite_preset):
    """(name, pairs per step, trainer flags, SDPA backend or None, compile the whole UNet), most telling first."""
    cuda = torch.cuda.is_available()
    fp16 = ["--mixed_precision=fp16"] if cuda else []
    bf16 = ["--mixed_precision=bf16"] if cuda else []
    small, large = (
        SUITE_PRESETS[suite_preset]["variant_batches"][0],
        SUITE_PRESETS[suite_preset]["variant_batches"][-1],
    )
    variants = [
        ("fp16", small, fp16, None, False),
        ("fp16", large, fp16, None, False),
        ("bf16", large, bf16, None, False),
        ("fp16 channels-last", large, [*fp16, "--channels_last"], None, False),
        ("fp16 regional compile", large, [*fp16, "--torch_compile"], None, False),
        ("fp16 full compile", large, [*fp16, "--torch_compile"], None, True),
        ("fp16 full compile channels-last", large, [*fp16, "--torch_compile", "--channels_last"], None, True),
    ]
    if small == large:
        del variants[0]
    if not cuda:  # compiling takes minutes on a CPU: the rehearsal runs the rest (tests cover the whole-UNet patch)
        variants = [v for v in variants if "--torch_compile" not in v[2]]
    if cuda:
        variants[-1:-1] = [  # before the last: whole-UNet compile with channels-last
            (f"fp16 SDPA {backend}", large, fp16, backend, False)
            for backend in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")
        ]
    return variants


def variants_step(args):
    """SD 1.5 LoRA DPO runs of the real trainer in this process, one per speed option, on one shared latent cache;
    results are written after each run, so a time limit keeps the finished ones."""
    config = SUITE_PRESETS[args.preset]["sd15"]
    model_dir, data_dir = assets(args.work, "sd15", args.preset)
    unet_gflops, _ = benchmark_dpo.model_gflops(str(model_dir), config["resolution"], sdxl=False)
    device = benchmark_dpo.device_name()
    peak_tflops = next((v for k, v in benchmark_dpo.PEAK_TFLOPS.items() if k in device), None)
    results = {"unet_gflops_per_latent": unet_gflops, "peak_tflops": peak_tflops, "runs": []}
    out = Path(args.work) / "variants.json"
    for number, (name, batch, flags, backend, whole_unet) in enumerate(variant_list(args.preset)):
        argv = [
            f"--pretrained_model_name_or_path={model_dir}",
            f"--dataset_name={data_dir}",
            f"--resolution={config['resolution']}",
            f"--precompute_cache_dir={Path(args.work) / 'variants-cache'}",
            f"--output_dir={Path(args.work) / f'variant-{number}'}",
            f"--max_train_steps={config['steps']}",
            f"--train_batch_size={batch}",
            "--train_mode=lora",
            "--rank=8",
            "--report_to=none",
            "--checkpointing_steps=1000000",
            "--seed=0",
            *flags,
        ]
        run = {"name": name, "pairs_per_step": batch, "sdpa_backend": backend, "whole_unet_compiled": whole_unet}
        run["trainer_argv"] = shlex.join(argv)
        try:
            with sdpa_backend(backend), unet_compiled_whole() if whole_unet else contextlib.nullcontext():
                result, timers, memory, wall = benchmark_dpo.run_trainer(train_diffusion_dpo, argv)
            step = benchmark_dpo.steady_step_seconds(timers.calls["compute_loss"], 1, config["warmup"])
            tflops = benchmark_dpo.step_tflops(unet_gflops, "lora", "DPO", batch) / step
            run |= {
                "step_s": step,
                "pairs_per_s": batch / step,
                "tflops": tflops,
                "mfu": tflops / peak_tflops if peak_tflops else None,
                "peak_gib": memory.gib,
                "wall_s": wall,
                "first_loss": result["history"][0]["loss"],
            }
            print(f"{name}, {batch} pairs: {step:.4f} s/step, {tflops:.3g} TFLOP/s, {memory.gib:.2f} GiB", flush=True)
        except (
            Exception,
            SystemExit,
        ) as error:  # one option failing (a backend missing, a compile error) leaves the others
            run["error"] = f"{type(error).__name__}: {error}"
            traceback.print_exc()
        results["runs"].append(run)
        write_json(out, results)
        torch._dynamo.reset()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return results


def recipe_list(work, suite_preset):
    """(name, model family, memory cap in GB, trainer flags): the low-memory recipes of docs/low-memory.md."""
    cuda = torch.cuda.is_available()
    eight_bit = ["--use_8bit_adam"] if cuda and importlib.util.find_spec("bitsandbytes") else []
    sdxl_preset = SUITE_PRESETS[suite_preset]["sdxl"]["preset"]
    fix_vae = f"--pretrained_vae_model_name_or_path={Path(work) / f'{FP16_FIX_VAE}-{sdxl_preset}'}"
    caps = SUITE_PRESETS[suite_preset]["memory_caps_gb"]
    bf16 = ["--mixed_precision=bf16"] if cuda else []
    return [
        ("SDXL LoRA in 24 GB", "sdxl", caps["sdxl"], [*bf16, "--gradient_checkpointing", fix_vae, *eight_bit]),
        ("SDXL LoRA in 24 GB, fp32 VAE", "sdxl", caps["sdxl"], [*bf16, "--gradient_checkpointing", *eight_bit]),
        ("SD 1.5 LoRA in 12 GB", "sd15", caps["sd15"], [*bf16, "--gradient_checkpointing", *eight_bit]),
    ]


class PrecomputePeak:
    """CUDA peak memory of the precompute (text encoders and VAE) and, separately, of what follows it: the peak
    statistics are read and reset when encode_latents (called by diffusion_dpo.cache.load_or_precompute) returns."""

    def __init__(self):
        self.figures = {}

    def __enter__(self):
        self.original = diffusion_dpo.cache.encode_latents

        def encode_latents(*args, **kwargs):
            result = self.original(*args, **kwargs)
            if torch.cuda.is_available():
                self.figures = {
                    "precompute_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                    "precompute_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
                }
                torch.cuda.reset_peak_memory_stats()
            return result

        diffusion_dpo.cache.encode_latents = encode_latents
        return self

    def __exit__(self, *exc):
        diffusion_dpo.cache.encode_latents = self.original


def memory_step(args):
    """Each recipe once, cold cache included, with the CUDA allocator capped at the card size it is meant for less
    1 GiB (CUDA context and fragmentation): a run that finishes fits. Results are written after each recipe."""
    results = {"runs": []}
    out = Path(args.work) / "memory.json"
    for number, (name, family, cap_gb, flags) in enumerate(recipe_list(args.work, args.preset)):
        config = SUITE_PRESETS[args.preset][family]
        model_dir, data_dir = assets(args.work, family, args.preset)
        dpo = testing_utils.TRAINERS[family]
        argv = [
            f"--pretrained_model_name_or_path={model_dir}",
            f"--dataset_name={data_dir}",
            f"--resolution={config['resolution']}",
            f"--precompute_cache_dir={Path(args.work) / f'memory-cache-{number}'}",
            f"--output_dir={Path(args.work) / f'memory-{number}'}",
            f"--max_train_steps={max(4, config['steps'] // 2)}",
            f"--train_batch_size={config['batch']}",
            "--train_mode=lora",
            "--rank=8",
            "--report_to=none",
            "--checkpointing_steps=1000000",
            "--seed=0",
            *flags,
        ]
        run = {"name": name, "cap_gb": cap_gb, "pairs_per_step": config["batch"], "trainer_argv": shlex.join(argv)}
        if torch.cuda.is_available():
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, (cap_gb * 1e9 - 2**30) / total))
        try:
            with PrecomputePeak() as precompute:
                result, timers, memory, wall = benchmark_dpo.run_trainer(dpo, argv)
            run |= {"fits": True, "training_peak_gib": memory.gib, "wall_s": wall, **precompute.figures}
            if torch.cuda.is_available():
                run["training_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
            run["step_s"] = benchmark_dpo.steady_step_seconds(timers.calls["compute_loss"], 1, 1)
            print(f"{name}: fits; {json.dumps(run)}", flush=True)
        except torch.cuda.OutOfMemoryError as error:
            run |= {"fits": False, "error": str(error).splitlines()[0]}
            print(f"{name}: out of memory under the cap", flush=True)
        except (Exception, SystemExit) as error:
            run["error"] = f"{type(error).__name__}: {error}"
            traceback.print_exc()
        results["runs"].append(run)
        write_json(out, results)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.set_per_process_memory_fraction(1.0)
            torch.cuda.empty_cache()
    return results


def merge_step(args):
    """One JSON of the whole suite: each step's status, time and exact command (steps.tsv, written by
    gpu_suite.sh) and its figures (WORK/<step>.json)."""
    steps = []
    for line in (Path(args.work) / "steps.tsv").read_text().splitlines():
        name, status, seconds, limit, command = line.split("\t")
        figures_file = Path(args.work) / f"{name}.json"
        steps.append(
            {
                "step": name,
                "status": status,
                "seconds": float(seconds),
                "time_limit_s": int(limit),
                "command": command,
                "figures": json.loads(figures_file.read_text()) if figures_file.exists() else None,
            }
        )
    suite = {
        "suite": "benchmarks/gpu_suite.sh",
        "preset": args.preset,
        "environment": next((s["figures"] for s in steps if s["step"] == "env"), None),
        "steps": steps,
    }
    write_json(args.out_json, suite)
    print(f"wrote {args.out_json}: " + ", ".join(f"{s['step']} {s['status']}" for s in steps))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["env", "build", "compare", "variants", "memory", "merge"])
    parser.add_argument("work", help="the suite's work folder: models, data, caches, step figures")
    parser.add_argument("extra", nargs="*", help="compare: FAMILY RESEARCH_DIR; merge: OUT_JSON")
    parser.add_argument("--preset", default="gpu", choices=sorted(SUITE_PRESETS))
    args = parser.parse_args()
    if args.step == "compare":
        args.family, args.research_dir = args.extra
    if args.step == "merge":
        (args.out_json,) = args.extra
        return merge_step(args)
    step = {"env": env_step, "build": build_step, "compare": compare_step}.get(args.step)
    step = step or {"variants": variants_step, "memory": memory_step}[args.step]
    figures = step(args)
    name = f"compare-{args.family}" if args.step == "compare" else args.step
    write_json(Path(args.work) / f"{name}.json", figures)


if __name__ == "__main__":
    main()
