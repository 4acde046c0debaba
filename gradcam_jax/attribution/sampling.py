"""Sampling attributions: RISE (random masks) and KernelSHAP (coalitions of superpixels).

Both run many perturbed forward passes; as for Score-CAM they run ``chunk_size`` perturbed
images at a time (:func:`gradcam_jax._chunking.run_chunked`: a device loop, or with
``chunk_loop="host"`` one jitted chunk kernel called from Python), so memory is set by the
chunk and the model is compiled once. The masks and coalitions are drawn on the
device from an explicit key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._callables import PytreeCallable, as_pytree
from .._chunking import Stages, perturbations_per_step, run_chunked, run_on_device
from .._grads import check_fn_target
from .._inputs import image_leaf, image_of, input_gate, spatial_size, with_image
from .._layout import to_channels_last
from .._maps import MapOptions, check_images, kernel
from .._tap import scores_fn
from .._targets import Target, TargetSpec, batch_size, nan_where, select_scores, target_spec
from ._common import check_baseline_shape, check_key, check_positive_int, clean_start, nan_finish

__all__ = [
    "RiseOptions",
    "RISE",
    "rise_kernel",
    "rise",
    "rise_mask",
    "shap_coalitions",
    "ShapOptions",
    "SHAP",
    "kernel_shap_kernel",
    "kernel_shap",
]


@dataclasses.dataclass(frozen=True)
class RiseOptions:
    """The static options of :func:`rise_kernel`."""

    n_masks: int
    cell: int
    p: float
    per_step: int
    maps: MapOptions = MapOptions()


def rise_mask(key, size: tuple[int, ...], cell: int, p: float):
    """One RISE mask: a ``cell x cell`` Bernoulli(p) grid, bilinearly upsampled to ``(cell + 1)``
    cells of ``ceil(H / cell)`` pixels and cropped at a random shift within one cell."""
    h, w = size
    ch, cw = -(-h // cell), -(-w // cell)
    k_grid, k_dy, k_dx = jax.random.split(key, 3)
    grid = jax.random.bernoulli(k_grid, p, (cell, cell)).astype(jnp.float32)
    up = jax.image.resize(grid, ((cell + 1) * ch, (cell + 1) * cw), "linear")
    dy = jax.random.randint(k_dy, (), 0, ch)
    dx = jax.random.randint(k_dx, (), 0, cw)
    return jax.lax.dynamic_slice(up, (dy, dx), (h, w))


def rise_item(args, carry, i, options: RiseOptions):
    """Mask ``i``, weighted by the score of the image it masks: ``y^c(x * M_i) M_i``."""
    fn, x, _, key = args
    view = check_images(x, options.maps, "rise")
    image = image_of(x, view)  # (B, H, W, C)
    mask = rise_mask(jax.random.fold_in(key, i), image.shape[1:3], options.cell, options.p)
    score = select_scores(carry[0], scores_fn(fn.fn)(with_image(x, view, image * mask[None, :, :, None])))
    return score.astype(jnp.float32)[..., None, None] * mask


RISE = Stages(
    clean_start,
    lambda args, carry, o: o.n_masks,
    rise_item,
    nan_finish,
    lambda o: np.full(o.n_masks, 1.0 / (o.n_masks * o.p)),
    auto_host=False,  # forward-only chunks: "auto" keeps the device loop (see _chunking.Stages)
)


@kernel
def rise_kernel(fn: PytreeCallable, x, target: TargetSpec, key, *, options: RiseOptions):
    """``sum_i y^c(x * M_i) M_i / (N p)`` under ``jit``, ``per_step`` masks at a time."""
    return run_on_device(RISE, (fn, x, target, key), options, options.per_step)


def rise(
    fn: Callable,
    x,
    target: Target = None,
    *,
    key,
    n_masks: int = 4000,
    cell: int = 7,
    p: float = 0.5,
    chunk_size: int = 64,
    chunk_loop: str = "auto",
    layout: str | None = None,
    input: Any = None,
) -> jax.Array:
    """RISE: the expected score under random masks, each pixel weighted by how much it was kept.

    ``N`` masks ``M_i`` — a ``cell x cell`` grid of Bernoulli(``p``) cells, bilinearly upsampled
    and randomly shifted (the paper's recipe) — give ``S = sum_i y^c(x * M_i) M_i / (N p)``.
    The same masks serve every example of the batch.

    Args:
      fn: any callable ``x -> scores``; a tap works too.
      x: images ``(B, H, W, C)`` (channels-first with ``layout=``, a pytree with ``input=``).
      target: as in :func:`gradcam_jax.grad_cam`; ``None`` is the top class of the clean input.
      key: a ``jax.random`` key (mask ``i`` is drawn from ``fold_in(key, i)``).
      n_masks, cell, p: the number of masks, the grid size, the probability a cell is kept.
      chunk_size: masked images per step (rounded down to whole batches, at least one mask).
      chunk_loop: as in :func:`gradcam_jax.score_cam`: ``"auto"`` (default) and ``"device"``
        loop over the chunks inside one jitted kernel (faster on XLA:CPU for forward-only
        chunks); ``"host"`` from Python over one jitted chunk kernel.

    Returns:
      ``float32`` maps ``(B, H, W)``, or ``(B, K, H, W)`` for K targets.

    References:
      Petsiuk, Das & Saenko, "RISE: Randomized Input Sampling for Explanation of Black-box
      Models", BMVC 2018, https://arxiv.org/abs/1806.07421.
    """
    who = "rise"
    maps = MapOptions(layout=layout, input=input)
    view = input_gate(x, layout, input, who, ranks=(2,), why="RISE masks images (B, H, W, C)")
    check_key(key, who)
    n_masks = check_positive_int(n_masks, "n_masks", who)
    cell = check_positive_int(cell, "cell", who)
    if not 0.0 < p <= 1.0:
        raise ValueError(f"{who}: p (the probability a cell is kept) must be in (0, 1]; got {p}.")
    spec = target_spec(target, batch_size(x))
    check_fn_target(fn, x, spec, who)
    del view
    options = RiseOptions(n_masks, cell, float(p), perturbations_per_step(chunk_size, batch_size(x)), maps)
    return run_chunked(
        rise_kernel, RISE, (as_pytree(fn), x, spec, key), options, n_items=n_masks,
        per_step=options.per_step, chunk_loop=chunk_loop, who=who,
    )  # fmt: skip


INF_WEIGHT = 1e6  # Captum's weight of the empty and the full coalition


def shap_coalitions(key, n_samples: int, n_features: int):
    """KernelSHAP's coalitions ``(S, M)`` in {0, 1} and their weights ``(S,)`` (Captum's sampler).

    Row 0 keeps every feature, row 1 none (both weighted ``1e6``); every other row keeps ``k``
    features, ``k`` drawn with ``p(k) ~ (M - 1) / (k (M - k))``, the ``k`` chosen uniformly (the
    top ``k`` of a normal vector), weighted 1 — the Shapley kernel as a sampling distribution.
    """
    m = n_features
    k_num, k_pick = jax.random.split(key)
    ks = jnp.arange(1, m)
    logits = jnp.log((m - 1) / (ks * (m - ks)))
    n_rand = max(n_samples - 2, 0)
    num = ks[jax.random.categorical(k_num, logits, shape=(n_rand,))] if m > 1 else jnp.zeros(n_rand, int)
    vals = jax.random.normal(k_pick, (n_rand, m))
    order = jnp.argsort(jnp.argsort(-vals, axis=1), axis=1)  # 0 for the largest
    picked = (order < num[:, None]).astype(jnp.float32)
    z = jnp.concatenate([jnp.ones((1, m)), jnp.zeros((1, m)), picked])[:n_samples]
    w = jnp.concatenate([jnp.full(2, INF_WEIGHT), jnp.ones(n_rand)])[:n_samples]
    return z, w


@dataclasses.dataclass(frozen=True)
class ShapOptions:
    """The static options of :func:`kernel_shap_kernel`."""

    n_features: int
    per_step: int
    maps: MapOptions = MapOptions()


def shap_item(args, carry, i, options: ShapOptions):
    """The scores with coalition ``i``: its segments kept, the others set to the baseline."""
    fn, x, _, segments, baseline, coalitions, _ = args
    view = check_images(x, options.maps, "kernel_shap")
    keep = coalitions[i][segments][..., None] > 0  # (B, H, W, 1)
    fill = to_channels_last(baseline, view.layout)
    image = jnp.where(keep, image_of(x, view), fill)
    return select_scores(carry[0], scores_fn(fn.fn)(with_image(x, view, image)))


def shap_finish(args, carry, scores, options: ShapOptions):
    """The weighted least-squares fit of the coalitions' scores ``(S, B[, K])``, painted."""
    _, _, _, segments, _, coalitions, weights = args
    scores = scores.astype(coalitions.dtype)
    design = jnp.concatenate([coalitions, jnp.ones((coalitions.shape[0], 1), coalitions.dtype)], axis=1)
    root = jnp.sqrt(weights)[:, None]
    flat = scores.reshape(scores.shape[0], -1)
    coef = jnp.linalg.lstsq(design * root, flat * root)[0][: options.n_features]  # (M, B*K)
    coef = coef.reshape((options.n_features,) + scores.shape[1:])  # (M, B[, K])
    picked = jnp.moveaxis(coef, 0, -1)  # (B[, K], M)
    maps = jax.vmap(lambda c, sg: c[..., sg])(picked, segments)  # (B[, K], H, W)
    return nan_where(jnp.isnan(carry[1]), maps)


SHAP = Stages(clean_start, lambda args, carry, o: args[5].shape[0], shap_item, shap_finish, auto_host=False)


@kernel
def kernel_shap_kernel(
    fn: PytreeCallable,
    x,
    target: TargetSpec,
    segments,
    baseline,
    coalitions,
    weights,
    *,
    options: ShapOptions,
):
    """KernelSHAP under ``jit``: the coalitions' scores, then a weighted least-squares fit."""
    args = (fn, x, target, segments, baseline, coalitions, weights)
    return run_on_device(SHAP, args, options, options.per_step)


def kernel_shap(
    fn: Callable,
    x,
    target: Target = None,
    *,
    segments,
    key,
    n_samples: int = 200,
    baseline: Any = 0.0,
    chunk_size: int = 64,
    chunk_loop: str = "auto",
    layout: str | None = None,
    input: Any = None,
) -> jax.Array:
    """KernelSHAP over superpixels: Shapley values of the segments by a weighted linear fit.

    Coalitions ``z`` of the ``M`` segments (:func:`shap_coalitions`) keep the pixels of the
    segments in ``z`` and set the others to ``baseline``; a linear model ``g(z) = phi_0 +
    sum_j phi_j z_j`` fitted to the scores with the Shapley kernel's weights gives each
    segment's value ``phi_j``, painted over its pixels — Captum's ``KernelShap`` with a feature
    mask. The same coalitions serve every example of the batch.

    Args:
      fn, x, target, layout, input: as in :func:`rise`.
      segments: ``(B, H, W)`` integer segment ids in ``[0, M)`` (e.g. from
        ``skimage.segmentation.slic``); concrete (they fix ``M``).
      key: a ``jax.random`` key for the coalitions.
      n_samples: coalitions, including the full and the empty one.
      baseline: the value of removed pixels: a number, or an array broadcastable to the image.
      chunk_size: perturbed images per step.
      chunk_loop: as in :func:`rise`.

    Returns:
      ``float32`` maps ``(B, H, W)`` (``(B, K, H, W)`` for K targets).

    References:
      Lundberg & Lee, "A Unified Approach to Interpreting Model Predictions", NeurIPS 2017,
      https://arxiv.org/abs/1705.07874.
    """
    who = "kernel_shap"
    maps = MapOptions(layout=layout, input=input)
    view = input_gate(x, layout, input, who, ranks=(2,), why="KernelSHAP segments images (B, H, W, C)")
    check_key(key, who)
    n_samples = check_positive_int(n_samples, "n_samples", who, 3)
    seg = np.asarray(segments)
    size = spatial_size(x, view)
    batch = batch_size(x)
    if seg.shape != (batch, *size) or not np.issubdtype(seg.dtype, np.integer) or seg.min() < 0:
        raise ValueError(
            f"{who}: segments must be integer segment ids >= 0 of shape (B, H, W) = {(batch, *size)}; "
            f"got {seg.dtype} {seg.shape}."
        )
    m = int(seg.max()) + 1
    spec = target_spec(target, batch)
    check_fn_target(fn, x, spec, who)
    image = image_leaf(x, view)
    base = check_baseline_shape(baseline, image, who)
    dtype = jnp.promote_types(image.dtype, jnp.float32)
    z, w = shap_coalitions(key, n_samples, m)
    options = ShapOptions(m, perturbations_per_step(chunk_size, batch), maps)
    args = (as_pytree(fn), x, spec, jnp.asarray(seg, jnp.int32), base, z.astype(dtype), w.astype(dtype))
    return run_chunked(
        kernel_shap_kernel, SHAP, args, options, n_items=n_samples, per_step=options.per_step,
        chunk_loop=chunk_loop, who=who,
    )  # fmt: skip
