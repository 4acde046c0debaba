"""Score-CAM, Ablation-CAM and occlusion against direct loops over the papers' formulas.

The small test model is NumPy-computable: ``A = ReLU(pool4(x) M)`` (4x4 average pooling, a
1x1 channel mix) and ``y = mean_ij tanh(A_ij) V``. The references below loop over examples,
channels and windows one forward at a time, in float64 NumPy, with their own bilinear resize
and min-max normalisation — nothing from the package. A Flax Linen conv net checks the same
formulas through ``linen_tap``, with the reference loop calling the model's own methods.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import JIT_OR_NOT

import gradcam_jax as gcj
from gradcam_jax import MapOptions, TargetSpec
from gradcam_jax.perturbation import (
    PerturbationOptions,
    ablation_cam,
    ablation_cam_kernel,
    occlusion,
    score_cam,
    score_cam_kernel,
)

B, S, CIN, C, NCLS, POOL = 3, 16, 3, 7, 5, 4


# --------------------------------------------------------------------------------------------
# The NumPy model and references
# --------------------------------------------------------------------------------------------


def make_problem(seed=0, channels=C, size=S, batch=B):
    r = np.random.default_rng(seed)
    x = r.normal(size=(batch, size, size, CIN)).astype(np.float32)
    m = r.normal(size=(CIN, channels)).astype(np.float32)
    v = r.normal(size=(channels, NCLS)).astype(np.float32)
    h = size // POOL

    def features(x):
        pooled = x.reshape(x.shape[0], h, POOL, h, POOL, CIN).mean(axis=(2, 4))
        return jax.nn.relu(jnp.einsum("bhwc,ck->bhwk", pooled, m))

    def head(a):
        return jnp.einsum("bk,kc->bc", jnp.tanh(a).mean(axis=(1, 2)), v)

    return gcj.split_tap(features, head), x, m, v


def np_features(x, m):
    b, s = x.shape[0], x.shape[1]
    h = s // POOL
    pooled = x.astype(np.float64).reshape(b, h, POOL, h, POOL, -1).mean(axis=(2, 4))
    return np.maximum(np.einsum("bhwc,ck->bhwk", pooled, m), 0)


def np_head(a, v):
    return np.einsum("bk,kc->bc", np.tanh(a).mean(axis=(1, 2)), v)


def np_resize(maps, size):
    """Bilinear resize of the last two axes, half-pixel centres, edges clamped."""

    def weights(n_in, n_out):
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        frac = src - lo
        w = np.zeros((n_out, n_in))
        w[np.arange(n_out), lo] += 1 - frac
        w[np.arange(n_out), hi] += frac
        return w

    wy = weights(maps.shape[-2], size[0])
    wx = weights(maps.shape[-1], size[1])
    return np.einsum("yi,...ij,xj->...yx", wy, maps, wx)


def np_minmax(maps):
    lo = maps.min(axis=(-2, -1), keepdims=True)
    hi = maps.max(axis=(-2, -1), keepdims=True)
    span = hi - lo
    return np.where(span > 0, (maps - lo) / np.where(span > 0, span, 1), 0.0)


def np_finish(raw, size):
    return np_minmax(np_resize(np.maximum(raw, 0), size))


def np_score_cam(x, cls, scores_fn, features_fn, keep=None):
    """Wang et al. 2020, Algorithm 1, one masked forward at a time (with the baseline term)."""
    a = features_fn(x)
    out = []
    for b in range(x.shape[0]):
        channels = range(a.shape[-1]) if keep is None else keep[b]
        base = scores_fn(np.zeros_like(x[b : b + 1]))[0, cls[b]]
        s, maps = [], []
        for k in channels:
            mask = np_minmax(np_resize(a[b, :, :, k], x.shape[1:3]))
            s.append(scores_fn(x[b : b + 1] * mask[None, :, :, None])[0, cls[b]] - base)
            maps.append(a[b, :, :, k])
        s = np.asarray(s, np.float64)
        alpha = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
        out.append(np.einsum("k,kij->ij", alpha, np.asarray(maps)))
    return np.stack(out)


def np_ablation_cam(a, cls, head_fn):
    """Desai & Ramaswamy 2020, eq. 3, one ablated head pass at a time."""
    y = head_fn(a)[np.arange(a.shape[0]), cls]
    out = []
    for b in range(a.shape[0]):
        w = []
        for k in range(a.shape[-1]):
            ablated = a[b : b + 1].copy()
            ablated[..., k] = 0
            w.append((y[b] - head_fn(ablated)[0, cls[b]]) / y[b])
        out.append(np.einsum("k,ijk->ij", np.asarray(w), a[b]))
    return np.stack(out)


def np_occlusion(x, cls, scores_fn, window, stride, baseline):
    """Zeiler & Fergus occlusion, windows clipped at the border, mean drop per pixel."""

    def starts(n, w, s):
        out, p = [], 0
        while True:
            out.append(p)
            if p + w >= n:
                return out
            p += s

    _, h, w, _ = x.shape
    total = np.zeros(x.shape[:3])
    count = np.zeros((h, w))
    y = scores_fn(x)[np.arange(x.shape[0]), cls]
    base = np.broadcast_to(baseline, x.shape)
    for i in starts(h, window[0], stride[0]):
        for j in starts(w, window[1], stride[1]):
            occluded = x.copy()
            occluded[:, i : i + window[0], j : j + window[1]] = base[:, i : i + window[0], j : j + window[1]]
            drop = y - scores_fn(occluded)[np.arange(x.shape[0]), cls]
            total[:, i : i + window[0], j : j + window[1]] += drop[:, None, None]
            count[i : i + window[0], j : j + window[1]] += 1
    return total / count


# --------------------------------------------------------------------------------------------
# Score-CAM
# --------------------------------------------------------------------------------------------


@JIT_OR_NOT
def test_score_cam_matches_paper_loop(wrap):
    tap, x, m, v = make_problem()
    cls = np.array([0, 3, 4])
    expected = np_score_cam(x, cls, lambda z: np_head(np_features(z, m), v), lambda z: np_features(z, m))
    raw = wrap(lambda x, t: score_cam(tap, x, t, chunk_size=6, upsample=False, normalize=False, relu=False))(
        x, cls
    )
    np.testing.assert_allclose(raw, expected, rtol=1e-4, atol=1e-5)
    maps = wrap(lambda x, t: score_cam(tap, x, t, chunk_size=6))(x, cls)
    np.testing.assert_allclose(maps, np_finish(expected, (S, S)), atol=1e-4)


def test_score_cam_top_class_is_fixed_on_the_clean_input():
    tap, x, m, v = make_problem(seed=1)
    top = np_head(np_features(x, m), v).argmax(-1)
    expected = np_score_cam(x, top, lambda z: np_head(np_features(z, m), v), lambda z: np_features(z, m))
    np.testing.assert_allclose(
        score_cam(tap, x, upsample=False, normalize=False, relu=False), expected, rtol=1e-4, atol=1e-5
    )


def test_score_cam_top_n_keeps_the_channels_with_the_largest_spread():
    tap, x, m, v = make_problem(seed=2)
    cls = np.array([1, 1, 2])
    np.testing.assert_allclose(score_cam(tap, x, cls, top_n=C), score_cam(tap, x, cls), atol=1e-6)
    a = np_features(x, m)
    keep = np.argsort(-a.std(axis=(1, 2)), axis=-1)[:, :3]
    expected = np_score_cam(
        x, cls, lambda z: np_head(np_features(z, m), v), lambda z: np_features(z, m), keep=keep
    )
    got = score_cam(tap, x, cls, top_n=3, upsample=False, normalize=False, relu=False)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Ablation-CAM
# --------------------------------------------------------------------------------------------


@JIT_OR_NOT
def test_ablation_cam_matches_paper_loop(wrap):
    tap, x, m, v = make_problem(seed=3)
    cls = np.array([2, 0, 4])
    expected = np_ablation_cam(np_features(x, m), cls, lambda a: np_head(a, v))
    raw = wrap(
        lambda x, t: ablation_cam(tap, x, t, chunk_size=6, upsample=False, normalize=False, relu=False)
    )(x, cls)
    np.testing.assert_allclose(raw, expected, rtol=1e-4, atol=1e-5)
    maps = wrap(lambda x, t: ablation_cam(tap, x, t, chunk_size=6))(x, cls)
    np.testing.assert_allclose(maps, np_finish(expected, (S, S)), atol=1e-4)


def test_ablation_cam_zero_score_gives_zero_map_not_nan():
    tap, x, _, _ = make_problem()
    maps = ablation_cam(tap, x, lambda s: s[:, 0] * 0.0)
    assert np.isfinite(np.asarray(maps)).all()
    np.testing.assert_array_equal(maps, 0.0)


def test_ablation_cam_reruns_only_the_head():
    # The features hold the model's only cosine. In the compiled Ablation-CAM program no cosine
    # is left in the loop over ablated channels (XLA removed the layers below the tap there);
    # Score-CAM, which must rerun the whole model, is the positive control.
    _, x, m, v = make_problem()
    tap = gcj.split_tap(lambda z: jnp.cos(z[:, ::4, ::4] @ m), lambda a: jnp.tanh(a).mean(axis=(1, 2)) @ v)

    def cosines_in_loop(fn, **kw):
        options = PerturbationOptions(MapOptions(), per_step=2, **kw)
        target = TargetSpec("index", jnp.zeros((B,), jnp.int32))
        hlo = fn.lower(tap, jnp.asarray(x), target, options=options).compile().as_text()
        lines = [line for line in hlo.splitlines() if " cosine(" in line]
        assert lines
        return sum("/while/body" in line for line in lines)

    assert cosines_in_loop(ablation_cam_kernel) == 0
    assert cosines_in_loop(score_cam_kernel, top_n=None) > 0


# --------------------------------------------------------------------------------------------
# Shared behaviour: chunking, K targets, callables, dtype, memory
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", [score_cam, ablation_cam], ids=["score_cam", "ablation_cam"])
def test_chunk_size_does_not_change_the_result(method):
    tap, x, _, _ = make_problem(seed=4)
    # B = 3, C = 7: 1 channel per step, 2 (padded), 4 (padded), all at once.
    results = [method(tap, x, 1, chunk_size=n, normalize=False) for n in (1, 6, 12, 1000)]
    for r in results[1:]:
        np.testing.assert_allclose(r, results[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", [score_cam, ablation_cam], ids=["score_cam", "ablation_cam"])
def test_k_targets_equal_k_single_calls(method):
    tap, x, _, _ = make_problem(seed=5)
    many = method(tap, x, [0, 3])
    assert many.shape == (B, 2, S, S)
    for j, c in enumerate([0, 3]):
        np.testing.assert_allclose(many[:, j], method(tap, x, c), atol=1e-5)
    per_example = np.array([[0, 1], [2, 3], [4, 0]])
    many = method(tap, x, per_example, upsample=False)
    for j in range(2):
        np.testing.assert_allclose(many[:, j], method(tap, x, per_example[:, j], upsample=False), atol=1e-5)


@pytest.mark.parametrize("method", [score_cam, ablation_cam], ids=["score_cam", "ablation_cam"])
def test_callable_target_equals_index_target(method):
    tap, x, _, _ = make_problem(seed=6)
    np.testing.assert_allclose(method(tap, x, lambda s: s[:, 2]), method(tap, x, 2), atol=1e-6)


class LinenNet:
    """A small Linen conv net with its own ``features`` / ``head`` split for the reference."""

    @staticmethod
    def build():
        import flax.linen as nn

        class Net(nn.Module):
            def setup(self):
                self.stem = nn.Conv(8, (3, 3))
                self.feat = nn.Conv(6, (3, 3))
                self.out = nn.Dense(NCLS)

            def features(self, x):
                h = nn.avg_pool(nn.relu(self.stem(x)), (2, 2), (2, 2))
                return self.feat(h)

            def head(self, a):
                return self.out(nn.relu(a).mean(axis=(1, 2)))

            def __call__(self, x):
                return self.head(self.features(x))

        net = Net()
        x = np.random.default_rng(7).normal(size=(2, S, S, CIN)).astype(np.float32)
        # Weights from NumPy on the shapes init would give (compiling the random init is slow).
        shapes = jax.eval_shape(net.init, jax.random.key(0), x)
        r = np.random.default_rng(8)
        variables = jax.tree_util.tree_map(
            lambda s: jnp.asarray(r.normal(size=s.shape).astype(np.float32) / np.sqrt(np.prod(s.shape[:-1]))),
            shapes,
        )
        return net, variables, x


def test_linen_net_both_methods_match_loops_of_model_calls():
    net, variables, x = LinenNet.build()
    tap = gcj.linen_tap(net, variables, "feat")

    # The reference calls the model itself, one call per masked image or ablated map.
    forward = jax.jit(lambda z: net.apply(variables, z))

    def scores_fn(z):
        return np.asarray(forward(jnp.asarray(z, jnp.float32)), np.float64)

    def features_fn(z):
        return np.asarray(net.apply(variables, jnp.asarray(z, jnp.float32), method=net.features), np.float64)

    def head_fn(a):
        return np.asarray(net.apply(variables, jnp.asarray(a, jnp.float32), method=net.head), np.float64)

    cls = np.array([1, 4])
    expected = np_score_cam(x, cls, scores_fn, features_fn)
    got = score_cam(tap, x, cls, chunk_size=4, upsample=False, normalize=False, relu=False)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    expected = np_ablation_cam(features_fn(x), cls, head_fn)
    got = ablation_cam(tap, x, cls, chunk_size=4, upsample=False, normalize=False, relu=False)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_bfloat16_masked_forwards_stay_close():
    net, variables, x = LinenNet.build()
    tap = gcj.linen_tap(net, variables, "feat")
    raw = {"upsample": False, "normalize": False, "relu": False}
    for method in (score_cam, ablation_cam):
        full = np.asarray(method(tap, x, [0, 1], **raw))
        half = np.asarray(method(tap, x, [0, 1], compute_dtype=jnp.bfloat16, **raw))
        assert half.dtype == np.float32
        assert np.corrcoef(full.ravel(), half.ravel())[0, 1] > 0.99
        np.testing.assert_allclose(half, full, atol=0.05 * np.abs(full).max())


def test_many_channels_run_in_bounded_memory():
    channels, size, batch = 4096, 8, 2
    tap, x, _, _ = make_problem(seed=8, channels=channels, size=size, batch=batch)
    maps = score_cam(tap, x, 0, chunk_size=32)
    assert maps.shape == (batch, size, size) and np.isfinite(np.asarray(maps)).all()
    maps = ablation_cam(tap, x, 0, chunk_size=32)
    assert maps.shape == (batch, size, size) and np.isfinite(np.asarray(maps)).all()

    def temp_bytes(fn, per_step, **kw):
        options = PerturbationOptions(MapOptions(), per_step=per_step, **kw)
        lowered = fn.lower(
            tap, jnp.asarray(x), TargetSpec("index", jnp.zeros((batch,), jnp.int32)), options=options
        )
        return lowered.compile().memory_analysis().temp_size_in_bytes

    # 16 channels per step keep XLA's temporaries to a few MiB. Unchunked, Ablation-CAM holds
    # all 4096 ablated copies of the (B, 2, 2, 4096) activation: 512 MiB. (Score-CAM's masked
    # passes compile to one XLA:CPU YNNPACK fusion whose scratch memory_analysis does not count,
    # so only the bound is checked for it.)
    assert temp_bytes(score_cam_kernel, 16, top_n=None) < 32 * 2**20
    bounded = temp_bytes(ablation_cam_kernel, 16)
    assert bounded < 32 * 2**20
    assert bounded * 64 < temp_bytes(ablation_cam_kernel, channels)


def test_bad_arguments_fail_with_messages():
    tap, x, _, _ = make_problem()
    with pytest.raises(ValueError, match="chunk_size"):
        score_cam(tap, x, chunk_size=0)
    with pytest.raises(ValueError, match="top_n"):
        score_cam(tap, x, top_n=0)
    with pytest.raises(ValueError, match="out of range"):
        ablation_cam(tap, x, NCLS)
    with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
        score_cam(tap, x[:, 0, 0, 0])  # (B,): no spatial axes to mask
    with pytest.raises(ValueError, match="does not fit"):
        occlusion(lambda z: z.sum((1, 2)), x, 0, window=S + 1)
    with pytest.raises(TypeError, match="floating"):
        score_cam(tap, x, compute_dtype=jnp.int8)


# --------------------------------------------------------------------------------------------
# Occlusion
# --------------------------------------------------------------------------------------------


@JIT_OR_NOT
@pytest.mark.parametrize("window,stride", [((4, 4), (2, 2)), ((5, 3), (3, 2))])
def test_occlusion_matches_loop(wrap, window, stride):
    tap, x, m, v = make_problem(seed=9)
    cls = np.array([0, 2, 1])
    baseline = np.random.default_rng(1).normal(size=(S, S, CIN)).astype(np.float32)
    expected = np_occlusion(x, cls, lambda z: np_head(np_features(z, m), v), window, stride, baseline)
    fn = lambda z: tap(z)[0]  # noqa: E731
    got = wrap(lambda x, t, b: occlusion(fn, x, t, window=window, stride=stride, baseline=b, chunk_size=7))(
        x, cls, baseline
    )
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_occlusion_targets_taps_and_chunks():
    tap, x, _, _ = make_problem(seed=10)
    fn = lambda z: tap(z)[0]  # noqa: E731
    one = occlusion(fn, x, 3, window=4, stride=4)
    np.testing.assert_allclose(occlusion(tap, x, 3, window=4, stride=4, chunk_size=1), one, atol=1e-6)
    np.testing.assert_allclose(occlusion(fn, x, lambda s: s[:, 3], window=4, stride=4), one, atol=1e-6)
    many = occlusion(fn, x, [1, 3], window=4, stride=4)
    assert many.shape == (B, 2, S, S)
    np.testing.assert_allclose(many[:, 1], one, atol=1e-6)
    np.testing.assert_allclose(many[:, 0], occlusion(fn, x, 1, window=4, stride=4), atol=1e-6)


@pytest.mark.parametrize("window,stride", [((4, 4), (2, 2)), ((5, 5), (3, 3))])
def test_occlusion_matches_captum(window, stride):
    import captum.attr as captum_attr
    import torch

    tap, x, _, _ = make_problem(seed=11)
    scores = jax.jit(lambda z: tap(z)[0])

    def forward(t):
        z = jnp.asarray(t.detach().numpy().transpose(0, 2, 3, 1))
        return torch.from_numpy(np.asarray(scores(z)).copy())

    cls = [4, 0, 2]
    expected = (
        captum_attr.Occlusion(forward)
        .attribute(
            torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
            target=cls,
            sliding_window_shapes=(CIN,) + window,
            strides=(1,) + stride,
            baselines=0.5,
        )
        .numpy()
    )
    got = np.asarray(occlusion(scores, x, np.array(cls), window=window, stride=stride, baseline=0.5))
    for channel in range(CIN):  # Captum repeats the value over the occluded channels
        np.testing.assert_allclose(got, expected[:, channel], rtol=1e-4, atol=1e-6)


def test_cam_dispatches_perturbation_methods():
    """gcj.cam(method="score_cam" / "ablation_cam") is the same as calling them directly."""
    r = np.random.default_rng(0)
    w = r.normal(size=(3, 5)).astype(np.float32)
    tap = gcj.split_tap(lambda x: jax.nn.relu(x), lambda a: a.mean(axis=(1, 2)) @ w)
    x = r.normal(size=(2, 6, 6, 3)).astype(np.float32)
    for name, fn in (("score_cam", gcj.score_cam), ("ablation_cam", gcj.ablation_cam)):
        np.testing.assert_allclose(
            np.asarray(gcj.cam(tap, x, 1, name, chunk_size=4)),
            np.asarray(fn(tap, x, 1, chunk_size=4)),
            rtol=1e-6,
        )
    with pytest.raises(TypeError, match="only the perturbation methods"):
        gcj.cam(tap, x, 1, "grad_cam", chunk_size=4)
    with pytest.raises(ValueError, match="counterfactual"):
        gcj.cam(tap, x, 1, "score_cam", counterfactual=True)
