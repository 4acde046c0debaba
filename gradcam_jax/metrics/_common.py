"""Pieces the metrics share: scores functions under jit, targets, saliency order, chunked forwards.

Nothing here is specific to one metric. All functions are pure and jittable.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._chunking import map_in_chunks
from .._tap import scores_fn
from .._targets import check_target_against, target_spec

__all__ = ["saliency_order", "saliency_ranks", "pixel_saliency", "gaussian_blur", "removal_counts"]


@dataclasses.dataclass(frozen=True)
class RemovalOptions:
    """The static options of the removal-metric kernels (one ``options`` argument each)."""

    chunk: int
    softmax: bool
    n_steps: int = 0
    counts: tuple[int, ...] = ()


# --------------------------------------------------------------------------------------------
# Argument checks and targets
# --------------------------------------------------------------------------------------------


def check_fn(fn, who: str):
    if not callable(fn):
        raise TypeError(
            f"{who}: fn must be a callable images -> scores (B, classes) (a model's apply "
            f"closure, an Equinox model, a tap); got {type(fn).__name__}."
        )


def check_maps(maps, images, who: str):
    """Maps must be (B, H, W) at the images' resolution."""
    if not hasattr(maps, "ndim") or maps.ndim != 3:
        shape = getattr(maps, "shape", type(maps).__name__)
        hint = (
            " Collapse a per-channel attribution (B, H, W, C), e.g. Guided Backprop's, with "
            "metrics.pixel_saliency."
            if getattr(maps, "ndim", 0) == 4
            else ""
        )
        raise ValueError(f"{who}: maps must be (B, H, W); got {shape}.{hint}")
    if images is not None and tuple(maps.shape) != tuple(images.shape[:3]):
        raise ValueError(
            f"{who}: maps {tuple(maps.shape)} do not match the images' (B, H, W) = "
            f"{tuple(images.shape[:3])}. Compute the maps with upsample=True (or resize them with "
            f"gradcam_jax.postprocess.upsample_to)."
        )


def check_positive_int(value, name: str, who: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{who}: {name} must be a positive int; got {value!r}.")
    return int(value)


def prepare_target(fn, images, target, who: str):
    """``None`` stays None (resolved under jit to the top class of the clean image); an int or
    an int array ``(B,)`` becomes an int32 array ``(B,)``, range-checked when concrete."""
    if target is None:
        return None
    batch = images.shape[0]
    if isinstance(target, (list, tuple)):
        target = np.asarray(target)  # here a list is one class per image, not K classes
    spec = target_spec(target, batch)  # the explainers' own target rules and messages
    if spec.kind != "index":
        raise ValueError(
            f"{who}: target must be None, an int or an int array of shape ({batch},); got {target!r}."
        )
    scores = scores_fn(fn)
    one = jax.ShapeDtypeStruct((1,) + tuple(images.shape[1:]), images.dtype)
    check_target_against(spec, lambda: jax.eval_shape(scores, one))
    return jnp.asarray(spec.value, jnp.int32)


def class_scores(scores, target, softmax: bool):
    """``scores (N, classes)`` -> the target class's probability (``softmax``) or score ``(N,)``."""
    scores = scores.astype(jnp.float32)
    if scores.ndim != 2:
        raise ValueError(
            f"The scores function must return (batch, classes); it returned shape {scores.shape}."
        )
    if softmax:
        scores = jax.nn.softmax(scores, axis=-1)
    return jnp.take_along_axis(scores, target[:, None], axis=-1)[:, 0]


def resolve_target(fn, images, target, chunk: int):
    """The target under jit: ``None`` -> argmax of the clean scores (chunked forwards)."""
    if target is not None:
        return target
    b = images.shape[0]
    top = map_in_chunks(lambda idx: jnp.argmax(fn(images[idx]), axis=-1).astype(jnp.int32), b, chunk)
    return top


# --------------------------------------------------------------------------------------------
# Chunked evaluation
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Saliency order
# --------------------------------------------------------------------------------------------


def saliency_order(maps):
    """Pixel indices (row-major) of each map from most to least salient: ``(B, H*W)`` int32.

    Ties are broken by the pixel's row-major index (the first pixel first): a stable sort of
    the negated values. ``-0.0`` and ``0.0`` are the same value.
    """
    flat = maps.reshape(maps.shape[0], -1).astype(jnp.float32)
    return jnp.argsort(-flat + 0.0, axis=-1, stable=True).astype(jnp.int32)


def saliency_ranks(maps):
    """Each pixel's position in :func:`saliency_order` (0 = most salient): ``(B, H, W)`` int32."""
    order = saliency_order(maps)
    b, n = order.shape
    ranks = (
        jnp.zeros((b, n), jnp.int32)
        .at[jnp.arange(b)[:, None], order]
        .set(jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n)))
    )
    return ranks.reshape(maps.shape)


def removal_counts(n_pixels: int, n_steps: int) -> np.ndarray:
    """Pixels removed after step ``k = 0 .. n_steps``: ``floor(k * n_pixels / n_steps)``."""
    return (np.arange(n_steps + 1, dtype=np.int64) * n_pixels) // n_steps


def trapezoid(curve, fractions):
    """Area under ``curve (..., n+1)`` over ``fractions (n+1,)`` by the trapezoidal rule."""
    dx = jnp.diff(jnp.asarray(fractions, jnp.float32))
    return jnp.sum((curve[..., 1:] + curve[..., :-1]) * 0.5 * dx, axis=-1)


def pixel_saliency(attributions, reduce: str = "abs_sum"):
    """Collapse per-channel attributions ``(B, H, W, C)`` to one map per image ``(B, H, W)``.

    ``reduce``: ``"abs_sum"`` (sum of absolute values over channels, the usual choice for
    gradient-type maps such as Guided Backprop), ``"abs_max"`` (largest absolute value, the
    saliency-map convention of Simonyan et al.), ``"sum"`` (signed sum), ``"l2"`` (Euclidean
    norm over channels). ``(B, H, W)`` input is returned unchanged.
    """
    a = jnp.asarray(attributions)
    if a.ndim == 3:
        return a.astype(jnp.float32)
    if a.ndim != 4:
        raise ValueError(f"pixel_saliency: attributions must be (B, H, W, C) or (B, H, W); got {a.shape}.")
    a = a.astype(jnp.float32)
    if reduce == "abs_sum":
        return jnp.sum(jnp.abs(a), axis=-1)
    if reduce == "abs_max":
        return jnp.max(jnp.abs(a), axis=-1)
    if reduce == "sum":
        return jnp.sum(a, axis=-1)
    if reduce == "l2":
        return jnp.sqrt(jnp.sum(a * a, axis=-1))
    raise ValueError(f"pixel_saliency: reduce={reduce!r} is not one of abs_sum, abs_max, sum, l2.")


# --------------------------------------------------------------------------------------------
# Gaussian filtering
# --------------------------------------------------------------------------------------------


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


def gaussian_blur(images, sigma: float = 5.0, truncate: float = 4.0):
    """Gaussian blur of ``(B, H, W, C)`` images over the two spatial axes, on device.

    Separable, kernel radius ``int(truncate * sigma + 0.5)`` (41 taps per axis at the default
    ``sigma=5``), borders mirrored (SciPy's ``mode="reflect"``): equal to
    ``scipy.ndimage.gaussian_filter(image, sigma=(sigma, sigma, 0), mode="reflect",
    truncate=truncate)`` per image. ``sigma=0`` returns the images unchanged.
    """
    x = jnp.asarray(images)
    if x.ndim != 4:
        raise ValueError(f"gaussian_blur: images must be (B, H, W, C); got shape {x.shape}.")
    if sigma == 0:
        return x
    return _gaussian_blur_jit(x, float(sigma), float(truncate))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _gaussian_blur_jit(x, sigma: float, truncate: float):
    k = gaussian_kernel(sigma, truncate)
    y = x.astype(jnp.float32)
    y = filter_axis(y, k, 1, "reflect")
    y = filter_axis(y, k, 2, "reflect")
    return y.astype(x.dtype)
