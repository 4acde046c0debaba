"""The one jaxpr walker: evaluate a closed jaxpr equation by equation under a rule set.

Every program transformation of the package that re-runs a model's jaxpr goes through
:func:`evaluate`: Guided Backprop / Deconvnet (:mod:`._rules`: each ReLU site replaced by a
``custom_vjp`` ReLU) and the relevance tape of LRP / DeepLIFT (:mod:`.attribution._tape`: each
image-dependent equation recorded as a node). A :class:`RuleSet` says what a *value* is (an
array, a tape id...) and, per primitive name, what an equation does with its inputs' values.

The walker handles what every rule set needs alike: literals and constants (through the rule
set's ``literal`` / ``const``), the environment of variables, dropped outputs, and, for the
rules that want them, re-entering sub-jaxprs under the same rule set:

* :func:`inline_call`: ``jit`` / ``pjit`` / ``closed_call``, ``custom_jvp`` / ``custom_vjp``
  calls (their custom rule dropped), ``remat`` / ``checkpoint`` (kept as ``jax.checkpoint``);
* :func:`rerun_scan`, :func:`rerun_while`, :func:`rerun_cond`: the loop or ``switch`` rebuilt
  with ``lax.scan`` / ``lax.while_loop`` / ``lax.switch`` around bodies evaluated by the rule set
  (``lax.platform_dependent`` is a ``cond`` too; rule sets that read one branch of it use
  :func:`evaluate` on that branch).

A rule is ``rule(frame, eqn, invals) -> list | None``: the equation's output values, or ``None``
for the default (:func:`bind_eqn`: the primitive applied unchanged, in the equation's context).

Example: a rule table that doubles every ``sin``:

>>> import jax, jax.numpy as jnp
>>> twice = RuleSet("twice", {"sin": lambda fr, eqn, v: [2 * jnp.sin(v[0])]})
>>> closed = jax.make_jaxpr(lambda x: jnp.sin(x) + 1.0)(0.5)
>>> round(float(evaluate(twice, closed, [0.5])[0]), 4)
1.9589
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
from jax.extend import core as jcore

__all__ = [
    "CALLS",
    "Frame",
    "RuleSet",
    "Rule",
    "bind",
    "bind_eqn",
    "closed_parts",
    "evaluate",
    "inline_call",
    "rerun_cond",
    "rerun_scan",
    "rerun_while",
    "sub_closed",
]

# Call-like primitives: one sub-jaxpr, evaluated in place of the equation.
CALLS = {
    "pjit",
    "jit",
    "closed_call",
    "core_call",
    "remat2",
    "checkpoint",
    "remat",
    "custom_jvp_call",
    "custom_vjp_call",
    "custom_vjp_call_jaxpr",
    "custom_lin",
}
_REMAT = ("remat2", "checkpoint", "remat")


def closed_parts(c):
    """``(jaxpr, consts)`` of a ClosedJaxpr, or of a bare Jaxpr (no consts)."""
    return (c.jaxpr, list(c.consts)) if isinstance(c, jcore.ClosedJaxpr) else (c, [])


def sub_closed(eqn):
    """The single sub-jaxpr of a call-like equation (a Jaxpr or ClosedJaxpr), or None."""
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        if key in eqn.params:
            return eqn.params[key]
    return None


def bind(prim, params, invals) -> list:
    """Apply a primitive to values, as the equation ``(prim, params)`` would."""
    bp = prim.get_bind_params(params)
    subfuns = []
    if isinstance(bp, tuple):  # older JAX: (subfuns, params)
        subfuns, bp = bp
    out = prim.bind(*subfuns, *invals, **bp)
    return list(out) if prim.multiple_results else [out]


def bind_eqn(eqn, invals) -> list:
    """The equation applied unchanged to ``invals`` (arrays or tracers), in its context."""
    with eqn.ctx.manager:
        return bind(eqn.primitive, eqn.params, invals)


def _same(x):
    return x


class Frame:
    """One jaxpr being evaluated: its equations' environment and the rule set's state for it.

    ``ctx`` is shared by every frame of one evaluation (a counter, a tape); ``extra`` is what
    the caller passed down for this jaxpr (facts about its arguments); ``state`` is the rule
    set's own, set by its ``enter`` hook.
    """

    __slots__ = ("rules", "jaxpr", "consts", "ctx", "extra", "env", "state")

    def __init__(self, rules: RuleSet, jaxpr, consts, ctx, extra):
        self.rules, self.jaxpr, self.consts, self.ctx, self.extra = rules, jaxpr, consts, ctx, extra
        self.env: dict[Any, Any] = {}
        self.state: Any = None

    def read(self, v):
        """A variable's value (a literal through the rule set's ``literal``)."""
        return self.rules.literal(self, v.val) if isinstance(v, jcore.Literal) else self.env[v]


Rule = Callable[[Frame, Any, list], "list | None"]


@dataclasses.dataclass(frozen=True)
class RuleSet:
    """A per-primitive rule table and the hooks that make a value of a walker.

    Attributes:
        name: for messages.
        rules: primitive name -> rule; a rule returns the output values or ``None`` (bind).
        fallback: the rule of primitives not in ``rules`` (``None``: bind them).
        literal: ``(frame, value) -> value`` for a literal operand.
        const: ``(frame, array) -> value`` for a closed-over constant.
        enter: ``(frame) -> None``, called when a jaxpr starts (set ``frame.state``).
        after: ``(frame, eqn, outs) -> None``, called after each equation.
    """

    name: str
    rules: Mapping[str, Rule] = dataclasses.field(default_factory=dict)
    fallback: Rule | None = None
    literal: Callable[[Frame, Any], Any] = lambda frame, val: val
    const: Callable[[Frame, Any], Any] = lambda frame, val: val
    enter: Callable[[Frame], None] | None = None
    after: Callable[[Frame, Any, list], None] | None = None


def evaluate(rules: RuleSet, closed, args, ctx=None, extra=None) -> list:
    """The outputs of the (closed) jaxpr ``closed`` on ``args`` with each equation under ``rules``.

    Args:
        rules: the rule set.
        closed: a ``ClosedJaxpr`` (or a bare ``Jaxpr``).
        args: one value per input variable.
        ctx: state shared by every frame of this evaluation (``frame.ctx``).
        extra: what the caller knows of ``args`` (``frame.extra``).

    Returns:
        One value per output variable.
    """
    jaxpr, consts = closed_parts(closed)
    frame = Frame(rules, jaxpr, consts, ctx, extra)
    for v, c in zip(jaxpr.constvars, consts, strict=True):
        frame.env[v] = rules.const(frame, c)
    for v, a in zip(jaxpr.invars, args, strict=True):
        frame.env[v] = a
    if rules.enter is not None:
        rules.enter(frame)
    table, fallback = rules.rules, rules.fallback
    for eqn in jaxpr.eqns:
        invals = [frame.read(v) for v in eqn.invars]
        rule = table.get(eqn.primitive.name, fallback)
        outs = rule(frame, eqn, invals) if rule is not None else None
        if outs is None:
            outs = bind_eqn(eqn, invals)
        if rules.after is not None:
            rules.after(frame, eqn, outs)
        for v, o in zip(eqn.outvars, outs, strict=True):
            if not isinstance(v, jcore.DropVar):
                frame.env[v] = o
    return [frame.read(v) for v in jaxpr.outvars]


def inline_call(frame: Frame, eqn, invals, extra=None, remat: bool = True) -> list:
    """A call-like equation's sub-jaxpr evaluated under the same rules, in place of the call.

    A custom derivative rule is dropped (the rules inside apply instead); with ``remat``,
    ``remat`` / ``checkpoint`` keeps its policy (the inlined body is wrapped in
    ``jax.checkpoint``; only for rule sets whose values are arrays).
    """

    def inner(*a):
        return evaluate(frame.rules, sub_closed(eqn), list(a), frame.ctx, extra)

    if remat and eqn.primitive.name in _REMAT:
        inner = jax.checkpoint(
            inner, policy=eqn.params.get("policy"), prevent_cse=eqn.params.get("prevent_cse", True)
        )
    return list(inner(*invals))


def rerun_scan(frame: Frame, eqn, invals) -> list:
    """A ``scan`` rebuilt with ``lax.scan`` around its body evaluated under the same rules."""
    p = eqn.params
    nc, ncarry = p["num_consts"], p["num_carry"]
    consts, init, xs = invals[:nc], invals[nc : nc + ncarry], invals[nc + ncarry :]

    def step(carry, x):
        out = evaluate(frame.rules, p["jaxpr"], list(consts) + list(carry) + list(x), frame.ctx)
        return out[:ncarry], out[ncarry:]

    carry, ys = jax.lax.scan(
        step, list(init), list(xs), length=p["length"], reverse=p["reverse"], unroll=p.get("unroll", 1)
    )
    return list(carry) + list(ys)


def rerun_while(frame: Frame, eqn, invals) -> list:
    """A ``while`` rebuilt with ``lax.while_loop`` around bodies evaluated under the same rules."""
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts, init = invals[:cn], invals[cn : cn + bn], invals[cn + bn :]

    def cond(carry):
        return evaluate(frame.rules, p["cond_jaxpr"], list(cconsts) + list(carry), frame.ctx)[0]

    def body(carry):
        return evaluate(frame.rules, p["body_jaxpr"], list(bconsts) + list(carry), frame.ctx)

    return list(jax.lax.while_loop(cond, body, list(init)))


def rerun_cond(frame: Frame, eqn, invals) -> list:
    """A ``cond`` rebuilt with ``lax.switch`` around branches evaluated under the same rules."""
    index, ops = invals[0], invals[1:]
    branches = [
        (lambda *a, b=b: evaluate(frame.rules, b, list(a), frame.ctx)) for b in eqn.params["branches"]
    ]
    return list(jax.lax.switch(index, branches, *ops))
