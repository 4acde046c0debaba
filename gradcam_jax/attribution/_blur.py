"""Gaussian blurs of an image's spatial axes as matrices (the blur path of Blur IG, a blurred baseline).

``scipy.ndimage.gaussian_filter(image, sigma, mode="constant")`` on each spatial axis is a
linear map, so it is built once on the host as a ``(n, n)`` matrix per axis and applied on the
device with one ``einsum``: any number of blur levels then ``vmap`` as a stack of matrices.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

__all__ = ["gaussian_matrix", "blur_matrices", "apply_blur"]


def gaussian_matrix(n: int, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """The ``(n, n)`` matrix of a 1-D Gaussian filter with zero padding (SciPy's ``mode="constant"``).

    The kernel is SciPy's: ``exp(-k**2 / (2 sigma**2))`` for ``|k| <= int(truncate * sigma + 0.5)``,
    normalised to sum 1; ``sigma == 0`` is the identity.

    Examples:
      >>> from gradcam_jax.attribution._blur import gaussian_matrix
      >>> gaussian_matrix(3, 0.0).tolist()
      [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    """
    if sigma <= 0:
        return np.eye(n)
    radius = int(truncate * float(sigma) + 0.5)
    k = np.arange(-radius, radius + 1)
    w = np.exp(-0.5 / float(sigma) ** 2 * k.astype(np.float64) ** 2)
    w /= w.sum()
    offset = np.arange(n)[None, :] - np.arange(n)[:, None]  # input j seen from output i
    inside = np.abs(offset) <= radius
    return np.where(inside, w[np.clip(offset + radius, 0, 2 * radius)], 0.0)


def blur_matrices(sizes: tuple[int, ...], sigmas) -> list[np.ndarray]:
    """One stack ``(S, n_d, n_d)`` of blur matrices per spatial axis, for the ``S`` levels ``sigmas``."""
    return [np.stack([gaussian_matrix(n, s) for s in sigmas]) for n in sizes]


def apply_blur(image_cl, mats):
    """Blur a channels-last image ``(B, *spatial, C)`` with one matrix per spatial axis."""
    out = image_cl
    for d, m in enumerate(mats):
        axis = 1 + d
        out = jnp.moveaxis(jnp.tensordot(jnp.asarray(m, out.dtype), out, axes=[[1], [axis]]), 0, axis)
    return out
