"""The upstream task of the fine-tuning study: classification of 64 shape × texture × colour classes.

It plays ImageNet's part for the detection splits (``d2norm_shapes_hard_*``, COCO's part), and
differs from them the way ImageNet differs from COCO:

* **many more, finer classes** (64 against 3): 8 shapes (:data:`UPSTREAM_SHAPES`, the three
  detection shapes among them) × 4 fills (solid, stripes, checker, dots) × 2 colour families
  (warm: red dominant, cool: blue dominant). The detection task never labels fill or colour, and
  five of the eight shapes never occur in it, as most ImageNet classes are not COCO categories;
* **one object per image, large and roughly centred** (circumradius 25–45% of the side, centre
  within the middle half), no boxes or masks: a label per image;
* **its own generator and seed stream** (image ``i`` is drawn from
  ``numpy.random.default_rng([UPSTREAM_SEED, i])``), its own image size (64 px against 96) and
  background (a gradient with noise plus 0–3 unannotated clutter items of the detection
  generator's kinds, as ImageNet photos hold clutter);
* **an unbounded stream**: image ``i`` is a pure function of ``i``, so a pretraining run of N
  iterations sees N × batch distinct images (no epochs, no augmentation needed), and any
  image can be regenerated.

The label of image ``i`` is drawn uniformly, so the 64 classes are balanced in expectation.
Images are H×W×3 uint8 in BGR order, like the detection splits' files.
"""

import math

import numpy as np

from .synthetic_shapes import _fill, _polygon, draw_clutter, noisy_gradient

__all__ = [
    "UPSTREAM_SHAPES",
    "UPSTREAM_FILLS",
    "UPSTREAM_COLOURS",
    "UPSTREAM_SEED",
    "UPSTREAM_VERSION",
    "num_upstream_classes",
    "class_name",
    "make_upstream_image",
    "upstream_batch",
]

UPSTREAM_SHAPES = ("circle", "square", "triangle", "pentagon", "hexagon", "star", "rectangle", "cross")
UPSTREAM_FILLS = ("solid", "stripes", "checker", "dots")
UPSTREAM_COLOURS = ("warm", "cool")
#: seed of the upstream stream (the detection splits use seeds 1-13)
UPSTREAM_SEED = 2301
#: version of the generator (part of the pretrained checkpoints' cache key)
UPSTREAM_VERSION = 1


def num_upstream_classes():
    return len(UPSTREAM_SHAPES) * len(UPSTREAM_FILLS) * len(UPSTREAM_COLOURS)


def class_name(label):
    """``label`` -> "shape/fill/colour" (label = (shape × fills + fill) × colours + colour)."""
    rest, colour = divmod(int(label), len(UPSTREAM_COLOURS))
    shape, fill = divmod(rest, len(UPSTREAM_FILLS))
    return f"{UPSTREAM_SHAPES[shape]}/{UPSTREAM_FILLS[fill]}/{UPSTREAM_COLOURS[colour]}"


def _colour(rng, family):
    """A BGR colour of the family: warm = red channel dominant, cool = blue channel dominant."""
    hi, mid, lo = rng.uniform(190, 255), rng.uniform(60, 170), rng.uniform(0, 90)
    return np.array([lo, mid, hi] if family == "warm" else [hi, mid, lo], np.float32)


def _pattern(rng, fill, size):
    """Boolean H×W map of where the fill shows its second colour (all False for "solid")."""
    if fill == "solid":
        return np.zeros((size, size), bool)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    a = rng.uniform(0, math.pi)
    u = xx * math.cos(a) + yy * math.sin(a)
    v = -xx * math.sin(a) + yy * math.cos(a)
    period = rng.uniform(5.0, 9.0)
    if fill == "stripes":
        return np.mod(u, period) < period / 2
    if fill == "checker":
        return (np.floor(u / period) + np.floor(v / period)) % 2 == 0
    # dots: a lattice of discs of radius period / 4
    du, dv = np.mod(u, period) - period / 2, np.mod(v, period) - period / 2
    return du * du + dv * dv < (period / 4) ** 2


def make_upstream_image(index, size=64, seed=UPSTREAM_SEED):
    """Image ``index`` of the stream (H×W×3 uint8, BGR) and its label in [0, 64)."""
    rng = np.random.default_rng([seed, int(index)])
    label = int(rng.integers(num_upstream_classes()))
    rest, colour = divmod(label, len(UPSTREAM_COLOURS))
    shape, fill = divmod(rest, len(UPSTREAM_FILLS))
    img = noisy_gradient(rng, size, base=(30, 140), slope=60, noise=8)
    draw_clutter(img, rng, size, (0, 3))
    r = rng.uniform(0.25, 0.45) * size
    cx, cy = rng.uniform(0.25 * size, 0.75 * size, size=2)
    poly = _polygon(UPSTREAM_SHAPES[shape], cx, cy, r, rng.uniform(0, 2 * math.pi))
    inside = _fill(img.shape[:2], poly)
    first = _colour(rng, UPSTREAM_COLOURS[colour])
    second = first * rng.uniform(0.35, 0.6)  # the same hue, darker
    pattern = _pattern(rng, UPSTREAM_FILLS[fill], size)
    img[inside & ~pattern] = first.astype(np.uint8)
    img[inside & pattern] = second.astype(np.uint8)
    return img, label


def upstream_batch(start, count, size=64, seed=UPSTREAM_SEED):
    """Images ``start`` .. ``start + count - 1``: (N×H×W×3 uint8 BGR array, N int64 labels)."""
    imgs, labels = zip(*(make_upstream_image(i, size, seed) for i in range(start, start + count)))
    return np.stack(imgs), np.array(labels, np.int64)
