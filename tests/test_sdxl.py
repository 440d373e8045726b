"""What only the SDXL trainer does: two text encoders, per-image micro-conditioning, its VAE, SDXL-Turbo."""

import io

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from testing_utils import RESOLUTION, cache_folders, dataset_rows, run_trainer

import train_diffusion_dpo_sdxl as dpo_xl


@pytest.fixture
def xl_args(cli_args, tiny_sdxl_model):
    return lambda **flags: cli_args(pretrained_model_name_or_path=tiny_sdxl_model, **flags)


def test_time_ids_record_each_images_own_size_and_crop(xl_args, pickapic_data):
    args = dpo_xl.parse_args(xl_args())
    pairs = dpo_xl.load_preference_pairs(args, "train")
    rows = dataset_rows(pickapic_data)
    differing = 0
    for item in dpo_xl.PairPixels(args, [dpo_xl.PairsToDecode(pairs)]):
        if not item["ok"]:
            continue
        row = rows[pairs.rows[item["index"]]]
        images = [Image.open(io.BytesIO(row[c])) for c in ("jpg_0", "jpg_1")]
        if row["label_0"] == 0.0:
            images.reverse()  # winner first
        for side, image in enumerate(images):
            original, flipped = item["time_ids"][0, side], item["time_ids"][1, side]
            assert original[:2].tolist() == [image.height, image.width]
            assert original[4:].tolist() == [RESOLUTION, RESOLUTION]
            resized_width = max(RESOLUTION, round(image.width * RESOLUTION / min(image.size)))
            assert flipped[3] == resized_width - original[3] - RESOLUTION  # the mirrored crop offset
        differing += images[0].size != images[1].size
    assert differing > 0  # the fixture holds pairs whose two images differ in size


def test_cached_embeddings_equal_the_pipelines_own_encode_prompt(xl_args, tiny_sdxl_model, tmp_path):
    run_trainer(dpo_xl, xl_args(max_train_steps=1))
    (cache,) = cache_folders(tmp_path / "cache")
    pairs = dpo_xl.CachedPreferencePairs(cache)
    index = int(pairs.valid_indices[0])
    caption = dpo_xl.load_preference_pairs(dpo_xl.parse_args(xl_args(output_dir=tmp_path / "x")), "train").captions[
        index
    ]
    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model)
    prompt_embeds, _, pooled, _ = pipeline.encode_prompt(caption, do_classifier_free_guidance=False)
    item = pairs[(index, int(pairs.encoded[index].argmax()), False)]  # the orientation a 1-epoch run encoded
    torch.testing.assert_close(item["prompt_embeds"].float(), prompt_embeds[0], atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(item["pooled_prompt_embeds"].float(), pooled[0], atol=2e-3, rtol=1e-3)
    assert item["time_ids"].shape == (2, 6)


def test_turbo_trains_on_the_four_step_grid():
    args = dpo_xl.parse_args(["--is_turbo", "--output_dir", "unused"])
    scheduler = dpo_xl.DDPMScheduler(num_train_timesteps=1000)
    timesteps = dpo_xl.sample_timesteps(1000, scheduler, args, torch.Generator().manual_seed(0), "cpu")
    assert set(timesteps.tolist()) == {249, 499, 749, 999}


def test_the_vae_encodes_in_fp32_unless_a_safe_vae_is_given(xl_args, tiny_sdxl_model, tmp_path):
    args = dpo_xl.parse_args(xl_args())
    assert dpo_xl.vae_dtype(args, torch.float16) == torch.float32
    custom = dpo_xl.parse_args(xl_args(pretrained_vae_model_name_or_path=f"{tiny_sdxl_model}/vae"))
    assert dpo_xl.vae_dtype(custom, torch.float16) == torch.float16
    # a separately given VAE trains, and gets its own cache
    run_trainer(dpo_xl, xl_args(max_train_steps=1, output_dir=tmp_path / "a"))
    run_trainer(
        dpo_xl,
        xl_args(
            max_train_steps=1, output_dir=tmp_path / "b", pretrained_vae_model_name_or_path=f"{tiny_sdxl_model}/vae"
        ),
    )
    assert len(cache_folders(tmp_path / "cache")) == 2
