"""Score-CAM and ``explain-dir --model`` on third-party model classes (issue 12, "Tests"): Hugging Face
Flax ResNet and ViT, Haiku's ResNet18, a Keras 3 Sequential CNN, equimo's ConvNeXt and the Flax-docs
NNX CNN, each from tests/third_party_models.py (tiny, random weights, 32 x 32 images).

- Score-CAM equals the method written out here, one channel at a time, with the masked images
  scored by the model's own forward (``model.logits``, not the tap);
- ``explain-dir --model third_party_models:FACTORY`` (``--layout NCHW`` for the Hugging Face
  models) stores the Grad-CAM maps, classes and class names the library computes directly;
- ``explain_dataset(layout=...)``: maps of a channels-first input at the image's size, the
  layout recorded in the store (and only when given), a changed layout refused on resume.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import third_party_models as tpm  # tests/third_party_models.py
from PIL import Image

import gradcam_jax as gcj
from gradcam_jax import cli
from gradcam_jax.dataset import explain_dataset, open_results
from gradcam_jax.dataset.run import describe_job

N = 3  # images
SIZE = tpm.SIZE
TARGETS = np.array([0, 2, 4])
TOP_N = 3  # Score-CAM channels kept per example


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A folder of ``N`` random 32 x 32 PNGs, and their pixels ``(N, 32, 32, 3)``."""
    folder = tmp_path_factory.mktemp("third_party_images")
    pixels = np.random.default_rng(0).integers(0, 256, (N, SIZE, SIZE, 3), dtype=np.uint8)
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(folder / f"img{i}.png")
    return folder, pixels


@pytest.fixture(scope="module", params=tpm.FACTORIES)
def model(request):
    """``(factory name, model)``: built once per factory; the tests of one model share its compiles."""
    return request.param, getattr(tpm, request.param)()


@pytest.fixture
def env(monkeypatch, tmp_path):
    # In-process runs must not switch on JAX's persistent cache for the whole test session.
    monkeypatch.setenv("GRADCAM_JAX_NO_XLA_CACHE", "1")
    monkeypatch.setenv("GRADCAM_JAX_CACHE", str(tmp_path / "cache"))


# --------------------------------------------------------------------------------------------
# Score-CAM, written out


def as_grid(a):
    """A tap's channels-last activation as ``(B, h, w, C)``: tokens on their square grid."""
    if a.ndim == 4:
        return a
    side = round(a.shape[1] ** 0.5)
    return a.reshape(a.shape[0], side, side, a.shape[-1])


def upsampled_mask(channel):
    """One channel ``(h, w)`` resized to the image (half-pixel bilinear) and min-max scaled to [0, 1]."""
    m = np.asarray(jax.image.resize(jnp.asarray(channel, jnp.float32), (SIZE, SIZE), "bilinear"), np.float64)
    return (m - m.min()) / (m.max() - m.min())


def reference_score_cam(model, x, targets, top_n):
    """Raw Score-CAM ``sum_k softmax_k(y^c(x * M_k)) A^k`` over each example's ``top_n`` channels
    of largest spatial spread, looping over examples and channels."""
    _, act = jax.jit(model.tap)(x)
    a = np.asarray(as_grid(act), np.float64)
    x = np.asarray(x, np.float64)
    kept, masked = [], []
    for b in range(len(x)):
        keep = np.argsort(-a[b].std(axis=(0, 1)), kind="stable")[:top_n]
        kept.append(keep)
        for k in keep:
            m = upsampled_mask(a[b, :, :, k])
            masked.append(x[b] * (m[None] if model.layout == "NCHW" else m[..., None]))
    batch = jnp.asarray(np.stack(masked), jnp.float32)
    scores = np.asarray(jax.jit(model.logits)(batch), np.float64).reshape(len(x), top_n, -1)
    maps = []
    for b, keep in enumerate(kept):
        s = scores[b, :, targets[b]]
        alpha = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
        maps.append(np.einsum("k,hwk->hw", alpha, a[b][:, :, keep]))
    return np.stack(maps)


def finished(raw):
    """ReLU, bilinear upsampling to the image, min-max normalisation: the library's finishing."""
    up = np.asarray(jax.image.resize(jnp.maximum(jnp.asarray(raw), 0), (len(raw), SIZE, SIZE), "bilinear"))
    lo, hi = up.min(axis=(1, 2), keepdims=True), up.max(axis=(1, 2), keepdims=True)
    return np.where(hi > lo, (up - lo) / np.where(hi > lo, hi - lo, 1), 0)


def test_score_cam_equals_a_loop_over_channels(model, images):
    name, m = model
    x = m.preprocess(images[1])
    raw = np.asarray(
        gcj.score_cam(
            m.tap, x, TARGETS, top_n=TOP_N, upsample=False, normalize=False, relu=False, layout=m.layout
        )
    )
    want = reference_score_cam(m, x, TARGETS, TOP_N)
    scale = np.abs(want).max()
    assert raw.shape == want.shape and scale > 1e-3, (name, raw.shape, scale)
    np.testing.assert_allclose(raw, want, rtol=1e-4, atol=1e-5 * scale, err_msg=name)
    maps = np.asarray(gcj.score_cam(m.tap, x, TARGETS, top_n=TOP_N, layout=m.layout))
    assert maps.shape == (N, SIZE, SIZE) and np.isfinite(maps).all()
    assert maps.min() >= 0 and maps.max() <= 1
    np.testing.assert_allclose(maps, finished(raw), atol=1e-5, err_msg=name)
    same = gcj.cam(m.tap, x, TARGETS, method="score_cam", top_n=TOP_N, layout=m.layout)
    np.testing.assert_array_equal(np.asarray(same), maps)


# --------------------------------------------------------------------------------------------
# explain-dir --model third_party_models:FACTORY


def test_explain_dir_through_model_flag(model, images, env, tmp_path):
    name, m = model
    folder, pixels = images
    store = tmp_path / f"{name}.zarr"
    layout = ["--layout", m.layout] if m.layout else []
    args = ["--model", f"third_party_models:{name}", "--classes", "top2", *layout, "-q"]
    assert cli.main(["explain-dir", str(folder), "--out", str(store), *args]) == 0

    res = open_results(store)
    assert list(res["files"][:]) == [f"img{i}.png" for i in range(N)]
    x = m.preprocess(pixels)
    targets = np.asarray(res["targets"][:])
    logits = np.asarray(jax.jit(m.logits)(x))
    np.testing.assert_array_equal(targets, np.argsort(-logits, axis=-1, kind="stable")[:, :2])
    expected = np.asarray(gcj.grad_cam(m.tap, x, targets, upsample=False, layout=m.layout))
    maps = np.asarray(res["maps"][:], np.float32)
    assert maps.shape == expected.shape and expected.shape[:2] == (N, 2)
    np.testing.assert_allclose(maps, expected, atol=2e-3, err_msg=name)  # the store keeps float16
    assert res.class_names == list(tpm.CLASS_NAMES)
    assert res.config["model"] == name and res.config["layer"] == m.default_layer
    assert res.config.get("layout") == m.layout


def test_vit_tap_without_the_class_token_equals_drop_tokens():
    """The ViT factory's tap drops the class token itself; the plain hf_tap with ``drop_tokens=1``
    gives the same maps (what a ``drop_tokens=1`` run of the library computes)."""
    m = tpm.hf_vit()
    x = m.preprocess(np.random.default_rng(1).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8))
    tokens = m.token_tap_at(tpm.VIT_LAYER)
    assert jax.eval_shape(tokens, x)[1].shape == (2, 17, 32)
    got = gcj.grad_cam(m.tap, x, [1, 3], upsample=False, layout="NCHW")
    want = gcj.grad_cam(tokens, x, [1, 3], upsample=False, layout="NCHW", drop_tokens=1)
    assert got.shape == (2, 2, 4, 4)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)


def test_explain_dir_drop_tokens_for_a_vit(images, env, tmp_path):
    """``--drop-tokens 1`` with the plain ViT token tap: the maps of ``drop_tokens=1``."""
    folder, pixels = images
    store = tmp_path / "vit.zarr"
    args = ["--model", "third_party_models:hf_vit_tokens", "--classes", "top2", "--layout", "NCHW"]
    assert cli.main(["explain-dir", str(folder), "--out", str(store), *args, "--drop-tokens", "1", "-q"]) == 0
    m = tpm.hf_vit_tokens()
    res = open_results(store)
    x = m.preprocess(pixels)
    targets = np.asarray(res["targets"][:])
    want = gcj.grad_cam(m.tap, x, targets, upsample=False, layout="NCHW", drop_tokens=1)
    np.testing.assert_allclose(np.asarray(res["maps"][:], np.float32), np.asarray(want), atol=2e-3)
    assert res.config["drop_tokens"] == 1


# --------------------------------------------------------------------------------------------
# explain_dataset(layout=...)

HEAD = np.random.default_rng(2).normal(size=(3, 5)).astype(np.float32)


def to_nchw(x):
    """The loaded uint8 batch -> float32 channels-first (the model's preprocessing)."""
    return jnp.moveaxis(x.astype(jnp.float32) / 255.0, -1, 1)


def nchw_features(x):
    """``(B, 3, H, W)`` -> a channels-last ``(B, H/2, W/2, 3)`` activation."""
    return jax.nn.relu(jnp.moveaxis(x[:, :, ::2, ::2], 1, -1) - 0.5)


def linear_head(a):
    return a.mean(axis=(1, 2)) @ HEAD


NCHW_TAP = gcj.split_tap(nchw_features, linear_head)
RUN = dict(preprocess=to_nchw, batch_size=4, top=2, workers=1, progress=False)


def test_layout_gives_maps_at_the_image_size_and_is_recorded(tmp_path):
    pixels = np.random.default_rng(3).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="layout='NCHW'"):  # (4, 3, 16, 16) looks channels-first
        explain_dataset(pixels, NCHW_TAP, out=tmp_path / "refused", resolution="input", **RUN)
    assert not (tmp_path / "refused").exists()
    store = tmp_path / "nchw.zarr"
    explain_dataset(pixels, NCHW_TAP, out=store, resolution="input", layout="nchw", **RUN)
    res = open_results(store)
    assert res.config["layout"] == "NCHW"
    expected = np.asarray(gcj.grad_cam(NCHW_TAP, to_nchw(jnp.asarray(pixels)), layout="NCHW"))
    assert expected.shape == (4, 16, 16)
    np.testing.assert_allclose(np.asarray(res["maps"][:], np.float32), expected, atol=2e-3)
    # Resuming the job with another layout is refused, as for any other changed option.
    with pytest.raises(ValueError, match="different job.*layout"):
        explain_dataset(pixels, NCHW_TAP, out=store, resolution="input", layout="NHWC", **RUN)


def test_default_layout_leaves_the_store_config_as_before(tmp_path):
    """Without layout= the store records no layout (as stores written before it existed), so
    they resume; a layout given later is a different job."""
    pixels = np.random.default_rng(4).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    assert "layout" not in describe_job(pixels, NCHW_TAP, out=tmp_path / "x", **RUN).store_config()
    store = tmp_path / "layer.zarr"
    explain_dataset(pixels, NCHW_TAP, out=store, **RUN)  # layer resolution: no upsampling
    assert "layout" not in open_results(store).config
    assert explain_dataset(pixels, NCHW_TAP, out=store, **RUN).already_complete
    with pytest.raises(ValueError, match="different job.*layout: store has None, this run 'NCHW'"):
        explain_dataset(pixels, NCHW_TAP, out=store, layout="NCHW", **RUN)
    recorded = tmp_path / "recorded.zarr"
    explain_dataset(pixels, NCHW_TAP, out=recorded, layout="NCHW", **RUN)
    np.testing.assert_array_equal(open_results(recorded)["maps"][:], open_results(store)["maps"][:])
