"""--soft_labels (docs/loss-and-learning-rates.md): each pair trained on its preference probability p, from label_0,
from vote counts (a Laplace prior) or from reward-model scores (sigmoid of their difference over a temperature);
ties kept as p = 0.5 pairs, and only with the flag. Reading p is shared (diffusion_dpo.data): tested on the SD 1.5
script, as is a short run that moves held-out accuracy toward the preferred images."""

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiny_assets
from testing_utils import N_PAIRS as N_DECIDED
from testing_utils import ROOT, cache_folders, parse_error, run_trainer

from diffusion_dpo import InputError
from diffusion_dpo.data import load_preference_pairs


N_PAIRS, N_TIES = 96, 4  # the alignment demo's kind of pairs (the warm shape preferred), then ties
STRENGTHS = (0.8, 0.9)  # p of row i's winner: STRENGTHS[i % 2]
VOTES = ((3, 0), (5, 1))  # (winner, loser) votes of row i: VOTES[i % 2]; ties 2:2
SCORE_MARGINS = (1.5, 2.0)  # winner's reward score minus the loser's
EXPECTED_P = {  # of row i's winner: STRENGTHS, (v1 + 1) / (v1 + v2 + 2), sigmoid(margin / 1)
    "pickapic": STRENGTHS,
    "votes": (4 / 5, 6 / 8),
    "scores": tuple(1 / (1 + math.exp(-margin)) for margin in SCORE_MARGINS),
}
SOURCE_FLAGS = {"pickapic": {}, "votes": {}, "scores": {"data_layout": "scores"}}


def graded_tables(table):
    """The pairs of a Pick-a-Pic table (label_0 1, 0 or 0.5) with graded preferences, as each source holds them:
    pickapic's label_0 is p of the first image, votes' counts, scores' the labeller's columns (label_0 stays hard)."""
    label = table.column("label_0").to_numpy()
    first_won, tie, strength = label == 1.0, label == 0.5, np.arange(len(label)) % 2

    def first_and_second(winner, loser, tied):
        winner, loser = np.where(tie, tied, winner), np.where(tie, tied, loser)
        return np.where(first_won, winner, loser), np.where(first_won, loser, winner)

    p_first, _ = first_and_second(np.take(STRENGTHS, strength), 1 - np.take(STRENGTHS, strength), 0.5)
    votes = first_and_second(*np.take(VOTES, strength, axis=0).T.astype(float), 2.0)
    scores = first_and_second(np.take(SCORE_MARGINS, strength), 0.0, 0.0)
    images = {"image1": table["jpg_0"], "image2": table["jpg_1"]}
    return {
        "pickapic": table.set_column(table.schema.get_field_index("label_0"), "label_0", pa.array(p_first)),
        "votes": pa.table({"prompt": table["caption"], **images, "votes_image1": votes[0], "votes_image2": votes[1]}),
        "scores": table.append_column("score_0", pa.array(scores[0])).append_column("score_1", pa.array(scores[1])),
    }


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """{source: dataset folder} and the rows' hard labels."""
    folder = tmp_path_factory.mktemp("graded")
    hard = tiny_assets.build_pickapic_dataset(str(folder / "hard"), n_pairs=N_PAIRS, n_ties=N_TIES, seed=1234)
    table = pq.read_table(next(Path(hard).glob("*.parquet")))
    for source, graded_table in graded_tables(table).items():
        (folder / source).mkdir()
        pq.write_table(graded_table, folder / source / "train.parquet")
    return {source: folder / source for source in SOURCE_FLAGS}, table.column("label_0").to_numpy()


def test_ties_become_pairs_only_with_soft_labels(dpo, cli_args):
    hard = load_preference_pairs(dpo.parse_args(cli_args()), "train")  # N_DECIDED decided, 2 ties, 1 corrupt image
    soft = load_preference_pairs(dpo.parse_args(cli_args(soft_labels=True)), "train")
    assert (len(hard), len(soft)) == (N_DECIDED + 1, N_DECIDED + 3) and hard.preference is None
    assert sorted(soft.preference.tolist()) == [0.5, 0.5, *[1.0] * (N_DECIDED + 1)]


@pytest.mark.parametrize("source", list(SOURCE_FLAGS))
def test_p_from_each_source_with_the_preferred_image_first(dpo, cli_args, graded, source):
    folders, labels = graded
    flags = dict(dataset_name=folders[source], **SOURCE_FLAGS[source])
    soft = load_preference_pairs(dpo.parse_args(cli_args(soft_labels=True, **flags)), "train")
    np.testing.assert_array_equal(soft.rows, np.arange(N_PAIRS + N_TIES))  # every pair, the ties too
    strength = np.arange(len(labels)) % 2
    expected = np.where(labels == 0.5, 0.5, np.take(EXPECTED_P[source], strength))
    np.testing.assert_allclose(soft.preference, expected, rtol=1e-6)
    np.testing.assert_array_equal(soft.second_is_winner, labels == 0.0)  # the winner first, a tie as it came
    if source != "pickapic":  # (whose graded labels are invalid without the flag) the same pairs as hard labels
        hard = load_preference_pairs(dpo.parse_args(cli_args(**flags)), "train")
        np.testing.assert_array_equal(hard.rows, np.flatnonzero(labels != 0.5))
        np.testing.assert_array_equal(soft.second_is_winner[hard.rows], hard.second_is_winner)


def test_the_temperature_scales_scores_and_the_scores_layout_is_never_chosen_automatically(dpo, cli_args, graded):
    labels, flags = graded[1], dict(dataset_name=graded[0]["scores"], soft_labels=True)
    assert load_preference_pairs(dpo.parse_args(cli_args(**flags)), "train").layout.name == "pickapic"
    args = dpo.parse_args(cli_args(data_layout="scores", soft_label_temperature=2, **flags))
    margins = np.where(labels == 0.5, 0.0, np.take(SCORE_MARGINS, np.arange(len(labels)) % 2))
    np.testing.assert_allclose(load_preference_pairs(args, "train").preference, 1 / (1 + np.exp(-margins / 2)))


@pytest.mark.parametrize(
    "flags",
    [{"label_smoothing": 0.1}, {"sft": True}, {"loss_type": "hinge"}, {"loss_type": "ipo"}, {"min_vote_margin": 2}],
)
def test_soft_labels_refuse_what_would_override_p_in_one_line(dpo, cli_args, capsys, flags):
    line = parse_error(dpo, cli_args(soft_labels=True, **flags), capsys)
    assert "--soft_labels weighs the sigmoid DPO loss by each pair's p" in line
    line = parse_error(dpo, cli_args(soft_labels=True, soft_label_temperature=0), capsys)
    assert "--soft_label_temperature must be a finite number above 0" in line


# On the demo's pretrained model (as the other losses' test in test_kohya_and_losses.py) 30 steps took held-out
# accuracy to 0.94 (votes), 0.94 (label_0) and 0.97 (scores), mean margin about 1 (hard labels: 1.0 and 13, loss 0.03
# against soft's 0.5: soft labels stop where sigmoid(margin) reaches p); p is read per source above, and the loss
# does not depend on the source, so one source is trained here: scores, the layout only soft labels need. On the tiny
# random models 20 steps reached only 0.625 where hard labels reached 0.875.
def test_soft_labels_train_toward_the_preferred_images(dpo, cli_args, graded):
    flags = dict(train_batch_size=8, max_train_steps=30, learning_rate=1e-3, soft_labels=True, data_layout="scores")
    flags.update(num_validation_pairs=32, validation_steps=30, validation_timesteps=4)
    demo_model = ROOT / "examples" / "assets" / "tiny-shapes-sd"
    run = cli_args(pretrained_model_name_or_path=demo_model, dataset_name=graded[0]["scores"], **flags)
    before, *_, after = run_trainer(dpo, run)["evaluations"]
    assert before["eval/implicit_acc"] == 0.5 and before["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert after["eval/implicit_acc"] > 0.75 and after["eval/reward_margin"] > 0 and after["eval/loss"] < math.log(2)


def test_another_temperature_reuses_the_latents_and_a_resume_refuses_it(dpo, cli_args, graded, tmp_path):
    """p is not in the latent cache (a temperature sweep encodes the images once) but in the checkpoint's record of
    the training pairs: a resume that changed p is refused."""
    flags = dict(dataset_name=graded[0]["scores"], data_layout="scores", soft_labels=True, checkpointing_steps=1)
    run_trainer(dpo, cli_args(max_train_steps=1, **flags))
    caches = cache_folders(tmp_path / "cache")
    with pytest.raises(InputError, match="training pairs"):
        run_trainer(dpo, cli_args(resume_from_checkpoint="latest", soft_label_temperature=3, **flags))
    assert cache_folders(tmp_path / "cache") == caches
