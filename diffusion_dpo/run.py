"""The run around the training: the accelerator, the output folder's lock, SIGTERM/SIGINT, and writing files so that
a full disk or an interruption never leaves a file that looks complete."""

import contextlib
import errno
import logging
import os
import shutil
import signal
import sys
import threading
import uuid
from pathlib import Path

import datasets
import diffusers
import numpy as np
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import AutocastKwargs, ProjectConfiguration, set_seed
from filelock import FileLock, Timeout
from safetensors import SafetensorError

from diffusion_dpo import InputError, Interrupted, TrainingStopped


logger = get_logger(__name__)

# What a failed write of weights raises; a full disk reads as any of them, depending on who wrote.
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)
# Held by a run for its lifetime, so that a second run on the same --output_dir stops instead of overwriting it.
OUTPUT_DIR_LOCK_NAME = ".diffusion-dpo-run.lock"


def first_line(error):
    """An exception's message in one line (its type's name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def format_bytes(n_bytes):
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n_bytes < 1024 or unit == "GiB":
            return f"{n_bytes:.0f} {unit}" if unit == "bytes" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024


@contextlib.contextmanager
def removed_on_failure(partial):
    """Yields `partial` (written under a temporary name) and removes it when writing fails; a full disk is one line."""
    try:
        yield partial
    except BaseException as error:
        # numpy reports a short write without an errno: then the disk is (all but) full
        disk_full = isinstance(error, OSError) and (
            error.errno in (errno.ENOSPC, errno.EDQUOT) or shutil.disk_usage(partial.parent).free < 2**20
        )
        if partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)
        else:
            partial.unlink(missing_ok=True)
        if disk_full:
            raise InputError(
                f"the disk of {partial.parent} is full ({format_bytes(shutil.disk_usage(partial.parent).free)} "
                "free); free some space or choose another folder with --precompute_cache_dir"
            ) from None
        raise


def save_atomically(path, array):
    """np.save under a temporary name, then renamed: readers see the old file or the new one, never half of one."""
    with removed_on_failure(path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:8]}.npy")) as partial:
        np.save(partial, array)
        os.replace(partial, path)


def give_usual_file_modes(folder):
    """Files under `folder` get the mode a plain write gives (safetensors' temporary files are 0600)."""
    umask = os.umask(0o022)
    os.umask(umask)
    for root, _, files in os.walk(folder):
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def folder_files(folder):
    """{path relative to `folder`: size in bytes} of every file under it."""
    return {
        os.path.relpath(os.path.join(root, name), folder): os.path.getsize(os.path.join(root, name))
        for root, _, files in os.walk(folder)
        for name in files
    }


class StopSignals:
    """SIGTERM and SIGINT for the run's lifetime: before training, Interrupted at once (the precompute commits its
    progress); during training the first sets `requested`, which the step's metric all-reduce carries to every process
    (all checkpoint the same step and stop); a second ends the run at once."""

    def __init__(self):
        self.phase, self.requested, self.previous_handlers, self.pid = "before training", None, {}, os.getpid()

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for signum in (signal.SIGTERM, signal.SIGINT):
                self.previous_handlers[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self.previous_handlers.items():
            signal.signal(signum, handler)

    def handle(self, signum, frame):
        if os.getpid() != self.pid:  # a forked data loader worker: the run's own process decides, workers carry on
            return
        name = signal.Signals(signum).name
        if self.phase == "before training":
            raise Interrupted(
                f"interrupted by {name} before training started; run the same command again to continue (latents "
                "precomputed so far are kept)"
            )
        if self.requested is not None:
            raise Interrupted(
                f"stopped at once by a second {name}; --resume_from_checkpoint latest continues from the last "
                "complete checkpoint"
            )
        self.requested = name
        then = "finishing the final save" if self.phase == "final save" else "stopping after this optimizer step"
        logger.warning(f"{name} received: {then}; a second signal stops at once.", main_process_only=False)


def setup_accelerator(args):
    """The Accelerator, with logging configured, the seed set and TF32 allowed if asked."""
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
        # Autocast's cache of cast weights (of weights that require grad: the trained ones) changes what some CPU
        # kernels compute (seen with oneDNN's AVX2 bf16 matmuls), so that a full fine-tune's reference, whose weights
        # are not cached, would differ from the trained copy at step 1. Without the cache both compute alike.
        kwargs_handlers=[AutocastKwargs(cache_enabled=False)],
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > accelerator.num_processes:  # each process would train alone and overwrite the others' output
        raise InputError(
            f"launched as {launched} processes, but each runs alone: on a machine without GPUs launch with "
            "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu ...` (gloo), otherwise check that every "
            "process sees a GPU"
        )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    for library in (datasets, transformers, diffusers):
        verbosity = "warning" if accelerator.is_local_main_process else "error"
        getattr(library.utils.logging, f"set_verbosity_{verbosity}")()
    set_seed(args.seed)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator


def output_dir_problem(output_dir, error):
    """One line on why --output_dir could not be created or written (`error`: the OSError that said so)."""
    blocking = next((p for p in (Path(output_dir), *Path(output_dir).parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        where = "is a file" if blocking == Path(output_dir) else f"is under the file {blocking}"
        return f"--output_dir {output_dir} {where}; choose a folder"
    return f"--output_dir {output_dir} cannot be written ({error.strerror or error}); choose a writable folder"


@contextlib.contextmanager
def locked_output_dir(args, accelerator):
    """Creates --output_dir and holds a lock file in it for the run's lifetime: a second run on the same folder
    stops instead of overwriting this one's checkpoints and weights."""
    lock = FileLock(os.path.join(args.output_dir, OUTPUT_DIR_LOCK_NAME))
    with stop_together():  # every process stops, not only the main one
        if accelerator.is_main_process:
            try:
                os.makedirs(args.output_dir, exist_ok=True)
                lock.acquire(timeout=0)
            except Timeout:
                raise InputError(
                    f"--output_dir {args.output_dir} is in use by another run; wait for it to end or choose another"
                )
            except OSError as error:
                raise InputError(output_dir_problem(args.output_dir, error))
    try:
        yield
    finally:
        if lock.is_locked:
            lock.release()


@contextlib.contextmanager
def stop_together(group=None):
    """After a stretch some processes of `group` ran alone (e.g. the main one), every process raises the InputError
    or TrainingStopped one of them met, or none does: no process waits for a failed one at the next collective."""
    failure = None
    try:
        yield
    except (InputError, TrainingStopped) as error:
        failure = error
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        failures = [None] * torch.distributed.get_world_size(group)
        torch.distributed.all_gather_object(failures, failure, group=group)
        failure = next((found for found in failures if found is not None), None)
    if failure is not None:
        raise failure


@contextlib.contextmanager
def one_line_errors():
    """Bad input, a stopped run or an interrupt end the process with one line, said by rank 0 alone."""
    try:
        yield
    # KeyboardInterrupt: Ctrl-C, or SIGTERM as an Interrupted that says when and what is kept
    except (InputError, TrainingStopped, KeyboardInterrupt) as error:
        sys.exit(f"error: {str(error) or 'interrupted'}" if os.environ.get("RANK", "0") == "0" else 1)
