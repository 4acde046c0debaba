"""A small jaxpr walker of our own: sub-jaxprs, how values enter them, binding, dependence.

The attention package reads a model's computation as a jaxpr (``jax.make_jaxpr``) and
evaluates it again with probes added. This module holds the pieces every pass needs, for the
primitives that carry sub-jaxprs: ``jit``/``pjit``, ``closed_call``, ``remat``/``checkpoint``,
``custom_jvp_call``, ``custom_vjp_call``, ``scan``, ``cond`` and ``while``. It is kept apart
from the rule engine's evaluator (its passes thread probes and dependence labels through the
walk), but the primitive tables and the binding step are the engine's (:mod:`.._engine`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from jax.extend import core as jcore

from .._engine import CALLS, bind_eqn, closed_parts

__all__ = [
    "CALLS",
    "REMAT",
    "closed_parts",
    "sub_jaxprs",
    "sub_invars",
    "bind_eqn",
    "read_env",
    "is_var",
    "depends",
]

REMAT = frozenset({"remat2", "remat", "checkpoint"})

# Where each primitive keeps its sub-jaxprs (in a fixed order: a path step indexes this list).
_KEYS = {
    "scan": ("jaxpr",),
    "while": ("cond_jaxpr", "body_jaxpr"),
    "cond": ("branches",),
}
_CALL_KEYS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


def sub_jaxprs(eqn) -> list:
    """The sub-jaxprs of an equation (``ClosedJaxpr`` or ``Jaxpr``), in a fixed order."""
    name = eqn.primitive.name
    params = eqn.params
    if name in _KEYS:
        found: list = []
        for key in _KEYS[name]:
            value = params[key]
            found.extend(value if isinstance(value, (tuple, list)) else [value])
        return found
    for key in _CALL_KEYS:
        value = params.get(key)
        if isinstance(value, (jcore.ClosedJaxpr, jcore.Jaxpr)):
            return [value]
    return []


def sub_invars(eqn, k: int) -> list[tuple[int, Any]]:
    """``(position in eqn.invars, sub-jaxpr invar)`` pairs: how the equation's inputs enter
    its ``k``-th sub-jaxpr."""
    jaxpr, _ = closed_parts(sub_jaxprs(eqn)[k])
    name = eqn.primitive.name
    start = 0
    if name == "cond":
        start = 1  # the branch index
    elif name == "while":
        cn, bn = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
        if k == 0:
            positions = list(range(cn)) + list(range(cn + bn, len(eqn.invars)))
        else:
            positions = list(range(cn, len(eqn.invars)))
        return list(zip(positions, jaxpr.invars, strict=True))
    n = len(jaxpr.invars)
    return list(zip(range(start, start + n), jaxpr.invars, strict=True))


def is_var(v) -> bool:
    return isinstance(v, jcore.Var) and not isinstance(v, jcore.Literal)


def read_env(env: dict, v):
    return v.val if isinstance(v, jcore.Literal) else env[v]


def depends(jaxpr, sources_in: Iterable, sources_eqn: dict[int, frozenset] | None = None) -> dict:
    """Forward dependence: each variable of ``jaxpr`` -> the labels it depends on.

    ``sources_in`` are invars of ``jaxpr`` (label ``"in"``); ``sources_eqn`` maps an equation
    index to extra labels its outputs carry (an attention site, or a call or loop holding one).
    An equation's outputs carry the union of its inputs' labels: coarse through sub-jaxprs
    (every output of a call or loop carries every label of its inputs), which is what the
    callers need.
    """
    labels: dict[Any, frozenset] = {v: frozenset({"in"}) for v in sources_in}
    for i, eqn in enumerate(jaxpr.eqns):
        got: set = set()
        for v in eqn.invars:
            if is_var(v):
                got |= labels.get(v, frozenset())
        if sources_eqn and i in sources_eqn:
            got |= sources_eqn[i]
        frozen = frozenset(got)
        for v in eqn.outvars:
            labels[v] = frozen
    return labels
