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
    "select_scores",
    "pull_back",
    "batch_size",
    "parse_top_k",
]

Target = None | int | Sequence[int] | np.ndarray | jax.Array | Callable[[Any], jax.Array]

KINDS = ("top", "index", "multi", "fn")


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
        return (self.value,), (self.kind, None)

    @classmethod
    def tree_unflatten(cls, aux, children):
        kind, static = aux
        (value,) = children
        return cls(kind, combine_callable(value, static) if kind == "fn" else value)

    def __repr__(self):
        return f"TargetSpec({self.kind!r}, {self.value!r})"


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
    # Host targets stay NumPy until jit converts them: their range can be checked without a
    # device round trip, even under an outer jit.
    return TargetSpec("multi", np.broadcast_to(np.asarray(target, np.int32), (batch, len(target))))


def _array_target(arr, batch: int) -> TargetSpec:
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
    arr = target if isinstance(target, (jax.Array, np.ndarray)) else np.asarray(target)
    if not jnp.issubdtype(arr.dtype, jnp.integer):
        raise TypeError(
            f"target must hold integer class indices; got dtype {arr.dtype}. Use a callable target "
            f"(scores -> (B,)) to explain anything other than a class score."
        )
    return _array_target(arr, batch)


def is_concrete(a) -> bool:
    """Whether ``a`` has a value now (not a tracer under ``jit``)."""
    return not isinstance(a, jax.core.Tracer)


def check_target_range(spec: TargetSpec, num_classes: int) -> None:
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
        raise ValueError(
            f"target {bad} is out of range: the model has {num_classes} classes, so class indices "
            f"run from 0 to {num_classes - 1}."
        )


def check_target_against(spec: TargetSpec, abstract_scores: Callable[[], Any]) -> None:
    """:func:`check_target_range` with the class count read from the model's scores.

    ``abstract_scores()`` returns the scores' shape (e.g. a ``jax.eval_shape``); it is called
    only for concrete index targets, so None, callable and traced targets trace nothing. Models
    whose scores are not ``(B, classes)`` are not checked (a callable target is needed there).
    """
    if spec.kind not in ("index", "multi") or not is_concrete(spec.value):
        return
    scores = abstract_scores()
    if hasattr(scores, "shape") and len(scores.shape) == 2:
        check_target_range(spec, scores.shape[-1])


def _callable_scores(spec: TargetSpec, scores) -> jax.Array:
    y = spec.value(scores)
    if not hasattr(y, "shape") or y.ndim not in (1, 2):
        shape = getattr(y, "shape", type(y).__name__)
        raise ValueError(
            f"A callable target must map the model's output to a (B,) or (B, K) array of scores "
            f"to explain; it returned {shape}."
        )
    return y


def select_scores(spec: TargetSpec, scores) -> jax.Array:
    """The scores being explained: ``(B,)`` for one target per example, ``(B, K)`` for K."""
    if spec.kind == "fn":
        return _callable_scores(spec, scores)
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
