"""What the tests (and benchmarks/benchmark_dpo.py) repeat: running the real trainers, building their command lines,
and reading what a run left behind. Fixtures live in conftest.py."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

import train_diffusion_dpo
import train_diffusion_dpo_flux
import train_diffusion_dpo_flux2
import train_diffusion_dpo_sd3
import train_diffusion_dpo_sdxl
from diffusion_dpo.outputs import LORA_WEIGHT_NAME


ROOT = Path(__file__).resolve().parents[1]
# The trainer scripts: end-to-end behaviour is tested on each of them (the `every_script` marker, conftest.py).
TRAINERS = {
    "sd15": train_diffusion_dpo,
    "sdxl": train_diffusion_dpo_sdxl,
    "sd3": train_diffusion_dpo_sd3,
    "flux": train_diffusion_dpo_flux,
    "flux2": train_diffusion_dpo_flux2,
}
SD3_SEQUENCE_LENGTH = 16  # T5 tokens per caption in the tiny SD3 and Flux runs: the tiny captions need a few

N_PAIRS = 8  # decided pairs in the default dataset; it also holds 2 ties and 1 pair with a corrupt image
RESOLUTION = 32


def accelerate_launch(num_processes=1, *options):
    """`accelerate launch` on CPU processes, without an accelerate config file; a trainer script follows it. Two or
    more processes run with --multi_gpu (gloo), which needs ACCELERATE_USE_CPU=1 in the environment."""
    several = ["--multi_gpu"] if num_processes > 1 else []
    return [
        *(sys.executable, "-m", "accelerate.commands.launch", *several, "--num_processes", str(num_processes)),
        *("--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *options),
    ]


ACCELERATE_LAUNCH = accelerate_launch()


def command_line(flags):
    """A trainer command line from {flag name: value}: True is a bare switch, None and False leave the flag out,
    a list or tuple gives several values."""
    argv = []
    for name, value in flags.items():
        if value is True:
            argv.append(f"--{name}")
        elif value is not None and value is not False:
            argv += [f"--{name}", *(map(str, value) if isinstance(value, (list, tuple)) else [str(value)])]
    return argv


def run_trainer(module, argv):
    """Runs the real trainer (`module`: one of the two scripts) in this process and returns main's result.

    accelerate keeps its state in class attributes; it is reset first, so every run starts as a fresh process would.
    """
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return module.main(module.parse_args(argv))


def run_cli(module, argv, launcher=None, env=None):
    """Runs a trainer script as a separate process: with this Python, or through a launcher (ACCELERATE_LAUNCH)."""
    launcher = launcher or [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [*launcher, module.__file__, *argv], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600
    )


def pipeline_class(module):
    return module.FAMILY.pipeline_class


def denoiser(pipeline):
    """The pipeline's trained component: its UNet or transformer."""
    return getattr(pipeline, "unet", None) or pipeline.transformer


def denoiser_output(model):
    """A UNet's or an SD3, Flux or FLUX.2 transformer's prediction on fixed random inputs (with SDXL's added
    conditioning when the UNet has one)."""
    generator = torch.Generator().manual_seed(0)
    config = model.config
    if "timestep_guidance_channels" in config:  # FLUX.2: 8 x 8 tokens, 4-axis positions, no pooled text
        sample = torch.randn(1, 64, config.in_channels, generator=generator)
        text = torch.randn(1, 8, config.joint_attention_dim, generator=generator)
        positions = {"img_ids": torch.randn(1, 64, 4, generator=generator), "txt_ids": torch.zeros(1, 8, 4)}
        with torch.no_grad():
            return model(sample, text, torch.tensor([0.5]), **positions).sample
    if "guidance_embeds" in config:  # Flux: 8 x 8 tokens of packed latents
        sample = torch.randn(1, 64, config.in_channels, generator=generator)
        text = torch.randn(1, 8, config.joint_attention_dim, generator=generator)
        pooled = torch.randn(1, config.pooled_projection_dim, generator=generator)
        positions = {"img_ids": torch.randn(64, 3, generator=generator), "txt_ids": torch.zeros(8, 3)}
        guidance = torch.tensor([3.5]) if config.guidance_embeds else None
        with torch.no_grad():
            return model(sample, text, pooled, torch.tensor([0.5]), guidance=guidance, **positions).sample
    if "joint_attention_dim" in config:  # SD3's MMDiT
        sample = torch.randn(1, config.in_channels, 16, 16, generator=generator)
        text = torch.randn(1, 8, config.joint_attention_dim, generator=generator)
        pooled = torch.randn(1, config.pooled_projection_dim, generator=generator)
        with torch.no_grad():
            return model(sample, text, pooled, torch.tensor([500.0])).sample
    sample = torch.randn(1, 4, 16, 16, generator=generator)
    text = torch.randn(1, 77, config.cross_attention_dim, generator=generator)
    extra = {}
    if config.addition_embed_type == "text_time":
        pooled_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, pooled_dim, generator=generator),
            "time_ids": torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]),
        }
    with torch.no_grad():
        return model(sample, torch.tensor([500]), text, **extra).sample


def dataset_rows(folder, split="train"):
    """Every row of a split of a parquet dataset folder, in file order: the rows PreferencePairs.rows index."""
    import pyarrow.parquet as pq

    files = sorted(Path(folder).glob(f"**/{split}-*.parquet"))
    return [row for file in files for row in pq.read_table(file).to_pylist()]


def cache_folders(cache_root, n_pairs=None):
    """The latent caches under a --precompute_cache_dir (not its lock file), optionally only those of n_pairs pairs."""
    folders = sorted(p for p in Path(cache_root).iterdir() if p.is_dir() and not p.name.startswith("."))
    return [p for p in folders if n_pairs is None or len(np.load(p / "encoded.npy")) == n_pairs]


def lora_weights(output_dir):
    return load_file(os.path.join(output_dir, LORA_WEIGHT_NAME))


def assert_same_tensors(first, second, atol=1e-6):
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], atol=atol, rtol=0, msg=name)


def launch(dpo, argv, log):
    """Starts a trainer process writing its output to `log` (a pipe nobody reads could fill up and block it)."""
    with open(log, "w") as output:
        return subprocess.Popen(
            [sys.executable, dpo.__file__, *argv],
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            cwd=ROOT,
        )


def finished(process, log):
    assert process.wait() == 0, Path(log).read_text()[-3000:]


def parse_error(module, argv, capsys):
    """The one line a trainer's parse_args prints when it refuses `argv`: it must exit with status 2 and print no
    usage dump, nothing but that line."""
    try:
        module.parse_args(argv)
    except SystemExit as exit_info:
        assert exit_info.code == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        return line
    raise AssertionError(f"parse_args accepted {argv}")
