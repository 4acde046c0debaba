"""Guided Backprop's and Deconvnet's rule sets of the jaxpr walker (:mod:`._engine`).

Guided Backprop and Deconvnet keep a model's forward pass and change only the backward rule
of ReLU. :func:`transform` traces a function to a jaxpr and evaluates it again on the walker,
under :func:`rule_set` (``GUIDED_RULES`` / ``DECONV_RULES``: a rule for ``max`` / ``min`` /
``clamp``, the call primitives, ``scan``, ``while`` and ``cond``), with every
ReLU — ``jax.nn.relu``, ``jax.nn.relu6``, ``jnp.maximum(x, 0)``, ``jnp.clip(x, 0, c)``,
``lax.clamp(0, x, c)`` — replaced by a :class:`Rule`'s ``custom_vjp`` ReLU, inside nested
``jit``, ``custom_jvp``/``custom_vjp`` functions, ``remat``, ``scan``, ``while`` and ``cond``
as well. ``jax.nn`` is never patched and the model is never edited. A clipped ReLU
(``min(relu(x), c)``, ``clamp(0, x, c)``) becomes the rule's ``clipped`` function when it has
one: Guided Backprop's :func:`guided_clipped_relu`, one mask kept from the forward pass.

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

from ._engine import (
    CALLS,
    Frame,
    RuleSet,
    evaluate,
    inline_call,
    rerun_cond,
    rerun_scan,
    rerun_while,
    sub_closed,
)
from ._relu_sites import Facts, analyse, count_relus, enters_call, relu_operand

__all__ = [
    "Rule",
    "GUIDED",
    "DECONV",
    "transform",
    "rule_set",
    "GUIDED_RULES",
    "DECONV_RULES",
    "count_relus",
    "guided_relu",
    "deconv_relu",
    "guided_relu6",
    "deconv_relu6",
    "guided_clipped_relu",
    "stored_for_backward",
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


def stored_for_backward(mask):
    """``mask`` written by the forward pass for the backward pass to read (on CPU; elsewhere ``mask``).

    XLA:CPU fuses elementwise producers into every consumer, duplicating them, and removes
    ``lax.optimization_barrier`` before fusion. A backward pass that needs the mask of a ReLU6
    after a depthwise tap sum (:mod:`gradcam_jax.models._depthwise`) therefore recomputed the
    whole tap sum inside its own fusions: each stride-2 tap sum of EfficientNet-Lite0's Guided
    Backprop was computed four times. XLA:CPU fuses nothing into or out of a reduction over a
    major axis, so ``any(stack([mask, False]), axis=0)``, which equals ``mask``, is computed once
    where the mask is, written (one byte an element) and read back by the backward pass.

    Args:
      mask: a boolean array of any shape.

    Returns:
      ``mask``, the same values and shape.
    """

    def cpu(m):
        return jnp.any(jnp.stack([m, jnp.zeros_like(m)]), axis=0)

    return jax.lax.platform_dependent(mask, cpu=cpu, default=lambda m: m)


@jax.custom_vjp
def guided_clipped_relu(x, c):
    """``clip(x, 0, c)`` whose backward pass is Guided Backprop's: ``g * (0 < x < c) * (g > 0)``.

    One rule with one mask for the clipped ReLU ``min(max(x, 0), c)`` (ReLU6 for ``c = 6``),
    which would otherwise chain :func:`guided_relu` and ``min``'s own gradient. ``min`` splits
    ``g`` in half where ``x == c`` exactly; here that point, like ``x == 0``, passes nothing.
    The mask is kept from the forward pass (:func:`stored_for_backward`). Guided Backprop:
    Springenberg et al., ICLR 2015 workshop, https://arxiv.org/abs/1412.6806.

    Args:
      x: the pre-activation, any shape.
      c: the upper clip, broadcastable to ``x`` (its gradient is zero).

    Returns:
      ``clip(x, 0, c)``, shaped like ``x``.

    >>> x = jnp.array([-1.0, 0.0, 3.0, 6.0, 8.0])
    >>> jax.grad(lambda x: jnp.sum(guided_clipped_relu(x, jnp.float32(6)) * jnp.array([1, 1, 1, 1, -1.0])))(x)
    Array([0., 0., 1., 0., 0.], dtype=float32)
    """
    return jnp.minimum(jnp.maximum(x, jnp.zeros((), x.dtype)), c)


def _guided_clipped_fwd(x, c):
    return guided_clipped_relu(x, c), (stored_for_backward((x > 0) & (x < c)), c)


def _guided_clipped_bwd(res, g):
    mask, c = res
    return jnp.where(mask & (g > 0), g, jnp.zeros((), g.dtype)), jnp.zeros_like(c)


guided_clipped_relu.defvjp(_guided_clipped_fwd, _guided_clipped_bwd)


def guided_relu6(x):
    """ReLU6 with the guided rule: ``g * (0 < x < 6) * (g > 0)`` (:func:`guided_clipped_relu`)."""
    return guided_clipped_relu(x, jnp.asarray(6, x.dtype))


def deconv_relu6(x):
    """ReLU6 with the Deconvnet rule: ``g * (g > 0)``."""
    return _straight_through_min(deconv_relu(x), jnp.asarray(6, x.dtype))


class Rule:
    """A backward rule for ReLUs: ``relu(x)``, ``clip(relu_out, c)`` (the ``min`` of a ReLU6) and,
    when set, ``clipped(x, c)``: the whole ``min(max(x, 0), c)`` as one function, used instead of
    ``clip`` after ``relu`` wherever the rewrite sees both."""

    def __init__(self, name, relu, clip, clipped=None):
        self.name, self.relu, self.clip, self.clipped = name, relu, clip, clipped


GUIDED = Rule("guided", guided_relu, lambda y, c: jnp.minimum(y, c), guided_clipped_relu)
DECONV = Rule("deconvnet", deconv_relu, _straight_through_min)


# --------------------------------------------------------------------------------------------
# The rule sets: the ReLU-site replacement on the jaxpr walker (._engine)
# --------------------------------------------------------------------------------------------


class _Counter:
    def __init__(self):
        self.n = 0


class _Sites:
    """A frame's state: what is known of its variables, and which outputs are rewritten ReLUs."""

    def __init__(self, frame: Frame):
        known, kinds = frame.extra if frame.extra is not None else (None, None)
        self.facts = Facts(frame.jaxpr, frame.consts, known, kinds)
        self.relu_outs: dict[Any, Any] = {}  # a rewritten ReLU's output -> its input
        self.last: tuple[Any, Any] = (None, None)  # (eqn, what facts.read said of it)

    def read(self, eqn) -> tuple[list[Any], list[str]]:
        """``facts.read(eqn)``, once per equation (its rule and ``_after`` both ask)."""
        if self.last[0] is not eqn:
            self.last = (eqn, self.facts.read(eqn))
        return self.last[1]


def _enter(frame: Frame) -> None:
    frame.state = _Sites(frame)


def _after(frame: Frame, eqn, outs) -> None:
    frame.state.facts.update(eqn, *frame.state.read(eqn))


def _out_aval(eqn) -> Any:
    return eqn.outvars[0].aval


def _max_rule(rule: Rule):
    def max_rule(frame: Frame, eqn, invals):
        operand = relu_operand(eqn, *frame.state.read(eqn))
        if operand is None:
            return None
        aval = _out_aval(eqn)
        x = jnp.broadcast_to(jnp.asarray(invals[operand], aval.dtype), aval.shape)
        frame.ctx.n += 1
        frame.state.relu_outs[eqn.outvars[0]] = x
        return [rule.relu(x)]

    return max_rule


def _min_rule(rule: Rule):
    """``min(relu(x), c)`` (a ReLU6's clip) takes the rule's clip, or ``clipped(x, c)`` (then the
    rewritten ``relu(x)`` is dead code unless something else reads it)."""

    def min_rule(frame: Frame, eqn, invals):
        ins, _ = frame.state.read(eqn)
        relu_outs = frame.state.relu_outs

        def relu_out(i):
            v = eqn.invars[i]
            return isinstance(v, jcore.Var) and v in relu_outs

        if len(invals) != 2 or not (
            (relu_out(0) and ins[1] is not None) or (relu_out(1) and ins[0] is not None)
        ):
            return None
        aval = _out_aval(eqn)
        y, c = (invals[0], invals[1]) if relu_out(0) else (invals[1], invals[0])
        c = jnp.asarray(c, aval.dtype)
        if rule.clipped is not None:
            x = relu_outs[eqn.invars[0 if relu_out(0) else 1]]
            return [rule.clipped(jnp.broadcast_to(x, aval.shape), c)]
        return [rule.clip(jnp.broadcast_to(y, aval.shape), jnp.broadcast_to(c, aval.shape))]

    return min_rule


def _clamp_rule(rule: Rule):
    """``clamp(0, x, c)``: the rule's ReLU, then its clip; ``clipped(x, c)`` when ``c`` is a
    constant (a traced bound, a learned clip say, keeps its own gradient through the clip)."""

    def clamp_rule(frame: Frame, eqn, invals):
        ins, kinds = frame.state.read(eqn)
        if relu_operand(eqn, ins, kinds) is None:
            return None
        _, x, hi = invals
        aval = _out_aval(eqn)
        frame.ctx.n += 1
        if rule.clipped is not None and ins[2] is not None:
            return [rule.clipped(jnp.broadcast_to(x, aval.shape), jnp.asarray(hi, aval.dtype))]
        return [
            rule.clip(
                rule.relu(jnp.broadcast_to(x, aval.shape)),
                jnp.broadcast_to(jnp.asarray(hi, aval.dtype), aval.shape),
            )
        ]

    return clamp_rule


def _call_rule(frame: Frame, eqn, invals):
    """A call-like equation: inlined (custom rule dropped) when it holds ReLUs we may rewrite."""
    sub = sub_closed(eqn)
    if sub is None:
        return None
    ins, kinds = frame.state.read(eqn)
    if not enters_call(eqn) or analyse(sub, ins, kinds)[0] == 0:
        return None
    return inline_call(frame, eqn, invals, extra=(ins, kinds))


def _if_relus(rerun, *keys):
    """Rebuild a loop / switch under the rule set only when its bodies hold ReLUs."""

    def rule(frame: Frame, eqn, invals):
        subs = [s for k in keys for s in (eqn.params[k] if k == "branches" else [eqn.params[k]])]
        return rerun(frame, eqn, invals) if any(count_relus(s) > 0 for s in subs) else None

    return rule


def rule_set(rule: Rule) -> RuleSet:
    """The walker's rule set that replaces every ReLU site by ``rule``'s ReLU (and clip)."""
    table: dict[str, Any] = {
        "max": _max_rule(rule),
        "min": _min_rule(rule),
        "clamp": _clamp_rule(rule),
        "scan": _if_relus(rerun_scan, "jaxpr"),
        "while": _if_relus(rerun_while, "body_jaxpr"),
        "cond": _if_relus(rerun_cond, "branches"),
    }
    table.update(dict.fromkeys(CALLS, _call_rule))
    return RuleSet(rule.name, table, enter=_enter, after=_after)


GUIDED_RULES = rule_set(GUIDED)
DECONV_RULES = rule_set(DECONV)
_RULE_SETS = {id(GUIDED): GUIDED_RULES, id(DECONV): DECONV_RULES}


def transform(fn: Callable, rule: Rule) -> Callable:
    @functools.wraps(fn)
    def transformed(*args):
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        counter = _Counter()
        flat = jax.tree_util.tree_leaves(args)
        rules = _RULE_SETS.get(id(rule)) or rule_set(rule)
        outs = evaluate(rules, closed, flat, ctx=counter)
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
