"""Images are decoded as an image viewer shows them, whatever their mode or orientation; a crop says where it was
cut (SDXL is conditioned on it)."""

import io

import numpy as np
from PIL import Image

from diffusion_dpo.data import decode_image, resize_and_crop


RNG = np.random.default_rng(0)
GRAY = RNG.integers(0, 256, (24, 32), dtype=np.uint8)  # the 8-bit truth
RGB = RNG.integers(0, 256, (24, 32, 3), dtype=np.uint8)


def encoded(image, image_format, **options):
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def decoded(data):
    return np.asarray(decode_image(data))


def test_16_bit_png_is_scaled_to_8_bit():
    data = encoded(Image.fromarray(GRAY.astype(np.uint16) * 257), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    np.testing.assert_array_equal(decoded(data), np.repeat(GRAY[..., None], 3, axis=2))


def test_float_tiff_in_0_to_1_is_scaled_to_8_bit():
    data = encoded(Image.fromarray(GRAY.astype(np.float32) / 255), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    np.testing.assert_array_equal(decoded(data)[..., 0], GRAY)


def test_exif_orientation_is_applied():
    image = Image.fromarray(RGB)
    exif = image.getexif()
    exif[0x0112] = 6  # stored sideways: a viewer rotates it 90 degrees clockwise
    data = encoded(image, "PNG", exif=exif)
    np.testing.assert_array_equal(decoded(data), np.rot90(RGB, -1))


def test_transparency_is_composited_on_white():
    alpha = np.zeros((24, 32), dtype=np.uint8)
    alpha[:12] = 255
    pixels = decoded(encoded(Image.fromarray(np.dstack([RGB, alpha])), "PNG"))
    np.testing.assert_array_equal(pixels[:12], RGB[:12])  # opaque: as is
    assert (pixels[12:] == 255).all()  # transparent: white


def test_an_animation_gives_its_first_frame():
    frames = [Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).convert("P") for value in (10, 200)]
    data = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert (decoded(data) == 10).all()
    moved = Image.open(io.BytesIO(data))
    moved.seek(1)  # a PIL image that is not at its first frame
    assert (decoded(moved) == 10).all()


def test_8_bit_images_are_unchanged():
    np.testing.assert_array_equal(decoded(encoded(Image.fromarray(RGB), "PNG")), RGB)
    np.testing.assert_array_equal(decoded(encoded(Image.fromarray(GRAY), "PNG"))[..., 1], GRAY)


def test_resize_and_crop_says_where_the_square_was_cut():
    image = Image.fromarray(np.repeat(np.arange(48, dtype=np.uint8)[None, :, None], 3, axis=2).repeat(24, axis=0))
    crop, (top, left, resized_width) = resize_and_crop(image, 16, crop_rng=None)  # 48x24 -> 32x16, centre crop
    assert crop.size == (16, 16) and (top, left, resized_width) == (0, 8, 32)
    resized = np.asarray(image.resize((32, 16), Image.BILINEAR))
    np.testing.assert_array_equal(np.asarray(crop), resized[:, 8:24])
    _, (top, left, _) = resize_and_crop(image, 16, np.random.default_rng(0))  # a random crop stays inside
    assert top == 0 and 0 <= left <= 16
