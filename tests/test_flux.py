"""What only the Flux trainer does: T5 states and CLIP's pooled output cached as FluxPipeline encodes them, latents
packed 2 x 2 into tokens with sigma as the timestep and the guidance input of [dev] (the velocity the pipeline steps
with, at the noise levels it samples for the resolution), diffusers' Flux LoRA targets in the names ComfyUI maps,
the sequence length on the model card, and a LoRA on a 4-bit (NF4) base. What every script does is tested on this
one too, through the `every_script` tests of the other files."""

import math

import pytest
import tiny_assets
import torch
from diffusers import FluxPipeline
from testing_utils import (
    RESOLUTION,
    SD3_SEQUENCE_LENGTH,
    cache_folders,
    denoiser_output,
    lora_weights,
    parse_error,
    run_trainer,
)

import train_diffusion_dpo_flux as dpo_flux
from diffusion_dpo.cache import CachedPreferencePairs
from diffusion_dpo.data import load_preference_pairs


LN2 = math.log(2)

# every test here needs the Flux trainer's fixtures (tiny_pipeline, cli_args): the Flux ones
pytestmark = pytest.mark.parametrize("dpo", ["flux"], indirect=True)


@pytest.fixture(scope="module")
def tiny_schnell_model(tmp_path_factory):
    return tiny_assets.build_tiny_flux_pipeline(str(tmp_path_factory.mktemp("tiny-schnell")), schnell=True)


def test_cached_embeddings_equal_the_pipelines_own_encode_prompt(dpo, cli_args, tiny_flux_model, tmp_path):
    run_trainer(dpo_flux, cli_args(max_train_steps=1))
    (cache,) = cache_folders(tmp_path / "cache")
    pairs = CachedPreferencePairs(cache)
    index = int(pairs.valid_indices[0])
    caption = load_preference_pairs(dpo_flux.parse_args(cli_args(output_dir=tmp_path / "x")), "train").captions[index]
    prompt_embeds, pooled, text_ids = FluxPipeline.from_pretrained(tiny_flux_model).encode_prompt(
        caption, max_sequence_length=SD3_SEQUENCE_LENGTH
    )
    item = pairs[(index, int(pairs.encoded[index].argmax()), False)]  # the orientation a 1-epoch run encoded
    torch.testing.assert_close(item["prompt_embeds"].float(), prompt_embeds[0], atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(item["pooled_prompt_embeds"].float(), pooled[0], atol=2e-3, rtol=1e-3)
    assert not text_ids.any()  # the text's positions are zeros: nothing to cache


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_training_predicts_the_velocity_the_pipeline_steps_with_at_the_pipelines_noise_levels(
    dpo, cli_args, tiny_flux_model, tiny_schnell_model, variant
):
    """One FluxPipeline step from sigma to 0 moves the latents by -sigma x velocity: the training prediction on the
    unpacked latents (packing, positions, timestep = sigma, [dev]'s guidance) must give the same step, at the noise
    level the pipeline samples for this resolution (dev: shifted by the image's token count; schnell: unshifted)."""
    model = tiny_flux_model if variant == "dev" else tiny_schnell_model
    args = dpo_flux.parse_args(cli_args(pretrained_model_name_or_path=model, guidance_scale=2.0))
    noise = dpo_flux.load_noise(args)
    pipeline = FluxPipeline.from_pretrained(model)
    side = RESOLUTION // pipeline.vae_scale_factor
    latents = torch.randn(1, 16, side, side, generator=torch.Generator().manual_seed(0))
    index = 400  # the training grid's unshifted sigma 0.6
    stepped = pipeline(
        "a red shape",
        height=RESOLUTION,
        width=RESOLUTION,
        sigmas=[0.6],
        latents=FluxPipeline._pack_latents(latents, 1, 16, side, side),
        guidance_scale=2.0,
        max_sequence_length=SD3_SEQUENCE_LENGTH,
        output_type="latent",
    ).images
    sigma = pipeline.scheduler.sigmas[0]
    assert noise.sigmas[index].item() == pytest.approx(sigma.item(), abs=1e-6)
    assert (sigma.item() == pytest.approx(0.6)) == (variant == "schnell")

    prompt_embeds, pooled, _ = pipeline.encode_prompt("a red shape", max_sequence_length=SD3_SEQUENCE_LENGTH)
    cached = {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}
    conditioning = {**dpo_flux.FAMILY.conditioning(cached, "cpu", stacked=False), **dpo_flux.FAMILY.fixed_inputs(args)}
    with torch.no_grad():
        velocity = dpo_flux.predict(pipeline.transformer, latents, noise.timesteps[index : index + 1], conditioning)
    expected = FluxPipeline._unpack_latents(stepped, RESOLUTION, RESOLUTION, pipeline.vae_scale_factor)
    torch.testing.assert_close(latents - sigma * velocity, expected, atol=1e-5, rtol=1e-5)


def test_lora_targets_diffusers_flux_modules_in_names_comfyui_maps_and_the_card_records_the_sequence_length(
    dpo, cli_args, tmp_path
):
    run_trainer(dpo_flux, cli_args(learning_rate=1e-2, max_train_steps=1))
    saved = lora_weights(tmp_path / "out")
    # diffusers' names under `transformer.`: ComfyUI's Flux key map takes "transformer.<diffusers module>"
    assert all(
        name.startswith("transformer.") and name.endswith((".lora_A.weight", ".lora_B.weight")) for name in saved
    )
    modules = {name.removeprefix("transformer.").rsplit(".lora_", 1)[0] for name in saved}
    for target in dpo_flux.LORA_TARGET_MODULES:  # image and text attention, both feed-forward layers
        assert any(module.endswith(target) for module in modules), target
    assert "single_transformer_blocks.0.attn.to_q" in modules  # the single-stream blocks' attention too
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"max_sequence_length={SD3_SEQUENCE_LENGTH}" in card and "ComfyUI loads" in card


def test_a_lora_on_a_4bit_base_starts_at_ln2_trains_and_loads_on_the_full_precision_base(
    dpo, cli_args, tiny_flux_model, tmp_path, monkeypatch, bitsandbytes_on_cpu
):
    import bitsandbytes

    built, build_models = [], dpo_flux.build_models

    def recorded(*args, **kwargs):  # the models main trains, looked at afterwards
        built.append(build_models(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(dpo_flux, "build_models", recorded)
    result = run_trainer(dpo_flux, cli_args(quantize_base="nf4", learning_rate=1e-2, max_train_steps=2))
    ((transformer, reference),) = built
    assert reference is None  # the reference is the same 4-bit model with the adapter off
    base_layer = transformer.transformer_blocks[0].attn.to_q.base_layer
    assert isinstance(base_layer, bitsandbytes.nn.Linear4bit) and base_layer.weight.quant_type == "nf4"
    assert result["history"][0]["loss"] == pytest.approx(LN2, abs=1e-6)
    assert "NF4" in (tmp_path / "out" / "README.md").read_text()

    pipeline = FluxPipeline.from_pretrained(tiny_flux_model)
    base = denoiser_output(pipeline.transformer)
    pipeline.load_lora_weights(str(tmp_path / "out"))
    assert (denoiser_output(pipeline.transformer) - base).abs().max() > 1e-4


@pytest.mark.parametrize(
    "flags,message",
    [
        ({"resolution": 40}, "--resolution must be a positive multiple of 16"),
        ({"max_sequence_length": 513}, "--max_sequence_length must lie in [1, 512]"),
        ({"guidance_scale": "nan"}, "--guidance_scale must be a finite number"),
        ({"lora_target_modules": ","}, "--lora_target_modules names no module"),
        ({"quantize_base": "nf4", "train_mode": "full"}, "--quantize_base holds a frozen base in 4 bits under a LoRA"),
    ],
    ids=["resolution", "sequence-length", "guidance", "lora-targets", "quantize-full"],
)
def test_flux_flag_errors_stop_in_one_line_before_anything_loads(dpo, cli_args, capsys, flags, message):
    assert message in parse_error(dpo_flux, cli_args(**flags), capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="diffusers quantizes in 4 bits on a GPU")
def test_a_4bit_base_without_a_gpu_is_refused_in_one_line(dpo, cli_args, capsys):
    line = parse_error(dpo_flux, cli_args(quantize_base="nf4"), capsys)
    assert line.endswith("--quantize_base nf4: No GPU found. A GPU is needed for quantization.")
