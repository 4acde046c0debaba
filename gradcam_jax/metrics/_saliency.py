"""The order in which the removal metrics take positions away, and per-channel attributions
collapsed to one map.

A *position* is one spatial location of the input — a pixel of an image, a time step of a
signal, a voxel of a volume — with all its channels. Maps are ``(B, *spatial)``; positions are
numbered in row-major order of the spatial axes.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from .._layout import Layout, parse_layout

__all__ = ["saliency_order", "saliency_ranks", "pixel_saliency", "removal_counts", "trapezoid"]


def saliency_order(maps):
    """Position indices (row-major) of each map from most to least salient: ``(B, N)`` int32.

    ``maps`` are ``(B, *spatial)`` with any number of spatial axes (``N`` positions: ``H * W``
    pixels, ``T`` time steps, ``D * H * W`` voxels). Ties are broken by the position's
    row-major index (the first one first): a stable sort of the negated values. ``-0.0`` and
    ``0.0`` are the same value.
    """
    flat = maps.reshape(maps.shape[0], -1).astype(jnp.float32)
    return jnp.argsort(-flat + 0.0, axis=-1, stable=True).astype(jnp.int32)


def saliency_ranks(maps):
    """Each position's place in :func:`saliency_order` (0 = most salient), shaped like the maps
    ``(B, *spatial)``, int32."""
    order = saliency_order(maps)
    b, n = order.shape
    ranks = (
        jnp.zeros((b, n), jnp.int32)
        .at[jnp.arange(b)[:, None], order]
        .set(jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n)))
    )
    return ranks.reshape(maps.shape)


def removal_counts(n_positions: int, n_steps: int) -> np.ndarray:
    """Positions removed after step ``k = 0 .. n_steps``: ``floor(k * n_positions / n_steps)``."""
    return (np.arange(n_steps + 1, dtype=np.int64) * n_positions) // n_steps


def trapezoid(curve, fractions):
    """Area under ``curve (..., n+1)`` over ``fractions (n+1,)`` by the trapezoidal rule."""
    dx = jnp.diff(jnp.asarray(fractions, jnp.float32))
    return jnp.sum((curve[..., 1:] + curve[..., :-1]) * 0.5 * dx, axis=-1)


def _reduce(a, reduce: str, axis: int):
    if reduce == "abs_sum":
        return jnp.sum(jnp.abs(a), axis=axis)
    if reduce == "abs_max":
        return jnp.max(jnp.abs(a), axis=axis)
    if reduce == "sum":
        return jnp.sum(a, axis=axis)
    if reduce == "l2":
        return jnp.sqrt(jnp.sum(a * a, axis=axis))
    raise ValueError(f"pixel_saliency: reduce={reduce!r} is not one of abs_sum, abs_max, sum, l2.")


def pixel_saliency(attributions, reduce: str = "abs_sum", *, layout: str | Layout | None = None):
    """Collapse per-channel attributions to one map per example, ``(B, *spatial)``.

    ``reduce``: ``"abs_sum"`` (sum of absolute values over channels, the usual choice for
    gradient-type maps such as Guided Backprop), ``"abs_max"`` (largest absolute value, the
    saliency-map convention of Simonyan et al.), ``"sum"`` (signed sum), ``"l2"`` (Euclidean
    norm over channels).

    Without ``layout``: ``(B, H, W, C)`` and ``(B, D, H, W, C)`` are reduced over their last
    axis; ``(B, H, W)`` and ``(B, T)`` are maps already and returned unchanged (as float32).
    A signal's ``(B, T, C)`` attributions (which look like a ``(B, H, W)`` map) and
    channels-first ones need ``layout=`` (``"NLC"``, ``"NCL"``, ``"NCHW"``, ``"NCDHW"``...): the
    channel axis is then the layout's, and an array with one axis fewer is a map, returned
    unchanged. Attributions from :func:`gradcam_jax.gradients` / ``guided_backprop`` come in
    the input's layout: pass the explainer's ``layout``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from gradcam_jax.metrics import pixel_saliency
      >>> pixel_saliency(-jnp.ones((1, 5, 2)), layout="NLC").tolist()
      [[2.0, 2.0, 2.0, 2.0, 2.0]]
    """
    a = jnp.asarray(attributions)
    if layout is None:
        if a.ndim in (2, 3):
            return a.astype(jnp.float32)
        if a.ndim not in (4, 5):
            raise ValueError(
                f"pixel_saliency: attributions must be (B, H, W, C) or (B, D, H, W, C) (maps (B, H, W) "
                f"pass through; signals (B, T, C) and channels-first ones need layout=); got {a.shape}."
            )
        return _reduce(a.astype(jnp.float32), reduce, -1)
    lay = parse_layout(layout)
    if a.ndim == lay.ndim - 1 and lay.spatial_rank:
        return a.astype(jnp.float32)
    if a.ndim != lay.ndim or not lay.spatial_rank:
        raise ValueError(
            f"pixel_saliency: layout={lay.name!r} takes attributions of rank {lay.ndim} (or maps of rank "
            f"{lay.ndim - 1}); got shape {a.shape}."
        )
    return _reduce(a.astype(jnp.float32), reduce, lay.channel_axis())
