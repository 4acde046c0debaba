"""LRP and DeepLIFT on any JAX model: per-primitive rules over the model's jaxpr.

The model is traced to a jaxpr and recorded as a tape of image-dependent equations
(:mod:`._tape`); relevance (LRP) or multipliers (DeepLIFT) then flow back through it equation
by equation, each kind with its rule. No module is rewritten and no framework is needed: a
Flax, Equinox, Haiku or hand-written ``jax.lax`` model gets the same rules.

Rules are assigned by kind and position, as zennit's composites do:

* ``"first"``: the first conv / dense layer from the input;
* ``"conv"`` (``conv_general_dilated``), ``"dense"`` (``dot_general``): each with the affine
  operations after it (bias, folded batch norm) as one layer;
* ``"sum"``: pooling and means (``reduce_sum``, ``reduce_window_sum``);
* ``"add"``: residual sums of two activations (split in proportion to each term);
* elementwise activations pass relevance through; max pooling routes it to the maximum;
  reshapes, slices, concatenations and casts move it without change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from .._callables import PytreeCallable, as_pytree
from .._inputs import with_leaf
from .._maps import kernel
from .._tap import scores_fn
from .._targets import Target, TargetSpec, fixed_top, nan_where, select_scores
from ._common import check_baseline_shape, gate
from ._tape import Tape, all_tapes, node_vjp, on_path, record, replay
from .rules import AlphaBeta, Epsilon, Flat, Gamma, LayerOps, Norm, ZBox, ZPlus, stabilize

__all__ = ["COMPOSITES", "composite", "RelevanceOptions", "relevance_kernel", "lrp", "deeplift"]

_KEYS = ("first", "conv", "dense", "sum", "add")


def composite(name: str, box: tuple[Any, Any] | None = None, epsilon: float = 1e-6) -> dict[str, Any]:
    """The rules of a named composite (zennit's, and Captum's default ``"epsilon"``)."""
    base = {"sum": Norm(1e-6), "add": Norm(1e-6), "dense": Epsilon(epsilon)}
    if name == "epsilon":  # Captum's LRP defaults: epsilon 1e-9 everywhere
        return {"conv": Epsilon(1e-9), "dense": Epsilon(1e-9), "sum": Epsilon(1e-9), "add": Norm(1e-9)}
    if name == "zplus":
        return {**base, "conv": ZPlus(), "dense": ZPlus()}
    if name == "epsilon_plus":
        return {**base, "conv": ZPlus()}
    if name == "epsilon_plus_flat":
        return {**base, "conv": ZPlus(), "first": Flat()}
    if name == "epsilon_alpha2_beta1":
        return {**base, "conv": AlphaBeta()}
    if name == "epsilon_alpha2_beta1_flat":
        return {**base, "conv": AlphaBeta(), "first": Flat()}
    if name == "epsilon_gamma_box":
        if box is None:
            raise ValueError(
                "lrp: rules='epsilon_gamma_box' needs box=(low, high), the lowest and highest input values "
                "(numbers or one per channel), for the first layer's z^B rule."
            )
        return {**base, "conv": Gamma(0.25), "first": ZBox(*_box(box))}
    raise ValueError(f"lrp: rules={name!r} is not one of {', '.join(COMPOSITES)}, nor a dict of rules.")


COMPOSITES = (
    "epsilon_plus_flat",
    "epsilon_plus",
    "epsilon_gamma_box",
    "epsilon_alpha2_beta1",
    "epsilon_alpha2_beta1_flat",
    "epsilon",
    "zplus",
)


def _box(box):
    def static(v):
        return tuple(float(u) for u in v) if hasattr(v, "__len__") else float(v)

    return static(box[0]), static(box[1])


@dataclasses.dataclass(frozen=True)
class RelevanceOptions:
    """The static options of :func:`relevance_kernel`: ``rules`` (LRP; ``None`` for DeepLIFT)."""

    rules: tuple[tuple[str, Any], ...] | None
    leaf: int = 0


def _unsupported(tape: Tape, who: str) -> None:
    bad: dict[str, int] = {}
    for t in all_tapes(tape):
        for node in on_path(t):
            if node.kind == "unsupported":
                bad[node.name] = bad.get(node.name, 0) + 1
    if bad:
        listed = ", ".join(f"{k} (x{v})" for k, v in sorted(bad.items()))
        raise NotImplementedError(
            f"{who}: no relevance rule for these operations on the path from the input to the scores: "
            f"{listed}. Supported: conv_general_dilated / dot_general with constant weights, sums and "
            f"pooling, residual add/sub, elementwise activations, affine ops with constants, max pooling "
            f"and shape operations. A product of two activations (attention, gating) has no rule."
        )


def _lrp_node(node, tape: Tape, rules: dict[str, Any], r_out):
    """Relevance of a node's inputs from that of its outputs (``None`` for constant inputs)."""
    kind, vals = node.kind, tape.vals
    if kind in ("conv", "dense", "sum"):
        layer = node.layer
        rule: Any = rules["first"] if layer.first and "first" in rules else rules.get(kind, Epsilon(1e-6))
        x = vals[node.ins[layer.x_pos]]
        out: list[Any] = [None] * len(node.ins)
        out[layer.x_pos] = rule(LayerOps(layer, z=vals[layer.z_id]), x, r_out[0])
        return out
    if kind == "add":
        a, b = (vals[i] for i in node.ins)
        sign = -1.0 if node.name == "sub" else 1.0
        rule = rules.get("add", Norm(1e-6))
        s = r_out[0] / stabilize(a + sign * b, getattr(rule, "epsilon", 1e-6))
        return [a * s, sign * b * s]
    if kind in ("activation", "affine"):  # relevance passes through
        return [r_out[0] if tape.active[i] else None for i in node.ins]
    return node_vjp(node, tape, r_out)  # structural ops, max pooling: moved / routed unchanged


def _deeplift_node(node, tape: Tape, ref, m_out):
    """DeepLIFT multipliers: Rescale at elementwise activations, the gradient elsewhere."""
    if node.kind != "activation":
        return node_vjp(node, tape, m_out)
    grads = node_vjp(node, tape, m_out)
    k = next(j for j, i in enumerate(node.ins) if tape.active[i])
    x, x0 = tape.vals[node.ins[k]], ref[node.ins[k]]
    dx, dy = x - x0, tape.vals[node.outs[0]] - ref[node.outs[0]]
    small = jnp.abs(dx) < 1e-10  # Captum's threshold: the gradient there
    rescale = m_out[0] * dy / jnp.where(small, 1.0, dx)
    grads[k] = jnp.where(small, grads[k], rescale)
    return grads


def _propagate(tape: Tape, starts: dict[int, Any], step: Callable) -> list[Any]:
    """Run ``step(node, r_out) -> r_in`` back from ``starts`` (relevance by value id, summed over
    fan-out); the relevance of each of the tape's inputs."""
    r = dict(starts)
    for node in reversed(on_path(tape)):
        if node.kind == "absorbed":
            continue
        outs = [node.layer.z_id] if node.layer is not None else node.outs
        if not any(o in r for o in outs):
            continue
        r_out = [r.pop(o, None) for o in outs]
        r_out = [jnp.zeros_like(tape.vals[o]) if v is None else v for o, v in zip(outs, r_out, strict=True)]
        for i, v in zip(node.ins, step(node, r_out), strict=True):
            if v is not None and tape.active[i]:
                r[i] = r[i] + v if i in r else v
    return [r.get(i, jnp.zeros_like(tape.vals[i])) for i in tape.inputs]


def _cond(node, tape: Tape, r_out, backward: Callable):
    """Through a ``cond``: every branch's relevance, the index's selected."""
    per = []
    for branch in node.branches:
        starts = {o: v for o, v in zip(branch.outputs, r_out, strict=True) if branch.active[o]}
        per.append(backward(branch, starts))
    index = jnp.clip(tape.vals[node.ins[0]], 0, len(per) - 1)
    out: list[Any] = [None]
    for k, i in enumerate(node.ins[1:]):
        out.append(jnp.stack([p[k] for p in per])[index] if tape.active[i] else None)
    return out


def _lrp_backward(tape: Tape, starts, rules: dict[str, Any]) -> list[Any]:
    def step(node, r_out):
        if node.kind == "cond":
            return _cond(node, tape, r_out, lambda t, st: _lrp_backward(t, st, rules))
        return _lrp_node(node, tape, rules, r_out)

    return _propagate(tape, starts, step)


def _deeplift_backward(tape: Tape, starts, refs: dict[int, list[Any]]) -> list[Any]:
    ref = refs[id(tape)]

    def step(node, m_out):
        if node.kind == "cond":
            return _cond(node, tape, m_out, lambda t, st: _deeplift_backward(t, st, refs))
        return _deeplift_node(node, tape, ref, m_out)

    return _propagate(tape, starts, step)


@kernel
def relevance_kernel(fn: PytreeCallable, x, target: TargetSpec, reference, *, options: RelevanceOptions):
    """LRP relevance (``options.rules``) or DeepLIFT attributions (``None``) under ``jit``."""
    call = scores_fn(fn.fn)
    leaf = options.leaf
    image = jax.tree_util.tree_leaves(x)[leaf]
    tape = record(lambda img: call(with_leaf(x, leaf, img)), image)
    out_id = tape.outputs[0]
    scores = tape.vals[tape.outputs[0]]
    spec = fixed_top(target, scores)
    selected, select_pullback = jax.vjp(lambda s: select_scores(spec, s), scores)
    if options.rules is not None:
        rules = dict(options.rules)
        _unsupported(tape, "lrp")

        def backward(cot):
            return _lrp_backward(tape, {out_id: scores * select_pullback(cot)[0]}, rules)[0]

    else:
        refs = replay(tape, [reference])
        for t in all_tapes(tape):  # DeepLIFT: the gradient through affine ops and layers
            for node in t.nodes:
                node.kind = "affine" if node.kind == "absorbed" else node.kind
                node.layer = None

        def backward(cot):
            return (image - reference) * _deeplift_backward(tape, {out_id: select_pullback(cot)[0]}, refs)[0]

    if selected.ndim == 1:
        out = backward(jnp.ones_like(selected))
    else:
        k = selected.shape[1]
        eye = jnp.broadcast_to(jnp.eye(k, dtype=selected.dtype)[:, None, :], (k,) + selected.shape)
        out = jnp.moveaxis(jax.vmap(backward)(eye), 0, 1)
    return nan_where(jnp.isnan(selected), out)


def _rules(rules, box, epsilon) -> tuple[tuple[str, Any], ...]:
    if isinstance(rules, str):
        table = composite(rules, box, epsilon)
    elif isinstance(rules, dict):
        unknown = set(rules) - set(_KEYS)
        if unknown:
            raise ValueError(f"lrp: unknown rule keys {sorted(unknown)}; the keys are {', '.join(_KEYS)}.")
        table = dict(rules)
        for key, rule in table.items():
            if not isinstance(rule, (Epsilon, Norm, ZPlus, AlphaBeta, Gamma, Flat, ZBox)):
                raise TypeError(
                    f"lrp: rules[{key!r}] must be a rule of gcj.attribution.rules (Epsilon(1e-6), ZPlus(), "
                    f"Gamma(0.25), AlphaBeta(2, 1), Flat(), ZBox(low, high), Norm()); got {rule!r}."
                )
    else:
        raise TypeError(
            f"lrp: rules must be a composite name ({', '.join(COMPOSITES)}) or a dict; got {rules!r}."
        )
    return tuple(sorted(table.items()))


def lrp(
    fn: Callable,
    x,
    target: Target = None,
    *,
    rules: str | dict[str, Any] = "epsilon_plus_flat",
    box: tuple[Any, Any] | None = None,
    epsilon: float = 1e-6,
    input: Any = None,
) -> jax.Array:
    """Layer-wise Relevance Propagation on any JAX model, with zennit's rules and composites.

    The target's score ``R = y^c`` is propagated back layer by layer; at a layer
    ``z_j = sum_i x_i w_ij + b_j`` the basic (ε) rule gives ``R_i = x_i sum_j w_ij R_j / (z_j + eps
    sign z_j)`` — the other rules are listed in :mod:`gradcam_jax.attribution.rules`. The
    model's jaxpr is read, not its modules: a bias and a folded batch norm after a conv are
    part of its layer; residual sums split relevance in proportion to their terms.

    Args:
      fn: any JAX callable ``x -> scores``; a tap works too.
      x: the input batch (any layout), or a pytree whose image ``input`` picks.
      target: as in :func:`gradcam_jax.grad_cam`; ``None`` is each example's top class.
      rules: a composite — ``"epsilon_plus_flat"`` (default), ``"epsilon_plus"``,
        ``"epsilon_gamma_box"`` (needs ``box``), ``"epsilon_alpha2_beta1"``,
        ``"epsilon_alpha2_beta1_flat"`` (zennit's), ``"epsilon"`` (Captum's default: ε = 1e-9
        everywhere), ``"zplus"`` — or a dict from ``"first"``, ``"conv"``, ``"dense"``,
        ``"sum"``, ``"add"`` to rules (``gcj.attribution.rules.Epsilon(0.25)``, ...).
      box: ``(low, high)`` input bounds for the ``ZBox`` rule of ``"epsilon_gamma_box"``.
      epsilon: the ε of the dense layers in the composites.

    Returns:
      Relevance shaped like the image, ``(B, ...)`` or ``(B, K, ...)`` for K targets.

    Raises:
      NotImplementedError: an operation on the path from the input to the scores has no rule
        (a product of two activations, say); the error lists them.

    Examples:
      >>> import jax.numpy as jnp, gradcam_jax as gcj
      >>> w = jnp.array([[1.0, -1.0], [2.0, 1.0]])
      >>> f = lambda x: jnp.maximum(x @ w, 0.0) @ jnp.eye(2)
      >>> gcj.lrp(f, jnp.array([[1.0, 1.0]]), 0, rules="epsilon").round(4).tolist()
      [[1.0, 2.0]]

    References:
      Bach et al., PLoS ONE 2015, https://doi.org/10.1371/journal.pone.0130140; Montavon et al.,
      "Layer-Wise Relevance Propagation: An Overview", 2019; zennit (Anders et al. 2021),
      https://arxiv.org/abs/2106.13200.
    """
    leaf, spec = gate(fn, x, target, input, "lrp")
    options = RelevanceOptions(_rules(rules, box, epsilon), leaf)
    image = jax.tree_util.tree_leaves(x)[leaf]
    return relevance_kernel(as_pytree(fn), x, spec, jnp.zeros_like(image), options=options)


def deeplift(fn: Callable, x, target: Target = None, *, baseline: Any = None, input: Any = None) -> jax.Array:
    """DeepLIFT with the Rescale rule, on any JAX model (as Captum's ``DeepLift``).

    Multipliers flow back from the target's score: through an elementwise activation
    ``y = f(x)`` the multiplier is ``(f(x) - f(x0)) / (x - x0)`` (its gradient where
    ``|x - x0| < 1e-10``), through everything else the gradient. The attribution is
    ``(x - x0) * m`` and sums to ``y^c(x) - y^c(x0)`` (summation-to-delta) for networks whose
    nonlinearities are elementwise.

    Args:
      fn, x, target, input: as in :func:`lrp`.
      baseline: the reference input ``x0``: ``None`` (zeros) or an array broadcastable to the image.

    Returns:
      Attributions shaped like the image, ``(B, ...)`` or ``(B, K, ...)``.

    References:
      Shrikumar, Greenside & Kundaje, "Learning Important Features Through Propagating
      Activation Differences", ICML 2017, https://arxiv.org/abs/1704.02685.
    """
    leaf, spec = gate(fn, x, target, input, "deeplift")
    image = jax.tree_util.tree_leaves(x)[leaf]
    ref = jnp.zeros_like(image) if baseline is None else check_baseline_shape(baseline, image, "deeplift")
    return relevance_kernel(as_pytree(fn), x, spec, ref, options=RelevanceOptions(None, leaf))
