"""Guided Backprop, Deconvnet, plain gradients, SmoothGrad and Guided Grad-CAM.

Guided Backpropagation and Deconvnet keep the forward pass and change only the backward rule
of ReLU:

* Guided Backpropagation (Springenberg et al. 2015): pass the gradient where the forward
  input is > 0 **and** the incoming gradient is > 0.
* Deconvnet (Zeiler & Fergus 2014): pass the incoming gradient where it is > 0, whatever the
  forward input.

:func:`guided_relu` and :func:`deconv_relu` are those rules as ``jax.custom_vjp`` functions;
:func:`guided` / :func:`deconvolved` apply them to any JAX function without editing it (the
guided / deconv rule sets of :mod:`gradcam_jax._rules` on the jaxpr walker of
:mod:`gradcam_jax._engine`). Clipped ReLUs (ReLU6) follow the same rules:
guided passes ``g`` where ``0 < x < c`` and ``g > 0``; deconvnet passes ``g`` where ``g > 0``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from . import methods
from ._callables import PytreeCallable, as_pytree
from ._grads import Grads, check_fn_target, check_tap_target, tap_shapes
from ._inputs import check_image_array, image_leaf, leaf_index, spatial_size, with_leaf
from ._maps import MapOptions, check_images, kernel, maps_from_grads
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
    nan_where,
    pull_back,
    select_scores,
    target_spec,
)
from .attribution.noise import noise_tunnel

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
    """The static options of the input-gradient kernel: the backward rule (``None``: plain) and
    which leaf of the input is differentiated (the image)."""

    rule: Rule | None = None
    leaf: int = 0


@kernel
def input_grads_kernel(fn: PytreeCallable, x, target: TargetSpec, *, options: InputGradOptions):
    """Input gradients of the explained scores under ``jit``, with ``options.rule`` at every ReLU."""
    call = scores_fn(fn.fn)
    if options.rule is not None:
        call = transform(call, options.rule)

    def explained(image):
        return select_scores(target, call(with_leaf(x, options.leaf, image)))

    selected, pullback = jax.vjp(explained, jax.tree_util.tree_leaves(x)[options.leaf])
    (grads,) = pull_back(pullback, selected)
    return nan_where(jnp.isnan(selected), _targets_second(grads, selected))  # a NaN score: NaN


def _image_leaf(x, input, who: str) -> int:
    """The input gate of the pixel-space explainers: the leaf differentiated, any layout."""
    leaf = leaf_index(x, input, who)
    check_image_array(jax.tree_util.tree_leaves(x)[leaf], who)
    return leaf


def _input_grads(fn, x, target, rule, input, who):
    if not callable(fn):
        raise TypeError(
            f"Expected a callable x -> scores (a model, an apply function or a tap); got {type(fn).__name__}."
        )
    leaf = _image_leaf(x, input, who)
    spec = target_spec(target, batch_size(x))
    check_fn_target(fn, x, spec, who)
    return input_grads_kernel(as_pytree(fn), x, spec, options=InputGradOptions(rule, leaf))


def gradients(fn: Callable, x, target: Target = None, *, input: Any = None) -> jax.Array:
    """Plain input gradients ``d y^c / d x`` ("vanilla" saliency, Simonyan et al. 2014).

    Args:
      fn: any JAX callable ``x -> scores`` (a Flax ``apply`` closure, an Equinox model, a tap).
      x: the input batch (any layout), or a pytree of arrays whose image ``input`` picks.
      target: as in :func:`gradcam_jax.grad_cam`.
      input: for a pytree input, the leaf differentiated (see :func:`gradcam_jax.cam`).

    Returns:
      Gradients shaped like the image — ``(B, H, W, C)`` — or ``(B, K, H, W, C)`` for K targets.
    """
    return _input_grads(fn, x, target, None, input, "gradients")


def guided_backprop(fn: Callable, x, target: Target = None, *, input: Any = None) -> jax.Array:
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
    return _input_grads(fn, x, target, GUIDED, input, "guided_backprop")


def deconvnet(fn: Callable, x, target: Target = None, *, input: Any = None) -> jax.Array:
    """Deconvnet: input gradients with the Deconvnet ReLU rule (``g * (g > 0)``) at every ReLU.

    As :func:`guided_backprop` otherwise.

    References:
      Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks", ECCV 2014,
      https://arxiv.org/abs/1311.2901.
    """
    return _input_grads(fn, x, target, DECONV, input, "deconvnet")


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
    input: Any = None,
):
    """SmoothGrad: the mean of input gradients over Gaussian-noised copies of ``x``.

    ``sigma = noise_level * (max(x_b) - min(x_b))`` per example; samples are ``vmap``-ed (in
    chunks of ``chunk_size`` samples when given, to bound memory). The case
    ``kind="smoothgrad"`` of :func:`gradcam_jax.noise_tunnel` over a pixel explainer.

    Args:
      fn, x, target: as in :func:`gradients`.
      key: a ``jax.random`` key (explicit: the result is reproducible).
      n_samples: noisy copies per example.
      noise_level: the noise's standard deviation as a fraction of each example's value range.
      method: ``"gradients"``, ``"guided_backprop"`` or ``"deconvnet"``.
      chunk_size: samples evaluated at once (default: all).
      input: for a pytree input, the image: only it gets noise and gradients.

    References:
      Smilkov et al., "SmoothGrad: removing noise by adding noise", 2017,
      https://arxiv.org/abs/1706.03825.
    """
    if method not in _PIXEL_EXPLAINERS:
        raise ValueError(f"smooth_grad: method={method!r} is not one of {', '.join(_PIXEL_EXPLAINERS)}.")
    return noise_tunnel(
        _PIXEL_EXPLAINERS[method], fn, x, target, key=key, n_samples=n_samples, stdev=noise_level,
        kind="smoothgrad", chunk_size=chunk_size, input=input,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Guided Grad-CAM
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GuidedGradCamOptions:
    """The static options of the Guided Grad-CAM kernel: the Grad-CAM map's options and
    whether the product is normalised."""

    maps: MapOptions
    normalize: bool = True


@kernel
def guided_grad_cam_kernel(tap: Tap, x, target: TargetSpec, *, options: GuidedGradCamOptions):
    """Guided Grad-CAM under ``jit`` (see :func:`guided_grad_cam`)."""
    _, act = tap_shapes(tap, x)
    delta0 = jnp.zeros(act.shape, act.dtype)
    view = check_images(x, options.maps, "guided_grad_cam")

    # One forward pass with guided ReLUs everywhere: scores, A, and the guided pullback to the image.
    def guided_objective(image, delta):
        scores, a = tap(with_leaf(x, view.leaf, image), delta)
        return select_scores(target, scores), a

    image = image_leaf(x, view)
    selected, pullback, a = jax.vjp(transform(guided_objective, GUIDED), image, delta0, has_aux=True)
    gb = nan_where(
        jnp.isnan(selected), _targets_second(pull_back(lambda c: pullback(c)[0], selected), selected)
    )

    # Grad-CAM needs dA under the model's own ReLUs: pull back through the part above the
    # layer only (under jit the layers below are dead code in tap.head).
    sel2, head_pullback = jax.vjp(lambda a_: select_scores(target, tap.head(x, a_)), a)
    (da,) = pull_back(head_pullback, sel2)  # (B, ...) or (K, B, ...)
    rank = view.spatial_rank
    cam = maps_from_grads(
        Grads(None, a, da, sel2), methods.grad_cam, options.maps, spatial_size(x, view), rank
    )
    # The map broadcasts over the image's channel axis, wherever its layout puts it.
    channel = cam.ndim if not view.layout.channels_first else cam.ndim - rank
    out = gb.astype(jnp.float32) * jnp.expand_dims(cam, channel)
    if options.normalize:  # a NaN (or infinite) scale: a NaN map, not a zero one
        scale = jnp.max(jnp.abs(out), axis=tuple(range(-rank - 1, 0)), keepdims=True)
        out = jnp.where(scale > 0, out / jnp.where(scale > 0, scale, 1.0), 0.0)
        out = jnp.where(jnp.isfinite(scale), out, jnp.nan)
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
    layout: str | None = None,
    input: Any = None,
) -> jax.Array:
    """Guided Grad-CAM: Guided Backprop ⊙ the Grad-CAM map upsampled to the input.

    High resolution (from Guided Backprop) and class-discriminative (from Grad-CAM). One
    guided forward pass gives the scores, the activation and the guided input gradients; the
    Grad-CAM weights come from a pullback through the part of the model above the layer with
    its ordinary ReLUs.

    Args:
      tap: the model split at the Grad-CAM layer.
      x: images ``(B, H, W, C)`` (signals, volumes, channels-first with ``layout=``, a pytree
        with ``input=``: see :func:`gradcam_jax.cam`).
      target: as in :func:`gradcam_jax.grad_cam`.
      interpolation: how the Grad-CAM map is upsampled: ``"bilinear"`` (the paper's) or
        ``"nearest"`` (Captum's ``GuidedGradCam`` default).
      normalize: divide each map by its largest absolute value (to [-1, 1], signs kept);
        ``False`` returns the raw product ``GB * ReLU(L)``.
      drop_tokens, grid, layout, input: as in :func:`gradcam_jax.cam`.

    Returns:
      ``float32``, shaped like the image (``(B, H, W, C)``), or ``(B, K, ...)`` for K targets.

    References:
      Selvaraju et al., ICCV 2017, §3.2, https://arxiv.org/abs/1610.02391.
    """
    tap = as_tap(tap)
    # The Grad-CAM factor: upsampled, ReLU'd, not normalised (the product is).
    maps = MapOptions(True, False, True, interpolation, False, drop_tokens, grid, layout, input)
    check_images(x, maps, "guided_grad_cam")  # the input gate
    spec = target_spec(target, batch_size(x))
    check_tap_target(tap, x, spec, "guided_grad_cam")
    return guided_grad_cam_kernel(tap, x, spec, options=GuidedGradCamOptions(maps, bool(normalize)))
