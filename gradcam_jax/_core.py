"""Core: targets, and the activation and its gradient from one forward pass.

``activations_and_grads(tap, x, target)`` is the whole engine of the gradient methods: one
``jax.vjp`` through the tap with respect to a zero ``delta`` at the layer returns the scores,
the activation ``A`` and a pullback; the pullback of the target's cotangent is ``dA``. For K
targets per example the pullback is ``vmap``-ed over K cotangents — still one forward pass.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from ._callables import combine_callable, partition_callable
from ._tap import Tap, as_tap

__all__ = ["Target", "TargetSpec", "activations_and_grads", "target_spec", "select_scores"]

Target = Union[None, int, Sequence[int], np.ndarray, jax.Array, Callable[[Any], jax.Array]]


class TargetSpec(NamedTuple):
    """A target in normal form.

    kind: ``"top"`` (each example's top class), ``"index"`` (an int array ``(B,)``),
      ``"multi"`` (an int array ``(B, K)``: K maps per example) or ``"fn"`` (a callable).
    value: the int array, the callable, or ``None``.
    """

    kind: str
    value: Any


def _is_concrete(a) -> bool:
    return not isinstance(a, jax.core.Tracer)


def target_spec(target: Target, batch: int) -> TargetSpec:
    """Put a user's ``target`` in normal form, checking what can be checked without the model.

    Accepted: ``None``; an int (every example); an int array ``(B,)`` (one class per example);
    a list/tuple of K ints or an int array ``(B, K)`` (K maps per example); a callable
    ``scores -> (B,)`` or ``(B, K)``.
    """
    if target is None:
        return TargetSpec("top", None)
    if callable(target) and not hasattr(target, "shape"):
        return TargetSpec("fn", target)
    if isinstance(target, (bool, np.bool_)):
        raise TypeError("target must be None, an int class index, an int array, a list of ints or a callable; got a bool.")
    if isinstance(target, (list, tuple)):
        if len(target) == 0:
            raise ValueError("target is an empty list: give at least one class index.")
        if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in target):
            raise TypeError(
                f"A list target must hold ints (K classes explained for every example); got {target!r}. "
                f"For one class per example pass an int array of shape (B,)."
            )
        # Host targets stay NumPy until jit converts them: their range can be checked without
        # a device round trip, even under an outer jit.
        arr = np.broadcast_to(np.asarray(target, np.int32), (batch, len(target)))
        return TargetSpec("multi", arr)
    arr = target if isinstance(target, (jax.Array, np.ndarray)) else np.asarray(target)
    if not jnp.issubdtype(arr.dtype, jnp.integer):
        raise TypeError(
            f"target must hold integer class indices; got dtype {arr.dtype}. Use a callable target "
            f"(scores -> (B,)) to explain anything other than a class score."
        )
    arr = arr.astype(np.int32)
    xp = np if isinstance(arr, np.ndarray) else jnp
    if arr.ndim == 0:
        return TargetSpec("index", xp.broadcast_to(arr, (batch,)))
    if arr.ndim == 1:
        if arr.shape[0] != batch:
            raise ValueError(
                f"target has shape {arr.shape} but the batch has {batch} examples. An array target "
                f"gives one class per example (shape ({batch},)); for K classes per example pass a "
                f"list of K ints or an array of shape ({batch}, K)."
            )
        return TargetSpec("index", arr)
    if arr.ndim == 2:
        if arr.shape[0] != batch:
            raise ValueError(
                f"target has shape {arr.shape} but the batch has {batch} examples: a 2-D target is "
                f"(batch, K) class indices."
            )
        return TargetSpec("multi", arr)
    raise ValueError(f"target must be an int, (B,) or (B, K) int array; got shape {arr.shape}.")


def check_target_range(spec: TargetSpec, num_classes: int) -> None:
    """Raise if a concrete index target is out of ``[0, num_classes)``.

    NumPy and Python targets are checked for free; a ``jax.Array`` target is copied to the host
    (a sync with the device), so pass NumPy labels in tight loops.
    """
    if spec.kind not in ("index", "multi") or not _is_concrete(spec.value):
        return
    values = np.asarray(spec.value)
    if values.size == 0:
        return
    lo, hi = int(values.min()), int(values.max())
    if lo < 0 or hi >= num_classes:
        bad = hi if hi >= num_classes else lo
        raise ValueError(
            f"target {bad} is out of range: the model has {num_classes} classes, so class indices "
            f"run from 0 to {num_classes - 1}."
        )


def select_scores(spec: TargetSpec, scores) -> jax.Array:
    """The scores being explained: ``(B,)`` for one target per example, ``(B, K)`` for K."""
    if spec.kind == "fn":
        y = spec.value(scores)
        if not hasattr(y, "shape") or y.ndim not in (1, 2):
            shape = getattr(y, "shape", type(y).__name__)
            raise ValueError(
                f"A callable target must map the model's output to a (B,) or (B, K) array of scores "
                f"to explain; it returned {shape}."
            )
        return y
    if not hasattr(scores, "ndim") or scores.ndim != 2:
        shape = getattr(scores, "shape", type(scores).__name__)
        raise ValueError(
            f"A class-index target needs the model to return scores of shape (B, num_classes); it "
            f"returned {shape}. Pass a callable target, scores -> (B,), to say what to explain "
            f"(e.g. a segmentation class summed over a mask, or a detection score)."
        )
    if spec.kind == "top":
        idx = jnp.argmax(jax.lax.stop_gradient(scores), axis=-1)
        return jnp.take_along_axis(scores, idx[:, None], axis=-1)[:, 0]
    if spec.kind == "index":
        return jnp.take_along_axis(scores, spec.value[:, None], axis=-1)[:, 0]
    return jnp.take_along_axis(scores, spec.value, axis=-1)


# Crossing a jit boundary: an index target is a traced array; a callable target is split into
# its arrays (traced: a per-image mask in a functools.partial does not recompile) and the rest
# (static).
def jit_target_value(spec: TargetSpec):
    return partition_callable(spec.value)[0] if spec.kind == "fn" else spec.value


def jit_target_fn(spec: TargetSpec):
    return partition_callable(spec.value)[1] if spec.kind == "fn" else None


def spec_from_jit(kind: str, value, fn_static) -> TargetSpec:
    return TargetSpec("fn", combine_callable(value, fn_static)) if kind == "fn" else TargetSpec(kind, value)


class Grads(NamedTuple):
    """What one forward pass and one (vmapped) pullback give.

    scores: the model's output.
    activation: ``A``, ``(B, ...)``.
    grads: ``dA``; ``(B, ...)`` for one target per example, ``(K, B, ...)`` for K targets.
    selected: the explained scores, ``(B,)`` or ``(B, K)``.
    """

    scores: Any
    activation: jax.Array
    grads: jax.Array
    selected: jax.Array


def activations_and_grads(tap, x, target: Target = None) -> Grads:
    """The activation at the tap and the gradient of the target score with respect to it.

    One forward pass: ``jax.vjp`` of ``delta -> target(tap(x, delta))`` at ``delta = 0``. K
    targets per example ``vmap`` the pullback over K cotangents.

    Args:
      tap: a :class:`~gradcam_jax.Tap` or a callable ``tap(x, delta) -> (scores, A)``.
      x: the input batch.
      target: see :func:`gradcam_jax.grad_cam`.

    Returns:
      :class:`Grads`.
    """
    tap = as_tap(tap)
    return _activations_and_grads(tap, x, target_spec(target, _batch_size(x)))


def _batch_size(x) -> int:
    leaves = jax.tree_util.tree_leaves(x)
    if not leaves or not hasattr(leaves[0], "shape") or len(leaves[0].shape) == 0:
        raise ValueError("The input must be a batch: an array whose first axis is the batch (B, H, W, C).")
    return leaves[0].shape[0]


def check_target_against(spec: TargetSpec, abstract_scores: Callable[[], Any]) -> None:
    """:func:`check_target_range` with the class count read from the model's scores.

    ``abstract_scores()`` returns the scores' shape (e.g. a ``jax.eval_shape``); it is called
    only for concrete index targets, so None, callable and traced targets trace nothing. Models
    whose scores are not ``(B, classes)`` are not checked (a callable target is needed there).
    """
    if spec.kind not in ("index", "multi") or not _is_concrete(spec.value):
        return
    scores = abstract_scores()
    if hasattr(scores, "shape") and len(scores.shape) == 2:
        check_target_range(spec, scores.shape[-1])


# One jitted function for shape inference, so eval_shape hits JAX's trace cache.
_run_tap = jax.jit(lambda tap, x: tap(x))


def _activations_and_grads(tap: Tap, x, spec: TargetSpec) -> Grads:
    scores_spec, act_spec = _run_tap.eval_shape(tap, x)
    check_target_against(spec, lambda: scores_spec)
    if not jnp.issubdtype(act_spec.dtype, jnp.floating):
        raise TypeError(f"The tapped layer's output has dtype {act_spec.dtype}; a float activation is needed.")
    delta0 = jnp.zeros(act_spec.shape, act_spec.dtype)

    def objective(delta):
        scores, a = tap(x, delta)
        return select_scores(spec, scores), (scores, a)

    selected, pullback, (scores, a) = jax.vjp(objective, delta0, has_aux=True)
    if selected.shape[0] != act_spec.shape[0]:
        raise ValueError(
            f"The explained scores have {selected.shape[0]} rows but the activation's batch is "
            f"{act_spec.shape[0]}: a callable target must keep the batch axis."
        )
    if selected.ndim == 1:
        (grads,) = pullback(jnp.ones_like(selected))
    else:
        k = selected.shape[1]
        cotangents = jnp.broadcast_to(jnp.eye(k, dtype=selected.dtype)[:, None, :], (k,) + selected.shape)
        (grads,) = jax.vmap(pullback)(cotangents)
    return Grads(scores, a, grads, selected)
