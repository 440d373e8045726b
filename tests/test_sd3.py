"""The SD3 trainer end to end on the tiny SD3 pipeline: the loss at identity, the rectified-flow inputs, the cached
text embeddings, saved weights that reload, exact resume, bad input in one line, --sft and --no_t5; the data layouts,
label smoothing and MaPO it shares with the SDXL script, and why it writes no kohya-format file. (The loss formulas
themselves are tested on all three scripts in test_dpo_loss.py.)"""

import math
import shutil

import convert_lora_to_kohya
import numpy as np
import pytest
import tiny_assets
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.utils import convert_all_state_dict_to_peft, convert_state_dict_to_kohya
from safetensors.torch import load_file
from testing_utils import (
    RESOLUTION,
    assert_same_tensors,
    cache_folders,
    lora_weights,
    parse_error,
    run_cli,
    run_trainer,
)

import train_diffusion_dpo_sd3 as dpo_sd3


LN2 = math.log(2)
MAX_SEQUENCE_LENGTH = 16  # T5 tokens per caption: the tiny captions need a few


@pytest.fixture
def tiny_pipeline(tiny_sd3_model):
    """conftest's cli_args builds its command lines on this: here, the tiny SD3 pipeline."""
    return tiny_sd3_model


@pytest.fixture
def sd3_args(cli_args):
    """cli_args with this trainer's short T5 sequence."""

    def build(**overrides):
        return cli_args(**{"max_sequence_length": MAX_SEQUENCE_LENGTH, **overrides})

    return build


def transformer_output(transformer):
    """The transformer's velocity prediction on fixed random inputs."""
    generator = torch.Generator().manual_seed(0)
    config = transformer.config
    sample = torch.randn(1, config.in_channels, 16, 16, generator=generator)
    text = torch.randn(1, 8, config.joint_attention_dim, generator=generator)
    pooled = torch.randn(1, config.pooled_projection_dim, generator=generator)
    with torch.no_grad():
        return transformer(sample, text, pooled, torch.tensor([500.0])).sample


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
@pytest.mark.parametrize("train_mode", ["lora", "full"])
def test_first_step_loss_is_ln2_when_policy_equals_reference(sd3_args, train_mode, mixed_precision):
    """Under mixed precision too: the full fine-tune's frozen copy is held in fp32 like the trained one, since in
    bf16 weights the transformer's norms compute differently (a step-1 loss of 0.49 when it was not)."""
    result = run_trainer(
        dpo_sd3,
        sd3_args(train_mode=train_mode, max_train_steps=1, mixed_precision=mixed_precision, num_validation_pairs=2),
    )
    assert result["evaluations"][0]["eval/loss"] == pytest.approx(LN2, abs=1e-6)  # held-out pairs, before step 1
    first = result["history"][0]
    assert first["loss"] == pytest.approx(LN2, abs=1e-4)
    assert first["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert first["model_mse_w"] == pytest.approx(first["ref_mse_w"], abs=1e-7)


def test_rectified_flow_inputs_share_sigma_and_noise_within_a_pair(sd3_args, monkeypatch):
    args = dpo_sd3.parse_args(sd3_args())
    scheduler = dpo_sd3.load_noise_scheduler(args)
    sigmas, timesteps = dpo_sd3.sample_sigmas(4096, scheduler, args, torch.Generator().manual_seed(0), "cpu")
    assert ((0 < sigmas) & (sigmas <= 1)).all() and torch.allclose(timesteps, sigmas * 1000)
    assert 0.6 < sigmas.median() < 0.85  # logit-normal around u = 0.5, moved up by SD3's shift 3: 0.75
    latents, noise = torch.randn(2, 3, 16, 4, 4)
    noisy, target = dpo_sd3.noisy_latents_and_target(latents, noise, torch.tensor([0.0, 1.0, 0.25]))
    torch.testing.assert_close(noisy[0], latents[0])  # sigma 0: the image
    torch.testing.assert_close(noisy[1], noise[1])  # sigma 1: pure noise
    torch.testing.assert_close(noisy[2], 0.75 * latents[2] + 0.25 * noise[2])
    torch.testing.assert_close(target, noise - latents)  # the velocity

    seen = []
    original = dpo_sd3.denoising_errors

    def record(model, noisy_latents, timesteps, conditioning, target, weighting):
        seen.append((noisy_latents, timesteps, target))
        return original(model, noisy_latents, timesteps, conditioning, target, weighting)

    monkeypatch.setattr(dpo_sd3, "denoising_errors", record)
    transformer, reference = dpo_sd3.build_transformers(args, torch.device("cpu"), torch.float32)
    winners, losers = torch.randn(2, 2, 16, 16, 16)
    embeds = torch.randn(2, 77 + MAX_SEQUENCE_LENGTH, transformer.config.joint_attention_dim)
    batch = {
        "pair_latents": torch.stack([winners, losers], dim=1),
        "prompt_embeds": embeds,
        "pooled_prompt_embeds": torch.randn(2, transformer.config.pooled_projection_dim),
    }
    loss, _ = dpo_sd3.compute_loss(batch, transformer, reference, scheduler, args, torch.Generator().manual_seed(1))
    assert loss.item() == pytest.approx(LN2, abs=1e-5)
    (noisy, timesteps, target), reference_inputs = seen
    timestep_w, timestep_l = timesteps.chunk(2)
    assert torch.equal(timestep_w, timestep_l)
    latents = torch.cat([winners, losers])
    sigma = (timesteps / 1000).view(-1, 1, 1, 1)
    noise = target + latents
    noise_w, noise_l = noise.chunk(2)
    torch.testing.assert_close(noise_w, noise_l)  # one noise per pair
    torch.testing.assert_close(noisy, (1 - sigma) * latents + sigma * noise)
    assert all(torch.equal(a, b) for a, b in zip(reference_inputs, seen[0]))  # the reference sees the same


@pytest.mark.parametrize("no_t5", [False, True], ids=["t5", "no-t5"])
def test_cached_embeddings_equal_the_pipelines_own_encode_prompt(sd3_args, tiny_sd3_model, tmp_path, no_t5):
    run_trainer(dpo_sd3, sd3_args(max_train_steps=1, no_t5=no_t5))
    (cache,) = cache_folders(tmp_path / "cache")
    pairs = dpo_sd3.CachedPreferencePairs(cache)
    index = int(pairs.valid_indices[0])
    args = dpo_sd3.parse_args(sd3_args(output_dir=tmp_path / "x"))
    caption = dpo_sd3.load_preference_pairs(args, "train").captions[index]
    without_t5 = {"text_encoder_3": None, "tokenizer_3": None} if no_t5 else {}
    pipeline = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_model, **without_t5)
    prompt_embeds, negative_embeds, pooled, negative_pooled = pipeline.encode_prompt(
        caption, None, None, do_classifier_free_guidance=True, max_sequence_length=MAX_SEQUENCE_LENGTH
    )
    item = pairs[(index, int(pairs.encoded[index].argmax()), False)]  # the orientation a 1-epoch run encoded
    torch.testing.assert_close(item["prompt_embeds"].float(), prompt_embeds[0], atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(item["pooled_prompt_embeds"].float(), pooled[0], atol=2e-3, rtol=1e-3)
    assert (item["prompt_embeds"][77:].abs().max() == 0) == no_t5  # T5's part: zeros without it
    # prompt dropout trains the pipeline's unconditional input: the empty caption's embedding
    dropped = pairs[(index, int(pairs.encoded[index].argmax()), True)]
    torch.testing.assert_close(dropped["prompt_embeds"].float(), negative_embeds[0], atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(dropped["pooled_prompt_embeds"].float(), negative_pooled[0], atol=2e-3, rtol=1e-3)


def test_lora_targets_the_joint_attention_reloads_with_load_lora_weights_and_validates(
    sd3_args, tiny_sd3_model, tmp_path
):
    validation = dict(run_validation=True, validation_prompts=["a shape"], num_validation_inference_steps=2)
    run_trainer(dpo_sd3, sd3_args(learning_rate=1e-2, max_train_steps=2, checkpointing_steps=2, **validation))
    # the untuned model (adapter off) once, then the trained one
    assert sorted(p.name for p in (tmp_path / "out" / "validation").iterdir()) == ["reference.png", "step-000002.png"]
    saved = lora_weights(tmp_path / "out")
    for module in dpo_sd3.LORA_TARGET_MODULES:  # the image stream's projections and the text stream's
        assert any(f".{module}.lora_A" in name for name in saved), module
    pipeline = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_model)
    base = transformer_output(pipeline.transformer)
    for weights in (tmp_path / "out", tmp_path / "out" / "checkpoint-2"):
        pipeline.load_lora_weights(str(weights), adapter_name=weights.name.replace("-", "_"))
        assert (transformer_output(pipeline.transformer) - base).abs().max() > 1e-4
        pipeline.delete_adapters(weights.name.replace("-", "_"))
    torch.testing.assert_close(transformer_output(pipeline.transformer), base)  # the adapter is all that changed


def test_full_fine_tuning_saves_a_pipeline_that_loads_and_renders(sd3_args, tiny_sd3_model, tmp_path):
    result = run_trainer(dpo_sd3, sd3_args(train_mode="full", learning_rate=1e-3, max_train_steps=2))
    assert all(math.isfinite(h["loss"]) for h in result["history"])
    tuned = StableDiffusion3Pipeline.from_pretrained(str(tmp_path / "out"))
    base = SD3Transformer2DModel.from_pretrained(tiny_sd3_model, subfolder="transformer")
    assert (transformer_output(tuned.transformer) - transformer_output(base)).abs().max() > 1e-4
    image = tuned("a shape", num_inference_steps=2, height=RESOLUTION, width=RESOLUTION).images[0]
    assert image.size == (RESOLUTION, RESOLUTION)


@pytest.mark.parametrize("train_mode", ["lora", "full"])
def test_resume_after_two_steps_gives_the_weights_of_four_uninterrupted(sd3_args, tmp_path, train_mode):
    common = dict(train_mode=train_mode, max_train_steps=4, learning_rate=1e-3, train_batch_size=3)
    straight = run_trainer(dpo_sd3, sd3_args(output_dir=tmp_path / "straight", checkpointing_steps=2, **common))
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    shutil.copytree(tmp_path / "straight" / "checkpoint-2", interrupted / "checkpoint-2")
    resumed = run_trainer(dpo_sd3, sd3_args(output_dir=interrupted, resume_from_checkpoint="latest", **common))
    assert [h["step"] for h in resumed["history"]] == [3, 4]
    for mine, theirs in zip(resumed["history"], straight["history"][2:]):
        assert mine == pytest.approx(theirs, abs=1e-6)  # same data, noise, sigmas and learning rate
    if train_mode == "lora":
        assert_same_tensors(lora_weights(interrupted), lora_weights(tmp_path / "straight"))
    else:
        weights = "transformer/diffusion_pytorch_model.safetensors"
        assert_same_tensors(load_file(interrupted / weights), load_file(tmp_path / "straight" / weights))


def test_sft_and_no_t5_train_with_held_out_evaluation_validation_images_and_model_card(sd3_args, tmp_path):
    result = run_trainer(
        dpo_sd3,
        sd3_args(
            sft=True,
            no_t5=True,
            learning_rate=1e-3,
            num_validation_pairs=2,
            run_validation=True,
            validation_prompts=["a shape"],
            num_validation_inference_steps=2,
            validation_steps=2,
            weighting_scheme="cosmap",
        ),
    )
    assert [e["step"] for e in result["evaluations"]] == [0, 2]
    start, end = result["evaluations"]
    assert start["eval/loss"] == pytest.approx(LN2, abs=1e-6)  # the adapter starts as the reference
    assert np.isfinite(end["eval/loss"]) and end["eval/model_mse_w"] != start["eval/model_mse_w"]
    assert set(result["history"][0]) >= {"loss", "model_mse_w"} and "reward_margin" not in result["history"][0]
    lora_up = [w for name, w in lora_weights(tmp_path / "out").items() if "lora_B" in name]
    assert lora_up and any(w.abs().max() > 0 for w in lora_up)
    assert sorted(p.name for p in (tmp_path / "out" / "validation").iterdir()) == ["step-000002.png"]
    card = (tmp_path / "out" / "README.md").read_text()
    for expected in ("SFT on preferred images", "StableDiffusion3Pipeline", "text_encoder_3=None", "sd3"):
        assert expected in card, expected


@pytest.mark.parametrize(
    "flags,message",
    [
        ({"resolution": 40}, "--resolution must be a positive multiple of 16"),
        ({"max_sequence_length": 513}, "--max_sequence_length must lie in [1, 512]"),
        ({"weighting_scheme": "uniform"}, "invalid choice: 'uniform'"),
        ({"logit_std": 0}, "--logit_std must be positive"),
        ({"beta_dpo": float("nan")}, "--beta_dpo must be a finite number"),
        ({"label_smoothing": 0.5}, "--label_smoothing must lie in [0, 0.5)"),
        ({"loss_type": "mapo", "sft": True}, "choose one of --sft and --loss_type mapo"),
        ({"min_vote_margin": 0}, "--min_vote_margin must be a positive number"),
        ({"data_layout": "hpd"}, "invalid choice: 'hpd'"),
        ({"output_kohya_format": True}, "--output_kohya_format: not for SD3"),
    ],
    ids=[
        "resolution",
        "sequence-length",
        "weighting",
        "logit-std",
        "beta",
        "smoothing",
        "mapo-sft",
        "votes",
        "layout",
        "kohya",
    ],
)
def test_flag_errors_stop_in_one_line_before_anything_loads(sd3_args, capsys, flags, message):
    assert message in parse_error(dpo_sd3, sd3_args(**flags), capsys)


def test_other_models_and_a_missing_t5_are_named_in_one_line(
    sd3_args, tiny_sdxl_model, tiny_sd3_model, tmp_path, capsys
):
    completed = run_cli(dpo_sd3, sd3_args(pretrained_model_name_or_path=tiny_sdxl_model))
    assert completed.returncode == 2 and "Traceback" not in completed.stderr  # library notices may come before
    line = completed.stderr.strip().splitlines()[-1]
    assert "holds a UNet" in line and "train_diffusion_dpo_sdxl.py" in line
    without_t5 = tmp_path / "without-t5"
    shutil.copytree(tiny_sd3_model, without_t5, ignore=shutil.ignore_patterns("text_encoder_3", "tokenizer_3"))
    with pytest.raises(SystemExit):
        dpo_sd3.parse_args(sd3_args(pretrained_model_name_or_path=without_t5))
    assert "pass --no_t5" in capsys.readouterr().err
    with pytest.raises(dpo_sd3.InputError, match="--lora_target_modules"):
        run_trainer(dpo_sd3, sd3_args(pretrained_model_name_or_path=without_t5, no_t5=True, lora_target_modules="q"))


@pytest.mark.parametrize("layout", ["chosen_rejected", "image_folder", "webdataset"])
def test_other_data_layouts_train(sd3_args, tmp_path, layout):
    """The SDXL script's layouts: rows of chosen/rejected images, an image folder with metadata.jsonl, webdataset
    shards; the layout is part of the cache key."""
    build = {
        "chosen_rejected": tiny_assets.build_chosen_rejected_dataset,
        "image_folder": tiny_assets.build_image_folder_dataset,
        "webdataset": tiny_assets.build_webdataset_dataset,
    }[layout]
    data = build(str(tmp_path / "data"), n_pairs=6, flat=True)
    args = dpo_sd3.parse_args(sd3_args(dataset_name=data))
    pairs = dpo_sd3.load_preference_pairs(args, "train")
    expected = "pickapic" if layout == "webdataset" else "chosen_rejected"  # webdataset shards in Pick-a-Pic's columns
    assert pairs.layout.name == expected and len(pairs) == 6
    rows = list(dpo_sd3.read_preference_rows(args))  # what examples/label_pairs_with_reward_model.py reads
    assert [row.row for row in rows] == list(range(6))
    assert [row.label == 0.0 for row in rows] == pairs.second_is_winner.tolist()  # every row a decided pair
    result = run_trainer(dpo_sd3, sd3_args(dataset_name=data, learning_rate=1e-2, num_validation_pairs=2))
    assert result["global_step"] == 2 and result["evaluations"][0]["eval/loss"] == pytest.approx(LN2, abs=1e-6)
    assert result["evaluations"][-1]["eval/model_mse_w"] != result["evaluations"][0]["eval/model_mse_w"]
    assert any(w.abs().max() > 0 for name, w in lora_weights(tmp_path / "out").items() if "lora_B" in name)


def test_vote_counts_decide_the_winner_with_a_margin(sd3_args, tmp_path):
    data = tiny_assets.build_votes_dataset(str(tmp_path / "data"), n_pairs=4, flat=True, votes=((3, 1), (5, 4)))
    pairs = dpo_sd3.load_preference_pairs(dpo_sd3.parse_args(sd3_args(dataset_name=data)), "train")
    assert pairs.layout.name == "votes" and len(pairs) == 4
    # 5 votes to 4 is a tie below a margin of 2: half the pairs
    pairs = dpo_sd3.load_preference_pairs(dpo_sd3.parse_args(sd3_args(dataset_name=data, min_vote_margin=2)), "train")
    assert len(pairs) == 2


def test_label_smoothing_trains_from_ln2_and_is_named_on_the_model_card(sd3_args, tmp_path):
    # at the reference both terms are ln 2: -(1 - eps) logsigmoid(0) - eps logsigmoid(0)
    result = run_trainer(dpo_sd3, sd3_args(label_smoothing=0.1, learning_rate=1e-2, num_validation_pairs=2))
    assert result["history"][0]["loss"] == pytest.approx(LN2, abs=1e-4)
    assert result["evaluations"][0]["eval/loss"] == pytest.approx(LN2, abs=1e-6)
    assert "label smoothing ε = 0.1" in (tmp_path / "out" / "README.md").read_text()


@pytest.mark.parametrize("train_mode", ["lora", "full"])
def test_mapo_loads_no_reference_and_changes_the_transformer(
    sd3_args, tiny_sd3_model, tmp_path, monkeypatch, train_mode
):
    loaded, adapter_switches = [], []
    load_transformer, disable = dpo_sd3.load_transformer, SD3Transformer2DModel.disable_adapters
    monkeypatch.setattr(dpo_sd3, "load_transformer", lambda *a, **k: loaded.append(1) or load_transformer(*a, **k))
    monkeypatch.setattr(
        SD3Transformer2DModel, "disable_adapters", lambda self: adapter_switches.append(1) or disable(self)
    )
    validation = dict(run_validation=True, validation_prompts=["a shape"], num_validation_inference_steps=1)
    result = run_trainer(
        dpo_sd3,
        sd3_args(
            loss_type="mapo",
            train_mode=train_mode,
            learning_rate=1e-2 if train_mode == "lora" else 1e-3,
            num_validation_pairs=2,
            validation_timesteps=2,
            validation_steps=2,
            **validation,
        ),
    )
    # reference-free: one transformer loaded (no frozen copy), its adapter never switched off
    assert len(loaded) == 1 and adapter_switches == []
    assert "policy_acc" in result["history"][0] and "ref_mse_w" not in result["history"][0]
    for evaluation in result["evaluations"]:
        assert {"eval/policy_acc", "eval/policy_margin"} <= evaluation.keys() and "eval/implicit_acc" not in evaluation
    # no untuned-model grid: there is no reference to render it with
    assert sorted(p.name for p in (tmp_path / "out" / "validation").iterdir()) == ["step-000002.png"]
    assert "MaPO (β_mapo = 0.1)" in (tmp_path / "out" / "README.md").read_text()
    pipeline = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_model)
    base = transformer_output(pipeline.transformer)
    if train_mode == "lora":
        pipeline.load_lora_weights(str(tmp_path / "out"))
        tuned = transformer_output(pipeline.transformer)
    else:
        tuned = transformer_output(SD3Transformer2DModel.from_pretrained(tmp_path / "out", subfolder="transformer"))
    assert (tuned - base).abs().max() > 1e-4


def test_diffusers_kohya_conversion_gives_sd3_keys_nothing_loads_so_the_flag_is_refused(
    sd3_args, tiny_sd3_model, tmp_path
):
    """Why --output_kohya_format is refused for SD3: diffusers' convert_state_dict_to_kohya names SD3 layers
    `transformer_transformer_blocks_...`, which neither ComfyUI (its SD3 names: `transformer.<module>`, this
    script's file, or `lora_transformer_<module>`) nor diffusers' own StableDiffusion3Pipeline loads (it converts no
    kohya keys for SD3 and refuses the file)."""
    run_trainer(dpo_sd3, sd3_args(learning_rate=1e-2, max_train_steps=1))
    saved = lora_weights(tmp_path / "out")
    assert all(name.startswith("transformer.") and ".lora_" in name for name in saved)  # ComfyUI's diffusers names
    kohya = convert_state_dict_to_kohya(convert_all_state_dict_to_peft(saved))
    assert all(key.startswith("transformer_transformer_blocks_") for key in kohya)  # no lora_ prefix: not kohya's
    pipeline = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_model)
    base = transformer_output(pipeline.transformer)
    with pytest.raises(ValueError, match="Invalid LoRA checkpoint"):  # its .alpha keys hold no "lora"
        pipeline.load_lora_weights(kohya)
    torch.testing.assert_close(transformer_output(pipeline.transformer), base)
    # the standalone converter says so in one line too
    with pytest.raises(SystemExit, match="SD3"):
        convert_lora_to_kohya.main([str(tmp_path / "out")])
