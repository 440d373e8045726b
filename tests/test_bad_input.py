"""Bad input fails fast with one clear line (or is a counted skip, see test_data_and_cache.py). The checks are
shared (diffusion_dpo.args, .data, .checkpoints): tested once, on the SD 1.5 script; the flag errors that differ per
family, and one bad flag through each script's command line, are tested on every script."""

import importlib.util
import io
import json
import math
import random
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiny_assets
from diffusers.utils.import_utils import is_xformers_available
from testing_utils import cache_folders, parse_error, run_cli, run_trainer

from diffusion_dpo import InputError


@pytest.mark.parametrize(
    "flags,message",
    [
        ({"resolution": 36}, "--resolution must be a positive multiple of 8"),
        ({"max_train_samples": 0}, "--max_train_samples must be at least 1"),
        ({"lr_warmup_steps": -1}, "--lr_warmup_steps must not be negative"),
        ({"loss_type": "kto"}, "invalid choice: 'kto'"),
        ({"lr_scheduler": "warmup_cosine"}, "invalid choice: 'warmup_cosine'"),
        ({"max_train_steps": 0}, "--max_train_steps must be at least 1"),
        ({"beta_dpo": float("inf")}, "--beta_dpo must be a finite number above 0"),
        ({"proportion_empty_prompts": 1.5}, "--proportion_empty_prompts must lie in [0, 1]"),
        ({"beta_mapo": 0.2}, "--beta_mapo weighs MaPO's margin term: it needs --loss_type mapo"),
        ({"output_kohya_format": True, "train_mode": "full"}, "--output_kohya_format converts a LoRA"),
        ({"report_to": "wandb", "hub_token": "hf_secret"}, "would log your token"),
        ({"use_8bit_adam": True, "use_adafactor": True}, "choose one of --use_8bit_adam and --use_adafactor"),
    ],
    ids=[
        "resolution",
        "max_train_samples",
        "warmup",
        "loss_type",
        "scheduler",
        "zero-steps",
        "beta",
        "dropout",
        "beta_mapo",
        "kohya-full",
        "wandb-token",
        "optimizers",
    ],
)
def test_flag_errors_stop_before_anything_loads(dpo, cli_args, capsys, flags, message):
    assert message in parse_error(dpo, cli_args(**flags), capsys)


@pytest.mark.every_script
def test_the_resolution_must_fit_each_familys_latent_patches(dpo, cli_args, capsys):
    multiple = 16 if dpo.FAMILY.denoiser == "transformer" else 8  # SD3: the VAE's 8 x 2 x 2 patches
    line = parse_error(dpo, cli_args(resolution=36), capsys)
    assert f"--resolution must be a positive multiple of {multiple}, got 36" in line
    if multiple == 16:
        assert "multiple of 16, got 40" in parse_error(dpo, cli_args(resolution=40), capsys)
    else:
        assert dpo.parse_args(cli_args(resolution=40)).resolution == 40


@pytest.mark.every_script
def test_xformers_is_a_unet_option(dpo, cli_args, capsys):
    argv = cli_args(enable_xformers_memory_efficient_attention=True)
    if dpo.FAMILY.denoiser == "transformer":  # SD3's transformer uses PyTorch's SDPA attention
        assert "unrecognized arguments: --enable_xformers_memory_efficient_attention" in parse_error(dpo, argv, capsys)
    elif is_xformers_available():
        assert dpo.parse_args(argv).enable_xformers_memory_efficient_attention
    else:
        assert "needs xformers" in parse_error(dpo, argv, capsys)


def test_8bit_adam_without_bitsandbytes(dpo, cli_args, capsys, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a)
    )
    assert "--use_8bit_adam needs `pip install bitsandbytes`" in parse_error(dpo, cli_args(use_8bit_adam=True), capsys)


def test_an_earlier_run_is_never_overwritten(dpo, cli_args):
    run_trainer(dpo, cli_args(max_train_steps=1))
    with pytest.raises(InputError, match="already holds a trained model"):
        run_trainer(dpo, cli_args(max_train_steps=1))


def test_resume_never_restarts_over_a_finished_model(dpo, cli_args):
    run_trainer(dpo, cli_args(max_train_steps=1, checkpointing_steps=5))  # finished, no checkpoint written
    with pytest.raises(InputError, match="holds a finished model but no checkpoint"):
        run_trainer(dpo, cli_args(resume_from_checkpoint="latest"))


def test_resume_from_a_missing_checkpoint_folder_is_refused(dpo, cli_args):
    with pytest.raises(InputError, match="no such checkpoint folder"):
        run_trainer(dpo, cli_args(resume_from_checkpoint="checkpoint-99"))


def test_resume_from_a_folder_not_named_like_a_checkpoint_is_refused(dpo, cli_args, tmp_path):
    (tmp_path / "not-a-checkpoint").mkdir()
    with pytest.raises(InputError, match="expected a folder named checkpoint-<step>"):
        run_trainer(dpo, cli_args(resume_from_checkpoint=tmp_path / "not-a-checkpoint"))


def test_missing_columns_are_named(dpo, cli_args):
    with pytest.raises(InputError, match=r"lacks column\(s\) \['prompt'\]"):
        run_trainer(dpo, cli_args(caption_column="prompt"))


def test_a_split_of_only_ties_is_refused(dpo, cli_args, tmp_path):
    only_ties = tiny_assets.build_pickapic_dataset(str(tmp_path / "ties"), n_pairs=0, n_ties=3)
    with pytest.raises(InputError, match="no preference pairs left after dropping 3 ties"):
        run_trainer(dpo, cli_args(dataset_name=only_ties))


def test_an_unloadable_dataset_names_the_alternatives(dpo, cli_args, tmp_path):
    with pytest.raises(InputError, match="cannot load dataset .*liuhuohuo2/pick-a-pic-v2"):
        run_trainer(dpo, cli_args(dataset_name=str(tmp_path / "no-such-dataset")))


@pytest.mark.every_script
def test_the_command_line_prints_one_line_and_no_traceback(dpo, cli_args):
    """A flag the data does not fit (--caption_column names a column it lacks) is found as the run starts: the
    script's command line turns it into one line and exit status 1."""
    completed = run_cli(dpo, cli_args(caption_column="prompt"))
    assert completed.returncode == 1
    assert "Traceback" not in completed.stderr
    line = completed.stderr.strip().splitlines()[-1]  # library notices may come before it
    assert line.startswith("error: dataset") and "lacks column(s) ['prompt']" in line


def image_bytes(image, format="JPEG"):
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def test_odd_images_captions_and_labels_are_converted_skipped_or_dropped(dpo, cli_args, tmp_path):
    rng = random.Random(0)

    def warm():
        return tiny_assets.make_shape_image(True, rng, 40)

    def cool():
        return tiny_assets.make_shape_image(False, rng, 40)

    good = image_bytes(warm())
    # (caption, winner bytes, loser bytes, label_0); label 1: the first image is preferred
    rows = [
        ("plain pair", good, image_bytes(cool()), 1.0),
        ("rgba and grayscale", image_bytes(warm().convert("RGBA"), "PNG"), image_bytes(cool().convert("L")), 1.0),
        ("cmyk", image_bytes(warm().convert("CMYK")), image_bytes(cool().convert("CMYK")), 1.0),
        ("truncated jpeg", good[: len(good) * 2 // 3], image_bytes(cool()), 1.0),
        ("not an image", b"<html>404</html>", image_bytes(cool()), 1.0),
        (None, image_bytes(cool()), image_bytes(warm()), 0.0),
        ("", image_bytes(warm()), image_bytes(cool()), 1.0),
        ("label 2", good, good, 2.0),
        ("label -1", good, good, -1.0),
        ("label nan", good, good, float("nan")),
    ]
    data = tmp_path / "odd"
    data.mkdir()
    columns = list(zip(*rows))
    pq.write_table(
        pa.table(
            {
                "caption": pa.array(columns[0], pa.string()),
                "jpg_0": pa.array(columns[1], pa.binary()),
                "jpg_1": pa.array(columns[2], pa.binary()),
                "label_0": pa.array(columns[3], pa.float64()),
            }
        ),
        data / "train-00000-of-00001.parquet",
    )

    result = run_trainer(dpo, cli_args(dataset_name=str(data), max_train_steps=2))
    assert all(math.isfinite(h["loss"]) for h in result["history"])
    (cache,) = cache_folders(tmp_path / "cache")
    info = json.loads((cache / "cache_info.json").read_text())
    assert info["pairs"] == 7  # the three labels outside {0, 0.5, 1} were dropped
    undecodable = np.load(cache / "undecodable.npy")
    assert undecodable.tolist() == [False, False, False, True, True, False, False]  # counted skips
    assert np.load(cache / "encoded.npy")[:3].any(axis=1).all()  # RGBA, L and CMYK were converted to RGB
    caption_index = np.load(cache / "caption_index.npy")
    assert caption_index[5] == caption_index[6]  # None and "" both read the empty caption's embedding


def test_unreadable_source_files_cost_their_pairs_not_the_run(dpo, cli_args, tmp_path):
    data = tiny_assets.build_pickapic_dataset(str(tmp_path / "data"), n_pairs=12, n_ties=0, n_shards=3)
    # file 1: labels and captions read, but its image column does not decompress (a damaged download)
    damaged = tmp_path / "data" / "train-00001-of-00003.parquet"
    pq.write_table(pq.read_table(damaged), damaged, compression="zstd")
    chunk = pq.ParquetFile(damaged).metadata.row_group(0).column(1)  # jpg_0
    assert chunk.path_in_schema == "jpg_0"
    raw = bytearray(damaged.read_bytes())
    frame = raw.index(bytes.fromhex("28b52ffd"), chunk.data_page_offset)  # the start of a zstd frame
    raw[frame : frame + 4] = bytes(4)
    damaged.write_bytes(bytes(raw))
    # file 2: not parquet at all
    (tmp_path / "data" / "train-00002-of-00003.parquet").write_bytes(b"<html>404 Not Found</html>" * 8)

    result = run_trainer(dpo, cli_args(dataset_name=data, max_train_steps=2))
    assert all(math.isfinite(h["loss"]) for h in result["history"])
    (cache,) = cache_folders(tmp_path / "cache")
    assert json.loads((cache / "cache_info.json").read_text())["pairs"] == 8  # file 2's rows are not pairs
    undecodable = np.load(cache / "undecodable.npy")
    assert undecodable.tolist() == [False] * 4 + [True] * 4  # file 1's pairs: counted skips
    assert np.load(cache / "encoded.npy")[:4].any(axis=1).all()


@pytest.mark.every_script
def test_a_model_folder_missing_a_part_is_named(dpo, cli_args, tiny_pipeline, tmp_path, capsys):
    broken = tmp_path / "model"
    shutil.copytree(tiny_pipeline, broken, ignore=shutil.ignore_patterns("vae"))
    line = parse_error(dpo, cli_args(pretrained_model_name_or_path=broken), capsys)
    assert f"model folder '{broken}' lacks ['vae']" in line


def test_a_missing_model_folder_is_named(dpo, cli_args, tmp_path, capsys):
    line = parse_error(dpo, cli_args(pretrained_model_name_or_path=tmp_path / "no-such-model"), capsys)
    assert "no such model folder" in line


def test_a_batch_larger_than_the_data_is_refused(dpo, cli_args):
    with pytest.raises(InputError, match="--train_batch_size 16 needs at least 16 usable pairs; the data has 8"):
        run_trainer(dpo, cli_args(train_batch_size=16))
