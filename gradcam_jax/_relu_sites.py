"""Which equations of a jaxpr are ReLUs: the site finder of the guided / deconv rule sets (:mod:`._rules`).

A **ReLU site** is a floating-point ``max(x, 0)`` / ``max(0, x)`` or ``clamp(0, x, c)`` (what
``jax.nn.relu``, ``relu6``, ``jnp.maximum(x, 0)`` and ``jnp.clip(x, 0, c)`` are made of) whose
operand ``x`` is an *activation*, not a *second-moment statistic*.

Why: normalisation layers clamp a variance at zero to absorb rounding —
``max(0, mean(x**2) - mean(x)**2)`` in ``flax.linen.LayerNorm`` / ``GroupNorm`` / ``BatchNorm``
and ``nnx.LayerNorm``, ``max(0, var(x))`` in ``eqx.nn.LayerNorm`` / ``GroupNorm``. That clamp is
a numerical guard on a value that is non-negative by construction, not a rectifier; counting it
made Guided Backprop on a LayerNorm + GELU model (a ViT, a ConvNeXt) silently return
"guided" gradients instead of refusing.

How: every variable gets a *kind*, propagated forward through the jaxpr (into ``jit`` and
custom-derivative calls too) by the jaxpr walker of :mod:`._engine` under the :data:`ANALYSIS`
rule set, whose values are the kinds:

* ``fixed``: does not depend on the inputs (literals, scalar constants, what is computed from
  them alone);
* ``square``: a square of anything (``square``, ``abs``, an even power, ``x * x``),
  and products, quotients, sums and differences of squares;
* ``moment``: a reduction (``reduce_sum`` / ``max`` / ``min``) of a square — a mean of squares,
  ``mean((x - mean(x))**2)``, a squared norm — and what is computed from moments, squares and
  fixed values by shape operations, ``sqrt``/``rsqrt``, products, quotients, sums and
  differences (``mean(x**2) - mean(x)**2``), selections and bounds;
* ``activation``: everything else — the inputs and weights, and the output of any other
  operation (``dot_general``, ``conv``, ``tanh``, ``scan``...) or of any of the above with an
  activation among its inputs. A moment shifted by a fixed value (``1 - |x - c|**2``) is an
  activation again: it can be negative, and clamping it rectifies.

A clamp at 0 of a ``moment`` is not a ReLU. Everything else stays one: a ReLU after a ``Dense``
/ ``Conv`` / norm layer, after a global average pool, in a squeeze-and-excitation block.

Limits: a rectifier applied directly to a moment or a difference of moments
(``relu(mean(x**2) - mean(y**2))``) is not counted — it would read as a guarded variance. A
variance computed through ``dot_general`` (an ``einsum`` of a centred tensor with itself) is an
activation here, so its clamp still counts as a ReLU. The operands of a ``scan`` / ``while`` /
``cond`` body are taken as activations: a norm layer inside a scanned block is recognised (its
variance is computed in the body), a moment computed outside and clamped inside is not.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from ._engine import CALLS, Frame, RuleSet, closed_parts, evaluate, sub_closed

__all__ = [
    "ANALYSIS",
    "Facts",
    "analyse",
    "count_relus",
    "enters_call",
    "relu_operand",
]

FIXED, ACTIVATION, SQUARE, MOMENT = "fixed", "activation", "square", "moment"

_CUSTOM = {"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr", "custom_lin"}
# What jax.nn.relu / relu6 / clip are made of: a custom-derivative function built only from
# these is a (clipped) ReLU and gets our rule; any other one (softplus = logaddexp(x, 0),
# mish, celu...) keeps its own derivative even though it contains a max(x, 0).
_PURE_CLIP_OPS = {
    "max",
    "min",
    "clamp",
    "jit",
    "pjit",
    "closed_call",
    "convert_element_type",
    "broadcast_in_dim",
}
_SHAPE_OPS = {"convert_element_type", "broadcast_in_dim", "reshape", "squeeze", "expand_dims"}

_REDUCTIONS = {"reduce_sum", "reduce_max", "reduce_min"}
_SQUARING = {"square", "abs"}
# Operations through which a square / moment stays one: shape changes, its root, and products,
# quotients, selections, bounds with fixed values or other squares and moments (a variance is
# ``mean(x**2) - mean(x)**2``, ``sum((x - m)**2) / n``, ``where(n > 0, ..., nan)``). A shift by a
# fixed value (``1 - |x - c|**2``) makes an activation again.
_KEEPING = _SHAPE_OPS | {
    "transpose", "copy", "copy_p", "reduce_precision", "sqrt", "rsqrt", "psum", "pmax", "pmin",
    "mul", "div", "select_n", "max", "min", "add", "sub",
}  # fmt: skip
_SHIFTS = {"add", "sub"}


def _kept(name: str, kinds: list[str]) -> str:
    """The kind of the output of a ``_KEEPING`` operation (not all of whose inputs are fixed)."""
    moving = set(kinds) - {FIXED}
    if not moving <= {SQUARE, MOMENT} or (name in _SHIFTS and FIXED in kinds):
        return ACTIVATION
    return MOMENT if MOMENT in moving else SQUARE


def _squares(eqn, ins) -> bool:
    name = eqn.primitive.name
    if name in _SQUARING:
        return True
    if name == "integer_pow":
        return eqn.params["y"] % 2 == 0
    if name == "pow":  # x ** 2.0
        y = ins[1]
        return y is not None and y.size == 1 and float(y.reshape(())) % 2 == 0
    return name == "mul" and isinstance(eqn.invars[0], jcore.Var) and eqn.invars[0] is eqn.invars[1]


def _eqn_kinds(eqn, kinds: list[str], ins: list[Any]) -> list[str]:
    """The kinds of an equation's outputs, given its inputs' kinds (and known values)."""
    n, name = len(eqn.outvars), eqn.primitive.name
    if name in CALLS and sub_closed(eqn) is not None:
        return analyse(sub_closed(eqn), ins, kinds)[1]
    if all(k == FIXED for k in kinds):
        return [FIXED] * n
    if name in _REDUCTIONS:
        return [MOMENT if kinds[0] in (SQUARE, MOMENT) else ACTIVATION] * n
    if _squares(eqn, ins):
        return [MOMENT if kinds[0] == MOMENT else SQUARE] * n
    if name in _KEEPING:
        return [_kept(name, kinds)] * n
    return [ACTIVATION] * n


# --------------------------------------------------------------------------------------------
# Known values (the zero of a ReLU, its clip) and kinds, tracked through a jaxpr
# --------------------------------------------------------------------------------------------


def _concrete(c):
    """The value of a scalar constant (a possible ReLU threshold); None for anything else.

    Only scalars are read: a model's weights captured as constants stay on the device.
    """
    if isinstance(c, jax.core.Tracer) or getattr(c, "size", None) != 1:
        return None
    try:
        return np.asarray(c)
    except Exception:  # not an array value
        return None


def _is_zero(val) -> bool:
    return val is not None and val.size > 0 and bool(np.all(val == 0))


class Facts:
    """What is known of a jaxpr's variables before it runs: constant values and kinds.

    ``known_args`` / ``kind_args`` describe the jaxpr's inputs (a call's operands as seen by
    the caller); inputs without them are unknown activations.
    """

    def __init__(self, jaxpr, consts, known_args=None, kind_args=None):
        self.known: dict[Any, Any] = {}
        self.kinds: dict[Any, str] = {}
        for v, c in zip(jaxpr.constvars, consts, strict=False):
            k = _concrete(c)
            if k is not None:
                self.known[v] = k
        for v, k in zip(jaxpr.invars, known_args or [], strict=False):
            if k is not None:
                self.known[v] = k
        for v, kind in zip(jaxpr.invars, kind_args or [], strict=False):
            self.kinds[v] = kind

    def value(self, v):
        if isinstance(v, jcore.Literal):
            return np.asarray(v.val)
        return self.known.get(v)

    def kind(self, v) -> str:
        if isinstance(v, jcore.Literal) or v in self.known:
            return FIXED
        return self.kinds.get(v, ACTIVATION)

    def read(self, eqn) -> tuple[list[Any], list[str]]:
        """The known values (None where unknown) and kinds of an equation's inputs."""
        return [self.value(v) for v in eqn.invars], [self.kind(v) for v in eqn.invars]

    def update(self, eqn, ins, kinds, out_kinds=None) -> None:
        """Record what ``eqn`` tells about its outputs."""
        if out_kinds is None:
            out_kinds = _eqn_kinds(eqn, kinds, ins)
        for v, kind in zip(eqn.outvars, out_kinds, strict=False):
            self.kinds[v] = kind
        self._propagate_known(eqn, ins)

    def _propagate_known(self, eqn, ins) -> None:
        """Track compile-time constants through the shape ops that build a broadcast zero."""
        if eqn.primitive.name not in _SHAPE_OPS or len(eqn.outvars) != 1 or not ins:
            return
        if any(i is None for i in ins):
            return
        val = ins[0]
        if val.size == 1 or _is_zero(val):
            out_aval = eqn.outvars[0].aval
            scalar = val.reshape(()) if val.size == 1 else val.flat[0]
            self.known[eqn.outvars[0]] = np.broadcast_to(scalar, out_aval.shape).astype(out_aval.dtype)


# --------------------------------------------------------------------------------------------
# ReLU sites and their count
# --------------------------------------------------------------------------------------------


def relu_operand(eqn, ins, kinds) -> int | None:
    """Where ``eqn`` is a ReLU site, the index of its rectified operand; None elsewhere.

    A site: a float ``max(x, 0)`` / ``max(0, x)`` / ``clamp(0, x, c)`` whose ``x`` is not a moment.
    """
    name = eqn.primitive.name
    if name not in ("max", "clamp") or not eqn.outvars:
        return None
    if not jnp.issubdtype(eqn.outvars[0].aval.dtype, jnp.floating):
        return None  # integer clamps (index arithmetic) are not activations
    if name == "max":
        if len(ins) != 2 or _is_zero(ins[0]) == _is_zero(ins[1]):
            return None
        operand = 1 if _is_zero(ins[0]) else 0
    elif _is_zero(ins[0]):
        operand = 1
    else:
        return None
    return None if kinds[operand] == MOMENT else operand  # a norm layer's clamped variance: no rectifier


def _is_pure_clip(jaxpr) -> bool:
    jaxpr, _ = closed_parts(jaxpr)
    for eqn in jaxpr.eqns:
        if eqn.primitive.name not in _PURE_CLIP_OPS:
            return False
        sub = sub_closed(eqn)
        if sub is not None and not _is_pure_clip(sub):
            return False
    return True


def enters_call(eqn) -> bool:
    """Whether the rewrite goes inside this call-like equation."""
    if eqn.primitive.name not in CALLS or sub_closed(eqn) is None:
        return False
    return eqn.primitive.name not in _CUSTOM or _is_pure_clip(sub_closed(eqn))


class _Count:
    def __init__(self):
        self.n = 0


def _enter(frame: Frame) -> None:
    known, kinds = frame.extra
    frame.state = Facts(frame.jaxpr, frame.consts, known, kinds)


def _analyse_eqn(frame: Frame, eqn, invals) -> list[str]:
    """The analysis rule (every primitive): count the ReLU sites; the outputs' kinds are the values."""
    facts: Facts = frame.state
    ins, kinds = facts.read(eqn)
    sub = sub_closed(eqn) if eqn.primitive.name in CALLS else None
    if relu_operand(eqn, ins, kinds) is not None:
        frame.ctx.n += 1
        out_kinds = _eqn_kinds(eqn, kinds, ins)
    elif sub is not None:
        inner = _Count()
        out_kinds = evaluate(ANALYSIS, sub, kinds, inner, (ins, kinds))
        frame.ctx.n += inner.n if enters_call(eqn) else 0
    else:
        frame.ctx.n += sum(count_relus(s) for s in jcore.jaxprs_in_params(eqn.params))
        out_kinds = _eqn_kinds(eqn, kinds, ins)
    facts.update(eqn, ins, kinds, out_kinds)
    return [facts.kind(v) for v in eqn.outvars]


# The ReLU-site analysis as a rule set of the jaxpr walker: a variable's value is its kind.
ANALYSIS = RuleSet(
    "relu-sites",
    fallback=_analyse_eqn,
    literal=lambda frame, val: FIXED,
    const=lambda frame, val: FIXED if _concrete(val) is not None else ACTIVATION,
    enter=_enter,
)


def analyse(closed, known_args=None, kind_args=None) -> tuple[int, list[str]]:
    """``(number of ReLU sites, kinds of the outputs)`` of a jaxpr, sub-jaxprs included."""
    jaxpr, _ = closed_parts(closed)
    n = len(jaxpr.invars)
    known = list(known_args or []) + [None] * (n - len(known_args or []))
    kinds = list(kind_args or []) + [ACTIVATION] * (n - len(kind_args or []))
    args = [FIXED if k is not None else kind for k, kind in zip(known[:n], kinds[:n], strict=True)]
    count = _Count()
    out_kinds = evaluate(ANALYSIS, closed, args, count, (known_args, kind_args))
    return count.n, out_kinds


def count_relus(jaxpr, known_args: list[Any] | None = None) -> int:
    """How many ReLU sites a jaxpr holds, sub-jaxprs included (see the module's docstring).

    Custom-derivative functions count only when they are a (clipped) ReLU themselves; the clamp
    of a variance inside a normalisation layer is not a ReLU.
    """
    return analyse(jaxpr, known_args)[0]
