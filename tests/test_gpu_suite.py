"""benchmarks/gpu_suite.sh rehearsed on the CPU with the tiny presets, its whole-UNet compile patch, and a memory
feature of the package it measures on a GPU: the VAE encode batch that halves on CUDA out-of-memory."""

import importlib
import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from diffusers.configuration_utils import FrozenDict
from testing_utils import ROOT

from diffusion_dpo.cache import VaeEncoder
from diffusion_dpo.family import build_models


@pytest.fixture
def gpu_suite(monkeypatch):
    """benchmarks/gpu_suite.py, imported from its folder (benchmarks/ is no package)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module("gpu_suite")


class OutOfMemoryAbove:
    """A stand-in VAE whose encode raises CUDA out-of-memory for batches larger than `limit` images; its latents'
    mean is twice the first channel of the pixels, and its config has a shift and a scale, as SD3's VAE has."""

    config = FrozenDict(shift_factor=0.25, scaling_factor=0.5)

    def __init__(self, limit):
        self.limit, self.batch_sizes = limit, []

    def encode(self, pixels):
        self.batch_sizes.append(len(pixels))
        if len(pixels) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (stand-in)")
        latents = pixels[:, :1] * 2
        return type("Output", (), {"latent_dist": type("Dist", (), {"mean": latents})})


def stand_in_latents(images):
    return (images[:, :1] * 2 - 0.25) * 0.5


def test_vae_encode_batch_halves_on_out_of_memory(caplog):
    """The precompute survives a VAE batch too large for the GPU: the batch halves (one warning), the failed images
    are encoded again, and every latent comes out as one batch would have given it."""
    vae = OutOfMemoryAbove(limit=2)
    encoder = VaeEncoder(vae, 8, torch.device("cpu"), torch.float32, torch.contiguous_format)
    images = torch.randn(11, 3, 4, 4)
    with caplog.at_level(logging.WARNING):
        latents = encoder(images)
        more = encoder(images[:3])  # the smaller size is kept: no further out-of-memory
    torch.testing.assert_close(latents, stand_in_latents(images))
    torch.testing.assert_close(more, stand_in_latents(images[:3]))
    assert encoder.batch_size == 2 and encoder.backed_off
    assert vae.batch_sizes == [8, 4, 2, 2, 2, 2, 2, 1, 2, 1]
    warnings = [r.getMessage() for r in caplog.records if "out of memory" in r.getMessage()]
    assert len(warnings) == 1 and "halved to 4" in warnings[0]


def test_vae_encode_out_of_memory_at_one_image_is_raised():
    encoder = VaeEncoder(OutOfMemoryAbove(limit=0), 4, torch.device("cpu"), torch.float32, torch.contiguous_format)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        encoder(torch.randn(3, 3, 4, 4))
    assert encoder.batch_size == 1


STAND_IN_RESEARCH_SCRIPT = '''"""Stand-in for a diffusers research script: its flags, and a "Steps" progress bar."""
import argparse
import os
import time

from tqdm.auto import tqdm

parser = argparse.ArgumentParser()
parser.add_argument("--max_train_steps", type=int)
parser.add_argument("--output_dir")
args, _ = parser.parse_known_args()
os.makedirs(args.output_dir, exist_ok=True)
for _ in tqdm(range(args.max_train_steps), desc="Steps", mininterval=0):
    time.sleep(0.05)
'''


def test_gpu_suite_rehearsal_on_cpu(tmp_path, gpu_suite):
    """The suite with the tiny preset, a stand-in research script (diffusers' needs torchvision) and a 2-step budget
    margin. Left out to stay near a minute on 2 cores: compare-sdxl (compare-sd15's code with --sdxl) and variants
    (the ratio-table machinery, tested by the benchmark's own runs; its compile patch is tested below)."""
    research = tmp_path / "research"
    research.mkdir()
    for name in ("train_diffusion_dpo.py", "train_diffusion_dpo_sdxl.py"):
        (research / name).write_text(STAND_IN_RESEARCH_SCRIPT)
    out = tmp_path / "out"
    env = {
        **os.environ,
        "GPU_SUITE_PRESET": "tiny",
        "GPU_SUITE_WORK": str(tmp_path / "work"),
        "GPU_SUITE_SKIP": "compare-sdxl variants",
        "GPU_SUITE_WHEELS": str(tmp_path / "no-wheels"),  # this machine has what the suite needs
        "GPU_SUITE_RESEARCH_IMPORTS": "",
        "OMP_NUM_THREADS": "1",
        "PYTHON": sys.executable,
    }
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), str(out), str(research)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    suite = json.loads((out / "gpu_suite.json").read_text())
    log = (out / "gpu_suite.log").read_text()
    statuses = {step["step"]: step["status"] for step in suite["steps"]}
    assert statuses == {
        "env": "ok",
        "build": "ok",
        "compare-sd15": "ok",
        "compare-sdxl": "skipped: GPU_SUITE_SKIP",
        "variants": "skipped: GPU_SUITE_SKIP",
        "memory": "ok",
    }, log
    assert suite["environment"]["versions"]["torch"] == torch.__version__
    assert set(suite["environment"]["importable"]) >= {"torchvision", "wandb", "bitsandbytes"}
    steps = {step["step"]: step for step in suite["steps"]}
    assert "gpu_suite.py build" in steps["build"]["command"]
    comparison = steps["compare-sd15"]["figures"]
    assert comparison["figures"]["ours"]["step_s"] > 0 and comparison["figures"]["diffusers"]["step_s"] > 0
    assert comparison["speed_ours_over_theirs"] > 0 and "peak_memory_runner.py" in comparison["commands"]["ours"]
    recipes = steps["memory"]["figures"]["runs"]
    assert [r["name"] for r in recipes] == [name for name, *_ in gpu_suite.recipe_list(tmp_path, "tiny")]
    assert all(r["fits"] and r["training_peak_gib"] > 0 for r in recipes), recipes


def test_gpu_suite_missing_research_script_is_skipped(tmp_path):
    env = {
        **os.environ,
        "GPU_SUITE_PRESET": "tiny",
        "GPU_SUITE_WORK": str(tmp_path / "work"),
        "PYTHON": sys.executable,
    }
    env["GPU_SUITE_SKIP"] = "env build variants memory"
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), str(tmp_path / "out"), str(tmp_path / "nowhere")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    steps = json.loads((tmp_path / "out" / "gpu_suite.json").read_text())["steps"]
    assert {s["step"]: s["status"] for s in steps}["compare-sd15"] == "skipped: no research script"


def test_whole_unet_compile_patch(monkeypatch, gpu_suite, dpo, cli_args):
    """The variants' full-graph compile: the trainer's --torch_compile (in build_models) compiles the whole UNet
    instead of its repeated blocks, and only inside the patch."""
    from accelerate import Accelerator
    from diffusers import UNet2DConditionModel

    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *args, **kwargs: compiled.append(self))
    args = dpo.parse_args(cli_args(torch_compile=True))
    with gpu_suite.unet_compiled_whole():
        unet, _ = build_models(args, dpo.FAMILY, UNet2DConditionModel, dpo.LORA_TARGET_MODULES, Accelerator())
    assert compiled == [unet]
    compiled.clear()
    unet.compile_repeated_blocks()  # restored: the trainer's regional compilation again
    assert compiled and unet not in compiled
