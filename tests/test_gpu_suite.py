"""benchmarks/gpu_suite.sh rehearsed on the CPU with the tiny presets, and the trainers' memory features it measures
on a GPU: the VAE encode batch that halves on CUDA out-of-memory."""

import logging

import pytest
import torch

import train_diffusion_dpo
import train_diffusion_dpo_sdxl


class OutOfMemoryAbove:
    """A stand-in VAE whose encode raises CUDA out-of-memory for batches larger than `limit` images."""

    def __init__(self, limit):
        self.limit, self.batch_sizes = limit, []

    def encode(self, pixels):
        self.batch_sizes.append(len(pixels))
        if len(pixels) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (stand-in)")
        latents = pixels[:, :1] * 2
        return type("Output", (), {"latent_dist": type("Dist", (), {"mean": latents})})


@pytest.mark.parametrize("dpo", [train_diffusion_dpo, train_diffusion_dpo_sdxl], ids=["sd15", "sdxl"])
def test_vae_encode_batch_halves_on_out_of_memory(dpo, caplog):
    vae = OutOfMemoryAbove(limit=2)
    encoder = dpo.VaeEncoder(vae, 8, torch.device("cpu"), torch.float32, torch.contiguous_format)
    images = torch.randn(11, 3, 4, 4)
    with caplog.at_level(logging.WARNING):
        latents = encoder(images)
        more = encoder(images[:3])  # the smaller size is kept: no further out-of-memory
    torch.testing.assert_close(latents, images[:, :1] * 2)
    torch.testing.assert_close(more, images[:3, :1] * 2)
    assert encoder.batch_size == 2 and encoder.backed_off
    assert vae.batch_sizes == [8, 4, 2, 2, 2, 2, 2, 1, 2, 1]
    warnings = [r.getMessage() for r in caplog.records if "out of memory" in r.getMessage()]
    assert len(warnings) == 1 and "halved to 4" in warnings[0]


@pytest.mark.parametrize("dpo", [train_diffusion_dpo, train_diffusion_dpo_sdxl], ids=["sd15", "sdxl"])
def test_vae_encode_out_of_memory_at_one_image_is_raised(dpo):
    encoder = dpo.VaeEncoder(OutOfMemoryAbove(limit=0), 4, torch.device("cpu"), torch.float32, torch.contiguous_format)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        encoder(torch.randn(3, 3, 4, 4))
    assert encoder.batch_size == 1
