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
    """Resize the last ``len(size)`` axes of ``maps`` to ``size``: ``(H, W)``, ``(T,)`` or ``(D, H, W)``.

    ``jax.image.resize`` with half-pixel centres: the convention of ``torch``'s
    ``F.interpolate(..., align_corners=False)`` and of OpenCV's ``resize``. ``"bilinear"`` and
    ``"linear"`` are the same (linear along each resized axis: linear in 1-D, trilinear in 3-D).

    Examples:
      >>> import jax.numpy as jnp
      >>> from gradcam_jax.postprocess import upsample_to
      >>> upsample_to(jnp.array([[[0.0, 1.0]]]), (1, 4)).tolist()
      [[[0.0, 0.25, 0.75, 1.0]]]
    """
    check_interpolation(interpolation)
    size = tuple(int(s) for s in size)
    lead = maps.shape[: maps.ndim - len(size)]
    if tuple(maps.shape[len(lead) :]) == size:
        return maps
    return jax.image.resize(maps, lead + size, method=interpolation, antialias=False)


def normalize_maps(maps, rank: int = 2):
    """Min-max normalise each map (its last ``rank`` axes) to [0, 1].

    A constant map (an all-zero one included) becomes all zeros. A map holding a NaN or an
    infinity has no scale: it becomes all NaN — never zeros, which would read as "no evidence".

    Examples:
      >>> import jax.numpy as jnp
      >>> from gradcam_jax.postprocess import normalize_maps
      >>> normalize_maps(jnp.array([[[2.0, 4.0], [3.0, 6.0]]])).tolist()
      [[[0.0, 0.5], [0.25, 1.0]]]
    """
    axes = tuple(range(-rank, 0))
    lo = jnp.min(maps, axis=axes, keepdims=True)
    hi = jnp.max(maps, axis=axes, keepdims=True)
    span = hi - lo
    ok = span > 0
    out = jnp.where(ok, (maps - lo) / jnp.where(ok, span, 1.0), 0.0)
    return jnp.where(jnp.isfinite(span), out, jnp.nan)
