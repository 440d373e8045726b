"""Scorers of the shapes demo (alignment_demo.py, pretrain_tiny_ldm.py): is a generated sample warm, and does it look
like a dataset image (tiny_assets.make_shape_image)? Deterministic, numpy only."""

import numpy as np
from tiny_assets import BACKGROUND, COOL_COLORS, WARM_COLORS


# JPEG blurs edges and tints flat areas a little; only clearly non-gray pixels count as the shape.
FOREGROUND_TOLERANCE = 40


def classify_warm(image):
    """True if the shape is warm: mean(red) - mean(blue) > 0 over pixels that differ from the
    background by more than FOREGROUND_TOLERANCE in some channel (whole image if none do)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 3)
    foreground = np.abs(pixels - BACKGROUND).max(axis=1) > FOREGROUND_TOLERANCE
    if foreground.any():
        pixels = pixels[foreground]
    return bool(pixels[:, 0].mean() - pixels[:, 2].mean() > 0)


# What a plausible sample looks like, as fractions of the image (the dataset's shapes cover 20-64% of it).
PLAUSIBLE_FOREGROUND = (0.08, 0.8)
PLAUSIBLE_ONE_BLOB = 0.9  # the largest connected foreground region holds at least this share of the foreground
PLAUSIBLE_BOX_FILL = 0.6  # ... and fills at least this share of its bounding box (circle: 0.79, square: 1.0)
PLAUSIBLE_BOX_ASPECT = 1.4  # ... whose longer side is at most this many times the shorter
PLAUSIBLE_HOLES = 0.05  # ... and encloses at most this share of its own area (no rings)
PLAUSIBLE_COLOR_TOLERANCE = 60  # max channel distance of "the same colour"
PLAUSIBLE_FLAT_FILL = 0.7  # share of the foreground within tolerance of its median (JPEG and decoders soften edges)


def _label_regions(mask):
    """Label the 4-connected True regions of a 2-D boolean array (flood fill, no scipy): (labels, sizes), where
    labels is 0 outside the mask and k inside region k, and sizes[k - 1] is that region's pixel count."""
    height, width = mask.shape
    labels = np.zeros(mask.shape, dtype=np.int64)
    sizes = []
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        labels[start] = len(sizes) + 1
        size, stack = 0, [start]
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = len(sizes) + 1
                    stack.append((ny, nx))
        sizes.append(size)
    return labels, sizes


def is_plausible(image):
    """True if the image looks like a dataset image: one flat-coloured circle or square on the gray background.

    With foreground = pixels differing from BACKGROUND by more than FOREGROUND_TOLERANCE in some channel:
      1. the foreground covers PLAUSIBLE_FOREGROUND of the image (not empty, not a full-frame colour or noise);
      2. it is one object: its largest 4-connected region holds >= PLAUSIBLE_ONE_BLOB of it, and that region
         is compact (fills >= PLAUSIBLE_BOX_FILL of its bounding box, aspect ratio <= PLAUSIBLE_BOX_ASPECT)
         without holes (encloses at most PLAUSIBLE_HOLES of its area in background cut off from the border);
      3. it is flat: >= PLAUSIBLE_FLAT_FILL of the foreground lies within PLAUSIBLE_COLOR_TOLERANCE of the
         foreground's median colour (no mixed colours or speckle), and that median is within the same tolerance
         of one of the six WARM_COLORS / COOL_COLORS (no muddy in-between colours).
    It accepts all make_shape_image images (also after JPEG) and rejects noise, a blank or single-colour canvas,
    two shapes, two-colour or blended shapes, stripes and rings. Deterministic; ~2 ms for a 32x32 image.
    """
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    foreground = np.abs(pixels - BACKGROUND).max(axis=2) > FOREGROUND_TOLERANCE
    fraction = foreground.mean()
    if not PLAUSIBLE_FOREGROUND[0] <= fraction <= PLAUSIBLE_FOREGROUND[1]:
        return False
    labels, sizes = _label_regions(foreground)
    if max(sizes) < PLAUSIBLE_ONE_BLOB * foreground.sum():
        return False
    blob = labels == 1 + int(np.argmax(sizes))
    rows, cols = np.nonzero(blob)
    box_height, box_width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    if blob.sum() < PLAUSIBLE_BOX_FILL * box_height * box_width:
        return False
    if max(box_height, box_width) > PLAUSIBLE_BOX_ASPECT * min(box_height, box_width):
        return False
    labels, _ = _label_regions(~blob)
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    holes = (labels > 0) & ~np.isin(labels, border)  # outside the object, yet cut off from the image's border
    if holes.sum() > PLAUSIBLE_HOLES * blob.sum():
        return False
    colors = pixels[foreground]
    median = np.median(colors, axis=0)
    if (np.abs(colors - median).max(axis=1) <= PLAUSIBLE_COLOR_TOLERANCE).mean() < PLAUSIBLE_FLAT_FILL:
        return False
    return bool(np.abs(np.array(WARM_COLORS + COOL_COLORS) - median).max(axis=1).min() <= PLAUSIBLE_COLOR_TOLERANCE)
