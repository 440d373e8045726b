"""Resume, checkpoints and saving fail loudly instead of silently: a resume with changed data flags, a damaged
checkpoint, non-finite weights, a full disk; saved weights get the usual file mode. The machinery is
diffusion_dpo's (checkpoints, training), tested once on SD 1.5; SD3's own resume flags on the SD3 script."""

import contextlib
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import zlib

import numpy as np
import pytest
import torch
from testing_utils import assert_same_tensors, cache_folders, lora_weights, run_trainer

import diffusion_dpo.checkpoints
import diffusion_dpo.training
from diffusion_dpo import InputError, TrainingStopped
from diffusion_dpo.checkpoints import CHECKPOINT_RECORD_NAME, checkpoint_to_resume
from diffusion_dpo.outputs import LORA_WEIGHT_NAME
from diffusion_dpo.training import TrainingRun


def poison_pair(cache, index):
    """Writes inf into one pair's cached latents, as an fp16 VAE overflow would: with their checksums, as the
    precompute writes them (as in test_faults.py)."""
    latents = np.load(cache / "pair_latents.npy", mmap_mode="r+")
    crops, checksums = np.load(cache / "crops.npy"), np.load(cache / "checksums.npy", mmap_mode="r+")
    latents[index] = np.inf
    for orientation in range(latents.shape[1]):
        latent = np.ascontiguousarray(latents[index, orientation])
        checksums[index, orientation] = zlib.crc32(crops[index, orientation].tobytes(), zlib.crc32(latent.tobytes()))
    latents.flush()
    checksums.flush()


def record_of(checkpoint):
    return json.loads((checkpoint / CHECKPOINT_RECORD_NAME).read_text())


def leftovers(folder):
    """Partial writes left in an output folder."""
    return sorted(name for name in os.listdir(folder) if "partial" in name)


# ---------------------------------------------------------------------------------------------------------------
# 1. A resume with changed flags is refused; a checkpoint without a record is refused; nothing left to train
# ---------------------------------------------------------------------------------------------------------------


def test_resume_with_a_changed_data_flag_is_refused_naming_both_values(dpo, cli_args, sharded_pickapic, tmp_path):
    run_trainer(dpo, cli_args(max_train_steps=1, checkpointing_steps=1))
    checkpoint = tmp_path / "out" / "checkpoint-1"
    assert record_of(checkpoint)["settings"]["--train_batch_size"] == 2
    changes = [
        ({"train_batch_size": 3}, "--train_batch_size 2, this run has 3"),
        ({"gradient_accumulation_steps": 2}, "--gradient_accumulation_steps 1, this run has 2"),
        ({"seed": 1}, "--seed 0, this run has 1"),
        ({"no_hflip": True}, "--no_hflip False, this run has True"),
        ({"random_crop": True}, "--random_crop False, this run has True"),
        ({"resolution": 64}, "--resolution 32, this run has 64"),
        ({"proportion_empty_prompts": 0.5}, "--proportion_empty_prompts 0.0, this run has 0.5"),
        ({"max_train_samples": 6}, "--max_train_samples None, this run has 6"),
        ({"dataset_name": sharded_pickapic}, f"this run has {sharded_pickapic}"),
        ({"prediction_type": "v_prediction"}, "--prediction_type None, this run has v_prediction"),  # the script's
    ]
    caches = cache_folders(tmp_path / "cache")
    for flags, message in changes:
        with pytest.raises(InputError, match=re.escape(message)) as refused:
            run_trainer(dpo, cli_args(max_train_steps=3, resume_from_checkpoint="latest", **flags))
        assert "\n" not in str(refused.value)
    assert cache_folders(tmp_path / "cache") == caches  # refused before precomputing the changed data

    # A checkpoint written by 2 processes (as its record says) is refused by a run of 1.
    record = record_of(checkpoint)
    record["settings"]["number of processes"] = 2
    (checkpoint / CHECKPOINT_RECORD_NAME).write_text(json.dumps(record))
    with pytest.raises(InputError, match="number of processes 2, this run has 1"):
        run_trainer(dpo, cli_args(max_train_steps=3, resume_from_checkpoint="latest"))

    # The same flags over other pairs (a dataset changed in place) are refused once the pairs are known.
    record["settings"].update({"number of processes": 1, "training pairs": "8 usable, fingerprint 0"})
    (checkpoint / CHECKPOINT_RECORD_NAME).write_text(json.dumps(record))
    with pytest.raises(InputError, match="written with training pairs 8 usable, fingerprint 0, this run has"):
        run_trainer(dpo, cli_args(max_train_steps=3, resume_from_checkpoint="latest"))


@pytest.mark.parametrize("dpo", ["sd3"], indirect=True)
def test_an_sd3_resume_with_t5_switched_or_another_sequence_length_is_refused(dpo, cli_args, tmp_path):
    """T5's part of the caption embedding (--no_t5) and its length (--max_sequence_length) change what the
    transformer is conditioned on: a resume that changed them would switch conditioning mid-run."""
    run_trainer(dpo, cli_args(max_train_steps=1, checkpointing_steps=1))
    caches = cache_folders(tmp_path / "cache")
    for flags, message in [
        ({"no_t5": True}, "--no_t5 False, this run has True"),
        ({"max_sequence_length": 8}, "--max_sequence_length 16, this run has 8"),
    ]:
        with pytest.raises(InputError, match=re.escape(message)):
            run_trainer(dpo, cli_args(max_train_steps=2, resume_from_checkpoint="latest", **flags))
    assert cache_folders(tmp_path / "cache") == caches  # refused before encoding the captions again


def test_a_checkpoint_without_a_record_is_refused_as_damaged(dpo, cli_args, tmp_path):
    """A record lists every file a checkpoint holds and what it was trained on: without one neither can be checked,
    so such a checkpoint (half-written, or of another version of this code) is not resumed from."""
    run_trainer(dpo, cli_args(max_train_steps=1, checkpointing_steps=1))
    out = tmp_path / "out"
    (out / "checkpoint-1" / CHECKPOINT_RECORD_NAME).unlink()
    no_record = f"it has no {CHECKPOINT_RECORD_NAME}"
    with pytest.raises(InputError, match=f"cannot resume from damaged checkpoint .*checkpoint-1: {no_record}"):
        run_trainer(dpo, cli_args(max_train_steps=2, resume_from_checkpoint="checkpoint-1"))
    with pytest.raises(InputError, match=f"no intact checkpoint in {out} to resume from .*checkpoint-1: {no_record}"):
        run_trainer(dpo, cli_args(max_train_steps=2, resume_from_checkpoint="latest"))


def test_max_train_steps_at_the_checkpoint_saves_its_weights_and_below_it_is_refused(dpo, cli_args, tmp_path, caplog):
    run_trainer(dpo, cli_args(max_train_steps=2, checkpointing_steps=2))
    out = tmp_path / "out"
    (out / LORA_WEIGHT_NAME).unlink()  # as if the final save had failed
    with caplog.at_level(logging.WARNING):
        result = run_trainer(dpo, cli_args(max_train_steps=2, resume_from_checkpoint="latest"))
    assert "Nothing to train" in caplog.text
    assert result["history"] == [] and result["global_step"] == 2
    assert_same_tensors(lora_weights(out), lora_weights(out / "checkpoint-2"), atol=0)

    with pytest.raises(InputError, match="already past --max_train_steps 1: nothing to train"):
        run_trainer(dpo, cli_args(max_train_steps=1, resume_from_checkpoint="latest"))


# ---------------------------------------------------------------------------------------------------------------
# 2. A damaged checkpoint: `latest` falls back to the newest intact one, a named one is refused
# ---------------------------------------------------------------------------------------------------------------


def truncate(path):
    with open(path, "r+b") as file:
        file.truncate(os.path.getsize(path) // 2)


def another_format(record_file):
    record = json.loads(record_file.read_text())
    record["format"] = 1
    record_file.write_text(json.dumps(record))


DAMAGES = {  # what damages checkpoint-2, and what the refusal says
    "truncated optimizer": (lambda c: truncate(c / "optimizer.bin"), r"optimizer.bin has \d+ bytes, \d+ were written"),
    "deleted LoRA": (lambda c: (c / LORA_WEIGHT_NAME).unlink(), f"{LORA_WEIGHT_NAME} is missing"),
    "truncated LoRA": (lambda c: truncate(c / LORA_WEIGHT_NAME), f"{LORA_WEIGHT_NAME} has \\d+ bytes"),
    "no record": (lambda c: (c / CHECKPOINT_RECORD_NAME).unlink(), f"it has no {CHECKPOINT_RECORD_NAME}"),
    "record of another format": (
        lambda c: another_format(c / CHECKPOINT_RECORD_NAME),
        f"its {CHECKPOINT_RECORD_NAME} is of another format",
    ),
}


def test_a_damaged_newest_checkpoint_is_passed_over_by_latest_and_refused_by_name(dpo, cli_args, tmp_path, caplog):
    run_trainer(dpo, cli_args(output_dir=tmp_path / "intact", max_train_steps=2, checkpointing_steps=1))
    (tmp_path / "intact" / LORA_WEIGHT_NAME).unlink()  # the run died before its final save
    for name, (damage, message) in DAMAGES.items():
        out = tmp_path / name.replace(" ", "-")
        shutil.copytree(tmp_path / "intact", out)
        damage(out / "checkpoint-2")
        with pytest.raises(InputError, match=f"cannot resume from damaged checkpoint .*checkpoint-2: {message}"):
            run_trainer(dpo, cli_args(output_dir=out, max_train_steps=3, resume_from_checkpoint="checkpoint-2"))
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            chosen = checkpoint_to_resume(dpo.parse_args(cli_args(output_dir=out, resume_from_checkpoint="latest")))
        assert chosen == str(out / "checkpoint-1"), name
        assert re.search(f"checkpoint-2: {message}.*resuming from .*checkpoint-1", caplog.text), name

    # and the run goes on from there
    result = run_trainer(dpo, cli_args(output_dir=out, max_train_steps=3, resume_from_checkpoint="latest"))
    assert [h["step"] for h in result["history"]] == [2, 3]


# ---------------------------------------------------------------------------------------------------------------
# 3. Non-finite weights are never saved; a run without a single optimizer step does not succeed
# ---------------------------------------------------------------------------------------------------------------


def test_a_run_whose_every_step_was_non_finite_saves_nothing_as_trained(dpo, cli_args, tmp_path):
    run_trainer(dpo, cli_args(output_dir=tmp_path / "clean", max_train_steps=1))  # builds the cache
    (cache,) = cache_folders(tmp_path / "cache")
    for index in range(len(np.load(cache / "encoded.npy"))):
        poison_pair(cache, index)
    with pytest.raises(TrainingStopped, match="no optimizer step of this run had a finite loss") as stopped:
        run_trainer(dpo, cli_args(max_train_steps=2))
    assert "\n" not in str(stopped.value)
    assert not (tmp_path / "out" / LORA_WEIGHT_NAME).exists()


def poison_weights_at_step(monkeypatch, step):
    """Makes the trained weights NaN after the optimizer step `step` (one micro-batch a step)."""
    original, calls = TrainingRun.backward_and_step, []

    def backward_and_step(run, loss, metrics):
        original(run, loss, metrics)
        calls.append(None)
        if len(calls) == step:
            with torch.no_grad():
                run.params[0].fill_(float("nan"))

    monkeypatch.setattr(TrainingRun, "backward_and_step", backward_and_step)


def test_non_finite_weights_are_never_checkpointed(dpo, cli_args, tmp_path, monkeypatch):
    poison_weights_at_step(monkeypatch, step=2)
    with pytest.raises(TrainingStopped, match=r"not finite, so .*checkpoint-2 was not written.*checkpoint-1"):
        run_trainer(dpo, cli_args(max_train_steps=3, checkpointing_steps=1))
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-1"]
    assert not (out / LORA_WEIGHT_NAME).exists()


def test_non_finite_weights_are_never_saved_as_the_result(dpo, cli_args, tmp_path, monkeypatch):
    poison_weights_at_step(monkeypatch, step=2)
    with pytest.raises(TrainingStopped, match="trained weights of step 2 are not finite, so nothing was saved"):
        run_trainer(dpo, cli_args(max_train_steps=2))
    assert not (tmp_path / "out" / LORA_WEIGHT_NAME).exists()


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


def test_a_checkpoint_that_does_not_fit_stops_in_one_line_and_leaves_no_partial(dpo, cli_args, tmp_path, monkeypatch):
    run_trainer(dpo, cli_args(output_dir=tmp_path / "sizes", max_train_steps=1, checkpointing_steps=1))
    checkpoint_size = bytes_on_tmpfs(tmp_path / "sizes" / "checkpoint-1")
    with small_disk(tmp_path / "disk", checkpoint_size // 2) as disk:
        out = disk / "out"
        estimate = r"not enough space to write .*checkpoint-1: about [\d.]+ [KM]iB needed"
        with pytest.raises(TrainingStopped, match=estimate):
            run_trainer(dpo, cli_args(output_dir=out, max_train_steps=1, checkpointing_steps=1))
        assert leftovers(out) == [] and not (out / "checkpoint-1").exists()

        # When the estimate is wrong, the write itself fails: the partial folder is removed, and it is one line.
        monkeypatch.setattr(diffusion_dpo.checkpoints, "checkpoint_bytes_needed", lambda args, params: 0)
        with pytest.raises(TrainingStopped, match=r"writing .*checkpoint-1 failed .*no checkpoint") as stopped:
            run_trainer(dpo, cli_args(output_dir=out, max_train_steps=1, checkpointing_steps=1))
        assert "\n" not in str(stopped.value)
        assert leftovers(out) == [] and not (out / "checkpoint-1").exists()


def test_a_final_save_that_does_not_fit_names_the_checkpoint_holding_the_weights(dpo, cli_args, tmp_path, monkeypatch):
    run_trainer(dpo, cli_args(output_dir=tmp_path / "first", max_train_steps=2, checkpointing_steps=2))
    checkpoint = tmp_path / "first" / "checkpoint-2"
    with small_disk(tmp_path / "disk", bytes_on_tmpfs(checkpoint) + 4 * PAGE) as disk:
        out = disk / "out"
        out.mkdir()
        shutil.copytree(checkpoint, out / "checkpoint-2")  # the run got this far; its final save did not fit
        resume = cli_args(output_dir=out, max_train_steps=2, resume_from_checkpoint="latest")
        expected = r"checkpoint-2, still holds the weights of step 2"
        with pytest.raises(TrainingStopped, match=f"not enough space to save the result of step 2.*{expected}"):
            run_trainer(dpo, resume)
        assert not (out / LORA_WEIGHT_NAME).exists() and leftovers(out) == []

        # The estimate passed but the write failed: nothing half-written looks finished.
        original = diffusion_dpo.training.write_into_output_dir

        def write_into_output_dir(args, write, bytes_needed, step):
            return original(args, write, 0, step)  # as if nothing were needed

        monkeypatch.setattr(diffusion_dpo.training, "write_into_output_dir", write_into_output_dir)
        with pytest.raises(TrainingStopped, match=f"saving the result of step 2 to .* failed .*{expected}"):
            run_trainer(dpo, resume)
        assert not (out / LORA_WEIGHT_NAME).exists() and leftovers(out) == []
        monkeypatch.undo()

        # Space freed: the same command saves the checkpoint's weights.
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        run_trainer(dpo, resume)
        assert_same_tensors(lora_weights(out), lora_weights(out / "checkpoint-2"), atol=0)


# ---------------------------------------------------------------------------------------------------------------
# 5. Saved weights get the usual mode
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("train_mode", ["lora", "full"])
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
