"""What only the FLUX.2 [klein] trainer does: Qwen3's stacked hidden states cached as Flux2KleinPipeline encodes
them, VAE latents patched and normalised by the VAE's batch-norm statistics, the velocity the pipeline steps with
(patches, 4-axis positions, timestep = sigma, no guidance) at the noise level it samples for the resolution,
diffusers' klein LoRA targets in the names ComfyUI maps, and a LoRA on a 4-bit (NF4) base. What every script does is
tested on this one too, through the `every_script` tests of the other files."""

import json
import math
import shutil

import pytest
import torch
from diffusers import Flux2KleinPipeline
from testing_utils import (
    RESOLUTION,
    SD3_SEQUENCE_LENGTH,
    cache_folders,
    denoiser_output,
    lora_weights,
    parse_error,
    run_trainer,
)

import train_diffusion_dpo_flux2 as dpo_flux2
from diffusion_dpo import InputError
from diffusion_dpo.cache import CachedPreferencePairs, VaeEncoder
from diffusion_dpo.data import load_preference_pairs


LN2 = math.log(2)

# every test here needs the klein trainer's fixtures (tiny_pipeline, cli_args)
pytestmark = pytest.mark.parametrize("dpo", ["flux2"], indirect=True)


def test_cached_embeddings_equal_the_pipelines_own_encode_prompt(dpo, cli_args, tiny_flux2_model, tmp_path):
    run_trainer(dpo_flux2, cli_args(max_train_steps=1))
    (cache,) = cache_folders(tmp_path / "cache")
    pairs = CachedPreferencePairs(cache)
    index = int(pairs.valid_indices[0])
    caption = load_preference_pairs(dpo_flux2.parse_args(cli_args(output_dir=tmp_path / "x")), "train").captions[index]
    # the pipeline's defaults: Qwen's chat template, the hidden states of layers (9, 18, 27) side by side
    prompt_embeds, text_ids = Flux2KleinPipeline.from_pretrained(tiny_flux2_model).encode_prompt(
        caption, max_sequence_length=SD3_SEQUENCE_LENGTH
    )
    item = pairs[(index, int(pairs.encoded[index].argmax()), False)]  # the orientation a 1-epoch run encoded
    assert set(pairs.caption_arrays) == {"prompt_embeds"}
    torch.testing.assert_close(item["prompt_embeds"].float(), prompt_embeds[0], atol=2e-3, rtol=1e-3)
    # the text's positions (0, 0, 0, index) follow from the length: nothing to cache
    assert text_ids[0].tolist() == [[0, 0, 0, position] for position in range(SD3_SEQUENCE_LENGTH)]


def test_the_cache_encoder_gives_the_pipelines_patched_and_batch_normalised_latents(dpo, tiny_flux2_model):
    """The pipeline patches the VAE's latents 2 x 2 and normalises each patched channel by the VAE's batch-norm
    statistics (random in the tiny model): the precompute's encoder gives the same numbers, unpatched."""
    pipeline = Flux2KleinPipeline.from_pretrained(tiny_flux2_model)
    images = torch.rand(3, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(0)) * 2 - 1
    options = (torch.device("cpu"), torch.float32, torch.contiguous_format, dpo_flux2.FAMILY.vae_latents)
    cached = VaeEncoder(pipeline.vae, 2, *options)(images)
    with torch.no_grad():
        expected = pipeline._encode_vae_image(images, generator=None)  # (n, 4 C, h / 2, w / 2)
    assert cached.shape == (3, pipeline.vae.config.latent_channels, RESOLUTION // 2, RESOLUTION // 2)
    torch.testing.assert_close(Flux2KleinPipeline._patchify_latents(cached), expected, atol=1e-5, rtol=1e-5)
    assert (expected.mean(dim=(0, 2, 3)).abs() > 0.1).any()  # the normalisation moved them


def test_training_predicts_the_velocity_the_pipeline_steps_with_at_the_pipelines_noise_level(
    dpo, cli_args, tiny_flux2_model
):
    """One Flux2KleinPipeline step from sigma to 0 moves the latents by -sigma x velocity: the training prediction on
    unpatched latents (patches, positions, timestep = sigma, no guidance) must give the same step, at the noise level
    the pipeline samples for this resolution (the unshifted 0.6 shifted by its empirical mu)."""
    args = dpo_flux2.parse_args(cli_args())
    noise = dpo_flux2.load_noise(args)
    pipeline = Flux2KleinPipeline.from_pretrained(tiny_flux2_model)
    side = RESOLUTION // pipeline.vae_scale_factor
    channels = pipeline.vae.config.latent_channels
    latents = torch.randn(1, channels, side, side, generator=torch.Generator().manual_seed(0))
    stepped = pipeline(
        prompt="a red shape",
        height=RESOLUTION,
        width=RESOLUTION,
        sigmas=[0.6],
        latents=Flux2KleinPipeline._patchify_latents(latents),
        guidance_scale=1.0,  # no classifier-free guidance: the conditional velocity alone
        max_sequence_length=SD3_SEQUENCE_LENGTH,
        output_type="latent",
    ).images  # unpatched and de-normalised for the VAE
    index = 400  # the training grid's unshifted sigma 0.6
    sigma = pipeline.scheduler.sigmas[0]
    assert noise.sigmas[index].item() == pytest.approx(sigma.item(), abs=1e-6)
    assert sigma.item() > 0.7  # shifted toward noise

    prompt_embeds, _ = pipeline.encode_prompt("a red shape", max_sequence_length=SD3_SEQUENCE_LENGTH)
    conditioning = dpo_flux2.FAMILY.conditioning({"prompt_embeds": prompt_embeds}, "cpu", stacked=False)
    with torch.no_grad():
        velocity = dpo_flux2.predict(pipeline.transformer, latents, noise.timesteps[index : index + 1], conditioning)
    expected = dpo_flux2.normalized_latents(pipeline.vae, stepped)  # back into the space the trainer denoises
    torch.testing.assert_close(latents - sigma * velocity, expected, atol=1e-5, rtol=1e-5)


def test_lora_targets_diffusers_klein_modules_in_names_comfyui_maps_and_the_card_records_the_sequence_length(
    dpo, cli_args, tmp_path
):
    run_trainer(dpo_flux2, cli_args(learning_rate=1e-2, max_train_steps=1))
    saved = lora_weights(tmp_path / "out")
    assert all(
        name.startswith("transformer.") and name.endswith((".lora_A.weight", ".lora_B.weight")) for name in saved
    )
    # diffusers' klein trainer's targets; ComfyUI's FLUX.2 key map takes "transformer.<these diffusers modules>"
    modules = {name.removeprefix("transformer.").rsplit(".lora_", 1)[0] for name in saved}
    assert modules == {
        *(f"transformer_blocks.0.attn.{name}" for name in ("to_q", "to_k", "to_v", "to_out.0")),
        "single_transformer_blocks.0.attn.to_qkv_mlp_proj",
        "single_transformer_blocks.0.attn.to_out",
    }
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"max_sequence_length={SD3_SEQUENCE_LENGTH}" in card and "Flux2KleinPipeline" in card


def test_a_lora_on_a_4bit_base_starts_at_ln2_trains_and_loads_on_the_full_precision_base(
    dpo, cli_args, tiny_flux2_model, tmp_path, monkeypatch, bitsandbytes_on_cpu
):
    import bitsandbytes

    built, build_models = [], dpo_flux2.build_models

    def recorded(*args, **kwargs):  # the models main trains, looked at afterwards
        built.append(build_models(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(dpo_flux2, "build_models", recorded)
    result = run_trainer(dpo_flux2, cli_args(quantize_base="nf4", learning_rate=1e-2, max_train_steps=2))
    ((transformer, reference),) = built
    assert reference is None  # the reference is the same 4-bit model with the adapter off
    base_layer = transformer.single_transformer_blocks[0].attn.to_qkv_mlp_proj.base_layer
    assert isinstance(base_layer, bitsandbytes.nn.Linear4bit) and base_layer.weight.quant_type == "nf4"
    assert result["history"][0]["loss"] == pytest.approx(LN2, abs=1e-6)
    assert "NF4" in (tmp_path / "out" / "README.md").read_text()

    pipeline = Flux2KleinPipeline.from_pretrained(tiny_flux2_model)
    base = denoiser_output(pipeline.transformer)
    pipeline.load_lora_weights(str(tmp_path / "out"))
    assert (denoiser_output(pipeline.transformer) - base).abs().max() > 1e-4


def test_a_flux2_dev_transformer_is_refused_before_any_data_is_read(dpo, cli_args, tiny_flux2_model, tmp_path):
    """FLUX.2 [dev] has klein's layout but a guidance-distilled transformer (and Mistral's text): not klein's."""
    model = shutil.copytree(tiny_flux2_model, tmp_path / "dev-like")
    config_file = model / "transformer" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "guidance_embeds": True}))
    with pytest.raises(InputError, match="guidance_embeds True.*FLUX.2 \\[dev\\]"):
        run_trainer(dpo_flux2, cli_args(pretrained_model_name_or_path=model))
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    "flags,message",
    [
        ({"resolution": 40}, "--resolution must be a positive multiple of 16"),
        ({"max_sequence_length": 513}, "--max_sequence_length must lie in [1, 512]"),
        ({"lora_target_modules": ","}, "--lora_target_modules names no module"),
        ({"quantize_base": "nf4", "train_mode": "full"}, "--quantize_base holds a frozen base in 4 bits under a LoRA"),
    ],
    ids=["resolution", "sequence-length", "lora-targets", "quantize-full"],
)
def test_klein_flag_errors_stop_in_one_line_before_anything_loads(dpo, cli_args, capsys, flags, message):
    assert message in parse_error(dpo_flux2, cli_args(**flags), capsys)
