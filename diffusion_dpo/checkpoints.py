"""Checkpoints: written atomically with a record of what the run trained on and of every file's size; resumed only
by a run that trains on the same things, from a checkpoint whose files are intact."""

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from accelerate.logging import get_logger

from diffusion_dpo import InputError, TrainingStopped
from diffusion_dpo.outputs import LORA_WEIGHT_NAME, load_lora_into, save_lora
from diffusion_dpo.run import WRITE_ERRORS, first_line, folder_files, format_bytes, give_usual_file_modes


logger = get_logger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
# Written into every checkpoint before it is renamed complete: what the run trained on, and each file's size.
CHECKPOINT_RECORD_NAME = "checkpoint_record.json"
CHECKPOINT_RECORD_FORMAT = 2


def complete_checkpoints(output_dir):
    """Checkpoint folders that were written to the end, oldest first (partial writes carry another name)."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir) if (m := CHECKPOINT_PATTERN.match(name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found)]


def named_checkpoint(args):
    """The checkpoint folder --resume_from_checkpoint names (a path, or a name inside --output_dir), or None."""
    if args.resume_from_checkpoint == "latest":
        checkpoints = complete_checkpoints(args.output_dir)
        return checkpoints[-1] if checkpoints else None
    for candidate in (args.resume_from_checkpoint, os.path.join(args.output_dir, args.resume_from_checkpoint)):
        if os.path.isdir(candidate):
            return candidate
    return None


def holds_earlier_run(output_dir, denoiser):
    saved = [LORA_WEIGHT_NAME, "model_index.json", denoiser]
    return bool(complete_checkpoints(output_dir)) or any(os.path.exists(Path(output_dir, name)) for name in saved)


def check_output_dir(args, family, num_processes):
    """Refuses to train over an earlier run's results unless resuming it, and a resume with a changed flag before the
    precompute (hours on a large dataset), not after it. Reads the disk: called under the lock."""
    resuming = args.resume_from_checkpoint
    checkpoint = named_checkpoint(args) if resuming else None
    if resuming not in (None, "latest") and checkpoint is None:
        raise InputError(f"--resume_from_checkpoint {resuming}: no such checkpoint folder")
    if resuming not in (None, "latest") and not CHECKPOINT_PATTERN.match(Path(checkpoint).name):
        raise InputError(f"--resume_from_checkpoint {checkpoint}: expected a folder named checkpoint-<step>")
    if checkpoint is None and holds_earlier_run(args.output_dir, family.denoiser):
        found, hint = "holds a finished model but no checkpoint to resume from", ""
        if not resuming:
            found = "already holds a trained model or checkpoints"
            hint = "pass --resume_from_checkpoint latest to continue that run, or "
        raise InputError(f"--output_dir {args.output_dir} {found}; {hint}choose a new --output_dir")
    if checkpoint is not None:  # the newest intact one, for `latest`
        check_settings(checkpoint_to_resume(args), training_settings(args, num_processes, family.resume_flags))


def training_settings(args, num_processes, family_flags, data=None):
    """What a resumed run must share with its checkpoint: what decides which batches step N reads, and what the model
    is trained on (`family_flags`: the script's own such flags); the pairs themselves (TrainingData) once known."""
    dataset = os.path.abspath(args.dataset_name) if os.path.exists(args.dataset_name) else args.dataset_name
    settings = {
        "--train_batch_size": args.train_batch_size,
        "--gradient_accumulation_steps": args.gradient_accumulation_steps,
        "number of processes": num_processes,
        "--seed": args.seed,
        "--no_hflip": args.no_hflip,
        "--random_crop": args.random_crop,
        "--resolution": args.resolution,
        "--proportion_empty_prompts": args.proportion_empty_prompts,
        "--pretrained_model_name_or_path": args.pretrained_model_name_or_path,
        "--dataset_name": dataset,
        "--dataset_config_name": args.dataset_config_name,
        "--dataset_split_name": args.dataset_split_name,
        "--max_train_samples": args.max_train_samples,
        "--validation_split_name": args.validation_split_name,
        "--num_validation_pairs": args.num_validation_pairs,
        **{f"--{name}": getattr(args, name) for name in family_flags},
    }
    if data is not None:  # the pairs themselves (source files, rows, which decoded): a dataset changed in place
        usable = hashlib.sha256(data.train_source.fingerprint.encode())
        usable.update(np.asarray(data.train_pairs.valid_indices, dtype=np.int64).tobytes())
        usable.update(b"" if data.train_pairs.preference is None else data.train_pairs.preference.tobytes())  # p
        settings["training pairs"] = f"{len(data.train_pairs)} usable, fingerprint {usable.hexdigest()[:16]}"
    return settings


def checkpoint_damage(checkpoint, args):
    """What is wrong with a checkpoint folder (no record, a missing or truncated file), or None; reads sizes only."""
    try:
        record = json.loads(Path(checkpoint, CHECKPOINT_RECORD_NAME).read_text())
        files = dict(record["files"])
        if record.get("format") != CHECKPOINT_RECORD_FORMAT:
            return f"its {CHECKPOINT_RECORD_NAME} is of another format (written by another version of this code)"
    except FileNotFoundError:
        return f"it has no {CHECKPOINT_RECORD_NAME} (written by another version of this code, or not to the end)"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"its {CHECKPOINT_RECORD_NAME} is unreadable ({type(error).__name__}: {error})"
    if record.get("train_mode") != args.train_mode:
        raise InputError(
            f"checkpoint {checkpoint} was not written by a --train_mode {args.train_mode} run (it holds a "
            f"--train_mode {record.get('train_mode')} run's state)"
        )
    for name, size in files.items():
        path = os.path.join(checkpoint, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        if os.path.getsize(path) != size:
            return f"{name} has {os.path.getsize(path)} bytes, {size} were written (truncated or overwritten)"
    return None


def checkpoint_to_resume(args):
    """The checkpoint to resume from, or None. `latest` passes over damaged ones with a warning; a damaged
    checkpoint named explicitly is refused."""
    if args.resume_from_checkpoint != "latest":
        checkpoint = named_checkpoint(args)
        if checkpoint is not None and (damage := checkpoint_damage(checkpoint, args)):
            raise InputError(f"cannot resume from damaged checkpoint {checkpoint}: {damage}")
        return checkpoint
    damaged = []
    for checkpoint in reversed(complete_checkpoints(args.output_dir)):
        damage = checkpoint_damage(checkpoint, args)
        if damage is None:
            if damaged:
                logger.warning(f"Passed over damaged checkpoints ({'; '.join(damaged)}); resuming from {checkpoint}.")
            return checkpoint
        damaged.append(f"{checkpoint}: {damage}")
    if damaged:
        raise InputError(f"no intact checkpoint in {args.output_dir} to resume from ({'; '.join(damaged)})")
    return None


def check_settings(checkpoint, settings):
    """Refuses to resume with any of `settings` (training_settings) changed since the checkpoint was written."""
    recorded = json.loads(Path(checkpoint, CHECKPOINT_RECORD_NAME).read_text()).get("settings") or {}
    for name, value in settings.items():
        if name in recorded and recorded[name] != value:
            raise InputError(
                f"cannot resume from {checkpoint}: it was written with {name} {recorded[name]}, this run has "
                f"{value}; the resumed run would not continue the same training (resume with the same value, or "
                "start a new --output_dir)"
            )


def check_weights_finite(params, args, weights, unsaved):
    """Refuses to save non-finite weights (every process holds the same weights: all decide alike)."""
    with torch.no_grad():
        if not all(bool(torch.isfinite(p).all()) for p in params):
            raise TrainingStopped(f"{weights} are not finite, so {unsaved}; {last_checkpoint_note(args)}")


def last_checkpoint_note(args):
    checkpoints = complete_checkpoints(args.output_dir)
    if not checkpoints:
        return "no checkpoint was written"
    step = CHECKPOINT_PATTERN.match(Path(checkpoints[-1]).name).group(1)
    return f"the last checkpoint, {checkpoints[-1]}, still holds the weights of step {step}"


def checkpoint_bytes_needed(args, params):
    """About what the next checkpoint takes: the last one's size, or the weights and AdamW's two moments."""
    checkpoints = complete_checkpoints(args.output_dir)
    if checkpoints:
        return sum(folder_files(checkpoints[-1]).values())
    return 3 * sum(p.numel() * p.element_size() for p in params) + 2**16


def register_checkpoint_hooks(accelerator, model, args, family):
    """accelerator.save_state writes the LoRA in diffusers format (loadable as it is) or the full denoiser folder."""
    model_class = type(accelerator.unwrap_model(model))

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for saved in (m for m in models if isinstance(m, model_class)):  # not DeepSpeed's engine: it saves itself
                if args.train_mode == "lora":
                    save_lora(saved, family, output_dir, kohya=args.output_kohya_format)
                else:
                    saved.save_pretrained(os.path.join(output_dir, family.denoiser))
        weights.clear()  # saved above; keep accelerate from writing the whole model again

    def load_hook(models, input_dir):
        while models:  # emptied: accelerate loads nothing more itself
            loaded = models.pop()
            if args.train_mode == "lora":
                load_lora_into(loaded, family, input_dir)
            else:
                loaded.load_state_dict(model_class.from_pretrained(input_dir, subfolder=family.denoiser).state_dict())

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator, args, global_step):
    """Writes checkpoint-N atomically (a partial write never looks complete), then rotates old ones."""
    final = os.path.join(args.output_dir, f"checkpoint-{global_step}")
    partial = os.path.join(args.output_dir, f".checkpoint-{global_step}.partial")
    params = [p for model in accelerator._models for p in model.parameters() if p.requires_grad]
    check_weights_finite(params, args, f"the weights of step {global_step}", f"{final} was not written")
    if accelerator.is_main_process and os.path.exists(partial):
        shutil.rmtree(partial)
    needed, free = checkpoint_bytes_needed(args, params), shutil.disk_usage(args.output_dir).free
    if free < needed:
        raise TrainingStopped(
            f"not enough space to write {final}: about {format_bytes(needed)} needed, {format_bytes(free)} free; "
            f"{last_checkpoint_note(args)}"
        )
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(partial)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            # last: it lists every file the others wrote
            record = dict(format=CHECKPOINT_RECORD_FORMAT, step=global_step, train_mode=args.train_mode)
            record.update(settings=args.training_settings, files=folder_files(partial))
            Path(partial, CHECKPOINT_RECORD_NAME).write_text(json.dumps(record, indent=2))
            give_usual_file_modes(partial)
    except WRITE_ERRORS as error:  # a full disk: torch's writer says "enforce fail ... unexpected pos"
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        raise TrainingStopped(
            f"writing {final} failed ({first_line(error)[:200]}); about {format_bytes(needed)} needed, "
            f"{format_bytes(shutil.disk_usage(args.output_dir).free)} free; {last_checkpoint_note(args)}"
        ) from None
    if accelerator.is_main_process:
        if os.path.exists(final):  # a rerun of the same step after a resume: replace it
            shutil.rmtree(final)
        os.replace(partial, final)
        if args.checkpoints_total_limit is not None:
            for old in complete_checkpoints(args.output_dir)[: -args.checkpoints_total_limit]:
                logger.info(f"Removing old checkpoint {old}")
                doomed = os.path.join(args.output_dir, f".{os.path.basename(old)}.deleting")
                os.replace(old, doomed)  # renamed first: a half-deleted folder never looks like a checkpoint
                shutil.rmtree(doomed)
        logger.info(f"Saved checkpoint {final}")
    accelerator.wait_for_everyone()


def resume(accelerator, args):
    """Loads weights, optimizer and schedule from the checkpoint to resume from, if any; returns its step (or 0)."""
    checkpoint = checkpoint_to_resume(args) if args.resume_from_checkpoint else None
    if checkpoint is None:
        if args.resume_from_checkpoint:
            logger.info("No checkpoint to resume from; starting a new run.")
        return 0
    global_step = int(CHECKPOINT_PATTERN.match(Path(checkpoint).name).group(1))
    check_settings(checkpoint, args.training_settings)
    if global_step > args.max_train_steps:  # its weights are past the steps asked for: saving them would mislabel
        raise InputError(
            f"{checkpoint} is already past --max_train_steps {args.max_train_steps}: nothing to train; resume from an "
            "earlier checkpoint (--resume_from_checkpoint checkpoint-N) or raise --max_train_steps"
        )
    accelerator.load_state(checkpoint)
    logger.info(f"Resumed from {checkpoint} at step {global_step}")
    if global_step == args.max_train_steps:  # e.g. the final save had failed: saving is all that is left
        logger.warning(
            f"Nothing to train: {checkpoint} is at --max_train_steps {global_step}; saving its weights as the result."
        )
    return global_step
