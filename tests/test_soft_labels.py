"""--soft_labels (docs/loss-and-learning-rates.md): each pair trained on its preference probability p, from label_0,
from vote counts (a Laplace prior) or from reward-model scores (sigmoid of their difference over a temperature);
ties kept as p = 0.5 pairs, and only with the flag. Reading p is shared (diffusion_dpo.data): tested on the SD 1.5
script, as is a short run from each source that moves held-out accuracy toward the preferred images."""

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiny_assets
from test_data_layouts import LEARNS_THE_PREFERENCE, stored_winners_are_warm
from testing_utils import N_PAIRS as N_DECIDED
from testing_utils import cache_folders, parse_error, run_trainer

from diffusion_dpo import InputError
from diffusion_dpo.data import load_preference_pairs


N_PAIRS, N_TIES = 24, 2
STRENGTHS = (0.8, 0.9)  # p of the warm image, alternating; then N_TIES ties (p = 0.5)
VOTES = ((3, 0), (5, 1))  # (warm, cool) votes: p = 4/5 and 6/8 with one vote more each
SCORE_MARGINS = (1.5, 2.0)  # warm minus cool reward score: p = sigmoid(margin / tau)


def soft_dataset(folder, source):
    """N_PAIRS warm-preferred pairs, the warm image on either side, then N_TIES ties, their preference held as
    `source` holds it: pickapic (label_0 = p of the first image), votes, or scores (the reward-model labeller's
    columns: label_0 hard, score_0 and score_1)."""
    rows = []
    for index, pair in enumerate(tiny_assets.warm_preference_pairs(N_PAIRS + N_TIES, flat=True)):
        strength = None if index >= N_PAIRS else index % 2
        p, votes, margin = (
            (0.5, (2, 2), 0.0) if strength is None else (STRENGTHS[strength], VOTES[strength], SCORE_MARGINS[strength])
        )
        sides = [(pair["warm"], p, votes[0], margin), (pair["cool"], 1 - p, votes[1], 0.0)]
        (image_0, p_0, votes_0, score_0), (image_1, _, votes_1, score_1) = sides if pair["warm_first"] else sides[::-1]
        if source == "votes":
            rows.append(dict(prompt=pair["caption"], image1=image_0, image2=image_1))
            rows[-1].update(votes_image1=float(votes_0), votes_image2=float(votes_1))
            continue
        rows.append(dict(caption=pair["caption"], jpg_0=image_0, jpg_1=image_1, label_0=p_0))
        if source == "scores":
            rows[-1].update(label_0=np.sign(score_0 - score_1) / 2 + 0.5, score_0=score_0, score_1=score_1)
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), folder / "train.parquet")
    return folder


@pytest.fixture(scope="module")
def soft_datasets(tmp_path_factory):
    folder = tmp_path_factory.mktemp("soft")
    return {source: soft_dataset(folder / source, source) for source in ("pickapic", "votes", "scores")}


SOURCE_FLAGS = {"pickapic": {}, "votes": {}, "scores": {"data_layout": "scores"}}
EXPECTED_P = {  # of the warm (stored first) image, pair by pair
    "pickapic": STRENGTHS,
    "votes": (4 / 5, 6 / 8),
    "scores": tuple(1 / (1 + math.exp(-margin)) for margin in SCORE_MARGINS),
}


def test_ties_become_pairs_only_with_soft_labels(dpo, cli_args):
    hard = load_preference_pairs(dpo.parse_args(cli_args()), "train")  # N_PAIRS decided, 2 ties, 1 corrupt image
    soft = load_preference_pairs(dpo.parse_args(cli_args(soft_labels=True)), "train")
    assert (len(hard), len(soft)) == (N_DECIDED + 1, N_DECIDED + 3) and hard.preference is None
    assert sorted(soft.preference.tolist()) == [0.5, 0.5, *[1.0] * (N_DECIDED + 1)]


@pytest.mark.parametrize("source", list(SOURCE_FLAGS))
def test_p_from_each_source_with_the_preferred_image_first(dpo, cli_args, soft_datasets, source):
    flags = dict(dataset_name=soft_datasets[source], **SOURCE_FLAGS[source])
    args = dpo.parse_args(cli_args(soft_labels=True, **flags))
    soft = load_preference_pairs(args, "train")
    expected = [*(EXPECTED_P[source][i % 2] for i in range(N_PAIRS)), *[0.5] * N_TIES]
    np.testing.assert_allclose(soft.preference, expected, rtol=1e-6)
    assert all(stored_winners_are_warm(args, soft.subset(np.arange(N_PAIRS))))
    if source != "pickapic":  # (whose fractional labels are invalid without the flag) the same order as hard labels
        hard = load_preference_pairs(dpo.parse_args(cli_args(**flags)), "train")
        np.testing.assert_array_equal(soft.second_is_winner[:N_PAIRS], hard.second_is_winner)


def test_the_scores_temperature_changes_p_and_the_scores_layout_is_never_chosen_automatically(
    dpo, cli_args, soft_datasets
):
    flags = dict(dataset_name=soft_datasets["scores"], soft_labels=True)
    assert load_preference_pairs(dpo.parse_args(cli_args(**flags)), "train").layout.name == "pickapic"
    args = dpo.parse_args(cli_args(data_layout="scores", soft_label_temperature=2, **flags))
    expected = [1 / (1 + math.exp(-SCORE_MARGINS[i % 2] / 2)) for i in range(N_PAIRS)]
    np.testing.assert_allclose(load_preference_pairs(args, "train").preference[:N_PAIRS], expected, rtol=1e-6)


@pytest.mark.parametrize(
    "flags",
    [
        {"label_smoothing": 0.1},
        {"sft": True},
        {"loss_type": "hinge"},
        {"loss_type": "ipo"},
        {"loss_type": "mapo"},
        {"min_vote_margin": 2},
    ],
)
def test_soft_labels_refuse_what_would_override_p_in_one_line(dpo, cli_args, capsys, flags):
    assert "--soft_labels weighs the sigmoid DPO loss by each pair's p" in parse_error(
        dpo, cli_args(soft_labels=True, **flags), capsys
    )


def test_a_non_positive_temperature_is_refused(dpo, cli_args, capsys):
    line = parse_error(dpo, cli_args(soft_labels=True, soft_label_temperature=0), capsys)
    assert "--soft_label_temperature must be a finite number above 0" in line


@pytest.mark.parametrize("source", list(SOURCE_FLAGS))
def test_soft_labels_from_each_source_train_toward_the_preferred_images(dpo, cli_args, soft_datasets, source):
    flags = {**LEARNS_THE_PREFERENCE, **SOURCE_FLAGS[source], "soft_labels": True}
    before, *_, after = run_trainer(dpo, cli_args(dataset_name=soft_datasets[source], **flags))["evaluations"]
    assert before["eval/implicit_acc"] == 0.5 and before["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert after["eval/implicit_acc"] > 0.5 and after["eval/reward_margin"] > 0


def test_another_temperature_reuses_the_latents_and_a_resume_refuses_it(dpo, cli_args, soft_datasets, tmp_path):
    """p is not in the latent cache (a temperature sweep encodes the images once) but in the checkpoint's record of
    the training pairs: a resume that changed p is refused."""
    flags = dict(dataset_name=soft_datasets["scores"], data_layout="scores", soft_labels=True, checkpointing_steps=1)
    run_trainer(dpo, cli_args(max_train_steps=1, **flags))
    caches = cache_folders(tmp_path / "cache")
    with pytest.raises(InputError, match="training pairs"):
        run_trainer(dpo, cli_args(resume_from_checkpoint="latest", soft_label_temperature=3, **flags))
    assert cache_folders(tmp_path / "cache") == caches
