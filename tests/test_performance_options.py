"""Speed options change how fast a step runs, never what it computes; the benchmark script keeps working."""

import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch
from testing_utils import ROOT, assert_same_tensors, lora_weights, run_trainer


LN2 = math.log(2)


@pytest.mark.every_script
def test_speed_options_train_the_same_lora(dpo, cli_args, tmp_path, monkeypatch):
    """--torch_compile (every script: the UNet's or SD3 transformer's repeated blocks) and --channels_last (the UNet
    scripts; SD3 has no such flag) give the same losses and LoRA as a plain run. SD3's blocks are compiled with
    dynamo and AOT autograd but eager kernels: Inductor's kernels for them take two CPU minutes on a cold cache."""
    options = ["torch_compile"] + (["channels_last"] if dpo.FAMILY.denoiser == "unet" else [])
    if dpo.FAMILY.denoiser == "transformer":
        compile_module = torch.nn.Module.compile
        monkeypatch.setattr(
            torch.nn.Module, "compile", lambda self, *args, **options: compile_module(self, backend="aot_eager")
        )
    plain = run_trainer(dpo, cli_args(output_dir=tmp_path / "plain"))
    for option in options:
        faster = run_trainer(dpo, cli_args(output_dir=tmp_path / option, **{option: True}))
        assert faster["history"][0]["loss"] == pytest.approx(LN2, abs=1e-4), option  # the reference still works
        for before, after in zip(plain["history"], faster["history"], strict=True):  # other kernels round
            assert after["loss"] == pytest.approx(before["loss"], abs=1e-3), option  # differently; beta scales that
        assert_same_tensors(lora_weights(tmp_path / "plain"), lora_weights(tmp_path / option), atol=1e-5)


def test_benchmark_prints_dpo_and_sft_step_times(tmp_path):
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "benchmark_dpo.py"),
        "--preset",
        "tiny",
        "--n_pairs",
        "8",
        "--steps",
        "4",
        "--warmup",
        "1",
        "--repeats",
        "1",
        "--work_dir",
        str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {
        line.split("|")[1].strip(): line.split("|")
        for line in result.stdout.splitlines()
        if line.startswith("| lora") or line.startswith("| full")
    }
    assert set(rows) == {"lora", "full"}
    for row in rows.values():
        dpo_step, sft_step, ratio = (float(row[i]) for i in (2, 3, 4))
        assert ratio == pytest.approx(dpo_step / sft_step, rel=0.01)
    assert "DPO first-step loss 0.6931" in result.stdout
    assert "images/s" in result.stdout and "captions/s" in result.stdout


def load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_dpo", ROOT / "benchmarks" / "benchmark_dpo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_step_time_is_per_optimizer_step_under_gradient_accumulation():
    benchmark = load_benchmark()
    # compute_loss runs once per micro-batch: 1 s apart, 3 micro-batches per optimizer step, 5 steps
    calls = [(float(second), second + 0.5) for second in range(15)]
    assert benchmark.steady_step_seconds(calls, accumulation_steps=3, warmup=1) == pytest.approx(3.0)
    assert benchmark.steady_step_seconds(calls, accumulation_steps=1, warmup=1) == pytest.approx(1.0)
