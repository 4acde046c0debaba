"""Guided Backprop, Deconvnet, plain gradients, SmoothGrad and Guided Grad-CAM.

Guided Backpropagation and Deconvnet keep the forward pass and change only the backward rule
of ReLU:

* Guided Backpropagation (Springenberg et al. 2015): pass the gradient where the forward
  input is > 0 **and** the incoming gradient is > 0.
* Deconvnet (Zeiler & Fergus 2014): pass the incoming gradient where it is > 0, whatever the
  forward input.

:func:`guided_relu` and :func:`deconv_relu` are those rules as ``jax.custom_vjp`` functions;
:func:`guided` / :func:`deconvolved` apply them to any JAX function without editing it (the
jaxpr interpreter of :mod:`gradcam_jax._rules`). Clipped ReLUs (ReLU6) follow the same rules:
guided passes ``g`` where ``0 < x < c`` and ``g > 0``; deconvnet passes ``g`` where ``g > 0``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from . import methods
from ._callables import PytreeCallable, as_pytree
from ._grads import Grads, check_tap_target, tap_shapes
from ._maps import MapOptions, check_image_batch, kernel, maps_from_grads
from ._rules import (
    DECONV,
    GUIDED,
    Rule,
    count_relus,
    deconv_relu,
    deconv_relu6,
    guided_relu,
    guided_relu6,
    transform,
)
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
    "guided_relu",
    "deconv_relu",
    "guided_relu6",
    "deconv_relu6",
    "guided",
    "deconvolved",
    "count_relus",
    "guided_backprop",
    "deconvnet",
    "gradients",
    "smooth_grad",
    "guided_grad_cam",
]


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
    return transform(fn, GUIDED)


def deconvolved(fn: Callable) -> Callable:
    """``fn`` with every ReLU's backward rule replaced by Deconvnet's (see :func:`guided`)."""
    return transform(fn, DECONV)


# --------------------------------------------------------------------------------------------
# Pixel-space explainers
# --------------------------------------------------------------------------------------------


def _targets_second(grads, selected):
    """``pull_back``'s K-first layout ``(K, B, ...)`` as the explainers return it: ``(B, K, ...)``."""
    return grads if selected.ndim == 1 else jnp.moveaxis(grads, 0, 1)


@dataclasses.dataclass(frozen=True)
class InputGradOptions:
    """The static option of the input-gradient kernel: the backward rule (``None``: plain)."""

    rule: Rule | None = None


@kernel
def input_grads_kernel(fn: PytreeCallable, x, target: TargetSpec, *, options: InputGradOptions):
    """Input gradients of the explained scores under ``jit``, with ``options.rule`` at every ReLU."""
    call = scores_fn(fn.fn)
    if options.rule is not None:
        call = transform(call, options.rule)
    selected, pullback = jax.vjp(lambda x: select_scores(target, call(x)), x)
    (grads,) = pull_back(pullback, selected)
    return _targets_second(grads, selected)


def _input_grads(fn, x, target, rule):
    if not callable(fn):
        raise TypeError(
            f"Expected a callable x -> scores (a model, an apply function or a tap); got {type(fn).__name__}."
        )
    spec = target_spec(target, batch_size(x))
    check_target_against(spec, lambda: jax.eval_shape(scores_fn(fn), x))
    return input_grads_kernel(as_pytree(fn), x, spec, options=InputGradOptions(rule))


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
    return _input_grads(fn, x, target, GUIDED)


def deconvnet(fn: Callable, x, target: Target = None) -> jax.Array:
    """Deconvnet: input gradients with the Deconvnet ReLU rule (``g * (g > 0)``) at every ReLU.

    As :func:`guided_backprop` otherwise.

    References:
      Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks", ECCV 2014,
      https://arxiv.org/abs/1311.2901.
    """
    return _input_grads(fn, x, target, DECONV)


_PIXEL_EXPLAINERS = {"gradients": gradients, "guided_backprop": guided_backprop, "deconvnet": deconvnet}


def smooth_grad(
    fn: Callable,
    x,
    target: Target = None,
    *,
    key,
    n_samples: int = 25,
    noise_level: float = 0.15,
    method: str = "gradients",
    chunk_size: int | None = None,
):
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
    if method not in _PIXEL_EXPLAINERS:
        raise ValueError(f"smooth_grad: method={method!r} is not one of {', '.join(_PIXEL_EXPLAINERS)}.")
    explain = _PIXEL_EXPLAINERS[method]
    if target is None:
        # Each noisy copy explains the clean input's top class, not its own.
        target = jnp.argmax(jax.lax.stop_gradient(scores_fn(fn)(x)), axis=-1)
    axes = tuple(range(1, x.ndim))
    sigma = noise_level * (jnp.max(x, axis=axes, keepdims=True) - jnp.min(x, axis=axes, keepdims=True))
    noise = jax.random.normal(key, (n_samples,) + x.shape, jnp.float32).astype(x.dtype) * sigma

    def one(n):
        return explain(fn, x + n, target)

    grads = jax.lax.map(one, noise, batch_size=chunk_size) if chunk_size else jax.vmap(one)(noise)
    return jnp.mean(grads, axis=0)


# --------------------------------------------------------------------------------------------
# Guided Grad-CAM
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GuidedGradCamOptions:
    """The static options of the Guided Grad-CAM kernel."""

    interpolation: str = "bilinear"
    normalize: bool = True
    drop_tokens: int = 0
    grid: tuple[int, int] | None = None


@kernel
def guided_grad_cam_kernel(tap: Tap, x, target: TargetSpec, *, options: GuidedGradCamOptions):
    """Guided Grad-CAM under ``jit`` (see :func:`guided_grad_cam`)."""
    _, act = tap_shapes(tap, x)
    delta0 = jnp.zeros(act.shape, act.dtype)

    # One forward pass with guided ReLUs everywhere: scores, A, and the guided pullback to x.
    def guided_objective(x, delta):
        scores, a = tap(x, delta)
        return select_scores(target, scores), a

    selected, pullback, a = jax.vjp(transform(guided_objective, GUIDED), x, delta0, has_aux=True)
    gb = _targets_second(pull_back(lambda c: pullback(c)[0], selected), selected)

    # Grad-CAM needs dA under the model's own ReLUs: pull back through the part above the
    # layer only (under jit the layers below are dead code in tap.head).
    sel2, head_pullback = jax.vjp(lambda a_: select_scores(target, tap.head(x, a_)), a)
    (da,) = pull_back(head_pullback, sel2)  # (B, ...) or (K, B, ...)
    cam_options = MapOptions(
        upsample=True,
        normalize=False,
        relu=True,
        interpolation=options.interpolation,
        drop_tokens=options.drop_tokens,
        grid=options.grid,
    )
    cam = maps_from_grads(Grads(None, a, da, sel2), methods.grad_cam, cam_options, tuple(x.shape[1:3]))
    out = gb.astype(jnp.float32) * cam[..., None]
    if options.normalize:
        scale = jnp.max(jnp.abs(out), axis=(-3, -2, -1), keepdims=True)
        out = jnp.where(scale > 0, out / jnp.where(scale > 0, scale, 1.0), 0.0)
    return out


def guided_grad_cam(
    tap,
    x,
    target: Target = None,
    *,
    interpolation: str = "bilinear",
    normalize: bool = True,
    drop_tokens: int = 0,
    grid=None,
) -> jax.Array:
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
    check_image_batch(x, "guided_grad_cam")
    # MapOptions checks interpolation, drop_tokens and grid once, with the usual messages.
    checked = MapOptions(interpolation=interpolation, drop_tokens=drop_tokens, grid=grid)
    spec = target_spec(target, batch_size(x))
    check_tap_target(tap, x, spec)
    options = GuidedGradCamOptions(checked.interpolation, bool(normalize), checked.drop_tokens, checked.grid)
    return guided_grad_cam_kernel(tap, x, spec, options=options)
