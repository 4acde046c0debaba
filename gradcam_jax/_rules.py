"""The per-primitive rule interpreter: re-evaluate a function with other backward rules.

Guided Backprop and Deconvnet keep a model's forward pass and change only the backward rule
of ReLU. :func:`transform` traces a function to a jaxpr and evaluates it again with every
ReLU — ``jax.nn.relu``, ``jax.nn.relu6``, ``jnp.maximum(x, 0)``, ``jnp.clip(x, 0, c)``,
``lax.clamp(0, x, c)`` — replaced by a :class:`Rule`'s ``custom_vjp`` ReLU, inside nested
``jit``, ``custom_jvp``/``custom_vjp`` functions, ``remat``, ``scan``, ``while`` and ``cond``
as well. ``jax.nn`` is never patched and the model is never edited.

Only rectifiers of activations are ReLUs (:mod:`._relu_sites` finds them): the clamp of a
variance at zero inside ``LayerNorm`` / ``GroupNorm`` / ``BatchNorm`` (``max(0, var)``) is a
numerical guard, left alone — a LayerNorm + GELU model (a ViT, a ConvNeXt) has no ReLU and is
refused rather than given "guided" gradients equal to nothing the method defines.

Not caught (they keep their ordinary gradient): ReLUs written as ``jnp.where(x > 0, x, 0)`` or
``x * (x > 0)``, and ReLUs inside functions that carry their own custom derivative rule (other
than ``relu``/``relu6`` themselves) — so ``softplus = logaddexp(x, 0)`` is rightly left alone.
A ReLU the rewrite can see but not reach (inside ``shard_map``, say) is an error, not a silent
plain gradient.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from ._relu_sites import (
    CALLS,
    Facts,
    analyse,
    closed_parts,
    count_relus,
    enters_call,
    relu_operand,
    sub_closed,
)

__all__ = [
    "Rule",
    "GUIDED",
    "DECONV",
    "transform",
    "count_relus",
    "guided_relu",
    "deconv_relu",
    "guided_relu6",
    "deconv_relu6",
]


# --------------------------------------------------------------------------------------------
# The modified ReLUs
# --------------------------------------------------------------------------------------------


@jax.custom_vjp
def guided_relu(x):
    """``max(x, 0)`` whose backward pass is Guided Backprop's: ``g * (x > 0) * (g > 0)``."""
    return jnp.maximum(x, jnp.zeros((), x.dtype))


def _guided_fwd(x):
    return guided_relu(x), x


def _guided_bwd(x, g):
    return (jnp.where((x > 0) & (g > 0), g, jnp.zeros((), g.dtype)),)


guided_relu.defvjp(_guided_fwd, _guided_bwd)


@jax.custom_vjp
def deconv_relu(x):
    """``max(x, 0)`` whose backward pass is Deconvnet's: ``g * (g > 0)``."""
    return jnp.maximum(x, jnp.zeros((), x.dtype))


def _deconv_fwd(x):
    return deconv_relu(x), None


def _deconv_bwd(_, g):
    return (jnp.where(g > 0, g, jnp.zeros((), g.dtype)),)


deconv_relu.defvjp(_deconv_fwd, _deconv_bwd)


@jax.custom_vjp
def _straight_through_min(y, c):
    """``min(y, c)`` passing the gradient to ``y`` unchanged (Deconvnet ignores the input)."""
    return jnp.minimum(y, c)


_straight_through_min.defvjp(lambda y, c: (jnp.minimum(y, c), c), lambda c, g: (g, jnp.zeros_like(c)))


def guided_relu6(x):
    """ReLU6 with the guided rule: ``g * (0 < x < 6) * (g > 0)``."""
    return jnp.minimum(guided_relu(x), jnp.asarray(6, x.dtype))


def deconv_relu6(x):
    """ReLU6 with the Deconvnet rule: ``g * (g > 0)``."""
    return _straight_through_min(deconv_relu(x), jnp.asarray(6, x.dtype))


class Rule:
    def __init__(self, name, relu, clip):
        self.name, self.relu, self.clip = name, relu, clip


GUIDED = Rule("guided", guided_relu, lambda y, c: jnp.minimum(y, c))
DECONV = Rule("deconvnet", deconv_relu, _straight_through_min)


# --------------------------------------------------------------------------------------------
# The jaxpr rewrite
# --------------------------------------------------------------------------------------------


def _bind(eqn, invals):
    params = eqn.primitive.get_bind_params(eqn.params)
    subfuns = []
    if isinstance(params, tuple):  # older JAX: (subfuns, params)
        subfuns, params = params
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*subfuns, *invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


class _Counter:
    def __init__(self):
        self.n = 0


def _eval(jaxpr, consts, args, rule: Rule, counter: _Counter, known_args=None, kind_args=None):
    """Evaluate ``jaxpr`` with every ReLU replaced by ``rule``'s."""
    env: dict[Any, Any] = {}
    facts = Facts(jaxpr, consts, known_args, kind_args)
    relu_outs: set[Any] = set()

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, c in zip(jaxpr.constvars, consts, strict=False):
        env[v] = c
    for v, a in zip(jaxpr.invars, args, strict=False):
        env[v] = a

    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        ins, kinds = facts.read(eqn)
        outs = _eval_eqn(eqn, invals, ins, kinds, relu_outs, rule, counter)
        if outs is None:
            outs = _bind(eqn, invals)
        facts.update(eqn, ins, kinds)
        for v, o in zip(eqn.outvars, outs, strict=False):
            if not isinstance(v, jcore.DropVar):
                env[v] = o
    return [read(v) for v in jaxpr.outvars]


def _eval_eqn(eqn, invals, ins, kinds, relu_outs, rule: Rule, counter: _Counter):
    """One equation under ``rule``: its outputs, or ``None`` to bind it unchanged."""
    name = eqn.primitive.name
    out_aval: Any = eqn.outvars[0].aval if eqn.outvars else None

    def relu_out(i):
        v = eqn.invars[i]
        return isinstance(v, jcore.Var) and v in relu_outs

    operand = relu_operand(eqn, ins, kinds)
    if operand is not None and name == "max":
        x = invals[operand]
        x = jnp.broadcast_to(jnp.asarray(x, out_aval.dtype), out_aval.shape)
        counter.n += 1
        relu_outs.add(eqn.outvars[0])
        return [rule.relu(x)]
    if (
        name == "min"
        and len(invals) == 2
        and ((relu_out(0) and ins[1] is not None) or (relu_out(1) and ins[0] is not None))
    ):
        y, c = (invals[0], invals[1]) if relu_out(0) else (invals[1], invals[0])
        y = jnp.broadcast_to(y, out_aval.shape)
        return [rule.clip(y, jnp.broadcast_to(jnp.asarray(c, out_aval.dtype), out_aval.shape))]
    if operand is not None:  # clamp(0, x, c)
        _, x, hi = invals
        x = jnp.broadcast_to(x, out_aval.shape)
        counter.n += 1
        return [rule.clip(rule.relu(x), jnp.broadcast_to(jnp.asarray(hi, out_aval.dtype), out_aval.shape))]
    if name in CALLS and sub_closed(eqn) is not None:
        return _eval_call(eqn, invals, ins, kinds, rule, counter)
    if name == "scan" and count_relus(eqn.params["jaxpr"]) > 0:
        return _eval_scan(eqn, invals, rule, counter)
    if name == "while" and (count_relus(eqn.params["body_jaxpr"]) > 0):
        return _eval_while(eqn, invals, rule, counter)
    if name == "cond" and any(count_relus(b) > 0 for b in eqn.params["branches"]):
        return _eval_cond(eqn, invals, rule, counter)
    return None


def _eval_call(eqn, invals, ins, kinds, rule: Rule, counter: _Counter):
    """A call-like equation: inlined under ``rule`` when it holds ReLUs we may rewrite."""
    sub = sub_closed(eqn)
    if not enters_call(eqn) or analyse(sub, ins, kinds)[0] == 0:
        return _bind(eqn, invals)
    # Inline the call (dropping any custom derivative rule: the ReLUs inside get ours).
    sj, sc = closed_parts(sub)

    def inner(*a):
        return _eval(sj, sc, list(a), rule, counter, ins, kinds)

    if eqn.primitive.name in ("remat2", "checkpoint", "remat"):
        inner = jax.checkpoint(
            inner, policy=eqn.params.get("policy"), prevent_cse=eqn.params.get("prevent_cse", True)
        )
    return list(inner(*invals))


def _eval_scan(eqn, invals, rule, counter):
    p = eqn.params
    nc, ncarry = p["num_consts"], p["num_carry"]
    consts, init, xs = invals[:nc], invals[nc : nc + ncarry], invals[nc + ncarry :]
    body, body_consts = closed_parts(p["jaxpr"])

    def step(carry, x):
        out = _eval(body, body_consts, list(consts) + list(carry) + list(x), rule, counter)
        return out[:ncarry], out[ncarry:]

    carry, ys = jax.lax.scan(
        step, list(init), list(xs), length=p["length"], reverse=p["reverse"], unroll=p.get("unroll", 1)
    )
    return list(carry) + list(ys)


def _eval_while(eqn, invals, rule, counter):
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts, init = invals[:cn], invals[cn : cn + bn], invals[cn + bn :]
    cj, cc = closed_parts(p["cond_jaxpr"])
    bj, bc = closed_parts(p["body_jaxpr"])

    def cond(carry):
        return _eval(cj, cc, list(cconsts) + list(carry), rule, counter)[0]

    def body(carry):
        return _eval(bj, bc, list(bconsts) + list(carry), rule, counter)

    return list(jax.lax.while_loop(cond, body, list(init)))


def _eval_cond(eqn, invals, rule, counter):
    index, ops = invals[0], invals[1:]
    branches = []
    for b in eqn.params["branches"]:
        bj, bc = closed_parts(b)
        branches.append(lambda *a, bj=bj, bc=bc: _eval(bj, bc, list(a), rule, counter))
    return list(jax.lax.switch(index, branches, *ops))


def transform(fn: Callable, rule: Rule) -> Callable:
    @functools.wraps(fn)
    def transformed(*args):
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        counter = _Counter()
        flat = jax.tree_util.tree_leaves(args)
        outs = _eval(closed.jaxpr, list(closed.consts), flat, rule, counter)
        expected = count_relus(closed)
        if counter.n < expected:
            raise NotImplementedError(
                f"{rule.name}: the model has {expected} ReLUs but only {counter.n} could be rewritten: "
                f"the others sit inside a transformation this rewrite does not enter (for example "
                f"shard_map or a custom batching rule). Apply {rule.name} to the function inside it, "
                f"or use gcj.guided_relu / gcj.deconv_relu as the model's activation."
            )
        if counter.n == 0:
            raise ValueError(
                f"{rule.name}: the model has no ReLU (no jax.nn.relu, relu6, max(x, 0) or clip(x, 0, c) "
                f"applied to an activation was found in its computation; the clamp of a variance inside "
                f"a LayerNorm / GroupNorm / BatchNorm is not one), so {rule.name} is not defined for it: "
                f"its gradients would be plain gradients. For models with GELU / SiLU / tanh activations "
                f"(ViT, ConvNeXt...) use gcj.gradients(fn, x, target) for plain input gradients or "
                f"gcj.smooth_grad(fn, x, target, key=jax.random.key(0)) for a less noisy saliency map."
            )
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

    return transformed
