"""The relevance engine's tape: a model's jaxpr, flattened, with each equation's kind and layer.

:func:`record` traces ``f(image)`` to a jaxpr and evaluates it on the package's one jaxpr
walker (:mod:`gradcam_jax._engine`, under the :data:`RECORD` rule set), inlining ``jit`` /
custom derivative calls, into a flat list of :class:`Node` s — the equations that depend on the
image.
Each node gets a *kind* that the per-primitive rules of :mod:`.relevance` dispatch on:

* ``"conv"`` / ``"dense"``: ``conv_general_dilated`` / ``dot_general`` of the image-dependent
  operand with a constant one (the weights);
* ``"sum"``: a weightless linear reduction (``reduce_sum``, ``reduce_window_sum``: pooling);
* ``"affine"``: a product, quotient, sum or difference with a constant (a bias, a folded
  batch norm, the ``1/n`` of a mean); following a linear node (its only consumer), it joins
  that node's **layer** ``z = A * L(x) + C``;
* ``"add"``: a sum or difference of two image-dependent operands (a residual connection);
* ``"activation"``: an elementwise function of one image-dependent operand (``max(x, 0)``,
  ``tanh``, a ``jit``-ed ``gelu`` / ``silu``);
* ``"structural"``: reshapes, transposes, broadcasts, slices, pads, concatenations, casts;
* ``"max"``: max pooling (``reduce_window_max``, ``reduce_max``);
* anything else is ``"unsupported"`` and named in the error of a method that needs a rule for it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from .._engine import CALLS, Frame, RuleSet, bind, bind_eqn, closed_parts, evaluate, inline_call, sub_closed
from ._facts import fold, is_relu_call, nonnegative

__all__ = [
    "Node",
    "Layer",
    "Tape",
    "record",
    "RECORD",
    "replay",
    "all_tapes",
    "on_path",
    "node_vjp",
    "UNARY",
    "STRUCTURAL",
]

UNARY = {
    "max", "min", "clamp", "tanh", "logistic", "exp", "exp2", "log", "log1p", "expm1", "erf", "erfc",
    "integer_pow", "pow", "sqrt", "rsqrt", "cbrt", "abs", "sign", "sin", "cos", "tan", "atan",
    "square", "select_n", "erf_inv", "asinh", "sinh", "cosh", "floor", "ceil", "round",
}  # fmt: skip
_ELEMENTWISE = UNARY | {
    "mul", "div", "add", "sub", "neg", "convert_element_type", "broadcast_in_dim", "gt", "lt", "ge",
    "le", "eq", "ne", "and", "or", "not", "stop_gradient", "copy", "copy_p", "reduce_precision",
    "is_finite", "nextafter", "atan2",
}  # fmt: skip
STRUCTURAL = {
    "reshape", "transpose", "broadcast_in_dim", "squeeze", "expand_dims", "convert_element_type",
    "slice", "concatenate", "pad", "rev", "copy", "copy_p", "reduce_precision", "dynamic_slice",
    "dynamic_update_slice", "gather", "split",
}  # fmt: skip
_LINEAR = {"conv_general_dilated": "conv", "dot_general": "dense"}
_SUMS = {"reduce_sum", "reduce_window_sum"}
_MAXES = {"reduce_window_max", "reduce_max"}
_AFFINE = {"mul", "div", "add", "sub", "neg"}


class Node:
    """One image-dependent equation: its primitive, inputs / outputs (ids into ``Tape.vals``), kind."""

    __slots__ = ("prim", "params", "ins", "outs", "kind", "fn", "layer", "branches", "relu")

    def __init__(self, prim, params, ins, outs, kind, fn=None):
        self.prim, self.params, self.ins, self.outs, self.kind, self.fn = prim, params, ins, outs, kind, fn
        self.relu = False  # an activation call that is max(x, c), c >= 0
        self.layer: Layer | None = None
        self.branches: list[Tape] = []  # a cond's branches, each its own tape

    @property
    def name(self) -> str:
        return self.prim.name if self.prim is not None else "call"

    def apply(self, invals):
        if self.fn is not None:
            return [self.fn(*invals)]
        return bind(self.prim, self.params, invals)


class Layer:
    """``z = A * L(x; W) + C``: a linear node and the affine nodes it feeds, as one LRP layer.

    ``x_id`` / ``z_id`` are the ids of the layer's input and output; ``weight`` the constant
    operand (``None`` for a weightless reduction); ``A`` and ``C`` are arrays broadcastable to
    ``z``'s shape (usually one value per output feature, ``(1, 1, 1, C)``).
    """

    __slots__ = ("node", "x_pos", "z_id", "A", "C", "weight", "first", "folded", "nonneg")

    def __init__(self, node, x_pos, z_id, A, C, weight):
        self.node, self.x_pos, self.z_id, self.A, self.C, self.weight = node, x_pos, z_id, A, C, weight
        self.first = False
        self.folded = None  # A W when A scales whole output features (bias, batch norm), else None
        self.nonneg = False  # the input is known >= 0 (a ReLU's output, its pooling): x- = 0

    def linear(self, x, weight=None):
        """``L(x; weight)`` (the node's primitive with ``weight`` for its constant operand)."""
        node = self.node
        if node.kind == "sum":
            return node.apply([x])[0]
        invals = [None, None]
        invals[self.x_pos] = x
        invals[1 - self.x_pos] = self.weight if weight is None else weight
        return node.apply(invals)[0]


class Tape:
    """Values (by id), which of them depend on the image, and the image-dependent nodes in order."""

    def __init__(self):
        self.vals: list[Any] = []
        self.active: list[bool] = []
        self.nodes: list[Node] = []
        self.inputs: list[int] = []
        self.outputs: list[int] = []
        self.platform: set[int] = set()  # ids of lax.platform_dependent indices

    def new(self, val, active: bool) -> int:
        self.vals.append(val)
        self.active.append(active)
        return len(self.vals) - 1


def _is_elementwise_call(sub) -> bool:
    jaxpr, _ = closed_parts(sub)
    if len(jaxpr.outvars) != 1:
        return False
    for eqn in jaxpr.eqns:
        inner = sub_closed(eqn) if eqn.primitive.name in CALLS else None
        if inner is not None:
            if not _is_elementwise_call(inner):
                return False
        elif eqn.primitive.name not in _ELEMENTWISE:
            return False
    return True


def _is_activation_call(sub, eqn, active: list[bool]) -> bool:
    """A call of one image-dependent array to one array of its shape, made of elementwise ops."""
    if sum(active) != 1 or len(eqn.outvars) != 1:
        return False
    x = eqn.invars[active.index(True)]
    return eqn.outvars[0].aval.shape == x.aval.shape and _is_elementwise_call(sub)


def _kind(eqn, active_ins: list[bool]) -> str:
    name, n_active = eqn.primitive.name, sum(active_ins)
    if name in _LINEAR:
        return _LINEAR[name] if n_active == 1 else "unsupported"
    if name in _SUMS:
        return "sum"
    if name in _MAXES:
        return "max"
    if name in ("add", "sub", "add_any") and n_active == 2:
        return "add"
    if name in _AFFINE and n_active == 1 and not (name == "div" and active_ins[1]):
        return "affine"
    if name in STRUCTURAL:
        return "structural"
    if name in UNARY and n_active == 1 and not (name == "select_n" and active_ins[0]):
        return "activation"
    return "unsupported"


def _record_eqn(frame: Frame, eqn, ins: list[int]) -> list[int]:
    """The record rule (every primitive): bind the equation on the tape's values, and add a node
    when it depends on the image; calls are inlined, ``cond`` s and activation calls kept whole."""
    tape: Tape = frame.ctx
    active = [tape.active[i] for i in ins]
    invals = [tape.vals[i] for i in ins]
    name = eqn.primitive.name
    sub = sub_closed(eqn) if name in CALLS else None
    if not any(active):
        outs = [tape.new(o, False) for o in bind_eqn(eqn, invals)]
        if name == "platform_index":
            tape.platform.update(outs)
        return outs
    if name == "cond" and ins[0] in tape.platform:
        return _record_platform(frame, eqn, ins, active, invals)
    if sub is not None and _is_activation_call(sub, eqn, active):
        fn = _closed_fn(*closed_parts(sub))
        outs = [tape.new(fn(*invals), True)]
        tape.nodes.append(Node(None, None, ins, outs, "activation", fn))
        tape.nodes[-1].relu = is_relu_call(sub)
        return outs
    if name == "cond" and not active[0]:
        return _record_cond(frame, eqn, ins, active, invals)
    if sub is not None:
        return inline_call(frame, eqn, ins, remat=False)
    outs = [tape.new(o, True) for o in bind_eqn(eqn, invals)]
    tape.nodes.append(Node(eqn.primitive, eqn.params, ins, outs, _kind(eqn, active)))
    return outs


RECORD = RuleSet(
    "record",
    fallback=_record_eqn,
    literal=lambda frame, val: frame.ctx.new(val, False),
    const=lambda frame, val: frame.ctx.new(val, False),
)


def _record_platform(frame: Frame, eqn, ins, active, invals) -> list[int]:
    """``lax.platform_dependent``: every branch computes the same function; read the plainest one.

    The plainest branch has the fewest equations (``conv_general_dilated`` rather than its
    unrolled taps). When it is one linear equation of the branch's operands, the node keeps that
    primitive's kind and rule, but evaluates (with modified weights too) through the whole
    ``platform_dependent`` call, so the platform's fast implementation runs (on CPU: ``im2col``
    for kernels larger than the map, the depthwise taps).
    """
    branch = min(eqn.params["branches"], key=lambda b: len(closed_parts(b)[0].eqns))
    jaxpr, _ = closed_parts(branch)
    only = jaxpr.eqns[0] if len(jaxpr.eqns) == 1 else None
    if (
        only is None
        or only.primitive.name not in _LINEAR
        or list(only.invars) != list(jaxpr.invars)
        or list(only.outvars) != list(jaxpr.outvars)
    ):
        return evaluate(RECORD, branch, ins[1:], ctx=frame.ctx)
    tape: Tape = frame.ctx
    index = invals[0]

    def call(*operands):
        with eqn.ctx.manager:
            return bind(eqn.primitive, eqn.params, [index, *operands])[0]

    outs = [tape.new(call(*invals[1:]), True)]
    tape.nodes.append(Node(only.primitive, only.params, ins[1:], outs, _kind(only, active[1:]), call))
    return outs


def _record_cond(frame: Frame, eqn, ins, active, invals) -> list[int]:
    """A ``cond`` whose index does not depend on the image: one tape per branch.

    The index is often traced but fixed (``lax.platform_dependent`` picks an implementation);
    relevance is propagated through every branch and the index's one is selected.
    """
    branches = []
    for branch in eqn.params["branches"]:
        sub = Tape()
        sub.inputs = [sub.new(v, a) for v, a in zip(invals[1:], active[1:], strict=True)]
        sub.outputs = evaluate(RECORD, branch, sub.inputs, ctx=sub)
        _find_layers(sub, first=False)
        branches.append(sub)
    tape: Tape = frame.ctx
    outs = [tape.new(o, True) for o in bind_eqn(eqn, invals)]
    node = Node(eqn.primitive, eqn.params, ins, outs, "cond")
    node.branches = branches
    tape.nodes.append(node)
    return outs


def _closed_fn(jaxpr, consts):
    run = jcore.jaxpr_as_fun(jcore.ClosedJaxpr(jaxpr, consts))

    def fn(*args):
        return run(*args)[0]

    return fn


def record(f, image) -> Tape:
    """The tape of ``f(image)`` (one array in, one array out), with its layers found."""
    closed = jax.make_jaxpr(f)(image)
    tape = Tape()
    tape.inputs = [tape.new(image, True)]
    tape.outputs = evaluate(RECORD, closed, tape.inputs, ctx=tape)
    _find_layers(tape)
    return tape


def _consumers(tape: Tape) -> dict[int, list[Node]]:
    users: dict[int, list[Node]] = {}
    for node in tape.nodes:
        for i in node.ins:
            users.setdefault(i, []).append(node)
    return users


def _affine_step(node: Node, tape: Tape, A, C):
    """``(A, C)`` after the affine node (``z -> a * z + c`` with its constant operand)."""
    name = node.name
    if name == "neg":
        return -A, -C
    x_first = tape.active[node.ins[0]]
    c = tape.vals[node.ins[1] if x_first else node.ins[0]]
    if name == "mul":
        return A * c, C * c
    if name == "div":
        return A / c, C / c
    if name == "add":
        return A, C + c
    return (A, C - c) if x_first else (-A, c - C)


def _find_layers(tape: Tape, first: bool = True) -> None:
    """Group each linear node with the affine nodes that follow it (each the only consumer);
    with ``first``, mark the first conv / dense layer."""
    users = _consumers(tape)
    nonneg = nonnegative(tape)
    for node in tape.nodes:
        if node.kind not in ("conv", "dense", "sum"):
            continue
        x_pos = 0 if tape.active[node.ins[0]] else 1
        weight = None if node.kind == "sum" else tape.vals[node.ins[1 - x_pos]]
        z = node.outs[0]
        dtype = tape.vals[z].dtype
        A, C = jnp.ones((), dtype), jnp.zeros((), dtype)
        while len(users.get(z, [])) == 1 and users[z][0].kind == "affine" and z not in tape.outputs:
            nxt = users[z][0]
            A, C = _affine_step(nxt, tape, A, C)
            nxt.kind = "absorbed"  # part of this layer: no rule of its own
            z = nxt.outs[0]
        node.layer = layer = Layer(node, x_pos, z, A, C, weight)
        layer.nonneg = node.ins[x_pos] in nonneg
        if tape.vals[z].shape == tape.vals[node.outs[0]].shape:
            layer.folded = fold(node, x_pos, weight, A, tape.vals[z].shape)
        if node.kind != "sum" and first:
            layer.first, first = True, False


def node_vjp(node: Node, tape: Tape, cotangents, vals=None):
    """The transpose (for linear nodes) or plain gradient of a node, for its image-dependent inputs.

    Returns one cotangent per input (``None`` for constant inputs).
    """
    vals = tape.vals if vals is None else vals
    active = [k for k, i in enumerate(node.ins) if tape.active[i]]
    invals = [vals[i] for i in node.ins]

    def f(*xs):
        full = list(invals)
        for k, v in zip(active, xs, strict=True):
            full[k] = v
        return node.apply(full)

    outs, pullback = jax.vjp(f, *[invals[k] for k in active])
    cts = [
        jnp.zeros_like(o) if c is None else c.astype(o.dtype) for o, c in zip(outs, cotangents, strict=True)
    ]
    grads = pullback(cts)
    result: list[Any] = [None] * len(node.ins)
    for k, g in zip(active, grads, strict=True):
        result[k] = g
    return result


def replay(tape: Tape, inputs: list[Any], into: dict[int, list[Any]] | None = None) -> dict[int, list[Any]]:
    """The values of ``tape`` (and of its nested branch tapes) for other ``inputs``, by ``id(tape)``."""
    into = {} if into is None else into
    vals = list(tape.vals)
    for i, v in zip(tape.inputs, inputs, strict=True):
        vals[i] = v
    for node in tape.nodes:
        invals = [vals[i] for i in node.ins]
        for branch in node.branches:
            replay(branch, invals[1:], into)
        for o, v in zip(node.outs, node.apply(invals), strict=True):
            vals[o] = v
    into[id(tape)] = vals
    return into


def all_tapes(tape: Tape):
    """``tape`` and every branch tape inside it."""
    yield tape
    for node in tape.nodes:
        for branch in node.branches:
            yield from all_tapes(branch)


def on_path(tape: Tape) -> list[Node]:
    """The nodes from which the output can be reached (the rest carry no relevance)."""
    live = set(tape.outputs)
    path = []
    for node in reversed(tape.nodes):
        if any(o in live for o in node.outs):
            live.update(node.ins)
            path.append(node)
    return path[::-1]
