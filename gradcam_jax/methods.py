"""The gradient CAM methods: each a small pure function of ``(A, dA)``.

Every function here is a *raw-map formula*: it takes the activation ``A`` and the gradient
of the explained score with respect to it, ``dA`` (both ``float32``, ``(B, h, w, C)``), and
returns the raw map ``(B, h, w)`` *before* the final ReLU, upsampling and normalisation.
Any spatial rank works the same way: ``(B, t, C)`` for 1-D signals, ``(B, d, h, w, C)`` for
volumes and videos; "spatial" below means every axis between the batch and the channels.
The explainers users call (:func:`gradcam_jax.grad_cam`, :func:`gradcam_jax.cam`) take a
model and an input, look a method up by name in :data:`gradcam_jax.METHODS` and apply these.
Notation: ``g = dA``, ``Z = h * w``.

A new gradient method is one function here plus one line in :data:`gradcam_jax.METHODS`
(``gradcam_jax/_cam.py``), or a call to :func:`gradcam_jax.register_method`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "weighted_sum",
    "safe_divide",
    "grad_cam",
    "gradient_sum",
    "grad_cam_plus_plus",
    "xgrad_cam",
    "hires_cam",
    "layer_cam",
    "eigen_cam",
    "eigen_grad_cam",
]


def spatial_axes(a) -> tuple[int, ...]:
    """The spatial axes of ``(B, *spatial, C)``: every axis but the first and the last."""
    return tuple(range(1, a.ndim - 1))


def safe_divide(num, den):
    """``num / den`` where ``den != 0``, else 0 (no NaN, gradients stay finite)."""
    nonzero = den != 0
    return jnp.where(nonzero, num / jnp.where(nonzero, den, 1.0), 0.0)


def weighted_sum(weights, a):
    """``sum_k w_k A_k``: weights ``(B, C)``, activation ``(B, *spatial, C)`` -> ``(B, *spatial)``."""
    return jnp.einsum("bc,b...c->b...", weights, a, precision=jax.lax.Precision.HIGHEST)


def grad_cam(a, g):
    """Grad-CAM: ``w_k = (1/Z) sum_ij g^k_ij``; map ``sum_k w_k A^k``.

    References:
      Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
      Localization", ICCV 2017, https://arxiv.org/abs/1610.02391 (eq. 1-2).
    """
    return weighted_sum(jnp.mean(g, axis=spatial_axes(a)), a)


def gradient_sum(a, g):
    """CAM through gradients: ``w_k = sum_ij g^k_ij``; map ``sum_k w_k A^k``.

    For a global-average-pool followed by a dense layer ``W`` this is exactly CAM
    (``w_k = W_ck``), and it is Grad-CAM times ``Z``.

    References:
      Zhou et al., "Learning Deep Features for Discriminative Localization", CVPR 2016,
      https://arxiv.org/abs/1512.04150; Selvaraju et al. 2017 §3.1 (the CAM equivalence).
    """
    return weighted_sum(jnp.sum(g, axis=spatial_axes(a)), a)


def grad_cam_plus_plus(a, g):
    """Grad-CAM++: ``w_k = sum_ij alpha_ij ReLU(g_ij)`` with
    ``alpha_ij = g_ij^2 / (2 g_ij^2 + sum_ab A_ab g_ij^3)`` (0 where the denominator is 0).

    This is the closed form for an exponential of the score, as in the paper's eq. 19.

    References:
      Chattopadhay et al., "Grad-CAM++: Improved Visual Explanations for Deep Convolutional
      Networks", WACV 2018, https://arxiv.org/abs/1710.11063.
    """
    g2 = g * g
    g3 = g2 * g
    sum_a = jnp.sum(a, axis=spatial_axes(a), keepdims=True)
    alpha = safe_divide(g2, 2.0 * g2 + sum_a * g3)
    weights = jnp.sum(alpha * jax.nn.relu(g), axis=spatial_axes(a))
    return weighted_sum(weights, a)


def xgrad_cam(a, g):
    """XGrad-CAM: ``w_k = sum_ij g_ij A_ij / sum_ij A_ij`` (0 where ``sum_ij A_ij = 0``).

    References:
      Fu et al., "Axiom-based Grad-CAM: Towards Accurate Visualization and Explanation of
      CNNs", BMVC 2020, https://arxiv.org/abs/2008.02312.
    """
    weights = safe_divide(jnp.sum(g * a, axis=spatial_axes(a)), jnp.sum(a, axis=spatial_axes(a)))
    return weighted_sum(weights, a)


def hires_cam(a, g):
    """HiResCAM: ``L = sum_k g^k ⊙ A^k`` (element-wise, no spatial averaging).

    References:
      Draelos & Carin, "Use HiResCAM instead of Grad-CAM for faithful explanations of
      convolutional neural networks", 2020, https://arxiv.org/abs/2011.08891.
    """
    return jnp.sum(g * a, axis=-1)


def layer_cam(a, g):
    """LayerCAM: ``L = sum_k ReLU(g^k) ⊙ A^k`` (the outer ReLU is the usual final one).

    References:
      Jiang et al., "LayerCAM: Exploring Hierarchical Class Activation Maps for
      Localization", IEEE TIP 2021, https://doi.org/10.1109/TIP.2021.3089943.
    """
    return jnp.sum(jax.nn.relu(g) * a, axis=-1)


def _first_component(m):
    """Projection of ``m`` (B, h, w, C) on the first principal component of its positions.

    The positions x channels matrix is centred over positions; its projection on the first
    right singular vector is ``U[:, 0] * S[0]``. The sign of a singular vector is arbitrary:
    it is fixed so that the projection correlates positively with the channel-mean of ``m``.
    """
    b, c = m.shape[0], m.shape[-1]
    flat = m.reshape(b, -1, c)
    centred = flat - jnp.mean(flat, axis=1, keepdims=True)
    u, s, _ = jnp.linalg.svd(centred, full_matrices=False)
    proj = u[:, :, 0] * s[:, :1]
    reference = jnp.mean(flat, axis=-1)
    reference = reference - jnp.mean(reference, axis=1, keepdims=True)
    sign = jnp.where(jnp.sum(proj * reference, axis=1, keepdims=True) < 0, -1.0, 1.0)
    return (proj * sign).reshape(m.shape[:-1])


def eigen_cam(a, g):
    """Eigen-CAM: the activations' projection on their first principal component.

    Gradient-free (``g`` is unused, and under ``jit`` its backward pass is dead code that XLA
    removes), and so not class-discriminative. The component's sign is
    chosen to correlate positively with the mean activation.

    References:
      Muhammad & Yeasin, "Eigen-CAM: Class Activation Map using Principal Components", IJCNN
      2020, https://arxiv.org/abs/2008.00299.
    """
    del g
    return _first_component(a)


def eigen_grad_cam(a, g):
    """Eigen-Grad-CAM: Eigen-CAM on ``g ⊙ A``, which makes it class-discriminative.

    References:
      Muhammad & Yeasin 2020 (above); the gradient-weighted variant as in pytorch-grad-cam.
    """
    return _first_component(g * a)
