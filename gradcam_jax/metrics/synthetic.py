"""A synthetic localisation task with known answers, and a model that solves it by construction.

Each image is grey noise with one coloured rectangle; the rectangle's colour is its class and
its box is known exactly. :func:`colour_detector` is a one-conv-layer network whose class score
is the mean response of a colour detector, so its evidence for a class is exactly where the
rectangle is: Grad-CAM at its conv layer must find the box, and the metrics of
:mod:`gradcam_jax.metrics` can be checked against the truth without a trained model.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .._tap import split_tap

__all__ = ["SyntheticBoxes", "boxes_dataset", "colour_detector"]


class SyntheticBoxes(NamedTuple):
    """``images (N, S, S, 3)`` float32, ``boxes (N, 4)`` inclusive ``(y0, x0, y1, x1)`` int32,
    ``labels (N,)`` int32 (the colour channel of the rectangle), ``masks (N, S, S)`` bool."""

    images: jax.Array
    boxes: jax.Array
    labels: jax.Array
    masks: jax.Array


def boxes_dataset(
    seed: int,
    n: int,
    size: int = 32,
    *,
    n_classes: int = 3,
    min_side: int | None = None,
    max_side: int | None = None,
    noise: float = 0.1,
    background: float = 0.3,
) -> SyntheticBoxes:
    """``n`` images of one coloured rectangle on grey noise, with their boxes and classes.

    Class ``c < 3`` is a rectangle of value 1 in colour channel ``c`` and 0 in the others; the
    background is ``background`` in every channel; Gaussian noise of standard deviation
    ``noise`` is added everywhere. Rectangle sides are uniform in ``[min_side, max_side]``
    (default ``size // 4`` to ``size // 2``), positions uniform inside the image. Generated
    with NumPy from ``seed`` (identical on every platform).
    """
    if not 1 <= n_classes <= 3:
        raise ValueError("boxes_dataset: n_classes must be 1, 2 or 3 (one colour channel per class).")
    r = np.random.default_rng(seed)
    lo = size // 4 if min_side is None else int(min_side)
    hi = size // 2 if max_side is None else int(max_side)
    images = np.full((n, size, size, 3), background, np.float32)
    boxes = np.zeros((n, 4), np.int32)
    labels = r.integers(0, n_classes, size=n).astype(np.int32)
    masks = np.zeros((n, size, size), bool)
    for i in range(n):
        h, w = r.integers(lo, hi + 1, size=2)
        y0 = r.integers(0, size - h + 1)
        x0 = r.integers(0, size - w + 1)
        colour = np.zeros(3, np.float32)
        colour[labels[i]] = 1.0
        images[i, y0 : y0 + h, x0 : x0 + w] = colour
        masks[i, y0 : y0 + h, x0 : x0 + w] = True
        boxes[i] = (y0, x0, y0 + h - 1, x0 + w - 1)
    images += (noise * r.standard_normal(images.shape)).astype(np.float32)
    return SyntheticBoxes(jnp.asarray(images), jnp.asarray(boxes), jnp.asarray(labels), jnp.asarray(masks))


def colour_detector(n_classes: int = 3, *, gain: float = 40.0, bias: float = -0.25):
    """A one-layer CNN that classifies :func:`boxes_dataset` images by the rectangle's colour.

    ``features(x) = ReLU(conv3x3(x) + bias)`` with one channel per class: filter ``c`` averages
    ``x_c - (sum of the other channels) / 2`` over its 3 x 3 window (1 on the rectangle, about 0
    on the grey background); ``scores = gain * mean_over_pixels(features)``.

    Returns:
      ``(tap, scores_fn)``: a :func:`gradcam_jax.split_tap` at the conv layer and the plain
      ``x -> scores`` function.
    """

    k = np.full((3, 3, 3, n_classes), -0.5 / 9.0, np.float32)
    for c in range(n_classes):
        k[:, :, c, c] = 1.0 / 9.0
    kernel = jnp.asarray(k)

    def features(x):
        y = jax.lax.conv_general_dilated(
            x,
            kernel,
            (1, 1),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=jax.lax.Precision.HIGHEST,
        )
        return jax.nn.relu(y + bias)

    def head(a):
        return gain * jnp.mean(a, axis=(1, 2))

    return split_tap(features, head), (lambda x: head(features(x)))
