"""The alignment demo's scorers (examples/demo_scoring.py): warm or cool; does a sample look like a dataset image?"""

import io
import random

import numpy as np
import pytest
from demo_scoring import classify_warm, is_plausible
from PIL import Image, ImageDraw
from tiny_assets import BACKGROUND, COOL_COLORS, WARM_COLORS, make_shape_image


def through_jpeg(image):
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return Image.open(buffer)


@pytest.mark.parametrize("warm", [True, False], ids=["warm", "cool"])
@pytest.mark.parametrize("jpeg", [False, True], ids=["png", "jpeg"])
def test_dataset_images_are_plausible_and_scored_by_their_colour(warm, jpeg):
    rng = random.Random(0)
    for _ in range(20):
        image = make_shape_image(warm, rng, 32)
        image = through_jpeg(image) if jpeg else image
        assert is_plausible(image)
        assert classify_warm(image) == warm


def canvas():
    return Image.new("RGB", (32, 32), BACKGROUND)


def noise():
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))


def full_frame():
    return Image.new("RGB", (32, 32), WARM_COLORS[0])


def two_shapes():
    image = canvas()
    ImageDraw.Draw(image).rectangle((2, 2, 11, 11), fill=WARM_COLORS[0])
    ImageDraw.Draw(image).rectangle((18, 18, 29, 29), fill=WARM_COLORS[0])
    return image


def two_colours():
    image = canvas()
    ImageDraw.Draw(image).rectangle((6, 6, 15, 25), fill=WARM_COLORS[0])
    ImageDraw.Draw(image).rectangle((16, 6, 25, 25), fill=COOL_COLORS[0])
    return image


def ring():
    image = canvas()
    ImageDraw.Draw(image).ellipse((4, 4, 27, 27), fill=COOL_COLORS[1])
    ImageDraw.Draw(image).ellipse((10, 10, 21, 21), fill=BACKGROUND)
    return image


def stripe():
    image = canvas()
    ImageDraw.Draw(image).rectangle((2, 13, 29, 18), fill=COOL_COLORS[2])
    return image


def muddy_colour():
    image = canvas()
    ImageDraw.Draw(image).ellipse((6, 6, 25, 25), fill=(128, 105, 130))  # halfway between red and blue
    return image


@pytest.mark.parametrize("draw", [canvas, noise, full_frame, two_shapes, two_colours, ring, stripe, muddy_colour])
def test_what_a_collapsed_model_draws_is_not_plausible(draw):
    assert not is_plausible(draw())
