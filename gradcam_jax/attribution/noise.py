"""A noise tunnel for every explainer: SmoothGrad, SmoothGrad², VarGrad over Gaussian-noised inputs.

The explainer (any of the library's: a CAM, a pixel method, a path method) is called on
``n_samples`` noisy copies of the input inside one jitted kernel; the copies run as ``vmap``-ed
chunks of ``chunk_size`` samples in a ``lax.scan``, accumulating the sum and the sum of squares
(on concrete CPU inputs, from Python over one jitted chunk kernel:
:func:`gradcam_jax._chunking.run_on_host`).
The class explained is fixed once, on the clean input.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._callables import PytreeCallable, as_pytree
from .._chunking import Stages, run_chunked, run_on_device
from .._inputs import with_leaf
from .._maps import kernel
from .._tap import scores_fn
from .._targets import Target, TargetSpec, fixed_top
from ._common import check_key, check_positive_int, gate

__all__ = ["KINDS", "NoiseOptions", "NOISE", "noise_tunnel_kernel", "noise_tunnel", "noise_draws"]

KINDS = ("smoothgrad", "smoothgrad_sq", "vargrad")


@dataclasses.dataclass(frozen=True)
class NoiseOptions:
    """The static options of :func:`noise_tunnel_kernel`."""

    kind: str
    n_samples: int
    per_step: int
    leaf: int = 0
    input: Any = None


def noise_draws(key, image, n_samples: int, stdev: float, relative: bool):
    """The noise added to ``image``: ``(n_samples, *image.shape)``.

    ``N(0, sigma^2)`` with ``sigma = stdev * (max(x_b) - min(x_b))`` per example when
    ``relative`` (SmoothGrad's noise level), ``sigma = stdev`` otherwise; drawn in float32.
    """
    if relative:
        axes = tuple(range(1, image.ndim))
        sigma = stdev * (jnp.max(image, axis=axes, keepdims=True) - jnp.min(image, axis=axes, keepdims=True))
    else:
        sigma = jnp.asarray(stdev, image.dtype)
    return jax.random.normal(key, (n_samples,) + image.shape, jnp.float32).astype(image.dtype) * sigma


def noise_start(args, options: NoiseOptions):
    """The target fixed once, on the clean input."""
    _, fn, x, target, _ = args
    return fixed_top(target, scores_fn(fn.fn)(x))


def noisy_explanation(args, spec, i, options: NoiseOptions):
    """``(e, e^2)``: the explainer on ``x`` with noisy copy ``i`` added to its image leaf."""
    explain, fn, x, _, noise = args
    image = jax.tree_util.tree_leaves(x)[options.leaf]
    extra = {} if options.input is None else {"input": options.input}
    a = explain.fn(fn.fn, with_leaf(x, options.leaf, image + noise[i]), spec, **extra)
    a = a.astype(jnp.promote_types(a.dtype, jnp.float32))
    return a, a * a


def aggregate(args, spec, total, options: NoiseOptions):
    """SmoothGrad's mean, SmoothGrad²'s mean of squares or VarGrad's variance."""
    mean, mean_sq = total
    if options.kind == "smoothgrad":
        return mean
    if options.kind == "smoothgrad_sq":
        return mean_sq
    return mean_sq - mean * mean


NOISE = Stages(
    noise_start,
    lambda args, carry, o: o.n_samples,
    noisy_explanation,
    aggregate,
    lambda o: np.full(o.n_samples, 1.0 / o.n_samples),
)


@kernel
def noise_tunnel_kernel(
    explain: PytreeCallable, fn: PytreeCallable, x, target: TargetSpec, noise, *, options: NoiseOptions
):
    """The noise tunnel's aggregate under ``jit`` (see :func:`noise_tunnel`), chunks in a ``lax.scan``."""
    return run_on_device(NOISE, (explain, fn, x, target, noise), options, options.per_step)


def noise_tunnel(
    explainer: Callable,
    fn_or_tap,
    x,
    target: Target = None,
    *,
    key,
    n_samples: int = 25,
    stdev: float = 0.15,
    kind: str = "smoothgrad",
    relative: bool = True,
    chunk_size: int | None = None,
    chunk_loop: str = "auto",
    input: Any = None,
    **explainer_options,
):
    """Any explainer averaged over Gaussian-noised copies of the input (SmoothGrad and relatives).

    With ``e_s = explainer(fn, x + n_s, target)`` for ``n_s ~ N(0, sigma^2)``, ``s = 1..S``:

    * ``"smoothgrad"``: ``mean_s e_s`` (Smilkov et al. 2017);
    * ``"smoothgrad_sq"``: ``mean_s e_s^2``;
    * ``"vargrad"``: ``mean_s e_s^2 - (mean_s e_s)^2`` (Adebayo et al. 2018).

    As Captum's ``NoiseTunnel``; ``sigma = stdev * (max(x_b) - min(x_b))`` per example (the
    paper's noise level) or, with ``relative=False``, ``sigma = stdev`` (Captum's ``stdevs``).

    Args:
      explainer: a function ``explainer(fn_or_tap, x, target, **explainer_options)`` returning
        an array: ``gcj.grad_cam``, ``gcj.cam``, ``gcj.guided_backprop``, ``gcj.gradients``,
        ``gcj.integrated_gradients``, ``gcj.lrp``...
      fn_or_tap: what ``explainer`` takes (a tap for a CAM, any ``x -> scores`` callable else).
      x: the input batch, or a pytree whose image ``input`` picks (only it gets noise).
      target: as in :func:`gradcam_jax.grad_cam`; ``None`` is the top class of the clean input,
        explained on every noisy copy.
      key: a ``jax.random`` key (see :func:`noise_draws`).
      n_samples: noisy copies per example.
      stdev: the noise's standard deviation (relative to each example's range, or absolute).
      kind: ``"smoothgrad"``, ``"smoothgrad_sq"`` or ``"vargrad"``.
      relative: whether ``stdev`` is a fraction of each example's value range.
      chunk_size: noisy copies (of the whole batch) explained at once; default all.
      chunk_loop: as in :func:`~gradcam_jax.integrated_gradients`: ``"auto"`` runs several
        chunks from Python over one jitted chunk kernel on concrete CPU inputs (XLA:CPU runs a
        ``lax.scan`` body slower), else in one ``lax.scan``; ``"host"`` / ``"device"`` force it.
        ``"auto"`` does not look inside ``explainer``: for a forward-only one (Score-CAM,
        occlusion), whose chunks ran faster in the device loop, pass ``chunk_loop="device"``.
      explainer_options: passed to ``explainer`` (``upsample=False``, ``steps=16``, ...).

    Returns:
      The aggregate, shaped like the explainer's output, float32 (float64 for float64 outputs).

    Examples:
      >>> import jax, jax.numpy as jnp, gradcam_jax as gcj
      >>> f = lambda x: jnp.stack([x.sum((1, 2, 3)), -x.sum((1, 2, 3))], -1)
      >>> m = gcj.noise_tunnel(gcj.gradients, f, jnp.ones((1, 2, 2, 1)), 0, key=jax.random.key(0))
      >>> m.reshape(-1).round(4).tolist()   # a linear model: every noisy gradient is the same
      [1.0, 1.0, 1.0, 1.0]

    References:
      Smilkov et al., "SmoothGrad: removing noise by adding noise", 2017,
      https://arxiv.org/abs/1706.03825; Adebayo et al., "Local Explanation Methods for Deep
      Neural Networks Lack Sensitivity to Parameter Values", 2018, https://arxiv.org/abs/1810.03307.
    """
    # long-function: the docstring documents every option; the body is the checks and one kernel call.
    who = "noise_tunnel"
    if not callable(explainer):
        raise TypeError(
            f"{who}: explainer must be an explainer function such as gcj.grad_cam; got {explainer!r}."
        )
    if kind not in KINDS:
        raise ValueError(f"{who}: kind={kind!r} is not one of {', '.join(KINDS)}.")
    if explainer_options.get("return_delta"):
        raise ValueError(f"{who}: return_delta is not aggregated over noisy copies; call without it.")
    check_key(key, who)
    n_samples = check_positive_int(n_samples, "n_samples", who)
    per = n_samples if chunk_size is None else check_positive_int(chunk_size, "chunk_size", who)
    leaf, spec = gate(fn_or_tap, x, target, input, who)
    image = jax.tree_util.tree_leaves(x)[leaf]
    noise = noise_draws(key, image, n_samples, float(stdev), bool(relative))
    explain = functools.partial(explainer, **explainer_options)
    options = NoiseOptions(kind, n_samples, per, leaf, input)
    args = (as_pytree(explain), as_pytree(fn_or_tap), x, spec, noise)
    return run_chunked(
        noise_tunnel_kernel, NOISE, args, options, n_items=n_samples, per_step=per, chunk_loop=chunk_loop,
        who=who,
    )  # fmt: skip
