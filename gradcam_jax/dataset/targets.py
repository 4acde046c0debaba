"""A dataset run's ``target``: what to explain for every record.

The forms of :func:`gradcam_jax.cam` (checked by the same :func:`~gradcam_jax._targets.target_spec`),
read per *record* rather than per batch, plus ``"topK"``: each record's K most probable
classes. Class indices are either the same for every record (``constant``: an int or a list
of K ints, broadcast on device) or given per record (``per_record``: an ``(N,)`` or ``(N, K)``
array, fed through the loader with the images).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._targets import TargetSpec, check_target_range, parse_top_k, target_spec
from .store import digest_arrays

__all__ = ["TopK", "Targets", "resolve_targets"]


@dataclasses.dataclass(frozen=True)
class TopK:
    """Callable target: each example's ``k`` highest scores (``k`` maps per example)."""

    k: int

    def __call__(self, scores):
        idx = jax.lax.top_k(jax.lax.stop_gradient(scores), self.k)[1]
        return jnp.take_along_axis(scores, idx, axis=-1)


@dataclasses.dataclass(frozen=True, eq=False)
class Targets:
    """A run's target in normal form.

    kind: ``"top"``, ``"index"`` (one class per record), ``"multi"`` (K classes per record),
      ``"topk"`` or ``"fn"`` (see :data:`~.step.TARGET_KINDS`).
    description: the target as the store's configuration records it (JSON).
    fn: the callable of a ``topk`` (a :class:`TopK`) or ``fn`` target.
    k: the number of maps per record (``None``: one).
    constant: int32 class(es) for every record: ``()`` or ``(K,)``.
    per_record: int32 classes of each record: ``(N,)`` or ``(N, K)``.
    """

    kind: str
    description: dict[str, Any]
    fn: Callable | None = None
    k: int | None = None
    constant: np.ndarray | None = None
    per_record: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of one record's class indices as the step takes them."""
        return (self.k,) if self.kind == "multi" and self.k is not None else ()

    def fixed_rows(self, rows: int) -> np.ndarray | None:
        """The step's ``(rows, ...)`` class indices when they are the same for every batch
        (``None`` for per-record targets, which come from the loader)."""
        if self.per_record is not None:
            return None
        if self.constant is not None:
            return np.ascontiguousarray(np.broadcast_to(self.constant, (rows,) + self.constant.shape))
        return np.zeros((rows,) + self.shape, np.int32)

    def check_range(self, num_classes: int) -> None:
        """Raise if a class index, or K of ``"topK"``, does not fit a model of ``num_classes``."""
        if self.kind == "topk" and self.k is not None and self.k > num_classes:
            raise ValueError(f"target='top{self.k}' but the model has only {num_classes} classes.")
        for values in (self.constant, self.per_record):
            if values is not None:
                check_target_range(TargetSpec(self.kind, values), num_classes)


def _callable_name(fn: Callable) -> str:
    return str(getattr(fn, "__qualname__", None) or type(fn).__name__)


def _top_k(text: str) -> Targets:
    k = parse_top_k(text)
    if k is None or k < 1:
        raise ValueError(f"target={text!r}: a string target is 'topK' (K >= 1), e.g. 'top3'.")
    return Targets("topk", {"kind": "topk", "k": k}, fn=TopK(k), k=k)


def _per_record(values: Any, n: int) -> Targets:
    values = np.asarray(values)
    if not np.issubdtype(values.dtype, np.integer):
        raise TypeError(f"an array target must hold integer class indices; got dtype {values.dtype}.")
    if values.ndim not in (1, 2) or values.shape[0] != n:
        raise ValueError(
            f"an array target gives the class(es) of each record: shape ({n},) or ({n}, K); "
            f"got {values.shape}."
        )
    values = values.astype(np.int32)
    desc = {"kind": "per_record", "shape": list(values.shape), "digest": digest_arrays([values])}
    if values.ndim == 1:
        return Targets("index", desc, per_record=values)
    return Targets("multi", desc, k=values.shape[1], per_record=values)


def resolve_targets(target: Any, n: int) -> Targets:
    """``explain_dataset``'s ``target`` for ``n`` records, checked (except the class range:
    :meth:`Targets.check_range`, once the model's class count is known)."""
    if isinstance(target, str):
        return _top_k(target)
    if isinstance(target, (np.ndarray, jax.Array)) and target.ndim:
        return _per_record(target, n)
    spec = target_spec(target, n)  # None, callables, bools, lists, dtypes: the explainers' checks
    if spec.kind == "top":
        return Targets("top", {"kind": "top"})
    if spec.kind == "fn":
        return Targets("fn", {"kind": "fn", "name": _callable_name(target)}, fn=target)
    if isinstance(target, (int, np.integer)):
        return Targets("index", {"kind": "index", "value": int(target)}, constant=np.int32(target))
    if isinstance(target, (list, tuple)):
        values = [int(t) for t in target]
        return Targets(
            "multi", {"kind": "multi", "value": values}, k=len(values), constant=np.asarray(values, np.int32)
        )
    return _per_record(target, n)
