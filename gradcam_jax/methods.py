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

import dataclasses
from collections.abc import Callable

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
    "grad_cam_elementwise",
    "kpca_cam",
    "first_component",
    "channel_terms",
    "eigen_smoothed",
    "EigenSmoothed",
    "formula",
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
    return weighted_sum(grad_cam_plus_plus_weights(a, g), a)


def grad_cam_plus_plus_weights(a, g):
    """Grad-CAM++'s channel weights ``(B, C)`` (see :func:`grad_cam_plus_plus`)."""
    g2 = g * g
    g3 = g2 * g
    sum_a = jnp.sum(a, axis=spatial_axes(a), keepdims=True)
    alpha = safe_divide(g2, 2.0 * g2 + sum_a * g3)
    return jnp.sum(alpha * jax.nn.relu(g), axis=spatial_axes(a))


def xgrad_cam(a, g):
    """XGrad-CAM: ``w_k = sum_ij g_ij A_ij / sum_ij A_ij`` (0 where ``sum_ij A_ij = 0``).

    References:
      Fu et al., "Axiom-based Grad-CAM: Towards Accurate Visualization and Explanation of
      CNNs", BMVC 2020, https://arxiv.org/abs/2008.02312.
    """
    return weighted_sum(xgrad_cam_weights(a, g), a)


def xgrad_cam_weights(a, g):
    """XGrad-CAM's channel weights ``(B, C)`` (see :func:`xgrad_cam`)."""
    return safe_divide(jnp.sum(g * a, axis=spatial_axes(a)), jnp.sum(a, axis=spatial_axes(a)))


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


def first_component(m):
    """Projection of ``m`` (B, h, w, C) on the first principal component of its positions.

    The positions x channels matrix is centred over positions; its projection on the first
    right singular vector is ``U[:, 0] * S[0]``. The sign of a singular vector is arbitrary:
    it is fixed so that the projection correlates positively with the channel-mean of ``m``.
    """
    b, c = m.shape[0], m.shape[-1]
    flat = m.reshape(b, -1, c)
    centred = flat - jnp.mean(flat, axis=1, keepdims=True)
    u, s, _ = jnp.linalg.svd(centred, full_matrices=False)
    return _positive_sign(u[:, :, 0] * s[:, :1], flat).reshape(m.shape[:-1])


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
    return first_component(a)


def eigen_grad_cam(a, g):
    """Eigen-Grad-CAM: Eigen-CAM on ``g ⊙ A``, which makes it class-discriminative.

    References:
      Muhammad & Yeasin 2020 (above); the gradient-weighted variant as in pytorch-grad-cam.
    """
    return first_component(g * a)


def grad_cam_elementwise(a, g):
    """Grad-CAM element-wise: ``L = sum_k ReLU(g^k ⊙ A^k)`` (the product rectified before the sum).

    HiResCAM with a ReLU on each channel's term: a channel cannot cancel another's evidence.

    References:
      pytorch-grad-cam's ``GradCAMElementWise`` (Gildenblat et al.,
      https://github.com/jacobgil/pytorch-grad-cam); HiResCAM, Draelos & Carin 2020,
      https://arxiv.org/abs/2011.08891.
    """
    return jnp.sum(jax.nn.relu(g * a), axis=-1)


def kpca_cam(a, g, gamma: float | None = None):
    """KPCA-CAM: the activations' projection on their first *kernel* principal component.

    With ``X`` the positions x channels matrix of ``A`` centred over positions, the sigmoid
    kernel ``K = tanh(gamma X X^T + 1)`` (``gamma = 1 / C`` by default, scikit-learn's), and
    ``K~`` its double-centred form, the map is ``sqrt(lambda_1) v_1`` for the top eigenpair of
    ``K~`` — what ``sklearn.decomposition.KernelPCA(n_components=1, kernel="sigmoid")``'s
    ``fit_transform`` returns. Gradient-free, like Eigen-CAM; the sign is fixed the same way
    (positive correlation with the mean activation; scikit-learn makes the largest entry positive).

    References:
      Karmani et al., "KPCA-CAM: Visual Explainability of Deep Computer Vision Models using
      Kernel PCA", MMSP 2024, https://arxiv.org/abs/2410.00267.
    """
    del g
    b, c = a.shape[0], a.shape[-1]
    flat = a.reshape(b, -1, c)
    x = flat - jnp.mean(flat, axis=1, keepdims=True)
    gamma = 1.0 / c if gamma is None else gamma
    k = jnp.tanh(gamma * jnp.einsum("bnc,bmc->bnm", x, x, precision=jax.lax.Precision.HIGHEST) + 1.0)
    k = k - k.mean(1, keepdims=True) - k.mean(2, keepdims=True) + k.mean((1, 2), keepdims=True)
    lam, vec = jnp.linalg.eigh(k)
    proj = vec[:, :, -1] * jnp.sqrt(jnp.maximum(lam[:, -1:], 0.0))
    return _positive_sign(proj, flat).reshape(a.shape[:-1])


def _positive_sign(proj, flat):
    """``proj`` (B, N) with its sign chosen to correlate positively with the channel-mean of ``flat``."""
    reference = jnp.mean(flat, axis=-1)
    reference = reference - jnp.mean(reference, axis=1, keepdims=True)
    return proj * jnp.where(jnp.sum(proj * reference, axis=1, keepdims=True) < 0, -1.0, 1.0)


# --------------------------------------------------------------------------------------------
# Eigen smoothing: the first principal component of the per-channel terms instead of their sum
# --------------------------------------------------------------------------------------------


def _scaled(weights, a):
    return weights.reshape(weights.shape[:1] + (1,) * (a.ndim - 2) + weights.shape[-1:]) * a


#: For each formula whose raw map is a sum over channels, the per-channel terms ``(B, *spatial, C)``.
_TERMS: dict[Callable, Callable] = {
    grad_cam: lambda a, g: _scaled(jnp.mean(g, axis=spatial_axes(a)), a),
    gradient_sum: lambda a, g: _scaled(jnp.sum(g, axis=spatial_axes(a)), a),
    grad_cam_plus_plus: lambda a, g: _scaled(grad_cam_plus_plus_weights(a, g), a),
    xgrad_cam: lambda a, g: _scaled(xgrad_cam_weights(a, g), a),
    hires_cam: lambda a, g: g * a,
    layer_cam: lambda a, g: jax.nn.relu(g) * a,
    grad_cam_elementwise: lambda a, g: jax.nn.relu(g * a),
}

#: Formulas that already are a principal-component projection: eigen smoothing leaves them as they are.
PROJECTIONS = (eigen_cam, eigen_grad_cam, kpca_cam)


def channel_terms(formula: Callable) -> Callable | None:
    """The per-channel terms ``(A, dA) -> (B, *spatial, C)`` of a raw-map formula (None if unknown)."""
    return _TERMS.get(formula)


@dataclasses.dataclass(frozen=True)
class EigenSmoothed:
    """A raw-map formula whose channel sum is replaced by the first principal component.

    ``terms(A, dA) -> (B, *spatial, C)``: the per-channel terms ``w_k A^k`` whose sum is the
    method's map; the smoothed map is their projection on their first principal component over
    positions (:func:`first_component`) — pytorch-grad-cam's ``eigen_smooth=True``.
    """

    terms: Callable

    def __call__(self, a, g):
        return first_component(self.terms(a, g))


def eigen_smoothed(formula: Callable) -> Callable:
    """``formula`` with eigen smoothing; a projection method (Eigen-CAM, KPCA-CAM) is returned as is.

    Examples:
      >>> import jax.numpy as jnp
      >>> from gradcam_jax.methods import eigen_smoothed, grad_cam
      >>> eigen_smoothed(grad_cam)(jnp.ones((1, 2, 2, 3)), jnp.ones((1, 2, 2, 3))).shape
      (1, 2, 2)
    """
    if formula in PROJECTIONS:
        return formula
    terms = channel_terms(formula)
    if terms is None:
        raise ValueError(
            f"eigen_smooth=True needs the per-channel terms of the method's map, known for the built-in "
            f"methods only; {formula!r} is a custom formula. Apply methods.first_component to your "
            f"per-channel terms (B, h, w, C) in your own formula instead."
        )
    return EigenSmoothed(terms)


def formula(name: str) -> Callable:
    """A built-in raw-map formula by name (``"grad_cam"``, ``"hires_cam"``, ...): for options such as
    Finer-CAM's ``base_method``. The error lists the names."""
    table = {
        "grad_cam": grad_cam,
        "cam": gradient_sum,
        "gradient_sum": gradient_sum,
        "grad_cam_plus_plus": grad_cam_plus_plus,
        "xgrad_cam": xgrad_cam,
        "hires_cam": hires_cam,
        "layer_cam": layer_cam,
        "grad_cam_elementwise": grad_cam_elementwise,
        "eigen_grad_cam": eigen_grad_cam,
    }
    key = name.strip().lower().replace("-", "_")
    if key not in table:
        raise ValueError(f"Unknown gradient formula {name!r}; known: {', '.join(sorted(table))}.")
    return table[key]
