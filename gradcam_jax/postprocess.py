"""Resizing and normalising maps, on device.

The final ReLU of the CAM methods and the order of the steps (ReLU, upsample, normalise) are
:func:`gradcam_jax._maps.finish_maps`'s; these are the two operations it is built from.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["upsample_to", "normalize_maps", "check_interpolation", "INTERPOLATIONS"]

INTERPOLATIONS = ("nearest", "bilinear", "linear", "bicubic", "cubic", "lanczos3", "lanczos5")


def check_interpolation(interpolation: str) -> str:
    """``interpolation`` if it is one of :data:`INTERPOLATIONS`, else a ``ValueError``."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation={interpolation!r} is not one of {', '.join(INTERPOLATIONS)}.")
    return interpolation


def upsample_to(maps, size, interpolation: str = "bilinear"):
    """Resize the last two axes of ``maps`` to ``size = (H, W)``.

    ``jax.image.resize`` with half-pixel centres: the convention of ``torch``'s
    ``F.interpolate(..., align_corners=False)`` and of OpenCV's ``resize``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from gradcam_jax.postprocess import upsample_to
      >>> upsample_to(jnp.array([[[0.0, 1.0]]]), (1, 4)).tolist()
      [[[0.0, 0.25, 0.75, 1.0]]]
    """
    check_interpolation(interpolation)
    size = tuple(int(s) for s in size)
    if tuple(maps.shape[-2:]) == size:
        return maps
    return jax.image.resize(maps, maps.shape[:-2] + size, method=interpolation, antialias=False)


def normalize_maps(maps):
    """Min-max normalise each map (the last two axes) to [0, 1].

    A constant map (an all-zero one included) becomes all zeros, never NaN.

    Examples:
      >>> import jax.numpy as jnp
      >>> from gradcam_jax.postprocess import normalize_maps
      >>> normalize_maps(jnp.array([[[2.0, 4.0], [3.0, 6.0]]])).tolist()
      [[[0.0, 0.5], [0.25, 1.0]]]
    """
    lo = jnp.min(maps, axis=(-2, -1), keepdims=True)
    hi = jnp.max(maps, axis=(-2, -1), keepdims=True)
    span = hi - lo
    ok = span > 0
    return jnp.where(ok, (maps - lo) / jnp.where(ok, span, 1.0), 0.0)
