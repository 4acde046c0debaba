"""SS-CAM and IS-CAM: Score-CAM with the channel scores averaged over noisy or scaled masks.

Both run Score-CAM's masked forwards (:func:`gradcam_jax.perturbation.score_cam`) ``n`` times
per channel, chunked the same way (about ``chunk_size`` masked images per step, whatever the
number of channels and samples), and average the scores before the softmax over channels.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from ._maps import MapOptions
from ._perturbation_common import perturbation_options, prepare_perturbation, run_perturbation
from ._targets import Target
from .perturbation import SCORE_CAM, score_cam_kernel

__all__ = ["ss_cam", "is_cam"]


@dataclasses.dataclass(frozen=True)
class Noisy:
    """SS-CAM's masks: ``M_k + noise_std * N(0, 1)``, the noise drawn per masked forward from
    ``jax.random.fold_in(key, item)`` (``item = channel * n + sample``), shape ``(B, H, W)``."""

    n: int
    noise_std: float
    who = "ss_cam"

    def mask(self, mask, sample, item, key):
        del sample
        return mask + self.noise_std * jax.random.normal(
            jax.random.fold_in(key, item), mask.shape, mask.dtype
        )


@dataclasses.dataclass(frozen=True)
class Integrated:
    """IS-CAM's masks: ``c_i M_k`` with ``c_i = sum_{j=1}^{i+1} j / n`` for sample ``i = 0 .. n-1``
    (torchcam's ``ISCAM``: the coefficients accumulate, up to ``(n + 1) / 2``)."""

    n: int
    who = "is_cam"

    def mask(self, mask, sample, item, key):
        del item, key
        s = sample.astype(mask.dtype) + 1.0
        return mask * (s * (s + 1.0) / (2.0 * self.n))


def _positive_int(value, name: str, who: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{who}: {name} must be a positive int; got {value!r}.")
    return value


def _run(tap, x, target, maps: MapOptions, variant, key, chunk_size, loop, compute_dtype, aug, eigen, top_n):
    who = variant.who
    tap, batch, spec = prepare_perturbation(tap, x, target, who, maps, images=True, aug=aug)
    if top_n is not None:
        top_n = _positive_int(top_n, "top_n", who)
    options = perturbation_options(maps, chunk_size, batch, compute_dtype, top_n, aug, eigen, variant)
    return run_perturbation(score_cam_kernel, SCORE_CAM, (tap, x, spec, key), options, loop, who)


def ss_cam(
    tap,
    x,
    target: Target = None,
    *,
    key=None,
    n_noise: int = 35,
    noise_std: float = 2.0,
    chunk_size: int = 64,
    chunk_loop: str = "auto",
    top_n: int | None = None,
    compute_dtype=None,
    upsample: bool = True,
    normalize: bool = True,
    relu: bool = True,
    interpolation: str = "bilinear",
    drop_tokens: int = 0,
    grid: tuple[int, ...] | None = None,
    layout: str | None = None,
    input: Any = None,
    aug_smooth: bool = False,
    eigen_smooth: bool = False,
) -> jax.Array:
    """SS-CAM: Score-CAM whose channel scores are averaged over noisy masks.

    With ``M_k`` Score-CAM's mask of channel ``k`` (``A^k`` upsampled and min-max normalised)::

        alpha_k = softmax_k( (1/N) sum_i y^c(x ⊙ (M_k + delta_i)) )    delta_i ~ N(0, sigma^2)
        L = ReLU( sum_k alpha_k A^k )

    (the baseline score of the paper's formula is the same for every ``k`` and cancels in the
    softmax). Noise of standard deviation ``noise_std`` is added to the mask at the image's
    resolution, as torchcam's ``SSCAM`` does (its defaults: 35 samples, sigma 2). Cost:
    ``n_noise`` times Score-CAM's, in chunks of about ``chunk_size`` masked images.

    Args:
      tap, x, target: as in :func:`gradcam_jax.score_cam`.
      key: a ``jax.random`` key for the noise (required).
      n_noise: noisy masks per channel.
      noise_std: the noise's standard deviation (masks are in [0, 1]).
      chunk_size, chunk_loop, top_n, compute_dtype: as in :func:`gradcam_jax.score_cam` (``top_n``: only each
        example's ``top_n`` channels of largest spatial spread are masked).
      upsample, normalize, relu, interpolation, drop_tokens, grid, layout, input, aug_smooth,
        eigen_smooth: as in :func:`gradcam_jax.cam`.

    Returns:
      ``float32`` maps ``(B, H, W)``, or ``(B, K, H, W)`` for K targets per example.

    Examples:
      >>> import jax, jax.numpy as jnp, gradcam_jax as gcj
      >>> w = jax.random.normal(jax.random.key(0), (3, 5))
      >>> tap = gcj.split_tap(lambda x: jax.nn.relu(x[:, ::2, ::2]), lambda a: a.mean(axis=(1, 2)) @ w)
      >>> from gradcam_jax.score_variants import ss_cam
      >>> ss_cam(tap, jnp.ones((2, 8, 8, 3)), key=jax.random.key(1), n_noise=2).shape
      (2, 8, 8)

    References:
      Wang et al., "SS-CAM: Smoothed Score-CAM for Sharper Visual Feature Localization", 2020,
      https://arxiv.org/abs/2006.14255.
    """
    if key is None:
        raise ValueError("ss_cam needs key=jax.random.key(seed) for the noise added to the masks.")
    n = _positive_int(n_noise, "n_noise", "ss_cam")
    maps = MapOptions(upsample, normalize, relu, interpolation, False, drop_tokens, grid, layout, input)
    variant = Noisy(n, float(noise_std))
    return _run(
        tap,
        x,
        target,
        maps,
        variant,
        key,
        chunk_size,
        chunk_loop,
        compute_dtype,
        aug_smooth,
        eigen_smooth,
        top_n,
    )


def is_cam(
    tap,
    x,
    target: Target = None,
    *,
    steps: int = 10,
    chunk_size: int = 64,
    chunk_loop: str = "auto",
    top_n: int | None = None,
    compute_dtype=None,
    upsample: bool = True,
    normalize: bool = True,
    relu: bool = True,
    interpolation: str = "bilinear",
    drop_tokens: int = 0,
    grid: tuple[int, ...] | None = None,
    layout: str | None = None,
    input: Any = None,
    aug_smooth: bool = False,
    eigen_smooth: bool = False,
) -> jax.Array:
    """IS-CAM: Score-CAM whose channel scores are integrated over scaled masks.

    With ``M_k`` Score-CAM's mask of channel ``k`` and ``N = steps``::

        alpha_k = softmax_k( (1/N) sum_{i=1}^{N} y^c(x ⊙ c_i M_k) ),   c_i = sum_{j=1}^{i} j / N
        L = ReLU( sum_k alpha_k A^k )

    — the accumulated coefficients of torchcam's ``ISCAM`` (the paper's ``M_i``). Cost: ``steps``
    times Score-CAM's, in chunks of about ``chunk_size`` masked images.

    Args:
      tap, x, target: as in :func:`gradcam_jax.score_cam`.
      steps: integration steps per channel.
      chunk_size, chunk_loop, top_n, compute_dtype: as in :func:`gradcam_jax.score_cam` (``top_n``: only each
        example's ``top_n`` channels of largest spatial spread are masked).
      upsample, normalize, relu, interpolation, drop_tokens, grid, layout, input, aug_smooth,
        eigen_smooth: as in :func:`gradcam_jax.cam`.

    Returns:
      ``float32`` maps ``(B, H, W)``, or ``(B, K, H, W)`` for K targets per example.

    Examples:
      >>> import jax, jax.numpy as jnp, gradcam_jax as gcj
      >>> w = jax.random.normal(jax.random.key(0), (3, 5))
      >>> tap = gcj.split_tap(lambda x: jax.nn.relu(x[:, ::2, ::2]), lambda a: a.mean(axis=(1, 2)) @ w)
      >>> from gradcam_jax.score_variants import is_cam
      >>> is_cam(tap, jnp.ones((2, 8, 8, 3)), steps=2).shape
      (2, 8, 8)

    References:
      Naidu et al., "IS-CAM: Integrated Score-CAM for axiomatic-based explanations", 2020,
      https://arxiv.org/abs/2010.03023.
    """
    n = _positive_int(steps, "steps", "is_cam")
    maps = MapOptions(upsample, normalize, relu, interpolation, False, drop_tokens, grid, layout, input)
    return _run(
        tap,
        x,
        target,
        maps,
        Integrated(n),
        None,
        chunk_size,
        chunk_loop,
        compute_dtype,
        aug_smooth,
        eigen_smooth,
        top_n,
    )
