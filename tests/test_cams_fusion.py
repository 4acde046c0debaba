"""Multi-layer fusion (``fuse=`` on a multi-layer tap) against NumPy: two layers of known gradients,
each layer's map finished by hand at the input's size, then mean / max / LayerCAM's tanh-max.

Model: ``A1 = |x|`` (H x W), ``A2 = 2x2 average pool of A1``, ``y_c = (1/Z2) sum tanh(A2) V_c``:
``dy/dA2 = (1 - tanh(A2)^2) V_c / Z2`` and ``dy/dA1`` is that spread over each 2x2 block / 4.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradcam_jax as gcj

B, H, W, C, NCLS = 2, 8, 6, 3, 5
Z2 = (H // 2) * (W // 2)


def pool(a):
    return a.reshape(a.shape[0], a.shape[1] // 2, 2, a.shape[2] // 2, 2, a.shape[3]).mean(axis=(2, 4))


def make_problem(seed=0):
    r = np.random.default_rng(seed)
    x = r.normal(size=(B, H, W, C)).astype(np.float32)
    v = r.normal(size=(C, NCLS)).astype(np.float32)

    def forward(x, mark):
        a1 = mark("a1", jnp.abs(x))
        a2 = mark("a2", pool(a1))
        return jnp.einsum("bhwk,kc->bc", jnp.tanh(a2), v) / Z2

    return gcj.marked_tap(forward, layers=["a1", "a2"]), x, v


def np_normalize(m):
    lo = m.min(axis=(-2, -1), keepdims=True)
    hi = m.max(axis=(-2, -1), keepdims=True)
    return np.where(hi > lo, (m - lo) / np.where(hi > lo, hi - lo, 1), 0)


def np_bilinear_2x(m):
    """Half-pixel bilinear upsampling by 2 along both axes, by hand (edges clamped)."""

    def along(m, axis):
        n = m.shape[axis]
        src = (np.arange(2 * n) + 0.5) / 2 - 0.5
        lo = np.clip(np.floor(src).astype(int), 0, n - 1)
        hi = np.clip(lo + 1, 0, n - 1)
        t = np.clip(src - np.floor(src), 0, 1)
        t = np.where(src < 0, 0.0, t)
        shape = [1] * m.ndim
        shape[axis] = -1
        return np.take(m, lo, axis) * (1 - t.reshape(shape)) + np.take(m, hi, axis) * t.reshape(shape)

    return along(along(m, 1), 2)


def np_layer_maps(x, v, cls):
    a1 = np.abs(x).astype(np.float64)
    a2 = pool(a1)
    g2 = (1 - np.tanh(a2) ** 2) * v[:, cls].T[:, None, None, :] / Z2
    g1 = np.repeat(np.repeat(g2, 2, axis=1), 2, axis=2) / 4
    m1 = np.einsum("bk,bhwk->bhw", g1.mean((1, 2)), a1)
    m2 = np.einsum("bk,bhwk->bhw", g2.mean((1, 2)), a2)
    return np_normalize(np.maximum(m1, 0)), np_normalize(np_bilinear_2x(np.maximum(m2, 0)))


@pytest.mark.parametrize("fuse", ["mean", "max", "layer_cam"])
def test_fused_maps_match_numpy(fuse):
    tap, x, v = make_problem()
    cls = np.array([1, 3])
    m1, m2 = np_layer_maps(x, v, cls)
    fused = {
        "mean": (m1 + m2) / 2,
        "max": np.maximum(m1, m2),
        "layer_cam": np.maximum(np.tanh(2 * m1), np.tanh(2 * m2)),
    }[fuse]
    got = gcj.cam(tap, x, cls, "grad_cam", fuse=fuse)
    np.testing.assert_allclose(np.asarray(got), np_normalize(fused), rtol=1e-4, atol=2e-5)


def test_fusion_is_one_forward_pass_and_refuses_what_it_cannot_do():
    tap, x, v = make_problem(1)
    # One tanh in the forward pass (its derivative needs none): the program has one forward pass
    # for both layers and both targets.
    program = str(jax.make_jaxpr(lambda x: gcj.cam(tap, x, [0, 2], fuse="mean"))(x))
    assert program.count(" tanh ") == 1, program.count(" tanh ")
    # The fused K-target maps equal the fused single-target maps.
    both = gcj.cam(tap, x, [0, 2], fuse="layer_cam")
    for k, c in enumerate([0, 2]):
        np.testing.assert_allclose(
            np.asarray(both[:, k]), np.asarray(gcj.cam(tap, x, c, fuse="layer_cam")), atol=1e-6
        )
    with pytest.raises(ValueError, match="pass upsample=True"):
        gcj.cam(tap, x, 0, fuse="mean", upsample=False)
    with pytest.raises(ValueError, match="is not one of"):
        gcj.cam(tap, x, 0, fuse="sum")
    with pytest.raises(ValueError, match="explains one layer"):
        gcj.cam(tap, x, 0, "score_cam", fuse="mean")
    with pytest.raises(ValueError, match="fuse="):
        gcj.cam(tap, x, 0)  # a multi-layer tap without fuse: pick a layer or fuse
