"""What the attribution methods share: the input gate and the explained input gradients.

Every method here explains a model called as ``x -> scores`` in the pixels of one image leaf
(any layout, a pytree input with ``input=``); targets follow :func:`gradcam_jax.grad_cam`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._grads import check_fn_target
from .._inputs import check_image_array, leaf_index, with_leaf
from .._tap import scores_fn
from .._targets import TargetSpec, batch_size, fixed_top, nan_where, pull_back, select_scores, target_spec

__all__ = [
    "gate",
    "clean_target",
    "clean_start",
    "nan_finish",
    "explained_grads",
    "targets_second",
    "per_target",
    "check_key",
    "check_positive_int",
    "check_baseline_shape",
    "steps_per_chunk",
]


def gate(fn, x, target, input: Any, who: str) -> tuple[int, TargetSpec]:
    """The input gate of a pixel-space attribution: ``(image leaf, target spec)``.

    Refuses a non-callable model, an empty or integer image, a target the model's scores cannot
    give — before anything is compiled.
    """
    if not callable(fn):
        raise TypeError(
            f"{who}: fn must be a callable x -> scores (a model, an apply function or a tap); "
            f"got {type(fn).__name__}."
        )
    leaf = leaf_index(x, input, who)
    check_image_array(jax.tree_util.tree_leaves(x)[leaf], who)
    spec = target_spec(target, batch_size(x))
    check_fn_target(fn, x, spec, who)
    return leaf, spec


def clean_target(call: Callable, x, target: TargetSpec) -> tuple[TargetSpec, jax.Array]:
    """``(spec, y)``: the target with ``"top"`` fixed on the clean input ``x`` (every perturbed or
    interpolated copy then explains that class) and its clean scores, ``(B,)`` or ``(B, K)``."""
    clean = call(x)
    spec = fixed_top(target, clean)
    return spec, select_scores(spec, clean)


def clean_start(args, options) -> tuple[TargetSpec, jax.Array]:
    """The ``start`` of a chunked attribution (:class:`~gradcam_jax._chunking.Stages`) whose
    arguments begin ``(fn, x, target, ...)``: :func:`clean_target` of ``fn``'s scores."""
    fn, x, target = args[:3]
    return clean_target(scores_fn(fn.fn), x, target)


def nan_finish(args, carry, total, options):
    """The ``finish`` that returns the chunks' sum, NaN where the target is missing (the carry of
    :func:`clean_start` holds NaN clean scores there)."""
    return nan_where(jnp.isnan(carry[1]), total)


def targets_second(grads, selected):
    """``pull_back``'s K-first layout ``(K, B, ...)`` as the explainers return it: ``(B, K, ...)``."""
    return grads if selected.ndim == 1 else jnp.moveaxis(grads, 0, 1)


def explained_grads(call: Callable, x, leaf: int, spec: TargetSpec, image):
    """``(selected, d selected / d image)`` with the image leaf of ``x`` set to ``image``.

    ``selected`` is ``(B,)`` or ``(B, K)``; the gradients ``(B, ...)`` or ``(B, K, ...)``.
    """

    def explained(img):
        return select_scores(spec, call(with_leaf(x, leaf, img)))

    selected, pullback = jax.vjp(explained, image)
    (grads,) = pull_back(pullback, selected)
    return selected, targets_second(grads, selected)


def per_target(values, selected):
    """``values`` shaped like the image ``(B, ...)``, given a K axis when ``selected`` is ``(B, K)``."""
    return values if selected.ndim == 1 else values[:, None]


def check_key(key, who: str):
    """A ``jax.random`` key, or a clear error saying how to make one."""
    if key is None:
        raise TypeError(f"{who}: key= is required (randomness is explicit): pass key=jax.random.key(0).")
    if not isinstance(key, jax.Array):
        raise TypeError(f"{who}: key must be a jax.random key (jax.random.key(0)); got {type(key).__name__}.")
    return key


def check_positive_int(value, name: str, who: str, minimum: int = 1) -> int:
    """``value`` as an int ``>= minimum``, or a ``ValueError`` naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{who}: {name} must be an int >= {minimum}; got {value!r}.")
    return int(value)


def check_baseline_shape(baseline, image, who: str, name: str = "baseline"):
    """An array baseline broadcast to the image's shape and dtype, or a clear error."""
    baseline = jnp.asarray(baseline)
    if not jnp.issubdtype(baseline.dtype, jnp.floating) and not jnp.issubdtype(baseline.dtype, jnp.integer):
        raise TypeError(f"{who}: {name} must be numeric; got dtype {baseline.dtype}.")
    try:
        shape = jnp.broadcast_shapes(baseline.shape, image.shape)
    except ValueError:
        shape = None
    if shape != tuple(image.shape):
        raise ValueError(
            f"{who}: {name} of shape {baseline.shape} does not broadcast to the image {tuple(image.shape)}; "
            f"give one value, one per channel, one image, or one per example."
        )
    return jnp.broadcast_to(baseline.astype(image.dtype), image.shape)


def steps_per_chunk(chunk_size, steps: int, batch: int, who: str) -> int:
    """Path steps per chunk for ``chunk_size`` images (steps x batch) at once: all ``steps`` for
    ``None``, else ``chunk_size // batch`` clipped to ``[1, steps]``."""
    if chunk_size is None:
        return steps
    check_positive_int(chunk_size, "chunk_size", who)
    return max(1, min(steps, int(chunk_size) // max(batch, 1)))
