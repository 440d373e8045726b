"""Shared fixtures: tiny offline pipelines and Pick-a-Pic-format datasets, and helpers that run the real trainer."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path


# Everything offline, and the datasets cache out of the user's home, before the libraries read their config.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="dpo-tests-hf-home-")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402


ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]

import tiny_assets  # noqa: E402

import train_diffusion_dpo  # noqa: E402
import train_diffusion_dpo_sdxl  # noqa: E402


TRAINERS = {"sd15": train_diffusion_dpo, "sdxl": train_diffusion_dpo_sdxl}
# Test files whose behaviour both scripts must share mark themselves with this: each test then runs once per script.
both_trainers = pytest.mark.parametrize("dpo", sorted(TRAINERS), indirect=True)

N_PAIRS = 8  # decided pairs in the default dataset; it also holds 2 ties and 1 pair with a corrupt image
RESOLUTION = 32


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return tiny_assets.build_tiny_sd_pipeline(str(tmp_path_factory.mktemp("tiny-sd")))


@pytest.fixture(scope="session")
def tiny_sdxl_model(tmp_path_factory):
    return tiny_assets.build_tiny_sdxl_pipeline(str(tmp_path_factory.mktemp("tiny-sdxl")))


@pytest.fixture(scope="session")
def tiny_vpred_model(tmp_path_factory):
    return tiny_assets.build_tiny_sd_pipeline(
        str(tmp_path_factory.mktemp("tiny-sd-v")), prediction_type="v_prediction"
    )


@pytest.fixture(scope="session")
def pickapic_data(tmp_path_factory):
    """Pick-a-Pic-format parquet folder: N_PAIRS decided pairs of varied sizes, 2 ties, 1 undecodable image."""
    return tiny_assets.build_pickapic_dataset(
        str(tmp_path_factory.mktemp("pickapic")), n_pairs=N_PAIRS, n_ties=2, corrupt_pairs=1, vary_sizes=True
    )


@pytest.fixture(scope="session")
def sharded_pickapic(tmp_path_factory):
    """12 decided pairs in 3 parquet files of 4 rows each, as the Hub stores a large split."""
    return tiny_assets.build_pickapic_dataset(
        str(tmp_path_factory.mktemp("sharded")), n_pairs=12, n_ties=0, n_shards=3
    )


@pytest.fixture(scope="session")
def row_grouped_pickapic(tmp_path_factory):
    """The same layout in one parquet file of 3 row groups (4 rows each): a single large file."""
    return tiny_assets.build_pickapic_dataset(
        str(tmp_path_factory.mktemp("row-grouped")), n_pairs=12, n_ties=0, rows_per_group=4
    )


@pytest.fixture(scope="session")
def tiny_clip_scorer(tiny_model, tmp_path_factory):
    """A tiny random CLIP model with its tokenizer (the tiny pipeline's) and image processor in one folder, loadable
    with CLIPModel.from_pretrained and AutoProcessor.from_pretrained: a stand-in for PickScore or CLIP."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    folder = str(tmp_path_factory.mktemp("tiny-clip"))
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(tiny_model, "tokenizer"))
    layers = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
    text_config = dict(
        vocab_size=len(tokenizer),
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **layers,
    )
    vision_config = dict(image_size=RESOLUTION, patch_size=8, **layers)
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=16))
    clip.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": RESOLUTION}, crop_size={"height": RESOLUTION, "width": RESOLUTION}
    ).save_pretrained(folder)
    return folder


@pytest.fixture(params=["sd15"])
def dpo(request):
    """The trainer script under test (its module): SD 1.5 unless a test is marked `both_trainers`."""
    return TRAINERS[request.param]


@pytest.fixture
def tiny_pipeline(dpo, request):
    """The tiny model folder that fits the trainer under test."""
    return request.getfixturevalue("tiny_sdxl_model" if dpo is train_diffusion_dpo_sdxl else "tiny_model")


@pytest.fixture
def cli_args(tiny_pipeline, pickapic_data, tmp_path):
    """Returns a function building a trainer command line on the tiny assets; keyword overrides become flags."""

    def build(**overrides):
        flags = {
            "pretrained_model_name_or_path": tiny_pipeline,
            "dataset_name": pickapic_data,
            "output_dir": str(tmp_path / "out"),
            "precompute_cache_dir": str(tmp_path / "cache"),
            "resolution": RESOLUTION,
            "train_batch_size": 2,
            "max_train_steps": 2,
            "report_to": "none",
            "seed": 0,
        }
        flags.update(overrides)
        argv = []
        for name, value in flags.items():
            if value is True:
                argv.append(f"--{name}")
            elif value is not None and value is not False:
                argv += [f"--{name}", *(map(str, value) if isinstance(value, (list, tuple)) else [str(value)])]
        return argv

    return build


def run_trainer(module, argv):
    """Runs the real trainer (`module`: one of the two scripts) in this process and returns main's result."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return module.main(module.parse_args(argv))


def run_cli(module, argv, launcher=None, env=None):
    """Runs a trainer script as a separate process: with this Python, or through a launcher (`accelerate launch`)."""
    launcher = launcher or [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [*launcher, module.__file__, *argv], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600
    )


def pipeline_class(module):
    return module.StableDiffusionXLPipeline if module is train_diffusion_dpo_sdxl else module.StableDiffusionPipeline


def unet_output(unet):
    """The UNet's prediction on fixed random inputs (with SDXL's added conditioning when it has one)."""
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 16, 16, generator=generator)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    extra = {}
    if unet.config.addition_embed_type == "text_time":
        pooled_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, pooled_dim, generator=generator),
            "time_ids": torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]),
        }
    with torch.no_grad():
        return unet(sample, torch.tensor([500]), text, **extra).sample


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
    return load_file(os.path.join(output_dir, train_diffusion_dpo.LORA_WEIGHT_NAME))


def assert_same_tensors(first, second, atol=1e-6):
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], atol=atol, rtol=0, msg=name)


@pytest.fixture(autouse=True)
def accelerate_state():
    """The trainer logs through accelerate, which needs its state even when a test calls a function directly."""
    from accelerate.state import PartialState

    PartialState()
