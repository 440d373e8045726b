"""What only the SDXL trainer does: two text encoders, per-image micro-conditioning (its time ids, read from the
cache's crops), the pipeline's unconditional input, its VAE, SDXL-Turbo. What every script does is tested on this
one too, through the `every_script` tests of the other files."""

import io
import json
import os

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline
from PIL import Image
from testing_utils import RESOLUTION, cache_folders, dataset_rows, run_trainer

import train_diffusion_dpo_sdxl as dpo_xl
from diffusion_dpo.cache import CachedPreferencePairs, PairPixels, PairsToDecode
from diffusion_dpo.data import load_preference_pairs
from diffusion_dpo.noise import NoiseLevels


# every test here needs the SDXL trainer's fixtures (tiny_pipeline, cli_args): the SDXL ones
pytestmark = pytest.mark.parametrize("dpo", ["sdxl"], indirect=True)


def time_ids(crops):
    """The time ids the SDXL UNet is conditioned on, for (pairs, winner/loser, 6) crops as the cache holds them: the
    winners' rows, then the losers'."""
    n = len(crops)
    batch = {"prompt_embeds": torch.zeros(n, 1, 1), "pooled_prompt_embeds": torch.zeros(n, 1), "crops": crops}
    return dpo_xl.conditioning(batch, "cpu")["added_cond_kwargs"]["time_ids"]


@pytest.mark.parametrize("random_crop", [False, True], ids=["centre-crop", "random-crop"])
def test_time_ids_are_each_images_own_size_and_crop(dpo, cli_args, pickapic_data, random_crop):
    """SDXL is conditioned on each image's original size, the top-left of its crop and the crop's size, as its
    pipeline's _get_add_time_ids orders them; a mirrored image's crop is mirrored too."""
    args = dpo_xl.parse_args(cli_args(random_crop=random_crop))
    pairs = load_preference_pairs(args, "train")
    rows = dataset_rows(pickapic_data)
    differing = off_centre = 0
    for item in PairPixels(args, [PairsToDecode(pairs)]):
        if not item["ok"]:
            continue
        row = rows[pairs.rows[item["index"]]]
        images = [Image.open(io.BytesIO(row[c])) for c in ("jpg_0", "jpg_1")]
        if row["label_0"] == 0.0:
            images.reverse()  # winner first
        ids = time_ids(item["crops"]).view(2, -1, 6)  # (winner/loser, orientation, 6)
        for side, image in enumerate(images):
            original, flipped = ids[side]
            assert original[:2].tolist() == [image.height, image.width]
            assert original[4:].tolist() == [RESOLUTION, RESOLUTION]
            resized = [max(RESOLUTION, round(length * RESOLUTION / min(image.size))) for length in image.size[::-1]]
            assert flipped[3] == resized[1] - original[3] - RESOLUTION  # the mirrored crop offset
            margin = np.array(resized) - RESOLUTION  # room for the crop: (height, width)
            offset = original[2:4].numpy()
            assert (0 <= offset).all() and (offset <= margin).all()
            off_centre += int(np.abs(offset - margin / 2).max() > 1)
        differing += images[0].size != images[1].size
    assert differing > 0  # the fixture holds pairs whose two images differ in size
    assert (off_centre > 0) == random_crop


def test_cached_embeddings_and_time_ids_equal_the_pipelines_own(dpo, cli_args, tiny_sdxl_model, tmp_path):
    run_trainer(dpo_xl, cli_args(max_train_steps=1))
    (cache,) = cache_folders(tmp_path / "cache")
    pairs = CachedPreferencePairs(cache)
    index = int(pairs.valid_indices[0])
    caption = load_preference_pairs(dpo_xl.parse_args(cli_args(output_dir=tmp_path / "x")), "train").captions[index]
    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model)
    prompt_embeds, _, pooled, _ = pipeline.encode_prompt(caption, do_classifier_free_guidance=False)
    item = pairs[(index, int(pairs.encoded[index].argmax()), False)]  # the orientation a 1-epoch run encoded
    torch.testing.assert_close(item["prompt_embeds"].float(), prompt_embeds[0], atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(item["pooled_prompt_embeds"].float(), pooled[0], atol=2e-3, rtol=1e-3)
    # the time ids from crops.npy, as the pipeline builds them from (original size, crop top-left, target size)
    winner = item["crops"][0].tolist()
    expected = pipeline._get_add_time_ids(
        tuple(winner[:2]),
        tuple(winner[2:4]),
        (RESOLUTION, RESOLUTION),
        torch.float32,
        text_encoder_projection_dim=pipeline.text_encoder_2.config.projection_dim,
    )
    torch.testing.assert_close(time_ids(item["crops"][None])[:1], expected)


def test_turbo_trains_on_the_four_step_grid(dpo, cli_args):
    noise = dpo_xl.load_noise(dpo_xl.parse_args(cli_args(is_turbo=True)))
    levels = noise.draw(1000, torch.Generator().manual_seed(0), "cpu")
    assert set(levels.timesteps.tolist()) == {249, 499, 749, 999}


@pytest.mark.parametrize("is_turbo", [False, True])
def test_turbo_sees_pure_noise_at_its_first_step_as_it_was_distilled(dpo, cli_args, is_turbo):
    noise = dpo_xl.load_noise(dpo_xl.parse_args(cli_args(is_turbo=is_turbo)))
    generator = torch.Generator().manual_seed(0)
    winner, loser, pure_noise = torch.randn(3, 1, 4, 4, 4, generator=generator)
    at_999 = NoiseLevels(torch.tensor([999]))
    noisy_winner, _ = noise.corrupt(winner, pure_noise, at_999)
    noisy_loser, _ = noise.corrupt(loser, pure_noise, at_999)
    signal_left = (noisy_winner - noisy_loser).norm() / (winner - loser).norm()  # of the image, at t = 999
    if is_turbo:  # zero terminal SNR: pure noise, as Turbo's first sampling step sees
        assert signal_left == 0
    else:  # SDXL base's scaled-linear schedule keeps sqrt(alphas_cumprod[999]) = 6.8 % of the image
        assert 0.06 < signal_left < 0.075
    # the rest of the schedule is nearly unchanged: t = 0 is still almost clean
    assert noise.scheduler.alphas_cumprod[0] > 0.99


def test_turbo_validation_defaults_to_four_steps_without_guidance_unless_set(dpo, cli_args):
    base, turbo = dpo_xl.parse_args(cli_args()), dpo_xl.parse_args(cli_args(is_turbo=True))
    assert (base.num_validation_inference_steps, base.validation_guidance_scale) == (25, 5.0)
    assert (turbo.num_validation_inference_steps, turbo.validation_guidance_scale) == (4, 0.0)
    chosen = dpo_xl.parse_args(
        cli_args(is_turbo=True, num_validation_inference_steps=2, validation_guidance_scale=1.5)
    )
    assert (chosen.num_validation_inference_steps, chosen.validation_guidance_scale) == (2, 1.5)


def test_turbo_end_to_end_with_held_out_evaluation_validation_images_and_model_card(dpo, cli_args, tmp_path):
    result = run_trainer(
        dpo,
        cli_args(
            is_turbo=True,
            num_validation_pairs=2,
            run_validation=True,
            validation_prompts=["a shape"],
            max_train_steps=2,
            validation_steps=2,
        ),
    )
    assert [e["step"] for e in result["evaluations"]] == [0, 2]
    start, end = result["evaluations"]
    assert start["eval/loss"] == pytest.approx(np.log(2), abs=1e-6)  # the adapter starts as the reference
    assert np.isfinite(end["eval/loss"]) and end["eval/model_mse_w"] != start["eval/model_mse_w"]
    validation = tmp_path / "out" / "validation"
    assert sorted(p.name for p in validation.iterdir()) == ["reference.png", "step-000002.png"]
    assert "num_inference_steps=4, guidance_scale=0.0" in (tmp_path / "out" / "README.md").read_text()


def test_the_vae_encodes_in_fp32_unless_a_safe_vae_is_given_which_gets_its_own_cache(dpo, cli_args, tiny_sdxl_model):
    args = dpo_xl.parse_args(cli_args())
    assert dpo_xl.vae_dtype(args, torch.float16) == torch.float32
    custom = dpo_xl.parse_args(cli_args(pretrained_vae_model_name_or_path=f"{tiny_sdxl_model}/vae"))
    assert dpo_xl.vae_dtype(custom, torch.float16) == torch.float16
    # latents of another VAE are other latents: the cache key (the cache folder's name) changes
    assert dpo_xl.cache_key(args, torch.float32) != dpo_xl.cache_key(custom, torch.float32)


def linked_parts(model, folder, leave_out):
    """A new model folder linking every part of `model` but `leave_out`."""
    folder.mkdir()
    for part in os.listdir(model):
        if part != leave_out:
            os.symlink(os.path.join(model, part), folder / part)
    return folder


@pytest.fixture
def sdxl_model_copy(tiny_sdxl_model, tmp_path):
    """The tiny SDXL pipeline's parts (linked) under a model_index.json of this test's own, which it may edit."""
    folder = linked_parts(tiny_sdxl_model, tmp_path / "model", leave_out="model_index.json")
    (folder / "model_index.json").write_text(open(os.path.join(tiny_sdxl_model, "model_index.json")).read())
    return folder


def test_the_dropout_row_is_the_pipelines_own_unconditional_input(dpo, cli_args, sdxl_model_copy, tmp_path):
    model_index = sdxl_model_copy / "model_index.json"
    caches = []
    for force_zeros in (True, False):  # SDXL base's setting, then a model that encodes "" instead
        model_index.write_text(
            json.dumps({**json.loads(model_index.read_text()), "force_zeros_for_empty_prompt": force_zeros})
        )
        output_dir = tmp_path / f"out-{force_zeros}"
        run_trainer(
            dpo_xl, cli_args(pretrained_model_name_or_path=sdxl_model_copy, max_train_steps=1, output_dir=output_dir)
        )
        (cache,) = set(cache_folders(tmp_path / "cache")) - set(caches)  # the changed setting got a cache of its own
        caches.append(cache)
        pipeline = StableDiffusionXLPipeline.from_pretrained(sdxl_model_copy)
        _, negative_embeds, _, negative_pooled = pipeline.encode_prompt("a caption", do_classifier_free_guidance=True)
        assert negative_embeds.abs().max() == 0 if force_zeros else negative_embeds.abs().max() > 0
        for name, expected in (("prompt_embeds", negative_embeds), ("pooled_prompt_embeds", negative_pooled)):
            row_0 = torch.from_numpy(np.load(cache / f"{name}.npy")[0]).float()
            torch.testing.assert_close(row_0, expected[0], atol=2e-3, rtol=1e-3)


@pytest.fixture
def model_without_vae(tiny_sdxl_model, tmp_path):
    """The tiny SDXL pipeline's parts (linked) but its VAE: a base folder to use with a separately given VAE."""
    return linked_parts(tiny_sdxl_model, tmp_path / "no-vae", leave_out="vae")


def test_a_full_fine_tune_with_a_separate_vae_validates_and_saves_that_vae(
    dpo, cli_args, tiny_sdxl_model, model_without_vae, tmp_path
):
    vae_folder = tmp_path / "vae"
    vae = AutoencoderKL.from_pretrained(tiny_sdxl_model, subfolder="vae")
    vae.register_to_config(force_upcast=False)  # an fp16-safe VAE, as madebyollin/sdxl-vae-fp16-fix says it is
    vae.save_pretrained(vae_folder)
    run_trainer(
        dpo,
        cli_args(
            pretrained_model_name_or_path=model_without_vae,
            pretrained_vae_model_name_or_path=vae_folder,
            train_mode="full",
            run_validation=True,
            validation_prompts=["a shape"],
            num_validation_inference_steps=2,
        ),
    )
    assert (tmp_path / "out" / "validation" / "step-000002.png").exists()
    saved = StableDiffusionXLPipeline.from_pretrained(tmp_path / "out")
    assert saved.vae.config.force_upcast is False  # the VAE the run used, not one of the base folder
    for name, weight in vae.state_dict().items():
        torch.testing.assert_close(saved.vae.state_dict()[name], weight, msg=name)


def test_a_missing_vae_folder_is_named_before_anything_loads(dpo, cli_args, tmp_path, capsys):
    with pytest.raises(SystemExit):
        dpo_xl.parse_args(cli_args(pretrained_vae_model_name_or_path=tmp_path / "no-such-vae"))
    assert "--pretrained_vae_model_name_or_path" in capsys.readouterr().err


def test_validation_decodes_in_fp32_outside_mixed_precision_autocast(dpo, cli_args):
    """The SDXL VAE overflows in fp16: under --mixed_precision autocast its convolutions would run in half precision
    (bf16 here, as CPUs autocast to) unless it is fp16-safe."""
    from diffusers.models.autoencoders.vae import Decoder

    decoded_dtypes = []

    def record(module, inputs, output):
        if isinstance(module, Decoder):
            decoded_dtypes.append(output.dtype)

    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        run_trainer(
            dpo,
            cli_args(
                mixed_precision="bf16",
                max_train_steps=1,
                run_validation=True,
                validation_prompts=["a shape"],
                num_validation_inference_steps=1,
            ),
        )
    finally:
        hook.remove()
    assert decoded_dtypes and set(decoded_dtypes) == {torch.float32}  # the reference grid's and the step's images
