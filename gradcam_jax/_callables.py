"""Passing user callables (functions, Taps, Equinox modules) through ``jax.jit``.

A callable pytree is split into its array leaves, which ``jit`` traces (weights are arguments,
not constants baked into the program), and everything else, which becomes a hashable static
argument (unhashable leaves are compared by identity).
"""

from __future__ import annotations

import functools

import jax
import numpy as np

__all__ = [
    "partition_callable",
    "combine_callable",
    "hashable",
    "ByIdentity",
    "KeyedFunction",
    "PytreeCallable",
    "as_pytree",
]


class ByIdentity:
    """A hashable stand-in for an unhashable static leaf (compared by identity)."""

    def __init__(self, obj):
        self.obj = obj

    def __hash__(self):
        return id(self.obj)

    def __eq__(self, other):
        return isinstance(other, ByIdentity) and other.obj is self.obj


class KeyedFunction:
    """A function compared and hashed by a key rather than by identity.

    Adapters build their ``apply`` closures per call; keyed by (the user's model object, the
    tap's settings), building the same tap twice gives equal static arguments, so ``jit``
    reuses the compiled kernel instead of compiling again.
    """

    def __init__(self, fn, key):
        self.fn = fn
        self.key = key

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __hash__(self):
        return hash(self.key)

    def __eq__(self, other):
        return isinstance(other, KeyedFunction) and self.key == other.key


def hashable(value):
    """``value`` if hashable, else a stand-in compared by identity."""
    try:
        hash(value)
        return value
    except TypeError:
        return ByIdentity(value)


def partition_callable(fn):
    """``fn`` -> ``(arrays, static)``: a list of array leaves (None elsewhere) and the rest.

    A ``functools.partial`` counts as a pytree of its bound arguments, so the arrays it carries
    (a mask, a box) are traced rather than compiled in. A closure's captured arrays are not
    visible: bind them with ``functools.partial`` to avoid a compilation per new array.
    """
    if isinstance(fn, functools.partial) and not isinstance(fn, jax.tree_util.Partial):
        fn = jax.tree_util.Partial(fn.func, *fn.args, **fn.keywords)
    leaves, treedef = jax.tree_util.tree_flatten(fn)
    arrays, static = [], []
    for leaf in leaves:
        if isinstance(leaf, (jax.Array, np.ndarray)):
            arrays.append(leaf)
            static.append(None)
            continue
        arrays.append(None)
        static.append(hashable(leaf))
    return arrays, (treedef, tuple(static))


def combine_callable(arrays, static):
    """The inverse of :func:`partition_callable`."""
    treedef, rest = static
    leaves = [
        a if s is None else (s.obj if isinstance(s, ByIdentity) else s)
        for a, s in zip(arrays, rest, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, leaves)


@jax.tree_util.register_pytree_node_class
class PytreeCallable:
    """A callable that passes through ``jax.jit`` as an argument: arrays traced, the rest static.

    ``PytreeCallable(fn).fn`` is ``fn`` (rebuilt from its parts on the other side of ``jit``).
    """

    __slots__ = ("fn",)

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def tree_flatten(self):
        arrays, static = partition_callable(self.fn)
        return (arrays,), static

    @classmethod
    def tree_unflatten(cls, static, children):
        return cls(combine_callable(children[0], static))


def as_pytree(fn) -> PytreeCallable:
    """``fn`` wrapped for passing through ``jax.jit`` (see :class:`PytreeCallable`)."""
    return fn if isinstance(fn, PytreeCallable) else PytreeCallable(fn)
