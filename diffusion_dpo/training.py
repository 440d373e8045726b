"""The bookkeeping around a trainer script's visible loop (run.batches(), run.backward_and_step, run.end_step,
run.finish): optimizer, schedule, resume, skipped steps, logs, checkpoints, signals, held-out metrics, final save."""

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
    check_weights_finite,
    complete_checkpoints,
    last_checkpoint_note,
    register_checkpoint_hooks,
    resume,
    save_checkpoint,
    training_settings,
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
    """What a run trains and evaluates on: the source pairs and their cached forms (no held-out pairs: None)."""

    train_source: object
    train_pairs: object
    held_out_pairs: object


class Session(NamedTuple):
    accelerator: object
    stop_signals: StopSignals
    repo_id: str | None  # the Hub repository, with --push_to_hub


@contextlib.contextmanager
def training_session(args, family):
    """A Session for a run's lifetime: signals handled, --output_dir locked and checked, a resume's flags checked, the
    Hub repository created (a bad token fails now, not after hours); all released at the end."""
    with StopSignals() as stop_signals:
        accelerator = setup_accelerator(args)
        with locked_output_dir(args, accelerator):
            check_output_dir(args, family, accelerator.num_processes)
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
    dtype = mixed_precision_dtype(accelerator)
    return TrainingData(
        train_source, *precompute_pairs(args, family, accelerator, train_source, held_out_source, dtype)
    )


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
    options = dict(lr=args.learning_rate, weight_decay=args.adam_weight_decay)
    if args.use_adafactor:
        return transformers.Adafactor(params, scale_parameter=False, relative_step=False, **options)
    options.update(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    if args.use_8bit_adam:
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(params, **options)
    # one fused kernel for the whole update instead of a few per parameter tensor
    return torch.optim.AdamW(params, fused=device.type in ("cuda", "cpu"), **options)


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
        self.args, self.accelerator, self.family, self.repo_id = args, session.accelerator, family, session.repo_id
        self.reference, self.noise, self.data, self.stop_signals = reference, noise, data, session.stop_signals
        accelerator, n_processes = session.accelerator, session.accelerator.num_processes
        register_checkpoint_hooks(accelerator, model, args, family)
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
        args.training_settings = training_settings(args, n_processes, family.resume_flags, data)
        self.global_step = self.start_step = resume(accelerator, args)
        hidden = not accelerator.is_local_main_process
        self.progress = tqdm(total=args.max_train_steps, initial=self.global_step, desc="Steps", disable=hidden)
        self.postfix, self.history, self.evaluations, self.reference_errors, self.finite = {}, [], [], None, True
        self.collapse, self.last_healthy_step = None, -1  # (step, held-out winner ratio) of the first collapse
        self.skipped_steps, self.skipped_in_a_row, self.step_metrics = 0, 0, StepMetrics()
        if self.global_step == 0:
            self.evaluate()  # the starting point: implicit accuracy 0.5, loss ln 2
        self.stop_signals.phase = "training"  # a first signal now stops after the current step, with a checkpoint
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
        if self.finite and not accelerator.optimizer_step_was_skipped:
            self.skipped_in_a_row = 0
        else:  # the weights keep their last finite values; the step still consumed its data
            self.skipped_steps += 1
            self.skipped_in_a_row += 1
            logger.warning(
                f"Step {step}: non-finite loss or gradient, optimizer step skipped "
                f"({self.skipped_steps} so far, {self.skipped_in_a_row} in a row)."
            )
            if self.skipped_in_a_row >= args.max_consecutive_skipped_steps:
                raise TrainingStopped(
                    f"stopped at step {step}: {self.skipped_in_a_row} steps in a row had a non-finite loss or "
                    f"gradient (the weights are those of step {step - self.skipped_in_a_row}; checkpoints are "
                    "intact); lower --learning_rate, prefer bf16 to fp16, or check the data"
                )
        means, stop_requested = self.step_metrics.reduce(accelerator, self.stop_signals.requested)
        logs = {**means, "lr": self.lr_scheduler.get_last_lr()[0], "skipped_steps": self.skipped_steps}
        self.history.append({"step": step, **logs})
        accelerator.log(logs, step=step)
        self.progress.update(1)
        shown = ("loss", "implicit_acc", "policy_acc", "lr")
        self.show(**{name: f"{logs[name]:.4g}" for name in shown if name in logs})
        if step % args.checkpointing_steps == 0 or stop_requested:  # every process got the request at this step
            save_checkpoint(accelerator, args, step)
        if stop_requested:
            self.progress.close()  # the one-line message that follows gets a line of its own
            accelerator.end_training()
            raise TrainingStopped(
                f"stopped by {self.stop_signals.requested or 'a signal to another process'} after step {step} of "
                f"{args.max_train_steps}; saved {os.path.join(args.output_dir, f'checkpoint-{step}')}; "
                "--resume_from_checkpoint latest continues the run"
            )
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
        summary = ", ".join(f"{name} {value:.4g}" for name, value in metrics.items())
        logger.info(f"Held-out pairs at step {self.global_step}: {summary}")
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
        elif self.collapse is None:
            self.collapse = (step, winner_ratio)
            logger.warning(
                f"Step {step}: collapse: the held-out error on winners is {winner_ratio:.3f}x the reference's (above "
                f"--collapse_threshold {args.collapse_threshold:g}); lower --learning_rate ({args.learning_rate:g}) "
                f"or raise --beta_dpo ({args.beta_dpo:g}); {self.healthy_checkpoint_note()}"
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
        dtype = mixed_precision_dtype(self.accelerator)
        render_validation(self.args, self.accelerator, self.family, model, reference, dtype, step)

    def finish(self):
        """The final evaluation, images and save (no save after --stop_on_collapse stopped a collapse); returns
        {'global_step', 'history', 'evaluations', 'collapse': (step, held-out winner ratio) of the first or None}."""
        args = self.args
        self.stop_signals.phase = "final save"
        self.progress.close()
        if self.skipped_steps and self.skipped_steps == self.global_step - self.start_step:  # nothing trained
            raise TrainingStopped(
                f"no optimizer step of this run had a finite loss and gradient ({self.skipped_steps} skipped, up to "
                f"step {self.global_step}), so nothing was saved as trained; lower --learning_rate, prefer bf16 to "
                "fp16, or check the data"
            )
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

        trained_bytes = sum(p.numel() * p.element_size() for p in self.params)
        write_into_output_dir(args, write, trained_bytes * (2 if args.output_kohya_format else 1), step)
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
        if accelerator.num_processes > 1:  # only the main process saves: make sure it holds what every process trained
            with torch.no_grad():
                checksums = gather_object([[sum(p.double().pow(k).sum().item() for p in self.params) for k in (1, 2)]])
            if any(checksum != checksums[0] for checksum in checksums):
                logger.warning(
                    f"Trained weights differ between processes (checksums {checksums}); saving the main one's."
                )
            else:
                logger.info(f"Trained weights identical on all {accelerator.num_processes} processes.")
        check_weights_finite(self.params, args, f"the trained weights of step {step}", "nothing was saved")
        with stop_together():  # a failure on the main process stops the others with its line
            if accelerator.is_main_process:
                self.write_result()
        accelerator.wait_for_everyone()  # the others wait for the main process to finish saving before the group ends


def write_into_output_dir(args, write, bytes_needed, global_step):
    """Runs write(folder) on a hidden folder, then moves what it wrote into --output_dir (model_index.json last): a
    failed save never leaves a half-written result that looks finished; it names the checkpoint holding the weights."""
    partial = os.path.join(args.output_dir, ".result.partial")
    free = shutil.disk_usage(args.output_dir).free
    then = "(free space, then resume with --resume_from_checkpoint latest)"
    if free < bytes_needed:
        raise TrainingStopped(
            f"not enough space to save the result of step {global_step} in {args.output_dir}: about "
            f"{format_bytes(bytes_needed)} needed, {format_bytes(free)} free; {last_checkpoint_note(args)} {then}"
        )
    try:
        shutil.rmtree(partial, ignore_errors=True)
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
