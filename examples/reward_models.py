#!/usr/bin/env python
# Copyright 2026 The Diffusion-DPO toolkit authors. Licensed under the Apache License, Version 2.0.
"""Reward models that score (image, prompt) pairs, shared by examples/evaluate_dpo.py (win rates of a tuned model)
and examples/label_pairs_with_reward_model.py (AI feedback: preference pairs labelled by a reward model).

Each scorer maps (images, prompts) to one float per image; higher is better. PickScore and CLIP score need only
transformers; HPSv2, ImageReward and the LAION aesthetic predictor need their own packages (OPTIONAL_SCORERS).
"""

import importlib

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoProcessor, CLIPImageProcessor, CLIPModel

from diffusion_dpo import InputError


# scorer name -> (module it needs, pip package); pickscore and clip need only transformers
OPTIONAL_SCORERS = {
    "hpsv2": ("hpsv2", "hpsv2"),
    "image_reward": ("ImageReward", "image-reward"),
    "aesthetic": ("aesthetics_predictor", "simple-aesthetics-predictor"),
}
SCORERS = ("pickscore", "clip", *OPTIONAL_SCORERS)


def add_scorer_model_arguments(group):
    """The flags that say which weights each scorer loads (load_scorer reads them from args)."""
    group.add_argument("--pickscore_model", default="yuvalkirstain/PickScore_v1")
    group.add_argument("--pickscore_processor", default="laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    group.add_argument(
        "--clip_model",
        default="openai/clip-vit-large-patch14",
        help="CLIP model (and its processor) for the clip scorer.",
    )
    group.add_argument("--hpsv2_version", default="v2.1", choices=["v2.0", "v2.1"])
    group.add_argument(
        "--aesthetic_model",
        default="shunk031/aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE",
        help="LAION aesthetic predictor (simple-aesthetics-predictor format).",
    )


def check_scorer_available(name, flag="--scorers"):
    """InputError (one line, naming the package to install) when an optional scorer cannot be imported."""
    if name not in OPTIONAL_SCORERS:
        return
    module, package = OPTIONAL_SCORERS[name]
    try:
        importlib.import_module(module)
    except Exception as error:  # not installed, or installed but broken: either way it cannot score
        reason = f"{type(error).__name__}: {error}".splitlines()[0]
        raise InputError(f"{flag} {name} needs `pip install {package}` (import {module} failed: {reason})")


def embedding(output):
    """get_*_features returns the projected embedding (transformers 4) or an output holding it (transformers 5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipScorer:
    """PickScore and CLIP score, as PickScore defines it: logit_scale.exp() * cosine(text embedding, image embedding),
    with the model's own learned logit scale (100 for OpenAI CLIP and PickScore)."""

    def __init__(self, model, processor, device, dtype):
        self.model = CLIPModel.from_pretrained(model, dtype=dtype).to(device).eval()
        self.processor = AutoProcessor.from_pretrained(processor)
        self.device, self.dtype = device, dtype

    @torch.inference_mode()
    def __call__(self, images, prompts):
        inputs = self.processor(
            text=prompts, images=images, padding=True, truncation=True, max_length=77, return_tensors="pt"
        ).to(self.device)
        image_embeds = embedding(self.model.get_image_features(pixel_values=inputs["pixel_values"].to(self.dtype)))
        text_embeds = embedding(
            self.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        )
        cosine = F.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)
        return (self.model.logit_scale.float().exp() * cosine).tolist()


class HpsV2Scorer:
    """HPS v2 (Wu et al. 2023): the hpsv2 package's OpenCLIP ViT-H-14 with its fine-tuned weights, loaded once
    (hpsv2.score would reload the checkpoint on every call); image-text cosine similarity."""

    def __init__(self, version, device):
        from hpsv2.src.open_clip import create_model_and_transforms, get_tokenizer
        from hpsv2.utils import hps_version_map
        from huggingface_hub import hf_hub_download

        self.model, _, self.preprocess = create_model_and_transforms(
            "ViT-H-14", "laion2B-s32B-b79K", precision="amp", device=device, jit=False, output_dict=True
        )
        checkpoint = torch.load(hf_hub_download("xswu/HPSv2", hps_version_map[version]), map_location=device)
        self.model.load_state_dict(checkpoint["state_dict"])
        self.model.eval()
        self.tokenizer = get_tokenizer("ViT-H-14")
        self.device = torch.device(device)

    @torch.inference_mode()
    def __call__(self, images, prompts):
        pixels = torch.stack([self.preprocess(image) for image in images]).to(self.device)
        with torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
            outputs = self.model(pixels, self.tokenizer(prompts).to(self.device))
        return (outputs["image_features"].float() * outputs["text_features"].float()).sum(-1).tolist()


class ImageRewardScorer:
    """ImageReward (Xu et al. 2023), through the image-reward package."""

    def __init__(self, device):
        import ImageReward

        self.model = ImageReward.load("ImageReward-v1.0", device=device).eval()

    @torch.inference_mode()
    def __call__(self, images, prompts):
        return [float(self.model.score(prompt, image)) for image, prompt in zip(images, prompts)]


class AestheticScorer:
    """The LAION aesthetic predictor v2 (a linear head on CLIP ViT-L/14 image embeddings); ignores the prompt."""

    def __init__(self, model, device, dtype):
        from aesthetics_predictor import AestheticsPredictorV2Linear

        self.model = AestheticsPredictorV2Linear.from_pretrained(model, dtype=dtype).to(device).eval()
        self.processor = CLIPImageProcessor.from_pretrained(model)
        self.device, self.dtype = device, dtype

    @torch.inference_mode()
    def __call__(self, images, prompts):
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
        return self.model(pixel_values=pixels).logits.squeeze(-1).float().tolist()


def load_scorer(name, args, device, dtype):
    if name == "pickscore":
        return ClipScorer(args.pickscore_model, args.pickscore_processor, device, dtype)
    if name == "clip":
        return ClipScorer(args.clip_model, args.clip_model, device, dtype)
    if name == "hpsv2":
        return HpsV2Scorer(args.hpsv2_version, device)
    if name == "image_reward":
        return ImageRewardScorer(device)
    return AestheticScorer(args.aesthetic_model, device, dtype)


def score_images(scorer, images, prompts, batch_size=4):
    """One score per (image, prompt); images are PIL images or paths to image files."""
    scores = []
    for start in range(0, len(images), batch_size):
        batch = [
            image if isinstance(image, Image.Image) else Image.open(image).convert("RGB")
            for image in images[start : start + batch_size]
        ]
        scores += scorer(batch, prompts[start : start + batch_size])
    return scores
