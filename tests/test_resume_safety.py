"""Resume, checkpoints and saving fail loudly instead of silently: a resume with changed data flags, a damaged
checkpoint, non-finite weights, a full disk; saved weights get the usual file mode."""

import contextlib
import json
import logging
import os
import re
import shutil
import stat
import subprocess

import numpy as np
import pytest
import torch
from testing_utils import assert_same_tensors, cache_folders, lora_weights, run_trainer


def poison_pair(cache, index):
    """Writes inf into one pair's cached latents, as an fp16 VAE overflow would (as in test_faults.py)."""
    latents = np.load(cache / "pair_latents.npy", mmap_mode="r+")
    latents[index] = np.inf
    latents.flush()


def record_of(checkpoint, dpo):
    return json.loads((checkpoint / dpo.CHECKPOINT_RECORD_NAME).read_text())


def leftovers(folder):
    """Partial writes left in an output folder."""
    return sorted(name for name in os.listdir(folder) if "partial" in name)


# ---------------------------------------------------------------------------------------------------------------
# 1. A resume with changed flags is refused; an old checkpoint only warns; nothing left to train
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.both_trainers
def test_resume_with_a_changed_data_flag_is_refused_naming_both_values(dpo, cli_args, sharded_pickapic, tmp_path):
    run_trainer(dpo, cli_args(max_train_steps=1, checkpointing_steps=1))
    checkpoint = tmp_path / "out" / "checkpoint-1"
    assert record_of(checkpoint, dpo)["data_order"]["--train_batch_size"] == 2
    changes = [
        ({"train_batch_size": 3}, "--train_batch_size 2, this run has 3"),
        ({"gradient_accumulation_steps": 2}, "--gradient_accumulation_steps 1, this run has 2"),
        ({"seed": 1}, "--seed 0, this run has 1"),
        ({"no_hflip": True}, "--no_hflip False, this run has True"),
        ({"proportion_empty_prompts": 0.5}, "--proportion_empty_prompts 0.0, this run has 0.5"),
        ({"max_train_samples": 6}, "--max_train_samples None, this run has 6"),
        ({"dataset_name": sharded_pickapic}, f"this run has {sharded_pickapic}"),
    ]
    caches = cache_folders(tmp_path / "cache")
    for flags, message in changes:
        with pytest.raises(dpo.InputError, match=re.escape(message)) as refused:
            run_trainer(dpo, cli_args(max_train_steps=3, resume_from_checkpoint="latest", **flags))
        assert "\n" not in str(refused.value)
    assert cache_folders(tmp_path / "cache") == caches  # refused before precomputing the changed data

    # A checkpoint written by 2 processes (as its record says) is refused by a run of 1.
    record = record_of(checkpoint, dpo)
    record["data_order"]["number of processes"] = 2
    (checkpoint / dpo.CHECKPOINT_RECORD_NAME).write_text(json.dumps(record))
    with pytest.raises(dpo.InputError, match="number of processes 2, this run has 1"):
        run_trainer(dpo, cli_args(max_train_steps=3, resume_from_checkpoint="latest"))

    # The same flags over other pairs (a dataset changed in place) are refused once the pairs are known.
    record["data_order"].update({"number of processes": 1, "training pairs": "8 usable, fingerprint 0"})
    (checkpoint / dpo.CHECKPOINT_RECORD_NAME).write_text(json.dumps(record))
    with pytest.raises(dpo.InputError, match="written with training pairs 8 usable, fingerprint 0, this run has"):
        run_trainer(dpo, cli_args(max_train_steps=3, resume_from_checkpoint="latest"))


@pytest.mark.both_trainers
def test_a_checkpoint_without_a_record_warns_and_resumes(dpo, cli_args, tmp_path, caplog):
    run_trainer(dpo, cli_args(max_train_steps=1, checkpointing_steps=1))
    (tmp_path / "out" / "checkpoint-1" / dpo.CHECKPOINT_RECORD_NAME).unlink()  # as an older version wrote it
    with caplog.at_level(logging.WARNING):
        result = run_trainer(dpo, cli_args(max_train_steps=2, resume_from_checkpoint="latest"))
    assert "the data position cannot be checked" in caplog.text
    assert [h["step"] for h in result["history"]] == [2]


@pytest.mark.both_trainers
def test_max_train_steps_at_the_checkpoint_saves_its_weights_and_below_it_is_refused(dpo, cli_args, tmp_path, caplog):
    run_trainer(dpo, cli_args(max_train_steps=2, checkpointing_steps=2))
    out = tmp_path / "out"
    (out / dpo.LORA_WEIGHT_NAME).unlink()  # as if the final save had failed
    with caplog.at_level(logging.WARNING):
        result = run_trainer(dpo, cli_args(max_train_steps=2, resume_from_checkpoint="latest"))
    assert "Nothing to train" in caplog.text
    assert result["history"] == [] and result["global_step"] == 2
    assert_same_tensors(lora_weights(out), lora_weights(out / "checkpoint-2"), atol=0)

    with pytest.raises(dpo.InputError, match="already past --max_train_steps 1: nothing to train"):
        run_trainer(dpo, cli_args(max_train_steps=1, resume_from_checkpoint="latest"))


# ---------------------------------------------------------------------------------------------------------------
# 2. A damaged checkpoint: `latest` falls back to the newest intact one, a named one is refused
# ---------------------------------------------------------------------------------------------------------------


def truncate(path):
    with open(path, "r+b") as file:
        file.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize(
    "damage,with_record,message",
    [
        ("truncate optimizer", True, r"optimizer.bin has \d+ bytes, \d+ were written"),
        ("delete lora", True, "pytorch_lora_weights.safetensors is missing"),
        ("truncate optimizer", False, "optimizer.bin is unreadable"),
        ("truncate lora", False, "pytorch_lora_weights.safetensors is unreadable"),
    ],
)
@pytest.mark.both_trainers
def test_a_damaged_newest_checkpoint_is_passed_over_by_latest_and_refused_by_name(
    dpo, cli_args, tmp_path, caplog, damage, with_record, message
):
    run_trainer(dpo, cli_args(max_train_steps=2, checkpointing_steps=1))
    out = tmp_path / "out"
    (out / dpo.LORA_WEIGHT_NAME).unlink()  # the run died before its final save
    newest = out / "checkpoint-2"
    if not with_record:
        for checkpoint in (out / "checkpoint-1", newest):
            (checkpoint / dpo.CHECKPOINT_RECORD_NAME).unlink()
    if damage == "truncate optimizer":
        truncate(newest / "optimizer.bin")
    elif damage == "truncate lora":
        truncate(newest / dpo.LORA_WEIGHT_NAME)
    else:
        (newest / dpo.LORA_WEIGHT_NAME).unlink()

    with pytest.raises(dpo.InputError, match=f"cannot resume from damaged checkpoint .*checkpoint-2: {message}"):
        run_trainer(dpo, cli_args(max_train_steps=3, resume_from_checkpoint="checkpoint-2"))

    with caplog.at_level(logging.WARNING):
        result = run_trainer(dpo, cli_args(max_train_steps=3, resume_from_checkpoint="latest"))
    assert re.search(f"checkpoint-2: {message}.*resuming from .*checkpoint-1", caplog.text)
    assert [h["step"] for h in result["history"]] == [2, 3]


# ---------------------------------------------------------------------------------------------------------------
# 3. Non-finite weights are never saved; a run without a single optimizer step does not succeed
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.both_trainers
def test_a_run_whose_every_step_was_non_finite_saves_nothing_as_trained(dpo, cli_args, tmp_path):
    run_trainer(dpo, cli_args(output_dir=tmp_path / "clean", max_train_steps=1))  # builds the cache
    (cache,) = cache_folders(tmp_path / "cache")
    for index in range(len(np.load(cache / "encoded.npy"))):
        poison_pair(cache, index)
    with pytest.raises(dpo.TrainingStopped, match="no optimizer step of this run had a finite loss") as stopped:
        run_trainer(dpo, cli_args(max_train_steps=2))
    assert "\n" not in str(stopped.value)
    assert not (tmp_path / "out" / dpo.LORA_WEIGHT_NAME).exists()


def poison_weights_at_step(monkeypatch, dpo, step):
    """Makes the trained weights NaN after the optimizer step `step` (one micro-batch a step)."""
    original, calls = dpo.backward_and_step, []

    def backward_and_step(accelerator, loss, params, *rest):
        finite = original(accelerator, loss, params, *rest)
        calls.append(None)
        if len(calls) == step:
            with torch.no_grad():
                params[0].fill_(float("nan"))
        return finite

    monkeypatch.setattr(dpo, "backward_and_step", backward_and_step)


@pytest.mark.both_trainers
def test_non_finite_weights_are_never_checkpointed(dpo, cli_args, tmp_path, monkeypatch):
    poison_weights_at_step(monkeypatch, dpo, step=2)
    with pytest.raises(dpo.TrainingStopped, match=r"not finite, so .*checkpoint-2 was not written.*checkpoint-1"):
        run_trainer(dpo, cli_args(max_train_steps=3, checkpointing_steps=1))
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-1"]
    assert not (out / dpo.LORA_WEIGHT_NAME).exists()


@pytest.mark.both_trainers
def test_non_finite_weights_are_never_saved_as_the_result(dpo, cli_args, tmp_path, monkeypatch):
    poison_weights_at_step(monkeypatch, dpo, step=2)
    with pytest.raises(dpo.TrainingStopped, match="trained weights of step 2 are not finite, so nothing was saved"):
        run_trainer(dpo, cli_args(max_train_steps=2))
    assert not (tmp_path / "out" / dpo.LORA_WEIGHT_NAME).exists()


# ---------------------------------------------------------------------------------------------------------------
# 4. A full disk: checked before writing, partial writes removed, the last checkpoint named
# ---------------------------------------------------------------------------------------------------------------

PAGE = 4096


def bytes_on_tmpfs(folder):
    return sum(-(-size // PAGE) * PAGE for size in (p.stat().st_size for p in folder.rglob("*") if p.is_file()))


@contextlib.contextmanager
def small_disk(folder, size):
    """A tmpfs of `size` bytes mounted on `folder` (needs root; skips the test otherwise)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.mark.both_trainers
def test_a_checkpoint_that_does_not_fit_stops_in_one_line_and_leaves_no_partial(dpo, cli_args, tmp_path, monkeypatch):
    run_trainer(dpo, cli_args(output_dir=tmp_path / "sizes", max_train_steps=1, checkpointing_steps=1))
    checkpoint_size = bytes_on_tmpfs(tmp_path / "sizes" / "checkpoint-1")
    with small_disk(tmp_path / "disk", checkpoint_size // 2) as disk:
        out = disk / "out"
        with pytest.raises(dpo.TrainingStopped, match=r"not enough space to write .*checkpoint-1: about [\d.]+ MiB"):
            run_trainer(dpo, cli_args(output_dir=out, max_train_steps=1, checkpointing_steps=1))
        assert leftovers(out) == [] and not (out / "checkpoint-1").exists()

        # When the estimate is wrong, the write itself fails: the partial folder is removed, and it is one line.
        monkeypatch.setattr(dpo, "checkpoint_bytes_needed", lambda args, params: 0)
        with pytest.raises(dpo.TrainingStopped, match=r"writing .*checkpoint-1 failed .*no checkpoint") as stopped:
            run_trainer(dpo, cli_args(output_dir=out, max_train_steps=1, checkpointing_steps=1))
        assert "\n" not in str(stopped.value)
        assert leftovers(out) == [] and not (out / "checkpoint-1").exists()


@pytest.mark.both_trainers
def test_a_final_save_that_does_not_fit_names_the_checkpoint_holding_the_weights(dpo, cli_args, tmp_path, monkeypatch):
    run_trainer(dpo, cli_args(output_dir=tmp_path / "first", max_train_steps=2, checkpointing_steps=2))
    checkpoint = tmp_path / "first" / "checkpoint-2"
    with small_disk(tmp_path / "disk", bytes_on_tmpfs(checkpoint) + 4 * PAGE) as disk:
        out = disk / "out"
        out.mkdir()
        shutil.copytree(checkpoint, out / "checkpoint-2")  # the run got this far; its final save did not fit
        resume = cli_args(output_dir=out, max_train_steps=2, resume_from_checkpoint="latest")
        expected = r"checkpoint-2, still holds the weights of step 2"
        with pytest.raises(dpo.TrainingStopped, match=f"not enough space to save the result of step 2.*{expected}"):
            run_trainer(dpo, resume)
        assert not (out / dpo.LORA_WEIGHT_NAME).exists() and leftovers(out) == []

        # The estimate passed but the write failed: nothing half-written looks finished.
        original = dpo.write_into_output_dir
        monkeypatch.setattr(dpo, "write_into_output_dir", lambda args, write, _, step: original(args, write, 0, step))
        with pytest.raises(dpo.TrainingStopped, match=f"saving the result of step 2 to .* failed .*{expected}"):
            run_trainer(dpo, resume)
        assert not (out / dpo.LORA_WEIGHT_NAME).exists() and leftovers(out) == []
        monkeypatch.undo()

        # Space freed: the same command saves the checkpoint's weights.
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        run_trainer(dpo, resume)
        assert_same_tensors(lora_weights(out), lora_weights(out / "checkpoint-2"), atol=0)


# ---------------------------------------------------------------------------------------------------------------
# 5. Saved weights get the usual mode
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("train_mode", ["lora", "full"])
@pytest.mark.both_trainers
def test_saved_weights_get_the_mode_of_the_umask(dpo, cli_args, tmp_path, train_mode):
    previous = os.umask(0o022)
    try:
        run_trainer(dpo, cli_args(max_train_steps=1, checkpointing_steps=1, train_mode=train_mode))
    finally:
        os.umask(previous)
    weights = list((tmp_path / "out").rglob("*.safetensors"))
    assert len(weights) >= 2  # the result and checkpoint-1
    assert {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in weights} == {
        str(p.relative_to(tmp_path)): "0o644" for p in weights
    }
