"""A run's lifecycle: flag values refused up front, an output folder that cannot be used or is in use by another run,
and SIGTERM/SIGINT (preemption, SLURM, Ctrl-C) ending a run with a checkpoint and one line. The machinery is
diffusion_dpo's (args, run, training), tested once on SD 1.5; a SIGTERM during training on every script."""

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from filelock import FileLock
from testing_utils import (
    ROOT,
    accelerate_launch,
    assert_same_tensors,
    finished,
    launch,
    lora_weights,
    parse_error,
    run_cli,
    run_trainer,
)

import diffusion_dpo.outputs
import diffusion_dpo.training
from diffusion_dpo import InputError, TrainingStopped
from diffusion_dpo.checkpoints import complete_checkpoints, holds_earlier_run
from diffusion_dpo.outputs import LORA_WEIGHT_NAME, push_to_hub
from diffusion_dpo.run import OUTPUT_DIR_LOCK_NAME
from diffusion_dpo.training import StepMetrics


@pytest.mark.parametrize(
    "flags,message",
    [
        ({"learning_rate": 0}, "--learning_rate must be a finite number above 0, got 0.0"),
        ({"learning_rate": -0.5}, "--learning_rate must be a finite number above 0"),
        ({"learning_rate": "nan"}, "--learning_rate must be a finite number above 0, got nan"),
        ({"learning_rate": "inf"}, "--learning_rate must be a finite number above 0, got inf"),
        ({"adam_beta1": 1.0}, "--adam_beta1 must lie in [0, 1), got 1.0"),
        ({"adam_beta1": -0.1}, "--adam_beta1 must lie in [0, 1)"),
        ({"adam_beta2": "nan"}, "--adam_beta2 must lie in [0, 1), got nan"),
        ({"adam_beta2": 1.5}, "--adam_beta2 must lie in [0, 1)"),
        ({"beta_dpo": "nan"}, "--beta_dpo must be a finite number above 0, got nan"),
        ({"beta_dpo": "inf"}, "--beta_dpo must be a finite number above 0, got inf"),
        ({"max_grad_norm": -1}, "--max_grad_norm must be a finite number at least 0, got -1.0"),
        ({"max_grad_norm": "nan"}, "--max_grad_norm must be a finite number at least 0, got nan"),
        ({"adam_epsilon": -1}, "--adam_epsilon must be a finite number above 0, got -1.0"),
        ({"adam_weight_decay": "nan"}, "--adam_weight_decay must be a finite number at least 0, got nan"),
    ],
    ids=lambda value: "-".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else None,
)
def test_bad_flag_values_stop_before_anything_loads(dpo, cli_args, capsys, flags, message):
    assert message in parse_error(dpo, cli_args(**flags), capsys)


def test_good_flag_values_at_the_edges_are_accepted(dpo, cli_args):
    args = dpo.parse_args(cli_args(adam_beta1=0, adam_beta2=0.9999, max_grad_norm=0, learning_rate=1e-9))
    assert args.learning_rate == 1e-9 and dpo.parse_args(cli_args()).learning_rate is None  # None: the default


@pytest.fixture
def nothing_loads(dpo, monkeypatch):
    """Fails the test if the run gets as far as loading data or models."""

    def loaded(*args, **kwargs):
        raise AssertionError("the run went on to load data and models")

    monkeypatch.setattr(dpo, "cached_pairs", loaded)  # the script's first step after the output folder's checks


def test_an_output_dir_that_is_a_file_is_refused(dpo, cli_args, tmp_path, nothing_loads):
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(InputError, match=f"^--output_dir {tmp_path / 'out'} is a file; choose a folder$"):
        run_trainer(dpo, cli_args(output_dir=tmp_path / "out"))


def test_an_output_dir_under_a_file_is_refused(dpo, cli_args, tmp_path, nothing_loads):
    (tmp_path / "file").write_text("not a folder")
    output_dir = tmp_path / "file" / "runs" / "out"
    with pytest.raises(InputError, match=f"^--output_dir {output_dir} is under the file {tmp_path / 'file'};"):
        run_trainer(dpo, cli_args(output_dir=output_dir))


@pytest.fixture
def read_only_folder(tmp_path):
    """A read-only tmpfs mount (as root chmod does not stop writes); skips when mounting is not allowed here."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a read-only tmpfs needs root")
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mount.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.parametrize("inside", [".", "new"], ids=["the-folder", "a-folder-to-create"])
def test_a_read_only_output_dir_is_refused(dpo, cli_args, read_only_folder, nothing_loads, inside):
    output_dir = os.path.normpath(read_only_folder / inside)
    with pytest.raises(InputError, match=f"^--output_dir {output_dir} cannot be written \\(Read-only file sys"):
        run_trainer(dpo, cli_args(output_dir=output_dir))


def test_a_second_run_on_the_same_output_dir_stops_in_one_line(dpo, cli_args, tmp_path, nothing_loads):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    # flock is per open file: this lock blocks the trainer's own FileLock on the path, as another run's would
    with FileLock(output_dir / OUTPUT_DIR_LOCK_NAME):
        with pytest.raises(InputError, match=f"^--output_dir {output_dir} is in use by another run;"):
            run_trainer(dpo, cli_args(output_dir=output_dir))
    assert not holds_earlier_run(str(output_dir), dpo.FAMILY.denoiser)  # the lock file is no earlier run


def test_the_lock_is_released_at_the_end_and_is_not_uploaded(dpo, cli_args, tmp_path, monkeypatch):
    output_dir = tmp_path / "out"
    previous_handlers = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)]
    run_trainer(dpo, cli_args(output_dir=output_dir, max_train_steps=1))
    lock_file = output_dir / OUTPUT_DIR_LOCK_NAME
    assert lock_file.exists()
    FileLock(lock_file).acquire(timeout=0)  # released when main returned
    assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)] == previous_handlers

    # a run that ends with an error releases the lock and restores the handlers too
    with pytest.raises(InputError, match="already holds a trained model"):
        run_trainer(dpo, cli_args(output_dir=output_dir, max_train_steps=1))
    FileLock(lock_file).acquire(timeout=0)
    assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)] == previous_handlers

    # --push_to_hub uploads the folder without its lock file
    from huggingface_hub.utils import filter_repo_objects

    uploads = {}
    monkeypatch.setattr(diffusion_dpo.outputs, "upload_folder", lambda **kwargs: uploads.update(kwargs))
    push_to_hub(dpo.parse_args(cli_args(output_dir=output_dir)), "user/repo")
    files = [p.relative_to(output_dir).as_posix() for p in output_dir.rglob("*") if p.is_file()]
    uploaded = list(filter_repo_objects(files, ignore_patterns=uploads["ignore_patterns"]))
    assert LORA_WEIGHT_NAME in uploaded and OUTPUT_DIR_LOCK_NAME not in uploaded


def test_the_stop_flag_rides_in_the_step_metric_reduction():
    import torch
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    metrics = StepMetrics()
    metrics.add({"loss": torch.tensor(1.0)})
    metrics.add({"loss": torch.tensor(3.0)})
    assert metrics.reduce(accelerator) == ({"loss": 2.0}, False)
    metrics.add({"loss": torch.tensor(1.0)})
    assert metrics.reduce(accelerator, stop_requested="SIGTERM") == ({"loss": 1.0}, True)


# ---------------------------------------------------------------------------------------------------------------
# Signals: the trainer runs as a separate process, as it does under SLURM or a cloud scheduler.


def signal_when(process, condition, signum, timeout=300):
    """Sends `signum` as soon as condition() holds (checked every millisecond), then waits for the process to end;
    False if it ended first."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if condition():
            process.send_signal(signum)
            process.wait(timeout=timeout)
            return True
        time.sleep(0.001)
    process.wait(timeout=timeout)
    return False


def last_line(log):
    return [line for line in re.split(r"[\r\n]+", Path(log).read_text()) if line.strip()][-1]


@pytest.mark.every_script
def test_sigterm_during_training_checkpoints_the_step_and_resume_gives_the_uninterrupted_weights(
    dpo, cli_args, tmp_path
):
    # checkpoints every 3 steps: the signal arrives after checkpoint-3, so the stop writes a checkpoint of its own
    common = dict(max_train_steps=9, checkpointing_steps=3, learning_rate=1e-3, lr_scheduler="cosine")
    # as a process like the others (the same thread count gives the same floating-point sums), alongside them
    straight_log, straight_cache = tmp_path / "straight.log", tmp_path / "straight-cache"
    straight_argv = cli_args(output_dir=tmp_path / "straight", precompute_cache_dir=straight_cache, **common)
    straight = launch(dpo, straight_argv, straight_log)

    out, log = tmp_path / "stopped", tmp_path / "stopped.log"
    argv = cli_args(output_dir=out, **common)
    process = launch(dpo, argv, log)
    assert signal_when(process, lambda: (out / "checkpoint-3").exists(), signal.SIGTERM), log.read_text()[-3000:]
    assert process.returncode != 0
    assert "Traceback" not in log.read_text()
    stopped = re.fullmatch(
        r"error: stopped by SIGTERM after step (\d+) of 9; saved (\S+); --resume_from_checkpoint latest continues "
        r"the run",
        last_line(log),
    )
    assert stopped, log.read_text()[-3000:]
    step = int(stopped.group(1))
    assert 3 <= step < 9 and stopped.group(2) == str(out / f"checkpoint-{step}")
    assert complete_checkpoints(str(out))[-1] == str(out / f"checkpoint-{step}")
    assert not (out / LORA_WEIGHT_NAME).exists()  # stopped, not finished

    resumed_log = tmp_path / "resumed.log"
    resumed = launch(dpo, argv + ["--resume_from_checkpoint", "latest"], resumed_log)
    assert resumed.wait() == 0, resumed_log.read_text()[-3000:]
    assert f"Resumed from {out / f'checkpoint-{step}'} at step {step}" in resumed_log.read_text()
    finished(straight, straight_log)
    assert_same_tensors(lora_weights(out), lora_weights(tmp_path / "straight"), atol=0)


def test_sigint_during_precompute_ends_in_one_line_and_the_same_command_continues(dpo, cli_args, tmp_path):
    for attempt in range(3):  # precompute on tiny data lasts moments: polling may miss it, so try again
        out, log = tmp_path / f"out-{attempt}", tmp_path / f"interrupted-{attempt}.log"
        argv = cli_args(
            output_dir=out,
            precompute_cache_dir=tmp_path / f"cache-{attempt}",
            vae_encode_batch_size=1,
            precompute_commit_seconds=0,
        )
        process = launch(dpo, argv, log)
        started = signal_when(process, lambda: "to encode" in log.read_text(), signal.SIGINT)
        if started and "***** Diffusion-DPO" not in log.read_text():  # interrupted before the models were set up
            break
    else:
        pytest.fail("no run was interrupted during precompute")
    assert process.returncode != 0
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
    assert last_line(log) == (
        "error: interrupted by SIGINT before training started; run the same command again to continue (latents "
        "precomputed so far are kept)"
    )
    rerun_log = tmp_path / "rerun.log"
    rerun = launch(dpo, argv, rerun_log)
    assert rerun.wait() == 0, rerun_log.read_text()[-3000:]
    assert (out / LORA_WEIGHT_NAME).exists()


def process_of_rank(rank, output_dir):
    """The pid of the trainer process of `rank` writing to output_dir (read from /proc), or None."""
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if str(output_dir).encode() in cmdline and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def test_a_signal_to_one_process_stops_all_of_them_at_the_same_step(dpo, cli_args, sharded_pickapic, tmp_path):
    out, log = tmp_path / "out", tmp_path / "two.log"
    argv = cli_args(dataset_name=sharded_pickapic, output_dir=out, max_train_steps=9, checkpointing_steps=2)
    launcher = accelerate_launch(2, "--main_process_port", "29541")
    with open(log, "w") as output:
        process = subprocess.Popen(
            [*launcher, dpo.__file__, *argv],
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"},
            cwd=ROOT,
        )
    deadline = time.monotonic() + 300
    while not (out / "checkpoint-2").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    rank_1 = process_of_rank(1, out)
    assert rank_1 is not None, log.read_text()[-3000:]
    os.kill(rank_1, signal.SIGTERM)  # only rank 1 is signalled; rank 0 learns it from the step's reduction
    process.wait(timeout=300)
    text = log.read_text()
    assert process.returncode != 0
    assert "[RANK 1] SIGTERM received: stopping after this optimizer step" in text, text[-3000:]
    # the main process says the one line for all of them, naming the checkpoint every process wrote its part of
    told = re.search(r"error: stopped by a signal to another process after step (\d+) of 9; saved (\S+);", text)
    assert told, text[-3000:]
    step = int(told.group(1))
    assert step < 9 and told.group(2) == str(out / f"checkpoint-{step}")
    assert "error: stopped by SIGTERM" not in text  # rank 1 stops quietly: its line would repeat rank 0's
    assert complete_checkpoints(str(out))[-1] == str(out / f"checkpoint-{step}")


def test_a_failure_of_the_main_process_alone_stops_both_with_its_one_line_and_no_traceback(dpo, cli_args, tmp_path):
    """Only the main process creates the --push_to_hub repository; offline it cannot. Every process stops: the main
    one says the one line, the other nothing (neither prints a traceback; the launcher's own report remains)."""
    result = run_cli(
        dpo,
        cli_args(push_to_hub=True, max_train_steps=1),
        launcher=accelerate_launch(2, "--main_process_port", "29547"),
        env={"ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1"},
    )
    log = result.stdout + result.stderr
    assert result.returncode != 0
    errors = [line for line in log.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: --push_to_hub: cannot create out on the Hub"), log[-3000:]
    assert not re.search(r'File ".*(diffusion_dpo|train_diffusion_dpo)', log), log[-3000:]  # no trainer's traceback
    assert "[RANK 1] Distributed environment" in log  # both processes ran (and the other stopped too)
    assert not (tmp_path / "out" / LORA_WEIGHT_NAME).exists()


def test_a_failed_hub_upload_is_one_line_and_keeps_the_saved_result(dpo, cli_args, tmp_path, monkeypatch):
    """The upload runs on the main process alone, inside the save's stop_together: one line for every process."""

    class Repo:
        repo_id = "someone/my-dpo-lora"

    def upload_folder(**kwargs):
        raise OSError("Connection reset by peer")

    monkeypatch.setattr(diffusion_dpo.training, "create_repo", lambda **kwargs: Repo)
    monkeypatch.setattr(diffusion_dpo.outputs, "upload_folder", upload_folder)
    with pytest.raises(TrainingStopped) as stopped:
        run_trainer(dpo, cli_args(push_to_hub=True, max_train_steps=1))
    out = tmp_path / "out"
    assert str(stopped.value) == f"saved {out}, but its upload to someone/my-dpo-lora failed: Connection reset by peer"
    assert (out / LORA_WEIGHT_NAME).exists()
