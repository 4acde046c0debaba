"""Blur IG, Guided IG and XRAI against PAIR ``saliency`` (its NumPy ``saliency.core``, one example
per call, float64) on the same JAX model: Pearson >= 0.999 (they agree to ~1e-5 relative); XRAI
gives the same map and the same ranked regions from the same attributions."""

import jax
import jax.numpy as jnp
import nets
import numpy as np
import pytest
import saliency.core as pair  # the test extras install saliency

import gradcam_jax as gcj

W = nets.weights(4, c2=8)
X = np.random.default_rng(1).uniform(0, 1, size=(2, 16, 16, 3)).astype(np.float32)
T = np.array([1, 3])


def jax_net(x):
    features, head = nets.split_functions(W)
    return head(features(x))


_grad = jax.jit(jax.grad(lambda xb, c: jax_net(xb)[:, c].sum()), static_argnums=1)


def call_model(cls):
    """PAIR's call_model_function: input gradients of one class for a NumPy batch."""

    def call(xb, call_model_args=None, expected_keys=None):
        return {pair.base.INPUT_OUTPUT_GRADIENTS: np.asarray(_grad(jnp.asarray(xb, jnp.float32), cls))}

    return call


def pearson(a, b):
    return np.corrcoef(np.ravel(a), np.ravel(b))[0, 1]


def test_blur_ig_matches_pair():
    got = np.asarray(gcj.blur_ig(jax_net, X, T, max_sigma=6, steps=20, chunk_size=16))
    for b in range(2):
        expected = pair.BlurIG().GetMask(X[b], call_model(int(T[b])), max_sigma=6, steps=20)
        assert pearson(got[b], expected) >= 0.999
        np.testing.assert_allclose(got[b], expected, atol=1e-3 * np.abs(expected).max())


@pytest.fixture
def numpy2_quantile(monkeypatch):
    # PAIR's GuidedIG calls np.quantile(..., interpolation=...), a keyword NumPy 2 removed (now method=).
    quantile = np.quantile

    def patched(a, q, interpolation="linear", **kwargs):
        return quantile(a, q, method=interpolation, **kwargs)

    monkeypatch.setattr(np, "quantile", patched)


def test_guided_ig_matches_pair(numpy2_quantile):
    baseline = np.full_like(X, 0.1)
    got = np.asarray(gcj.guided_ig(jax_net, X, T, baseline=baseline, steps=30))
    for b in range(2):
        expected = pair.GuidedIG().GetMask(X[b], call_model(int(T[b])), x_baseline=baseline[b], x_steps=30)
        assert pearson(got[b], expected) >= 0.999
        np.testing.assert_allclose(got[b], expected, atol=1e-3 * np.abs(expected).max())


def test_guided_ig_with_max_dist_zero_is_integrated_gradients():
    # max_dist = 0 keeps the path on the straight line: a right Riemann sum of IG.
    got = gcj.guided_ig(jax_net, X, T, steps=8, max_dist=0.0)
    ig = gcj.integrated_gradients(jax_net, X, T, steps=8, method="riemann_left")
    np.testing.assert_allclose(np.asarray(got), np.asarray(ig), atol=2e-3 * np.abs(np.asarray(ig)).max())


def test_guided_ig_with_k_targets_is_k_separate_calls():
    baseline = np.full_like(X, 0.1)
    per_class = [np.asarray(gcj.guided_ig(jax_net, X, c, baseline=baseline, steps=6)) for c in (0, 3)]
    both = np.asarray(gcj.guided_ig(jax_net, X, [0, 3], baseline=baseline, steps=6))  # a list: (B, 2, ...)
    assert both.shape == (2, 2) + X.shape[1:]
    for k in range(2):
        np.testing.assert_allclose(
            both[:, k], per_class[k], rtol=1e-5, atol=1e-6 * np.abs(per_class[k]).max()
        )
    # (B, K) per example, and a callable giving (B, K): the same K paths.
    rows = np.array([[0, 3], [3, 0]])
    got = np.asarray(gcj.guided_ig(jax_net, X, rows, baseline=baseline, steps=6))
    np.testing.assert_allclose(got[0], both[0], rtol=1e-5, atol=1e-6 * np.abs(both).max())
    np.testing.assert_allclose(got[1], both[1, ::-1], rtol=1e-5, atol=1e-6 * np.abs(both).max())
    by_fn = np.asarray(gcj.guided_ig(jax_net, X, lambda s: s[:, [0, 3]], baseline=baseline, steps=6))
    np.testing.assert_allclose(by_fn, both, rtol=1e-5, atol=1e-6 * np.abs(both).max())


def test_xrai_matches_pair_on_the_same_attributions():
    x = np.random.default_rng(2).uniform(0, 1, size=(2, 32, 32, 3)).astype(np.float32)
    x[:, 8:20, 10:24] += 0.8  # a bright block: regions with structure
    attr = np.asarray(gcj.integrated_gradients(jax_net, x, T, steps=8))
    got, ranks = gcj.xrai(jax_net, x, T, attributions=attr, return_ranks=True)
    for b in range(2):
        params = pair.XRAIParameters(return_xrai_segments=True)
        details = pair.XRAI().GetMaskWithDetails(
            x[b], call_model(int(T[b])), base_attribution=attr[b], extra_parameters=params
        )
        np.testing.assert_allclose(np.asarray(got[b]), details.attribution_mask, rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(np.asarray(ranks[b]), details.segments)  # the same ranked regions
