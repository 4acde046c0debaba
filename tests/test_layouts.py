"""Input layouts (channels-first), spatial rank 1 and 3, pytree inputs, and all-zero gradients.

Expected values come from NumPy: activations and gradients of small models written out by
hand, half-pixel linear interpolation, and occlusion as a loop.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradcam_jax as gcj
from gradcam_jax._tap import adapt_tap

NCLS = 4


def np_linear_resize_axis(a, axis, size):
    """Half-pixel linear interpolation along one axis (edges clamped), as torch's align_corners=False."""
    n = a.shape[axis]
    src = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    w = src - lo
    shape = [1] * a.ndim
    shape[axis] = size
    w = w.reshape(shape)
    return np.take(a, lo, axis=axis) * (1 - w) + np.take(a, hi, axis=axis) * w


def np_resize(m, size):
    """Resize the last len(size) axes of maps ``m``."""
    for i, s in enumerate(size):
        m = np_linear_resize_axis(m, m.ndim - len(size) + i, s)
    return m


def np_normalize(m, rank):
    axes = tuple(range(m.ndim - rank, m.ndim))
    lo, hi = m.min(axes, keepdims=True), m.max(axes, keepdims=True)
    return np.where(hi > lo, (m - lo) / np.where(hi > lo, hi - lo, 1), 0)


def pooled_problem(spatial, seed=0, cin=3, k=6, pool=2):
    """x (B, *spatial, cin); A = relu(avgpool(x) @ m); scores = mean_positions(tanh(A)) @ v."""
    r = np.random.default_rng(seed)
    x = r.normal(size=(2, *spatial, cin)).astype(np.float32)
    m = r.normal(size=(cin, k)).astype(np.float32)
    v = r.normal(size=(k, NCLS)).astype(np.float32)
    rank = len(spatial)

    def pool_fn(z, xp):
        shape = [z.shape[0]]
        for s in z.shape[1:-1]:
            shape += [s // pool, pool]
        z = z.reshape(shape + [z.shape[-1]])
        return z.mean(axis=tuple(2 + 2 * i for i in range(rank)))

    def features(z):
        return jax.nn.relu(jnp.einsum("b...c,ck->b...k", pool_fn(z, jnp), m))

    def head(a):
        return jnp.tanh(a).mean(axis=tuple(range(1, a.ndim - 1))) @ v

    a_np = np.maximum(np.einsum("b...c,ck->b...k", pool_fn(x, np), m), 0)
    return x, features, head, a_np, v


def np_grad_cam(a, v, cls):
    """Grad-CAM of the pooled problem by hand: dA = (1 - tanh(A)^2) v[:, c] / positions."""
    positions = np.prod(a.shape[1:-1])
    g = (1 - np.tanh(a) ** 2) * v[:, cls].T.reshape((a.shape[0],) + (1,) * (a.ndim - 2) + (-1,)) / positions
    w = g.mean(axis=tuple(range(1, a.ndim - 1)))
    return np.maximum(np.einsum("bk,b...k->b...", w, a), 0)


# --------------------------------------------------------------------------------------------
# Spatial rank 1 and 3
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spatial", [(16,), (8, 8), (4, 6, 8)], ids=["1d", "2d", "3d"])
def test_grad_cam_any_rank_matches_numpy(spatial):
    x, features, head, a, v = pooled_problem(spatial)
    tap = gcj.split_tap(features, head)
    cls = np.array([1, 3])
    got = gcj.grad_cam(tap, x, cls)
    want = np_normalize(np_resize(np_grad_cam(a, v, cls), spatial), len(spatial))
    assert got.shape == (2, *spatial)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)


@pytest.mark.parametrize(
    "method", ["grad_cam_plus_plus", "layer_cam", "eigen_cam", "score_cam", "ablation_cam"]
)
def test_every_method_runs_on_signals_and_volumes(method):
    for spatial in [(16,), (4, 4, 4)]:
        x, features, head, _, _ = pooled_problem(spatial, seed=1)
        maps = gcj.cam(gcj.split_tap(features, head), x, [0, 2], method=method)
        assert maps.shape == (2, 2, *spatial)
        assert np.isfinite(np.asarray(maps)).all() and float(maps.max()) <= 1.0


def test_occlusion_on_a_signal_matches_a_loop():
    x, features, head, _, _ = pooled_problem((12,), seed=2)

    def fn(z):
        return head(features(z))

    got = np.asarray(gcj.occlusion(fn, x, 1, window=4, stride=2))
    y = np.asarray(fn(x))[:, 1]
    total, count = np.zeros((2, 12)), np.zeros(12)
    for start in range(0, 12 - 4 + 1, 2):
        z = x.copy()
        z[:, start : start + 4] = 0.0
        total[:, start : start + 4] += (y - np.asarray(fn(z))[:, 1])[:, None]
        count[start : start + 4] += 1
    np.testing.assert_allclose(got, total / count, rtol=1e-5, atol=1e-5)


def test_guided_grad_cam_on_a_volume_is_guided_backprop_times_the_map():
    x, features, head, a, v = pooled_problem((4, 4, 4), seed=3)
    tap = gcj.split_tap(features, head)
    ggc = gcj.guided_grad_cam(tap, x, 2, normalize=False)
    gb = np.asarray(gcj.guided_backprop(lambda z: head(features(z)), x, 2))
    cam = np_resize(np_grad_cam(a, v, np.array([2, 2])), (4, 4, 4))
    np.testing.assert_allclose(np.asarray(ggc), gb * cam[..., None], rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Channels-first input and activations
# --------------------------------------------------------------------------------------------


def nchw_problem(seed=4):
    x, features, head, a, v = pooled_problem((8, 8), seed=seed)
    x_nchw = np.moveaxis(x, -1, 1)

    def features_nchw(z):  # a channels-first model: NCHW in, NCHW activation out
        return jnp.moveaxis(features(jnp.moveaxis(z, 1, -1)), -1, 1)

    def head_nchw(act):
        return head(jnp.moveaxis(act, 1, -1))

    tap = adapt_tap(gcj.split_tap(features_nchw, head_nchw), activation_layout="NCHW")
    return x_nchw, tap, features, head, a, v


def test_channels_first_input_and_activation_give_the_right_maps():
    x_nchw, tap, _, _, a, v = nchw_problem()
    got = gcj.grad_cam(tap, x_nchw, [0, 3], layout="NCHW")
    cls = np.array([[0, 3], [0, 3]])
    want = np.stack([np_grad_cam(a, v, cls[:, i]) for i in range(2)], axis=1)
    want = np_normalize(np_resize(want, (8, 8)), 2)
    assert got.shape == (2, 2, 8, 8)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)


def test_channels_first_input_is_refused_without_layout():
    x_nchw, tap, *_ = nchw_problem()
    with pytest.raises(ValueError, match="layout='NCHW'"):
        gcj.grad_cam(tap, x_nchw)
    with pytest.raises(ValueError, match="layout="):
        gcj.score_cam(tap, x_nchw)


def test_perturbation_and_pixel_methods_follow_the_layout():
    x_nchw, tap, features, head, _, _ = nchw_problem(seed=5)
    ref_tap = gcj.split_tap(features, head)
    x = np.moveaxis(x_nchw, 1, -1)
    for method in ("score_cam", "ablation_cam", "grad_cam_plus_plus"):
        got = gcj.cam(tap, x_nchw, 1, method=method, layout="NCHW")
        np.testing.assert_allclose(
            np.asarray(got), np.asarray(gcj.cam(ref_tap, x, 1, method=method)), atol=1e-5
        )
    got = gcj.guided_grad_cam(tap, x_nchw, 1, layout="NCHW")
    want = np.moveaxis(np.asarray(gcj.guided_grad_cam(ref_tap, x, 1)), -1, 1)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
    occ = gcj.occlusion(tap, x_nchw, 1, window=4, stride=4, layout="NCHW")
    np.testing.assert_allclose(
        np.asarray(occ), np.asarray(gcj.occlusion(ref_tap, x, 1, window=4, stride=4)), atol=1e-5
    )


# --------------------------------------------------------------------------------------------
# Pytree inputs
# --------------------------------------------------------------------------------------------


def two_input_problem():
    x, features, head, a, v = pooled_problem((8, 8), seed=6)
    scale = np.array([1.0, -2.0], np.float32)

    def features2(inp):
        return features(inp["image"]) * inp["scale"][:, None, None, None]

    tap = gcj.split_tap(features2, head)
    return {"image": x, "scale": scale}, tap, a * scale[:, None, None, None], v


def test_two_input_model_explains_its_image():
    inputs, tap, a, v = two_input_problem()
    cls = np.array([2, 0])
    want = np_normalize(np_resize(np_grad_cam(a, v, cls), (8, 8)), 2)
    for picked in (None, "image", lambda t: t["image"]):
        got = gcj.grad_cam(tap, inputs, cls, input=picked)
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)
    grads = gcj.gradients(tap, inputs, cls)
    by_hand = jax.grad(
        lambda im: jnp.sum(tap({"image": im, "scale": inputs["scale"]})[0][jnp.arange(2), cls])
    )(inputs["image"])
    np.testing.assert_allclose(np.asarray(grads), np.asarray(by_hand), rtol=1e-5, atol=1e-7)
    maps = gcj.score_cam(tap, inputs, cls)
    assert maps.shape == (2, 8, 8) and np.isfinite(np.asarray(maps)).all()
    assert gcj.occlusion(tap, inputs, cls, window=4, stride=4).shape == (2, 8, 8)


def test_ambiguous_pytree_input_asks_for_input():
    inputs, tap, _, _ = two_input_problem()
    inputs = {**inputs, "mask": np.ones((2, 8, 8, 1), np.float32)}
    with pytest.raises(ValueError, match="input="):
        gcj.grad_cam(tap, inputs)
    with pytest.raises(ValueError, match="does not pick"):
        gcj.grad_cam(tap, inputs, input="picture")


# --------------------------------------------------------------------------------------------
# All-zero gradients are refused
# --------------------------------------------------------------------------------------------


def class_token_problem():
    r = np.random.default_rng(7)
    tokens = r.normal(size=(2, 1 + 16, 8)).astype(np.float32)
    v = r.normal(size=(8, NCLS)).astype(np.float32)
    # The head reads only the class token, as a ViT's does: patch tokens get no gradient.
    return tokens, gcj.split_tap(lambda t: jnp.tanh(t), lambda a: a[:, 0] @ v)


def test_all_zero_gradients_are_refused_with_the_cause():
    tokens, tap = class_token_problem()
    with pytest.raises(ValueError, match="class token"):
        gcj.grad_cam(tap, tokens, 1, drop_tokens=1, upsample=False)
    with pytest.raises(ValueError, match="exactly zero"):
        gcj.cam(tap, tokens, [0, 1], "hires_cam", drop_tokens=1, upsample=False)


def test_all_zero_gradients_under_jit_give_zero_maps_and_eigen_cam_is_not_refused():
    tokens, tap = class_token_problem()
    maps = jax.jit(lambda t: gcj.grad_cam(tap, t, 1, drop_tokens=1, upsample=False))(tokens)
    np.testing.assert_array_equal(np.asarray(maps), 0.0)
    eigen = gcj.cam(tap, tokens, 1, "eigen_cam", drop_tokens=1, upsample=False)
    assert float(jnp.abs(eigen).max()) > 0


def test_a_plain_tap_written_as_a_plus_delta_works():
    x, features, head, a, v = pooled_problem((8, 8), seed=8)

    def my_tap(z, delta):  # the custom-tap protocol, with no special case for "no delta"
        act = features(z)
        return head(act + delta), act

    cls = np.array([3, 1])
    want = np_normalize(np_resize(np_grad_cam(a, v, cls), (8, 8)), 2)
    np.testing.assert_allclose(np.asarray(gcj.grad_cam(my_tap, x, cls)), want, atol=2e-5)
    ref = gcj.split_tap(features, head)
    np.testing.assert_allclose(
        np.asarray(gcj.ablation_cam(my_tap, x, cls)), np.asarray(gcj.ablation_cam(ref, x, cls)), atol=1e-5
    )


# --------------------------------------------------------------------------------------------
# Real convolutions: a 1-D CNN on a time series, a 3-D CNN on a volume
# --------------------------------------------------------------------------------------------


def np_conv_valid(x, k, stride):
    """``x`` (B, *spatial, Cin), ``k`` (*window, Cin, Cout): a VALID strided convolution by loops."""
    rank = x.ndim - 2
    window = k.shape[:rank]
    out_sizes = [(n - w) // stride + 1 for n, w in zip(x.shape[1:-1], window, strict=True)]
    out = np.zeros((x.shape[0], *out_sizes, k.shape[-1]))
    for pos in np.ndindex(*out_sizes):
        sl = tuple(slice(p * stride, p * stride + w) for p, w in zip(pos, window, strict=True))
        patch = x[(slice(None), *sl, slice(None))]  # (B, *window, Cin)
        out[(slice(None), *pos, slice(None))] = np.tensordot(patch, k, axes=rank + 1)
    return out


@pytest.mark.parametrize("spatial", [(20,), (6, 8, 8)], ids=["conv1d", "conv3d"])
def test_grad_cam_of_a_real_cnn_matches_numpy(spatial):
    rank = len(spatial)
    r = np.random.default_rng(9)
    x = r.normal(size=(2, *spatial, 3)).astype(np.float32)
    k = r.normal(size=(3,) * rank + (3, 5)).astype(np.float32) * 0.5
    v = r.normal(size=(5, NCLS)).astype(np.float32)
    dims = {1: ("NWC", "WIO", "NWC"), 3: ("NDHWC", "DHWIO", "NDHWC")}[rank]

    def features(z):
        y = jax.lax.conv_general_dilated(z, k, (2,) * rank, "VALID", dimension_numbers=dims)
        return jax.nn.relu(y)

    def head(a):  # global average pool + dense: dA = v[:, c] / positions
        return a.mean(axis=tuple(range(1, rank + 1))) @ v

    cls = np.array([0, 2])
    a = np.maximum(np_conv_valid(x.astype(np.float64), k.astype(np.float64), 2), 0)
    w = v[:, cls].T / np.prod(a.shape[1:-1])  # Grad-CAM weights: the mean of a constant gradient
    raw = np.maximum(np.einsum("bk,b...k->b...", w, a), 0)
    want = np_normalize(np_resize(raw, spatial), rank)
    got = gcj.grad_cam(gcj.split_tap(features, head), x, cls)
    assert got.shape == (2, *spatial)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)
