"""gcj.targets: each helper against a hand-written NumPy reduction on a model with that output
kind, Grad-CAM through the helpers against NumPy Grad-CAM with the analytic gradient, box
matching (several detections, no match, ties, labels), and no recompilation for a new mask,
box or reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from compiles import compilations

import gradcam_jax as gcj
from gradcam_jax import targets

RNG = np.random.default_rng(0)
B, H, W, C = 2, 6, 6, 4  # the tapped layer: (B, H, W, C)
K = 3  # classes / labels / embedding size of the heads


def relu_features(x):
    return jax.nn.relu(x)


WEIGHTS = RNG.normal(size=(C, K)).astype(np.float32)


def pixel_head(a):
    """1x1 conv: per-pixel logits (B, H, W, K)."""
    return a @ WEIGHTS


def pooled_head(a):
    """Global average pool -> dense: (B, K)."""
    return a.mean(axis=(1, 2)) @ WEIGHTS


X = RNG.normal(size=(B, H, W, C)).astype(np.float32)
A = np.maximum(X, 0)


def raw_cam(tap, target):
    return np.asarray(gcj.grad_cam(tap, X, target, upsample=False, normalize=False, relu=False))


def np_grad_cam(a, g):
    """Grad-CAM by hand: w_k = mean_ij g_ij^k; L = sum_k w_k A^k (raw, no ReLU)."""
    return np.einsum("bk,bhwk->bhw", g.mean(axis=(1, 2)), a)


def test_classes_and_multilabel_match_int_targets():
    logits = A.mean(axis=(1, 2)) @ WEIGHTS
    np.testing.assert_allclose(targets.classes(2)(logits), logits[:, 2], rtol=1e-6)
    np.testing.assert_allclose(targets.classes([2, 0])(logits), logits[:, [2, 0]], rtol=1e-6)
    np.testing.assert_allclose(targets.classes(np.array([1, 2]))(logits), logits[[0, 1], [1, 2]], rtol=1e-6)
    np.testing.assert_allclose(targets.multilabel([0, 1])(logits), logits[:, :2], rtol=1e-6)
    assert np.isnan(np.asarray(targets.classes(7)(logits))).all()  # out of range: NaN, never wrapped
    tap = gcj.split_tap(relu_features, pooled_head)
    # dy_c/dA = W[:, c] / (H W) at every position.
    g = np.broadcast_to(WEIGHTS[:, 1] / (H * W), A.shape)
    np.testing.assert_allclose(raw_cam(tap, targets.classes(1)), np_grad_cam(A, g), rtol=1e-5, atol=1e-6)
    per_label = raw_cam(tap, targets.multilabel([1, 2]))
    g2 = np.broadcast_to(WEIGHTS[:, 2] / (H * W), A.shape)
    np.testing.assert_allclose(per_label[:, 1], np_grad_cam(A, g2), rtol=1e-5, atol=1e-6)


def test_binary_both_signs():
    w = WEIGHTS[:, :1]
    tap = gcj.split_tap(relu_features, lambda a: a.mean(axis=(1, 2)) @ w)
    logit = (A.mean(axis=(1, 2)) @ w)[:, 0]
    np.testing.assert_allclose(targets.binary()(logit[:, None]), logit, rtol=1e-6)
    np.testing.assert_allclose(targets.binary(-1)(logit), -logit, rtol=1e-6)
    g = np.broadcast_to(w[:, 0] / (H * W), A.shape)
    np.testing.assert_allclose(raw_cam(tap, targets.binary(-1)), -np_grad_cam(A, g), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="sign must be"):
        targets.binary(0)
    with pytest.raises(ValueError, match="one logit per example"):
        gcj.grad_cam(gcj.split_tap(relu_features, pooled_head), X, targets.binary())


def test_regression_value_and_column():
    out = A.mean(axis=(1, 2)) @ WEIGHTS
    np.testing.assert_allclose(targets.regression(2)(out), out[:, 2], rtol=1e-6)
    np.testing.assert_allclose(targets.regression()(out[:, :1]), out[:, 0], rtol=1e-6)
    with pytest.raises(ValueError, match=r"regression\(i\)"):
        targets.regression()(jnp.asarray(out))
    tap = gcj.split_tap(relu_features, pooled_head)
    g = np.broadcast_to(WEIGHTS[:, 2] / (H * W), A.shape)
    np.testing.assert_allclose(raw_cam(tap, targets.regression(2)), np_grad_cam(A, g), rtol=1e-5, atol=1e-6)


def test_segmentation_against_numpy_and_analytic_grad_cam():
    mask = np.zeros((H, W), bool)
    mask[1:4, 2:5] = True
    logits = A @ WEIGHTS  # (B, H, W, K)
    want = (logits[..., 2] * mask).sum(axis=(1, 2))
    np.testing.assert_allclose(targets.segmentation(mask, 2)(logits), want, rtol=1e-5)
    per_example = np.stack([mask, ~mask])
    np.testing.assert_allclose(
        targets.segmentation(per_example, np.array([0, 1]))(logits),
        [(logits[0, ..., 0] * mask).sum(), (logits[1, ..., 1] * ~mask).sum()],
        rtol=1e-5,
    )
    tap = gcj.split_tap(relu_features, pixel_head)
    g = mask[None, :, :, None] * WEIGHTS[:, 2]  # d/dA of sum_mask A @ W[:, 2]
    np.testing.assert_allclose(
        raw_cam(tap, targets.segmentation(mask, 2)), np_grad_cam(A, np.broadcast_to(g, A.shape)), atol=1e-6
    )
    with pytest.raises(ValueError, match=r"resized to the output's resolution"):
        gcj.grad_cam(tap, X, targets.segmentation(np.ones((3, 3)), 0))
    with pytest.raises(ValueError, match=r"\(B, H, W, classes\)"):
        gcj.grad_cam(gcj.split_tap(relu_features, pooled_head), X, targets.segmentation(mask, 0))


def test_similarity_against_numpy():
    emb = A.mean(axis=(1, 2)) @ WEIGHTS  # (B, K) embeddings
    ref = RNG.normal(size=(K,)).astype(np.float32)
    refs = RNG.normal(size=(2, K)).astype(np.float32)

    def cos(u, v):
        return (u @ v.T) / np.linalg.norm(u, axis=-1, keepdims=True) / np.linalg.norm(v, axis=-1)

    np.testing.assert_allclose(targets.similarity(ref)(emb), cos(emb, ref[None])[:, 0], rtol=1e-5)
    np.testing.assert_allclose(targets.similarity(refs)(emb), cos(emb, refs), rtol=1e-5)
    # The gradient of cos(e, r) w.r.t. e is (r/|r| - cos * e/|e|) / |e|; through the pooled head.
    tap = gcj.split_tap(relu_features, pooled_head)
    e_norm = np.linalg.norm(emb, axis=-1, keepdims=True)
    de = (ref / np.linalg.norm(ref) - cos(emb, ref[None]) * emb / e_norm) / e_norm  # (B, K)
    g = np.broadcast_to((de @ WEIGHTS.T)[:, None, None, :] / (H * W), A.shape)
    np.testing.assert_allclose(raw_cam(tap, targets.similarity(ref)), np_grad_cam(A, g), rtol=1e-4, atol=1e-6)


def test_token_against_numpy():
    seq = RNG.normal(size=(B, 5, 7)).astype(np.float32)
    np.testing.assert_allclose(targets.token(3, 6)(seq), seq[:, 3, 6])
    np.testing.assert_allclose(
        targets.token(np.array([0, 4]), np.array([1, 2]))(seq), [seq[0, 0, 1], seq[1, 4, 2]]
    )
    assert np.isnan(np.asarray(targets.token(5, 0)(seq))).all()
    assert np.isnan(np.asarray(targets.token(0, 7)(seq))).all()
    # A sequence model: row h of the feature map is token h; logits (B, H, K) = A.sum(W) @ WEIGHTS.
    tap = gcj.split_tap(relu_features, lambda a: a.sum(axis=2) @ WEIGHTS)
    g = np.zeros(A.shape, np.float32)
    g[:, 4, :, :] = WEIGHTS[:, 1]  # d logits[:, 4, 1] / dA: W[:, 1] on every position of row 4
    np.testing.assert_allclose(raw_cam(tap, targets.token(4, 1)), np_grad_cam(A, g), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ box_score


def np_iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def np_box_score(ref, ref_labels, boxes, scores, labels, thr):
    """Per reference box: among same-label detections, the highest IoU (ties: higher score, then
    first); its score if IoU >= thr, else 0."""
    out = []
    for r, rl in zip(ref, ref_labels, strict=True):
        best, pick = -1.0, None
        for j, (bx, s, lab) in enumerate(zip(boxes, scores, labels, strict=True)):
            if rl is not None and lab != rl:
                continue
            iou = np_iou(r, bx)
            if iou > best or (iou == best and pick is not None and s > scores[pick]):
                best, pick = iou, j
        out.append(scores[pick] if pick is not None and best >= thr else 0.0)
    return np.array(out, np.float32)


DET_BOXES = np.array(
    [[[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10], [50, 50, 60, 60]]], np.float32
)
DET_SCORES = np.array([[0.5, 0.9, 0.7, 0.8, 0.3]], np.float32)
DET_LABELS = np.array([[1, 1, 2, 1, 0]], np.int32)


@pytest.mark.parametrize(
    "ref, ref_labels",
    [
        ([[0, 0, 10, 10]], [1]),  # tie at IoU 1 (detections 0 and 3): the higher score, 0.8
        ([[20, 21, 30, 31]], [2]),  # one match of the right label
        ([[20, 21, 30, 31]], [1]),  # right place, wrong label: no match
        ([[100, 100, 110, 110]], [1]),  # nowhere: no match
        ([[0, 0, 10, 10], [20, 20, 30, 30], [50, 52, 60, 62]], [1, 2, 0]),  # several
        ([[1, 1, 11, 11], [48, 48, 60, 60]], [None, None]),  # labels ignored
    ],
)
def test_box_score_against_numpy(ref, ref_labels):
    ref = np.array(ref, np.float32)
    labels = None if ref_labels[0] is None else np.array(ref_labels)
    want = np_box_score(ref, ref_labels, DET_BOXES[0], DET_SCORES[0], DET_LABELS[0], 0.5)
    dets = (jnp.asarray(DET_BOXES), jnp.asarray(DET_SCORES), jnp.asarray(DET_LABELS))
    got = targets.box_score(ref, labels, per_box=True)(dets)
    np.testing.assert_allclose(got[0], want, rtol=1e-6)
    np.testing.assert_allclose(targets.box_score(ref, labels)(dets)[0], want.sum(), rtol=1e-6)


def test_box_score_gradient_flows_to_the_matched_score_only():
    def fn(s):
        return targets.box_score(np.array([[0, 0, 10, 10]], np.float32), [1])((DET_BOXES, s, DET_LABELS))[0]

    g = np.asarray(jax.grad(fn)(jnp.asarray(DET_SCORES)))
    np.testing.assert_array_equal(g, [[0, 0, 0, 1, 0]])


def test_box_score_with_decode_on_a_detector():
    """A toy single-class detector: one box per grid cell of fixed size, score = a per-pixel logit."""
    cell = np.array([[x, y, x + 2, y + 2] for y in range(H) for x in range(W)], np.float32)

    def decode(scores):
        b = scores.shape[0]
        return jnp.broadcast_to(cell, (b, H * W, 4)), scores[..., 0].reshape(b, H * W), None

    tap = gcj.split_tap(relu_features, pixel_head)
    ref = np.array([[2, 3, 4, 5]], np.float32)  # exactly the box of cell (y=3, x=2)
    g = np.zeros(A.shape, np.float32)
    g[:, 3, 2, :] = WEIGHTS[:, 0]
    got = raw_cam(tap, targets.box_score(ref, decode=decode))
    np.testing.assert_allclose(got, np_grad_cam(A, g), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ no recompilation


def test_new_mask_box_reference_do_not_recompile(caplog):
    x = RNG.normal(size=(B, 7, 7, C)).astype(np.float32)  # a shape of this test's own
    seg = gcj.split_tap(relu_features, pixel_head)
    pooled = gcj.split_tap(relu_features, pooled_head)
    squared = gcj.split_tap(relu_features, squared_pixel_head)
    cell = np.array([[x0, y0, x0 + 2, y0 + 2] for y0 in range(7) for x0 in range(7)], np.float32)
    decode = functools.partial(_decode_cells, cell)
    makers = [
        (seg, lambda k: targets.segmentation(np.eye(7, k=k) > 0, k % K)),
        (squared, lambda k: targets.box_score(cell[[k]], decode=decode)),  # squared: Grad-CAM's mean differs
        (pooled, lambda k: targets.similarity(np.eye(K, dtype=np.float32)[k % K] + 0.5)),
        (pooled, lambda k: targets.classes(k)),
    ]
    for tap, make in makers:
        with compilations(caplog, "gradient_cam_kernel") as compiled:
            maps = [
                np.asarray(gcj.grad_cam(tap, x, make(k), upsample=False, normalize=False, relu=False))
                for k in (0, 1, 2)
            ]
        assert len(compiled) == 1, compiled
        assert not np.allclose(maps[0], maps[1])


def squared_pixel_head(a):
    return (a @ WEIGHTS) ** 2


def _decode_cells(cell, scores):
    b, h, w, _ = scores.shape
    return jnp.broadcast_to(cell, (b, h * w, 4)), scores[..., 0].reshape(b, h * w), None


def test_bad_arguments_say_what_to_do():
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        targets.box_score(np.zeros((3,)))
    with pytest.raises(ValueError, match=r"\(D,\) or \(K, D\)"):
        targets.similarity(np.zeros((1, 2, 3)))
    with pytest.raises(ValueError, match="negative"):
        targets.classes(-1)
    with pytest.raises(TypeError, match="integers"):
        targets.classes(1.5)
