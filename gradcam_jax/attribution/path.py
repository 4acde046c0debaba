"""Path attributions: Integrated Gradients, Expected Gradients (GradientSHAP), Input x Gradient.

Integrated Gradients integrates the input gradient along the straight line from a baseline
``x'`` to the input ``x``; the integral is a fixed quadrature, so its steps are a static list
of ``(alpha, weight)`` pairs that run as ``vmap``-ed chunks of ``per_step`` steps inside one
``lax.scan`` under ``jit`` — peak memory is set by the chunk, the model appears once in the
compiled program, and the weighted sum is accumulated as the chunks go. On concrete arrays on
a CPU device the chunks instead run from Python over one jitted chunk kernel
(:func:`gradcam_jax._chunking.run_on_host`), since XLA:CPU runs a loop body slower than the
same program called once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._callables import PytreeCallable, as_pytree
from .._chunking import Stages, run_chunked, run_on_device
from .._inputs import input_view, spatial_size, with_leaf
from .._layout import from_channels_last, to_channels_last
from .._maps import kernel
from .._tap import scores_fn
from .._targets import Target, TargetSpec, nan_where, select_scores
from ._blur import apply_blur, blur_matrices
from ._common import (
    check_baseline_shape,
    check_key,
    check_positive_int,
    clean_start,
    clean_target,
    explained_grads,
    gate,
    nan_finish,
    per_target,
    steps_per_chunk,
)

__all__ = [
    "QUADRATURES",
    "quadrature",
    "PathOptions",
    "PATH",
    "path_kernel",
    "integrated_gradients",
    "expected_gradients",
    "gradient_shap_draws",
    "input_x_gradient",
    "SampledPathOptions",
    "SAMPLED",
    "expected_gradients_kernel",
]

QUADRATURES = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")


def quadrature(method: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """``(alphas, weights)`` of a quadrature of ``int_0^1 g(alpha) d alpha`` (Captum's conventions).

    Examples:
      >>> from gradcam_jax.attribution.path import quadrature
      >>> a, w = quadrature("riemann_trapezoid", 3)
      >>> a.tolist(), w.tolist()
      ([0.0, 0.5, 1.0], [0.16666666666666666, 0.3333333333333333, 0.16666666666666666])
    """
    n = int(steps)
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(n)
        return 0.5 * (1 + nodes), 0.5 * weights
    if n < 2:
        raise ValueError(f"integrated_gradients: method={method!r} needs steps >= 2; got {n}.")
    weights = np.full(n, 1.0 / n)
    if method == "riemann_left":
        return np.linspace(0, 1 - 1 / n, n), weights
    if method == "riemann_right":
        return np.linspace(1 / n, 1, n), weights
    if method == "riemann_middle":
        return np.linspace(1 / (2 * n), 1 - 1 / (2 * n), n), weights
    if method == "riemann_trapezoid":
        weights[0] /= 2
        weights[-1] /= 2
        return np.linspace(0, 1, n), weights
    raise ValueError(f"integrated_gradients: method={method!r} is not one of {', '.join(QUADRATURES)}.")


@dataclasses.dataclass(frozen=True)
class PathOptions:
    """The static options of :func:`path_kernel`: the quadrature, the chunk, the image leaf."""

    alphas: tuple[float, ...]
    weights: tuple[float, ...]
    per_step: int
    leaf: int = 0
    delta: bool = False


def path_ends(call: Callable, x, target: TargetSpec, baseline, options: PathOptions):
    """``(spec, y, y(x'))``: the target fixed on the clean input, its clean scores and (with
    ``options.delta``, else ``None``) the baseline's scores for the completeness error."""
    spec, y = clean_target(call, x, target)
    if not options.delta:
        return spec, y, None
    return spec, y, select_scores(spec, call(with_leaf(x, options.leaf, baseline)))


def path_start(args, options: PathOptions):
    fn, x, target, baseline = args
    return path_ends(scores_fn(fn.fn), x, target, baseline, options)


def path_point(args, carry, i, options: PathOptions):
    """``grad y^c(x' + alpha_i (x - x'))``, ``(B, ...)`` or ``(B, K, ...)``."""
    fn, x, _, baseline = args
    diff = jax.tree_util.tree_leaves(x)[options.leaf] - baseline
    alpha = jnp.asarray(np.asarray(options.alphas, np.float64))[i].astype(diff.dtype)
    return explained_grads(scores_fn(fn.fn), x, options.leaf, carry[0], baseline + alpha * diff)[1]


def path_finish(args, carry, total, options: PathOptions):
    """``(x - x') * total`` (NaN where the target is), with the completeness error when
    ``options.delta``: ``sum(attributions) - (y(x) - y(x'))`` per example (and target)."""
    _, x, _, baseline = args
    _, y, y_base = carry
    diff = jax.tree_util.tree_leaves(x)[options.leaf] - baseline
    attributions = nan_where(jnp.isnan(y), per_target(diff, y) * total)
    if y_base is None:
        return attributions
    axes = tuple(range(y.ndim, attributions.ndim))
    return attributions, jnp.sum(attributions, axis=axes) - (y - y_base)


PATH = Stages(path_start, lambda args, carry, o: len(o.alphas), path_point, path_finish, lambda o: o.weights)


@kernel
def path_kernel(fn: PytreeCallable, x, target: TargetSpec, baseline, *, options: PathOptions):
    """``(x - x') * sum_i w_i grad(x' + alpha_i (x - x'))`` under ``jit``, the chunks in one
    ``lax.scan``; with ``options.delta`` also the completeness error
    ``sum(attributions) - (f(x) - f(x'))`` per example (and target)."""
    return run_on_device(PATH, (fn, x, target, baseline), options, options.per_step)


def _baseline(baseline, image, x, key, layout, input, who: str, blur_sigma: float):
    """The baseline image in the image's own layout: zeros, an array, ``"blur"`` or ``"uniform"``."""
    if baseline is None:
        return jnp.zeros_like(image)
    if isinstance(baseline, str):
        if baseline == "blur":
            view = input_view(x, layout, input, who)
            mats = [m[0] for m in blur_matrices(spatial_size(x, view), [blur_sigma])]
            return from_channels_last(apply_blur(to_channels_last(image, view.layout), mats), view.layout)
        if baseline == "uniform":
            check_key(key, who)
            axes = tuple(range(1, image.ndim))
            lo = jnp.min(image, axis=axes, keepdims=True)
            hi = jnp.max(image, axis=axes, keepdims=True)
            return lo + (hi - lo) * jax.random.uniform(key, image.shape, image.dtype)
        raise ValueError(
            f"{who}: baseline={baseline!r} is not a known baseline; give None (zeros), an array, "
            f'"blur" or "uniform" (with key=).'
        )
    return check_baseline_shape(baseline, image, who)


def integrated_gradients(
    fn: Callable,
    x,
    target: Target = None,
    *,
    baseline: Any = None,
    steps: int = 50,
    method: str = "gausslegendre",
    chunk_size: int | None = None,
    return_delta: bool = False,
    chunk_loop: str = "auto",
    key=None,
    blur_sigma: float = 10.0,
    layout: str | None = None,
    input: Any = None,
):
    """Integrated Gradients: the input gradient integrated along the line from a baseline to ``x``.

    ``IG_i(x) = (x_i - x'_i) * int_0^1 d y^c(x' + a (x - x')) / d x_i  da``, the integral taken
    with ``steps`` nodes of ``method`` (Captum's quadratures: Gauss-Legendre, or a left / right /
    middle / trapezoid Riemann sum). Completeness: ``sum_i IG_i = y^c(x) - y^c(x')`` up to the
    quadrature's error, which ``return_delta`` reports per example.

    Args:
      fn: any JAX callable ``x -> scores`` (a tap's scores for a tap).
      x: the input batch (any layout), or a pytree whose image ``input`` picks.
      target: as in :func:`gradcam_jax.grad_cam`; ``None`` is each example's top class on ``x``.
      baseline: ``None`` (zeros), an array broadcastable to the image, ``"blur"`` (a Gaussian
        blur of ``x`` with ``blur_sigma``, zero padding) or ``"uniform"`` (uniform noise in each
        example's value range; needs ``key``).
      steps: quadrature nodes.
      method: ``"gausslegendre"`` (default, as Captum), ``"riemann_left"``, ``"riemann_right"``,
        ``"riemann_middle"`` or ``"riemann_trapezoid"``.
      chunk_size: images (steps x batch) differentiated at once, bounding peak memory; default
        all steps at once.
      chunk_loop: how several chunks run: ``"auto"`` (default) runs them from Python over one
        jitted chunk kernel (compiled once, dispatched asynchronously, the sum kept on the
        device) when called on concrete arrays on a CPU device, and in one ``lax.scan`` inside
        one jitted kernel otherwise (under your ``jit`` / ``vmap``, on GPU / TPU, one chunk):
        XLA:CPU runs a model's forward+backward inside a loop body 1.6-1.9x slower than the same
        program called once per chunk. ``"host"`` / ``"device"`` force either way.
      return_delta: also return the completeness error ``sum(IG) - (y(x) - y(x'))``, ``(B,)``
        (``(B, K)`` for K targets), as Captum's ``return_convergence_delta``.
      key, blur_sigma, layout, input: for the ``"uniform"`` / ``"blur"`` baselines and pytree inputs.

    Returns:
      Attributions shaped like the image, ``(B, ...)`` or ``(B, K, ...)``; with
      ``return_delta``, ``(attributions, delta)``.

    Examples:
      >>> import jax.numpy as jnp, gradcam_jax as gcj
      >>> f = lambda x: jnp.stack([jnp.sum(x**2, axis=1), jnp.sum(x, axis=1)], -1)
      >>> a, d = gcj.integrated_gradients(f, jnp.array([[1.0, 2.0]]), 0, steps=4, return_delta=True)
      >>> a.round(4).tolist(), abs(float(d[0])) < 1e-5
      ([[1.0, 4.0]], True)

    References:
      Sundararajan, Taly & Yan, "Axiomatic Attribution for Deep Networks", ICML 2017,
      https://arxiv.org/abs/1703.01365.
    """
    who = "integrated_gradients"
    leaf, spec = gate(fn, x, target, input, who)
    steps = check_positive_int(steps, "steps", who)
    alphas, weights = quadrature(method, steps)
    image = jax.tree_util.tree_leaves(x)[leaf]
    start = _baseline(baseline, image, x, key, layout, input, who, blur_sigma)
    per = steps_per_chunk(chunk_size, steps, image.shape[0], who)
    options = PathOptions(tuple(alphas.tolist()), tuple(weights.tolist()), per, leaf, bool(return_delta))
    args = (as_pytree(fn), x, spec, start)
    return run_chunked(
        path_kernel, PATH, args, options, n_items=steps, per_step=per, chunk_loop=chunk_loop, who=who
    )


def input_x_gradient(fn: Callable, x, target: Target = None, *, input: Any = None) -> jax.Array:
    """Input x Gradient: ``x_i * d y^c / d x_i`` (one forward and one backward pass).

    Args:
      fn, x, target, input: as in :func:`integrated_gradients`.

    Returns:
      Attributions shaped like the image, ``(B, ...)`` or ``(B, K, ...)``.

    References:
      Shrikumar et al., "Not Just a Black Box: Learning Important Features Through Propagating
      Activation Differences", 2016, https://arxiv.org/abs/1605.01713.
    """
    leaf, spec = gate(fn, x, target, input, "input_x_gradient")
    image = jax.tree_util.tree_leaves(x)[leaf]
    options = PathOptions((1.0,), (1.0,), 1, leaf, False)
    return path_kernel(as_pytree(fn), x, spec, jnp.zeros_like(image), options=options)


def gradient_shap_draws(key, batch: int, n_samples: int, n_baselines: int, shape, stdev: float, dtype):
    """The random draws of :func:`expected_gradients`, ``n_samples`` per example.

    ``(baseline index (B, S), alpha ~ U(0, 1) (B, S), noise ~ N(0, stdev^2) (B, S, *shape))``
    from three subkeys of ``key``.
    """
    k_idx, k_alpha, k_noise = jax.random.split(key, 3)
    idx = jax.random.randint(k_idx, (batch, n_samples), 0, n_baselines)
    alpha = jax.random.uniform(k_alpha, (batch, n_samples), dtype)
    noise = stdev * jax.random.normal(k_noise, (batch, n_samples, *shape), dtype)
    return idx, alpha, noise


@dataclasses.dataclass(frozen=True)
class SampledPathOptions:
    """The static options of :func:`expected_gradients_kernel`."""

    n_samples: int
    per_step: int
    leaf: int = 0


def sampled_point(args, carry, i, options: SampledPathOptions):
    """Draw ``i`` of every example: ``(x + n - r) * grad y^c(r + a (x + n - r))``."""
    fn, x, _, baselines, (idx, alpha, noise) = args
    spec, y = carry
    image = jax.tree_util.tree_leaves(x)[options.leaf]
    noisy = image + noise[:, i]
    ref = baselines[idx[:, i]]
    point = ref + alpha[:, i].reshape((-1,) + (1,) * (image.ndim - 1)) * (noisy - ref)
    _, g = explained_grads(scores_fn(fn.fn), x, options.leaf, spec, point)
    return per_target(noisy - ref, y) * g


SAMPLED = Stages(
    clean_start,
    lambda args, carry, o: o.n_samples,
    sampled_point,
    nan_finish,
    lambda o: np.full(o.n_samples, 1.0 / o.n_samples),
)


@kernel
def expected_gradients_kernel(
    fn: PytreeCallable, x, target: TargetSpec, baselines, draws, *, options: SampledPathOptions
):
    """``mean_s (x + n_s - r_s) * grad(r_s + a_s (x + n_s - r_s))`` under ``jit``."""
    return run_on_device(SAMPLED, (fn, x, target, baselines, draws), options, options.per_step)


def expected_gradients(
    fn: Callable,
    x,
    target: Target = None,
    *,
    baselines,
    key,
    n_samples: int = 5,
    stdev: float = 0.0,
    chunk_size: int | None = None,
    chunk_loop: str = "auto",
    input: Any = None,
):
    """Expected Gradients (GradientSHAP): IG's integrand at random points between random baselines and ``x``.

    For each example, ``n_samples`` draws of a baseline ``r`` (uniformly from ``baselines``), a
    point ``a ~ U(0, 1)`` on the path and Gaussian noise ``n ~ N(0, stdev^2)`` on the input::

        EG(x) = mean_s (x + n_s - r_s) * grad y^c(r_s + a_s (x + n_s - r_s))

    — Captum's ``GradientShap`` (the expectation of IG over a baseline distribution). The
    draws are :func:`gradient_shap_draws` of ``key``.

    Args:
      fn, x, target, input: as in :func:`integrated_gradients`.
      baselines: ``(R, ...)``: R reference images shaped like one example (a background set).
      key: a ``jax.random`` key.
      n_samples: draws per example.
      stdev: the noise's standard deviation (0: none).
      chunk_size: images differentiated at once (draws x batch); default all.
      chunk_loop: as in :func:`integrated_gradients` (on CPU the chunks run from Python).

    Returns:
      Attributions shaped like the image, ``(B, ...)`` or ``(B, K, ...)``.

    References:
      Lundberg & Lee, "A Unified Approach to Interpreting Model Predictions", NeurIPS 2017,
      https://arxiv.org/abs/1705.07874; Erion et al., "Improving performance of deep learning
      models with axiomatic attribution priors and expected gradients", 2020,
      https://arxiv.org/abs/1906.10670.
    """
    who = "expected_gradients"
    leaf, spec = gate(fn, x, target, input, who)
    check_key(key, who)
    n_samples = check_positive_int(n_samples, "n_samples", who)
    image = jax.tree_util.tree_leaves(x)[leaf]
    baselines = jnp.asarray(baselines)
    if baselines.shape[1:] != image.shape[1:] or baselines.ndim != image.ndim or not len(baselines):
        raise ValueError(
            f"{who}: baselines must be (R, {', '.join(map(str, image.shape[1:]))}): R >= 1 reference inputs "
            f"shaped like one example; got {tuple(baselines.shape)}."
        )
    draws = gradient_shap_draws(
        key, image.shape[0], n_samples, baselines.shape[0], image.shape[1:], float(stdev), image.dtype
    )
    per = steps_per_chunk(chunk_size, n_samples, image.shape[0], who)
    options = SampledPathOptions(n_samples, per, leaf)
    args = (as_pytree(fn), x, spec, baselines.astype(image.dtype), draws)
    return run_chunked(
        expected_gradients_kernel, SAMPLED, args, options, n_items=n_samples, per_step=per,
        chunk_loop=chunk_loop, who=who,
    )  # fmt: skip
