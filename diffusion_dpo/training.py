"""The bookkeeping around a trainer script's loop (optimizer, schedule, resume, batches, skipped steps, logs,
checkpoints, signals, held-out evaluation, validation images, the final save). A script's loop reads:

    run = TrainingRun(args, session, FAMILY, model, reference, noise, data)
    for batch, generator in run.batches():
        with session.accelerator.accumulate(run.model):
            loss, metrics = compute_loss(batch, run.model, reference, noise, FAMILY, args, generator)
            run.backward_and_step(loss, metrics)
        run.end_step()
    return run.finish()
"""

import contextlib
import math
import os
import shutil
import time
from typing import NamedTuple

import torch
import transformers
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, gather_object
from diffusers.optimization import get_scheduler
from huggingface_hub import create_repo
from tqdm.auto import tqdm

from diffusion_dpo import InputError, TrainingStopped
from diffusion_dpo.cache import precompute_pairs, steps_per_epoch, training_dataloader
from diffusion_dpo.checkpoints import (
    check_output_dir,
    check_resume_flags,
    complete_checkpoints,
    last_checkpoint_note,
    register_checkpoint_hooks,
    resume,
    save_checkpoint,
    training_settings,
    weights_finite,
)
from diffusion_dpo.data import training_and_validation_pairs
from diffusion_dpo.evaluation import evaluate_held_out
from diffusion_dpo.losses import step_seed
from diffusion_dpo.outputs import push_to_hub, render_validation, save_lora, save_model_card
from diffusion_dpo.run import (
    WRITE_ERRORS,
    StopSignals,
    first_line,
    format_bytes,
    give_usual_file_modes,
    locked_output_dir,
    setup_accelerator,
    stop_together,
)


logger = get_logger(__name__)


class TrainingData(NamedTuple):
    """What a run trains and evaluates on: the source pairs and their cached forms (held-out ones may be None)."""

    train_source: object
    train_pairs: object
    held_out_pairs: object = None


class Session(NamedTuple):
    accelerator: object
    stop_signals: StopSignals
    repo_id: str | None  # the Hub repository, with --push_to_hub


@contextlib.contextmanager
def training_session(args, family):
    """A Session for a run's lifetime: SIGTERM and SIGINT handled, --output_dir locked and checked (under the lock: no
    other run can write an earlier run's results meanwhile), a resume's flags checked against its checkpoint, and
    with --push_to_hub the Hub repository created (a bad token fails now, not after hours of training). The handlers
    and the lock are released when the block ends or raises (tests run trainers in-process)."""
    with contextlib.ExitStack() as lifetime:
        stop_signals = lifetime.enter_context(StopSignals())
        accelerator = setup_accelerator(args)
        lifetime.enter_context(locked_output_dir(args, accelerator))
        check_output_dir(args, family.denoiser)
        check_resume_flags(args, accelerator.num_processes, family.resume_flags)
        repo_id = None
        with stop_together():  # created by the main process; its failure stops every process with its one line
            if args.push_to_hub and accelerator.is_main_process:
                repo_name = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
                try:
                    repo_id = create_repo(repo_id=repo_name, exist_ok=True, token=args.hub_token).repo_id
                except Exception as error:  # offline, a bad token, no rights: huggingface_hub raises many types
                    raise InputError(f"--push_to_hub: cannot create {repo_name} on the Hub: {first_line(error)}")
        yield Session(accelerator, stop_signals, repo_id)


def cached_pairs(args, accelerator, family):
    """The run's pairs, read and the held-out ones set aside (data.py), then encoded into the cache (cache.py)."""
    train_source, held_out_source = training_and_validation_pairs(args, accelerator)
    weight_dtype = mixed_precision_dtype(accelerator)
    train_pairs, held_out_pairs = precompute_pairs(
        args, family, accelerator, train_source, held_out_source, weight_dtype
    )
    return TrainingData(train_source, train_pairs, held_out_pairs)


def mixed_precision_dtype(accelerator):
    """The dtype frozen weights are held in and mixed precision computes in (fp32 without mixed precision)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def learning_rate(args, pairs_per_step, epsilon_beta_factor=1.0):
    """--learning_rate, scaled with --scale_lr; without it, the default of --train_mode: 1e-5 for LoRA, the paper's
    1e-8 * (2000 / beta) * pairs per step for full fine-tuning, beta taken on epsilon errors."""
    if args.learning_rate is None:
        epsilon_beta = args.beta_dpo * epsilon_beta_factor
        return 1e-5 if args.train_mode == "lora" else 1e-8 * (2000.0 / epsilon_beta) * pairs_per_step
    return args.learning_rate * pairs_per_step if args.scale_lr else args.learning_rate


def build_optimizer(args, params, device):
    if args.use_adafactor:
        options = dict(scale_parameter=False, relative_step=False)
        return transformers.Adafactor(params, lr=args.learning_rate, weight_decay=args.adam_weight_decay, **options)
    optimizer_class, options = torch.optim.AdamW, {}
    if args.use_8bit_adam:
        import bitsandbytes

        optimizer_class = bitsandbytes.optim.AdamW8bit
    else:  # one fused kernel for the whole update instead of a few per parameter tensor
        options["fused"] = device.type in ("cuda", "cpu")
    options.update(
        betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay, eps=args.adam_epsilon
    )
    return optimizer_class(params, lr=args.learning_rate, **options)


class SkippedSteps:
    """Counts the optimizer steps skipped for a non-finite loss or gradient (the weights keep their last finite
    values; the step still consumed its data) and stops the run after --max_consecutive_skipped_steps in a row."""

    def __init__(self, max_consecutive):
        self.max_consecutive, self.total, self.consecutive, self.succeeded = max_consecutive, 0, 0, 0

    def record(self, global_step, skipped):
        if not skipped:
            self.consecutive = 0
            self.succeeded += 1
            return
        self.total += 1
        self.consecutive += 1
        logger.warning(
            f"Step {global_step}: non-finite loss or gradient, optimizer step skipped "
            f"({self.total} so far, {self.consecutive} in a row)."
        )
        if self.consecutive >= self.max_consecutive:
            raise TrainingStopped(
                f"stopped at step {global_step}: {self.consecutive} steps in a row had a non-finite loss or "
                f"gradient (the weights are those of step {global_step - self.consecutive}; checkpoints are "
                "intact); lower --learning_rate, prefer bf16 to fp16, or check the data"
            )

    def check_something_trained(self, global_step):  # a run that trained nothing must not end as a success
        if self.total and not self.succeeded:
            raise TrainingStopped(
                f"no optimizer step of this run had a finite loss and gradient ({self.total} skipped, up to step "
                f"{global_step}), so nothing was saved as trained; lower --learning_rate, prefer bf16 to fp16, or "
                "check the data"
            )


class StepMetrics:
    """Sums the metrics of a step's micro-batches; `reduce` gives their means over micro-batches and processes."""

    def __init__(self):
        self.sums, self.micro_batches = {}, 0

    def add(self, metrics):
        for name, value in metrics.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.micro_batches += 1

    def reduce(self, accelerator, stop_requested=False):
        """The step's metric means, and whether any process was asked to stop (in the same all-reduce)."""
        names = list(self.sums)
        means = torch.stack([self.sums[n] for n in names]) / self.micro_batches
        means = torch.cat([means, means.new_tensor([float(bool(stop_requested))])])
        means = accelerator.reduce(means, reduction="mean").tolist()
        self.sums, self.micro_batches = {}, 0
        return dict(zip(names, means[:-1])), means[-1] > 0


class TrainingRun:
    """One run's state around the script's loop: `model` as accelerate prepared it, `global_step` (optimizer steps,
    resumed ones included), `history` (each step's logs) and `evaluations` (held-out metrics)."""

    def __init__(self, args, session, family, model, reference, noise, data):
        self.args, self.accelerator, self.family = args, session.accelerator, family
        self.reference, self.noise, self.data, self.stop_signals = reference, noise, data, session.stop_signals
        self.repo_id, self.weight_dtype = session.repo_id, mixed_precision_dtype(session.accelerator)
        accelerator, stop_signals = self.accelerator, self.stop_signals
        register_checkpoint_hooks(accelerator, model, args, family)

        n_processes = accelerator.num_processes
        pairs_per_step = args.train_batch_size * args.gradient_accumulation_steps * n_processes
        args.learning_rate = learning_rate(args, pairs_per_step, family.epsilon_beta_factor)
        self.params = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(args, self.params, accelerator.device)
        if args.max_train_steps is None:
            args.max_train_steps = args.num_train_epochs * steps_per_epoch(args, len(data.train_pairs), n_processes)
        lr_scheduler = get_scheduler(
            args.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=args.lr_warmup_steps * n_processes,
            num_training_steps=args.max_train_steps * n_processes,
            num_cycles=args.lr_num_cycles,
            power=args.lr_power,
        )
        self.model, self.optimizer, self.dataloader, self.lr_scheduler = accelerator.prepare(
            model, optimizer, training_dataloader(args, data.train_pairs), lr_scheduler
        )
        self.updates_per_epoch = math.ceil(len(self.dataloader) / args.gradient_accumulation_steps)
        self.num_epochs = math.ceil(args.max_train_steps / self.updates_per_epoch)
        if accelerator.is_main_process:
            config = {k: v for k, v in vars(args).items() if not isinstance(v, (list, dict)) and k != "hub_token"}
            accelerator.init_trackers(args.tracker_name, config=config)
        objective = "SFT" if args.sft else ("MaPO" if args.loss_type == "mapo" else "DPO")
        strength = f"beta_mapo = {args.beta_mapo:g}" if args.loss_type == "mapo" else f"beta = {args.beta_dpo:g}"
        logger.info(
            f"***** {family.name}: {objective}, {args.train_mode} *****\n"
            f"  pairs = {len(data.train_pairs)}, pairs per optimizer step = {pairs_per_step}, "
            f"steps = {args.max_train_steps}, epochs = {self.num_epochs}, learning rate = {args.learning_rate:g}"
            + ("" if args.sft else f", {strength}")
        )

        # resume: weights, optimizer and schedule from the checkpoint; the data position from the step count
        args.training_settings = training_settings(
            args, n_processes, family.resume_flags, data.train_source, data.train_pairs
        )
        self.global_step = self.start_step = resume(accelerator, args)
        self.progress = tqdm(
            range(args.max_train_steps),
            initial=self.global_step,
            desc="Steps",
            disable=not accelerator.is_local_main_process,
        )
        self.postfix, self.history, self.evaluations, self.reference_errors, self.finite = {}, [], [], None, True
        self.collapse, self.last_healthy_step = None, -1  # (step, held-out winner ratio) of the first collapse
        self.skipped_steps, self.step_metrics = SkippedSteps(args.max_consecutive_skipped_steps), StepMetrics()
        if self.global_step == 0:
            self.evaluate()  # the starting point: implicit accuracy 0.5, loss ln 2
        stop_signals.phase = "training"  # from here a first signal stops after the current step, with a checkpoint
        self.model.train()

    def batches(self):
        """(batch, generator) for every micro-batch still to train on (a resume skips those already trained on); the
        generator is seeded by (seed, process, epoch, batch), so noise needs no RNG state to resume."""
        accelerator, args = self.accelerator, self.args
        first_epoch = self.global_step // self.updates_per_epoch
        for epoch in range(first_epoch, self.num_epochs):
            skip = (self.global_step % self.updates_per_epoch) * args.gradient_accumulation_steps
            skip = skip if epoch == first_epoch else 0
            epoch_batches = accelerator.skip_first_batches(self.dataloader, skip) if skip else self.dataloader
            epoch_batches.set_epoch(epoch)  # accelerate's loaders pass their own epoch counter to the sampler
            for batch_index, batch in enumerate(epoch_batches, start=skip):
                if self.global_step >= args.max_train_steps or (self.collapse and args.stop_on_collapse):
                    return
                seed = step_seed(args.seed, accelerator.process_index, epoch, batch_index)
                yield batch, torch.Generator(accelerator.device).manual_seed(seed)

    def backward_and_step(self, loss, metrics):
        """Backward, and on the last micro-batch of a step gradient clipping and the optimizer step, skipped when
        the gradients are not finite (fp16: the grad scaler skips and lowers its scale)."""
        accelerator = self.accelerator
        accelerator.backward(loss)
        self.finite = True
        if accelerator.sync_gradients:  # gradients are all-reduced by now: every process decides the same
            grad_norm = accelerator.clip_grad_norm_(self.params, self.args.max_grad_norm or math.inf)
            if accelerator.distributed_type != DistributedType.DEEPSPEED:  # DeepSpeed skips overflows itself
                self.finite = bool(torch.isfinite(grad_norm))
        if self.finite or accelerator.scaler is not None:
            self.optimizer.step()
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_metrics.add({"loss": loss.detach(), **metrics})

    def end_step(self):
        """After an optimizer step: logs, checkpoint, a requested stop, held-out metrics and images, each when due."""
        accelerator, args = self.accelerator, self.args
        if not accelerator.sync_gradients:
            return
        self.global_step += 1
        step = self.global_step
        self.skipped_steps.record(step, skipped=not self.finite or accelerator.optimizer_step_was_skipped)
        means, stop_requested = self.step_metrics.reduce(accelerator, self.stop_signals.requested)
        logs = {**means, "lr": self.lr_scheduler.get_last_lr()[0], "skipped_steps": self.skipped_steps.total}
        self.history.append({"step": step, **logs})
        accelerator.log(logs, step=step)
        self.progress.update(1)
        self.show(
            **{name: f"{logs[name]:.4g}" for name in ("loss", "implicit_acc", "policy_acc", "lr") if name in logs}
        )
        if step % args.checkpointing_steps == 0:
            save_checkpoint(accelerator, args, step)
        if stop_requested:
            self.stop()
        if step % args.validation_steps == 0:
            self.evaluate()
            if args.run_validation and accelerator.is_main_process:
                self.render()

    def show(self, **values):
        self.postfix.update(values)
        self.progress.set_postfix(self.postfix)

    def evaluate(self):
        """Held-out metrics (nothing without held-out pairs), logged as eval/... and kept in `evaluations`."""
        if self.data.held_out_pairs is None:
            return
        model, held_out, reference_errors = self.model, self.data.held_out_pairs, self.reference_errors
        metrics, self.reference_errors = evaluate_held_out(  # the reference's errors never change: computed once
            self.accelerator, model, self.reference, self.family, self.noise, held_out, self.args, reference_errors
        )
        self.evaluations.append({"step": self.global_step, **metrics})
        self.accelerator.log(metrics, step=self.global_step)
        logger.info(
            f"Held-out pairs at step {self.global_step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        )
        self.show(eval_acc=f"{metrics.get('eval/implicit_acc', metrics.get('eval/policy_acc')):.3f}")
        if "eval/winner_ratio" in metrics:  # MaPO has no reference to compare with: no health check
            self.show(winner_ratio=f"{metrics['eval/winner_ratio']:.3f}")
            self.check_health(metrics["eval/winner_ratio"])

    def check_health(self, winner_ratio):
        """Warns once when the held-out winner ratio passes --collapse_threshold; with --stop_on_collapse, checkpoints
        this step, and batches() ends the loop and finish() writes no result."""
        args, step = self.args, self.global_step
        if winner_ratio <= args.collapse_threshold:
            self.last_healthy_step = step
            return
        if self.collapse is not None:
            return
        self.collapse = (step, winner_ratio)
        logger.warning(
            f"Step {step}: collapse: the held-out error on winners is {winner_ratio:.3f}x the reference's (above "
            f"--collapse_threshold {args.collapse_threshold:g}); lower --learning_rate ({args.learning_rate:g}) or "
            f"raise --beta_dpo ({args.beta_dpo:g}); {self.healthy_checkpoint_note()}"
            + ("" if args.stop_on_collapse else "; --stop_on_collapse stops such a run")
        )
        if args.stop_on_collapse and step % args.checkpointing_steps != 0:
            save_checkpoint(self.accelerator, args, step)

    def healthy_checkpoint_note(self):
        last = self.last_healthy_step
        healthy = [c for c in complete_checkpoints(self.args.output_dir) if int(c.rsplit("-", 1)[1]) <= last]
        if healthy:
            return f"the last healthy checkpoint is {healthy[-1]} (held-out pairs healthy at step {last})"
        return "no checkpoint was written while the held-out pairs were healthy"

    def render(self):
        model, reference, step = self.model, self.reference, self.global_step
        render_validation(self.args, self.accelerator, self.family, model, reference, self.weight_dtype, step)

    def stop(self):
        """Checkpoints this step (unless just done) and raises TrainingStopped; every process calls it at one step."""
        args, step = self.args, self.global_step
        self.progress.close()  # the one-line message that follows gets a line of its own
        if step % args.checkpointing_steps != 0:
            save_checkpoint(self.accelerator, args, step)
        self.accelerator.end_training()
        raise TrainingStopped(
            f"stopped by {self.stop_signals.requested or 'a signal to another process'} after step {step} of "
            f"{args.max_train_steps}; saved {os.path.join(args.output_dir, f'checkpoint-{step}')}; "
            "--resume_from_checkpoint latest continues the run"
        )

    def finish(self):
        """The final evaluation, images and save (no save after --stop_on_collapse stopped a collapse); returns
        {'global_step', 'history', 'evaluations', 'collapse': (step, held-out winner ratio) of the first or None}."""
        args = self.args
        self.stop_signals.phase = "final save"
        self.progress.close()
        self.skipped_steps.check_something_trained(self.global_step)
        if self.global_step % args.validation_steps != 0:
            self.evaluate()
        if self.collapse and args.stop_on_collapse:  # the last line; exit code 0, so that a sweep moves on
            step, ratio = self.collapse
            logger.warning(
                f"Stopped at step {step} of {args.max_train_steps} on collapse (held-out winner ratio {ratio:.3f} > "
                f"{args.collapse_threshold:g}): saved {args.output_dir}/checkpoint-{step} and no final result (the "
                f"collapsed weights are no finished model); {self.healthy_checkpoint_note()}"
            )
        else:
            self.save()
        self.accelerator.end_training()
        if self.accelerator.num_processes > 1:
            # gloo's worker thread frees the last collectives' tensors, which needs the GIL; if the process group
            # is torn down (the DDP model freed) before it has, the exit deadlocks. Seen on CPU; a second avoids it.
            time.sleep(1)
        result = {"global_step": self.global_step, "history": self.history, "evaluations": self.evaluations}
        return {**result, "collapse": self.collapse}

    def write_result(self):
        """On the main process: the last validation images, the result, its model card, the Hub upload."""
        args, accelerator, family, step = self.args, self.accelerator, self.family, self.global_step
        trained = accelerator.unwrap_model(self.model)
        if args.run_validation and step % args.validation_steps != 0:
            self.render()

        def write(folder):
            if args.train_mode == "lora":
                save_lora(trained, family, folder, kohya=args.output_kohya_format)
            else:
                family.load_pipeline(args, trained).save_pretrained(folder)

        saved = family.lora_state_dict(trained) if args.train_mode == "lora" else trained.state_dict()
        saved_bytes = sum(t.numel() * t.element_size() for t in saved.values())
        write_into_output_dir(args, write, saved_bytes * (2 if args.output_kohya_format else 1), step)
        save_model_card(args, family, self.repo_id or os.path.abspath(args.output_dir), step)
        if args.push_to_hub:
            try:
                push_to_hub(args, self.repo_id)
            except Exception as error:  # under stop_together, as one line: the other processes wait for the main one
                raise TrainingStopped(
                    f"saved {args.output_dir}, but its upload to {self.repo_id} failed: {first_line(error)}"
                ) from None
        logger.info(f"Saved the trained {'LoRA' if args.train_mode == 'lora' else 'pipeline'} to {args.output_dir}")

    def save(self):
        """The result and its model card, written by the main process once the weights are known to be finite."""
        args, accelerator, step = self.args, self.accelerator, self.global_step
        accelerator.wait_for_everyone()
        if accelerator.num_processes > 1:
            check_weights_identical(accelerator, self.params)
        if not weights_finite(self.params):
            raise TrainingStopped(
                f"the trained weights of step {step} are not finite, so nothing was saved; "
                f"{last_checkpoint_note(args)}"
            )
        with stop_together():  # a failure on the main process stops the others with its line
            if accelerator.is_main_process:
                self.write_result()
        accelerator.wait_for_everyone()  # the others wait for the main process to finish saving before the group ends


def check_weights_identical(accelerator, params):
    """Only the main process saves: makes sure it holds what every process trained (warns if not)."""
    with torch.no_grad():
        checksum = [sum(p.double().pow(k).sum().item() for p in params) for k in (1, 2)]
    checksums = gather_object([checksum])
    if all(c == checksums[0] for c in checksums):
        logger.info(f"Trained weights identical on all {accelerator.num_processes} processes.")
    else:
        logger.warning(f"Trained weights differ between processes (checksums {checksums}); saving the main one's.")


def write_into_output_dir(args, write, bytes_needed, global_step):
    """Runs write(folder) on a hidden folder inside --output_dir, then moves what it wrote in (model_index.json
    last), so that a failed save never leaves a half-written weights file that looks finished. A full disk is one
    line naming the space needed and the checkpoint that still holds the weights."""
    partial = os.path.join(args.output_dir, ".result.partial")
    free = shutil.disk_usage(args.output_dir).free
    then = "(free space, then resume with --resume_from_checkpoint latest)"
    if free < bytes_needed:
        raise TrainingStopped(
            f"not enough space to save the result of step {global_step} in {args.output_dir}: about "
            f"{format_bytes(bytes_needed)} needed, {format_bytes(free)} free; {last_checkpoint_note(args)} {then}"
        )
    try:
        if os.path.exists(partial):
            shutil.rmtree(partial)
        os.makedirs(partial)
        write(partial)
        give_usual_file_modes(partial)
        for name in sorted(os.listdir(partial), key=lambda name: name == "model_index.json"):
            target = os.path.join(args.output_dir, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            os.replace(os.path.join(partial, name), target)
        os.rmdir(partial)
    except WRITE_ERRORS as error:
        shutil.rmtree(partial, ignore_errors=True)
        raise TrainingStopped(
            f"saving the result of step {global_step} to {args.output_dir} failed ({first_line(error)}); about "
            f"{format_bytes(bytes_needed)} needed, {format_bytes(shutil.disk_usage(args.output_dir).free)} free; "
            f"nothing half-written was left; {last_checkpoint_note(args)} {then}"
        ) from None
