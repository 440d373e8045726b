"""What only the SD3 trainer does: rectified flow (one noise level and one noise per pair), three text encoders with
T5 optional (--no_t5), LoRA on the joint attention's image and text projections (in PEFT's names, which diffusers'
kohya conversion cannot carry), and other models named in one line. What every script does is tested on this one
too, through the `every_script` tests of the other files."""

import math
import os

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift
from diffusers.utils import convert_all_state_dict_to_peft, convert_state_dict_to_kohya
from testing_utils import (
    SD3_SEQUENCE_LENGTH,
    cache_folders,
    denoiser_output,
    lora_weights,
    parse_error,
    run_trainer,
)

import train_diffusion_dpo_sd3 as dpo_sd3
from diffusion_dpo import InputError, losses
from diffusion_dpo.cache import CachedPreferencePairs
from diffusion_dpo.data import load_preference_pairs
from diffusion_dpo.family import build_models
from diffusion_dpo.losses import compute_loss
from diffusion_dpo.noise import NoiseLevels


LN2 = math.log(2)
T5_PARTS = ("text_encoder_3", "tokenizer_3")

# every test here needs the SD3 trainer's fixtures (tiny_pipeline, cli_args): the SD3 ones
pytestmark = pytest.mark.parametrize("dpo", ["sd3"], indirect=True)


@pytest.fixture
def sd3_without_t5(tiny_sd3_model, tmp_path):
    """The tiny SD3 pipeline's parts (linked) but T5's: a model folder as one downloaded without T5."""
    folder = tmp_path / "without-t5"
    folder.mkdir()
    for part in os.listdir(tiny_sd3_model):
        if part not in T5_PARTS:
            os.symlink(os.path.join(tiny_sd3_model, part), folder / part)
    return folder


def test_rectified_flow_draws_shifted_noise_levels_and_corrupts_along_the_straight_line(dpo, cli_args):
    noise = dpo_sd3.load_noise(dpo_sd3.parse_args(cli_args()))
    levels = noise.draw(4096, torch.Generator().manual_seed(0), "cpu")
    assert ((0 < levels.sigmas) & (levels.sigmas <= 1)).all()
    torch.testing.assert_close(levels.timesteps, levels.sigmas * 1000)
    assert 0.6 < levels.sigmas.median() < 0.85  # logit-normal around u = 0.5, moved up by SD3's shift 3: 0.75
    assert (levels.weighting == 1).all()  # logit_normal weighs every error alike
    latents, pure_noise = torch.randn(2, 3, 16, 4, 4)
    sigmas = torch.tensor([0.0, 1.0, 0.25])
    noisy, target = noise.corrupt(latents, pure_noise, NoiseLevels(sigmas * 1000, sigmas))
    torch.testing.assert_close(noisy[0], latents[0])  # sigma 0: the image
    torch.testing.assert_close(noisy[1], pure_noise[1])  # sigma 1: pure noise
    torch.testing.assert_close(noisy[2], 0.75 * latents[2] + 0.25 * pure_noise[2])
    torch.testing.assert_close(target, pure_noise - latents)  # the velocity


def test_a_scheduler_that_shifts_dynamically_gets_the_pipelines_shift_for_the_resolution(
    dpo, cli_args, tiny_sd3_model, tmp_path
):
    """SD3's pipeline shifts such a scheduler by mu from the image's patch count: training draws from those sigmas,
    never the unshifted ones the scheduler holds until a pipeline shifts them."""
    model = tmp_path / "dynamic-shift"
    model.mkdir()
    for part in os.listdir(tiny_sd3_model):
        if part != "scheduler":
            os.symlink(os.path.join(tiny_sd3_model, part), model / part)
    config = FlowMatchEulerDiscreteScheduler.load_config(tiny_sd3_model, subfolder="scheduler")
    FlowMatchEulerDiscreteScheduler.from_config({**config, "use_dynamic_shifting": True}).save_pretrained(
        model / "scheduler"
    )
    pipeline = StableDiffusion3Pipeline.from_pretrained(model)
    for resolution in (32, 64):
        args = dpo_sd3.parse_args(cli_args(pretrained_model_name_or_path=model, resolution=resolution))
        noise = dpo_sd3.load_noise(args)
        # the sigmas the pipeline samples with at this size (its __call__'s mu), on the 1000-step training grid
        patches = (resolution // pipeline.vae_scale_factor // pipeline.transformer.config.patch_size) ** 2
        shift_range = ("base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift")
        mu = calculate_shift(patches, *(pipeline.scheduler.config[name] for name in shift_range))
        pipeline.scheduler.set_timesteps(1000, mu=mu)
        torch.testing.assert_close(noise.sigmas, pipeline.scheduler.sigmas[:-1])
        assert (noise.sigmas[1:-1] != FlowMatchEulerDiscreteScheduler.from_config(config).sigmas[1:-1]).all()


def test_a_pairs_two_images_share_their_noise_level_and_noise(dpo, cli_args, monkeypatch):
    """DPO compares the errors of winner and loser on one corruption; the reference sees the very same inputs."""
    args = dpo_sd3.parse_args(cli_args())
    noise = dpo_sd3.load_noise(args)
    seen = []
    denoising_errors = losses.denoising_errors

    def record(model, family, noisy_latents, levels, conditioning, target):
        seen.append((noisy_latents, levels, target))
        return denoising_errors(model, family, noisy_latents, levels, conditioning, target)

    monkeypatch.setattr(losses, "denoising_errors", record)
    AcceleratorState._reset_state(reset_partial_state=True)  # as a fresh process: earlier runs set their own
    accelerator = Accelerator(mixed_precision="no")
    targets = dpo_sd3.lora_target_modules(args)
    transformer, reference = build_models(args, dpo_sd3.FAMILY, SD3Transformer2DModel, targets, accelerator)
    winners, losers = torch.randn(2, 2, transformer.config.in_channels, 16, 16)
    batch = {
        "pair_latents": torch.stack([winners, losers], dim=1),
        "prompt_embeds": torch.randn(2, 77 + SD3_SEQUENCE_LENGTH, transformer.config.joint_attention_dim),
        "pooled_prompt_embeds": torch.randn(2, transformer.config.pooled_projection_dim),
    }
    generator = torch.Generator().manual_seed(1)
    loss, _ = compute_loss(batch, transformer, reference, noise, dpo_sd3.FAMILY, args, generator)
    assert loss.item() == pytest.approx(LN2, abs=1e-5)  # the adapter starts as the reference
    (noisy, levels, target), reference_inputs = seen
    assert torch.equal(*levels.timesteps.chunk(2)) and torch.equal(*levels.sigmas.chunk(2))
    latents = torch.cat([winners, losers])
    pair_noise = target + latents  # the target is the velocity, noise - latents
    torch.testing.assert_close(*pair_noise.chunk(2))  # one noise per pair
    sigma = levels.sigmas.view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, (1 - sigma) * latents + sigma * pair_noise)
    assert torch.equal(reference_inputs[0], noisy) and torch.equal(reference_inputs[2], target)
    assert all(torch.equal(a, b) for a, b in zip(reference_inputs[1], levels))


@pytest.mark.parametrize("no_t5", [False, True], ids=["t5", "no-t5"])
def test_cached_embeddings_equal_the_pipelines_own_encode_prompt(dpo, cli_args, tiny_sd3_model, tmp_path, no_t5):
    run_trainer(dpo_sd3, cli_args(max_train_steps=1, no_t5=no_t5))
    (cache,) = cache_folders(tmp_path / "cache")
    pairs = CachedPreferencePairs(cache)
    index = int(pairs.valid_indices[0])
    caption = load_preference_pairs(dpo_sd3.parse_args(cli_args(output_dir=tmp_path / "x")), "train").captions[index]
    without_t5 = dict.fromkeys(T5_PARTS) if no_t5 else {}
    pipeline = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_model, **without_t5)
    prompt_embeds, negative_embeds, pooled, negative_pooled = pipeline.encode_prompt(
        caption, None, None, do_classifier_free_guidance=True, max_sequence_length=SD3_SEQUENCE_LENGTH
    )
    item = pairs[(index, int(pairs.encoded[index].argmax()), False)]  # the orientation a 1-epoch run encoded
    torch.testing.assert_close(item["prompt_embeds"].float(), prompt_embeds[0], atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(item["pooled_prompt_embeds"].float(), pooled[0], atol=2e-3, rtol=1e-3)
    assert (item["prompt_embeds"][77:].abs().max() == 0) == no_t5  # T5's part: zeros without it
    # prompt dropout trains the pipeline's unconditional input: the empty caption's embedding
    dropped = pairs[(index, int(pairs.encoded[index].argmax()), True)]
    torch.testing.assert_close(dropped["prompt_embeds"].float(), negative_embeds[0], atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(dropped["pooled_prompt_embeds"].float(), negative_pooled[0], atol=2e-3, rtol=1e-3)


def test_lora_targets_the_joint_attention_in_names_diffusers_kohya_conversion_cannot_carry(
    dpo, cli_args, tiny_sd3_model, tmp_path
):
    """Why --output_kohya_format is refused for SD3: diffusers' convert_state_dict_to_kohya names SD3 layers
    `transformer_transformer_blocks_...`, which neither ComfyUI (its SD3 names: `transformer.<module>`, this
    script's file, or `lora_transformer_<module>`) nor diffusers' own StableDiffusion3Pipeline loads (it converts no
    kohya keys for SD3 and refuses the file). If diffusers ever loads it, the flag can be offered."""
    run_trainer(dpo_sd3, cli_args(learning_rate=1e-2, max_train_steps=1))
    saved = lora_weights(tmp_path / "out")
    assert all(name.startswith("transformer.") and ".lora_" in name for name in saved)  # ComfyUI's diffusers names
    for module in dpo_sd3.LORA_TARGET_MODULES:  # the image stream's projections and the text stream's
        assert any(f".{module}.lora_A" in name for name in saved), module
    kohya = convert_state_dict_to_kohya(convert_all_state_dict_to_peft(saved))
    assert all(key.startswith("transformer_transformer_blocks_") for key in kohya)  # no lora_ prefix: not kohya's
    pipeline = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_model)
    base = denoiser_output(pipeline.transformer)
    with pytest.raises(ValueError, match="Invalid LoRA checkpoint"):  # its .alpha keys hold no "lora"
        pipeline.load_lora_weights(kohya)
    torch.testing.assert_close(denoiser_output(pipeline.transformer), base)


def test_a_model_folder_without_t5_trains_validates_and_its_card_loads_it_without_t5(
    dpo, cli_args, sd3_without_t5, tmp_path
):
    validation = dict(run_validation=True, validation_prompts=["a shape"], num_validation_inference_steps=2)
    run_trainer(dpo_sd3, cli_args(pretrained_model_name_or_path=sd3_without_t5, no_t5=True, **validation))
    assert sorted(p.name for p in (tmp_path / "out" / "validation").iterdir()) == ["reference.png", "step-000002.png"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "text_encoder_3=None, tokenizer_3=None" in card and "Trained without T5" in card
    # loaded as the card says, the LoRA changes the transformer
    pipeline = StableDiffusion3Pipeline.from_pretrained(sd3_without_t5, text_encoder_3=None, tokenizer_3=None)
    base = denoiser_output(pipeline.transformer)
    pipeline.load_lora_weights(str(tmp_path / "out"))
    assert (denoiser_output(pipeline.transformer) - base).abs().max() > 0


@pytest.mark.parametrize(
    "flags,message",
    [
        ({"resolution": 40}, "--resolution must be a positive multiple of 16"),
        ({"max_sequence_length": 513}, "--max_sequence_length must lie in [1, 512]"),
        ({"weighting_scheme": "uniform"}, "invalid choice: 'uniform'"),
        ({"logit_std": 0}, "--logit_std must be a finite number above 0"),
        ({"lora_target_modules": ","}, "--lora_target_modules names no module"),
        ({"weighting_scheme": "sigma_sqrt"}, "--weighting_scheme sigma_sqrt weights both errors of a pair"),
        ({"weighting_scheme": "cosmap", "loss_type": "mapo"}, "so beta would depend on the noise level; DPO and MaPO"),
    ],
    ids=["resolution", "sequence-length", "weighting", "logit-std", "lora-targets", "sigma-sqrt-dpo", "cosmap-mapo"],
)
def test_sd3_flag_errors_stop_in_one_line_before_anything_loads(dpo, cli_args, capsys, flags, message):
    assert message in parse_error(dpo_sd3, cli_args(**flags), capsys)


def test_error_weighting_schemes_are_for_sft_alone(dpo, cli_args):
    """sigma_sqrt's weight 1/sigma^2 reaches ~1e5 at small sigma: both errors of a pair scaled so, DPO's beta would
    be scaled with them; the plain flow-matching loss (--sft) may take it."""
    for scheme in ("sigma_sqrt", "cosmap"):
        assert dpo_sd3.parse_args(cli_args(weighting_scheme=scheme, sft=True)).weighting_scheme == scheme


def test_other_models_and_a_missing_t5_are_named_in_one_line(dpo, cli_args, tiny_sdxl_model, sd3_without_t5, capsys):
    line = parse_error(dpo_sd3, cli_args(pretrained_model_name_or_path=tiny_sdxl_model), capsys)
    assert "holds a UNet" in line and "train_diffusion_dpo_sdxl.py" in line
    assert "pass --no_t5" in parse_error(dpo_sd3, cli_args(pretrained_model_name_or_path=sd3_without_t5), capsys)
    with pytest.raises(InputError, match=r"LoRA target modules: Target modules \{'q'\} not found in the base model"):
        no_such_targets = cli_args(pretrained_model_name_or_path=sd3_without_t5, no_t5=True, lora_target_modules="q")
        run_trainer(dpo_sd3, no_such_targets)
