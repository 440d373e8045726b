"""Fixtures: tiny offline pipelines and Pick-a-Pic-format datasets, and the trainer under test. Helpers that are not
fixtures (running a trainer, reading its outputs) are in testing_utils.py."""

import os
import tempfile


# Everything offline, and the datasets cache out of the user's home, before the libraries read their config.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="dpo-tests-hf-home-")

import pytest
import tiny_assets
import torch
from testing_utils import N_PAIRS, RESOLUTION, SD3_SEQUENCE_LENGTH, TRAINERS, command_line


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return tiny_assets.build_tiny_sd_pipeline(str(tmp_path_factory.mktemp("tiny-sd")))


@pytest.fixture(scope="session")
def tiny_sdxl_model(tmp_path_factory):
    return tiny_assets.build_tiny_sdxl_pipeline(str(tmp_path_factory.mktemp("tiny-sdxl")))


@pytest.fixture(scope="session")
def tiny_sd3_model(tmp_path_factory):
    return tiny_assets.build_tiny_sd3_pipeline(str(tmp_path_factory.mktemp("tiny-sd3")))


@pytest.fixture(scope="session")
def tiny_flux_model(tmp_path_factory):
    return tiny_assets.build_tiny_flux_pipeline(str(tmp_path_factory.mktemp("tiny-flux")))


@pytest.fixture(scope="session")
def tiny_flux2_model(tmp_path_factory):
    return tiny_assets.build_tiny_flux2_klein_pipeline(str(tmp_path_factory.mktemp("tiny-flux2-klein")))


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


def pytest_generate_tests(metafunc):
    """A test that takes the `dpo` fixture runs on the SD 1.5 script, or once per trainer script when it is marked
    `every_script` (end-to-end behaviour every script must have); an explicit parametrize of `dpo` wins."""
    if "dpo" not in metafunc.fixturenames:
        return
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0]
        if "dpo" in (names.replace(" ", "").split(",") if isinstance(names, str) else names):
            return
    every = metafunc.definition.get_closest_marker("every_script") is not None
    metafunc.parametrize("dpo", list(TRAINERS) if every else ["sd15"], indirect=True)


@pytest.fixture
def dpo(request):
    """The trainer script under test (its module), chosen by pytest_generate_tests."""
    return TRAINERS[request.param]


@pytest.fixture
def tiny_pipeline(dpo, request):
    """The tiny model folder that fits the trainer under test."""
    fixture = {
        "sd15": "tiny_model",
        "sdxl": "tiny_sdxl_model",
        "sd3": "tiny_sd3_model",
        "flux": "tiny_flux_model",
        "flux2": "tiny_flux2_model",
    }[script_name(dpo)]
    return request.getfixturevalue(fixture)


def script_name(dpo):
    return next(name for name, module in TRAINERS.items() if module is dpo)


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
        if os.path.isdir(os.path.join(tiny_pipeline, "transformer")):  # SD3, Flux: a short T5 (klein: Qwen3) sequence
            flags["max_sequence_length"] = SD3_SEQUENCE_LENGTH
        flags.update(overrides)
        return command_line(flags)

    return build


@pytest.fixture
def bitsandbytes_on_cpu(monkeypatch):
    """bitsandbytes (0.48 and later) runs 4-bit layers on the CPU; diffusers' quantizer still insists on a GPU."""
    pytest.importorskip("bitsandbytes")
    from diffusers.quantizers.bitsandbytes import BnB4BitDiffusersQuantizer

    monkeypatch.setattr(BnB4BitDiffusersQuantizer, "validate_environment", lambda self, *args, **kwargs: None)


@pytest.fixture(autouse=True)
def accelerate_state():
    """The trainer logs through accelerate, which needs its state even when a test calls a function directly."""
    from accelerate.state import PartialState

    PartialState()
