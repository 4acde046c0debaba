"""Comparing maps: rank correlation, SSIM, and faithfulness to occlusion.

All functions compare two batches map by map and return one number per pair, ``(B,)``. The
correlations (:func:`spearman`, :func:`pearson`, :func:`faithfulness`) take maps of any spatial
rank — ``(B, T)`` signals, ``(B, H, W)`` images, ``(B, D, H, W)`` volumes — over all their
positions; :func:`ssim` is the 2-D image measure and takes ``(B, H, W)`` only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ._blur import filter_axis, gaussian_kernel
from ._common import check_map_batch, nan_examples

__all__ = ["rankdata", "spearman", "pearson", "ssim", "faithfulness"]


def _rank_1d(v):
    """Average ranks (1-based; ties share the mean of their positions) of a 1-D array."""
    n = v.shape[0]
    order = jnp.argsort(v, stable=True)
    sv = v[order]
    idx = jnp.arange(n, dtype=jnp.int32)
    differs = sv[1:] != sv[:-1]
    starts = jnp.concatenate([jnp.array([True]), differs])
    ends = jnp.concatenate([differs, jnp.array([True])])
    first = jax.lax.cummax(jnp.where(starts, idx, 0))
    last = jax.lax.cummin(jnp.where(ends, idx, n - 1), reverse=True)
    r_sorted = (first + last).astype(jnp.float32) * 0.5 + 1.0
    return jnp.zeros((n,), jnp.float32).at[order].set(r_sorted)


@jax.jit
def rankdata(x):
    """Ranks of each row of ``x (B, ...)`` over its trailing axes, ties averaged.

    Equals ``scipy.stats.rankdata(row, method="average")`` for each flattened row (ranks from
    1). ``-0.0`` and ``0.0`` tie. Values must not be NaN.
    """
    x = check_map_batch(jnp.asarray(x, jnp.float32), "rankdata", "x")
    flat = x.reshape(x.shape[0], -1) + 0.0
    return jax.vmap(_rank_1d)(flat).reshape(x.shape)


def _pearson_rows(a, b):
    bad = nan_examples(a) | nan_examples(b)  # a NaN map: NaN, not "no agreement"
    a = a - jnp.mean(a, axis=-1, keepdims=True)
    b = b - jnp.mean(b, axis=-1, keepdims=True)
    saa = jnp.sum(a * a, axis=-1)
    sbb = jnp.sum(b * b, axis=-1)
    sab = jnp.sum(a * b, axis=-1)
    den = jnp.sqrt(saa * sbb)
    r = jnp.where(den > 0, jnp.clip(sab / jnp.where(den > 0, den, 1.0), -1.0, 1.0), 0.0)
    return jnp.where(bad, jnp.nan, r)


@jax.jit
def pearson(a, b):
    """Pearson correlation of each pair of maps ``(B, ...)`` over their trailing axes ``(B,)``.

    Maps of any spatial rank (``(B, T)``, ``(B, H, W)``, ``(B, D, H, W)``). 0 (not NaN) when
    either map is constant; NaN when either holds a NaN.
    """
    a = check_map_batch(jnp.asarray(a, jnp.float32), "pearson", "a")
    b = jnp.asarray(b, jnp.float32)
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(
            f"pearson: maps must be two batches (B, ...) of the same shape; got {a.shape} and {b.shape}."
        )
    return _pearson_rows(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1))


@functools.partial(jax.jit, static_argnames=("absolute",))
def _spearman_jit(a, b, absolute):
    a = a.reshape(a.shape[0], -1)
    b = b.reshape(b.shape[0], -1)
    bad = nan_examples(a) | nan_examples(b)  # a NaN map: NaN, not "no agreement"
    if absolute:
        a, b = jnp.abs(a), jnp.abs(b)
    n = a.shape[1]
    # Average ranks always have mean (n + 1) / 2 exactly: centre with it (a constant map
    # becomes exactly 0), and scale by 1/n to keep the float32 sums small and accurate.
    ra = (jax.vmap(_rank_1d)(a + 0.0) - 0.5 * (n + 1)) / n
    rb = (jax.vmap(_rank_1d)(b + 0.0) - 0.5 * (n + 1)) / n
    saa = jnp.sum(ra * ra, axis=-1)
    sbb = jnp.sum(rb * rb, axis=-1)
    sab = jnp.sum(ra * rb, axis=-1)
    den = jnp.sqrt(saa * sbb)
    r = jnp.where(den > 0, jnp.clip(sab / jnp.where(den > 0, den, 1.0), -1.0, 1.0), 0.0)
    return jnp.where(bad, jnp.nan, r)


def spearman(a, b, *, absolute: bool = False):
    """Spearman rank correlation of each pair of maps ``(B, ...)``, over all their positions: ``(B,)``.

    The Pearson correlation of the average ranks (ties share their mean rank), as
    ``scipy.stats.spearmanr(a_i.ravel(), b_i.ravel())``. ``absolute=True`` ranks ``|a|`` and
    ``|b|`` (Adebayo et al. report both). When a map is constant the correlation is undefined
    (SciPy returns NaN); here it is 0, so an empty map counts as "no agreement". A map holding
    a NaN gives NaN (as in SciPy): it is no evidence of agreement or of its absence.
    """
    a = check_map_batch(jnp.asarray(a, jnp.float32), "spearman", "a")
    b = jnp.asarray(b, jnp.float32)
    if a.shape != b.shape:
        raise ValueError(f"spearman: the two batches of maps differ in shape: {a.shape} vs {b.shape}.")
    if a.ndim < 2:
        raise ValueError(
            f"spearman: maps must be (B, ...) with at least one axis after the batch; got {a.shape}."
        )
    return _spearman_jit(a, b, bool(absolute))


@functools.partial(jax.jit, static_argnames=("sigma", "truncate", "k1", "k2"))
def _ssim_jit(a, b, data_range, sigma, truncate, k1, k2):
    k = gaussian_kernel(sigma, truncate)

    def filt(x):  # valid-mode Gaussian filter over (H, W) of (B, H, W)
        return filter_axis(filter_axis(x, k, 1, "valid"), k, 2, "valid")

    mu_a, mu_b = filt(a), filt(b)
    s_aa = filt(a * a) - mu_a * mu_a
    s_bb = filt(b * b) - mu_b * mu_b
    s_ab = filt(a * b) - mu_a * mu_b
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * s_ab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (s_aa + s_bb + c2))
    return jnp.mean(s, axis=(1, 2))


def ssim(
    a,
    b,
    *,
    data_range: float = 1.0,
    sigma: float = 1.5,
    truncate: float = 3.5,
    k1: float = 0.01,
    k2: float = 0.03,
):
    """Structural similarity (Wang et al. 2004) of each pair of maps ``(B, H, W)``: ``(B,)``.

    Local statistics under a Gaussian window (``sigma = 1.5``, radius
    ``int(truncate * sigma + 0.5) = 5``: 11 x 11), population (co)variances, constants
    ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2`` with ``L = data_range``::

        SSIM = (2 mu_a mu_b + C1)(2 s_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(s_a^2 + s_b^2 + C2))

    averaged over the positions where the window fits inside the map (no padding). This is
    ``skimage.metrics.structural_similarity(a, b, data_range=L, gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False)``, which also averages over the same interior.
    For maps normalised to [0, 1] keep ``data_range=1``. A NaN in a map gives NaN.
    """
    a = check_map_batch(jnp.asarray(a, jnp.float32), "ssim", "a")
    b = jnp.asarray(b, jnp.float32)
    if a.shape != b.shape:
        raise ValueError(
            f"ssim: both inputs must be (B, H, W) of the same shape; got {a.shape} and {b.shape}."
        )
    if a.ndim != 3:
        kind = {2: "(B, T) signal maps", 4: "(B, D, H, W) volume maps"}.get(a.ndim, f"{a.ndim}-D arrays")
        raise ValueError(
            f"ssim: SSIM is a 2-D image measure and takes (B, H, W) maps; got {kind} of shape {a.shape}. "
            f"Compare maps of other ranks with metrics.spearman or metrics.pearson."
        )
    width = 2 * int(truncate * sigma + 0.5) + 1
    if min(a.shape[1:]) < width:
        raise ValueError(
            f"ssim: maps of {a.shape[1]}x{a.shape[2]} are smaller than the {width}x{width} window."
        )
    return _ssim_jit(
        a, b, jnp.asarray(data_range, jnp.float32), float(sigma), float(truncate), float(k1), float(k2)
    )


def faithfulness(maps, occlusion_maps):
    """Faithfulness: rank correlation between each map and the occlusion map of the same image.

    Selvaraju et al. measure how faithful an explanation is to the model by the Spearman rank
    correlation between it and the *occlusion map* of the same image and class (the drop of
    the class score when a patch around each pixel is masked), pixel by pixel. Higher is
    better. Maps of signals ``(B, T)`` and volumes ``(B, D, H, W)`` are compared position by
    position the same way (occlusion windows of that rank). Compute the occlusion maps with
    :func:`gradcam_jax.perturbation.occlusion` (same targets, same resolution as the maps)::

        occ = gradcam_jax.perturbation.occlusion(fn, x, target, window=32, stride=16)
        rho = metrics.faithfulness(maps, occ)

    Args:
      maps: ``(B, *spatial)``: ``(B, H, W)``, ``(B, T)``, ``(B, D, H, W)``.
      occlusion_maps: the same shape.

    Returns:
      ``(B,)`` Spearman correlations in [-1, 1] (0 when a map is constant).

    References:
      Selvaraju et al., "Grad-CAM", ICCV 2017, §5.3 (PASCAL VOC 2007 val: Grad-CAM 0.254,
      Guided Grad-CAM 0.261, Guided Backprop 0.168), https://arxiv.org/abs/1610.02391.
    """
    maps = check_map_batch(jnp.asarray(maps, jnp.float32), "faithfulness")
    occlusion_maps = jnp.asarray(occlusion_maps, jnp.float32)
    if maps.shape != occlusion_maps.shape:
        raise ValueError(
            f"faithfulness: maps {maps.shape} and occlusion maps {occlusion_maps.shape} differ in shape; "
            f"compute the occlusion at the maps' resolution."
        )
    return spearman(maps, occlusion_maps)
