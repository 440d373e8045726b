"""MaPO in real runs of every script (reference-free: no adapter switched off, no frozen copy loaded), kohya-format
LoRA files where a script offers them (SD 1.x/2.x, SDXL: --output_kohya_format and examples/convert_lora_to_kohya.py)
and their refusal where it does not (SD3), and label smoothing in a real run. The formulas themselves are checked in
test_dpo_loss.py."""

import errno
import logging
from pathlib import Path

import convert_lora_to_kohya
import pytest
import tiny_assets
import torch
from diffusers import ModelMixin, UNet2DConditionModel
from diffusers.loaders.peft import PeftAdapterMixin
from peft import LoraConfig
from safetensors.torch import load_file
from testing_utils import ROOT, denoiser, denoiser_output, parse_error, pipeline_class, run_trainer

import diffusion_dpo.outputs
import train_diffusion_dpo
import train_diffusion_dpo_sdxl
from diffusion_dpo.outputs import KOHYA_WEIGHT_NAME, LORA_WEIGHT_NAME, save_lora


REFERENCE_METRICS = ("eval/implicit_acc", "eval/reward_margin", "eval/ref_mse_w", "eval/ref_mse_l")


@pytest.fixture
def adapter_switches(monkeypatch):
    """Counts every time a LoRA adapter is switched off (the LoRA reference model), wherever it happens."""
    calls = []
    disable = PeftAdapterMixin.disable_adapters
    monkeypatch.setattr(PeftAdapterMixin, "disable_adapters", lambda self: calls.append(1) or disable(self))
    return calls


@pytest.fixture
def denoiser_loads(monkeypatch):
    """Counts every UNet or transformer loaded from a model folder (a trained model, or a frozen copy of it)."""
    loads = []
    from_pretrained = ModelMixin.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        if kwargs.get("subfolder") in ("unet", "transformer"):
            loads.append(cls.__name__)
        return from_pretrained(cls, *args, **kwargs)

    monkeypatch.setattr(ModelMixin, "from_pretrained", classmethod(counting))
    return loads


def output_with_lora(dpo, model, folder, weight_name):
    """The denoiser's output after loading the LoRA file `weight_name` of `folder` into the base pipeline."""
    pipeline = pipeline_class(dpo).from_pretrained(model)
    pipeline.load_lora_weights(str(folder), weight_name=weight_name)
    return denoiser_output(denoiser(pipeline))


@pytest.mark.every_script
def test_mapo_lora_never_switches_the_adapter_off_and_its_kohya_file_loads_like_the_diffusers_one(
    dpo, cli_args, tiny_pipeline, tmp_path, adapter_switches
):
    """Where the script offers no kohya format (SD3), the converter refuses the LoRA in one line."""
    kohya = dpo.FAMILY.kohya_lora is not None
    result = run_trainer(
        dpo,
        cli_args(
            loss_type="mapo",
            output_kohya_format=kohya,
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
    base = denoiser_output(denoiser(pipeline_class(dpo).from_pretrained(tiny_pipeline)))
    for folder in (out, out / "checkpoint-2"):
        diffusers_format = output_with_lora(dpo, tiny_pipeline, folder, LORA_WEIGHT_NAME)
        assert (diffusers_format - base).abs().max() > 1e-4  # the MaPO LoRA changed the model
        if kohya:
            weights = load_file(folder / KOHYA_WEIGHT_NAME)
            assert weights and all(key.startswith("lora_unet_") for key in weights)
            assert {key.rsplit(".", 1)[-1] for key in weights} == {"weight", "alpha"}
            if dpo is train_diffusion_dpo_sdxl:  # kohya's SDXL names: the SGM UNet's blocks
                assert not any("down_blocks" in key or "up_blocks" in key for key in weights)
                assert any(key.startswith("lora_unet_input_blocks_") for key in weights)
            kohya_format = output_with_lora(dpo, tiny_pipeline, folder, KOHYA_WEIGHT_NAME)
            torch.testing.assert_close(kohya_format, diffusers_format, atol=1e-6, rtol=1e-5)

    card = (out / "README.md").read_text()
    kohya_notes = (KOHYA_WEIGHT_NAME, "LoraLoader", "models/Lora", "<lora:") if kohya else ("ComfyUI loads",)
    for expected in ("MaPO", "β_mapo = 0.1", *kohya_notes):
        assert expected in card, expected

    if not kohya:
        with pytest.raises(SystemExit) as exit_info:
            convert_lora_to_kohya.main([str(out)])
        assert "LoRA, which has no kohya format" in str(exit_info.value) and "\n" not in str(exit_info.value)
        assert not (out / KOHYA_WEIGHT_NAME).exists()
        return
    # the standalone converter writes the same file for a finished run and for a checkpoint (base model: the card)
    for folder in (out, out / "checkpoint-2"):
        written = load_file(folder / KOHYA_WEIGHT_NAME)
        (folder / KOHYA_WEIGHT_NAME).unlink()
        convert_lora_to_kohya.main([str(folder)])
        converted = load_file(folder / KOHYA_WEIGHT_NAME)
        assert converted.keys() == written.keys()
        assert all(torch.equal(converted[key], written[key]) for key in written)


@pytest.mark.every_script
def test_mapo_full_fine_tuning_loads_no_frozen_copy_and_changes_the_model(
    dpo, cli_args, tiny_pipeline, tmp_path, denoiser_loads, caplog
):
    caplog.set_level(logging.INFO)
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
    assert len(denoiser_loads) == 1  # the trained model only, even with held-out pairs to evaluate
    (summary,) = [line for line in caplog.text.splitlines() if "learning rate = " in line]
    assert summary.endswith(", beta_mapo = 0.1") and "beta =" not in summary  # --beta_dpo plays no part in MaPO
    assert result["global_step"] == 2 and "eval/policy_acc" in result["evaluations"][-1]
    # no untuned-model grid: there is no reference to render it with
    assert sorted(p.name for p in (tmp_path / "out" / "validation").iterdir()) == ["step-000002.png"]
    base, tuned = (denoiser(pipeline_class(dpo).from_pretrained(model)) for model in (tiny_pipeline, tmp_path / "out"))
    assert (denoiser_output(tuned) - denoiser_output(base)).abs().max() > 1e-4


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"label_smoothing": 0.5}, "--label_smoothing must lie in [0, 0.5)"),
        ({"label_smoothing": -0.1}, "--label_smoothing must lie in [0, 0.5)"),
        ({"label_smoothing": "nan"}, "--label_smoothing must lie in [0, 0.5)"),
        ({"label_smoothing": 0.1, "loss_type": "hinge"}, "needs --loss_type sigmoid"),
        ({"beta_mapo": 0, "loss_type": "mapo"}, "--beta_mapo must be a finite number above 0"),
        ({"beta_mapo": 0.2}, "--beta_mapo weighs MaPO's margin term: it needs --loss_type mapo"),
        ({"loss_type": "mapo", "sft": True}, "choose one of --sft and --loss_type mapo"),
        ({"output_kohya_format": True, "train_mode": "full"}, "needs --train_mode lora"),
    ],
)
def test_bad_loss_and_kohya_flags_are_refused_in_one_line(dpo, cli_args, capsys, flags, message):
    assert message in parse_error(dpo, cli_args(**flags), capsys)


@pytest.mark.parametrize("dpo", ["sd3"], indirect=True)
def test_the_sd3_script_refuses_output_kohya_format_in_one_line(dpo, cli_args, capsys):
    """diffusers' kohya conversion gives SD3 keys that neither ComfyUI nor diffusers load (docs/sd3.md)."""
    line = parse_error(dpo, cli_args(output_kohya_format=True), capsys)
    assert "--output_kohya_format: not for Stable Diffusion 3" in line and "ComfyUI loads" in line


@pytest.fixture(scope="module")
def demo_pairs(tmp_path_factory):
    """The alignment demo's kind of pairs: the warm shape always preferred."""
    folder = tmp_path_factory.mktemp("demo-pairs")
    return tiny_assets.build_pickapic_dataset(str(folder), n_pairs=96, n_ties=0, seed=1234)


# the dataset's preferred image is always the warm one; the demo's pretrained model is an SD 1.x pipeline. (On the tiny
# random models a short MaPO run does not reliably lift its absolute policy_acc above 0.5: docs/loss-and-learning-
# rates.md.)
@pytest.mark.parametrize("flags", [{"loss_type": "mapo"}, {"label_smoothing": 0.1}], ids=["mapo", "label_smoothing"])
def test_each_new_loss_moves_the_demo_model_toward_the_preferred_images(
    dpo, cli_args, demo_pairs, flags, adapter_switches
):
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
    mapo = flags.get("loss_type") == "mapo"
    metric = "eval/policy_acc" if mapo else "eval/implicit_acc"
    start, end = (evaluation[metric] for evaluation in (result["evaluations"][0], result["evaluations"][-1]))
    assert end > 0.5 and end > start
    # DPO's reference passes switch the adapter off, and the counter sees them: MaPO's zero is no blind spot
    assert (adapter_switches == []) == mapo


def converter_error(argv):
    """The one line convert_lora_to_kohya.py exits with."""
    with pytest.raises(SystemExit) as exit_info:
        convert_lora_to_kohya.main(argv)
    message = str(exit_info.value)
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_the_kohya_converter_refuses_a_lora_of_another_model_or_a_damaged_file_and_keeps_the_good_file(
    tiny_model, tiny_sdxl_model, tmp_path, monkeypatch
):
    """An SD 1.5 LoRA given an SDXL base (or a truncated file, or a model card's relative base path read from another
    folder) is one line; the kohya file already there is never replaced by a failed conversion or write."""
    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=train_diffusion_dpo.LORA_TARGET_MODULES))
    run = tmp_path / "run"
    run.mkdir()
    save_lora(unet, train_diffusion_dpo.FAMILY, run)
    convert_lora_to_kohya.main([str(run), "--pretrained_model_name_or_path", tiny_model])
    good = (run / KOHYA_WEIGHT_NAME).read_bytes()

    message = converter_error([str(run), "--pretrained_model_name_or_path", tiny_sdxl_model])
    assert f"{run / LORA_WEIGHT_NAME} is not a LoRA of {tiny_sdxl_model} (Stable Diffusion XL)" in message

    def failing_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(diffusion_dpo.outputs, "save_file", failing_write)
        with pytest.raises(OSError, match="No space left"):
            convert_lora_to_kohya.convert(str(run), tiny_model)
    assert sorted(path.name for path in run.iterdir()) == [LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME]

    # the base model as the model card names it, relative to the folder training ran in, read from another one
    (run / "README.md").write_text(f"---\nbase_model: {Path(tiny_model).name}\n---\n")
    monkeypatch.chdir(Path(tiny_model).parent)
    convert_lora_to_kohya.main([str(run)])
    monkeypatch.chdir(tmp_path)
    message = converter_error([str(run)])
    assert f"{run / 'README.md'} names the base model {Path(tiny_model).name}, which cannot be read" in message

    lora = run / LORA_WEIGHT_NAME
    lora.write_bytes(lora.read_bytes()[: lora.stat().st_size * 3 // 4])
    message = converter_error([str(run), "--pretrained_model_name_or_path", tiny_model])
    assert f"{lora} is damaged or truncated" in message
    assert (run / KOHYA_WEIGHT_NAME).read_bytes() == good
