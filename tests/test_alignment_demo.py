"""A shortened run of examples/alignment_demo.py: DPO on warm-over-cool pairs must move the model that way."""

import alignment_demo


def test_shortened_demo_moves_held_out_accuracy_and_samples_toward_the_preferred_kind(tmp_path):
    (result,) = alignment_demo.main(
        alignment_demo.parse_args(
            [
                "--work_dir",
                str(tmp_path),
                "--n_pairs",
                "160",
                "--n_heldout",
                "32",
                "--max_train_steps",
                "60",
                "--n_samples",
                "32",
            ]
        )
    )
    assert result["heldout_acc"][0] == 0.5 and result["heldout_acc"][1] > 0.8
    assert result["heldout_loss"][1] < result["heldout_loss"][0]
    assert result["warm_fraction"][1] > result["warm_fraction"][0] + 0.1
    assert result["plausible_fraction"][1] >= result["plausible_fraction"][0] - 0.1  # no collapse
    assert result["winner_error_ratio"] <= 1.5
    run_dir = tmp_path / result["run_dir"].split("/")[-1]
    assert (run_dir / "samples.png").exists() and (run_dir / "curves.png").exists()
