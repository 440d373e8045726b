"""examples/evaluate_dpo.py: base and tuned images from the same seeds, scored, with win rates, grids and reruns; and
the implicit-reward accuracy of a run, which must equal its trainer's own held-out numbers, on every script."""

import importlib.util
import json

import datasets
import evaluate_dpo
import numpy as np
import pytest
import tiny_assets
from PIL import Image, ImageDraw, ImageFont
from testing_utils import RESOLUTION, SD3_SEQUENCE_LENGTH, TRAINERS, cache_folders, run_trainer

from diffusion_dpo import InputError


PROMPTS = list(tiny_assets.CAPTION_POOL)  # 6 prompts the tiny tokenizer knows


def evaluate(argv):
    return evaluate_dpo.main(evaluate_dpo.parse_args(argv))


@pytest.fixture
def eval_args(tiny_pipeline, tiny_clip_scorer, tmp_path):
    """Returns a function building an evaluation command line on the tiny assets (the trainer under test's model)."""
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n\n")  # a trailing blank line is skipped

    def build(tuned, output_dir, *extra):
        return [
            "--base_model",
            tiny_pipeline,
            "--tuned",
            str(tuned),
            "--prompts_file",
            str(prompts_file),
            "--num_inference_steps",
            "3",
            "--resolution",
            str(RESOLUTION),
            "--batch_size",
            "4",
            "--pickscore_model",
            tiny_clip_scorer,
            "--pickscore_processor",
            tiny_clip_scorer,
            "--output_dir",
            str(output_dir),
            "--num_grid_prompts",
            "3",
            *extra,
        ]

    return build


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_lora_evaluation_end_to_end_and_rerun_gives_the_same_base_images(dpo, cli_args, eval_args, tmp_path):
    run_trainer(dpo, cli_args(learning_rate=0.1, max_train_steps=3))  # a deliberately large step: the LoRA must show
    results = evaluate(eval_args(tmp_path / "out", tmp_path / "eval"))

    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert saved["tuned_kind"] == "lora" and saved["num_prompts"] == len(PROMPTS)
    pickscore = saved["scorers"]["pickscore"]
    assert np.isfinite(pickscore["base_mean"]) and np.isfinite(pickscore["tuned_mean"])
    assert 0 <= pickscore["ci_low"] <= pickscore["win_rate"] <= pickscore["ci_high"] <= 1
    assert pickscore["wins"] + pickscore["ties"] + pickscore["losses"] == pickscore["n"] == len(PROMPTS)
    per_prompt = saved["per_prompt"]
    assert [row["prompt"] for row in per_prompt] == PROMPTS
    base_mean = np.mean([row["scores"]["pickscore"]["base"] for row in per_prompt])
    assert base_mean == pytest.approx(pickscore["base_mean"])
    assert saved == json.loads(json.dumps(results))

    images = tmp_path / "eval" / "images"
    for model in ("base", "tuned"):
        assert sorted(p.name for p in (images / model).iterdir()) == [f"{i:04d}.png" for i in range(len(PROMPTS))]
        assert Image.open(images / model / "0000.png").size == (RESOLUTION, RESOLUTION)
    # same seeds, different weights: the LoRA changed what was drawn
    assert any((pixels(images / "base" / p.name) != pixels(p)).any() for p in (images / "tuned").iterdir())
    for grid in ("biggest_wins.png", "biggest_losses.png"):
        assert Image.open(tmp_path / "eval" / grid).size[0] == 2 * evaluate_dpo.GRID_CELL

    evaluate(eval_args(tmp_path / "out", tmp_path / "rerun"))
    for i in range(len(PROMPTS)):
        np.testing.assert_array_equal(
            pixels(images / "base" / f"{i:04d}.png"), pixels(tmp_path / "rerun" / "images" / "base" / f"{i:04d}.png")
        )


@pytest.mark.every_script
def test_full_fine_tune_as_a_pipeline_folder_or_a_checkpoint_with_prompts_from_a_dataset(
    dpo, cli_args, eval_args, pickapic_data, tmp_path
):
    """A checkpoint holds the trained UNet or transformer alone: it replaces the base pipeline's own."""
    run_trainer(dpo, cli_args(train_mode="full", learning_rate=1e-2, max_train_steps=2, checkpointing_steps=2))
    captions = datasets.load_dataset(pickapic_data, split="train")["caption"]
    tuned_images = {}
    for tuned, kind in (("out", "pipeline"), ("out/checkpoint-2", dpo.FAMILY.denoiser)):
        argv = eval_args(tmp_path / tuned, tmp_path / f"eval-{kind}")
        at = argv.index("--prompts_file")
        argv[at : at + 2] = ["--prompts_dataset", pickapic_data, "--num_prompts", "2"]  # default column and split
        results = evaluate(argv)
        assert results["tuned_kind"] == kind and results["num_prompts"] == 2
        assert [row["prompt"] for row in results["per_prompt"]] == captions[:2]
        tuned_images[kind] = [pixels(row["tuned_image"]) for row in results["per_prompt"]]
    # the final pipeline and the step-2 checkpoint hold the same weights: the same process draws the same images
    for pipeline_image, checkpoint_image in zip(tuned_images["pipeline"], tuned_images[dpo.FAMILY.denoiser]):
        np.testing.assert_array_equal(pipeline_image, checkpoint_image)


def test_all_wins_give_a_win_rate_of_one_with_a_one_sided_interval():
    all_wins = evaluate_dpo.win_rate_with_ci([0.0] * 20, [1.0] * 20)
    assert all_wins["win_rate"] == 1 and all_wins["ci_high"] == 1 and all_wins["ci_low"] > 0.5
    assert all_wins["wins"] == 20 and all_wins["ties"] == all_wins["losses"] == 0


def test_a_tie_counts_half_a_win():
    # 2 wins, 2 ties, 1 loss: (2 + 2 / 2) / 5
    mixed = evaluate_dpo.win_rate_with_ci([0, 0, 1, 1, 1], [1, 1, 1, 1, 0])
    assert mixed["win_rate"] == pytest.approx(0.6) and (mixed["wins"], mixed["ties"], mixed["losses"]) == (2, 2, 1)
    assert mixed["ci_low"] < 0.6 < mixed["ci_high"]


def test_the_interval_of_a_rate_of_one_half_is_symmetric_and_narrows_with_more_prompts():
    all_ties = evaluate_dpo.win_rate_with_ci([3.0] * 10, [3.0] * 10)
    assert all_ties["win_rate"] == 0.5 and all_ties["ci_low"] < 0.5 < all_ties["ci_high"]
    assert all_ties["ci_low"] == pytest.approx(1 - all_ties["ci_high"])  # Wilson's interval around 1/2
    many_ties = evaluate_dpo.win_rate_with_ci([3.0] * 1000, [3.0] * 1000)
    assert many_ties["ci_high"] - many_ties["ci_low"] < all_ties["ci_high"] - all_ties["ci_low"]


def ink(image):
    """The dark pixels of an image, cropped to their bounding box."""
    dark = np.asarray(image.convert("L")) < 128
    rows, cols = np.nonzero(dark)
    return dark[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]


def test_a_grid_with_no_rows_says_none_under_its_title():
    grid = evaluate_dpo.comparison_grid([], "pickscore", "Biggest wins of the tuned model")
    assert grid.size[0] == 2 * evaluate_dpo.GRID_CELL
    word = Image.new("RGB", (200, 40), "white")
    ImageDraw.Draw(word).text((0, 0), "none", fill="black", font=ImageFont.load_default(size=15))
    below_title = grid.crop((0, 30, grid.width, grid.height))
    np.testing.assert_array_equal(ink(below_title), ink(word))  # the word "none", and nothing else


@pytest.mark.parametrize(
    "case,message",
    [
        ("empty_tuned", "holds neither pytorch_lora_weights.safetensors (LoRA) nor model_index.json"),
        ("missing_tuned", "no such folder"),
        ("unknown_scorer", "--scorers: unknown ['pickscor']"),
        ("resolution", "--resolution must be a positive multiple of 8"),
        ("missing_package", "--scorers hpsv2 needs `pip install hpsv2`"),
        ("num_prompts", "--num_prompts must be at least 1"),
        ("earlier_evaluation", "already holds an evaluation; choose a new --output_dir"),
        ("trainer_flag", "unrecognized arguments: --no_t5"),
    ],
)
def test_bad_flags_fail_in_one_line_before_anything_loads(eval_args, tmp_path, capsys, case, message):
    (tmp_path / "empty").mkdir()
    tuned = tmp_path / ("missing" if case == "missing_tuned" else "empty")
    if case == "missing_package" and importlib.util.find_spec("hpsv2") is not None:
        pytest.skip("hpsv2 is installed here")
    extra = {
        "unknown_scorer": ["--scorers", "pickscore,pickscor"],
        "resolution": ["--resolution", "30"],
        "missing_package": ["--scorers", "pickscore,hpsv2"],
        "num_prompts": ["--num_prompts", "0"],
        "trainer_flag": ["--no_t5"],  # a trainer's flag: for --mode implicit_accuracy only
    }.get(case, [])
    if case == "earlier_evaluation":
        (tmp_path / "eval").mkdir()
        (tmp_path / "eval" / "results.json").write_text("{}")
    if case not in ("empty_tuned", "missing_tuned"):
        (tmp_path / "empty" / "pytorch_lora_weights.safetensors").touch()  # a LoRA folder, as far as detection goes
    with pytest.raises(SystemExit) as exit_info:
        evaluate_dpo.parse_args(eval_args(tuned, tmp_path / "eval", *extra))
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert message in line


@pytest.mark.parametrize(
    "source,message",
    [
        ("blank_file", "no prompts in"),
        ("wrong_column", "has no column 'prompt' (it has ['caption', 'jpg_0', 'jpg_1', 'label_0']); name it with"),
        ("wrong_split", "split 'validation_unique': "),
    ],
)
def test_unusable_prompts_are_one_clear_error_before_any_model_loads(
    eval_args, pickapic_data, tmp_path, source, message
):
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "pytorch_lora_weights.safetensors").touch()  # not a loadable LoRA: nothing may load it
    (tmp_path / "blank.txt").write_text("\n  \n")
    argv = eval_args(tmp_path / "lora", tmp_path / "eval")
    at = argv.index("--prompts_file")
    argv[at : at + 2] = {
        "blank_file": ["--prompts_file", str(tmp_path / "blank.txt")],
        "wrong_column": ["--prompts_dataset", pickapic_data, "--prompts_column", "prompt"],
        "wrong_split": ["--prompts_dataset", pickapic_data, "--prompts_split", "validation_unique"],
    }[source]
    with pytest.raises(InputError) as error:
        evaluate(argv)
    assert message in str(error.value)
    assert not (tmp_path / "eval").exists()  # nothing was generated


def implicit_accuracy_args(base_model, tuned, dataset, output_dir, *extra):
    return [
        *("--mode", "implicit_accuracy", "--base_model", str(base_model), "--tuned", str(tuned)),
        *("--preference_dataset", dataset, "--preference_split", "train", "--num_pairs", "4"),
        *("--validation_timesteps", "3", "--resolution", str(RESOLUTION), "--output_dir", str(output_dir), *extra),
    ]


@pytest.mark.parametrize(
    "dpo, train_mode",
    [("sd15", "lora"), ("sdxl", "lora"), ("sd3", "lora"), ("sd15", "full"), ("sd3", "full")],
    indirect=["dpo"],
)  # every script; a full fine-tune's UNet and transformer (SDXL's loads as SD 1.5's)
def test_implicit_accuracy_mode_reproduces_the_trainers_held_out_numbers(
    dpo, cli_args, tiny_pipeline, pickapic_data, tmp_path, train_mode
):
    """The trainer holds out 4 pairs of the train split (seeded) and evaluates them at the end; the evaluation
    script, pointed at the same 4 pairs of that split with the same seed, picks that trainer by the model's family
    and must report the same numbers (the trainer's flags it does not know, SD3's T5 length here, passed on)."""
    trained = run_trainer(
        dpo,
        cli_args(
            train_mode=train_mode,
            num_validation_pairs=4,
            learning_rate=1e-2,
            max_train_steps=2,
            validation_timesteps=3,
        ),
    )
    trainer_flags = ["--max_sequence_length", str(SD3_SEQUENCE_LENGTH)] if dpo is TRAINERS["sd3"] else []
    results = evaluate(
        implicit_accuracy_args(tiny_pipeline, tmp_path / "out", pickapic_data, tmp_path / "eval", *trainer_flags)
    )
    expected = trained["evaluations"][-1]
    (held_out_cache,) = cache_folders(tmp_path / "cache", n_pairs=4)
    assert results["num_pairs"] == 4 - np.load(held_out_cache / "undecodable.npy").sum()  # its decodable pairs
    for name in ("implicit_acc", "reward_margin", "loss", "model_mse_w", "model_mse_l", "ref_mse_w", "ref_mse_l"):
        assert results[name] == pytest.approx(expected[f"eval/{name}"], rel=1e-4, abs=1e-6), name
    assert expected["eval/reward_margin"] != 0  # the tuned model is not the reference: the numbers say something
    assert (
        json.loads((tmp_path / "eval" / "implicit_accuracy.json").read_text())["implicit_acc"]
        == results["implicit_acc"]
    )


def test_a_model_no_trainer_script_trains_is_refused_in_one_line(pickapic_data, tmp_path):
    other = tmp_path / "other-model"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}))
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "pytorch_lora_weights.safetensors").touch()  # not a loadable LoRA: nothing may load it
    with pytest.raises(InputError, match="is a PixArtAlphaPipeline; the trainer scripts train "):
        evaluate(implicit_accuracy_args(other, tmp_path / "lora", pickapic_data, tmp_path / "eval"))
    assert not (tmp_path / "eval").exists()
