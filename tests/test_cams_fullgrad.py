"""FullGrad against NumPy: a two-layer network with biases whose gradients are written by hand.

``z1 = s1 x + b1`` (H x W), ``z2 = s2 pool2(tanh(z1)) + b2`` (H/2 x W/2),
``y_c = (1/Z2) sum tanh(z2) V_c``; the map is ``psi(grad_x y ⊙ x) + psi(b1 ⊙ dy/dz1) + psi(b2 ⊙ dy/dz2)``
with ``psi`` = per-channel min-max of the absolute value, summed over channels, resized to H x W.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from test_cams_fusion import np_bilinear_2x, np_normalize, pool

import gradcam_jax as gcj
from gradcam_jax.fullgrad import fullgrad, linen_biases

B, H, W, C, NCLS = 2, 8, 6, 3, 5
Z2 = (H // 2) * (W // 2)


def make_problem(seed=0):
    r = np.random.default_rng(seed)
    x = r.normal(size=(B, H, W, C)).astype(np.float32)
    s1, b1, s2, b2 = (r.normal(size=(C,)).astype(np.float32) for _ in range(4))
    v = r.normal(size=(C, NCLS)).astype(np.float32)

    def forward(x, mark):
        z1 = mark("z1", x * s1 + b1)
        z2 = mark("z2", pool(jnp.tanh(z1)) * s2 + b2)
        return jnp.einsum("bhwk,kc->bc", jnp.tanh(z2), v) / Z2

    return gcj.marked_tap(forward, layers=["z1", "z2"]), x, (s1, b1, s2, b2, v)


def psi(m):
    per_channel = np_normalize(np.moveaxis(np.abs(m), -1, 1))
    return per_channel.sum(1)


def np_fullgrad(x, weights, cls):
    s1, b1, s2, b2, v = (w.astype(np.float64) for w in weights)
    x = x.astype(np.float64)
    z1 = x * s1 + b1
    z2 = pool(np.tanh(z1)) * s2 + b2
    g2 = (1 - np.tanh(z2) ** 2) * v[:, cls].T[:, None, None, :] / Z2
    g1 = np.repeat(np.repeat(g2 * s2, 2, axis=1), 2, axis=2) / 4 * (1 - np.tanh(z1) ** 2)
    gx = g1 * s1
    return np_normalize(psi(gx * x) + psi(b1 * g1) + np_bilinear_2x(psi(b2 * g2)))


def test_fullgrad_matches_numpy():
    tap, x, weights = make_problem()
    cls = np.array([1, 4])
    biases = {"z1": weights[1], "z2": weights[3]}
    got = fullgrad(tap, x, cls, biases=biases)
    np.testing.assert_allclose(np.asarray(got), np_fullgrad(x, weights, cls), rtol=1e-4, atol=2e-5)
    both = gcj.cam(tap, x, [1, 4], "fullgrad", biases=biases)
    for k, c in enumerate([1, 4]):
        np.testing.assert_allclose(np.asarray(both[:, k]), np_fullgrad(x, weights, np.full(B, c)), atol=2e-5)


def test_fullgrad_checks_its_biases_and_linen_biases_reads_batchnorm():
    tap, x, weights = make_problem(1)
    with pytest.raises(ValueError, match="fullgrad needs biases="):
        gcj.cam(tap, x, 0, "fullgrad")
    with pytest.raises(ValueError, match=r"no entry for the tapped layer\(s\) \['z2'\]"):
        fullgrad(tap, x, 0, biases={"z1": weights[1]})
    with pytest.raises(ValueError, match="has shape \\(2,\\); the layer has 3 channels"):
        fullgrad(tap, x, 0, biases={"z1": weights[1], "z2": np.ones(2)})
    with pytest.raises(ValueError, match="do not apply"):
        fullgrad(tap, x, 0, biases={"z1": weights[1], "z2": weights[3]}, eigen_smooth=True)
    # BatchNorm in inference: its bias is beta - mean * gamma / sqrt(var + eps); a Conv's is its own.
    r = np.random.default_rng(2)
    bn = {name: np.abs(r.normal(size=(4,))).astype(np.float32) + 0.1 for name in ("scale", "bias")}
    stats = {name: np.abs(r.normal(size=(4,))).astype(np.float32) + 0.1 for name in ("mean", "var")}
    conv_bias = r.normal(size=(4,)).astype(np.float32)
    variables = {
        "params": {"block": {"bn": bn, "conv": {"kernel": np.ones((3, 3, 3, 4)), "bias": conv_bias}}},
        "batch_stats": {"block": {"bn": stats}},
    }
    got = linen_biases(variables, ["block/conv", "block/bn"], eps=1e-3)
    expected = bn["bias"] - stats["mean"] * bn["scale"] / np.sqrt(stats["var"] + 1e-3)
    np.testing.assert_allclose(np.asarray(got["block/bn"]), expected, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(got["block/conv"]), conv_bias)
    with pytest.raises(ValueError, match="layer 'block' has no 'bias'"):
        linen_biases(variables, ["block"])
