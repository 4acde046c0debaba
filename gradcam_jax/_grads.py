"""The engine of the gradient methods: the activation and its gradient from one forward pass.

``activations_and_grads(tap, x, target)``: one ``jax.vjp`` through the tap with respect to a
zero ``delta`` at the layer returns the scores, the activation ``A`` and a pullback; the
pullback of the target's cotangent is ``dA``. For K targets per example the pullback is
``vmap``-ed over K cotangents — still one forward pass. The CAM explainers, Guided Grad-CAM
and the dataset runner all get ``(A, dA)`` here.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ._callables import as_pytree
from ._inputs import check_batch
from ._tap import Tap, as_tap, scores_fn
from ._targets import (
    Target,
    TargetSpec,
    batch_size,
    check_target_against,
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
]


class Grads(NamedTuple):
    """What one forward pass and one (vmapped) pullback give.

    scores: the model's output.
    activation: ``A``, ``(B, ...)``.
    grads: ``dA``; ``(B, ...)`` for one target per example, ``(K, B, ...)`` for K targets.
    selected: the explained scores, ``(B,)`` or ``(B, K)``.
    """

    scores: Any
    activation: jax.Array
    grads: jax.Array
    selected: jax.Array


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


def check_tap_target(tap: Tap, x, spec: TargetSpec, who: str = "explain") -> None:
    """Check a target against the tap's scores (see :func:`check_target_against`; no compute)."""
    check_target_against(spec, lambda: tap_shapes(tap, x)[0], batch_size(x), who)


def activations_and_grads(tap, x, target: Target = None) -> Grads:
    """The activation at the tap and the gradient of the target score with respect to it.

    One forward pass: ``jax.vjp`` of ``delta -> target(tap(x, delta))`` at ``delta = 0``. K
    targets per example ``vmap`` the pullback over K cotangents.

    Args:
      tap: a :class:`~gradcam_jax.Tap` or a callable ``tap(x, delta) -> (scores, A)``.
      x: the input batch.
      target: see :func:`gradcam_jax.grad_cam`.

    Returns:
      :class:`Grads`.

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
    check_tap_target(tap, x, spec, "activations_and_grads")
    return grads_for_spec(tap, x, spec)


def grads_for_spec(tap: Tap, x, spec: TargetSpec) -> Grads:
    """:func:`activations_and_grads` for a target already in normal form."""
    scores_spec, act_spec = tap_shapes(tap, x)
    check_target_against(spec, lambda: scores_spec)
    if not jnp.issubdtype(act_spec.dtype, jnp.floating):
        raise TypeError(
            f"The tapped layer's output has dtype {act_spec.dtype}; a float activation is needed."
        )
    delta0 = jnp.zeros(act_spec.shape, act_spec.dtype)

    def objective(delta):
        scores, a = tap(x, delta)
        return select_scores(spec, scores), (scores, a)

    selected, pullback, (scores, a) = jax.vjp(objective, delta0, has_aux=True)
    if selected.shape[0] != act_spec.shape[0]:
        raise ValueError(
            f"The explained scores have {selected.shape[0]} rows but the activation's batch is "
            f"{act_spec.shape[0]}: a callable target must keep the batch axis."
        )
    (grads,) = pull_back(pullback, selected)
    return Grads(scores, a, grads, selected)


def zero_gradients(out: Grads, drop_tokens: int = 0) -> jax.Array:
    """Where ``dA`` is exactly zero at every position and channel: ``(B,)``, or ``(B, K)`` for K targets.

    ``drop_tokens`` leading tokens of a token activation ``(B, N, C)`` are left out (a class
    token's gradient is not part of the map). An example whose explained score is NaN is not
    counted: its map is NaN (see :func:`~gradcam_jax._maps.finish_maps`), not all zeros.
    """
    g = out.grads
    if out.selected.ndim == 1:
        g = g[None]
    if drop_tokens and out.activation.ndim == 3:
        g = g[:, :, drop_tokens:]
    dead = jnp.all(g.reshape(g.shape[0], g.shape[1], -1) == 0, axis=-1)  # (K, B)
    dead = dead[0] if out.selected.ndim == 1 else dead.T
    return dead & ~jnp.isnan(out.selected)
