"""The row layouts the trainers read (docs/data.md): Pick-a-Pic columns, chosen/rejected, vote counts, from parquet,
an image folder or webdataset shards. Reading them is shared (diffusion_dpo.data): tested once, on the SD 1.5 script;
each reduces to the same winner-first pairs. Trained on an image folder of pairs that always prefer the warm image,
every script moves held-out implicit accuracy above chance."""

import logging
import math

import pytest
import tiny_assets
import torch
from testing_utils import run_trainer

from diffusion_dpo import InputError
from diffusion_dpo.cache import CacheRequest, PairPixels, PairsToDecode, plan_cache
from diffusion_dpo.data import (
    DATA_LAYOUTS,
    decode_image,
    load_preference_pairs,
    read_preference_rows,
)


N_PAIRS = 24
# Whole-image warm vs cool colours, 8 pairs held out: with these settings (and --seed 0) the tiny random models of
# every script learn the preference (held-out accuracy 0.875 for SD 1.5, 0.75 for SDXL, 1 for SD3, the held-out
# loss below ln 2; other seeds can stay at chance in 20 steps). Every layout below stores the same pairs winner first
# (test_every_layout_reduces_to_the_same_winner_first_pairs), so one of them is trained on.
LEARNS_THE_PREFERENCE = dict(
    num_validation_pairs=8,
    validation_timesteps=8,
    validation_steps=1000,
    max_train_steps=20,
    train_batch_size=4,
    learning_rate=3e-3,
    lr_scheduler="constant",
    no_hflip=True,
    checkpointing_steps=1000,
)


@pytest.fixture(scope="module")
def datasets_by_layout(tmp_path_factory):
    """The same N_PAIRS warm-preferred pairs in every layout and source the trainers read."""
    folder = tmp_path_factory.mktemp("layouts")
    flat = dict(n_pairs=N_PAIRS, flat=True)
    return {
        "chosen_rejected": tiny_assets.build_chosen_rejected_dataset(str(folder / "chosen-rejected"), **flat),
        "votes": tiny_assets.build_votes_dataset(
            str(folder / "votes"), votes=((3, 1), (5, 4)), extra_votes=((2, 2), (math.nan, 1), (-1, 3)), **flat
        ),
        "image_folder": tiny_assets.build_image_folder_dataset(str(folder / "image-folder"), **flat),
        "webdataset": tiny_assets.build_webdataset_dataset(str(folder / "webdataset"), **flat),
    }


def held_out_evaluations(dpo, cli_args, data, **flags):
    """Held-out metrics before and after training on `data` (before: the model is its reference)."""
    return run_trainer(dpo, cli_args(dataset_name=data, **{**LEARNS_THE_PREFERENCE, **flags}))["evaluations"]


@pytest.mark.every_script
def test_training_on_an_image_folder_moves_held_out_accuracy_toward_the_preferred_image(
    dpo, cli_args, datasets_by_layout
):
    before, *_, after = held_out_evaluations(dpo, cli_args, datasets_by_layout["image_folder"])
    assert before["eval/implicit_acc"] == 0.5 and before["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert after["eval/implicit_acc"] > 0.5 and after["eval/loss"] < math.log(2)


def warm_is_first(image):
    """Whether a decoded pair's first image is the warm one (red channel above blue)."""
    mean = image.float().mean(dim=(-1, -2))
    return bool(mean[0] > mean[2])


def decoded_pairs(args, pairs):
    return [item for item in PairPixels(args, [PairsToDecode(pairs)]) if item["ok"]]


def stored_winners_are_warm(args, pairs):
    items = list(PairPixels(args, [PairsToDecode(pairs)]))
    return [warm_is_first(item["pixels"][0, 0]) and not warm_is_first(item["pixels"][0, 1]) for item in items]


def test_every_layout_reduces_to_the_same_winner_first_pairs(dpo, cli_args, datasets_by_layout):
    read = {}
    for layout, data in datasets_by_layout.items():
        args = dpo.parse_args(cli_args(dataset_name=data))
        pairs = load_preference_pairs(args, "train")
        items = sorted(decoded_pairs(args, pairs), key=lambda item: item["index"])
        assert len(pairs) == len(items) == N_PAIRS, layout
        pixels = torch.stack([item["pixels"][0] for item in items])  # (pairs, winner/loser, 3, H, W)
        assert all(warm_is_first(pair[0]) and not warm_is_first(pair[1]) for pair in pixels), layout
        read[layout] = (pairs.captions, pixels)
    del read["votes"]  # its builder draws other pairs (it adds rows of invalid votes)
    first_captions, first_pixels = read["chosen_rejected"]
    for layout, (captions, pixels) in read.items():  # the same bytes, decoded alike: the same pairs exactly
        assert captions == first_captions, layout
        torch.testing.assert_close(pixels, first_pixels, atol=0, rtol=0, msg=layout)


@pytest.mark.parametrize("metadata", ["jsonl", "csv"])
@pytest.mark.parametrize("columns", ["chosen_rejected", "pickapic"])
def test_an_image_folder_in_either_layout_stores_the_preferred_image_first(dpo, cli_args, tmp_path, metadata, columns):
    data = tiny_assets.build_image_folder_dataset(
        str(tmp_path / "data"), n_pairs=4, columns=columns, metadata=metadata, flat=True
    )
    args = dpo.parse_args(cli_args(dataset_name=data))
    pairs = load_preference_pairs(args, "train")
    assert pairs.layout.name == columns and pairs.layout.image_folder is not None and len(pairs) == 4
    assert all(stored_winners_are_warm(args, pairs))


def test_chosen_rejected_reads_image_features_and_a_caption_column(dpo, cli_args, tmp_path):
    data = tiny_assets.build_chosen_rejected_dataset(str(tmp_path / "data"), n_pairs=4, flat=True, image_feature=True)
    args = dpo.parse_args(cli_args(dataset_name=data))
    pairs = load_preference_pairs(args, "train")
    assert pairs.layout.name == "chosen_rejected" and not pairs.second_is_winner.any()
    assert all(stored_winners_are_warm(args, pairs))
    assert set(pairs.captions) <= set(tiny_assets.CAPTION_POOL)  # read from `prompt`


def test_webdataset_columns_are_named_by_extension_and_json_fields(dpo, cli_args, datasets_by_layout):
    pairs = load_preference_pairs(dpo.parse_args(cli_args(dataset_name=datasets_by_layout["webdataset"])), "train")
    assert pairs.layout.columns == {
        "image_0": ("jpg_0.jpg", None),
        "image_1": ("jpg_1.jpg", None),
        "label": ("json", "label_0"),
        "caption": ("json", "caption"),
    }
    assert len(pairs) == N_PAIRS and pairs.identity["shards"] == 2


def test_ties_and_invalid_votes_are_counted_and_dropped(dpo, cli_args, datasets_by_layout, caplog):
    args = dpo.parse_args(cli_args(dataset_name=datasets_by_layout["votes"]))
    with caplog.at_level(logging.INFO):
        pairs = load_preference_pairs(args, "train")
    assert len(pairs) == N_PAIRS
    assert "dropped 1 tied pairs and 2 pairs with missing, NaN or negative votes" in caplog.text
    # 5 votes to 4 is a tie below a margin of 2: half the pairs
    args = dpo.parse_args(cli_args(dataset_name=datasets_by_layout["votes"], min_vote_margin=2))
    assert len(load_preference_pairs(args, "train")) == N_PAIRS // 2


def test_missing_and_escaping_image_paths_are_counted_skips(dpo, cli_args, tmp_path, caplog):
    bad_paths = ["images/no-such-file.jpg", "/etc/hostname", "../outside.jpg", ""]
    data = tiny_assets.build_image_folder_dataset(str(tmp_path / "data"), n_pairs=4, flat=True, bad_paths=bad_paths)
    (tmp_path / "outside.jpg").write_bytes((tmp_path / "data" / "images" / "0000_a.jpg").read_bytes())
    with caplog.at_level(logging.WARNING):
        result = run_trainer(dpo, cli_args(dataset_name=data, max_train_steps=1))
    assert result["global_step"] == 1
    assert "skipping 4 of 8 pairs with an undecodable image" in caplog.text
    caplog.clear()  # the reasons, logged where the images are decoded (a loader worker during the run)
    args = dpo.parse_args(cli_args(dataset_name=data))
    with caplog.at_level(logging.WARNING):
        items = list(PairPixels(args, [PairsToDecode(load_preference_pairs(args, "train"))]))
    assert sum(not item["ok"] for item in items) == 4 and caplog.text.count("Skipping pair") == 4
    assert "No such file" in caplog.text and caplog.text.count("leaves the dataset folder") == 2
    assert "no image path ('')" in caplog.text


def test_a_dataset_of_no_known_layout_is_refused_in_one_line(dpo, cli_args, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"text": ["a"], "left": [b""], "right": [b""]}), tmp_path / "data" / "train.parquet")
    with pytest.raises(InputError) as error:
        run_trainer(dpo, cli_args(dataset_name=tmp_path / "data"))
    message = str(error.value)
    assert "fits no layout (it has columns ['text', 'left', 'right'])" in message and "\n" not in message
    assert all(f"{name} (" in message for name in DATA_LAYOUTS)
    assert "--data_layout" in message


def test_two_layouts_of_the_same_files_never_share_a_cache(dpo, cli_args, tmp_path):
    data = tiny_assets.build_image_folder_dataset(str(tmp_path / "data"), n_pairs=4, columns="both", flat=True)
    with pytest.raises(InputError, match="columns of the pickapic and chosen_rejected layouts; choose one"):
        load_preference_pairs(dpo.parse_args(cli_args(dataset_name=data)), "train")
    cache_paths = set()
    for layout in ("pickapic", "chosen_rejected"):
        args = dpo.parse_args(cli_args(dataset_name=data, data_layout=layout))
        pairs = load_preference_pairs(args, "train")
        assert pairs.layout.name == layout and all(stored_winners_are_warm(args, pairs))
        cache_paths.add(plan_cache(args, dpo.FAMILY, CacheRequest(pairs), torch.float32).path)
    assert len(cache_paths) == 2
    assert len(list((tmp_path / "cache").glob("pairs-*.parquet"))) == 2  # the labels and captions too


def test_column_flags_choose_and_rename_a_layout(dpo, cli_args, datasets_by_layout):
    data = datasets_by_layout["votes"]
    renamed = dict(dataset_name=data, vote_0_column="votes_image2", vote_1_column="votes_image1")
    pairs = load_preference_pairs(dpo.parse_args(cli_args(**renamed)), "train")
    assert pairs.layout.name == "votes" and len(pairs) == N_PAIRS
    original = load_preference_pairs(dpo.parse_args(cli_args(dataset_name=data)), "train")
    assert (pairs.second_is_winner != original.second_is_winner).all()  # the counts swapped: every winner too
    with pytest.raises(InputError, match="the chosen_rejected layout does not read --vote_0_column"):
        load_preference_pairs(dpo.parse_args(cli_args(data_layout="chosen_rejected", **renamed)), "train")


def test_read_preference_rows_yields_every_row_in_order(dpo, cli_args, tmp_path):
    bad_paths = ["../outside.jpg"]
    data = tiny_assets.build_image_folder_dataset(str(tmp_path / "data"), n_pairs=3, flat=True, bad_paths=bad_paths)
    rows = list(read_preference_rows(dpo.parse_args(cli_args(dataset_name=data))))
    assert [row.row for row in rows] == [0, 1, 2, 3] and all(row.label == 1.0 for row in rows)
    assert all(row.caption in tiny_assets.CAPTION_POOL for row in rows)
    for row in rows[:3]:  # chosen first: warm
        first, second = (decode_image(image).getpixel((16, 16)) for image in (row.image_0, row.image_1))
        assert first[0] > first[2] and second[0] < second[2]
    assert rows[3].image_0 is None and rows[3].image_1 is None  # a path leaving the folder


def test_an_image_folder_is_one_split(dpo, cli_args, tmp_path):
    data = tiny_assets.build_image_folder_dataset(str(tmp_path / "data"), n_pairs=2, flat=True)
    with pytest.raises(InputError, match="is an image folder, so it has no split 'validation'"):
        run_trainer(dpo, cli_args(dataset_name=data, validation_split_name="validation"))
