"""Passing user callables (functions, Taps, Equinox modules) through ``jax.jit``.

A callable pytree is split into its array leaves, which ``jit`` traces (weights are arguments,
not constants baked into the program), and everything else, which becomes a hashable static
argument (unhashable leaves are compared by identity).

Plain functions and lambdas are compared by what they compute, not by identity
(:func:`function_key`): the same code, the same globals, equal defaults and closures whose
captured values are equal — hashable values by value (``k = 3``), others (arrays, dicts, models)
by identity. So ``target=lambda s: s[:, 3]`` written in a loop compiles once, while a lambda
capturing another ``k`` compiles anew (it computes something else). A closure that captures a
jax or NumPy array bakes it into the program as a constant and is keyed by the array's
identity: a new array means a new compilation. Bind arrays with ``functools.partial`` instead
(``functools.partial(fn, mask)``): they are then traced arguments and new masks reuse the
compiled program.

A function's globals are read when it is traced, not keyed: as with any jitted function,
rebinding a global that a cached function reads does not recompile it.
"""

from __future__ import annotations

import functools
import types
from typing import Any

import jax
import numpy as np

__all__ = [
    "partition_callable",
    "combine_callable",
    "hashable",
    "function_key",
    "StableFunction",
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


def _value_key(value, seen: tuple):
    """A hashable key for a captured value: itself (with its type) if hashable, else its identity."""
    if isinstance(value, types.FunctionType):
        return _function_key(value, seen)
    if type(value) is tuple:
        return (tuple, tuple(_value_key(v, seen) for v in value))
    if isinstance(value, (float, complex, np.inexact)):  # by bits: -0.0 is not 0.0, nan is nan
        return (type(value), np.asarray(value).tobytes())
    try:
        hash(value)
    except TypeError:
        return ByIdentity(value)
    return (type(value), value)  # the type too: a lambda capturing 1 is not one capturing 1.0


def _function_key(fn: types.FunctionType, seen: tuple):
    if fn in seen:  # a recursive closure refers to itself: the same place in the structure
        return ("recursion", seen.index(fn))
    seen = (*seen, fn)
    cells = []
    for cell in fn.__closure__ or ():
        try:
            cells.append(_value_key(cell.cell_contents, seen))
        except ValueError:  # an empty cell (a name not yet bound in the enclosing function)
            cells.append(("empty cell",))
    kwdefaults = sorted((fn.__kwdefaults__ or {}).items())
    return (
        fn.__code__,
        ByIdentity(fn.__globals__),
        tuple(cells),
        tuple(_value_key(v, seen) for v in fn.__defaults__ or ()),
        tuple((k, _value_key(v, seen)) for k, v in kwdefaults),
    )


def function_key(fn) -> Any:
    """A hashable key under which equal keys mean the same computation.

    For a plain function or lambda: its code object, its globals (by identity), its defaults
    and the values its closure captured — hashable ones by value and type, others (arrays,
    dicts, models) by identity, captured functions by their own key. Two lambdas written at
    the same place capturing equal values get equal keys; capturing different values, or
    written elsewhere, they do not. For any other callable: the object itself (with its type) if
    hashable, else its identity.
    """
    return _value_key(fn, ())


class StableFunction:
    """A callable compared and hashed by :func:`function_key` of the function it wraps.

    As a static ``jit`` argument, a fresh ``lambda`` with the same code and captured values as
    one seen before reuses that compiled program instead of compiling again.
    """

    __slots__ = ("fn", "key", "_hash")

    def __init__(self, fn):
        self.fn = fn.fn if isinstance(fn, StableFunction) else fn
        self.key = function_key(self.fn)
        self._hash = hash(self.key)

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return isinstance(other, StableFunction) and (self.fn is other.fn or self.key == other.key)

    def __repr__(self):
        return f"StableFunction({self.fn!r})"


def hashable(value):
    """A static-argument form of ``value``: functions keyed by :func:`function_key`, other
    hashable values as they are, unhashable ones compared by identity."""
    if isinstance(value, types.FunctionType):
        return StableFunction(value)
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
    if isinstance(fn, functools.partial):
        # A Partial's function is in its treedef: keyed, a fresh lambda bound there matches too.
        func = StableFunction(fn.func) if isinstance(fn.func, types.FunctionType) else fn.func
        fn = jax.tree_util.Partial(func, *fn.args, **fn.keywords)
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


def _unwrap(static_leaf):
    if isinstance(static_leaf, ByIdentity):
        return static_leaf.obj
    return static_leaf.fn if isinstance(static_leaf, StableFunction) else static_leaf


def combine_callable(arrays, static):
    """The inverse of :func:`partition_callable`."""
    treedef, rest = static
    leaves = [a if s is None else _unwrap(s) for a, s in zip(arrays, rest, strict=True)]
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
