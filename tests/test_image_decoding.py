"""Images are decoded as an image viewer shows them, whatever their mode or orientation."""

import io

import numpy as np
import pytest
from PIL import Image


pytestmark = pytest.mark.both_trainers

RNG = np.random.default_rng(0)
GRAY = RNG.integers(0, 256, (24, 32), dtype=np.uint8)  # the 8-bit truth
RGB = RNG.integers(0, 256, (24, 32, 3), dtype=np.uint8)


def encoded(image, image_format, **options):
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def decoded(dpo, data):
    return np.asarray(dpo.decode_image(data))


def test_16_bit_png_is_scaled_to_8_bit(dpo):
    data = encoded(Image.fromarray(GRAY.astype(np.uint16) * 257), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    np.testing.assert_array_equal(decoded(dpo, data), np.repeat(GRAY[..., None], 3, axis=2))


def test_float_tiff_in_0_to_1_is_scaled_to_8_bit(dpo):
    data = encoded(Image.fromarray(GRAY.astype(np.float32) / 255), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    np.testing.assert_array_equal(decoded(dpo, data)[..., 0], GRAY)


def test_exif_orientation_is_applied(dpo):
    image = Image.fromarray(RGB)
    exif = image.getexif()
    exif[0x0112] = 6  # stored sideways: a viewer rotates it 90 degrees clockwise
    data = encoded(image, "PNG", exif=exif)
    np.testing.assert_array_equal(decoded(dpo, data), np.rot90(RGB, -1))


def test_transparency_is_composited_on_white(dpo):
    alpha = np.zeros((24, 32), dtype=np.uint8)
    alpha[:12] = 255
    pixels = decoded(dpo, encoded(Image.fromarray(np.dstack([RGB, alpha])), "PNG"))
    np.testing.assert_array_equal(pixels[:12], RGB[:12])  # opaque: as is
    assert (pixels[12:] == 255).all()  # transparent: white


def test_an_animation_gives_its_first_frame(dpo):
    frames = [Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).convert("P") for value in (10, 200)]
    data = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert (decoded(dpo, data) == 10).all()
    moved = Image.open(io.BytesIO(data))
    moved.seek(1)  # a PIL image that is not at its first frame
    assert (decoded(dpo, moved) == 10).all()


def test_8_bit_images_are_unchanged(dpo):
    np.testing.assert_array_equal(decoded(dpo, encoded(Image.fromarray(RGB), "PNG")), RGB)
    np.testing.assert_array_equal(decoded(dpo, encoded(Image.fromarray(GRAY), "PNG"))[..., 1], GRAY)
