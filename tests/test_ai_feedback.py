"""examples/label_pairs_with_reward_model.py: pairs labelled by a reward model (the tiny CLIP scorer), from a dataset
or from prompts, written in shards that resume and that the trainers train on (the SD 1.5 one here: every script
reads data alike)."""

import io
import json
import os
import re
import shutil

import label_pairs_with_reward_model as ai_feedback
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiny_assets
import torch
from filelock import FileLock
from PIL import Image
from reward_models import ClipScorer, score_images
from testing_utils import RESOLUTION, dataset_rows, parse_error, run_trainer

import train_diffusion_dpo
from diffusion_dpo import InputError
from diffusion_dpo.data import decode_image


PIXEL_LEVELS = 2  # how far (of 255) a generated image's pixels may move with the batching: float rounding
SCORE_ROUNDING = 0.01  # ... and its score (measured: 1 level and 4e-4 between AVX2 batchings)


def label(argv):
    return ai_feedback.main(ai_feedback.parse_args(argv))


@pytest.fixture
def label_args(tiny_clip_scorer):
    """Returns a function building a command line that labels with the tiny CLIP scorer as PickScore."""

    def build(output_dir, *extra):
        return [
            "--pickscore_model",
            tiny_clip_scorer,
            "--pickscore_processor",
            tiny_clip_scorer,
            "--batch_size",
            "4",
            "--output_dir",
            str(output_dir),
            *extra,
        ]

    return build


@pytest.fixture(scope="module")
def against_the_scorer(pickapic_data, tiny_clip_scorer, tmp_path_factory):
    """The default dataset with every decodable pair labelled against the tiny scorer's preference (ties too), and
    the scorer's (score_0, score_1) of each of its rows (None: undecodable)."""
    rows = dataset_rows(pickapic_data)
    scorer = ClipScorer(tiny_clip_scorer, tiny_clip_scorer, "cpu", torch.float32)
    scores = []
    for row in rows:
        try:
            images = [decode_image(row[name]) for name in ("jpg_0", "jpg_1")]
        except Exception:
            scores.append(None)
            continue
        scores.append(tuple(score_images(scorer, images, [row["caption"]] * 2)))
        row["label_0"] = float(scores[-1][0] < scores[-1][1])  # the image the scorer likes less wins
    folder = tmp_path_factory.mktemp("against-the-scorer")
    pq.write_table(pa.Table.from_pylist(rows), folder / "train-00000-of-00001.parquet")
    return str(folder), rows, scores


def output_rows(folder, split="train"):
    return dataset_rows(folder, split)


def assert_same_pairs(rows, expected):
    """The same pairs; scores to float precision (a scorer's batch, which a resumed run starts anew, moves the last
    digits)."""
    assert [{**row, "score_0": None, "score_1": None} for row in rows] == [
        {**row, "score_0": None, "score_1": None} for row in expected
    ]
    for name in ("score_0", "score_1"):
        np.testing.assert_allclose([row[name] for row in rows], [row[name] for row in expected], atol=1e-4)


def test_relabelled_pairs_follow_the_reward_model_and_train(dpo, against_the_scorer, label_args, cli_args, tmp_path):
    dataset, source_rows, scores = against_the_scorer
    entry = label(label_args(tmp_path / "labelled", "--dataset_name", dataset))

    written = output_rows(tmp_path / "labelled")
    decodable = [row for row, pair in enumerate(scores) if pair is not None]
    assert [row["source_row"] for row in written] == decodable  # every decodable pair, in order
    for row in written:
        source, (score_0, score_1) = source_rows[row["source_row"]], scores[row["source_row"]]
        assert row["score_0"] == pytest.approx(score_0, abs=1e-4) and row["score_1"] == pytest.approx(
            score_1, abs=1e-4
        )
        assert row["label_0"] == float(score_0 > score_1) == 1 - row["source_label_0"]  # flipped
        assert row["jpg_0"] == source["jpg_0"] and row["jpg_1"] == source["jpg_1"]  # the bytes as they came
        assert row["caption"] == source["caption"]
    counts = entry["counts"]
    assert counts["rows"] == len(source_rows) and counts["kept"] == counts["flipped"] == len(decodable)
    assert counts["dropped_undecodable"] == len(source_rows) - len(decodable) == 1 and "agreed" not in counts
    assert entry["finished"] and json.loads((tmp_path / "labelled" / "ai_feedback.json").read_text())["train"] == entry

    # the output trains unchanged; every pair is decided, so none is dropped
    run_trainer(dpo, cli_args(dataset_name=str(tmp_path / "labelled"), max_train_steps=1))


def test_pairs_below_the_margin_are_dropped_and_counted(against_the_scorer, label_args, tmp_path):
    dataset, _, scores = against_the_scorer
    margins = {row: abs(pair[0] - pair[1]) for row, pair in enumerate(scores) if pair is not None}
    threshold = float(np.median(list(margins.values())))
    entry = label(label_args(tmp_path / "out", "--dataset_name", dataset, "--min_margin", str(threshold)))

    kept = [row for row, margin in margins.items() if margin >= threshold]
    assert [row["source_row"] for row in output_rows(tmp_path / "out")] == kept
    assert entry["counts"]["dropped_below_margin"] == len(margins) - len(kept) > 0
    assert entry["counts"]["kept"] == len(kept)


def test_a_stopped_or_damaged_run_resumes_without_duplicating_pairs(against_the_scorer, label_args, tmp_path):
    dataset = against_the_scorer[0]
    full = label(label_args(tmp_path / "full", "--dataset_name", dataset, "--pairs_per_shard", "3"))
    expected = output_rows(tmp_path / "full")
    assert len(full["shards"]) == 4  # 10 decodable pairs

    argv = label_args(tmp_path / "out", "--dataset_name", dataset, "--pairs_per_shard", "3")
    stopped = label([*argv, "--max_pairs", "3"])
    assert not stopped["finished"] and stopped["shards"] == ["train-00000.parquet"]
    assert len(output_rows(tmp_path / "out")) == 3
    resumed = label(argv)
    assert_same_pairs(output_rows(tmp_path / "out"), expected)
    assert resumed["counts"] == full["counts"]

    # a shard lost (as a kill while writing would leave it: not there) is labelled again, and only it
    (tmp_path / "out" / "train-00003.parquet").unlink()
    (tmp_path / "out" / ".train-00003.parquet.partial-0123abcd").write_bytes(b"PAR1 cut short")
    label(argv)
    assert_same_pairs(output_rows(tmp_path / "out"), expected)
    assert not list((tmp_path / "out").glob(".train-*"))
    assert label(argv) == resumed  # finished: nothing to do

    with pytest.raises(InputError, match=r"labelled with other settings \(min_margin differ\)"):
        label([*argv, "--min_margin", "0.5"])
    with FileLock(str(tmp_path / "out" / ai_feedback.LOCK_NAME)):  # a run still writing there
        with pytest.raises(InputError, match="another labelling run is writing there"):
            label(argv)


def test_pairs_without_labels_are_read_when_told_to_ignore_labels(pickapic_data, label_args, tmp_path):
    table = pa.Table.from_pylist(dataset_rows(pickapic_data))
    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    pq.write_table(table.drop_columns(["label_0"]), unlabelled / "train-00000-of-00001.parquet")

    with pytest.raises(InputError, match=r"lacks column\(s\) \['label_0'\] of the pickapic"):
        label(label_args(tmp_path / "out", "--dataset_name", str(unlabelled)))
    assert not (tmp_path / "out").exists()  # stopped before writing anything
    entry = label(label_args(tmp_path / "out2", "--dataset_name", str(unlabelled), "--ignore_existing_labels"))
    written = output_rows(tmp_path / "out2")
    assert entry["counts"]["kept"] == len(written) == table.num_rows - 1  # all but the undecodable pair
    assert all(row["source_label_0"] is None for row in written)
    assert entry["settings"]["ignore_existing_labels"] and "flipped" not in entry["counts"]


def pixels(png):
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def test_pairs_from_prompts_are_best_against_worst_reproducibly_and_train(tiny_model, label_args, cli_args, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(tiny_assets.CAPTION_POOL[:3]) + "\n")

    def make_pairs(output_dir, *extra):
        return label(
            label_args(
                output_dir,
                *("--prompts_file", str(prompts), "--base_model", tiny_model, "--images_per_prompt", "3"),
                *("--num_inference_steps", "2", "--resolution", str(RESOLUTION), "--seed", "7", *extra),
            )
        )

    every = make_pairs(tmp_path / "all", "--pairing", "all")
    assert every["counts"]["prompts"] == 3 and every["counts"]["images"] == 9 and every["counts"]["kept"] == 9
    images, scores = {}, {}
    for row in output_rows(tmp_path / "all"):
        assert row["caption"] == tiny_assets.CAPTION_POOL[row["prompt_index"]]
        assert row["label_0"] == float(row["score_0"] > row["score_1"]) and row["image_index_0"] < row["image_index_1"]
        for side in (0, 1):
            index = (row["prompt_index"], row[f"image_index_{side}"])
            assert row[f"seed_{side}"] == ai_feedback.image_seed(7, *index)
            images[index], scores[index] = row[f"jpg_{side}"], row[f"score_{side}"]
    assert len(images) == 9

    # Another batching draws the same images up to float rounding (batched matrix products are not bitwise the same
    # at every batch size on every CPU); each prompt's pair is its best image against its worst, the same pair
    # wherever the scores are not razor-thin.
    best_worst = make_pairs(tmp_path / "best-worst", "--batch_size", "2")
    written = output_rows(tmp_path / "best-worst")
    assert [row["prompt_index"] for row in written] == [0, 1, 2] and best_worst["counts"]["kept"] == 3
    compared = 0
    for row in written:
        prompt = row["prompt_index"]
        for side in (0, 1):
            index = (prompt, row[f"image_index_{side}"])
            assert np.abs(pixels(row[f"jpg_{side}"]) - pixels(images[index])).max() <= PIXEL_LEVELS
            assert row[f"score_{side}"] == pytest.approx(scores[index], abs=SCORE_ROUNDING)
        own = {j: scores[(prompt, j)] for j in range(3)}
        ranked = sorted(own.values())
        if min(ranked[1] - ranked[0], ranked[2] - ranked[1]) > 2 * SCORE_ROUNDING:
            best, worst = max(own, key=own.get), min(own, key=own.get)
            assert (row["image_index_0"], row["image_index_1"]) == tuple(sorted((best, worst)))
            assert row["label_0"] == float(row["image_index_0"] == best)
            compared += 1
    assert compared >= 2  # the tiny scorer's margins are far wider than rounding: the pairs were compared

    run_trainer(train_diffusion_dpo, cli_args(dataset_name=str(tmp_path / "best-worst"), max_train_steps=1))


@pytest.mark.parametrize("output", ["the dataset", "inside it", "around it", "inside it through a link", "relative"])
def test_an_output_folder_that_is_holds_or_lies_inside_the_dataset_is_refused(
    pickapic_data, tmp_path, monkeypatch, capsys, output
):
    """Shards written there would be read back as the dataset's own rows: refused at parse time, nothing written."""
    dataset = tmp_path / "data" / "pairs"
    dataset.mkdir(parents=True)
    for source in sorted(os.listdir(pickapic_data)):
        shutil.copy(os.path.join(pickapic_data, source), dataset)
    (tmp_path / "link").symlink_to(dataset)
    monkeypatch.chdir(tmp_path / "data")
    output_dir = {
        "the dataset": dataset,
        "inside it": dataset / "labelled",
        "around it": tmp_path / "data",
        "inside it through a link": tmp_path / "link" / "labelled",
        "relative": "pairs/../pairs",
    }[output]
    before = sorted(os.listdir(dataset))
    line = parse_error(ai_feedback, ["--dataset_name", str(dataset), "--output_dir", str(output_dir)], capsys)
    assert re.search(r"error: --output_dir .* is, holds or lies inside --dataset_name .*pairs: ", line)
    assert sorted(os.listdir(dataset)) == before
