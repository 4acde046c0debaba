"""Targets: what to explain, in one normal form, and the scores and cotangents they select.

A user's ``target`` (None, an int, an int array, a list of K ints, a callable) becomes a
:class:`TargetSpec`. A spec is a pytree: its arrays (class indices, or the arrays bound in a
callable's ``functools.partial``) are traced by ``jit`` and everything else is static, so a
spec passes straight through a jitted kernel and new labels or masks do not recompile.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._callables import combine_callable, partition_callable

__all__ = [
    "Target",
    "TargetSpec",
    "target_spec",
    "check_target_range",
    "check_target_against",
    "int32_indices",
    "check_callable_output",
    "select_scores",
    "take_classes",
    "nan_where",
    "pull_back",
    "batch_size",
    "parse_top_k",
]

Target = None | int | Sequence[int] | np.ndarray | jax.Array | Callable[[Any], jax.Array]

KINDS = ("top", "index", "multi", "fn")

_INT32 = np.iinfo(np.int32)


@jax.tree_util.register_pytree_node_class
class TargetSpec:
    """A target in normal form.

    kind: ``"top"`` (each example's top class), ``"index"`` (an int array ``(B,)``),
      ``"multi"`` (an int array ``(B, K)``: K maps per example) or ``"fn"`` (a callable
      ``scores -> (B,)`` or ``(B, K)``).
    value: the int array, the callable, or ``None``.
    """

    __slots__ = ("kind", "value")

    def __init__(self, kind: str, value: Any = None):
        if kind not in KINDS:
            raise ValueError(f"TargetSpec kind must be one of {KINDS}; got {kind!r}.")
        self.kind = kind
        self.value = value

    def tree_flatten(self):
        if self.kind == "fn":
            arrays, static = partition_callable(self.value)
            return (arrays,), ("fn", static)
        value = self.value
        if isinstance(value, np.ndarray) and value.dtype != np.int32:
            value = int32_indices(value)  # host indices stay exact until they enter a program
        return (value,), (self.kind, None)

    @classmethod
    def tree_unflatten(cls, aux, children):
        kind, static = aux
        (value,) = children
        return cls(kind, combine_callable(value, static) if kind == "fn" else value)

    def __repr__(self):
        return f"TargetSpec({self.kind!r}, {self.value!r})"


def int32_indices(values) -> np.ndarray:
    """Host class indices as int32, refused (never wrapped) when they do not fit.

    Targets keep their exact values (int64, or Python ints of any size) until they enter a
    compiled program; by then :func:`check_target_range` has compared them with the model's
    class count. This is the last guard, for a model whose class count could not be read.
    """
    values = np.asarray(values)
    if values.size and (values.min() < _INT32.min or values.max() > _INT32.max):
        bad = values.max() if values.max() > _INT32.max else values.min()
        raise ValueError(f"target {int(bad)} is out of range: a class index must be a small int >= 0.")
    return values.astype(np.int32)


def batch_size(x) -> int:
    """The batch size of an input (the first axis of its first leaf)."""
    leaves = jax.tree_util.tree_leaves(x)
    if not leaves or not hasattr(leaves[0], "shape") or len(leaves[0].shape) == 0:
        raise ValueError("The input must be a batch: an array whose first axis is the batch (B, H, W, C).")
    return leaves[0].shape[0]


def _list_target(target, batch: int) -> TargetSpec:
    if len(target) == 0:
        raise ValueError("target is an empty list: give at least one class index.")
    if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in target):
        raise TypeError(
            f"A list target must hold ints (K classes explained for every example); got {target!r}. "
            f"For one class per example pass an int array of shape (B,)."
        )
    # Host targets stay NumPy, with their exact values (no cast: 2**32 + 3 must not become 3),
    # until they enter a program: their range is checked without a device round trip, even
    # under an outer jit.
    return TargetSpec("multi", np.broadcast_to(_exact(target), (batch, len(target))))


def _exact(values) -> np.ndarray:
    """Integers as a NumPy array without loss: int64, or (dtype object) Python ints beyond it."""
    return np.asarray(values)


def _is_int_array(arr) -> bool:
    if arr.dtype == object:  # Python ints too large for int64
        return arr.size > 0 and all(isinstance(v, int) and not isinstance(v, bool) for v in arr.reshape(-1))
    return bool(jnp.issubdtype(arr.dtype, jnp.integer))


def _array_target(arr, batch: int) -> TargetSpec:
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
        if arr.shape[1] == 0:
            raise ValueError(f"target has shape {arr.shape}: no class to explain (K = 0); give K >= 1.")
        return TargetSpec("multi", arr)
    raise ValueError(f"target must be an int, (B,) or (B, K) int array; got shape {arr.shape}.")


def target_spec(target: Target, batch: int) -> TargetSpec:
    """Put a user's ``target`` in normal form, checking what can be checked without the model.

    Accepted: ``None``; an int (every example); an int array ``(B,)`` (one class per example);
    a list/tuple of K ints or an int array ``(B, K)`` (K maps per example); a callable
    ``scores -> (B,)`` or ``(B, K)``.
    """
    if target is None:
        return TargetSpec("top")
    if isinstance(target, TargetSpec):
        return target
    if callable(target) and not hasattr(target, "shape"):
        return TargetSpec("fn", target)
    if isinstance(target, (bool, np.bool_)):
        raise TypeError(
            "target must be None, an int class index, an int array, a list of ints or a callable; got a bool."
        )
    if isinstance(target, (list, tuple)):
        return _list_target(target, batch)
    arr = target if isinstance(target, (jax.Array, np.ndarray)) else _exact(target)
    if not _is_int_array(arr):
        raise TypeError(
            f"target must hold integer class indices; got dtype {arr.dtype}. Use a callable target "
            f"(scores -> (B,)) to explain anything other than a class score."
        )
    return _array_target(arr, batch)


def is_concrete(a) -> bool:
    """Whether ``a`` has a value now (not a tracer under ``jit``)."""
    return not isinstance(a, jax.core.Tracer)


def check_target_range(spec: TargetSpec, num_classes: int, who: str | None = None) -> None:
    """Raise if a concrete index target is out of ``[0, num_classes)``.

    NumPy and Python targets are checked for free; a ``jax.Array`` target is copied to the host
    (a sync with the device), so pass NumPy labels in tight loops.
    """
    if spec.kind not in ("index", "multi") or not is_concrete(spec.value):
        return
    values = np.asarray(spec.value)
    if values.size == 0:
        return
    lo, hi = int(values.min()), int(values.max())
    if lo < 0 or hi >= num_classes:
        bad = hi if hi >= num_classes else lo
        prefix = f"{who}: " if who else ""
        raise ValueError(
            f"{prefix}target {bad} is out of range: the model has {num_classes} classes, so class "
            f"indices run from 0 to {num_classes - 1}."
        )


# A callable target traced on the scores' shapes through one jitted function: the spec is a
# pytree (arrays bound with functools.partial are arguments), so JAX's trace cache is hit.
_run_target = jax.jit(lambda spec, scores: spec.value(scores))


def check_target_against(
    spec: TargetSpec, abstract_scores: Callable[[], Any], batch: int | None = None, who: str = "explain"
) -> None:
    """Check a target against the model's scores, before anything is compiled.

    ``abstract_scores()`` returns the scores' shapes (e.g. a ``jax.eval_shape``). A concrete
    index target is range-checked against the class count (:func:`check_target_range`); with
    ``batch`` (the input's batch size) also a class target (None, an int, an array) is checked
    to have scores ``(batch, classes)`` to select from, and a callable target is traced once on
    the scores' shapes: it must return floating scores ``(batch,)`` or ``(batch, K)``. Shapes
    only: this works on traced inputs and targets alike (under an outer ``jit``), computes
    nothing, and without ``batch`` it is called for concrete index targets only.
    """
    if batch is None and (spec.kind not in ("index", "multi") or not is_concrete(spec.value)):
        return
    scores = abstract_scores()
    if spec.kind == "fn":
        check_callable_output(_run_target.eval_shape(spec, scores), batch, who)
        return
    shape = getattr(scores, "shape", None)
    if shape is None or len(shape) != 2 or (batch is not None and shape[0] != batch):
        if batch is None:
            return  # not checked here; select_scores says what is wrong inside the kernel
        raise ValueError(
            f"{who}: target selects a class of the model's scores, which must then be (B, classes) = "
            f"({batch}, classes); the model returned {shape or type(scores).__name__}. Check that x has "
            f"the shape the model takes; for another output pass a callable target, scores -> (B,), "
            f"saying what to explain (e.g. a segmentation class summed over a mask, a detection score)."
        )
    check_target_range(spec, shape[-1], who)


def check_callable_output(y, batch: int | None, who: str = "explain") -> None:
    """A callable target's result (its shape and dtype) must be floating scores ``(B,)`` or ``(B, K)``."""
    shape = getattr(y, "shape", None)
    if shape is None or len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] == 0):
        raise ValueError(
            f"{who}: a callable target must map the model's output to a (B,) or (B, K) array of scores "
            f"to explain; it returned {type(y).__name__ if shape is None else tuple(shape)}."
        )
    if batch is not None and shape[0] != batch:
        raise ValueError(
            f"{who}: a callable target must keep the batch axis: x has {batch} examples but the target "
            f"returned shape {tuple(shape)}; return one score per example, (B,), or (B, K)."
        )
    if not jnp.issubdtype(y.dtype, jnp.floating):
        raise TypeError(
            f"{who}: a callable target must return floating scores to explain (differentiable); it returned "
            f"dtype {y.dtype}. Class indices (an argmax) are not scores: return the scores themselves, e.g. "
            f"lambda s: jnp.max(s, axis=-1), or pass the indices as target= directly."
        )


def take_classes(scores, idx):
    """``scores[b, idx[b, ...]]`` along the last axis; NaN where an index is out of range.

    Concrete targets are range-checked before this; under an outer ``jit`` a traced target is
    not, and an out-of-range one must neither wrap (-1 is not the last class) nor read a fill
    value: it gets a NaN score, and so a NaN map.
    """
    n = scores.shape[-1]
    ok = (idx >= 0) & (idx < n)
    picked = jnp.take_along_axis(scores, jnp.where(ok, idx, 0), axis=-1)
    return jnp.where(ok, picked, jnp.nan)  # a weak-typed NaN: float16 scores stay float16


def select_scores(spec: TargetSpec, scores) -> jax.Array:
    """The scores being explained: ``(B,)`` for one target per example, ``(B, K)`` for K."""
    if spec.kind == "fn":
        y = spec.value(scores)
        check_callable_output(y, None)
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
        return take_classes(scores, spec.value[:, None])[:, 0]
    return take_classes(scores, spec.value)


def nan_where(bad, values):
    """``values`` (``(B, ...)`` or ``(B, K, ...)``) set to NaN for the examples (or example-targets)
    where ``bad`` (``(B,)`` or ``(B, K)``) holds."""
    bad = bad.reshape(bad.shape + (1,) * (values.ndim - bad.ndim))
    return jnp.where(bad, jnp.nan, values)


def fixed_top(spec: TargetSpec, clean_scores) -> TargetSpec:
    """``spec`` with ``"top"`` resolved to each example's top class on ``clean_scores``.

    Perturbation methods score many perturbed copies of an input; the class they explain is
    fixed once, on the unperturbed input, rather than re-chosen on every copy.
    """
    if spec.kind != "top":
        return spec
    select_scores(spec, clean_scores)  # checks the scores are (B, classes)
    top = jnp.argmax(jax.lax.stop_gradient(clean_scores), axis=-1).astype(jnp.int32)
    return TargetSpec("index", top)


def pull_back(pullback: Callable, selected: jax.Array):
    """Apply a ``jax.vjp`` pullback to the explained scores: once, or once per target.

    ``selected`` is ``(B,)`` (one target per example: the cotangent is all ones) or ``(B, K)``
    (K targets: the pullback is ``vmap``-ed over K one-hot cotangents, still one forward pass;
    every output leaf gets a leading ``K`` axis).
    """
    if selected.ndim == 1:
        return pullback(jnp.ones_like(selected))
    k = selected.shape[1]
    cotangents = jnp.broadcast_to(jnp.eye(k, dtype=selected.dtype)[:, None, :], (k,) + selected.shape)
    return jax.vmap(pullback)(cotangents)


_TOP_K = re.compile(r"top[-_ ]?(\d+)", re.IGNORECASE)


def parse_top_k(text: str) -> int | None:
    """``K`` for a ``"topK"`` string (``"top3"``, ``"top-3"``, ``"TOP 3"``), else ``None``."""
    m = _TOP_K.fullmatch(text.strip())
    return int(m.group(1)) if m else None
