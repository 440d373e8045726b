"""End-to-end training behaviour: the loss at identity, the direction of the update, modes and optimizers."""

import math

import pytest
import torch
from accelerate import Accelerator
from evaluate_dpo import denoiser_class
from testing_utils import ACCELERATE_LAUNCH, cache_folders, lora_weights, run_cli, run_trainer

from diffusion_dpo.cache import CachedPreferencePairs, PairSampler
from diffusion_dpo.family import build_models, lora_disabled
from diffusion_dpo.losses import compute_loss
from diffusion_dpo.outputs import LORA_WEIGHT_NAME


LN2 = math.log(2)


def trained_and_reference(dpo, args):
    """The script's trained denoiser and its reference (None for LoRA), built as its main builds them, on the CPU."""
    model_class = denoiser_class(dpo.FAMILY)
    return build_models(args, dpo.FAMILY, model_class, dpo.LORA_TARGET_MODULES, Accelerator(cpu=True))


@pytest.mark.every_script
@pytest.mark.parametrize("train_mode", ["lora", "full"])
def test_first_step_loss_is_ln2_when_policy_equals_reference(dpo, cli_args, train_mode):
    result = run_trainer(dpo, cli_args(train_mode=train_mode, max_train_steps=1))
    first = result["history"][0]
    assert first["loss"] == pytest.approx(LN2, abs=1e-4)
    assert first["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert first["model_mse_w"] == pytest.approx(first["ref_mse_w"], abs=1e-7)


def test_v_prediction_model_trains_from_ln2(dpo, cli_args, tiny_vpred_model):
    result = run_trainer(dpo, cli_args(pretrained_model_name_or_path=tiny_vpred_model, max_train_steps=1))
    assert result["history"][0]["loss"] == pytest.approx(LN2, abs=1e-4)


def error_margin(metrics):
    """How much more the policy errs on the winner than on the loser, beyond the reference's own difference."""
    return (metrics["model_mse_w"] - metrics["model_mse_l"]) - (metrics["ref_mse_w"] - metrics["ref_mse_l"])


def first_batch(dpo, args, tmp_path):
    """Precomputes the cache through a 1-step run and returns the first training batch of 4 pairs."""
    run_trainer(dpo, args + ["--max_train_steps", "1"])
    (cache,) = cache_folders(tmp_path / "cache")
    pairs = CachedPreferencePairs(cache)
    loader = torch.utils.data.DataLoader(pairs, batch_size=4, sampler=PairSampler(pairs, 0, 0.0))
    return next(iter(loader))


@pytest.mark.every_script
@pytest.mark.parametrize("train_mode", ["lora", "full"])
def test_a_gradient_step_lowers_the_winners_error_relative_to_the_losers(dpo, cli_args, tmp_path, train_mode):
    batch = first_batch(dpo, cli_args(train_mode=train_mode, output_dir=tmp_path / "precompute"), tmp_path)
    args = dpo.parse_args(cli_args(train_mode=train_mode))
    model, reference = trained_and_reference(dpo, args)
    noise = dpo.load_noise(args)

    def loss_and_metrics():
        return compute_loss(batch, model, reference, noise, dpo.FAMILY, args, torch.Generator().manual_seed(7))

    loss, before = loss_and_metrics()
    assert loss.item() == pytest.approx(LN2, abs=1e-5)
    loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    with torch.no_grad():
        for p in trainable:
            p -= 1e-3 * p.grad / (p.grad.norm() + 1e-12)  # a small normalised descent step
    _, after = loss_and_metrics()
    assert error_margin(after) < error_margin(before)  # the winner's error fell relative to the loser's
    assert after["reward_margin"] > 0 and after["implicit_acc"] > 0
    # the reference did not move: LoRA's adapter-off pass is the base model, the full copy is frozen
    assert after["ref_mse_w"] == before["ref_mse_w"] and after["ref_mse_l"] == before["ref_mse_l"]
    # and the adapter is trainable again after the reference pass
    assert all(p.requires_grad for p in trainable)


def test_reference_pass_re_enables_the_adapter_even_when_it_fails(dpo, cli_args):
    model, _ = trained_and_reference(dpo, dpo.parse_args(cli_args()))
    with pytest.raises(RuntimeError):
        with lora_disabled(model):
            raise RuntimeError("forward failed")
    lora_params = [p for n, p in model.named_parameters() if "lora" in n]
    assert lora_params and all(p.requires_grad for p in lora_params)


@pytest.mark.parametrize(
    "flags",
    [
        {"use_adafactor": True},
        {"use_8bit_adam": True},
        {"sft": True},
        {"loss_type": "hinge", "gradient_checkpointing": True},
        {"loss_type": "ipo", "proportion_empty_prompts": 0.5, "random_crop": True},
    ],
    ids=["adafactor", "8bit-adam", "sft", "hinge+checkpointing", "ipo+dropout+crop"],
)
def test_lora_weights_move_under_every_objective_and_optimizer(dpo, cli_args, tmp_path, flags):
    result = run_trainer(dpo, cli_args(learning_rate=1e-3, max_train_steps=2, **flags))
    assert result["global_step"] == 2 and all(math.isfinite(h["loss"]) for h in result["history"])
    lora_up = [w for name, w in lora_weights(tmp_path / "out").items() if "lora_B" in name or "lora.up" in name]
    assert lora_up and any(w.abs().max() > 0 for w in lora_up)  # LoRA B starts at zero: non-zero means it trained


def test_accelerate_launch_runs_the_script(dpo, cli_args, tmp_path):
    """One process under accelerate launch (every script runs under it with two processes in test_faults.py)."""
    completed = run_cli(dpo, cli_args(max_train_steps=2, report_to="tensorboard"), launcher=ACCELERATE_LAUNCH)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert (tmp_path / "out" / LORA_WEIGHT_NAME).exists()
    assert list((tmp_path / "out" / "logs").rglob("events.out.tfevents*"))


def test_full_fine_tuning_default_learning_rate_is_on_the_epsilon_scale_of_beta():
    """Full fine-tuning's default rate follows 1e-8 * (2000 / beta) per pair with beta on epsilon errors: the flow
    families' default beta on velocity errors (500) gets about SDXL's rate at its beta 5000, not ten times it."""
    import train_diffusion_dpo_sd3
    import train_diffusion_dpo_sdxl
    from diffusion_dpo.training import learning_rate

    rates = {}
    for script in (train_diffusion_dpo_sdxl, train_diffusion_dpo_sd3):
        args = script.parse_args(["--train_mode", "full"])
        rates[script] = learning_rate(args, 2048, script.FAMILY.epsilon_beta_factor)
    assert rates[train_diffusion_dpo_sdxl] == pytest.approx(1e-8 * 2000 / 5000 * 2048)
    assert rates[train_diffusion_dpo_sd3] == pytest.approx(rates[train_diffusion_dpo_sdxl], rel=0.15)
