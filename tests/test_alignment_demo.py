"""A shortened run of examples/alignment_demo.py: DPO on warm-over-cool pairs must move the model that way."""

import alignment_demo
from PIL import Image


def test_shortened_demo_moves_held_out_accuracy_and_samples_toward_the_preferred_kind(tmp_path):
    argv = ["--work_dir", str(tmp_path), "--n_pairs", "160", "--n_heldout", "32", "--max_train_steps", "60"]
    (result,) = alignment_demo.main(alignment_demo.parse_args(argv + ["--n_samples", "32"]))
    assert result["heldout_acc"][0] == 0.5 and result["heldout_acc"][1] > 0.8
    assert result["heldout_loss"][1] < result["heldout_loss"][0]
    assert result["warm_fraction"][1] > result["warm_fraction"][0] + 0.1
    assert result["plausible_fraction"][1] >= result["plausible_fraction"][0] - 0.1  # no collapse
    assert result["winner_error_ratio"] <= 1.5

    run_dir = tmp_path / result["run_dir"].split("/")[-1]
    assert Image.open(run_dir / "samples.png").size == (16 * 64, 2 * 64)  # 16 base samples over their DPO versions
    assert Image.open(run_dir / "curves.png").size == (1000, 360)
    assert "Held-out pairs at step 60" in (run_dir / "train.log").read_text()  # the trainer's log is kept


def test_the_demo_shows_training_progress_and_no_library_notices(tmp_path, capfd):
    argv = ["--work_dir", str(tmp_path), "--n_pairs", "80", "--n_heldout", "16", "--max_train_steps", "30"]
    alignment_demo.main(alignment_demo.parse_args(argv + ["--n_samples", "4"]))
    out, err = capfd.readouterr()
    progress = [line for line in out.splitlines() if line.strip().startswith("Steps:")]
    # not a terminal: the bar as it left steps 0 and 25 (after their held-out evaluations), and at the end
    assert [line.split("|")[2].split()[0] for line in progress] == ["0/30", "25/30", "30/30"]
    assert all("eval_acc=" in line for line in progress)
    assert "seed 0 (" in out and "held-out implicit accuracy 0.500 -> " in out  # the summary
    assert "No LoRA keys" not in out + err  # diffusers' notice when the demo loads the trained LoRA
