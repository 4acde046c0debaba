"""The engine of the gradient methods: the activation and its gradient from one forward pass.

``activations_and_grads(tap, x, target)``: one ``jax.vjp`` through the tap with respect to a
zero ``delta`` at the layer returns the scores, the activation ``A`` and a pullback; the
pullback of the target's cotangent is ``dA``. For K targets per example the pullback is
``vmap``-ed over K cotangents — still one forward pass. The CAM explainers, Guided Grad-CAM
and the dataset runner all get ``(A, dA)`` here.

Multi-layer taps (internal API; see :mod:`gradcam_jax._tap` for the tap side)
-----------------------------------------------------------------------------
For a tap with ``tap.multi`` (built with ``layers=[...]``), :func:`grads_for_spec` and
:func:`activations_and_grads` take the one ``jax.vjp`` with respect to a dict of zero deltas,
one per layer, so one forward pass and one (vmapped) pullback give every layer's gradient.
They return a :class:`Grads` whose ``activation`` is ``{layer: A}`` and ``grads`` is
``{layer: dA}`` (each ``(B, ...)``, or ``(K, B, ...)`` for K targets), keyed by the layers'
full names in call order; ``scores`` and ``selected`` are as for one layer.
:meth:`Grads.layer` gives one layer's :class:`Grads` (what ``maps_from_grads`` takes) and
:meth:`Grads.per_layer` all of them, in order. :func:`tap_shapes` returns ``(scores, {layer:
ShapeDtypeStruct})``. :func:`check_tap_target` refuses a multi-layer tap unless
``several=True`` (single-layer explainers get a message pointing at ``tap.select``); a
multi-layer explainer passes ``several=True`` and then calls :func:`grads_for_spec`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._callables import as_pytree
from ._inputs import check_batch
from ._tap import Tap, as_tap, scores_fn
from ._targets import (
    Target,
    TargetSpec,
    batch_size,
    check_target_against,
    is_concrete,
    pull_back,
    select_scores,
    target_spec,
)

__all__ = [
    "Grads",
    "activations_and_grads",
    "grads_for_spec",
    "tap_shapes",
    "check_tap_target",
    "scores_shapes",
    "check_fn_target",
    "zero_gradients",
    "check_dead",
]


class Grads(NamedTuple):
    """What one forward pass and one (vmapped) pullback give.

    scores: the model's output.
    activation: ``A``, ``(B, ...)``; for a multi-layer tap a dict ``{layer: A}`` in call order.
    grads: ``dA``; ``(B, ...)`` for one target per example, ``(K, B, ...)`` for K targets; for a
      multi-layer tap a dict ``{layer: dA}`` with the same keys.
    selected: the explained scores, ``(B,)`` or ``(B, K)``.
    """

    scores: Any
    activation: Any
    grads: Any
    selected: jax.Array

    @property
    def multi(self) -> bool:
        """Whether these are several layers' (dicts keyed by layer)."""
        return isinstance(self.activation, Mapping)

    def layer(self, name: str) -> Grads:
        """One layer's :class:`Grads` from a multi-layer tap's (scores and selection shared)."""
        if not self.multi:
            raise ValueError("Grads.layer: these gradients are of one layer already (not a dict).")
        if name not in self.activation:
            raise ValueError(f"Grads.layer: no layer {name!r}; the layers: {', '.join(self.activation)}.")
        return Grads(self.scores, self.activation[name], self.grads[name], self.selected)

    def per_layer(self) -> dict[str, Grads]:
        """``{layer: Grads}`` in call order (one entry, keyed by ``None``, for a single layer)."""
        if not self.multi:
            return {None: self}  # type: ignore[dict-item]
        return {name: self.layer(name) for name in self.activation}  # call order: a LayerDict's


# One jitted function for shape inference, so eval_shape hits JAX's trace cache.
_run_tap = jax.jit(lambda tap, x: tap(x))


def tap_shapes(tap: Tap, x):
    """The shapes and dtypes of ``tap(x)``: ``(scores, activation)``, without running it."""
    return _run_tap.eval_shape(tap, x)


# The same for a model called as x -> scores (a function, a module, a tap), passed as a pytree.
_run_scores = jax.jit(lambda fn, x: scores_fn(fn.fn)(x))


def scores_shapes(fn, x):
    """The shapes and dtypes of the scores ``fn(x)`` (a tap's scores for a tap), without running it."""
    return _run_scores.eval_shape(as_pytree(fn), x)


def check_fn_target(fn, x, spec: TargetSpec, who: str = "explain") -> None:
    """:func:`check_tap_target` for a model called as ``x -> scores``."""
    check_target_against(spec, lambda: scores_shapes(fn, x), batch_size(x), who)


def check_tap_target(tap: Tap, x, spec: TargetSpec, who: str = "explain", *, several: bool = False) -> None:
    """Check a target against the tap's scores (see :func:`check_target_against`; no compute).

    A multi-layer tap is refused unless ``several`` (the explainer handles dicts of layers):
    the message lists the layers and says how to pick one.
    """
    if getattr(tap, "multi", False) and not several:
        names = list(tap_shapes(tap, x)[1])
        raise ValueError(
            f"{who} explains one layer, but this tap records {len(names)} layers ({', '.join(names)}). "
            f"Pick one with tap.select(name) (e.g. tap.select({names[-1]!r})), or use a method that fuses "
            f"several layers (gcj.cam(..., fuse='mean' | 'max' | 'layer_cam'))."
        )
    check_target_against(spec, lambda: tap_shapes(tap, x)[0], batch_size(x), who)


def activations_and_grads(tap, x, target: Target = None) -> Grads:
    """The activation at the tap and the gradient of the target score with respect to it.

    One forward pass: ``jax.vjp`` of ``delta -> target(tap(x, delta))`` at ``delta = 0``. K
    targets per example ``vmap`` the pullback over K cotangents. For a multi-layer tap
    (``layers=[...]``) the deltas are a dict, one per layer: still one forward pass and one
    pullback, and ``activation`` and ``grads`` are dicts ``{layer: array}`` in call order.

    Args:
      tap: a :class:`~gradcam_jax.Tap` or a callable ``tap(x, delta) -> (scores, A)``.
      x: the input batch.
      target: see :func:`gradcam_jax.grad_cam`.

    Returns:
      :class:`Grads` (dicts of layers for a multi-layer tap; :meth:`Grads.layer` picks one).

    Examples:
      >>> import jax.numpy as jnp, gradcam_jax as gcj
      >>> tap = gcj.split_tap(lambda x: 2.0 * x, lambda a: a.sum(axis=(1, 2)))
      >>> out = gcj.activations_and_grads(tap, jnp.ones((1, 2, 2, 3)), target=[0, 2])
      >>> out.activation.shape, out.grads.shape, out.selected.tolist()
      ((1, 2, 2, 3), (2, 1, 2, 2, 3), [[8.0, 8.0]])
    """
    tap = as_tap(tap)
    check_batch(x, "activations_and_grads")
    spec = target_spec(target, batch_size(x))
    check_tap_target(tap, x, spec, "activations_and_grads", several=True)
    return grads_for_spec(tap, x, spec)


def grads_for_spec(tap: Tap, x, spec: TargetSpec) -> Grads:
    """:func:`activations_and_grads` for a target already in normal form."""
    scores_spec, act_spec = tap_shapes(tap, x)
    check_target_against(spec, lambda: scores_spec)
    specs = act_spec.items() if isinstance(act_spec, Mapping) else [("", act_spec)]
    for name, a_spec in specs:
        if not jnp.issubdtype(a_spec.dtype, jnp.floating):
            layer = f" {name!r}" if name else ""
            raise TypeError(
                f"The tapped layer{layer}'s output has dtype {a_spec.dtype}; a float activation is needed."
            )
    delta0 = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), act_spec)
    batch = jax.tree_util.tree_leaves(act_spec)[0].shape[0]

    def objective(delta):
        scores, a = tap(x, delta)
        return select_scores(spec, scores), (scores, a)

    selected, pullback, (scores, a) = jax.vjp(objective, delta0, has_aux=True)
    if selected.shape[0] != batch:
        raise ValueError(
            f"The explained scores have {selected.shape[0]} rows but the activation's batch is "
            f"{batch}: a callable target must keep the batch axis."
        )
    (grads,) = pull_back(pullback, selected)
    return Grads(scores, a, grads, selected)


def zero_gradients(out: Grads, drop_tokens: int = 0) -> jax.Array:
    """Where ``dA`` is exactly zero at every position and channel: ``(B,)``, or ``(B, K)`` for K targets.

    ``drop_tokens`` leading tokens of a token activation ``(B, N, C)`` are left out (a class
    token's gradient is not part of the map). An example whose explained score is NaN is not
    counted: its map is NaN (see :func:`~gradcam_jax._maps.finish_maps`), not all zeros. For a
    multi-layer tap: where every layer's ``dA`` is zero.
    """
    if out.multi:  # dead when no tapped layer has a gradient: the score depends on none of them
        per = [zero_gradients(g, drop_tokens) for g in out.per_layer().values()]
        return functools.reduce(jnp.logical_and, per)
    g = out.grads
    if out.selected.ndim == 1:
        g = g[None]
    if drop_tokens and out.activation.ndim == 3:
        g = g[:, :, drop_tokens:]
    dead = jnp.all(g.reshape(g.shape[0], g.shape[1], -1) == 0, axis=-1)  # (K, B)
    dead = dead[0] if out.selected.ndim == 1 else dead.T
    return dead & ~jnp.isnan(out.selected)


def check_dead(dead, method) -> None:
    """Refuse maps built from an all-zero ``dA`` (a concrete ``dead`` only: under an outer
    ``jit`` the all-zero maps are returned, as documented in :func:`gradcam_jax.cam`)."""
    if not is_concrete(dead):
        return
    dead = np.asarray(dead)
    if not dead.any():
        return
    rows = sorted({int(i) for i in np.argwhere(dead)[:, 0]})
    raise ValueError(
        f"{method}: the gradient of the explained score with respect to the tapped layer is exactly zero "
        f"everywhere for example(s) {rows[:10]}: the score does not depend on this layer's output, so the "
        f"map would be all zeros. Likely causes: a transformer whose head reads only the class token, "
        f"tapped at the last block's output (tap the last block's input or its first LayerNorm instead, "
        f"with drop_tokens=1); a head whose weights are zero (e.g. a zero-initialised classifier); a "
        f"callable target that does not depend on the model's output."
    )
