"""The operation patterns of attention: a softmax, and its contraction with values.

A softmax is ``exp(s - max) / sum(exp(s - max))`` over one axis, whatever wrote it; it is
attention when its result reaches a ``dot_general`` over that axis whose other operand depends
on the explained input (the values), through casts, layout changes and dropout.
"""

from __future__ import annotations

from ._jaxpr import closed_parts, depends, is_var, sub_invars, sub_jaxprs

__all__ = ["producers_of", "strip_casts", "softmax_axis", "contracted"]

# Operations an attention matrix passes through on its way to the value contraction: casts,
# layout changes, dropout (a multiply, a where, a rescale), sharding annotations.
_PASS = frozenset(
    {
        "convert_element_type", "reduce_precision", "copy", "copy_p", "transpose", "reshape",
        "broadcast_in_dim", "squeeze", "expand_dims", "mul", "div", "select_n", "slice",
        "dynamic_slice", "sharding_constraint", "optimization_barrier",
    }
)  # fmt: skip
_CASTS = frozenset({"convert_element_type", "reduce_precision", "copy", "copy_p"})


def producers_of(jaxpr) -> dict:
    return {v: eqn for eqn in jaxpr.eqns for v in eqn.outvars}


def strip_casts(v, producers, through=_CASTS):
    while is_var(v) and v in producers and producers[v].primitive.name in through:
        v = producers[v].invars[0]
    return v


def softmax_axis(eqn, producers) -> int | None:
    """The axis of a ``div`` that is a softmax ``exp(s) / sum(exp(s), axis)``, else ``None``."""
    if eqn.primitive.name != "div" or len(eqn.invars) != 2 or not all(is_var(v) for v in eqn.invars):
        return None
    num = strip_casts(eqn.invars[0], producers)
    if num not in producers or producers[num].primitive.name != "exp":
        return None
    den = strip_casts(eqn.invars[1], producers, _CASTS | {"broadcast_in_dim", "reshape", "expand_dims"})
    if den not in producers or producers[den].primitive.name != "reduce_sum":
        return None
    total = producers[den]
    axes = tuple(total.params["axes"])
    if len(axes) != 1 or strip_casts(total.invars[0], producers) is not num:
        return None
    if len(eqn.outvars[0].aval.shape) < 2:
        return None
    return int(axes[0])


def _consumers(jaxpr) -> dict:
    found: dict = {}
    for eqn in jaxpr.eqns:
        for pos, v in enumerate(eqn.invars):
            if is_var(v):
                found.setdefault(v, []).append((eqn, pos))
    return found


def _from_input(labels, v) -> bool:
    return is_var(v) and "in" in labels.get(v, ())


def contracted(jaxpr, labels, var, n_key: int, parents: tuple, seen: set | None = None) -> bool:
    """Whether ``var`` is contracted with *values* — a ``dot_general`` over an axis of size
    ``n_key`` whose other operand depends on the input — after casts, layout changes and
    dropout (a product or selection with something that does not depend on the input), into
    and out of sub-jaxprs. ``labels``: the input dependence in ``jaxpr`` (see :func:`depends`);
    ``parents``: the enclosing ``(jaxpr, labels, eqn)``, innermost last."""
    seen = set() if seen is None else seen
    consumers = _consumers(jaxpr)
    todo = [var]
    while todo:
        v = todo.pop()
        if (id(jaxpr), v) in seen:
            continue
        seen.add((id(jaxpr), v))
        for eqn, pos in consumers.get(v, []):
            if _reaches(eqn, pos, v, n_key, jaxpr, labels, parents, seen):
                return True
            others = [u for j, u in enumerate(eqn.invars) if j != pos]
            if eqn.primitive.name in _PASS and not any(_from_input(labels, u) for u in others):
                todo.extend(eqn.outvars)
        if parents and v in jaxpr.outvars:  # leaves this sub-jaxpr: continue outside
            outer, outer_labels, eqn = parents[-1]
            j = list(jaxpr.outvars).index(v)
            if j < len(eqn.outvars) and contracted(
                outer, outer_labels, eqn.outvars[j], n_key, parents[:-1], seen
            ):
                return True
    return False


def _reaches(eqn, pos, v, n_key, jaxpr, labels, parents, seen) -> bool:
    if eqn.primitive.name == "dot_general":
        dims = eqn.params["dimension_numbers"][0][pos]
        values = eqn.invars[1 - pos]
        return any(v.aval.shape[d] == n_key for d in dims) and _from_input(labels, values)
    for k, sub in enumerate(sub_jaxprs(eqn)):
        inner, _ = closed_parts(sub)
        pairs = sub_invars(eqn, k)
        inner_labels = depends(inner, {sv for p, sv in pairs if _from_input(labels, eqn.invars[p])})
        for p, sv in pairs:
            if p == pos and contracted(
                inner, inner_labels, sv, n_key, (*parents, (jaxpr, labels, eqn)), seen
            ):
                return True
    return False
