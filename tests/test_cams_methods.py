"""ShapleyCAM, Finer-CAM, RandomCAM, SS-CAM and IS-CAM against NumPy transcriptions of their papers'
formulas (and torchcam for SS-/IS-CAM), on problems whose gradients and Hessians are known in closed form.

The model of test_core: ``A = |x|``, ``y_c = (1/Z) sum_ijk tanh(A_ijk) V_kc``, so
``dy_c/dA = (1 - tanh(A)^2) V_c / Z`` and the Hessian is diagonal:
``d2y_c/dA2 = -2 tanh(A) (1 - tanh(A)^2) V_c / Z``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import JIT_OR_NOT

import gradcam_jax as gcj
from gradcam_jax.cams import finer_cam, random_cam, shapley_cam
from gradcam_jax.score_variants import is_cam, ss_cam

B, H, W, C, NCLS = 3, 6, 5, 4, 7
Z = H * W


def make_problem(seed=0):
    r = np.random.default_rng(seed)
    x = r.normal(size=(B, H, W, C)).astype(np.float32)
    v = r.normal(size=(C, NCLS)).astype(np.float32)
    tap = gcj.split_tap(lambda x: jnp.abs(x), lambda a: jnp.einsum("bhwk,kc->bc", jnp.tanh(a), v) / Z)
    return tap, x, v


def np_scores(a, v):
    return np.einsum("bhwk,kc->bc", np.tanh(a), v) / Z


def np_dy_da(a, v):
    """dy_m/dA for every class m: (B, H, W, C, NCLS)."""
    return (1 - np.tanh(a) ** 2)[..., None] * v / Z


def grad_cam_raw(a, weights_source):
    return np.einsum("bk,bhwk->bhw", weights_source.mean((1, 2)), a)


def np_finish(m):
    m = np.maximum(m, 0)
    lo = m.min(axis=(-2, -1), keepdims=True)
    hi = m.max(axis=(-2, -1), keepdims=True)
    return np.where(hi > lo, (m - lo) / np.where(hi > lo, hi - lo, 1), 0)


# ------------------------------------------------------------------------------------------ ShapleyCAM


@JIT_OR_NOT
def test_shapley_cam_matches_gradient_minus_half_hessian_vector_product(wrap):
    tap, x, v = make_problem()
    a = np.abs(x).astype(np.float64)
    cls = np.array([1, 4, 6])
    g = np.stack([np_dy_da(a, v)[b, ..., cls[b]] for b in range(B)])
    hess_diag = np.stack(
        [(-2 * np.tanh(a[b]) * (1 - np.tanh(a[b]) ** 2) * v[:, cls[b]] / Z) for b in range(B)]
    )
    expected = grad_cam_raw(a, g - 0.5 * hess_diag * a)  # Cai 2024, eq. 12: w = mean(g - H A / 2)
    got = wrap(lambda x: shapley_cam(tap, x, jnp.asarray(cls), upsample=False, normalize=False, relu=False))(
        x
    )
    np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-4, atol=1e-6)
    # The second-order term matters here: the map is not Grad-CAM's.
    assert not np.allclose(expected, grad_cam_raw(a, g), rtol=1e-2)


def test_shapley_cam_k_targets_equal_single_calls_and_is_grad_cam_on_a_linear_head():
    tap, x, _ = make_problem(1)
    both = shapley_cam(tap, x, [2, 5])
    for k, c in enumerate([2, 5]):
        np.testing.assert_allclose(np.asarray(both[:, k]), np.asarray(shapley_cam(tap, x, c)), atol=1e-5)
    # Above the layer only linear maps: H = 0, ShapleyCAM is Grad-CAM.
    lin = gcj.split_tap(jax.nn.relu, lambda a: a.mean(axis=(1, 2)) @ jnp.arange(C * 3.0).reshape(C, 3))
    np.testing.assert_allclose(
        np.asarray(shapley_cam(lin, x, 1)), np.asarray(gcj.grad_cam(lin, x, 1)), rtol=1e-5, atol=1e-6
    )


# ------------------------------------------------------------------------------------------ Finer-CAM


def np_finer_grad(a, v, main, comparisons, alpha):
    """d s / dA of Finer-CAM's score, by the chain rule through y and p = softmax(y), by hand."""
    y = np_scores(a, v).astype(np.float64)
    dyda = np_dy_da(a, v)
    out = []
    for b in range(B):
        c = main[b]
        dist = np.abs(y[b] - y[b, c])
        dist[c] = np.inf
        j = np.argsort(dist, kind="stable")[np.asarray(comparisons) - 1]
        p = np.exp(y[b] - y[b].max())
        p /= p.sum()
        dp = p[:, None] * (np.eye(NCLS) - p[None, :])  # dp_i/dy_m
        num = np.sum(p[j] * (y[b, c] - alpha * y[b, j]))
        den = np.sum(p[j]) + 1e-9
        dnum = (dp[j] * (y[b, c] - alpha * y[b, j])[:, None]).sum(0)
        dnum[c] += p[j].sum()
        np.add.at(dnum, j, -alpha * p[j])
        dden = dp[j].sum(0)
        ds_dy = (dnum * den - num * dden) / den**2
        out.append(np.einsum("hwkm,m->hwk", dyda[b], ds_dy))
    return np.stack(out)


def test_finer_cam_matches_the_chain_rule_by_hand(alpha=0.6, comparisons=(2, 4)):
    tap, x, v = make_problem(2)
    a = np.abs(x).astype(np.float64)
    main = np_scores(a, v).argmax(-1)
    expected = grad_cam_raw(a, np_finer_grad(a, v, main, comparisons, alpha))
    got = finer_cam(tap, x, alpha=alpha, comparisons=comparisons, upsample=False, normalize=False, relu=False)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=5e-4, atol=1e-7)
    cls = np.array([0, 3, 6])
    got = gcj.cam(tap, x, cls, "finer_cam", alpha=alpha, comparisons=comparisons, upsample=False)
    expected = np_finish(grad_cam_raw(a, np_finer_grad(a, v, cls, comparisons, alpha)))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-3, atol=1e-5)


def test_finer_cam_base_method_and_bad_arguments():
    tap, x, v = make_problem(3)
    a = np.abs(x).astype(np.float64)
    main = np_scores(a, v).argmax(-1)
    g = np_finer_grad(a, v, main, (1, 2, 3), 1.0)
    got = finer_cam(tap, x, base_method="hires_cam", upsample=False, normalize=False, relu=False)
    np.testing.assert_allclose(np.asarray(got), (g * a).sum(-1), rtol=5e-4, atol=1e-7)
    with pytest.raises(ValueError, match="7 classes, so at most 6 others"):
        finer_cam(tap, x, comparisons=(1, 7))
    with pytest.raises(ValueError, match="ranks >= 1"):
        finer_cam(tap, x, comparisons=(0,))
    with pytest.raises(TypeError, match="class indices"):
        finer_cam(tap, x, lambda s: s[:, 0])
    with pytest.raises(ValueError, match="Unknown gradient formula 'sorcery'"):
        finer_cam(tap, x, base_method="sorcery")


# ------------------------------------------------------------------------------------------ RandomCAM


def test_random_cam_weights_are_uniform_draws_from_the_key():
    tap, x, _ = make_problem(4)
    key = jax.random.key(7)
    a = np.abs(x).astype(np.float64)
    got = random_cam(tap, x, key=key, upsample=False, normalize=False, relu=False)
    w = np.asarray(jax.random.uniform(key, (B, C), jnp.float32, -1.0, 1.0), np.float64)
    np.testing.assert_allclose(np.asarray(got), np.einsum("bk,bhwk->bhw", w, a), rtol=1e-5, atol=1e-6)
    again = gcj.cam(tap, x, method="random_cam", key=key, upsample=False, normalize=False, relu=False)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(again))
    other = random_cam(tap, x, key=jax.random.key(8), upsample=False, normalize=False, relu=False)
    assert not np.allclose(np.asarray(other), np.asarray(got))
    assert random_cam(tap, x, [0, 1], key=key).shape == (B, 2, H, W)
    with pytest.raises(ValueError, match="needs key="):
        random_cam(tap, x)


# ------------------------------------------------------------------------------------------ SS-CAM, IS-CAM


def masked_scores_loop(tap, x, cls, masks):
    """y_c(x ⊙ m) for each (channel, sample) mask ``(C, n, B, H, W)``: ``(C, n, B)``, every masked
    image through one plain model call."""
    k, n = masks.shape[:2]
    masked = (x[None, None] * masks[..., None]).reshape((-1,) + x.shape[1:])
    s = np.asarray(tap(masked.astype(np.float32))[0]).reshape(k, n, B, -1)
    return np.take_along_axis(s, cls[None, None, :, None], axis=-1)[..., 0]


def score_masks(tap, x):
    """Score-CAM's masks: each channel upsampled (half-pixel bilinear) and min-max normalised."""
    a = np.asarray(tap(x)[1])
    up = np.asarray(jax.image.resize(jnp.moveaxis(a, -1, 0), (a.shape[-1], B, H, W), "bilinear"))
    lo, hi = up.min((2, 3), keepdims=True), up.max((2, 3), keepdims=True)
    return a, np.where(hi > lo, (up - lo) / np.where(hi > lo, hi - lo, 1), 0)


def score_weighted(a, scores):
    alpha = np.exp(scores - scores.max(0))
    alpha /= alpha.sum(0)  # softmax over channels
    return np_finish(np.einsum("kb,bhwk->bhw", alpha, a))


def pooled_problem(seed=5):
    tap, x, v = make_problem(seed)
    pooled = gcj.split_tap(lambda x: jnp.abs(x[:, ::2, ::2]), lambda a: jnp.einsum("bhwk,kc->bc", a, v))
    return pooled, x


def test_is_cam_matches_the_integration_loop():
    tap, x = pooled_problem()
    cls = np.asarray(tap(x)[0]).argmax(-1)
    a, m = score_masks(tap, x)
    n = 4
    coeff = np.cumsum(np.arange(1, n + 1) / n)  # c_i = sum_{j<=i} j / n
    scores = masked_scores_loop(tap, x, cls, m[:, None] * coeff[None, :, None, None, None]).mean(1)
    got = is_cam(tap, x, steps=n, upsample=False, chunk_size=5)
    np.testing.assert_allclose(np.asarray(got), score_weighted(a, scores), rtol=1e-4, atol=1e-5)


def test_ss_cam_matches_the_noisy_loop_with_the_documented_noise():
    tap, x = pooled_problem(6)
    cls = np.asarray(tap(x)[0]).argmax(-1)
    a, m = score_masks(tap, x)
    n, std, key = 3, 0.3, jax.random.key(2)
    draw = jax.vmap(lambda item: jax.random.normal(jax.random.fold_in(key, item), (B, H, W)))
    noise = std * np.asarray(draw(jnp.arange(C * n))).reshape(C, n, B, H, W)  # the documented draw
    scores = masked_scores_loop(tap, x, cls, m[:, None] + noise).mean(1)
    got = gcj.cam(tap, x, None, "ss_cam", key=key, n_noise=n, noise_std=std, upsample=False, chunk_size=7)
    np.testing.assert_allclose(np.asarray(got), score_weighted(a, scores), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="needs key="):
        ss_cam(tap, x)
    with pytest.raises(ValueError, match="n_noise must be a positive int"):
        ss_cam(tap, x, key=key, n_noise=0)
