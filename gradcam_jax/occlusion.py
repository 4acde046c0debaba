"""Sliding-window occlusion: the score drop when a window of the input is replaced by a baseline.

The occluded passes are ``vmap``-ed and run ``chunk_size`` images at a time, as in
:mod:`gradcam_jax.perturbation` (a device loop under ``jit``, or on CPU one jitted chunk kernel
called from Python with ``chunk_loop="host"``); the masks are built inside each chunk.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._callables import PytreeCallable, as_pytree
from ._chunking import Stages, perturbations_per_step, run_chunked, run_on_device
from ._grads import check_fn_target
from ._inputs import image_leaf, image_of, spatial_size, with_image
from ._layout import to_channels_last
from ._maps import MapOptions, check_images, kernel
from ._tap import scores_fn
from ._targets import (
    Target,
    TargetSpec,
    batch_size,
    fixed_top,
    nan_where,
    select_scores,
    target_spec,
)
from .methods import safe_divide

__all__ = ["occlusion", "window_starts", "OcclusionOptions", "OCCLUSION", "occlusion_kernel"]

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
    """The static options of the occlusion kernel (``window`` and ``stride`` per spatial axis)."""

    window: tuple[int, ...]
    stride: tuple[int, ...]
    per_step: int
    maps: MapOptions = MapOptions()


def _sum_over_windows(drops, masks: list[np.ndarray]):
    """``sum_p drop_p * window_p`` where window ``p`` is the outer product of one mask per axis.

    ``drops``: ``(n_1, ..., n_r, B[, K])``; ``masks[d]``: ``(n_d, size_d)``. It factorises per
    axis, so no ``(P, *spatial)`` mask tensor is built.
    """
    r = len(masks)
    win, pos = "ijk"[:r], "uvw"[:r]
    eq = f"{win}...," + ",".join(f"{w}{p}" for w, p in zip(win, pos, strict=True)) + f"->...{pos}"
    return jnp.einsum(eq, drops, *[jnp.asarray(m, jnp.float32) for m in masks], precision=_HIGHEST)


def window_grid(x, options: OcclusionOptions):
    """``(view, masks)``: the image's view and, per spatial axis, which pixels each window
    position covers, ``(n_d, size_d)`` (NumPy, from shapes)."""
    view = check_images(x, options.maps, "occlusion")
    sizes = spatial_size(x, view)
    return view, [
        _window_masks(n, w, s) for n, w, s in zip(sizes, options.window, options.stride, strict=True)
    ]


def occlusion_start(args, options: OcclusionOptions):
    """The clean pass: ``(spec, y^c(x))``."""
    fn, x, target, _ = args
    clean_scores = scores_fn(fn.fn)(x)
    spec = fixed_top(target, clean_scores)
    return spec, select_scores(spec, clean_scores).astype(jnp.float32)


def occlusion_count(args, carry, options: OcclusionOptions) -> int:
    return int(np.prod([m.shape[0] for m in window_grid(args[1], options)[1]]))


def occluded_score(args, carry, p, options: OcclusionOptions):
    """``y^c`` with window position ``p`` (row-major over the per-axis positions) set to the baseline."""
    fn, x, _, baseline = args
    view, masks = window_grid(x, options)
    image = image_of(x, view)  # (B, *spatial, C)
    rank = len(masks)
    at = jnp.unravel_index(p, tuple(m.shape[0] for m in masks))
    inside = functools.reduce(
        jnp.logical_and,
        [
            jnp.asarray(m)[i].reshape((1,) * d + (m.shape[1],) + (1,) * (rank - d - 1))
            for d, (m, i) in enumerate(zip(masks, at, strict=True))
        ],
    )  # (*spatial)
    fill = to_channels_last(jnp.broadcast_to(baseline, image_leaf(x, view).shape), view.layout)
    occluded = jnp.where(inside[None, ..., None], fill, image)
    return select_scores(carry[0], scores_fn(fn.fn)(with_image(x, view, occluded))).astype(jnp.float32)


def occlusion_finish(args, carry, scores, options: OcclusionOptions):
    """The mean drop ``y^c(x) - y^c(occluded)`` over the windows covering each position."""
    _, masks = window_grid(args[1], options)
    y = carry[1]
    drops = y[None] - scores  # (P, B[, K])
    total = _sum_over_windows(drops.reshape(tuple(m.shape[0] for m in masks) + drops.shape[1:]), masks)
    count = jnp.asarray(functools.reduce(np.multiply.outer, [m.sum(0) for m in masks]), jnp.float32)
    return nan_where(jnp.isnan(y), safe_divide(total, count))  # count: windows covering each position


OCCLUSION = Stages(occlusion_start, occlusion_count, occluded_score, occlusion_finish, auto_host=False)


@kernel
def occlusion_kernel(fn: PytreeCallable, x, target: TargetSpec, baseline, *, options: OcclusionOptions):
    """Occlusion's maps under ``jit`` (see :func:`occlusion`); ``fn`` is passed as a pytree."""
    return run_on_device(OCCLUSION, (fn, x, target, baseline), options, options.per_step)


def _per_axis(v, name: str, rank: int) -> tuple[int, ...]:
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        v = (int(v),) * rank
    try:
        v = tuple(int(i) for i in v)
    except TypeError:
        raise TypeError(f"occlusion: {name} must be an int or one int per spatial axis; got {v!r}.") from None
    if len(v) != rank or min(v) < 1:
        raise ValueError(f"occlusion: {name} must be {rank} positive ints (one per spatial axis); got {v!r}.")
    return v


def _check_baseline(baseline, image):
    baseline = jnp.asarray(baseline, image.dtype)
    try:
        jnp.broadcast_shapes(baseline.shape, image.shape)
    except ValueError:
        raise ValueError(
            f"occlusion: baseline of shape {baseline.shape} does not broadcast to the input {image.shape}."
        ) from None
    return baseline


def occlusion(
    fn,
    x,
    target: Target = None,
    *,
    window: int | tuple[int, ...] = 16,
    stride: int | tuple[int, ...] = 8,
    baseline=0.0,
    chunk_size: int = 64,
    chunk_loop: str = "auto",
    layout: str | None = None,
    input: Any = None,
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
      x: images ``(B, H, W, C)`` — or signals ``(B, T, C)``, volumes ``(B, D, H, W, C)``,
        channels-first with ``layout=``, a pytree with ``input=`` (see :func:`gradcam_jax.cam`).
      target: as in :func:`gradcam_jax.grad_cam`; ``None`` is the top class of the unoccluded
        input. K targets share the occluded passes.
      window: patch size ``(h, w)`` (one int per spatial axis, or one int for all).
      stride: step ``(sh, sw)`` (likewise).
      baseline: the fill value: a number, or an array broadcastable to the image in its own
        layout (a blurred copy, a per-channel mean ``(C,)`` for channels-last).
      chunk_size: occluded images per step (rounded down to whole batches, at least one).
      chunk_loop: as in :func:`gradcam_jax.score_cam`: ``"auto"`` (default) and ``"device"``
        loop over the chunks in one ``lax.map`` inside one jitted kernel (faster on XLA:CPU for
        these forward-only chunks); ``"host"`` from Python over one jitted chunk kernel.

    Returns:
      ``float32`` maps ``(B, *spatial)``, or ``(B, K, *spatial)`` for K targets per example.

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
    # long-function: the docstring documents every option; the body is the checks and one kernel call.
    if not callable(fn):
        raise TypeError(f"occlusion: fn must be a callable x -> scores (or a tap); got {type(fn).__name__}.")
    maps = MapOptions(layout=layout, input=input)
    view = check_images(x, maps, "occlusion")  # the input gate
    batch = batch_size(x)
    sizes = spatial_size(x, view)
    win = _per_axis(window, "window", len(sizes))
    step = _per_axis(stride, "stride", len(sizes))
    if any(w > n for w, n in zip(win, sizes, strict=True)):
        raise ValueError(f"occlusion: window {win} does not fit in x, whose spatial size is {sizes}.")
    spec = target_spec(target, batch)
    check_fn_target(fn, x, spec, "occlusion")
    options = OcclusionOptions(win, step, perturbations_per_step(chunk_size, batch), maps)
    args = (as_pytree(fn), x, spec, _check_baseline(baseline, image_leaf(x, view)))
    return run_chunked(
        occlusion_kernel, OCCLUSION, args, options, n_items=occlusion_count(args, None, options),
        per_step=options.per_step, chunk_loop=chunk_loop, who="occlusion",
    )  # fmt: skip
