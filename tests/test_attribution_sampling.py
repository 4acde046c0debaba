"""RISE against a NumPy loop over its masks, and KernelSHAP against Captum's KernelShap with the
same coalitions (float64 on Captum's side, the same weights)."""

import captum.attr as captum_attr  # the test extras install torch==2.13.0 and captum
import jax
import jax.numpy as jnp
import nets
import numpy as np
import pytest
import torch

import gradcam_jax as gcj
from gradcam_jax.attribution.sampling import rise_mask, shap_coalitions

W = nets.weights(5, c2=8)
X = np.random.default_rng(13).normal(size=(2, 12, 12, 3)).astype(np.float32)
T = np.array([4, 1])


def jax_net(x):
    features, head = nets.split_functions(W)
    return head(features(x))


def test_rise_is_the_mask_weighted_mean_score():
    key, n, p = jax.random.key(0), 24, 0.5
    got = np.asarray(gcj.rise(jax_net, X, T, key=key, n_masks=n, cell=4, p=p, chunk_size=10))
    expected = np.zeros((2, 12, 12))
    net = jax.jit(jax_net)
    for i in range(n):
        m = np.asarray(rise_mask(jax.random.fold_in(key, i), (12, 12), 4, p), np.float64)
        scores = np.asarray(net(jnp.asarray(X * m[None, :, :, None])))[np.arange(2), T]
        expected += scores[:, None, None] * m
    np.testing.assert_allclose(got, expected / (n * p), rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_rise_masks_are_smooth_grids_kept_with_probability_p():
    keys = jax.random.split(jax.random.key(0), 200)
    masks = np.asarray(jax.vmap(lambda k: rise_mask(k, (28, 28), 7, 0.3))(keys))
    assert masks.min() >= 0 and masks.max() <= 1
    assert abs(masks.mean() - 0.3) < 0.05
    assert len(np.unique(masks)) > 10  # bilinear, not binary


def test_kernel_shap_matches_captum_with_the_same_coalitions(monkeypatch):
    segments = np.broadcast_to(np.arange(9).reshape(3, 3).repeat(4, 0).repeat(4, 1), (2, 12, 12)).copy()
    key, n = jax.random.key(3), 24
    w64 = jax.tree_util.tree_map(lambda a: a.astype(np.float64), W)

    def net64(x):
        features, head = nets.split_functions(w64)
        return head(features(x))

    with jax.enable_x64(True):
        got = gcj.kernel_shap(net64, X.astype(np.float64), T, segments=segments, key=key, n_samples=n)
        z, _ = shap_coalitions(key, n, 9)
    rows = [torch.from_numpy(np.asarray(r, np.int64))[None] for r in np.asarray(z)]
    ks = captum_attr.KernelShap(nets.torch_model(W, dtype=torch.float64))

    def coalitions(original_inp, **kwargs):
        yield from rows

    ks.perturb_func = coalitions
    x = torch.from_numpy(X.astype(np.float64).transpose(0, 3, 1, 2).copy())
    expected = [
        ks.attribute(
            x[b : b + 1],
            target=int(T[b]),
            n_samples=n,
            feature_mask=torch.from_numpy(segments[b : b + 1, None]),
        )
        for b in range(2)
    ]
    expected = np.concatenate([e[:, 0].numpy() for e in expected])
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_sampling_arguments_are_checked():
    with pytest.raises(ValueError, match="segments must be integer"):
        gcj.kernel_shap(jax_net, X, T, segments=np.zeros((2, 5, 5), int), key=jax.random.key(0))
    with pytest.raises(TypeError, match="key= is required"):
        gcj.rise(jax_net, X, T, key=None)
    with pytest.raises(ValueError, match="p \\(the probability"):
        gcj.rise(jax_net, X, T, key=jax.random.key(0), p=0.0)
