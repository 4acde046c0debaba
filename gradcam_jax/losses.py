"""Losses for training with explanations: be right for the right reasons.

Each loss is a pure function of arrays, jittable and differentiable in the model's parameters
(gradients of gradients: the explanation is part of the computation graph, not a detached
picture). Add it to the task loss with a weight and train as usual, e.g. with optax:

>>> import jax, jax.numpy as jnp, optax
>>> import gradcam_jax as gcj
>>> def apply(p, x, edit):                     # a tap: (scores, A) of a tiny net
...     a = jax.nn.relu(x * p["w"])             # the layer explained, (B, 4, 4, 1)
...     seen = a if edit is None else edit(a)
...     return seen.mean(axis=(1, 2)) @ p["v"], a
>>> tap = gcj.Tap(apply, {"w": jnp.ones(1), "v": jnp.array([[1.0, -1.0]])})
>>> x, y = jnp.ones((2, 4, 4, 1)), jnp.array([0, 1])
>>> mask = jnp.zeros((2, 4, 4)).at[:, :2, :2].set(1.0)   # the annotated region
>>> def loss(params):
...     logits, _ = apply(params, x, None)
...     task = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
...     rrr = gcj.losses.input_gradient_penalty(lambda p, x: apply(p, x, None)[0], params, x, y, mask)
...     return task + 10.0 * rrr + gcj.losses.cam_alignment(tap.with_params(params), x, y, mask)
>>> opt = optax.adam(1e-2)
>>> params = tap.params
>>> state = opt.init(params)
>>> for _ in range(3):
...     updates, state = opt.update(jax.grad(loss)(params), state)
...     params = optax.apply_updates(params, updates)
>>> sorted(params)
['v', 'w']

(For a Flax model, build the tap inside the loss from the parameters being differentiated:
``gcj.linen_tap(module, {"params": p}, layer)``; a :class:`~gradcam_jax.Tap` is a pytree, so
``tap.with_params(p)`` works too.)
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from . import methods
from ._grads import grads_for_spec
from ._tap import as_tap
from ._targets import TargetSpec, batch_size
from .postprocess import upsample_to

__all__ = ["input_gradient_penalty", "cam_alignment", "outside_fraction", "ALIGNMENT_METHODS"]


def _at_least_f32(a):
    """Half-precision values computed in float32; float64 kept (finite-difference checks)."""
    return a.astype(jnp.promote_types(a.dtype, jnp.float32))


def _labels(y, b: int, who: str):
    y = jnp.asarray(y)
    if y.shape != (b,) or not jnp.issubdtype(y.dtype, jnp.integer):
        raise ValueError(
            f"{who}: y must hold one int class label per example, shape ({b},); got {y.shape} {y.dtype}."
        )
    return y


def _mask_for(mask, x_shape, who: str):
    """The annotated-region mask broadcast to ``x_shape`` (B, H, W, C)."""
    mask = jnp.asarray(mask)
    b, h, w = x_shape[0], x_shape[1], x_shape[2]
    if mask.ndim == 2 and mask.shape == (h, w):
        mask = mask[None]
    if mask.ndim == 3 and mask.shape[1:] == (h, w):
        mask = mask[..., None]
    if mask.ndim != 4 or mask.shape[1:3] != (h, w) or mask.shape[0] not in (1, b):
        raise ValueError(
            f"{who}: mask must mark the annotated region of the input, (H, W), (B, H, W) or "
            f"(B, H, W, C) with (H, W) = ({h}, {w}) and B = {b}; got shape {tuple(mask.shape)}."
        )
    return jnp.broadcast_to(mask, x_shape).astype(jnp.float32)


def input_gradient_penalty(fn: Callable, params, x, y, mask, *, all_classes: bool = True) -> jax.Array:
    """ "Right for the Right Reasons": squared input gradients of the log-probabilities outside
    the annotated region.

    ``penalty = mean_b sum_{i} ((1 - mask_{b,i}) * d/dx_{b,i} sum_k log p_k(x_b))^2``
    (Ross, Hughes & Doshi-Velez, IJCAI 2017, https://arxiv.org/abs/1703.03717, eq. 1: their
    annotation ``A`` marks the *irrelevant* inputs, here ``1 - mask``; they sum over the batch,
    here it is averaged so the weight does not depend on the batch size).

    Args:
      fn: ``fn(params, x) -> logits (B, classes)``.
      params: the parameters (the loss is differentiable in them).
      x: inputs ``(B, H, W, C)``.
      y: int labels ``(B,)``; used when ``all_classes=False``.
      mask: the annotated (relevant) region, 1 inside: ``(H, W)``, ``(B, H, W)`` or
        ``(B, H, W, C)``; fractional values weight the penalty.
      all_classes: the paper's ``sum_k log p_k``; ``False`` penalises only ``log p_y``.

    Returns:
      A scalar.
    """
    who = "input_gradient_penalty"
    if not hasattr(x, "ndim") or x.ndim != 4:
        raise ValueError(
            f"{who}: x must be images (B, H, W, C); got {getattr(x, 'shape', type(x).__name__)}."
        )
    b = x.shape[0]
    y = _labels(y, b, who)
    outside = 1.0 - _mask_for(mask, x.shape, who)

    def log_prob_sum(xx):
        logits = fn(params, xx)
        if getattr(logits, "ndim", 0) != 2 or logits.shape[0] != b:
            raise ValueError(f"{who}: fn(params, x) must return logits (B, classes); got {logits.shape}.")
        logp = jax.nn.log_softmax(_at_least_f32(logits), axis=-1)
        if all_classes:
            return jnp.sum(logp)
        return jnp.sum(jnp.take_along_axis(logp, y[:, None], axis=-1))

    g = jax.grad(log_prob_sum)(x)
    return jnp.sum((outside * g) ** 2) / b


def outside_fraction(maps, mask, eps: float = 1e-8) -> jax.Array:
    """The fraction of each map's mass outside a region: ``1 - sum(m * L) / (sum(L) + eps)``.

    ``maps`` ``(B, H, W)`` non-negative, ``mask`` ``(H, W)`` or ``(B, H, W)``; returns ``(B,)``:
    0 when all the mass is inside the region, 1 when none is — an all-zero map scores 1 (it
    shows no evidence in the region), so a loss built on it cannot be lowered by switching the
    map off.

    >>> import jax.numpy as jnp
    >>> outside_fraction(jnp.array([[[1.0, 3.0]], [[0.0, 0.0]]]), jnp.array([[1.0, 0.0]])).tolist()
    [0.75, 1.0]
    """
    maps = _at_least_f32(jnp.asarray(maps))
    mask = jnp.broadcast_to(jnp.asarray(mask, maps.dtype), maps.shape)
    return 1.0 - jnp.sum(mask * maps, axis=(-2, -1)) / (jnp.sum(maps, axis=(-2, -1)) + eps)


ALIGNMENT_METHODS = ("grad_cam", "hires_cam", "layer_cam", "xgrad_cam")


def cam_alignment(tap, x, y, mask, *, method: str = "grad_cam") -> jax.Array:
    """Grad-CAM mass outside the annotated region, differentiable through the tap.

    ``L_b = ReLU(sum_k w_k A^k)`` with ``w_k`` the spatial mean of ``dy^{y_b}/dA^k`` (Grad-CAM,
    Selvaraju et al. 2017), upsampled bilinearly to the mask's size, and
    ``loss = mean_b (1 - sum(mask_b * L_b) / (sum(L_b) + eps))``: the fraction of the map's
    mass outside the region (:func:`outside_fraction`) — scale-free, so the network cannot lower
    it by shrinking the map, and 1 for an all-zero map, so it cannot by switching it off.
    This is the attention-mining idea of GAIN (Li et al., CVPR 2018,
    https://arxiv.org/abs/1802.10171) with the external supervision of its section 4, in the
    form of a mass penalty rather than GAIN's pixel-wise map loss.

    Args:
      tap: a :class:`~gradcam_jax.Tap` (params are its leaves: differentiate through
        ``tap.with_params(p)``) or a callable ``tap(x, delta) -> (scores, A)``.
      x: inputs ``(B, H, W, C)``.
      y: int labels ``(B,)``: the class whose map is aligned.
      mask: the annotated region, 1 inside, ``(H, W)`` or ``(B, H, W)`` (any resolution; the map
        is resized to it).
      method: the map penalised: ``"grad_cam"``, or ``"hires_cam"`` (``sum_k g^k * A^k``,
        element-wise: faithful to heads that are not a global pool, e.g. flatten -> dense),
        ``"layer_cam"``, ``"xgrad_cam"`` (formulas of :mod:`gradcam_jax.methods`).

    Returns:
      A scalar in ``[0, 1]``.
    """
    who = "cam_alignment"
    if method not in ALIGNMENT_METHODS:
        raise ValueError(f"{who}: method must be one of {ALIGNMENT_METHODS}; got {method!r}.")
    tap = as_tap(tap)
    b = batch_size(x)
    y = _labels(y, b, who)
    mask = _at_least_f32(jnp.asarray(mask))
    if mask.ndim not in (2, 3) or (mask.ndim == 3 and mask.shape[0] != b):
        raise ValueError(f"{who}: mask must be (H, W) or (B, H, W) with B = {b}; got {tuple(mask.shape)}.")
    out = grads_for_spec(tap, x, TargetSpec("index", y.astype(jnp.int32)))
    a, g = _at_least_f32(out.activation), _at_least_f32(out.grads)
    if a.ndim != 4:
        raise ValueError(f"{who}: the tapped layer must be a feature map (B, h, w, C); got {a.shape}.")
    raw = jax.nn.relu(getattr(methods, method)(a, g))  # (B, h, w)
    maps = upsample_to(raw, mask.shape[-2:], "bilinear")
    return jnp.mean(outside_fraction(maps, mask))
