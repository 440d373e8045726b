"""Faults a long run meets: a process killed at any moment and two processes training one model (every script);
non-finite numbers and a wrong launch (diffusion_dpo's machinery, once on SD 1.5)."""

import math
import random
import re
import signal
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from testing_utils import (
    accelerate_launch,
    assert_same_tensors,
    cache_folders,
    finished,
    launch,
    lora_weights,
    run_cli,
    run_trainer,
)

from diffusion_dpo import TrainingStopped
from diffusion_dpo.cache import CachedPreferencePairs, PairSampler
from diffusion_dpo.checkpoints import checkpoint_damage, complete_checkpoints
from diffusion_dpo.outputs import LORA_WEIGHT_NAME


def poison_pair(cache, index):
    """Writes inf into one pair's cached latents, as an fp16 VAE overflow would: with their checksums, as the
    precompute writes them."""
    latents = np.load(cache / "pair_latents.npy", mmap_mode="r+")
    crops, checksums = np.load(cache / "crops.npy"), np.load(cache / "checksums.npy", mmap_mode="r+")
    latents[index] = np.inf
    for orientation in range(latents.shape[1]):
        latent = np.ascontiguousarray(latents[index, orientation])
        checksums[index, orientation] = zlib.crc32(crops[index, orientation].tobytes(), zlib.crc32(latent.tobytes()))
    latents.flush()
    checksums.flush()


def test_a_non_finite_step_is_skipped_and_leaves_the_weights_untouched(dpo, cli_args, tmp_path):
    run_trainer(dpo, cli_args(output_dir=tmp_path / "clean", max_train_steps=1))  # builds the cache
    (cache,) = cache_folders(tmp_path / "cache")
    pairs = CachedPreferencePairs(cache)
    order = list(PairSampler(pairs, seed=0, proportion_empty_prompts=0.0))
    poison_pair(cache, order[2][0])  # a pair of the second batch (batches of 2)

    run_trainer(dpo, cli_args(output_dir=tmp_path / "one", max_train_steps=1, learning_rate=1e-3))
    two = run_trainer(dpo, cli_args(output_dir=tmp_path / "two", max_train_steps=2, learning_rate=1e-3))
    assert not math.isfinite(two["history"][1]["loss"])
    assert [h["skipped_steps"] for h in two["history"]] == [0, 1]
    assert_same_tensors(
        lora_weights(tmp_path / "one"), lora_weights(tmp_path / "two"), atol=0
    )  # step 2 changed nothing

    three = run_trainer(dpo, cli_args(output_dir=tmp_path / "three", max_train_steps=3, learning_rate=1e-3))
    assert math.isfinite(three["history"][2]["loss"]) and three["history"][2]["skipped_steps"] == 1
    weights = lora_weights(tmp_path / "three")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert any(not torch.equal(weights[k], lora_weights(tmp_path / "two")[k]) for k in weights)  # training went on


def test_only_non_finite_steps_stop_the_run_with_a_clear_message(dpo, cli_args, tmp_path):
    run_trainer(dpo, cli_args(output_dir=tmp_path / "clean", max_train_steps=1))
    (cache,) = cache_folders(tmp_path / "cache")
    for index in range(len(np.load(cache / "encoded.npy"))):
        poison_pair(cache, index)
    with pytest.raises(TrainingStopped, match="3 steps in a row had a non-finite loss or gradient"):
        run_trainer(dpo, cli_args(output_dir=tmp_path / "run", max_train_steps=5, max_consecutive_skipped_steps=3))


def kill_when(process, condition, timeout=300):
    """SIGKILLs the process as soon as condition() holds (checked every millisecond); False if it ended first."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if condition():
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.001)
    process.wait()
    return False


def test_sigkill_at_any_moment_then_resume_gives_the_uninterrupted_weights(dpo, cli_args, tmp_path):
    """Shared crash recovery (cache commits, atomic checkpoints, resume), once: every script's exact resume and SIGTERM
    are tested in test_checkpoints.py and test_run_safety.py."""
    # precompute: one pair per VAE batch, progress committed after every batch
    common = dict(
        max_train_steps=7,
        checkpointing_steps=1,
        checkpoints_total_limit=2,
        learning_rate=1e-3,
        lr_scheduler="cosine",
        proportion_empty_prompts=0.3,
        vae_encode_batch_size=2,
        precompute_commit_seconds=0,
    )
    # the uninterrupted run, as a process like the others (the same thread count gives the same sums), alongside
    straight_log = tmp_path / "straight.log"
    straight_cache = tmp_path / "straight-cache"
    straight = launch(
        dpo, cli_args(output_dir=tmp_path / "straight", precompute_cache_dir=straight_cache, **common), straight_log
    )

    rng = random.Random(0)
    write_from, done_at = rng.randint(2, 5), rng.randint(1, 5)

    def latents_encoded(cache):  # committed (pair, orientation) latents of the training cache (the larger one)
        complete = [p for p in Path(cache).glob("*/encoded.npy") if not p.parent.name.startswith(".")]  # not partial
        return max([int(np.load(p).sum()) for p in complete], default=0)

    def to_encode(log):  # what the killed run set out to encode: "... 0 pair latents present, N to encode"
        return int(re.search(r": 0 pair latents present, (\d+) to encode", Path(log).read_text()).group(1))

    def writing_checkpoint(out, cache):  # a checkpoint write of step write_from or later is under way
        return any(int(p.name.split("-")[1].split(".")[0]) >= write_from for p in out.glob(".checkpoint-*.partial"))

    # where each trial's first process dies: while precomputing into an empty cache (after some latents were
    # committed), while writing a checkpoint, between steps
    trials = [
        (
            "precompute",
            lambda out, cache: latents_encoded(cache) > 0,
            lambda out, cache: latents_encoded(cache) < to_encode(out.with_suffix(".log")),
        ),
        ("checkpoint write", writing_checkpoint, lambda out, cache: any(out.glob(".checkpoint-*.partial"))),
        ("between steps", lambda out, cache: (out / f"checkpoint-{done_at}").exists(), lambda out, cache: True),
    ]
    for trial, (moment, reached, died_there) in enumerate(trials):
        for attempt in range(3):  # the moment lasts milliseconds: polling may miss it, so try again
            out = tmp_path / f"killed-{trial}-{attempt}"
            cache = tmp_path / (f"fresh-cache-{attempt}" if moment == "precompute" else "cache")
            argv = cli_args(output_dir=out, precompute_cache_dir=cache, **common)
            process = launch(dpo, argv, out.with_suffix(".log"))
            if kill_when(process, lambda: reached(out, cache)) and died_there(out, cache):
                break
        else:
            pytest.fail(f"no run was killed at the intended moment ({moment})")
        committed = latents_encoded(cache)
        # a checkpoint's name is only ever on a complete checkpoint; rotation keeps the newest two, three if the kill
        # fell between the newest one's rename and the oldest one's removal (the next checkpoint removes it)
        complete = complete_checkpoints(str(out))
        assert len(complete) <= 3
        for checkpoint in complete:
            assert checkpoint_damage(checkpoint, dpo.parse_args(argv)) is None, moment  # every file it lists, whole
        log = tmp_path / f"resumed-{trial}.log"
        finished(launch(dpo, argv + ["--resume_from_checkpoint", "latest"], log), log)
        if moment == "precompute":  # the resumed precompute kept what the killed one had committed
            left = re.search(rf": {committed} pair latents present, (\d+) to encode", log.read_text())
            assert left and int(left.group(1)) <= to_encode(out.with_suffix(".log")) - committed
        if trial == 0:
            finished(straight, straight_log)
        assert_same_tensors(lora_weights(out), lora_weights(tmp_path / "straight"))
        assert [p.name for p in out.glob("checkpoint-*")] and len(complete_checkpoints(str(out))) == 2


@pytest.mark.every_script
def test_two_cpu_processes_train_one_model_and_write_it_once(dpo, cli_args, sharded_pickapic, tmp_path):
    argv = cli_args(
        dataset_name=sharded_pickapic,
        max_train_steps=3,
        checkpointing_steps=1,
        num_validation_pairs=2,
        report_to="tensorboard",
    )
    result = run_cli(
        dpo, argv, launcher=accelerate_launch(2, "--main_process_port", "29531"), env={"ACCELERATE_USE_CPU": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stderr
    assert "Num processes: 2" in log
    assert "Trained weights identical on all 2 processes." in log
    assert log.count("Creating the latent and text-embedding cache") == 2  # training and held-out sets, once each
    # the two processes shared the encoding: each streamed its own shards (3 files: 2 and 1) into the same caches
    shares = sorted(re.findall(r"Process (\d) encoded (\d+) images of (\d) source shards", log))
    assert [(rank, shards) for rank, _, shards in shares] == [("0", "2"), ("1", "1")]
    assert all(int(images) > 0 for _, images, _ in shares)
    for cache in cache_folders(tmp_path / "cache"):
        assert not list(cache.glob("*.part-*"))  # each process's masks were folded into the cache's
        assert np.load(cache / "encoded.npy").any(axis=1).sum() == len(np.load(cache / "encoded.npy"))
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    # tensorboard event files are named events.out.tfevents.<time>.<host>.<pid>.<n>: one process wrote them all
    assert len({p.name.split(".")[-2] for p in out.rglob("events.out.tfevents.*")}) == 1
    assert lora_weights(out)


def test_two_cpu_processes_without_accelerate_use_cpu_are_refused(dpo, cli_args, tmp_path):
    result = run_cli(
        dpo,
        cli_args(max_train_steps=1),
        launcher=accelerate_launch(2, "--main_process_port", "29533"),
        env={"CUDA_VISIBLE_DEVICES": ""},
    )
    assert result.returncode != 0
    assert "error: launched as 2 processes, but each runs alone" in result.stderr
    assert "ACCELERATE_USE_CPU=1" in result.stderr
    assert not (tmp_path / "out" / LORA_WEIGHT_NAME).exists()
