"""Separable Gaussian filtering on device: insertion's blurred canvas and SSIM's window."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._layout import Layout, parse_layout

__all__ = ["gaussian_kernel", "filter_axis", "gaussian_blur"]


def gaussian_kernel(sigma: float, truncate: float) -> np.ndarray:
    """A normalised 1-D Gaussian of radius ``int(truncate * sigma + 0.5)`` (SciPy's rule)."""
    radius = int(truncate * float(sigma) + 0.5)
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / float(sigma)) ** 2)
    return (k / k.sum()).astype(np.float32)


def filter_axis(x, kernel: np.ndarray, axis: int, mode: str):
    """Correlate ``x`` with a symmetric 1-D ``kernel`` along ``axis``.

    ``mode="reflect"``: the border is mirrored including the edge pixel (``d c b a | a b c d``,
    SciPy's ``reflect``); ``mode="valid"``: no padding, the axis shrinks by ``len(kernel) - 1``.
    """
    r = (len(kernel) - 1) // 2
    if mode == "reflect":
        n = x.shape[axis]
        pad = [(0, 0)] * x.ndim
        pad[axis] = (r, r)
        if r >= n:  # mirror repeatedly (symmetric extension with period 2n), as SciPy does
            idx = np.arange(-r, n + r)
            idx = np.mod(idx, 2 * n)
            idx = np.where(idx >= n, 2 * n - 1 - idx, idx)
            x = jnp.take(x, jnp.asarray(idx), axis=axis)
        else:
            x = jnp.pad(x, pad, mode="symmetric")
    elif mode != "valid":
        raise ValueError(f"mode={mode!r}")
    m = x.shape[axis] - 2 * r
    out: Any = 0.0
    for i, w in enumerate(kernel):
        out = out + float(w) * jax.lax.slice_in_dim(x, i, i + m, axis=axis)
    return out


def _spatial_axes(shape: tuple[int, ...], layout: str | Layout | None) -> tuple[int, ...]:
    if layout is None:
        if not 3 <= len(shape) <= 5:
            raise ValueError(
                f"gaussian_blur: images must be (B, *spatial, C) with 1 to 3 spatial axes — (B, T, C), "
                f"(B, H, W, C) or (B, D, H, W, C), channels-first with layout= — ; got shape {shape}."
            )
        return tuple(range(1, len(shape) - 1))
    lay = parse_layout(layout)
    if len(shape) != lay.ndim or not lay.spatial_rank:
        raise ValueError(f"gaussian_blur: layout={lay.name!r} needs a {lay.ndim}-D input; got shape {shape}.")
    return tuple(range(2, len(shape))) if lay.channels_first else tuple(range(1, len(shape) - 1))


def gaussian_blur(images, sigma: float = 5.0, truncate: float = 4.0, *, layout: str | Layout | None = None):
    """Gaussian blur of a batch over every spatial axis, on device.

    ``images``: ``(B, H, W, C)``, signals ``(B, T, C)`` or volumes ``(B, D, H, W, C)``
    (channels-last by rank; channels-first with ``layout=``). Separable, kernel radius
    ``int(truncate * sigma + 0.5)`` (41 taps per axis at the default ``sigma=5``), borders
    mirrored (SciPy's ``mode="reflect"``): for images equal to
    ``scipy.ndimage.gaussian_filter(image, sigma=(sigma, sigma, 0), mode="reflect",
    truncate=truncate)`` per image, and likewise with ``sigma`` on each spatial axis and 0 on
    the channels for other ranks. ``sigma=0`` returns the images unchanged.
    """
    x = jnp.asarray(images)
    axes = _spatial_axes(tuple(x.shape), layout)
    if sigma == 0:
        return x
    return _gaussian_blur_jit(x, float(sigma), float(truncate), axes)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _gaussian_blur_jit(x, sigma: float, truncate: float, axes: tuple[int, ...]):
    k = gaussian_kernel(sigma, truncate)
    y = x.astype(jnp.float32)
    for axis in axes:
        y = filter_axis(y, k, axis, "reflect")
    return y.astype(x.dtype)
