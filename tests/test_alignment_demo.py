"""A shortened run of examples/alignment_demo.py, as a user runs it: DPO on warm-over-cool pairs must move the model
that way, and the person running it sees progress and no library notices."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image
from testing_utils import ROOT


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One shortened demo run: its printed output and its demo_result.json."""
    work_dir = tmp_path_factory.mktemp("demo")
    argv = ["--work_dir", str(work_dir), "--n_pairs", "160", "--n_heldout", "32", "--max_train_steps", "60"]
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "alignment_demo.py"), *argv, "--n_samples", "32"],
        capture_output=True,
        text=True,
        timeout=900,
        # one thread, as every subprocess of the suite: OpenMP threads of processes sharing the cores spin against
        # each other, which made this run 7x slower next to other tests (docs/alignment-demo.md, Time)
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (result_file,) = work_dir.glob("run-seed0-*/demo_result.json")
    return run, json.loads(result_file.read_text())


def test_shortened_demo_moves_held_out_accuracy_and_samples_toward_the_preferred_kind(demo):
    _, result = demo
    assert result["heldout_acc"][0] == 0.5 and result["heldout_acc"][1] > 0.8
    assert result["heldout_loss"][1] < result["heldout_loss"][0]
    assert result["warm_fraction"][1] > result["warm_fraction"][0] + 0.1
    assert result["plausible_fraction"][1] >= result["plausible_fraction"][0] - 0.1  # no collapse
    assert result["winner_error_ratio"] <= 1.5


def test_the_demo_saves_its_pictures_and_the_trainers_log(demo):
    _, result = demo
    run_dir = result["run_dir"]
    assert Image.open(f"{run_dir}/samples.png").size == (16 * 64, 2 * 64)  # 16 base samples over their DPO versions
    assert Image.open(f"{run_dir}/curves.png").size == (1300, 360)  # loss, held-out accuracy, loss, error ratios
    with open(f"{run_dir}/train.log") as log:
        train_log = log.read()
    assert "Held-out pairs at step 60" in train_log  # the trainer's log is kept
    assert "collapse: the held-out error" not in train_log  # the demo's settings are healthy: the trainer never warns


def test_the_demo_shows_training_progress_and_no_library_notices(demo):
    run, _ = demo
    progress = [line for line in run.stdout.splitlines() if line.strip().startswith("Steps:")]
    # not a terminal: the bar as it left steps 0, 25 and 50 (after their held-out evaluations), and at the end
    assert [line.split("|")[2].split()[0] for line in progress] == ["0/60", "25/60", "50/60", "60/60"]
    assert all("eval_acc=" in line and "winner_ratio=" in line for line in progress)
    assert "seed 0 (" in run.stdout and "held-out implicit accuracy 0.500 -> " in run.stdout  # the summary
    assert "No LoRA keys" not in run.stdout + run.stderr  # diffusers' notice when the demo loads the trained LoRA
