"""What the relevance tape can tell from the program alone, to make the LRP rules cheaper.

* :func:`fold`: a layer's weights with its per-output-feature scale folded in (``A W``), so a
  modified copy (``(A W)+``) is one convolution;
* :func:`nonnegative`: the values known to be ``>= 0`` (ReLU outputs, their pooling, reshapes
  and sums), whose layers need no ``x-`` half in the z+ / gamma / alpha-beta rules;
* :func:`is_relu_call`: whether a called function is a ReLU (``jax.nn.relu``).

The tape (:mod:`._tape`) is duck-typed here: nodes have ``kind``, ``name``, ``ins``, ``outs``,
``relu`` and ``params``; tapes ``nodes``, ``vals`` and ``active``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from .._engine import CALLS, closed_parts, sub_closed

__all__ = ["fold", "nonnegative", "is_relu_call", "known_nonneg"]


def fold(node, x_pos: int, weight, A, z_shape):
    """``A W``: the layer's weights with the scale ``A`` folded in, when ``A`` is one number per
    output feature (a bias-free scale: a folded batch norm, the ``1/n`` of a mean); else ``None``.

    Then ``A * L(x; W) = L(x; A W)`` and every modified copy (``(A W)+``, ``A W + gamma (A W)+``)
    is one convolution / matrix product instead of ``A+ L(x; W+) + A- L(x; W-)``.
    """
    if weight is None:
        return None
    a_shape = (1,) * (len(z_shape) - A.ndim) + A.shape
    if node.kind == "conv":
        dn = node.params["dimension_numbers"]
        if node.params.get("batch_group_count", 1) != 1 or x_pos != 0:
            return None
        z_axis, w_axis = dn.out_spec[1], dn.rhs_spec[0]
    else:
        (_, rc), (lb, _) = node.params["dimension_numbers"]
        free = [d for d in range(weight.ndim) if d not in rc]
        if x_pos != 0 or lb or len(free) != 1:
            return None
        z_axis, w_axis = len(z_shape) - 1, free[0]
    if any(n != 1 for d, n in enumerate(a_shape) if d != z_axis):
        return None
    a = jnp.broadcast_to(A.reshape(a_shape[z_axis]), (weight.shape[w_axis],))
    shape = [1] * weight.ndim
    shape[w_axis] = weight.shape[w_axis]
    return weight * a.reshape(shape).astype(weight.dtype)


def is_relu_call(sub) -> bool:
    """Whether a call's output is ``max(v, c)`` with a constant ``c >= 0`` (``jax.nn.relu``)."""
    jaxpr, consts = closed_parts(sub)
    out = jaxpr.outvars[0]
    for eqn in jaxpr.eqns:
        if out not in eqn.outvars:
            continue
        inner = sub_closed(eqn) if eqn.primitive.name in CALLS else None
        if inner is not None:
            return is_relu_call(inner)
        if eqn.primitive.name == "max":
            return any(isinstance(v, jcore.Literal) and known_nonneg(v.val) for v in eqn.invars)
    return False


def known_nonneg(val) -> bool:
    """A concrete (not traced) value whose entries are all >= 0."""
    try:
        return bool(np.all(np.asarray(val) >= 0))
    except (TypeError, jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return False


_MONOTONE = {"add": ("add", "add_any"), "affine": ("mul", "div", "add")}  # >= 0 in, >= 0 constants: >= 0 out


def nonnegative(tape) -> set[int]:
    """Ids of values known to be >= 0 from the program alone: ReLU outputs and their max / sum
    pooling, reshapes and sums (so the z+ rules can skip the ``x-`` half of a layer)."""
    known: set[int] = set()
    for node in tape.nodes:
        active = [i for i in node.ins if tape.active[i]]
        const = [tape.vals[i] for i in node.ins if not tape.active[i]]
        if node.kind == "activation" and node.relu:
            ok = True
        elif node.kind == "activation" and node.name == "max":
            ok = any(known_nonneg(c) for c in const)
        elif node.kind in ("max", "sum", "structural") or node.name in _MONOTONE.get(node.kind, ()):
            ok = all(i in known for i in active) and all(known_nonneg(c) for c in const)
        else:
            ok = False
        if ok:
            known.update(node.outs)
    return known
