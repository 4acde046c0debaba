"""Deep Feature Factorization against NumPy: Lee & Seung's multiplicative updates by hand (and
scikit-learn's ``NMF(solver="mu")`` from the same start), the batch's channels x positions matrix,
the per-channel shift, the maps, and the concepts' scores through a pooling + linear head."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradcam_jax as gcj
from gradcam_jax.dff import deep_feature_factorization, nmf

B, H, W, C, NCLS, N = 2, 6, 4, 5, 7, 3


def np_nmf(v, w, h, steps):
    for _ in range(steps):
        w = w * (v @ h.T) / np.maximum(w @ (h @ h.T), 1e-10)
        h = h * (w.T @ v) / np.maximum((w.T @ w) @ h, 1e-10)
    return w, h


def test_nmf_matches_the_updates_by_hand_and_scikit_learn():
    from sklearn.decomposition import NMF

    r = np.random.default_rng(0)
    v = np.abs(r.normal(size=(6, 20)))
    w0, h0 = np.abs(r.normal(size=(6, 3))), np.abs(r.normal(size=(3, 20)))
    w, h = nmf(jnp.asarray(v, jnp.float32), jnp.asarray(w0, jnp.float32), jnp.asarray(h0, jnp.float32), 30)
    ew, eh = np_nmf(v, w0, h0, 30)
    np.testing.assert_allclose(np.asarray(w), ew, rtol=2e-3)
    np.testing.assert_allclose(np.asarray(h), eh, rtol=2e-3)
    model = NMF(3, init="custom", solver="mu", max_iter=30, tol=0.0)
    sw = model.fit_transform(v, W=w0.copy(), H=h0.copy())
    np.testing.assert_allclose(np.asarray(w) @ np.asarray(h), sw @ model.components_, rtol=1e-2, atol=1e-3)


def test_dff_matches_numpy_pipeline_and_scores_through_the_head():
    r = np.random.default_rng(1)
    x = r.normal(size=(B, H, W, C)).astype(np.float32)
    wfc = r.normal(size=(C, NCLS)).astype(np.float32)
    bfc = r.normal(size=(NCLS,)).astype(np.float32)
    tap = gcj.split_tap(jnp.tanh, lambda a: a.mean(axis=(1, 2)) @ wfc + bfc)
    a = np.tanh(x.astype(np.float64))
    v = a.reshape(-1, C).T  # channels x (batch * positions)
    offset = v.min(1, keepdims=True)
    w0, h0 = np.abs(r.normal(size=(C, N))), np.abs(r.normal(size=(N, B * H * W)))
    ew, eh = np_nmf(v - offset, w0, h0, 40)
    out = deep_feature_factorization(tap, x, N, init=(w0, h0), steps=40, upsample=False, top_k=3)
    concepts = (ew + offset).T
    np.testing.assert_allclose(np.asarray(out.concepts), concepts, rtol=2e-3, atol=1e-4)
    maps = eh.reshape(N, B, H, W).transpose(1, 0, 2, 3)
    lo, hi = maps.min((2, 3), keepdims=True), maps.max((2, 3), keepdims=True)
    np.testing.assert_allclose(np.asarray(out.maps), (maps - lo) / (hi - lo), atol=2e-3)
    scores = concepts @ wfc + bfc  # the head of an activation equal to the concept everywhere
    np.testing.assert_allclose(np.asarray(out.scores), scores, rtol=2e-3, atol=1e-3)
    np.testing.assert_array_equal(np.asarray(out.top_classes), np.argsort(-scores, axis=1)[:, :3])


def test_dff_random_start_upsampling_and_errors():
    r = np.random.default_rng(2)
    x = r.normal(size=(B, 8, 8, 3)).astype(np.float32)
    tap = gcj.split_tap(lambda x: jax.nn.relu(x[:, ::2, ::2]), lambda a: a.mean(axis=(1, 2)))
    out = deep_feature_factorization(tap, x, 2, key=jax.random.key(0), steps=10)
    assert out.maps.shape == (B, 2, 8, 8) and out.concepts.shape == (2, 3)
    assert float(out.maps.min()) >= 0 and float(out.maps.max()) <= 1
    again = deep_feature_factorization(tap, x, 2, key=jax.random.key(0), steps=10)
    np.testing.assert_array_equal(np.asarray(out.maps), np.asarray(again.maps))
    with pytest.raises(ValueError, match="needs key="):
        deep_feature_factorization(tap, x, 2)
    with pytest.raises(ValueError, match="n_components must be a positive int"):
        deep_feature_factorization(tap, x, 0, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"init=\(W0, H0\) must have shapes \(3, 2\) and \(2, 32\)"):
        deep_feature_factorization(tap, x, 2, init=(np.ones((3, 2)), np.ones((2, 5))))


def test_concept_overlay_colours_each_pixel_by_its_strongest_concept():
    maps = np.zeros((2, 4, 4), np.float32)
    maps[0, :, :2] = 1.0  # concept 0 on the left half
    maps[1, :, 2:] = 0.5  # concept 1, half as strong, on the right
    colors = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    img = gcj.viz.concept_image(np.zeros((4, 4, 3), np.uint8), maps, alpha=1.0, colors=colors)
    np.testing.assert_array_equal(img[:, :2], np.broadcast_to([255, 0, 0], (4, 2, 3)))
    np.testing.assert_array_equal(img[:, 2:], np.broadcast_to([0, 0, 128], (4, 2, 3)))
    fig = gcj.viz.concept_overlay(np.zeros((4, 4, 3)), maps, ["cat 0.9", "dog 0.1"], title="DFF")
    texts = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert texts == ["cat 0.9", "dog 0.1"]
    assert gcj.viz.png_bytes(fig)[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="1 labels for 2 concept maps"):
        gcj.viz.concept_overlay(np.zeros((4, 4, 3)), maps, ["cat"])
