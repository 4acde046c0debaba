"""Post-processing of raw maps, on device: ReLU, upsampling, per-map normalisation."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["upsample_to", "normalize_maps", "INTERPOLATIONS"]

INTERPOLATIONS = ("nearest", "bilinear", "linear", "bicubic", "cubic", "lanczos3", "lanczos5")


def upsample_to(maps, size, interpolation: str = "bilinear"):
    """Resize the last two axes of ``maps`` to ``size = (H, W)``.

    ``jax.image.resize`` with half-pixel centres: the convention of ``torch``'s
    ``F.interpolate(..., align_corners=False)`` and of OpenCV's ``resize``.
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation={interpolation!r} is not one of {', '.join(INTERPOLATIONS)}.")
    size = tuple(int(s) for s in size)
    if tuple(maps.shape[-2:]) == size:
        return maps
    return jax.image.resize(maps, maps.shape[:-2] + size, method=interpolation, antialias=False)


def normalize_maps(maps):
    """Min-max normalise each map (the last two axes) to [0, 1].

    A constant map (an all-zero one included) becomes all zeros, never NaN.
    """
    lo = jnp.min(maps, axis=(-2, -1), keepdims=True)
    hi = jnp.max(maps, axis=(-2, -1), keepdims=True)
    span = hi - lo
    ok = span > 0
    return jnp.where(ok, (maps - lo) / jnp.where(ok, span, 1.0), 0.0)
