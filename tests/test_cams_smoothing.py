"""aug_smooth and eigen_smooth against NumPy: the augmented copies' maps averaged by hand, and the
first principal component of the per-channel terms (pytorch-grad-cam's two switches)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_core import np_eigen, np_finish

import gradcam_jax as gcj

B, H, W, C, NCLS = 2, 6, 5, 4, 7


def make_problem(seed=0):
    r = np.random.default_rng(seed)
    x = r.normal(size=(B, H, W, C)).astype(np.float32)
    v = r.normal(size=(C, NCLS)).astype(np.float32)
    tap = gcj.split_tap(lambda x: jnp.abs(x), lambda a: jnp.einsum("bhwk,kc->bc", jnp.tanh(a), v) / (H * W))
    return tap, x, v


def np_grad(a, v, cls):
    return (1 - np.tanh(a) ** 2) * v[:, cls].T[:, None, None, :] / (H * W)


def np_terms(name, a, g):
    """The per-channel terms w_k A^k whose channel sum is the method's map."""
    if name == "grad_cam":
        return g.mean((1, 2), keepdims=True) * a
    if name == "layer_cam":
        return np.maximum(g, 0) * a
    if name == "grad_cam_elementwise":
        return np.maximum(g * a, 0)
    s = a.sum((1, 2), keepdims=True)  # grad_cam_plus_plus
    den = 2 * g**2 + s * g**3
    alpha = np.where(den != 0, g**2 / np.where(den != 0, den, 1), 0)
    return (alpha * np.maximum(g, 0)).sum((1, 2), keepdims=True) * a


@pytest.mark.parametrize("method", ["grad_cam", "grad_cam_plus_plus", "layer_cam", "grad_cam_elementwise"])
def test_eigen_smooth_is_the_first_component_of_the_terms(method):
    tap, x, v = make_problem(1)
    a = np.abs(x).astype(np.float64)
    cls = np.array([3, 0])
    expected = np_eigen(np_terms(method, a, np_grad(a, v, cls)))
    got = gcj.cam(tap, x, cls, method, eigen_smooth=True, upsample=False, normalize=False, relu=False)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-4, atol=1e-6)


def test_eigen_smooth_on_ablation_cam_and_projection_methods():
    r = np.random.default_rng(2)
    x = np.abs(r.normal(size=(B, H, W, C))).astype(np.float32)
    v = r.normal(size=(C, NCLS)).astype(np.float32)
    tap = gcj.split_tap(lambda x: x, lambda a: jnp.einsum("bhwk,kc->bc", a, v))
    cls = np.array([1, 2])
    y = np.einsum("bhwk,kc->bc", x, v)[np.arange(B), cls]
    # Linear head: zeroing channel k removes sum_hw A_k v_kc, so w_k = sum_hw A_k v_kc / y.
    w = np.einsum("bhwk,kb->bk", x, v[:, cls]) / y[:, None]
    expected = np_eigen(w[:, None, None, :] * x)
    got = gcj.cam(tap, x, cls, "ablation_cam", eigen_smooth=True, upsample=False, normalize=False, relu=False)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-4, atol=1e-5)
    for name in ("eigen_cam", "kpca_cam"):  # already projections: unchanged
        plain = gcj.cam(tap, x, cls, name, upsample=False)
        np.testing.assert_array_equal(
            np.asarray(gcj.cam(tap, x, cls, name, eigen_smooth=True, upsample=False)), plain
        )
    with pytest.raises(ValueError, match="custom formula"):
        gcj.cam(tap, x, cls, lambda a, g: (a * g).sum(-1), eigen_smooth=True)


def np_aug_smooth(x, v, cls, method="grad_cam"):
    """The six copies (x, 0.9 x, 1.1 x and mirrored), each map finished and mirrored back, averaged."""
    maps = []
    for flip in (False, True):
        for f in (0.9, 1.0, 1.1):
            xc = (x[:, :, ::-1] if flip else x).astype(np.float64) * f
            a = np.abs(xc)
            c = np.einsum("bhwk,kc->bc", np.tanh(a), v).argmax(-1) if cls is None else cls
            g = np_grad(a, v, c)
            raw = (np_terms(method, a, g)).sum(-1)
            m = np_finish(raw)
            maps.append(m[:, :, ::-1] if flip else m)
    return np_finish(np.mean(maps, axis=0))


@pytest.mark.parametrize("cls", [None, np.array([4, 6])])
def test_aug_smooth_averages_the_augmented_maps(cls):
    tap, x, v = make_problem(3)
    expected = np_aug_smooth(x, v, cls)
    got = gcj.cam(tap, x, cls, "grad_cam", aug_smooth=True, upsample=False)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=2e-5)


def test_aug_smooth_under_jit_and_for_other_kinds_of_method():
    tap, x, v = make_problem(4)
    cls = np.array([2, 5])
    expected = np_aug_smooth(x, v, cls, "layer_cam")
    got = jax.jit(lambda x: gcj.cam(tap, x, cls, "layer_cam", aug_smooth=True, upsample=False))(x)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=2e-5)
    # An explainer (Shapley: here H has a diagonal, so not Grad-CAM) and a perturbation method: each
    # augmented copy equals the method on that copy, mirrored back.
    for method, kw in (("shapley_cam", {}), ("ablation_cam", {"chunk_size": 8})):
        copies = []
        for flip in (False, True):
            for f in (0.9, 1.0, 1.1):
                xc = (x[:, :, ::-1] if flip else x) * np.float32(f)
                m = np.asarray(gcj.cam(tap, xc, cls, method, upsample=False, **kw))
                copies.append(m[:, :, ::-1] if flip else m)
        got = gcj.cam(tap, x, cls, method, aug_smooth=True, upsample=False, **kw)
        np.testing.assert_allclose(np.asarray(got), np_finish(np.mean(copies, 0)), rtol=1e-4, atol=2e-5)


def test_aug_smooth_needs_images():
    w = jnp.ones((3, 2))
    tap = gcj.split_tap(jax.nn.relu, lambda a: a.mean(axis=1) @ w)
    with pytest.raises(ValueError, match="aug_smooth=True averages the maps of left-right flipped"):
        gcj.cam(tap, jnp.ones((2, 16, 3)), 0, layout="NLC", aug_smooth=True)
