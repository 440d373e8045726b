"""What a run leaves behind: weights that reload in diffusers and validation grids (every script); the model card
and the Hub upload (diffusion_dpo.outputs, once on SD 1.5)."""

import pytest
import torch
from PIL import Image
from testing_utils import RESOLUTION, denoiser, denoiser_output, pipeline_class, run_trainer

import diffusion_dpo.outputs
import diffusion_dpo.training


@pytest.mark.every_script
def test_lora_reloads_with_load_lora_weights_and_changes_the_denoiser(dpo, cli_args, tiny_pipeline, tmp_path):
    """The result and every LoRA checkpoint load with the family's pipeline's load_lora_weights."""
    run_trainer(dpo, cli_args(learning_rate=1e-2, max_train_steps=2, checkpointing_steps=2))
    for weights_dir in (tmp_path / "out", tmp_path / "out" / "checkpoint-2"):
        pipeline = pipeline_class(dpo).from_pretrained(tiny_pipeline)
        base = denoiser_output(denoiser(pipeline))
        pipeline.load_lora_weights(str(weights_dir))
        tuned = denoiser_output(denoiser(pipeline))
        assert (tuned - base).abs().max() > 1e-4, weights_dir
        denoiser(pipeline).disable_adapters()  # the adapter is all that changed
        torch.testing.assert_close(denoiser_output(denoiser(pipeline)), base)


@pytest.mark.every_script
def test_full_fine_tuning_saves_a_pipeline_that_from_pretrained_loads(dpo, cli_args, tiny_pipeline, tmp_path):
    run_trainer(dpo, cli_args(train_mode="full", learning_rate=1e-3, max_train_steps=2))
    tuned = pipeline_class(dpo).from_pretrained(str(tmp_path / "out"))
    base = pipeline_class(dpo).from_pretrained(tiny_pipeline)
    assert (denoiser_output(denoiser(tuned)) - denoiser_output(denoiser(base))).abs().max() > 1e-4
    image = tuned(prompt="a shape", num_inference_steps=2, height=RESOLUTION, width=RESOLUTION).images[0]
    assert image.size == (RESOLUTION, RESOLUTION)


@pytest.mark.every_script
def test_validation_renders_grids_and_logs_to_tensorboard(dpo, cli_args, tmp_path):
    prompts = ["a shape", "a photo of a shape"]
    run_trainer(
        dpo,
        cli_args(
            run_validation=True,
            validation_steps=2,
            max_train_steps=3,
            validation_prompts=prompts,
            num_validation_inference_steps=2,
            report_to="tensorboard",
        ),
    )
    validation = tmp_path / "out" / "validation"
    # the untuned model once, then every validation_steps, then at the end
    assert sorted(p.name for p in validation.iterdir()) == ["reference.png", "step-000002.png", "step-000003.png"]
    assert Image.open(validation / "step-000003.png").size == (RESOLUTION * len(prompts), RESOLUTION)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = EventAccumulator(str(tmp_path / "out" / "logs" / "diffusion-dpo")).Reload()  # logs/<tracker_name>
    for scalar in (
        "loss",
        "implicit_acc",
        "reward_margin",
        "model_mse_w",
        "model_mse_l",
        "ref_mse_w",
        "ref_mse_l",
        "lr",
    ):
        assert [e.step for e in logged.Scalars(scalar)] == [1, 2, 3], scalar
    assert logged.Tags()["images"]  # the validation images


def test_model_card_and_push_to_hub_upload_the_result_without_checkpoints(dpo, cli_args, tmp_path, monkeypatch):
    calls = {}

    class Repo:
        repo_id = "someone/my-dpo-lora"

    def create_repo(**kwargs):
        calls["create_repo"] = kwargs
        return Repo

    monkeypatch.setattr(diffusion_dpo.training, "create_repo", create_repo)
    monkeypatch.setattr(diffusion_dpo.outputs, "upload_folder", lambda **kwargs: calls.update(upload_folder=kwargs))
    run_trainer(
        dpo, cli_args(push_to_hub=True, hub_model_id="someone/my-dpo-lora", checkpointing_steps=1, beta_dpo=2500)
    )

    assert calls["create_repo"]["repo_id"] == "someone/my-dpo-lora" and calls["create_repo"]["exist_ok"]
    upload = calls["upload_folder"]
    assert upload["repo_id"] == "someone/my-dpo-lora" and upload["folder_path"] == str(tmp_path / "out")
    assert "checkpoint-*" in upload["ignore_patterns"]

    card = (tmp_path / "out" / "README.md").read_text()
    for expected in (
        "diffusion-dpo",
        "lora",
        "base_model:",
        "β = 2500",
        'load_lora_weights("someone/my-dpo-lora")',
        "2 steps",
    ):
        assert expected in card, expected
