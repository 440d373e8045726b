"""Tiny, offline stand-ins for a Stable Diffusion 1.x checkpoint and the Pick-a-Pic v2 dataset.

Everything is built from configs with random weights, so tests and demos need no hub access.
The dataset carries a learnable preference: in every pair the "warm" image (red/orange/yellow
shape) beats the "cool" one (blue/cyan/green shape); demo_scoring.py scores generated samples.

Usage: python examples/tiny_assets.py OUTPUT_DIR [--n_pairs N] [--prediction_type epsilon]
"""

import argparse
import io
import json
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image, ImageDraw
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)


BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"
WHOLE_WORDS = (
    "a", "an", "of", "on", "photo", "image", "simple", "shape", "circle", "square",
    "gray", "background", "red", "orange", "yellow", "blue", "cyan", "green",
)  # fmt: skip
CAPTION_POOL = (
    "a shape", "a photo of a shape", "a simple shape", "an image of a shape",
    "a shape on a gray background", "a photo of a simple shape",
)  # fmt: skip

BACKGROUND = (210, 210, 210)
WARM_COLORS = ((220, 40, 40), (240, 140, 30), (235, 210, 40))  # red, orange, yellow
COOL_COLORS = ((40, 70, 220), (30, 190, 210), (40, 170, 70))  # blue, cyan, green


def _write_bpe_files(folder):
    """Write a CLIP-style vocab.json + merges.txt: all characters plus a few whole words."""
    tokens = [BOS_TOKEN, EOS_TOKEN]
    tokens += [c for c in CHARACTERS] + [c + END_OF_WORD for c in CHARACTERS]
    merges = []
    for word in WHOLE_WORDS:
        # Grow each word from its end ("e</w>" -> "pe</w>" -> "ape</w>" ...). Every merge then
        # joins a plain character to an end-of-word piece, so inside any word only the pair next
        # to its last piece can ever merge: one word's merges cannot split another word apart.
        piece = word[-1] + END_OF_WORD
        for char in reversed(word[:-1]):
            merged = char + piece
            if merged not in tokens:
                merges.append(f"{char} {piece}")
                tokens.append(merged)
            piece = merged
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({token: index for index, token in enumerate(tokens)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")


# Model sizes: "tiny" for tests and demos (32px images, 16x16 latents, milliseconds a step on a CPU); "sd15" has
# the real Stable Diffusion 1.5 UNet, VAE and text-encoder shapes (random weights) for timing and memory on a GPU.
PRESETS = {
    "tiny": {
        "unet": dict(
            sample_size=16,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
        ),
        "vae": dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=32),  # vae_scale_factor 2
        "text": dict(
            hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, projection_dim=32
        ),
    },
    # The pretrained demo model (examples/pretrain_tiny_ldm.py): the tiny VAE and text encoder, a UNet with a third
    # level (4x4) so one sample sees the whole image and keeps one shape in one colour.
    "shapes": {
        "unet": dict(
            sample_size=16,
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
        ),
        "vae": dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=32),  # vae_scale_factor 2
        "text": dict(
            hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, projection_dim=32
        ),
    },
    # SD 1.5's layout (4 levels, 2 layers per block, cross-attention in the first three, an 8x VAE, a 12-layer text
    # encoder's shape scaled down) at a tenth of its width: a laptop CPU runs a step in about a second at 256 px.
    # Two heads instead of eight keep attention heads 16-64 wide (SD 1.5: 40-160); 4-wide heads would make CPU
    # attention kernels, not the model, the cost.
    "mini": {
        "unet": dict(
            sample_size=32,
            block_out_channels=(32, 64, 128, 128),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=64,
            attention_head_dim=2,
        ),
        "vae": dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, sample_size=256),
        "text": dict(
            hidden_size=64, intermediate_size=256, num_attention_heads=4, num_hidden_layers=4, projection_dim=64
        ),
    },
    "sd15": {
        "unet": dict(
            sample_size=64,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            attention_head_dim=8,
        ),
        "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512),
        "text": dict(
            hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, projection_dim=768
        ),
    },
}


def build_tokenizer_and_text_encoder(tokenizer_dir, *, seed=0, preset="tiny"):
    """Write the BPE tokenizer files to `tokenizer_dir`; return (tokenizer, random-weight CLIPTextModel)."""
    _write_bpe_files(tokenizer_dir)
    # Load from the folder: in transformers 5, CLIPTokenizer(vocab_file=..., merges_file=...)
    # silently ignores both files and keeps only the special tokens.
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=77)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            # The pooled output is read at the EOS position, so these must match the tokenizer.
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **PRESETS[preset]["text"],
        )
    )
    return tokenizer, text_encoder


def build_tiny_sd_components(tokenizer_dir, *, prediction_type="epsilon", seed=0, preset="tiny"):
    """Random-weight SD 1.x-style components of the given PRESETS size, as StableDiffusionPipeline's keyword
    arguments (vae, text_encoder, tokenizer, unet, scheduler); the tokenizer files are written to `tokenizer_dir`."""
    sizes = PRESETS[preset]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, norm_num_groups=32, **sizes["unet"])
    torch.manual_seed(seed)
    n_blocks = len(sizes["vae"]["block_out_channels"])
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n_blocks,
        up_block_types=("UpDecoderBlock2D",) * n_blocks,
        latent_channels=4,
        norm_num_groups=32,
        **sizes["vae"],
    )
    tokenizer, text_encoder = build_tokenizer_and_text_encoder(tokenizer_dir, seed=seed, preset=preset)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
        # SD 1.x checkpoint values; StableDiffusionPipeline warns about and patches any others.
        steps_offset=1,
        clip_sample=False,
    )
    return dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)


def build_tiny_sd_pipeline(output_dir, *, prediction_type="epsilon", seed=0, preset="tiny"):
    """Save a random-weight SD 1.x-style pipeline of the given PRESETS size to `output_dir`."""
    components = build_tiny_sd_components(
        os.path.join(output_dir, "tokenizer"), prediction_type=prediction_type, seed=seed, preset=preset
    )
    pipeline = StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipeline.save_pretrained(output_dir)
    return output_dir


# SDXL sizes: "tiny" for tests (two 32-wide text encoders whose penultimate states concatenate to 64); "sdxl" has
# the real SDXL base UNet, VAE and both text-encoder shapes (random weights) for timing and memory on a GPU.
SDXL_PRESETS = {
    "tiny": {
        "unet": dict(
            sample_size=16,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            transformer_layers_per_block=1,
            addition_time_embed_dim=8,
        ),
        "vae": dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=32),
        "text": dict(
            hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, projection_dim=32
        ),
        "text_2": dict(
            hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, projection_dim=32
        ),
    },
    # SDXL's layout (3 levels, 1/2/10 transformer layers, two text encoders) at a tenth of its width, for CPUs.
    "mini": {
        "unet": dict(
            sample_size=32,
            block_out_channels=(32, 64, 128),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(1, 2, 4),
            transformer_layers_per_block=(1, 2, 10),
            addition_time_embed_dim=32,
        ),
        "vae": dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, sample_size=256),
        "text": dict(
            hidden_size=64, intermediate_size=256, num_attention_heads=4, num_hidden_layers=4, projection_dim=64
        ),
        "text_2": dict(
            hidden_size=128, intermediate_size=512, num_attention_heads=4, num_hidden_layers=4, projection_dim=128
        ),
    },
    "sdxl": {
        "unet": dict(
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20),
            transformer_layers_per_block=(1, 2, 10),
            addition_time_embed_dim=256,
        ),
        "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=1024),
        "text": dict(
            hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, projection_dim=768
        ),
        "text_2": dict(
            hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32, projection_dim=1280
        ),
    },
}


def build_tiny_sdxl_pipeline(output_dir, *, seed=0, preset="tiny"):
    """Save a random-weight SDXL-style pipeline (two text encoders, "text_time" micro-conditioning) of the given
    SDXL_PRESETS size to `output_dir`."""
    sizes = SDXL_PRESETS[preset]
    encoders, tokenizers = [], []
    for suffix, encoder_class, config in (
        ("", CLIPTextModel, sizes["text"]),
        ("_2", CLIPTextModelWithProjection, sizes["text_2"]),
    ):
        tokenizer_dir = os.path.join(output_dir, f"tokenizer{suffix}")
        _write_bpe_files(tokenizer_dir)
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=77)
        torch.manual_seed(seed)
        encoders.append(
            encoder_class(
                CLIPTextConfig(
                    vocab_size=len(tokenizer),
                    max_position_embeddings=77,
                    bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                    **config,
                )
            )
        )
        tokenizers.append(tokenizer)
    unet_sizes = sizes["unet"]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        in_channels=4,
        out_channels=4,
        norm_num_groups=32,
        use_linear_projection=True,
        # cross-attention reads both encoders' hidden states side by side; the added embedding is the second
        # encoder's pooled projection plus six sinusoidally embedded time ids
        cross_attention_dim=sizes["text"]["hidden_size"] + sizes["text_2"]["hidden_size"],
        addition_embed_type="text_time",
        projection_class_embeddings_input_dim=sizes["text_2"]["projection_dim"]
        + 6 * unet_sizes["addition_time_embed_dim"],
        **unet_sizes,
    )
    n_blocks = len(sizes["vae"]["block_out_channels"])
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n_blocks,
        up_block_types=("UpDecoderBlock2D",) * n_blocks,
        latent_channels=4,
        norm_num_groups=32,
        scaling_factor=0.13025,
        force_upcast=True,
        **sizes["vae"],
    )
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        timestep_spacing="leading",
    )
    StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=encoders[0],
        text_encoder_2=encoders[1],
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        unet=unet,
        scheduler=scheduler,
    ).save_pretrained(output_dir)
    return output_dir


# SD3 sizes: "tiny" for tests (two 32-wide CLIP encoders whose penultimate states concatenate to 64, zero-padded to
# the 96-wide T5 states as the pipeline pads them); "mini" for CPUs; "sd35m" has Stable Diffusion 3.5 Medium's
# transformer, VAE and CLIP shapes (random weights) for timing and memory on a GPU, without T5-XXL (4.7B random
# weights take longer to build than a benchmark runs; the pipeline then feeds zeros in its place, as the trainer's
# --no_t5 does).
SD3_PRESETS = {
    "tiny": {
        "transformer": dict(
            sample_size=16,
            patch_size=2,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            caption_projection_dim=32,
            pos_embed_max_size=16,
            dual_attention_layers=(0,),
            qk_norm="rms_norm",
        ),
        "vae": dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=32),
        "text": dict(
            hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, projection_dim=32
        ),
        "text_2": dict(
            hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, projection_dim=32
        ),
        "t5": dict(d_model=96, d_ff=128, d_kv=16, num_heads=6, num_layers=2),
    },
    # SD 3.5 Medium's layout (MMDiT-X: dual attention in the first 13 layers, RMS qk-norm, an 8x VAE) scaled down.
    "mini": {
        "transformer": dict(
            sample_size=32,
            patch_size=2,
            num_layers=6,
            attention_head_dim=32,
            num_attention_heads=4,
            caption_projection_dim=128,
            pos_embed_max_size=64,
            dual_attention_layers=(0, 1, 2),
            qk_norm="rms_norm",
        ),
        "vae": dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, sample_size=256),
        "text": dict(
            hidden_size=64, intermediate_size=256, num_attention_heads=4, num_hidden_layers=4, projection_dim=64
        ),
        "text_2": dict(
            hidden_size=128, intermediate_size=512, num_attention_heads=4, num_hidden_layers=4, projection_dim=128
        ),
        "t5": dict(d_model=256, d_ff=512, d_kv=32, num_heads=8, num_layers=4),
    },
    "sd35m": {
        "transformer": dict(
            sample_size=128,
            patch_size=2,
            num_layers=24,
            attention_head_dim=64,
            num_attention_heads=24,
            caption_projection_dim=1536,
            pos_embed_max_size=384,
            dual_attention_layers=tuple(range(13)),
            qk_norm="rms_norm",
        ),
        "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=1024),
        "text": dict(
            hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, projection_dim=768
        ),
        "text_2": dict(
            hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32, projection_dim=1280
        ),
        "t5": None,  # joint_attention_dim below is T5-XXL's width, 4096
        "joint_attention_dim": 4096,
    },
}


def build_t5_tokenizer(tokenizer_dir):
    """A T5TokenizerFast over a tiny Unigram vocabulary (the caption words and single characters, each with and without
    the word-start marker), saved to `tokenizer_dir`; eos appended as T5's own tokenizer does."""
    pieces = ["<pad>", "</s>", "<unk>"]
    pieces += [f"\u2581{word}" for word in WHOLE_WORDS] + ["\u2581"] + list(CHARACTERS)
    pieces += [f"\u2581{c}" for c in CHARACTERS if f"\u2581{c}" not in pieces]
    # whole words score higher than their characters, so a known word is one piece
    vocab = [(piece, 0.0 if index < 3 else (-1.0 if len(piece) > 2 else -5.0)) for index, piece in enumerate(pieces)]
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)
    tokenizer.save_pretrained(tokenizer_dir)
    return T5TokenizerFast.from_pretrained(tokenizer_dir)


def tiny_16_channel_vae(vae_sizes, seed, scaling_factor, shift_factor):
    """A random 16-channel AutoencoderKL as SD3's and FLUX.1's: latents = (mean - shift_factor) * scaling_factor."""
    n_blocks = len(vae_sizes["block_out_channels"])
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n_blocks,
        up_block_types=("UpDecoderBlock2D",) * n_blocks,
        latent_channels=16,
        norm_num_groups=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        **vae_sizes,
    )


def build_tiny_sd3_pipeline(output_dir, *, seed=0, preset="tiny"):
    """Save a random-weight Stable Diffusion 3-style pipeline (an MMDiT transformer, a 16-channel VAE with a shift
    factor, CLIP-L/CLIP-G with projections and T5) of the given SD3_PRESETS size to `output_dir`, loadable with
    StableDiffusion3Pipeline.from_pretrained."""
    sizes = SD3_PRESETS[preset]
    encoders, tokenizers = [], []
    for suffix, config in (("", sizes["text"]), ("_2", sizes["text_2"])):
        tokenizer_dir = os.path.join(output_dir, f"tokenizer{suffix}")
        _write_bpe_files(tokenizer_dir)
        # from the folder: transformers 5's CLIPTokenizer(vocab_file=...) silently ignores the files
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=77)
        torch.manual_seed(seed)
        encoders.append(
            CLIPTextModelWithProjection(
                CLIPTextConfig(
                    vocab_size=len(tokenizer),
                    max_position_embeddings=77,
                    bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                    **config,
                )
            )
        )
        tokenizers.append(tokenizer)
    text_encoder_3 = tokenizer_3 = None
    joint_attention_dim = sizes.get("joint_attention_dim")
    if sizes["t5"] is not None:
        tokenizer_3 = build_t5_tokenizer(os.path.join(output_dir, "tokenizer_3"))
        torch.manual_seed(seed)
        text_encoder_3 = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer_3),
                pad_token_id=tokenizer_3.pad_token_id,
                eos_token_id=tokenizer_3.eos_token_id,
                decoder_start_token_id=tokenizer_3.pad_token_id,
                feed_forward_proj="gated-gelu",
                **sizes["t5"],
            )
        )
        joint_attention_dim = sizes["t5"]["d_model"]
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        in_channels=16,
        out_channels=16,
        # the CLIP hidden states are zero-padded to T5's width and joined with T5's along the sequence; the pooled
        # input is both CLIP projections side by side
        joint_attention_dim=joint_attention_dim,
        pooled_projection_dim=sizes["text"]["projection_dim"] + sizes["text_2"]["projection_dim"],
        **sizes["transformer"],
    )
    vae = tiny_16_channel_vae(sizes["vae"], seed, scaling_factor=1.5305, shift_factor=0.0609)  # SD3's values
    StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae,
        text_encoder=encoders[0],
        tokenizer=tokenizers[0],
        text_encoder_2=encoders[1],
        tokenizer_2=tokenizers[1],
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    ).save_pretrained(output_dir)
    return output_dir


# FLUX.1 sizes: "tiny" for tests (one double-stream and one single-stream block; FLUX.1 [dev]'s guidance embedding).
FLUX_PRESETS = {
    "tiny": {
        "transformer": dict(
            num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=4, axes_dims_rope=(2, 2, 4)
        ),
        "vae": dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=32),
        "text": dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2),
        "t5": dict(d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=2),
    },
}


def build_tiny_flux_pipeline(output_dir, *, seed=0, preset="tiny", schnell=False):
    """Save a random-weight FLUX.1 [dev]-style pipeline (a Flux transformer with a guidance input on 2x2-packed
    latents, a 16-channel VAE with FLUX.1's shift and scale, CLIP-L's pooled output and T5, a scheduler shifting by
    the image's token count) of the given FLUX_PRESETS size to `output_dir`, loadable with
    FluxPipeline.from_pretrained. `schnell`: FLUX.1 [schnell]'s transformer (no guidance input) and scheduler (a
    static shift of 1)."""
    sizes = FLUX_PRESETS[preset]
    tokenizer_dir = os.path.join(output_dir, "tokenizer")
    _write_bpe_files(tokenizer_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=77)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **sizes["text"],
        )
    )
    tokenizer_2 = build_t5_tokenizer(os.path.join(output_dir, "tokenizer_2"))
    torch.manual_seed(seed)
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            pad_token_id=tokenizer_2.pad_token_id,
            eos_token_id=tokenizer_2.eos_token_id,
            decoder_start_token_id=tokenizer_2.pad_token_id,
            feed_forward_proj="gated-gelu",
            **sizes["t5"],
        )
    )
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16 * 4,  # the VAE's 16 channels, packed 2 x 2 into each token
        joint_attention_dim=sizes["t5"]["d_model"],
        pooled_projection_dim=sizes["text"]["hidden_size"],  # CLIP's pooled output, without projection
        guidance_embeds=not schnell,
        **sizes["transformer"],
    )
    vae = tiny_16_channel_vae(sizes["vae"], seed, scaling_factor=0.3611, shift_factor=0.1159)  # FLUX.1's values
    # FLUX.1 [dev]'s scheduler shifts its sigmas at run time by the image's sequence length, [schnell]'s does not
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0 if schnell else 3.0,
        use_dynamic_shifting=not schnell,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    ).save_pretrained(output_dir)
    return output_dir


# FLUX.2 [klein] sizes: "tiny" for tests (one double-stream and one single-stream block; a 28-layer, 16-wide Qwen3 so
# that the hidden states of layers 9, 18 and 27, which Flux2KleinPipeline stacks, exist).
FLUX2_KLEIN_PRESETS = {
    "tiny": {
        "transformer": dict(
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=8,
            num_attention_heads=4,
            axes_dims_rope=(2, 2, 2, 2),
            timestep_guidance_channels=32,
        ),
        "vae": dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=32, latent_channels=8),
        "qwen3": dict(
            hidden_size=16, intermediate_size=32, num_hidden_layers=28, num_attention_heads=2, num_key_value_heads=2
        ),
    },
}
# Qwen3's chat template, for one user message as Flux2KleinPipeline formats a prompt (thinking switched off)
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)


def build_qwen_tokenizer(tokenizer_dir):
    """A Qwen2TokenizerFast over a tiny byte-level BPE vocabulary (the 256 byte symbols, Qwen's special tokens, and
    the caption words, each merged from its first letter on), with Qwen3's chat template, saved to `tokenizer_dir`."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2TokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    vocab = {token: index for index, token in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = []
    # each word grows from its start ("\u0120s" -> "\u0120sh" -> ...): a merge joins a word's piece to its next
    # letter only, so one word's merges cannot split another apart
    for word in [f"\u0120{word}" for word in WHOLE_WORDS] + ["user", "assistant"]:
        piece = word[0]
        for char in word[1:]:
            if piece + char not in vocab:
                merges.append((piece, char))
                vocab[piece + char] = len(vocab)
            piece += char
    tokenizer = Qwen2TokenizerFast(vocab=vocab, merges=merges, model_max_length=32768)
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    tokenizer.save_pretrained(tokenizer_dir)
    return Qwen2TokenizerFast.from_pretrained(tokenizer_dir)


def build_tiny_flux2_klein_pipeline(output_dir, *, seed=0, preset="tiny"):
    """Save a random-weight FLUX.2 [klein]-style pipeline (a Flux2 transformer without a guidance input on 2x2-patched
    latents, a VAE whose patched latents are normalised by its batch-norm statistics, random here, and a Qwen3 causal
    LM whose hidden states of layers 9, 18 and 27 are the text input) of the given FLUX2_KLEIN_PRESETS size to
    `output_dir`, loadable with Flux2KleinPipeline.from_pretrained."""
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    sizes = FLUX2_KLEIN_PRESETS[preset]
    tokenizer = build_qwen_tokenizer(os.path.join(output_dir, "tokenizer"))
    torch.manual_seed(seed)
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tokenizer),
            head_dim=8,
            max_position_embeddings=1024,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
            **sizes["qwen3"],
        )
    )
    latent_channels = sizes["vae"]["latent_channels"]
    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,  # the VAE's channels, patched 2 x 2 into each token
        joint_attention_dim=3 * sizes["qwen3"]["hidden_size"],  # three Qwen3 layers' states side by side
        guidance_embeds=False,  # klein is not guidance-distilled
        **sizes["transformer"],
    )
    n_blocks = len(sizes["vae"]["block_out_channels"])
    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n_blocks,
        up_block_types=("UpDecoderBlock2D",) * n_blocks,
        norm_num_groups=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        **sizes["vae"],
    )
    # statistics of a trained VAE's latents are not 0 and 1: the normalisation must show in what is cached
    vae.bn.running_mean.copy_(0.5 * torch.randn(vae.bn.num_features))
    vae.bn.running_var.copy_(torch.rand(vae.bn.num_features) + 0.5)
    scheduler = FlowMatchEulerDiscreteScheduler(  # klein's: shifted at run time by the pipeline's empirical mu
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    Flux2KleinPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    ).save_pretrained(output_dir)
    return output_dir


def make_shape_image(warm, rng, size):
    """Draw a filled circle or square in a warm or cool colour on the gray background.

    `rng` is a `random.Random`; `size` is an int or a (width, height) tuple.
    """
    width, height = (size, size) if isinstance(size, int) else size
    image = Image.new("RGB", (width, height), BACKGROUND)
    radius = rng.uniform(0.25, 0.4) * min(width, height)
    center_x = width / 2 + rng.uniform(-0.1, 0.1) * width
    center_y = height / 2 + rng.uniform(-0.1, 0.1) * height
    box = (center_x - radius, center_y - radius, center_x + radius, center_y + radius)
    color = rng.choice(WARM_COLORS if warm else COOL_COLORS)
    draw = ImageDraw.Draw(image)
    if rng.random() < 0.5:
        draw.ellipse(box, fill=color)
    else:
        draw.rectangle(box, fill=color)
    return image


def _jpeg_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def build_pickapic_dataset(
    output_dir,
    *,
    n_pairs=16,
    n_ties=2,
    seed=0,
    image_size=32,
    corrupt_pairs=0,
    vary_sizes=False,
    n_captions=None,
    n_shards=1,
    rows_per_group=None,
):
    """Write a Pick-a-Pic v2-style parquet dataset, `output_dir/train-00000-of-00001.parquet` (or n_shards files
    `train-0000i-of-0000n.parquet`, consecutive runs of rows, as the Hub stores large splits; rows_per_group sets
    the parquet row-group size).

    Columns: caption (string), jpg_0 / jpg_1 (raw JPEG bytes), label_0 (float64: 1.0 means
    jpg_0 preferred, 0.0 jpg_1 preferred, 0.5 tie). Rows are n_pairs warm-vs-cool pairs (warm
    always preferred, on a random side), then n_ties ties between two same-temperature images,
    then corrupt_pairs pairs whose jpg_0 is undecodable; all rows are shuffled together.
    Captions come from the first n_captions entries of CAPTION_POOL (all when None). Images are
    image_size squares, or with vary_sizes a mix of 1.25:1, 1:1.5, 2x and 1x image_size.
    """
    rng = random.Random(seed)
    captions = CAPTION_POOL[:n_captions]  # None keeps the whole pool
    # Several shapes so training must handle resizing and cropping, not just 1:1 images.
    size_scales = ((1.25, 1.0), (1.0, 1.5), (2.0, 2.0), (1.0, 1.0)) if vary_sizes else ((1.0, 1.0),)

    def random_image(warm):
        scale_x, scale_y = rng.choice(size_scales)
        return make_shape_image(warm, rng, (round(image_size * scale_x), round(image_size * scale_y)))

    # Exactly balanced sides (shuffled) so neither label value dominates a small dataset.
    warm_on_left = [index < (n_pairs + 1) // 2 for index in range(n_pairs)]
    rng.shuffle(warm_on_left)
    rows = []
    for left_is_warm in warm_on_left:
        left, right = random_image(left_is_warm), random_image(not left_is_warm)
        rows.append((_jpeg_bytes(left), _jpeg_bytes(right), 1.0 if left_is_warm else 0.0))
    for _ in range(n_ties):
        warm = rng.random() < 0.5
        rows.append((_jpeg_bytes(random_image(warm)), _jpeg_bytes(random_image(warm)), 0.5))
    for _ in range(corrupt_pairs):
        # Keep only the first bytes of a real JPEG: recognisable header, no decodable image data.
        truncated = _jpeg_bytes(random_image(True))[:64]
        rows.append((truncated, _jpeg_bytes(random_image(False)), 1.0))
    rng.shuffle(rows)

    table = pa.table(
        {
            "caption": pa.array([rng.choice(captions) for _ in rows], pa.string()),
            "jpg_0": pa.array([row[0] for row in rows], pa.binary()),
            "jpg_1": pa.array([row[1] for row in rows], pa.binary()),
            "label_0": pa.array([row[2] for row in rows], pa.float64()),
        }
    )
    os.makedirs(output_dir, exist_ok=True)
    bounds = [len(rows) * shard // n_shards for shard in range(n_shards + 1)]
    for shard in range(n_shards):
        pq.write_table(
            table.slice(bounds[shard], bounds[shard + 1] - bounds[shard]),
            os.path.join(output_dir, f"train-{shard:05d}-of-{n_shards:05d}.parquet"),
            row_group_size=rows_per_group,
        )
    return output_dir


def warm_preference_pairs(n_pairs, *, seed=0, image_size=32, flat=False):
    """The pairs the layout builders below write, as dicts: caption, warm and cool (JPEG bytes; the warm image is
    always preferred) and warm_first (the side a two-column layout puts the warm image on, balanced and shuffled).
    flat: whole-image warm and cool colours instead of shapes, the easiest preference to learn (a tiny random model
    picks it up in a few dozen steps). The same arguments give the same pairs, whatever layout writes them."""
    rng = random.Random(seed)
    warm_first = [index < (n_pairs + 1) // 2 for index in range(n_pairs)]
    rng.shuffle(warm_first)

    def image(warm):
        if flat:
            return _jpeg_bytes(
                Image.new("RGB", (image_size, image_size), rng.choice(WARM_COLORS if warm else COOL_COLORS))
            )
        return _jpeg_bytes(make_shape_image(warm, rng, image_size))

    return [
        {"caption": rng.choice(CAPTION_POOL), "warm": image(True), "cool": image(False), "warm_first": first}
        for first in warm_first
    ]


def _write_parquet(output_dir, columns, features=None):
    """`output_dir/train-00000-of-00001.parquet` from {column: values}; with datasets `features` (e.g. Image
    columns), written by datasets so that they are read back as such."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "train-00000-of-00001.parquet")
    if features is None:
        pq.write_table(pa.table(columns), path)
    else:
        import datasets

        datasets.Dataset.from_dict(columns, features=datasets.Features(features)).to_parquet(path)
    return output_dir


def build_chosen_rejected_dataset(output_dir, *, n_pairs=16, seed=0, flat=False, image_feature=False):
    """TRL's chosen/rejected layout: prompt, chosen (the preferred, warm image), rejected; JPEG bytes, or with
    image_feature datasets Image columns."""
    pairs = warm_preference_pairs(n_pairs, seed=seed, flat=flat)
    columns = {
        "prompt": [pair["caption"] for pair in pairs],
        "chosen": [pair["warm"] for pair in pairs],
        "rejected": [pair["cool"] for pair in pairs],
    }
    if not image_feature:
        return _write_parquet(output_dir, columns)
    import datasets

    images = {"bytes": None, "path": None}
    columns["chosen"] = [{**images, "bytes": b} for b in columns["chosen"]]
    columns["rejected"] = [{**images, "bytes": b} for b in columns["rejected"]]
    features = {"prompt": datasets.Value("string"), "chosen": datasets.Image(), "rejected": datasets.Image()}
    return _write_parquet(output_dir, columns, features)


def build_votes_dataset(output_dir, *, n_pairs=16, seed=0, flat=False, votes=((3, 1),), extra_votes=()):
    """Rapidata's vote-count layout: prompt, image1, image2 (JPEG bytes), votes_image1, votes_image2 (float64). The
    n_pairs warm-vs-cool pairs give the warm image the larger count of `votes` (cycled: (winner, loser) counts);
    then one row per (votes_image1, votes_image2) of extra_votes (equal counts, NaN, negative...), its images a
    warm and a cool one."""
    pairs = warm_preference_pairs(n_pairs + len(extra_votes), seed=seed, flat=flat)
    rows = []
    for index, pair in enumerate(pairs[:n_pairs]):
        winner, loser = votes[index % len(votes)]
        first, second = (pair["warm"], pair["cool"]) if pair["warm_first"] else (pair["cool"], pair["warm"])
        rows.append((pair["caption"], first, second, *((winner, loser) if pair["warm_first"] else (loser, winner))))
    for pair, (votes_1, votes_2) in zip(pairs[n_pairs:], extra_votes):
        rows.append((pair["caption"], pair["warm"], pair["cool"], votes_1, votes_2))
    names = ("prompt", "image1", "image2", "votes_image1", "votes_image2")
    types = (pa.string(), pa.binary(), pa.binary(), pa.float64(), pa.float64())
    return _write_parquet(
        output_dir,
        {name: pa.array([row[i] for row in rows], kind) for i, (name, kind) in enumerate(zip(names, types))},
    )


def build_image_folder_dataset(
    output_dir, *, n_pairs=16, seed=0, flat=False, columns="chosen_rejected", metadata="jsonl", bad_paths=()
):
    """An image folder: images/<i>_a.jpg and images/<i>_b.jpg, and metadata.jsonl (or metadata.csv) with one row per
    pair: prompt plus chosen/rejected paths (columns="chosen_rejected"), or caption, jpg_0, jpg_1, label_0
    (columns="pickapic"; both layouts' columns with columns="both"). bad_paths: extra rows whose first image is at
    each of these paths (missing, absolute, leaving the folder...), the second a real image."""
    pairs = warm_preference_pairs(n_pairs + len(bad_paths), seed=seed, flat=flat)
    os.makedirs(os.path.join(output_dir, "images"), exist_ok=True)
    rows = []
    for index, pair in enumerate(pairs):
        first, second = (pair["warm"], pair["cool"]) if pair["warm_first"] else (pair["cool"], pair["warm"])
        paths = [f"images/{index:04d}_a.jpg", f"images/{index:04d}_b.jpg"]
        for path, data in zip(paths, (first, second)):
            with open(os.path.join(output_dir, path), "wb") as file:
                file.write(data)
        if index >= n_pairs:
            paths[0] = bad_paths[index - n_pairs]
        warm_path, cool_path = paths if pair["warm_first"] else paths[::-1]
        row = {}
        if columns in ("chosen_rejected", "both"):
            row.update(prompt=pair["caption"], chosen=warm_path, rejected=cool_path)
        if columns in ("pickapic", "both"):
            row.update(caption=pair["caption"], jpg_0=paths[0], jpg_1=paths[1], label_0=float(pair["warm_first"]))
        rows.append(row)
    if metadata == "jsonl":
        with open(os.path.join(output_dir, "metadata.jsonl"), "w") as file:
            file.writelines(json.dumps(row) + "\n" for row in rows)
    else:
        import csv

        with open(os.path.join(output_dir, "metadata.csv"), "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return output_dir


def build_webdataset_dataset(output_dir, *, n_pairs=16, seed=0, flat=False, n_shards=2):
    """Webdataset tar shards `output_dir/train-0000i.tar` in Pick-a-Pic's layout: each sample's files
    <key>.jpg_0.jpg, <key>.jpg_1.jpg and <key>.json ({"caption", "label_0"}), which the datasets "webdataset" builder
    reads as columns jpg_0.jpg, jpg_1.jpg and json (a struct)."""
    import tarfile

    pairs = warm_preference_pairs(n_pairs, seed=seed, flat=flat)
    os.makedirs(output_dir, exist_ok=True)
    bounds = [n_pairs * shard // n_shards for shard in range(n_shards + 1)]
    for shard in range(n_shards):
        with tarfile.open(os.path.join(output_dir, f"train-{shard:05d}.tar"), "w") as tar:
            for index in range(bounds[shard], bounds[shard + 1]):
                pair = pairs[index]
                first, second = (pair["warm"], pair["cool"]) if pair["warm_first"] else (pair["cool"], pair["warm"])
                label = {"caption": pair["caption"], "label_0": float(pair["warm_first"])}
                for name, data in (("jpg_0.jpg", first), ("jpg_1.jpg", second), ("json", json.dumps(label).encode())):
                    member = tarfile.TarInfo(f"{index:06d}.{name}")
                    member.size = len(data)
                    tar.addfile(member, io.BytesIO(data))
    return output_dir


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", help="writes OUTPUT_DIR/model and OUTPUT_DIR/data")
    parser.add_argument("--n_pairs", type=int, default=16)
    parser.add_argument("--n_ties", type=int, default=2)
    parser.add_argument("--prediction_type", default="epsilon", choices=("epsilon", "v_prediction"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model size (see PRESETS)")
    parser.add_argument("--image_size", type=int, default=32, help="side of the generated images in pixels")
    args = parser.parse_args()
    model_dir = build_tiny_sd_pipeline(
        os.path.join(args.output_dir, "model"),
        prediction_type=args.prediction_type,
        seed=args.seed,
        preset=args.preset,
    )
    data_dir = build_pickapic_dataset(
        os.path.join(args.output_dir, "data"),
        n_pairs=args.n_pairs,
        n_ties=args.n_ties,
        seed=args.seed,
        image_size=args.image_size,
    )
    print(f"model: {model_dir}")
    print(f"data: {data_dir}")


if __name__ == "__main__":
    main()
