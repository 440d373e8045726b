"""Data and cache faults a user can cause: odd labels and captions, data files changed in place, damaged caches, a
full or unwritable disk, an interrupted precompute, a model the trainer cannot condition. Each ends in a counted
skip, a one-line message, or a refusal, never a silent wrong result."""

import logging
import os
import random

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiny_assets
from testing_utils import cache_folders, run_trainer


def jpeg_pair(rng):
    """A (winner, loser) pair of JPEG bytes: a warm and a cool image."""
    return tuple(tiny_assets._jpeg_bytes(tiny_assets.make_shape_image(warm, rng, 32)) for warm in (True, False))


def write_split(folder, labels, captions, label_type=pa.string(), caption_type=pa.string(), **options):
    """One parquet file of Pick-a-Pic columns with the given labels and captions (images: warm first)."""
    rng = random.Random(0)
    images = [jpeg_pair(rng) for _ in labels]
    folder.mkdir(exist_ok=True)
    path = folder / "train-00000-of-00001.parquet"
    table = pa.table(
        {
            "caption": pa.array(captions, caption_type),
            "jpg_0": pa.array([pair[0] for pair in images], pa.binary()),
            "jpg_1": pa.array([pair[1] for pair in images], pa.binary()),
            "label_0": pa.array(labels, label_type),
        }
    )
    pq.write_table(table, path, **options)
    return path


# ---- labels and captions -------------------------------------------------------------------------------------------


@pytest.mark.both_trainers
def test_an_unparsable_label_drops_its_pair_not_its_file(dpo, cli_args, tmp_path, caplog):
    labels = ["1", "0", "left", "0.5", "1.0", "0", None]
    write_split(tmp_path / "data", labels, [f"caption {i}" for i in range(len(labels))])
    caplog.set_level(logging.INFO)
    pairs = dpo.load_preference_pairs(dpo.parse_args(cli_args(dataset_name=str(tmp_path / "data"))), "train")
    assert pairs.rows.tolist() == [0, 1, 4, 5]
    assert pairs.second_is_winner.tolist() == [False, True, False, True]
    assert "dropped 1 tied pairs and 2 pairs with labels outside {0, 0.5, 1}" in caplog.text
    assert "Skipping" not in caplog.text


@pytest.mark.both_trainers
def test_a_nan_caption_is_the_empty_caption(dpo, cli_args, tmp_path):
    rng = random.Random(0)
    images = [jpeg_pair(rng) for _ in range(3)]
    # pandas stores a column of missing captions as float NaN
    frame = pd.DataFrame(
        {
            "caption": [np.nan] * 3,
            "jpg_0": [pair[0] for pair in images],
            "jpg_1": [pair[1] for pair in images],
            "label_0": [1.0, 0.0, 1.0],
        }
    )
    (tmp_path / "data").mkdir()
    frame.to_parquet(tmp_path / "data" / "train-00000-of-00001.parquet")
    assert pq.read_schema(tmp_path / "data" / "train-00000-of-00001.parquet").field("caption").type == pa.float64()
    pairs = dpo.load_preference_pairs(dpo.parse_args(cli_args(dataset_name=str(tmp_path / "data"))), "train")
    assert pairs.captions == ["", "", ""]


# ---- a data file changed in place ----------------------------------------------------------------------------------


def keep_times(path, stat):
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.mark.both_trainers
def test_other_rows_of_the_same_size_and_mtime_change_the_identity(dpo, cli_args, tmp_path):
    options = dict(compression="none")  # same-length captions: the same file size
    path = write_split(tmp_path / "data", [1.0, 0.0], ["a red cat", "a big dog"], pa.float64(), **options)
    args = dpo.parse_args(cli_args(dataset_name=str(tmp_path / "data")))
    before, stat = dpo.stream_split(args, "train")[1], path.stat()
    write_split(tmp_path / "data", [1.0, 0.0], ["a tan cow", "a big dog"], pa.float64(), **options)
    keep_times(path, stat)
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    assert dpo.stream_split(args, "train")[1] != before


@pytest.mark.both_trainers
def test_a_data_file_rewritten_with_its_old_mtime_is_not_read_from_the_old_cache(dpo, cli_args, tmp_path):
    data = tiny_assets.build_pickapic_dataset(str(tmp_path / "data"), n_pairs=6, n_ties=0, seed=0)
    path = tmp_path / "data" / "train-00000-of-00001.parquet"
    stat = path.stat()
    run_trainer(dpo, cli_args(dataset_name=data, output_dir=tmp_path / "a", max_train_steps=1))
    tiny_assets.build_pickapic_dataset(data, n_pairs=6, n_ties=0, seed=1)
    keep_times(path, stat)
    run_trainer(dpo, cli_args(dataset_name=data, output_dir=tmp_path / "b", max_train_steps=1))
    assert len(cache_folders(tmp_path / "cache")) == 2
    assert len(list((tmp_path / "cache").glob("pairs-*.parquet"))) == 2
    args = dpo.parse_args(cli_args(dataset_name=data, output_dir=tmp_path / "c"))
    captions = pq.read_table(path).column("caption").to_pylist()
    assert dpo.load_preference_pairs(args, "train").captions == captions
