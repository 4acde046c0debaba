"""Integrated gradients along other paths: Blur IG and Guided IG (PAIR ``saliency``'s parameters).

Both run jitted and batched: Blur IG's blur levels are host-built matrices applied on the
device in ``vmap``-ed chunks; Guided IG's adaptive path is a ``fori_loop`` over steps with, per
step, one batched gradient and a per-example ``while_loop`` choosing which features move.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from .._callables import PytreeCallable, as_pytree
from .._chunking import Stages, run_chunked, run_on_device
from .._inputs import input_view, spatial_size
from .._layout import from_channels_last, parse_layout, to_channels_last
from .._maps import kernel
from .._tap import scores_fn
from .._targets import Target, TargetSpec, nan_where
from ._blur import apply_blur, blur_matrices
from ._common import (
    check_baseline_shape,
    check_positive_int,
    clean_start,
    clean_target,
    explained_grads,
    gate,
    per_target,
    steps_per_chunk,
)

__all__ = [
    "BlurOptions",
    "BLUR",
    "blur_ig_kernel",
    "blur_ig",
    "GuidedOptions",
    "guided_ig_kernel",
    "guided_ig",
]


@dataclasses.dataclass(frozen=True)
class BlurOptions:
    """The static options of :func:`blur_ig_kernel`."""

    weights: tuple[float, ...]
    grad_step: float
    per_step: int
    leaf: int
    layout: str


def blur_point(args, carry, i, options: BlurOptions):
    """Blur level ``i``: ``d blur(x, s_i)/ds * grad y^c(blur(x, s_i))``."""
    fn, x, _, mats, grad_mats = args
    spec, y = carry
    leaf, layout = options.leaf, parse_layout(options.layout)
    image_cl = to_channels_last(jax.tree_util.tree_leaves(x)[leaf], layout)
    m, gm = jax.tree_util.tree_map(lambda v: v[i], (mats, grad_mats))
    blurred = apply_blur(image_cl, m)
    dblur = (apply_blur(image_cl, gm) - blurred) / options.grad_step
    _, g = explained_grads(scores_fn(fn.fn), x, leaf, spec, from_channels_last(blurred, layout))
    return per_target(from_channels_last(dblur, layout), y) * g


def blur_finish(args, carry, total, options: BlurOptions):
    return nan_where(jnp.isnan(carry[1]), -total)


BLUR = Stages(
    clean_start, lambda args, carry, o: len(o.weights), blur_point, blur_finish, lambda o: o.weights
)


@kernel
def blur_ig_kernel(fn: PytreeCallable, x, target: TargetSpec, mats, grad_mats, *, options: BlurOptions):
    """``-sum_i (s_{i+1} - s_i) * d blur(x, s_i)/ds * grad(blur(x, s_i))`` under ``jit``."""
    return run_on_device(BLUR, (fn, x, target, mats, grad_mats), options, options.per_step)


def blur_ig(
    fn: Callable,
    x,
    target: Target = None,
    *,
    max_sigma: float = 50.0,
    steps: int = 100,
    grad_step: float = 0.01,
    sqrt: bool = False,
    chunk_size: int | None = None,
    chunk_loop: str = "auto",
    layout: str | None = None,
    input: Any = None,
) -> jax.Array:
    """Blur IG: integrated gradients along the path from ``x`` blurred at ``max_sigma`` to ``x``.

    With ``sigma_i = i * max_sigma / steps`` (``sqrt(i * max_sigma / steps)`` with ``sqrt``),
    ``x_i = G(sigma_i) * x`` (a Gaussian blur of the spatial axes, zero padding, SciPy's
    kernel) and ``dx_i / d sigma`` by a forward difference of ``grad_step``::

        BlurIG(x) = - sum_{i<steps} (sigma_{i+1} - sigma_i) * dx_i/dsigma * grad y^c(x_i)

    — PAIR ``saliency``'s ``BlurIG`` (its defaults), batched and jitted.

    Args:
      fn, x, target, layout, input: as in :func:`gradcam_jax.integrated_gradients`.
      max_sigma, steps, grad_step, sqrt: the blur path (PAIR's parameters and defaults).
      chunk_size: images (steps x batch) differentiated at once; default all steps.
      chunk_loop: as in :func:`gradcam_jax.integrated_gradients` (on CPU the chunks run from
        Python over one jitted chunk kernel; ``"device"``: one ``lax.scan``).

    Returns:
      Attributions shaped like the image, ``(B, ...)`` or ``(B, K, ...)``.

    References:
      Xu, Venugopalan & Sundararajan, "Attribution in Scale and Space", CVPR 2020,
      https://arxiv.org/abs/2004.03383.
    """
    who = "blur_ig"
    leaf, spec = gate(fn, x, target, input, who)
    steps = check_positive_int(steps, "steps", who)
    view = input_view(x, layout, input, who)
    sizes = spatial_size(x, view)
    levels = [(i * max_sigma / steps) for i in range(steps + 1)]
    sigmas = [math.sqrt(s) for s in levels] if sqrt else levels
    weights = tuple(float(b - a) for a, b in zip(sigmas[:-1], sigmas[1:], strict=True))
    dtype = jax.tree_util.tree_leaves(x)[leaf].dtype
    mats = [jnp.asarray(m, dtype) for m in blur_matrices(sizes, sigmas[:-1])]
    grad_mats = [jnp.asarray(m, dtype) for m in blur_matrices(sizes, [s + grad_step for s in sigmas[:-1]])]
    per = steps_per_chunk(chunk_size, steps, jax.tree_util.tree_leaves(x)[leaf].shape[0], who)
    options = BlurOptions(weights, float(grad_step), per, leaf, view.layout.name)
    args = (as_pytree(fn), x, spec, mats, grad_mats)
    return run_chunked(
        blur_ig_kernel, BLUR, args, options, n_items=steps, per_step=per, chunk_loop=chunk_loop, who=who
    )


@dataclasses.dataclass(frozen=True)
class GuidedOptions:
    """The static options of :func:`guided_ig_kernel`."""

    steps: int
    fraction: float
    max_dist: float
    leaf: int


_TOL = 1e-9  # PAIR's EPSILON for "the L1 target is reached"


def _guided_step(x, grad, x_in, x_base, alpha, options: GuidedOptions, l1_total):
    """One Guided IG step for one example: move the features with the smallest |grad| first."""
    diff = x_in - x_base
    a_min = jnp.maximum(alpha - options.max_dist, 0.0)
    a_max = jnp.minimum(alpha + options.max_dist, 1.0)
    x_min, x_max = x_base + diff * a_min, x_base + diff * a_max
    l1_target = l1_total * (1 - alpha)
    n = x.size

    def cond(state):
        _, _, _, gamma, done, it = state
        return (gamma > 1.0) & ~done & (it <= n)  # at most n rounds: each moves a feature to x_max

    def body(state):
        x, attr, g, _, _, it = state
        x_old = x
        x_alpha = jnp.where(diff != 0, (x - x_base) / jnp.where(diff != 0, diff, 1), a_max)
        x = jnp.where(x_alpha < a_min, x_min, x)
        l1_cur = jnp.sum(jnp.abs(x - x_in))
        reached = jnp.abs(l1_target - l1_cur) <= jnp.maximum(_TOL * jnp.maximum(l1_target, l1_cur), _TOL)
        g = jnp.where(x == x_max, jnp.inf, g)
        mag = jnp.abs(g).reshape(-1)
        threshold = jnp.sort(mag)[jnp.floor(options.fraction * (n - 1)).astype(jnp.int32)]  # 'lower'
        s = (jnp.abs(g) <= threshold) & (g != jnp.inf)
        l1_s = jnp.sum(jnp.abs(x - x_max) * s)
        gamma = jnp.where(l1_s > 0, (l1_cur - l1_target) / jnp.where(l1_s > 0, l1_s, 1), jnp.inf)
        moved = jnp.where(gamma > 1.0, x_max, x + (x_max - x) * jnp.minimum(gamma, 1.0))
        x_new = jnp.where(reached, x, jnp.where(s, moved, x))
        gamma = jnp.where(reached, 0.0, gamma)
        # Nothing left to move (every feature at x_max): done. PAIR relies on float64 reaching the
        # L1 target exactly here; in float32 the sums differ by rounding and it would loop forever.
        done = reached | (l1_s <= 0)
        return x_new, attr + (x_new - x_old) * grad, g, gamma, done, it + 1

    init = (x, jnp.zeros_like(x), grad, jnp.asarray(jnp.inf, x.dtype), jnp.asarray(False), 0)
    x, attr, _, _, _, _ = jax.lax.while_loop(cond, body, init)
    return x, attr


def guided_path(call: Callable, x, leaf: int, spec: TargetSpec, baseline, options: GuidedOptions):
    """Guided IG's attributions ``(B, ...)`` for one target per example (``spec`` selects ``(B,)``)."""
    image = jax.tree_util.tree_leaves(x)[leaf]
    l1_total = jnp.sum(jnp.abs(image - baseline), axis=tuple(range(1, image.ndim)))

    def one(xs, g, x_in, x_base, alpha, l1):
        return _guided_step(xs, g, x_in, x_base, alpha, options, l1)

    step = jax.vmap(one, in_axes=(0, 0, 0, 0, None, 0))

    def body(i, carry):
        xs, attr = carry
        _, g = explained_grads(call, x, leaf, spec, xs)
        alpha = (i + 1.0) / options.steps
        xs, d_attr = step(xs, g, image, baseline, jnp.asarray(alpha, image.dtype), l1_total)
        return xs, attr + d_attr

    return jax.lax.fori_loop(0, options.steps, body, (baseline, jnp.zeros_like(image)))[1]


def target_column(spec: TargetSpec, k) -> TargetSpec:
    """Target ``k`` of a K-target spec (``"multi"`` or a callable giving ``(B, K)``) as one per example."""
    if spec.kind == "multi":
        return TargetSpec("index", spec.value[:, k])
    select = spec.value
    return TargetSpec("fn", lambda scores: select(scores)[:, k])


@kernel
def guided_ig_kernel(fn: PytreeCallable, x, target: TargetSpec, baseline, *, options: GuidedOptions):
    """Guided IG under ``jit`` (see :func:`guided_ig`); K targets are K paths, ``vmap``-ed."""
    call = scores_fn(fn.fn)
    spec, y = clean_target(call, x, target)
    if y.ndim == 1:
        attr = guided_path(call, x, options.leaf, spec, baseline, options)
    else:

        def column(k):
            return guided_path(call, x, options.leaf, target_column(spec, k), baseline, options)

        attr = jax.vmap(column, out_axes=1)(jnp.arange(y.shape[1]))
    return nan_where(jnp.isnan(y), attr)


def guided_ig(
    fn: Callable,
    x,
    target: Target = None,
    *,
    baseline: Any = None,
    steps: int = 200,
    fraction: float = 0.25,
    max_dist: float = 0.02,
    input: Any = None,
) -> jax.Array:
    """Guided IG: integrated gradients along an adaptive path that moves low-gradient features first.

    From the baseline, each of ``steps`` steps brings the input ``1/steps`` of the L1 distance
    closer to ``x`` by moving to their values at this step the ``fraction`` of features with
    the smallest ``|gradient|``, repeatedly, never leaving ``max_dist`` (in path fraction) of
    the straight line; the attribution accumulates ``(x_new - x_old) * gradient`` — PAIR
    ``saliency``'s ``GuidedIG`` (its defaults), with each step's gradients batched.

    Args:
      fn, x, input: as in :func:`gradcam_jax.integrated_gradients`.
      target: as in :func:`gradcam_jax.grad_cam`. The path follows the target's gradients, so K
        targets per example (``(B, K)``, a list of K classes, a callable giving ``(B, K)``) are K
        paths, run together (``vmap``-ed: K times the work and memory of one target).
      baseline: ``None`` (zeros) or an array broadcastable to the image.
      steps, fraction, max_dist: PAIR's parameters and defaults.

    Returns:
      Attributions shaped like the image, ``(B, ...)`` or ``(B, K, ...)``.

    References:
      Kapishnikov et al., "Guided Integrated Gradients: An Adaptive Path Method for Removing
      Noise", CVPR 2021, https://arxiv.org/abs/2106.09788.
    """
    who = "guided_ig"
    leaf, spec = gate(fn, x, target, input, who)
    steps = check_positive_int(steps, "steps", who)
    if not 0.0 <= fraction <= 1.0 or not 0.0 <= max_dist <= 1.0:
        raise ValueError(f"{who}: fraction and max_dist must be in [0, 1]; got {fraction}, {max_dist}.")
    image = jax.tree_util.tree_leaves(x)[leaf]
    base = jnp.zeros_like(image) if baseline is None else check_baseline_shape(baseline, image, who)
    options = GuidedOptions(steps, float(fraction), float(max_dist), leaf)
    return guided_ig_kernel(as_pytree(fn), x, spec, base, options=options)
