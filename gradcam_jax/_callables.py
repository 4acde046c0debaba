"""Passing user callables (functions, Taps, Equinox modules) through ``jax.jit``.

A callable pytree is split into its array leaves, which ``jit`` traces (weights are arguments,
not constants baked into the program), and everything else, which becomes a hashable static
argument (unhashable leaves are compared by identity).
"""

from __future__ import annotations

import jax
import numpy as np

from ._tap import Tap

__all__ = ["partition_callable", "combine_callable", "scores_fn"]


class _ByIdentity:
    """A hashable stand-in for an unhashable static leaf (compared by identity)."""

    def __init__(self, obj):
        self.obj = obj

    def __hash__(self):
        return id(self.obj)

    def __eq__(self, other):
        return isinstance(other, _ByIdentity) and other.obj is self.obj


def partition_callable(fn):
    """``fn`` -> ``(arrays, static)``: a list of array leaves (None elsewhere) and the rest."""
    leaves, treedef = jax.tree_util.tree_flatten(fn)
    arrays, static = [], []
    for leaf in leaves:
        if isinstance(leaf, (jax.Array, np.ndarray)):
            arrays.append(leaf)
            static.append(None)
            continue
        arrays.append(None)
        try:
            hash(leaf)
            static.append(leaf)
        except TypeError:
            static.append(_ByIdentity(leaf))
    return arrays, (treedef, tuple(static))


def combine_callable(arrays, static):
    """The inverse of :func:`partition_callable`."""
    treedef, rest = static
    leaves = [a if s is None else (s.obj if isinstance(s, _ByIdentity) else s)
              for a, s in zip(arrays, rest, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def scores_fn(model):
    """``x -> scores`` for a model, or for a tap (whose call returns ``(scores, activation)``)."""
    if isinstance(model, Tap):
        return lambda x: model(x)[0]
    return model
