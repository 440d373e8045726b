"""Preference pairs (ties, orientation, broken images) and the precomputed latent / text-embedding cache. The data
and cache machinery is shared (diffusion_dpo.data, diffusion_dpo.cache): it is tested once, on the SD 1.5 script;
what each family puts in the cache's unconditional row is tested on every script."""

import json
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
import transformers
from accelerate.state import PartialState
from demo_scoring import classify_warm
from diffusers import Flux2KleinPipeline, FluxPipeline, StableDiffusion3Pipeline, StableDiffusionXLPipeline
from PIL import Image
from testing_utils import (
    N_PAIRS,
    SD3_SEQUENCE_LENGTH,
    assert_same_tensors,
    cache_folders,
    dataset_rows,
    lora_weights,
    pipeline_class,
    run_trainer,
)

from diffusion_dpo.cache import CachedPreferencePairs, PairPixels, PairSampler, PairsToDecode
from diffusion_dpo.data import load_preference_pairs, training_and_validation_pairs


def test_ties_are_dropped_and_label_0_swaps_the_pair(dpo, cli_args, pickapic_data):
    pairs = load_preference_pairs(dpo.parse_args(cli_args()), "train")
    assert len(pairs) == N_PAIRS + 1  # ties gone; the pair with a corrupt image is only found when decoding
    rows = dataset_rows(pickapic_data)
    assert [rows[r]["label_0"] == 0.0 for r in pairs.rows] == pairs.second_is_winner.tolist()
    assert [rows[r]["caption"] for r in pairs.rows] == pairs.captions
    assert 0 < pairs.second_is_winner.sum() < len(pairs)  # both orientations occur


def test_each_pair_streams_once_winner_first_with_its_mirror_image(dpo, cli_args):
    args = dpo.parse_args(cli_args())
    pairs = load_preference_pairs(args, "train")
    items = list(PairPixels(args, [PairsToDecode(pairs)]))
    assert sorted(item["index"] for item in items) == list(range(len(pairs)))  # each pair streamed once
    decodable = [item for item in items if item["ok"]]
    assert len(decodable) == N_PAIRS
    for item in decodable:  # the dataset's preferred image is always the warm one: it must come first
        winner, loser = ((item["pixels"][0] + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        assert classify_warm(Image.fromarray(winner))
        assert not classify_warm(Image.fromarray(loser))
        # the second orientation is the mirror image of the first
        np.testing.assert_array_equal(item["pixels"][1].numpy(), item["pixels"][0].flip(-1).numpy())


def shards_of(pairs):
    return set(np.searchsorted(pairs.shard_starts, pairs.rows, side="right") - 1)


@pytest.mark.parametrize("layout", ["sharded_pickapic", "row_grouped_pickapic"])  # 3 files; 1 file of 3 row groups
def test_a_subset_comes_from_as_few_shards_as_hold_it_and_only_those_are_streamed(dpo, cli_args, layout, request):
    data = request.getfixturevalue(layout)
    args = dpo.parse_args(cli_args(dataset_name=data))
    pairs = load_preference_pairs(args, "train")
    assert pairs.shard_starts.tolist() == [0, 4, 8, 12]
    picked = [pairs.subset(pairs.sample(4, seed)) for seed in range(6)]
    assert all(len(subset) == 4 and len(shards_of(subset)) == 1 for subset in picked)
    assert len({shards_of(subset).pop() for subset in picked}) > 1  # the seed chooses the shard
    assert len(shards_of(pairs.subset(pairs.sample(5, 0)))) == 2
    assert list(pairs.sample(4, 0)) == list(pairs.sample(4, 0))  # a function of the seed

    streamed = PairPixels(args, [PairsToDecode(picked[0])])
    assert [shard for _, shard in streamed.tasks] == list(shards_of(picked[0]))  # the other files are not read
    assert sorted(item["index"] for item in streamed) == [0, 1, 2, 3]


@pytest.mark.parametrize("layout", ["sharded_pickapic", "row_grouped_pickapic"])
def test_max_train_samples_takes_its_pairs_from_one_shard(dpo, cli_args, layout, request):
    args = dpo.parse_args(cli_args(dataset_name=request.getfixturevalue(layout), max_train_samples=3))
    train, validation = training_and_validation_pairs(args, PartialState())
    assert len(train) == 3 and validation is None and len(shards_of(train)) == 1


def test_training_streams_the_data_and_writes_no_copy_of_it(dpo, cli_args, sharded_pickapic, tmp_path):
    datasets_cache = tmp_path / "hf-datasets"
    run_trainer(
        dpo,
        cli_args(
            dataset_name=sharded_pickapic,
            cache_dir=datasets_cache,
            max_train_samples=8,
            max_train_steps=2,
            dataloader_num_workers=2,
        ),
    )  # 2 files, one per decoding worker
    copies = [p for p in Path(datasets_cache).rglob("*") if p.is_file() and p.suffix in (".arrow", ".parquet")]
    assert copies == []  # the datasets library did not download or convert the split
    (cache,) = cache_folders(tmp_path / "cache")
    assert np.load(cache / "encoded.npy").shape[0] == 8 and np.load(cache / "encoded.npy").any(axis=1).all()
    (labels_and_captions,) = Path(tmp_path / "cache").glob("pairs-*.parquet")  # read once, reused by later runs
    before = labels_and_captions.stat().st_mtime_ns
    run_trainer(dpo, cli_args(dataset_name=sharded_pickapic, output_dir=tmp_path / "again", max_train_samples=8))
    assert labels_and_captions.stat().st_mtime_ns == before and len(cache_folders(tmp_path / "cache")) == 1


def test_cache_holds_one_embedding_per_unique_caption_and_skips_broken_pairs(dpo, cli_args, tmp_path):
    run_trainer(dpo, cli_args(max_train_steps=1))
    (cache,) = cache_folders(tmp_path / "cache")
    info = json.loads((cache / "cache_info.json").read_text())
    assert info["pairs"] == N_PAIRS + 1 and np.load(cache / "undecodable.npy").sum() == 1
    assert info["caption_arrays"] == ["prompt_embeds"]  # SD 1.5's text encoder gives one array
    captions = load_preference_pairs(dpo.parse_args(cli_args(output_dir=tmp_path / "new")), "train").captions
    prompt_embeds = np.load(cache / "prompt_embeds.npy")
    assert prompt_embeds.shape[0] == len(set(captions)) + 1 == info["unique_captions"] + 1  # + the empty caption
    latents = np.load(cache / "pair_latents.npy", mmap_mode="r")
    assert latents.shape[1:3] == (2, 2)  # two orientations (hflip on by default), winner and loser
    assert latents.dtype == np.float16
    crops = np.load(cache / "crops.npy")  # each image's original size and where it was cropped
    assert crops.shape == (N_PAIRS + 1, 2, 2, 6) and crops.dtype == np.int32
    # a one-epoch run reads each pair in one orientation, so only that one was encoded: each image once
    encoded = np.load(cache / "encoded.npy")
    assert sorted(encoded.sum(axis=1)) == [0] + [1] * N_PAIRS and 0 < encoded[:, 1].sum() < N_PAIRS
    assert (crops[encoded][..., 4:] == 32).all() and not crops[~encoded].any()  # written with their latents


CACHE_STATE = ("encoded", "undecodable", "pair_latents", "crops")
FOUR_EPOCHS = dict(train_batch_size=8, max_train_steps=4)  # the 8 decodable pairs: one step an epoch


def cache_state(cache):
    """What precompute writes per pair: the masks, the latents and each image's size and crop."""
    return {name: np.load(cache / f"{name}.npy") for name in CACHE_STATE}


def must_not_load(*args, **kwargs):
    raise AssertionError("an encoder was loaded although the cache holds everything this run reads")


def test_an_identical_run_loads_no_encoder_rewrites_nothing_and_trains_the_same(dpo, cli_args, tmp_path, monkeypatch):
    run_trainer(dpo, cli_args(output_dir=tmp_path / "a"))
    (cache,) = cache_folders(tmp_path / "cache")
    first = cache_state(cache)
    for encoder in (transformers.CLIPTextModel, diffusers.AutoencoderKL):
        monkeypatch.setattr(encoder, "from_pretrained", must_not_load)
    run_trainer(dpo, cli_args(output_dir=tmp_path / "b"))
    assert_same_tensors(lora_weights(tmp_path / "a"), lora_weights(tmp_path / "b"))
    assert all(np.array_equal(first[k], v) for k, v in cache_state(cache).items())


def test_a_longer_run_encodes_only_the_orientations_still_missing(dpo, cli_args, tmp_path):
    run_trainer(dpo, cli_args(output_dir=tmp_path / "a"))  # one epoch: one orientation of each pair
    (cache,) = cache_folders(tmp_path / "cache")
    first = cache_state(cache)
    run_trainer(dpo, cli_args(output_dir=tmp_path / "b", **FOUR_EPOCHS))  # both orientations of most pairs
    more = cache_state(cache)
    assert more["encoded"].sum() > first["encoded"].sum() and (more["encoded"] | ~first["encoded"]).all()
    for name in ("pair_latents", "crops"):  # what was encoded before is kept as it was
        np.testing.assert_array_equal(more[name][first["encoded"]], first[name][first["encoded"]], err_msg=name)


def test_lost_precompute_progress_is_redone_with_the_same_latents(dpo, cli_args, tmp_path):
    run_trainer(dpo, cli_args(output_dir=tmp_path / "a", **FOUR_EPOCHS))
    (cache,) = cache_folders(tmp_path / "cache")
    complete = cache_state(cache)
    lost = complete["encoded"].copy()
    lost[::2] = False  # as an interrupted precompute leaves it: these latents were never committed
    np.save(cache / "encoded.npy", lost)
    run_trainer(dpo, cli_args(output_dir=tmp_path / "b", **FOUR_EPOCHS))
    again = cache_state(cache)
    np.testing.assert_array_equal(again["encoded"], complete["encoded"])
    for name in ("pair_latents", "crops"):
        np.testing.assert_allclose(
            again[name][complete["encoded"]].astype(np.float32),
            complete[name][complete["encoded"]].astype(np.float32),
            atol=1e-3,
            err_msg=name,
        )


def test_the_part_files_of_a_killed_multi_process_precompute_count(dpo, cli_args, tmp_path, monkeypatch):
    run_trainer(dpo, cli_args(output_dir=tmp_path / "a", **FOUR_EPOCHS))
    (cache,) = cache_folders(tmp_path / "cache")
    complete = cache_state(cache)["encoded"]
    # the main process had folded in only its own mask; another process saved the rest as a part file
    folded = complete.copy()
    folded[1::2] = False
    np.save(cache / "encoded.npy", folded)
    np.save(cache / "encoded.part-1.npy", complete)
    monkeypatch.setattr(diffusers.AutoencoderKL, "from_pretrained", must_not_load)
    run_trainer(dpo, cli_args(output_dir=tmp_path / "b", **FOUR_EPOCHS))
    assert not list(cache.glob("*.part-*"))
    np.testing.assert_array_equal(np.load(cache / "encoded.npy"), complete)


def test_changed_resolution_or_flipping_gets_its_own_cache(dpo, cli_args, tmp_path):
    run_trainer(dpo, cli_args(output_dir=tmp_path / "a"))
    run_trainer(dpo, cli_args(output_dir=tmp_path / "b", resolution=16))
    run_trainer(dpo, cli_args(output_dir=tmp_path / "c", no_hflip=True))
    shapes = {np.load(c / "pair_latents.npy", mmap_mode="r").shape[1:] for c in cache_folders(tmp_path / "cache")}
    assert shapes == {(2, 2, 4, 16, 16), (2, 2, 4, 8, 8), (1, 2, 4, 16, 16)}


def test_sampler_is_a_function_of_seed_and_epoch(dpo, cli_args, tmp_path):
    run_trainer(dpo, cli_args(max_train_steps=1))
    (cache,) = cache_folders(tmp_path / "cache")
    pairs = CachedPreferencePairs(cache)
    epoch_0 = list(PairSampler(pairs, seed=0, proportion_empty_prompts=0.5))
    again = PairSampler(pairs, seed=0, proportion_empty_prompts=0.5)
    assert list(again) == epoch_0
    again.set_epoch(1)
    assert list(again) != epoch_0
    assert sorted(index for index, _, _ in epoch_0) == list(pairs.valid_indices)
    assert {drop for _, _, drop in epoch_0} == {True, False}


def unconditional_input(pipeline):
    """{caption array: the pipeline's own unconditional input for classifier-free guidance}: SD 1.5, SD3, Flux (its
    true CFG's negative prompt) and FLUX.2 [klein] encode the empty caption; SDXL's base model forces zeros."""
    if isinstance(pipeline, Flux2KleinPipeline):
        negative, _ = pipeline.encode_prompt("", max_sequence_length=SD3_SEQUENCE_LENGTH)
        return {"prompt_embeds": negative[0]}
    if isinstance(pipeline, FluxPipeline):
        negative, negative_pooled, _ = pipeline.encode_prompt("", max_sequence_length=SD3_SEQUENCE_LENGTH)
    elif isinstance(pipeline, StableDiffusion3Pipeline):
        _, negative, _, negative_pooled = pipeline.encode_prompt(
            "a caption", None, None, do_classifier_free_guidance=True, max_sequence_length=SD3_SEQUENCE_LENGTH
        )
    elif isinstance(pipeline, StableDiffusionXLPipeline):
        _, negative, _, negative_pooled = pipeline.encode_prompt("a caption", do_classifier_free_guidance=True)
    else:
        _, negative = pipeline.encode_prompt("a caption", "cpu", 1, do_classifier_free_guidance=True)
        return {"prompt_embeds": negative[0]}
    return {"prompt_embeds": negative[0], "pooled_prompt_embeds": negative_pooled[0]}


@pytest.mark.every_script
def test_a_dropped_caption_reads_the_pipelines_unconditional_input(dpo, cli_args, tiny_pipeline, tmp_path):
    run_trainer(dpo, cli_args(max_train_steps=1, proportion_empty_prompts=0.5))
    (cache,) = cache_folders(tmp_path / "cache")
    pairs = CachedPreferencePairs(cache)
    index, orientation, _ = next(iter(PairSampler(pairs, seed=0, proportion_empty_prompts=0.0)))
    dropped, kept = pairs[(index, orientation, True)], pairs[(index, orientation, False)]
    expected = unconditional_input(pipeline_class(dpo).from_pretrained(tiny_pipeline))
    assert set(pairs.caption_arrays) == set(expected)
    for name, unconditional in expected.items():  # the input classifier-free guidance pairs with the caption's
        torch.testing.assert_close(dropped[name].float(), unconditional, atol=2e-3, rtol=1e-3, msg=name)
        assert not torch.equal(kept[name], dropped[name])
