"""Sliding-window occlusion: the score drop when a window of the input is replaced by a baseline.

The occluded passes are ``vmap``-ed and run ``chunk_size`` images at a time under ``jit``, as
in :mod:`gradcam_jax.perturbation`; the masks are built inside each chunk.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ._callables import PytreeCallable, as_pytree
from ._chunking import chunked_vmap, perturbations_per_step
from ._maps import check_image_batch, kernel
from ._tap import scores_fn
from ._targets import (
    Target,
    TargetSpec,
    batch_size,
    check_target_against,
    fixed_top,
    select_scores,
    target_spec,
)
from .methods import safe_divide

__all__ = ["occlusion", "window_starts", "OcclusionOptions", "occlusion_kernel"]

_HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------------------------
# Occlusion
# --------------------------------------------------------------------------------------------


def window_starts(size: int, window: int, stride: int) -> np.ndarray:
    """Start offsets of a window sliding along one axis: ``0, s, 2s, ...``.

    Captum's convention: ``ceil((size - window) / stride) + 1`` positions, the last window
    clipped at the border when ``stride`` does not divide ``size - window`` — so with
    ``stride <= window`` every pixel is covered at least once.
    """
    return np.arange(-(-(size - window) // stride) + 1) * stride


def _window_masks(size: int, window: int, stride: int) -> np.ndarray:
    starts = window_starts(size, window, stride)
    pos = np.arange(size)
    return (pos[None, :] >= starts[:, None]) & (pos[None, :] < starts[:, None] + window)


@dataclasses.dataclass(frozen=True)
class OcclusionOptions:
    """The static options of the occlusion kernel."""

    window: tuple[int, int]
    stride: tuple[int, int]
    per_step: int


@kernel
def occlusion_kernel(fn: PytreeCallable, x, target: TargetSpec, baseline, *, options: OcclusionOptions):
    """Occlusion's maps under ``jit`` (see :func:`occlusion`); ``fn`` is passed as a pytree."""
    scores_of = scores_fn(fn.fn)
    clean_scores = scores_of(x)
    spec = fixed_top(target, clean_scores)
    y = select_scores(spec, clean_scores).astype(jnp.float32)
    height, width = x.shape[1:3]
    rows = _window_masks(height, options.window[0], options.stride[0])  # (nr, H)
    cols = _window_masks(width, options.window[1], options.stride[1])  # (nc, W)
    nr, nc = rows.shape[0], cols.shape[0]
    fill = jnp.broadcast_to(jnp.asarray(baseline, x.dtype), x.shape)

    def occluded_score(row_col):
        row, col = row_col
        inside = row[:, None] & col[None, :]  # (H, W)
        return select_scores(spec, scores_of(jnp.where(inside[None, :, :, None], fill, x))).astype(
            jnp.float32
        )

    positions = (jnp.asarray(np.repeat(rows, nc, axis=0)), jnp.asarray(np.tile(cols, (nr, 1))))
    drops = y[None] - chunked_vmap(occluded_score, positions, options.per_step)  # (P, B[, K])
    drops = drops.reshape((nr, nc) + drops.shape[1:])
    r = jnp.asarray(rows, jnp.float32)
    c = jnp.asarray(cols, jnp.float32)
    # A window is the outer product of a row mask and a column mask, so the sum over windows
    # of drop * mask factorises: no (P, H, W) mask tensor.
    total = jnp.einsum("ij...,ih,jw->...hw", drops, r, c, precision=_HIGHEST)
    count = jnp.asarray(np.outer(rows.sum(0), cols.sum(0)), jnp.float32)  # windows covering each pixel
    return safe_divide(total, count)


def _pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        v = (int(v), int(v))
    try:
        v = tuple(int(i) for i in v)
    except TypeError:
        raise TypeError(f"occlusion: {name} must be an int or a pair (h, w); got {v!r}.") from None
    if len(v) != 2 or min(v) < 1:
        raise ValueError(f"occlusion: {name} must be a pair of positive ints (h, w); got {v!r}.")
    return v


def _check_baseline(baseline, x):
    baseline = jnp.asarray(baseline, x.dtype)
    try:
        jnp.broadcast_shapes(baseline.shape, x.shape)
    except ValueError:
        raise ValueError(
            f"occlusion: baseline of shape {baseline.shape} does not broadcast to the input {x.shape}."
        ) from None
    return baseline


def occlusion(
    fn,
    x,
    target: Target = None,
    *,
    window: int | tuple[int, int] = (16, 16),
    stride: int | tuple[int, int] = (8, 8),
    baseline=0.0,
    chunk_size: int = 64,
) -> jax.Array:
    """Sliding-window occlusion: the score drop when a window is replaced by a baseline.

    A ``window = (h, w)`` patch (all channels) slides over the image by ``stride``. For each
    position ``p`` the input is occluded (the patch set to ``baseline``) and::

        drop_p = y^c(x) - y^c(x with patch p := baseline)
        map[i, j] = sum_{p covering (i, j)} drop_p / #{p covering (i, j)}

    the mean drop over the windows that cover each pixel. Positions follow Captum's
    ``Occlusion``: ``ceil((H - h) / stride_h) + 1`` rows of windows starting at
    ``0, stride_h, ...``, the last clipped at the image border (likewise for columns), so every
    pixel is covered when ``stride <= window``; a pixel no window covers gets 0. With a
    full-channel window this equals ``captum.attr.Occlusion(f).attribute(x_nchw,
    sliding_window_shapes=(C, h, w), strides=(1, sh, sw), baselines=baseline)`` at any one
    channel (Captum repeats the value over the channels).

    The maps are raw score differences: no ReLU, no normalisation (positive where occluding
    lowers the score).

    Args:
      fn: any callable ``x -> scores`` (``(B, classes)``, or whatever a callable target takes);
        a :class:`~gradcam_jax.Tap` is used through its scores. Arrays inside ``fn``'s pytree
        (an Equinox module, a tap's parameters) are traced, not baked in.
      x: images ``(B, H, W, C)``.
      target: as in :func:`gradcam_jax.grad_cam`; ``None`` is the top class of the unoccluded
        input. K targets share the occluded passes.
      window: patch size ``(h, w)`` (or an int).
      stride: step ``(sh, sw)`` (or an int).
      baseline: the fill value: a number, or an array broadcastable to ``x`` (a blurred copy,
        a per-channel mean ``(C,)``).
      chunk_size: occluded images per step (rounded down to whole batches, at least one).

    Returns:
      ``float32`` maps ``(B, H, W)``, or ``(B, K, H, W)`` for K targets per example.

    Examples:
      >>> import jax.numpy as jnp
      >>> from gradcam_jax.perturbation import occlusion
      >>> fn = lambda x: jnp.stack([x[..., :4, :4, :].sum((1, 2, 3)), x.sum((1, 2, 3))], -1)
      >>> m = occlusion(fn, jnp.ones((1, 8, 8, 3)), target=0, window=4, stride=4)
      >>> m[0, :2, :2].tolist(), m[0, 6, 6].item()
      ([[48.0, 48.0], [48.0, 48.0]], 0.0)

    References:
      Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks", ECCV 2014,
      https://arxiv.org/abs/1311.2901 (§4.2); Captum's ``Occlusion``,
      https://captum.ai/api/occlusion.html.
    """
    if not callable(fn):
        raise TypeError(f"occlusion: fn must be a callable x -> scores (or a tap); got {type(fn).__name__}.")
    batch = batch_size(x)
    check_image_batch(x, "occlusion")
    win, step = _pair(window, "window"), _pair(stride, "stride")
    height, width = x.shape[1:3]
    if win[0] > height or win[1] > width:
        raise ValueError(f"occlusion: window {win} does not fit in the {height}x{width} image.")
    spec = target_spec(target, batch)
    check_target_against(spec, lambda: jax.eval_shape(scores_fn(fn), x))
    options = OcclusionOptions(win, step, perturbations_per_step(chunk_size, batch))
    return occlusion_kernel(as_pytree(fn), x, spec, _check_baseline(baseline, x), options=options)
