"""Checkpoints: resume continues exactly (every script), rotation keeps the newest, mismatched checkpoints are
refused (diffusion_dpo.checkpoints, once on SD 1.5)."""

import shutil

import pytest
from safetensors.torch import load_file
from testing_utils import assert_same_tensors, lora_weights, run_trainer

from diffusion_dpo import InputError
from diffusion_dpo.outputs import LORA_WEIGHT_NAME


def final_weights(dpo, output_dir, train_mode):
    if train_mode == "lora":
        return lora_weights(output_dir)
    return load_file(output_dir / dpo.FAMILY.denoiser / "diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize(
    "train_mode,flags,resume_step",
    [
        # 8 pairs in batches of 3: 3 steps an epoch, so step 2 is mid-epoch and step 4 lies in the next epoch
        ("lora", {"train_batch_size": 3, "lr_scheduler": "cosine", "lr_warmup_steps": 1, "checkpointing_steps": 2}, 2),
        # accumulation 2 over 4 batches an epoch: resuming after step 1 skips two consumed batches
        ("full", {"gradient_accumulation_steps": 2, "checkpointing_steps": 1, "proportion_empty_prompts": 0.3}, 1),
    ],
    ids=["lora-mid-epoch", "full-accumulation"],
)
@pytest.mark.every_script
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(
    dpo, cli_args, tmp_path, train_mode, flags, resume_step
):
    common = dict(train_mode=train_mode, max_train_steps=4, learning_rate=1e-3, **flags)
    straight = run_trainer(dpo, cli_args(output_dir=tmp_path / "straight", **common))

    # The interrupted run: only the checkpoint written at `resume_step` survived.
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    shutil.copytree(tmp_path / "straight" / f"checkpoint-{resume_step}", interrupted / f"checkpoint-{resume_step}")
    resumed = run_trainer(dpo, cli_args(output_dir=interrupted, resume_from_checkpoint="latest", **common))

    assert resumed["global_step"] == straight["global_step"] == 4
    assert [h["step"] for h in resumed["history"]] == list(range(resume_step + 1, 5))
    for mine, theirs in zip(resumed["history"], straight["history"][resume_step:]):
        assert mine == pytest.approx(theirs, abs=1e-6)  # same data, noise, timesteps and learning rate
    assert_same_tensors(
        final_weights(dpo, interrupted, train_mode), final_weights(dpo, tmp_path / "straight", train_mode)
    )


def test_rotation_keeps_the_newest_checkpoints(dpo, cli_args, tmp_path):
    run_trainer(dpo, cli_args(max_train_steps=6, checkpointing_steps=2, checkpoints_total_limit=2))
    names = sorted(p.name for p in (tmp_path / "out").iterdir() if "checkpoint" in p.name)
    assert names == ["checkpoint-4", "checkpoint-6"]  # no partial folder left behind either
    # every LoRA checkpoint is itself loadable LoRA weights
    assert (tmp_path / "out" / "checkpoint-6" / LORA_WEIGHT_NAME).exists()


def test_resume_from_a_named_checkpoint_continues_its_step_count(dpo, cli_args, tmp_path):
    run_trainer(dpo, cli_args(max_train_steps=2, checkpointing_steps=1))
    result = run_trainer(dpo, cli_args(max_train_steps=3, resume_from_checkpoint="checkpoint-1"))
    assert [h["step"] for h in result["history"]] == [2, 3]


def test_a_lora_checkpoint_is_refused_by_a_full_run(dpo, cli_args, tmp_path):
    run_trainer(dpo, cli_args(max_train_steps=1, checkpointing_steps=1))
    with pytest.raises(InputError, match="not written by a --train_mode full run"):
        run_trainer(dpo, cli_args(max_train_steps=2, train_mode="full", resume_from_checkpoint="latest"))


def test_a_checkpoint_of_another_lora_or_model_is_refused(dpo, cli_args, tiny_pipeline, tmp_path):
    from diffusers import UNet2DConditionModel

    model = tmp_path / "model"
    shutil.copytree(tiny_pipeline, model)
    run_trainer(dpo, cli_args(pretrained_model_name_or_path=model, max_train_steps=1, checkpointing_steps=1, rank=4))
    resume = cli_args(pretrained_model_name_or_path=model, max_train_steps=2, resume_from_checkpoint="latest")
    with pytest.raises(InputError, match="does not match this model's LoRA layers"):
        run_trainer(dpo, resume + ["--rank", "8"])
    # another model folder is refused by name
    with pytest.raises(InputError, match=f"--pretrained_model_name_or_path {model}, this run has {tiny_pipeline}"):
        run_trainer(dpo, cli_args(max_train_steps=2, rank=4, resume_from_checkpoint="latest"))
    # the same LoRA rank on the same folder, its UNet replaced by one with other layer sizes
    unet = UNet2DConditionModel.from_pretrained(model / "unet")
    *inner, last = unet.config.block_out_channels
    wider = UNet2DConditionModel.from_config({**unet.config, "block_out_channels": [*inner, last + 32]})
    wider.save_pretrained(model / "unet")
    with pytest.raises(InputError, match="does not match this model's LoRA layers"):
        run_trainer(dpo, resume + ["--rank", "4"])
