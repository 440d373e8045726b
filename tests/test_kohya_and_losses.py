"""Kohya-format LoRA files (--output_kohya_format, examples/convert_lora_to_kohya.py) and the preference losses beside
DPO (--label_smoothing, --loss_type mapo) in real runs. The formulas themselves are checked in test_dpo_loss.py."""

import convert_lora_to_kohya
import pytest
import tiny_assets
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file
from testing_utils import ROOT, pipeline_class, run_trainer, unet_output

import train_diffusion_dpo_sdxl


pytestmark = pytest.mark.both_trainers

REFERENCE_METRICS = ("eval/implicit_acc", "eval/reward_margin", "eval/ref_mse_w", "eval/ref_mse_l")


@pytest.fixture
def adapter_switches(monkeypatch):
    """Counts every time a LoRA adapter is switched off (the LoRA reference model), wherever it happens."""
    calls = []
    disable = UNet2DConditionModel.disable_adapters

    def counting_disable(self):
        calls.append(1)
        return disable(self)

    monkeypatch.setattr(UNet2DConditionModel, "disable_adapters", counting_disable)
    return calls


def unet_with_lora(dpo, model, folder, weight_name):
    pipeline = pipeline_class(dpo).from_pretrained(model)
    pipeline.load_lora_weights(str(folder), weight_name=weight_name)
    return unet_output(pipeline.unet)


def test_mapo_lora_never_switches_the_adapter_off_and_its_kohya_file_loads_like_the_diffusers_one(
    dpo, cli_args, tiny_pipeline, tmp_path, adapter_switches
):
    result = run_trainer(
        dpo,
        cli_args(
            loss_type="mapo",
            output_kohya_format=True,
            learning_rate=1e-2,
            max_train_steps=2,
            checkpointing_steps=2,
            num_validation_pairs=4,
            validation_timesteps=2,
        ),
    )
    assert adapter_switches == []  # reference-free: no adapter-off pass in training, evaluation or saving
    assert "policy_acc" in result["history"][0] and "ref_mse_w" not in result["history"][0]
    for evaluation in result["evaluations"]:
        assert {"eval/loss", "eval/policy_acc", "eval/policy_margin", "eval/model_mse_w"} <= evaluation.keys()
        assert not evaluation.keys() & set(REFERENCE_METRICS)  # no reference errors were computed

    out = tmp_path / "out"
    base = unet_output(pipeline_class(dpo).from_pretrained(tiny_pipeline).unet)
    for folder in (out, out / "checkpoint-2"):
        kohya = load_file(folder / dpo.KOHYA_WEIGHT_NAME)
        assert kohya and all(key.startswith("lora_unet_") for key in kohya)
        assert {key.rsplit(".", 1)[-1] for key in kohya} == {"weight", "alpha"}
        if dpo is train_diffusion_dpo_sdxl:  # kohya's SDXL names: the SGM UNet's blocks
            assert not any("down_blocks" in key or "up_blocks" in key for key in kohya)
            assert any(key.startswith("lora_unet_input_blocks_") for key in kohya)
        diffusers_format = unet_with_lora(dpo, tiny_pipeline, folder, dpo.LORA_WEIGHT_NAME)
        kohya_format = unet_with_lora(dpo, tiny_pipeline, folder, dpo.KOHYA_WEIGHT_NAME)
        torch.testing.assert_close(kohya_format, diffusers_format, atol=1e-6, rtol=1e-5)
        assert (diffusers_format - base).abs().max() > 1e-4  # the MaPO LoRA changed the UNet

    card = (out / "README.md").read_text()
    for expected in ("MaPO", "β_mapo = 0.1", dpo.KOHYA_WEIGHT_NAME, "LoraLoader", "models/Lora", "<lora:"):
        assert expected in card, expected

    # the standalone converter writes the same file for a finished run and for a checkpoint (base model: the card)
    for folder in (out, out / "checkpoint-2"):
        written = load_file(folder / dpo.KOHYA_WEIGHT_NAME)
        (folder / dpo.KOHYA_WEIGHT_NAME).unlink()
        convert_lora_to_kohya.main([str(folder)])
        converted = load_file(folder / dpo.KOHYA_WEIGHT_NAME)
        assert converted.keys() == written.keys()
        assert all(torch.equal(converted[key], written[key]) for key in written)


def test_mapo_full_fine_tuning_loads_no_frozen_copy(dpo, cli_args, tmp_path, monkeypatch):
    loaded = []
    load_unet = dpo.load_unet
    monkeypatch.setattr(dpo, "load_unet", lambda *args, **kwargs: loaded.append(1) or load_unet(*args, **kwargs))
    result = run_trainer(
        dpo,
        cli_args(
            loss_type="mapo",
            train_mode="full",
            learning_rate=1e-3,
            max_train_steps=2,
            num_validation_pairs=4,
            validation_timesteps=2,
            run_validation=True,
            validation_steps=2,
            validation_prompts="a shape",
            num_validation_inference_steps=1,
        ),
    )
    assert len(loaded) == 1  # the trained UNet only, even with held-out pairs to evaluate
    assert result["global_step"] == 2 and "eval/policy_acc" in result["evaluations"][-1]
    # no untuned-model grid: there is no reference to render it with
    assert sorted(p.name for p in (tmp_path / "out" / "validation").iterdir()) == ["step-000002.png"]


def test_label_smoothing_moves_held_out_accuracy_above_chance_on_the_alignment_pairs(dpo, cli_args, adapter_switches):
    # the dataset's preferred image is always the warm one: a short run must learn to prefer it on held-out pairs.
    # (MaPO's policy_acc is absolute, not relative to a reference: on the tiny models a short run does not reliably
    # lift it above 0.5, see docs/loss-and-learning-rates.md, so MaPO has no such test.)
    result = run_trainer(
        dpo,
        cli_args(
            label_smoothing=0.1,
            learning_rate=1e-2,
            max_train_steps=4,
            validation_steps=4,
            num_validation_pairs=4,
            validation_timesteps=3,
        ),
    )
    start, end = result["evaluations"][0], result["evaluations"][-1]
    assert start["eval/implicit_acc"] == 0.5 and end["step"] == 4 and end["eval/implicit_acc"] > 0.5, end
    # DPO's reference passes switch the adapter off and the counter sees them: MaPO's zero above is no blind spot
    assert adapter_switches


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"label_smoothing": 0.5}, "--label_smoothing must lie in [0, 0.5)"),
        ({"label_smoothing": -0.1}, "--label_smoothing must lie in [0, 0.5)"),
        ({"label_smoothing": "nan"}, "--label_smoothing must lie in [0, 0.5)"),
        ({"label_smoothing": 0.1, "loss_type": "hinge"}, "needs --loss_type sigmoid"),
        ({"beta_mapo": 0, "loss_type": "mapo"}, "--beta_mapo must be a positive finite number"),
        ({"loss_type": "mapo", "sft": True}, "choose one of --sft and --loss_type mapo"),
        ({"output_kohya_format": True, "train_mode": "full"}, "needs --train_mode lora"),
    ],
)
def test_bad_loss_and_kohya_flags_are_refused(dpo, cli_args, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        dpo.parse_args(cli_args(**flags))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.fixture(scope="module")
def demo_pairs(tmp_path_factory):
    """The alignment demo's kind of pairs: the warm shape always preferred."""
    folder = tmp_path_factory.mktemp("demo-pairs")
    return tiny_assets.build_pickapic_dataset(str(folder), n_pairs=96, n_ties=0, seed=1234)


@pytest.mark.parametrize("dpo", ["sd15"], indirect=True)  # the demo's pretrained model is an SD 1.x pipeline
@pytest.mark.parametrize("flags", [{"loss_type": "mapo"}, {"label_smoothing": 0.1}], ids=["mapo", "label_smoothing"])
def test_each_new_loss_moves_the_demo_model_toward_the_preferred_images(dpo, cli_args, demo_pairs, flags):
    result = run_trainer(
        dpo,
        cli_args(
            pretrained_model_name_or_path=ROOT / "examples" / "assets" / "tiny-shapes-sd",
            dataset_name=demo_pairs,
            train_batch_size=8,
            max_train_steps=30,
            learning_rate=1e-3,
            num_validation_pairs=32,
            validation_steps=30,
            validation_timesteps=4,
            **flags,
        ),
    )
    # MaPO has no reference: its accuracy is the policy's own, which starts wherever the base model stands
    metric = "eval/policy_acc" if flags.get("loss_type") == "mapo" else "eval/implicit_acc"
    start, end = (evaluation[metric] for evaluation in (result["evaluations"][0], result["evaluations"][-1]))
    assert end > 0.5 and end > start
