"""Run health (diffusion_dpo.losses, .evaluation, .training): the policy/reference error ratios, negative margins and
accuracy per noise level, the collapse warning and --stop_on_collapse; and examples/sweep.py, which runs short
trainings over a (beta, learning rate) grid and marks collapsed runs.

The tiny random models do not collapse under a LoRA at any learning rate (the attention they adapt barely moves
their errors), so the collapsing runs fine-tune the whole denoiser at learning rate 1: its held-out winner error is
100x to 1e9x the reference's after one step, while held-out implicit accuracy reads 1.0 on most scripts."""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from testing_utils import ROOT, parse_error, run_trainer

from diffusion_dpo.losses import accuracy_by_noise_level, dpo_loss


COLLAPSING = dict(train_mode="full", learning_rate=1.0, num_validation_pairs=2, validation_timesteps=2)
COLLAPSE_WARNING = "collapse: the held-out error on winners is"


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One latent cache for this module's runs: each family's pairs are encoded once."""
    return tmp_path_factory.mktemp("health-cache")


def test_health_metrics_are_neutral_at_the_reference_and_follow_the_errors():
    ref_w, ref_l = torch.tensor([1.0, 2.0]), torch.tensor([1.5, 0.5])
    _, same = dpo_loss(ref_w, ref_l, ref_w, ref_l, beta=1000)
    assert same["winner_ratio"] == 1 and same["loser_ratio"] == 1
    assert same["reward_margin"] == 0 and same["negative_margin_share"] == 0
    # winners twice as bad as the reference's, losers three times: the margin favours the winner on pair 0 only
    _, worse = dpo_loss(2 * ref_w, 3 * ref_l, ref_w, ref_l, beta=1000)
    assert worse["winner_ratio"] == pytest.approx(2) and worse["loser_ratio"] == pytest.approx(3)
    assert worse["negative_margin_share"] == 0.5 and worse["implicit_acc"] == 0.5


def test_accuracy_per_noise_level_counts_each_draw_in_its_quarter():
    levels = torch.tensor([0.1, 0.3, 0.3, 0.9, 1.0])  # sigma 1.0, pure noise, belongs to the last quarter
    model_w = torch.tensor([0.9, 0.9, 1.1, 1.0, 0.9])  # winners' errors against the reference's 1.0, losers unchanged
    ones = torch.ones(5)
    accuracy = accuracy_by_noise_level(model_w, ones, ones, ones, 1000, levels)
    expected = {"implicit_acc_noise_0_25": 1.0, "implicit_acc_noise_25_50": 0.5, "implicit_acc_noise_75_100": 0.75}
    assert {name: value.item() for name, value in accuracy.items()} == expected  # no draw fell in 50-75: no entry


@pytest.mark.parametrize(
    "flags,message",
    [
        ({"stop_on_collapse": True}, "--stop_on_collapse compares held-out errors with the reference's: it needs"),
        ({"stop_on_collapse": True, "num_validation_pairs": 2, "loss_type": "mapo"}, "not --loss_type mapo"),
        ({"collapse_threshold": 1.0}, "--collapse_threshold must be a finite number above 1"),
    ],
    ids=["no-held-out-pairs", "mapo", "threshold"],
)
def test_collapse_flag_errors(dpo, cli_args, capsys, flags, message):
    assert message in parse_error(dpo, cli_args(**flags), capsys)


@pytest.mark.every_script
def test_a_collapsing_run_stops_with_a_checkpoint_and_no_result(dpo, cli_args, shared_cache, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    flags = dict(validation_steps=1, max_train_steps=3, stop_on_collapse=True, precompute_cache_dir=shared_cache)
    argv = cli_args(**COLLAPSING, **flags)
    result = run_trainer(dpo, argv)
    step, ratio = result["collapse"]
    assert step == 1 and ratio > 1.5 and result["global_step"] == 1  # stopped after the first collapsed evaluation
    assert caplog.text.count(COLLAPSE_WARNING) == 1
    assert sorted(os.listdir(tmp_path / "out")) == [".diffusion-dpo-run.lock", "checkpoint-1"]  # no final result
    last = caplog.records[-1].getMessage()
    assert "Stopped at step 1 of 3 on collapse" in last and "checkpoint-1 and no final result" in last


def test_the_warning_comes_once_names_the_last_healthy_checkpoint_and_the_run_goes_on(
    dpo, cli_args, shared_cache, tmp_path, caplog
):
    caplog.set_level(logging.INFO)
    # warm-up: step 1 runs at learning rate 0 (still healthy, checkpoint-1), step 2 at 0.5 collapses
    flags = dict(validation_steps=1, max_train_steps=3, checkpointing_steps=1, lr_warmup_steps=2)
    flags["precompute_cache_dir"] = shared_cache
    result = run_trainer(dpo, cli_args(**COLLAPSING, **flags))
    assert [e["eval/winner_ratio"] > 1.5 for e in result["evaluations"]] == [False, False, True, True]
    (warning,) = [r.getMessage() for r in caplog.records if COLLAPSE_WARNING in r.getMessage()]
    assert "Step 2: collapse" in warning and "lower --learning_rate (1) or raise --beta_dpo" in warning
    assert f"the last healthy checkpoint is {tmp_path / 'out' / 'checkpoint-1'}" in warning
    assert result["collapse"][0] == 2 and (tmp_path / "out" / "model_index.json").exists()  # without the flag: saved


def test_a_tiny_sweep_prints_its_table_and_picks_the_healthy_run(tiny_model, pickapic_data, shared_cache, tmp_path):
    trainer_flags = dict(
        pretrained_model_name_or_path=tiny_model,
        dataset_name=pickapic_data,
        precompute_cache_dir=shared_cache,
        resolution=32,
        train_batch_size=2,
        train_mode="full",
        validation_timesteps=2,
    )
    argv = [
        *("--output_dir", str(tmp_path / "sweep"), "--launcher", "python", "--betas", "2000"),
        *("--learning_rates", "1e-5", "1", "--max_train_steps", "2", "--num_validation_pairs", "2", "--"),
        *[item for name, value in trainer_flags.items() for item in (f"--{name}", str(value))],
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "sweep.py"), *argv], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| 2000 ")]
    assert len(rows) == 2 and "healthy" in rows[0] and "collapsed at step 1" in rows[1]
    best = done.stdout.strip().splitlines()[-1]
    assert best.startswith("Best healthy setting: --beta_dpo 2000 --learning_rate 1e-05")
    results = json.loads((tmp_path / "sweep" / "sweep_results.json").read_text())
    collapsed = tmp_path / "sweep" / results[1]["run"]
    assert not (collapsed / "model_index.json").exists() and (collapsed / "checkpoint-1").is_dir()
    last_line = (tmp_path / "sweep" / f"{results[1]['run']}.log").read_text().strip().splitlines()[-1]
    assert "Stopped at step 1 of 2 on collapse" in last_line  # and the trainer exited 0: not "failed"
