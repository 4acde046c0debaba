"""ROAD (RemOve And Debias): removal curves with noisy linear imputation (Rong et al. 2022).

Arguments shared with the other removal metrics (``fn``, ``images``, ``maps``, ``target``,
``softmax``, ``layout``, ``input``) are described in :mod:`gradcam_jax.metrics.removal`. ROAD
stays 2-D: its imputation is a system over a pixel's 8 neighbours in the image plane.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .._callables import PytreeCallable, as_pytree
from .._chunking import map_in_chunks
from .._inputs import image_of, with_image
from .._layout import Layout
from .._maps import kernel
from .._tap import scores_fn
from ._common import (
    RemovalOptions,
    check_fn,
    check_inputs,
    check_maps,
    check_positive_int,
    class_scores,
    examples,
    map_shape,
    nan_examples,
    prepare_target,
    resolve_target,
)
from ._saliency import saliency_ranks

__all__ = ["ROAD", "road", "noisy_linear_imputation"]


# --------------------------------------------------------------------------------------------
# ROAD: noisy linear imputation
# --------------------------------------------------------------------------------------------


_TWO_D = (
    "ROAD's imputation (each removed pixel the weighted mean of its 8 neighbours) is defined on 2-D "
    "images (B, H, W, C) (channels-first with layout='NCHW'); signals and volumes are not supported"
)


def _positive(v) -> bool:
    """``v > 0`` for a concrete number; a traced value counts as positive (a key is needed)."""
    return isinstance(v, jax.core.Tracer) or float(v) > 0


# (dy, dx, weight): edge neighbours 1/6, diagonal neighbours 1/12 (they sum to 1).
_NEIGHBOURS = tuple(
    (dy, dx, 1.0 / 6.0 if dy == 0 or dx == 0 else 1.0 / 12.0)
    for dy in (-1, 0, 1)
    for dx in (-1, 0, 1)
    if (dy, dx) != (0, 0)
)


def _neighbour_sum(v):
    """``sum_q w_q v(p + q)`` over the 8 neighbours, zero outside the image. ``v (..., H, W, C)``."""
    h, w = v.shape[-3], v.shape[-2]
    pad = [(0, 0)] * (v.ndim - 3) + [(1, 1), (1, 1), (0, 0)]
    p = jnp.pad(v, pad)
    out = jnp.zeros_like(v)
    for dy, dx, wt in _NEIGHBOURS:
        out = out + wt * p[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w, :]
    return out


def noisy_linear_imputation(
    images, removed, key=None, *, noise: float = 0.01, tol: float = 1e-4, max_iter: int = 1000
):
    """Fill removed pixels with the weighted mean of their neighbours, plus noise (ROAD).

    For the removed pixels ``R`` the values ``v`` solve the linear system, one per image and
    channel::

        s_p v_p - sum_{q in N(p) ∩ R} w_pq v_q = sum_{q in N(p) \\ R} w_pq x_q      (p in R)

    with ``N(p)`` the 8 neighbours inside the image, ``w = 1/6`` for edge and ``1/12`` for
    diagonal neighbours and ``s_p = sum_{q in N(p)} w_pq`` (1 inside the image, less on its
    border): each removed pixel is the weighted mean of its neighbours, known or imputed. The
    matrix is symmetric positive definite whenever every connected region of removed pixels
    touches a kept pixel, and is solved by conjugate gradients under ``jit`` — all systems of
    the batch at once, until every relative residual ``|r| / |b|`` is below ``tol`` or after
    ``max_iter`` iterations — started from the solution of the same problem at half
    resolution (upsampled bilinearly; at the coarse level, from the mean of the kept pixels).
    Then
    ``noise * N(0, 1)`` is added to the imputed pixels (not to the kept ones), from ``key``.
    A channel with no kept pixel stays at 0 plus noise.

    Args:
      images: ``(B, H, W, C)``.
      removed: ``(B, H, W)`` bool, the pixels to impute (all channels).
      key: a ``jax.random`` key for the noise; required when ``noise > 0``.
      noise: the noise's standard deviation, in the images' units (ROAD's default 0.01 for
        images normalised to unit scale).
      tol, max_iter: the conjugate-gradient stopping rule.

    Returns:
      the imputed images, ``(B, H, W, C)``.

    References:
      Rong, Leemann, Borisov, Kasneci & Kasneci, "A Consistent and Efficient Evaluation
      Strategy for Attribution Methods", ICML 2022, §4, https://arxiv.org/abs/2202.00449.
    """
    images = jnp.asarray(images)
    if images.ndim != 4:
        raise ValueError(
            f"noisy_linear_imputation: images must be a channels-last 2-D batch (B, H, W, C) (the "
            f"imputation uses a pixel's 8 neighbours; signals and volumes are not supported); got "
            f"{images.shape}."
        )
    removed = jnp.asarray(removed, bool)
    if removed.shape != images.shape[:3]:
        raise ValueError(
            f"noisy_linear_imputation: removed must be (B, H, W) = {images.shape[:3]}; got {removed.shape}."
        )
    if key is None and _positive(noise):
        raise ValueError("noisy_linear_imputation: pass key= (a jax.random key) for the noise, or noise=0.")
    if key is None:
        key = jax.random.key(0)  # multiplied by noise = 0
    return _impute_jit(images, removed, key, jnp.float32(noise), jnp.float32(tol), jnp.int32(max_iter))


@jax.jit
def _impute_jit(images, removed, key, noise, tol, max_iter):
    out = _impute(images, removed, tol, max_iter)
    out = out + jnp.where(removed[..., None], noise * jax.random.normal(key, images.shape, jnp.float32), 0.0)
    return out.astype(images.dtype)


def _cg(x, r_mask, v0, tol, max_iter):
    """Conjugate gradients for the imputation system of every (image, channel) at once."""
    keep = 1.0 - r_mask
    s = _neighbour_sum(jnp.ones(x.shape[1:3] + (1,), jnp.float32))  # in-image weight sum (H, W, 1)

    def matvec(v):
        return r_mask * (s * v - _neighbour_sum(r_mask * v))

    def dot(a, c):  # one dot product per (image, channel) system
        return jnp.sum(a * c, axis=(1, 2), keepdims=True)

    def safe_div(a, c):
        return jnp.where(c > 0, a / jnp.where(c > 0, c, 1.0), 0.0)

    b = r_mask * _neighbour_sum(keep * x)
    bnorm2 = dot(b, b)
    limit = (tol * tol) * bnorm2

    def cond(state):
        _, _, _, rr, it = state
        return (it < max_iter) & jnp.any(rr > limit)

    def body(state):
        v, r, p, rr, it = state
        ap = matvec(p)
        alpha = safe_div(rr, dot(p, ap))
        v = v + alpha * p
        r = r - alpha * ap
        rr_new = dot(r, r)
        p = r + safe_div(rr_new, rr) * p
        return v, r, p, rr_new, it + 1

    r0 = r_mask * (b - matvec(v0))
    v, *_ = jax.lax.while_loop(cond, body, (r_mask * v0, r0, r0, dot(r0, r0), jnp.array(0)))
    return v


def _impute(images, removed, tol, max_iter, levels: int = 1):
    """Noise-free imputation, float32: conjugate gradients started from a coarse solution.

    The starting point is the same problem solved at half resolution (2 x 2 blocks: a block is
    known when any of its pixels is, with their mean value), upsampled bilinearly — ``levels``
    times recursively — and, at the coarsest level, the mean of the kept pixels. This only
    changes where the iterations start (about a third fewer fine-level iterations); the answer
    is the fine system's solution to the same tolerance.
    """
    x = images.astype(jnp.float32)
    r_mask = removed[..., None].astype(jnp.float32)  # (B, H, W, 1)
    keep = 1.0 - r_mask
    b_, h, w, c = x.shape
    if levels > 0 and h % 2 == 0 and w % 2 == 0 and min(h, w) >= 16:
        kc = keep.reshape(b_, h // 2, 2, w // 2, 2, 1).sum(axis=(2, 4))
        xc = (keep * x).reshape(b_, h // 2, 2, w // 2, 2, c).sum(axis=(2, 4)) / jnp.maximum(kc, 1.0)
        coarse = _impute(xc, kc[..., 0] == 0, tol, max_iter, levels - 1)
        v0 = jax.image.resize(coarse, x.shape, "linear")
    else:
        n_keep = jnp.sum(keep, axis=(1, 2), keepdims=True)
        v0 = jnp.broadcast_to(
            jnp.sum(keep * x, axis=(1, 2), keepdims=True) / jnp.maximum(n_keep, 1.0), x.shape
        )
    v = _cg(x, r_mask, v0, tol, max_iter)
    return keep * x + r_mask * v


class ROAD(NamedTuple):
    """Per-image ROAD curves.

    ``morf (B, P)``: the class probability after removing (and imputing) the ``fractions[j]``
    most relevant pixels; lower is better. ``lerf (B, P)``: after removing the least relevant
    ones; higher is better. ``morf_correct``/``lerf_correct`` (``(B, P)`` bool): whether the
    prediction is still the explained class (ROAD's accuracy curves are their means).
    ``fractions (P,)``. An example whose map or score is NaN gets NaN curves and false
    ``*_correct``.

    ``gap`` (B,): ``mean_j (lerf - morf)``, the per-image area between the curves (higher is
    better: removing the relevant pixels should hurt more than removing the irrelevant ones).
    """

    morf: jax.Array
    lerf: jax.Array
    morf_correct: jax.Array
    lerf_correct: jax.Array
    fractions: jax.Array

    @property
    def gap(self):
        return jnp.mean(self.lerf - self.morf, axis=-1)


def _fractions(fractions, who: str) -> np.ndarray:
    fr = np.asarray(fractions, np.float64).reshape(-1)
    if fr.size == 0 or np.any(fr < 0) or np.any(fr > 1):
        raise ValueError(
            f"{who}: fractions must be a non-empty list of numbers in [0, 1]; got {fractions!r}."
        )
    return fr


@kernel
def road_kernel(
    model: PytreeCallable, x, maps, target, key, noise, tol, max_iter, *, options: RemovalOptions
):
    chunk, softmax, counts, view = options.chunk, options.softmax, options.counts, options.view
    fn = scores_fn(model.fn)
    images = image_of(x, view)  # (B, H, W, C)
    b, h, w, _ = images.shape
    n_pix = h * w
    target = resolve_target(fn, x, target, chunk, b)
    ranks = saliency_ranks(maps)
    counts_arr = jnp.asarray(counts, jnp.int32)
    p = len(counts)

    def batch(idx):  # idx = (order * P + j) * B + image; order 0 = MoRF, 1 = LeRF
        img = idx % b
        j = (idx // b) % p
        lerf = idx // (b * p)
        r = ranks[img]
        cnt = counts_arr[j][:, None, None]
        removed = jnp.where((lerf == 1)[:, None, None], r >= n_pix - cnt, r < cnt)
        xi = _impute(images[img], removed, tol, max_iter)
        eps = jax.vmap(
            lambda i: jax.random.normal(jax.random.fold_in(key, i), images.shape[1:], jnp.float32)
        )(idx)
        xi = xi + jnp.where(removed[..., None], noise * eps, 0.0)
        scores = fn(with_image(examples(x, img), view, xi.astype(images.dtype)))
        prob = class_scores(scores, target[img], softmax)
        return prob, jnp.argmax(scores, axis=-1) == target[img]

    prob, ok = map_in_chunks(batch, 2 * p * b, chunk)
    prob = prob.reshape(2, p, b).transpose(0, 2, 1)
    # A NaN map (or score) is no evidence: NaN curves, and never "still correct".
    prob = jnp.where(nan_examples(maps)[None, :, None], jnp.nan, prob)
    ok = ok.reshape(2, p, b).transpose(0, 2, 1) & ~jnp.isnan(prob)
    return prob, ok


def road(
    fn,
    images,
    maps,
    target=None,
    *,
    key=None,
    fractions: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    noise: float = 0.01,
    chunk_size: int = 32,
    softmax: bool = True,
    tol: float = 1e-4,
    max_iter: int = 1000,
    layout: str | Layout | None = None,
    input: Any = None,
) -> ROAD:
    """ROAD: RemOve And Debias (Rong et al. 2022), both orders, with noisy linear imputation.

    For each fraction ``f`` the ``round(f * H * W)`` most relevant pixels (MoRF) — or the least
    relevant ones (LeRF) — are removed and filled by :func:`noisy_linear_imputation` (each is
    the weighted mean of its 8 neighbours, 1/6 edge and 1/12 diagonal, plus Gaussian noise of
    standard deviation ``noise``), and the model's probability of the explained class is read.
    Imputing from the neighbourhood, rather than painting a constant, keeps the shape of the
    removed region from leaking the class (the bias ROAD removes) without retraining.

    MoRF: lower is better; LeRF: higher is better; :attr:`ROAD.gap` (LeRF - MoRF, averaged over
    fractions) summarises both. The ``2 * len(fractions) * B`` imputations and forwards run in
    chunks of ``chunk_size`` images.

    Args:
      fn, images, maps, target, softmax: see the module docstring. ROAD is 2-D: ``images``
        are ``(B, H, W, C)`` (``"NCHW"`` with ``layout=``, or the image of a pytree picked by
        ``input=``); its imputation system is built on a pixel's 8 neighbours, and signals or
        volumes are refused.
      key: a ``jax.random`` key for the imputation noise (required when ``noise > 0``); image
        ``b`` at fraction ``j`` in order ``o`` uses ``fold_in(key, (o * P + j) * B + b)``, so
        the result does not depend on ``chunk_size``.
      fractions: the removal fractions (ROAD's 10% ... 90%).
      noise: the imputation noise's standard deviation in input units.
      chunk_size: images per forward pass (each with its own conjugate-gradient solve).
      tol, max_iter: see :func:`noisy_linear_imputation`.

    Returns:
      a :class:`ROAD` of ``(B, P)`` curves.

    References:
      Rong, Leemann, Borisov, Kasneci & Kasneci, "A Consistent and Efficient Evaluation
      Strategy for Attribution Methods", ICML 2022, https://arxiv.org/abs/2202.00449.
    """
    who = "road"
    check_fn(fn, who)
    view = check_inputs(images, layout, input, who, ranks=(2,), why=_TWO_D)
    check_maps(maps, images, view, who)
    chunk = check_positive_int(chunk_size, "chunk_size", who)
    fr = _fractions(fractions, who)
    if key is None and _positive(noise):
        raise ValueError(f"{who}: pass key= (a jax.random key) for the imputation noise, or noise=0.")
    if key is None:
        key = jax.random.key(0)  # multiplied by noise = 0
    b, h, w = map_shape(images, view)
    counts = tuple(int(c) for c in np.round(fr * h * w).astype(np.int64))
    target = prepare_target(fn, images, b, target, who)
    options = RemovalOptions(chunk, bool(softmax), counts=counts, view=view)
    prob, ok = road_kernel(
        as_pytree(fn),
        images,
        maps,
        target,
        key,
        jnp.float32(noise),
        jnp.float32(tol),
        jnp.int32(max_iter),
        options=options,
    )
    return ROAD(prob[0], prob[1], ok[0], ok[1], jnp.asarray(fr, jnp.float32))
