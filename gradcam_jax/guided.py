"""Guided Backprop, Deconvnet and Guided Grad-CAM as function transforms.

Both methods keep the forward pass and change only the backward rule of ReLU:

* Guided Backpropagation (Springenberg et al. 2015): pass the gradient where the forward
  input is > 0 **and** the incoming gradient is > 0.
* Deconvnet (Zeiler & Fergus 2014): pass the incoming gradient where it is > 0, whatever the
  forward input.

:func:`guided_relu` and :func:`deconv_relu` are those rules as ``jax.custom_vjp`` functions.
To apply them to a model without editing it, :func:`guided` / :func:`deconvolved` trace the
model to a jaxpr and evaluate it again with every ReLU — ``jax.nn.relu``, ``jax.nn.relu6``,
``jnp.maximum(x, 0)``, ``jnp.clip(x, 0, c)``, ``lax.clamp(0, x, c)`` — replaced by the modified
one, inside nested ``jit``, ``custom_jvp``/``custom_vjp`` functions, ``remat``, ``scan``,
``while`` and ``cond`` as well. ``jax.nn`` is never patched.

Not caught (they keep their ordinary gradient): ReLUs written as ``jnp.where(x > 0, x, 0)`` or
``x * (x > 0)``, and ReLUs inside functions that carry their own custom derivative rule (other
than ``relu``/``relu6`` themselves) — so ``softplus = logaddexp(x, 0)`` is rightly left alone.
A ReLU the rewrite can see but not reach (inside ``shard_map``, say) is an error, not a silent
plain gradient.

Clipped ReLUs (ReLU6) follow the same rules: guided passes ``g`` where ``0 < x < c`` and
``g > 0``; deconvnet passes ``g`` where ``g > 0``, ignoring the forward input entirely.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, List, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from . import methods as _methods
from ._callables import combine_callable, partition_callable, scores_fn
from ._core import (
    Grads,
    Target,
    _batch_size,
    _run_tap,
    check_target_against,
    jit_target_fn,
    jit_target_value,
    select_scores,
    spec_from_jit,
    target_spec,
)
from ._explain import _check_common, _check_range_eagerly, finish_maps, maps_from_grads
from ._tap import as_tap

__all__ = [
    "guided_relu", "deconv_relu", "guided_relu6", "deconv_relu6", "guided", "deconvolved",
    "count_relus", "guided_backprop", "deconvnet", "gradients", "smooth_grad", "guided_grad_cam",
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


_straight_through_min.defvjp(lambda y, c: (jnp.minimum(y, c), c),
                             lambda c, g: (g, jnp.zeros_like(c)))


def guided_relu6(x):
    """ReLU6 with the guided rule: ``g * (0 < x < 6) * (g > 0)``."""
    return jnp.minimum(guided_relu(x), jnp.asarray(6, x.dtype))


def deconv_relu6(x):
    """ReLU6 with the Deconvnet rule: ``g * (g > 0)``."""
    return _straight_through_min(deconv_relu(x), jnp.asarray(6, x.dtype))


class _Rule:
    def __init__(self, name, relu, clip):
        self.name, self.relu, self.clip = name, relu, clip


_GUIDED = _Rule("guided", guided_relu, lambda y, c: jnp.minimum(y, c))
_DECONV = _Rule("deconvnet", deconv_relu, _straight_through_min)


# --------------------------------------------------------------------------------------------
# The jaxpr rewrite
# --------------------------------------------------------------------------------------------

_CALLS = {"pjit", "jit", "closed_call", "core_call", "remat2", "checkpoint", "remat",
          "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr", "custom_lin"}
_CUSTOM = {"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr", "custom_lin"}
# What jax.nn.relu / relu6 / clip are made of: a custom-derivative function built only from
# these is a (clipped) ReLU and gets our rule; any other one (softplus = logaddexp(x, 0),
# mish, celu...) keeps its own derivative even though it contains a max(x, 0).
_PURE_CLIP_OPS = {"max", "min", "clamp", "jit", "pjit", "closed_call", "convert_element_type",
                  "broadcast_in_dim"}


def _known(v, env_known):
    if isinstance(v, jcore.Literal):
        return np.asarray(v.val)
    return env_known.get(v)


def _is_zero(val) -> bool:
    return val is not None and val.size > 0 and bool(np.all(val == 0))


def _relu_site(eqn, ins) -> bool:
    """``max(x, 0)`` / ``max(0, x)`` / ``clamp(0, x, c)`` on floats: a ReLU to rewrite."""
    name = eqn.primitive.name
    if name not in ("max", "clamp") or not eqn.outvars:
        return False
    if not jnp.issubdtype(eqn.outvars[0].aval.dtype, jnp.floating):
        return False  # integer clamps (index arithmetic) are not activations
    if name == "max":
        return len(ins) == 2 and (_is_zero(ins[0]) != _is_zero(ins[1]))
    return _is_zero(ins[0])


def _sub_closed(eqn):
    """The single sub-jaxpr of a call-like equation (a Jaxpr or ClosedJaxpr), or None."""
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        if key in eqn.params:
            return eqn.params[key]
    return None


def _is_pure_clip(jaxpr) -> bool:
    jaxpr, _ = _closed_parts(jaxpr)
    for eqn in jaxpr.eqns:
        if eqn.primitive.name not in _PURE_CLIP_OPS:
            return False
        sub = _sub_closed(eqn)
        if sub is not None and not _is_pure_clip(sub):
            return False
    return True


def _enters_call(eqn) -> bool:
    """Whether the rewrite goes inside this call-like equation."""
    if eqn.primitive.name not in _CALLS or _sub_closed(eqn) is None:
        return False
    return eqn.primitive.name not in _CUSTOM or _is_pure_clip(_sub_closed(eqn))


def _closed_parts(c):
    return (c.jaxpr, list(c.consts)) if isinstance(c, jcore.ClosedJaxpr) else (c, [])


def count_relus(jaxpr, known_args: Optional[List[Any]] = None) -> int:
    """How many ReLU sites (float ``max(x, 0)``, clamps at 0) a jaxpr holds, sub-jaxprs included.

    Custom-derivative functions count only when they are a (clipped) ReLU themselves.
    """
    jaxpr, consts = _closed_parts(jaxpr)
    known = {}
    for v, c in zip(jaxpr.constvars, consts):
        k = _concrete(c)
        if k is not None:
            known[v] = k
    for v, k in zip(jaxpr.invars, known_args or []):
        if k is not None:
            known[v] = k
    n = 0
    for eqn in jaxpr.eqns:
        ins = [_known(v, known) for v in eqn.invars]
        if _relu_site(eqn, ins):
            n += 1
        elif eqn.primitive.name in _CALLS and _sub_closed(eqn) is not None:
            if _enters_call(eqn):
                n += count_relus(_sub_closed(eqn), ins)
        else:
            n += sum(count_relus(sub) for sub in jcore.jaxprs_in_params(eqn.params))
        _propagate_known(eqn, ins, known)
    return n


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


_SHAPE_OPS = {"convert_element_type", "broadcast_in_dim", "reshape", "squeeze", "expand_dims"}


def _propagate_known(eqn, ins, known):
    """Track compile-time constants through the shape ops that build a broadcast zero."""
    if eqn.primitive.name in _SHAPE_OPS and len(eqn.outvars) == 1 and ins and ins[0] is not None \
            and all(i is not None for i in ins):
        val = ins[0]
        if val.size == 1 or _is_zero(val):
            out_aval = eqn.outvars[0].aval
            known[eqn.outvars[0]] = np.broadcast_to(val.reshape(()) if val.size == 1 else val.flat[0],
                                                     out_aval.shape).astype(out_aval.dtype)


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


def _eval(jaxpr, consts, args, rule: _Rule, counter: _Counter, known_args=None):
    """Evaluate ``jaxpr`` with every ReLU replaced by ``rule``'s."""
    env = {}
    known = {}
    relu_outs = set()

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, c in zip(jaxpr.constvars, consts):
        env[v] = c
        k = _concrete(c)
        if k is not None:
            known[v] = k
    for i, (v, a) in enumerate(zip(jaxpr.invars, args)):
        env[v] = a
        if known_args is not None and i < len(known_args) and known_args[i] is not None:
            known[v] = known_args[i]

    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        ins = [_known(v, known) for v in eqn.invars]
        name = eqn.primitive.name
        out_aval = eqn.outvars[0].aval if eqn.outvars else None
        outs = None

        def relu_out(i):
            v = eqn.invars[i]
            return isinstance(v, jcore.Var) and v in relu_outs

        if _relu_site(eqn, ins) and name == "max":
            x = invals[1] if _is_zero(ins[0]) else invals[0]
            x = jnp.broadcast_to(jnp.asarray(x, out_aval.dtype), out_aval.shape)
            outs = [rule.relu(x)]
            counter.n += 1
            relu_outs.add(eqn.outvars[0])
        elif name == "min" and len(invals) == 2 and (
                (relu_out(0) and ins[1] is not None) or (relu_out(1) and ins[0] is not None)):
            y, c = (invals[0], invals[1]) if relu_out(0) else (invals[1], invals[0])
            y = jnp.broadcast_to(y, out_aval.shape)
            outs = [rule.clip(y, jnp.broadcast_to(jnp.asarray(c, out_aval.dtype), out_aval.shape))]
        elif _relu_site(eqn, ins):  # clamp(0, x, c)
            lo, x, hi = invals
            x = jnp.broadcast_to(x, out_aval.shape)
            counter.n += 1
            outs = [rule.clip(rule.relu(x), jnp.broadcast_to(jnp.asarray(hi, out_aval.dtype), out_aval.shape))]
        elif name in _CALLS and _sub_closed(eqn) is not None:
            sub = _sub_closed(eqn)
            if not _enters_call(eqn) or count_relus(sub, ins) == 0:
                outs = _bind(eqn, invals)
            else:
                # Inline the call (dropping any custom derivative rule: the ReLUs inside get ours).
                sj, sc = _closed_parts(sub)

                def inner(*a, sj=sj, sc=sc, ins=ins):
                    return _eval(sj, sc, list(a), rule, counter, ins)

                if name in ("remat2", "checkpoint", "remat"):
                    outs = list(jax.checkpoint(inner, policy=eqn.params.get("policy"),
                                               prevent_cse=eqn.params.get("prevent_cse", True))(*invals))
                else:
                    outs = list(inner(*invals))
        elif name == "scan" and count_relus(eqn.params["jaxpr"]) > 0:
            outs = _eval_scan(eqn, invals, rule, counter)
        elif name == "while" and (count_relus(eqn.params["body_jaxpr"]) > 0):
            outs = _eval_while(eqn, invals, rule, counter)
        elif name == "cond" and any(count_relus(b) > 0 for b in eqn.params["branches"]):
            outs = _eval_cond(eqn, invals, rule, counter)
        else:
            outs = _bind(eqn, invals)
            _propagate_known(eqn, ins, known)

        for v, o in zip(eqn.outvars, outs):
            if not isinstance(v, jcore.DropVar):
                env[v] = o
    return [read(v) for v in jaxpr.outvars]


def _eval_scan(eqn, invals, rule, counter):
    p = eqn.params
    nc, ncarry = p["num_consts"], p["num_carry"]
    consts, init, xs = invals[:nc], invals[nc:nc + ncarry], invals[nc + ncarry:]
    body, body_consts = _closed_parts(p["jaxpr"])

    def step(carry, x):
        out = _eval(body, body_consts, list(consts) + list(carry) + list(x), rule, counter)
        return out[:ncarry], out[ncarry:]

    carry, ys = jax.lax.scan(step, list(init), list(xs), length=p["length"], reverse=p["reverse"],
                             unroll=p.get("unroll", 1))
    return list(carry) + list(ys)


def _eval_while(eqn, invals, rule, counter):
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts, init = invals[:cn], invals[cn:cn + bn], invals[cn + bn:]
    cj, cc = _closed_parts(p["cond_jaxpr"])
    bj, bc = _closed_parts(p["body_jaxpr"])

    def cond(carry):
        return _eval(cj, cc, list(cconsts) + list(carry), rule, counter)[0]

    def body(carry):
        return _eval(bj, bc, list(bconsts) + list(carry), rule, counter)

    return list(jax.lax.while_loop(cond, body, list(init)))


def _eval_cond(eqn, invals, rule, counter):
    index, ops = invals[0], invals[1:]
    branches = []
    for b in eqn.params["branches"]:
        bj, bc = _closed_parts(b)
        branches.append(lambda *a, bj=bj, bc=bc: _eval(bj, bc, list(a), rule, counter))
    return list(jax.lax.switch(index, branches, *ops))


def _transform(fn: Callable, rule: _Rule) -> Callable:
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
                f"was found in its computation), so its {rule.name} gradients would equal plain "
                f"gradients. Use gcj.gradients for those, or check that the model's activations are "
                f"ReLUs."
            )
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

    return transformed


def guided(fn: Callable) -> Callable:
    """``fn`` with every ReLU's backward rule replaced by Guided Backprop's.

    A function transform: the forward values are unchanged; ``jax.grad``/``jax.vjp`` of the
    result give guided gradients. Raises ``ValueError`` (when called) if ``fn`` has no ReLU.

    Examples:
      >>> import jax, jax.numpy as jnp, gradcam_jax as gcj
      >>> f = lambda x: jnp.sum(jax.nn.relu(x) * jnp.array([1.0, -1.0, 2.0]))
      >>> jax.grad(gcj.guided(f))(jnp.array([1.0, 2.0, -3.0]))   # negative gradient blocked
      Array([1., 0., 0.], dtype=float32)
    """
    return _transform(fn, _GUIDED)


def deconvolved(fn: Callable) -> Callable:
    """``fn`` with every ReLU's backward rule replaced by Deconvnet's (see :func:`guided`)."""
    return _transform(fn, _DECONV)


# --------------------------------------------------------------------------------------------
# Pixel-space explainers
# --------------------------------------------------------------------------------------------


def _pullback_all(pullback, selected):
    """Pull back the explained scores' cotangents: (B, ...) or (B, K, ...)."""
    if selected.ndim == 1:
        return pullback(jnp.ones_like(selected))[0]
    k = selected.shape[1]
    cts = jnp.broadcast_to(jnp.eye(k, dtype=selected.dtype)[:, None, :], (k,) + selected.shape)
    return jnp.moveaxis(jax.vmap(lambda c: pullback(c)[0])(cts), 0, 1)


@functools.partial(jax.jit, static_argnames=("static", "kind", "target_fn", "rule"))
def _input_grads_jit(dyn, x, target_value, *, static, kind, target_fn, rule):
    fn = combine_callable(dyn, static)
    spec = spec_from_jit(kind, target_value, target_fn)
    call = scores_fn(fn) if rule is None else _transform(scores_fn(fn), rule)
    selected, pullback = jax.vjp(lambda x: select_scores(spec, call(x)), x)
    return _pullback_all(pullback, selected)


def _input_grads(fn, x, target, rule):
    if not callable(fn):
        raise TypeError(f"Expected a callable x -> scores (a model, an apply function or a tap); got {type(fn).__name__}.")
    spec = target_spec(target, _batch_size(x))
    check_target_against(spec, lambda: jax.eval_shape(scores_fn(fn), x))
    dyn, static = partition_callable(fn)
    return _input_grads_jit(dyn, x, jit_target_value(spec), static=static,
                            kind=spec.kind, target_fn=jit_target_fn(spec), rule=rule)


def gradients(fn: Callable, x, target: Target = None) -> jax.Array:
    """Plain input gradients ``d y^c / d x`` ("vanilla" saliency, Simonyan et al. 2014).

    Args:
      fn: any JAX callable ``x -> scores`` (a Flax ``apply`` closure, an Equinox model, a tap).
      x: the input batch.
      target: as in :func:`gradcam_jax.grad_cam`.

    Returns:
      Gradients shaped like ``x`` — ``(B, H, W, C)`` — or ``(B, K, H, W, C)`` for K targets.
    """
    return _input_grads(fn, x, target, None)


def guided_backprop(fn: Callable, x, target: Target = None) -> jax.Array:
    """Guided Backpropagation: input gradients with the guided ReLU rule at every ReLU.

    ``fn`` is traced and re-evaluated with each ReLU (``jax.nn.relu``, ``relu6``,
    ``max(x, 0)``, ``clip(x, 0, c)``) swapped for :func:`guided_relu`, wherever it sits
    (nested ``jit``, ``custom_jvp``, ``remat``, ``scan``, ``cond``, ``while``). Nothing is
    patched; the model is not edited.

    Args:
      fn: any JAX callable ``x -> scores``; a tap works too (its scores are used).
      x: the input batch ``(B, H, W, C)``.
      target: as in :func:`gradcam_jax.grad_cam`.

    Returns:
      ``(B, H, W, C)`` gradients with respect to ``x`` (``(B, K, H, W, C)`` for K targets).

    Raises:
      ValueError: ``fn`` contains no ReLU (guided backprop would equal plain gradients).

    References:
      Springenberg et al., "Striving for Simplicity: The All Convolutional Net", ICLR 2015
      workshop, https://arxiv.org/abs/1412.6806.
    """
    return _input_grads(fn, x, target, _GUIDED)


def deconvnet(fn: Callable, x, target: Target = None) -> jax.Array:
    """Deconvnet: input gradients with the Deconvnet ReLU rule (``g * (g > 0)``) at every ReLU.

    As :func:`guided_backprop` otherwise.

    References:
      Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks", ECCV 2014,
      https://arxiv.org/abs/1311.2901.
    """
    return _input_grads(fn, x, target, _DECONV)


def smooth_grad(fn: Callable, x, target: Target = None, *, key, n_samples: int = 25,
                noise_level: float = 0.15, method: str = "gradients", chunk_size: Optional[int] = None):
    """SmoothGrad: the mean of input gradients over Gaussian-noised copies of ``x``.

    ``sigma = noise_level * (max(x_b) - min(x_b))`` per example; samples are ``vmap``-ed (in
    chunks of ``chunk_size`` samples when given, to bound memory).

    Args:
      fn, x, target: as in :func:`gradients`.
      key: a ``jax.random`` key (explicit: the result is reproducible).
      n_samples: noisy copies per example.
      noise_level: the noise's standard deviation as a fraction of each example's value range.
      method: ``"gradients"``, ``"guided_backprop"`` or ``"deconvnet"``.
      chunk_size: samples evaluated at once (default: all).

    References:
      Smilkov et al., "SmoothGrad: removing noise by adding noise", 2017,
      https://arxiv.org/abs/1706.03825.
    """
    explainers = {"gradients": gradients, "guided_backprop": guided_backprop, "deconvnet": deconvnet}
    if method not in explainers:
        raise ValueError(f"smooth_grad: method={method!r} is not one of {', '.join(explainers)}.")
    explain = explainers[method]
    if target is None:
        # Each noisy copy explains the clean input's top class, not its own.
        target = jnp.argmax(jax.lax.stop_gradient(scores_fn(fn)(x)), axis=-1)
    axes = tuple(range(1, x.ndim))
    sigma = noise_level * (jnp.max(x, axis=axes, keepdims=True) - jnp.min(x, axis=axes, keepdims=True))
    noise = jax.random.normal(key, (n_samples,) + x.shape, jnp.float32).astype(x.dtype) * sigma
    one = lambda n: explain(fn, x + n, target)  # noqa: E731
    grads = jax.lax.map(one, noise, batch_size=chunk_size) if chunk_size else jax.vmap(one)(noise)
    return jnp.mean(grads, axis=0)


# --------------------------------------------------------------------------------------------
# Guided Grad-CAM
# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("kind", "target_fn", "interpolation", "normalize", "drop_tokens", "grid"))
def _guided_grad_cam_jit(tap, x, target_value, *, kind, target_fn, interpolation, normalize, drop_tokens, grid):
    spec = spec_from_jit(kind, target_value, target_fn)
    _, act = _run_tap.eval_shape(tap, x)
    delta0 = jnp.zeros(act.shape, act.dtype)

    # One forward pass with guided ReLUs everywhere: scores, A, and the guided pullback to x.
    def guided_objective(x, delta):
        scores, a = tap(x, delta)
        return select_scores(spec, scores), a

    g_obj = _transform(guided_objective, _GUIDED)
    selected, pullback, a = jax.vjp(g_obj, x, delta0, has_aux=True)
    gb = _pullback_all(lambda c: pullback(c)[:1], selected)

    # Grad-CAM needs dA under the model's own ReLUs: pull back through the part above the
    # layer only (under jit the layers below are dead code in tap.head).
    sel2, head_pullback = jax.vjp(lambda a_: select_scores(spec, tap.head(x, a_)), a)
    da = _pullback_all(head_pullback, sel2)  # (B, ...) or (B, K, ...)
    grads = Grads(None, a, da if sel2.ndim == 1 else jnp.moveaxis(da, 1, 0), sel2)
    finish = functools.partial(finish_maps, size=tuple(x.shape[1:3]), relu=True, upsample=True,
                               normalize=False, interpolation=interpolation)
    cam = maps_from_grads(grads, _methods.grad_cam, finish, counterfactual=False,
                          drop_tokens=drop_tokens, grid=grid)
    out = gb.astype(jnp.float32) * cam[..., None]
    if normalize:
        scale = jnp.max(jnp.abs(out), axis=(-3, -2, -1), keepdims=True)
        out = jnp.where(scale > 0, out / jnp.where(scale > 0, scale, 1.0), 0.0)
    return out


def guided_grad_cam(tap, x, target: Target = None, *, interpolation: str = "bilinear",
                    normalize: bool = True, drop_tokens: int = 0, grid=None) -> jax.Array:
    """Guided Grad-CAM: Guided Backprop ⊙ the Grad-CAM map upsampled to the input.

    High resolution (from Guided Backprop) and class-discriminative (from Grad-CAM). One
    guided forward pass gives the scores, the activation and the guided input gradients; the
    Grad-CAM weights come from a pullback through the part of the model above the layer with
    its ordinary ReLUs.

    Args:
      tap: the model split at the Grad-CAM layer.
      x: images ``(B, H, W, C)``.
      target: as in :func:`gradcam_jax.grad_cam`.
      interpolation: how the Grad-CAM map is upsampled: ``"bilinear"`` (the paper's) or
        ``"nearest"`` (Captum's ``GuidedGradCam`` default).
      normalize: divide each map by its largest absolute value (to [-1, 1], signs kept);
        ``False`` returns the raw product ``GB * ReLU(L)``.

    Returns:
      ``float32`` ``(B, H, W, C)``, or ``(B, K, H, W, C)`` for K targets per example.

    References:
      Selvaraju et al., ICCV 2017, §3.2, https://arxiv.org/abs/1610.02391.
    """
    tap = as_tap(tap)
    batch = _check_common(x, interpolation)
    if not hasattr(x, "ndim") or x.ndim != 4:
        raise ValueError(f"guided_grad_cam needs images (B, H, W, C); got an input of shape {getattr(x, 'shape', None)}.")
    spec = target_spec(target, batch)
    _check_range_eagerly(tap, x, spec)
    return _guided_grad_cam_jit(tap, x, jit_target_value(spec), kind=spec.kind,
                                target_fn=jit_target_fn(spec),
                                interpolation=interpolation, normalize=bool(normalize),
                                drop_tokens=int(drop_tokens), grid=None if grid is None else tuple(grid))
