"""Core explainers against NumPy computations of each method's formula.

The test model is ``A = |x|`` (so ``A`` is known in NumPy) followed by the head
``y_c = (1/Z) sum_ijk tanh(A_ijk) V_kc``, whose gradient is known in closed form:
``dy_c/dA_ijk = (1 - tanh(A_ijk)^2) V_kc / Z`` — it varies over space, so every method's
weighting is exercised.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import JIT_OR_NOT

import gradcam_jax as gcj

B, H, W, C, NCLS = 3, 6, 5, 4, 7


def make_problem(seed=0):
    r = np.random.default_rng(seed)
    x = r.normal(size=(B, H, W, C)).astype(np.float32)
    v = r.normal(size=(C, NCLS)).astype(np.float32)
    tap = gcj.split_tap(lambda x: jnp.abs(x), lambda a: jnp.einsum("bhwk,kc->bc", jnp.tanh(a), v) / (H * W))
    return tap, x, v


def np_scores(a, v):
    return np.einsum("bhwk,kc->bc", np.tanh(a), v) / (H * W)


def np_grad(a, v, cls):
    """dy_c/dA for class ``cls[b]`` of each example b."""
    return (1 - np.tanh(a) ** 2) * v[:, cls].T[:, None, None, :] / (H * W)


def np_eigen(m):
    out = []
    for mb in m:
        flat = mb.reshape(-1, mb.shape[-1]).astype(np.float64)
        centred = flat - flat.mean(0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        proj = centred @ vt[0]
        ref = flat.mean(1) - flat.mean()
        if np.dot(proj, ref) < 0:
            proj = -proj
        out.append(proj.reshape(mb.shape[:2]))
    return np.stack(out)


def np_method(name, a, g):
    a = a.astype(np.float64)
    g = g.astype(np.float64)
    if name == "grad_cam":
        return np.einsum("bk,bhwk->bhw", g.mean((1, 2)), a)
    if name == "cam":
        return np.einsum("bk,bhwk->bhw", g.sum((1, 2)), a)
    if name == "grad_cam_plus_plus":
        s = a.sum((1, 2), keepdims=True)
        den = 2 * g**2 + s * g**3
        alpha = np.where(den != 0, g**2 / np.where(den != 0, den, 1), 0)
        w = (alpha * np.maximum(g, 0)).sum((1, 2))
        return np.einsum("bk,bhwk->bhw", w, a)
    if name == "xgrad_cam":
        w = (g * a).sum((1, 2)) / a.sum((1, 2))
        return np.einsum("bk,bhwk->bhw", w, a)
    if name == "hires_cam":
        return (g * a).sum(-1)
    if name == "layer_cam":
        return (np.maximum(g, 0) * a).sum(-1)
    if name == "eigen_cam":
        return np_eigen(a)
    if name == "eigen_grad_cam":
        return np_eigen(g * a)
    if name == "grad_cam_elementwise":
        return np.maximum(g * a, 0).sum(-1)
    if name == "kpca_cam":
        return np_kpca(a)
    raise KeyError(name)


def np_kpca(a):
    """scikit-learn's KernelPCA (sigmoid kernel, one component) of the centred positions, its sign
    fixed like Eigen-CAM's (positive correlation with the mean activation)."""
    from sklearn.decomposition import KernelPCA

    out = []
    for ab in a:
        flat = ab.reshape(-1, ab.shape[-1])
        proj = KernelPCA(n_components=1, kernel="sigmoid").fit_transform(flat - flat.mean(0))[:, 0]
        ref = flat.mean(1) - flat.mean()
        out.append((-proj if np.dot(proj, ref) < 0 else proj).reshape(ab.shape[:2]))
    return np.stack(out)


def np_finish(raw, relu=True, normalize=True):
    m = np.maximum(raw, 0) if relu else raw
    if normalize:
        lo = m.min(axis=(-2, -1), keepdims=True)
        hi = m.max(axis=(-2, -1), keepdims=True)
        m = np.where(hi > lo, (m - lo) / np.where(hi > lo, hi - lo, 1), 0)
    return m


METHODS = [
    "grad_cam",
    "cam",
    "grad_cam_plus_plus",
    "xgrad_cam",
    "hires_cam",
    "layer_cam",
    "eigen_cam",
    "eigen_grad_cam",
    "grad_cam_elementwise",
    "kpca_cam",
]


ALIASES = {"gradient_sum": "cam", "gradcam++": "grad_cam_plus_plus"}


def test_every_gradient_method_has_a_numpy_reference():
    registered = {ALIASES.get(n, n) for n in gcj.method_names("gradient")}
    assert registered == set(METHODS), "add a NumPy reference to np_method and the name to METHODS"
    for alias, name in ALIASES.items():
        assert gcj.METHODS[alias] == gcj.METHODS[name]


@pytest.mark.parametrize("method", METHODS)
def test_raw_maps_match_numpy_formula(method):
    tap, x, v = make_problem()
    a = np.abs(x)
    cls = np_scores(a, v).argmax(-1)
    expected = np_method(method, a, np_grad(a, v, cls))
    got = gcj.cam(tap, x, None, method, upsample=False, normalize=False, relu=False)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
@JIT_OR_NOT
def test_finished_maps_match_numpy(method, wrap):
    tap, x, v = make_problem(1)
    a = np.abs(x)
    cls = np.array([2, 0, 5])
    expected = np_finish(np_method(method, a, np_grad(a, v, cls)))
    got = wrap(lambda x: gcj.cam(tap, x, jnp.asarray(cls), method, upsample=False))(x)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=2e-5)
    assert got.dtype == jnp.float32


def test_grad_cam_is_proportional_to_cam_for_gap_dense_head():
    r = np.random.default_rng(3)
    x = r.normal(size=(2, 8, 8, 3)).astype(np.float32)
    k = r.normal(size=(3, 3, 3, 6)).astype(np.float32) * 0.5
    wfc = r.normal(size=(6, 5)).astype(np.float32)

    def features(x):
        y = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jax.nn.relu(y)

    tap = gcj.split_tap(features, lambda a: a.mean(axis=(1, 2)) @ wfc)
    a = np.asarray(features(x))
    cam_np = np.einsum("bhwk,k->bhw", a, wfc[:, 3])  # CAM (Zhou et al.): sum_k W_kc A_k
    got_raw = gcj.grad_cam(tap, x, 3, upsample=False, normalize=False, relu=False)
    np.testing.assert_allclose(np.asarray(got_raw) * 64, cam_np, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(gcj.cam(tap, x, 3, "cam", upsample=False, normalize=False, relu=False)),
        cam_np,
        rtol=1e-4,
        atol=1e-5,
    )
    np.testing.assert_allclose(
        np.asarray(gcj.grad_cam(tap, x, 3, upsample=False)), np_finish(cam_np), rtol=1e-4, atol=1e-5
    )


def test_k_classes_equal_k_single_calls():
    tap, x, _ = make_problem(2)
    classes = [4, 1, 6]
    many = gcj.grad_cam(tap, x, classes)
    assert many.shape == (B, 3, H, W)
    for i, c in enumerate(classes):
        np.testing.assert_allclose(
            np.asarray(many[:, i]), np.asarray(gcj.grad_cam(tap, x, c)), rtol=1e-5, atol=1e-6
        )
    per_example = np.array([[0, 1], [2, 3], [4, 5]])
    many2 = gcj.grad_cam(tap, x, per_example)
    for b in range(B):
        for k in range(2):
            one = gcj.grad_cam(tap, x[b : b + 1], int(per_example[b, k]))
            np.testing.assert_allclose(np.asarray(many2[b, k]), np.asarray(one[0]), rtol=1e-5, atol=1e-6)


def test_k_classes_trace_one_forward_pass():
    """The model body appears once in the jaxpr, however many classes are explained."""
    r = np.random.default_rng(0)
    x = r.normal(size=(2, 8, 8, 3)).astype(np.float32)
    k = r.normal(size=(3, 3, 3, 4)).astype(np.float32)

    def features(x):
        return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    tap = gcj.split_tap(features, lambda a: a.mean(axis=(1, 2)))
    for targets in ([0], [0, 1, 2, 3]):
        text = str(jax.make_jaxpr(lambda x, t=targets: gcj.grad_cam(tap, x, t))(x))
        # Forward conv once; the backward stops at the tapped layer, so no transposed conv.
        assert text.count("conv_general_dilated") == 1, text


@pytest.mark.parametrize("target", [None, 3, "array", "fn"])
def test_target_forms(target):
    tap, x, v = make_problem(4)
    a = np.abs(x)
    s = np_scores(a, v)
    if target is None:
        cls = s.argmax(-1)
        t = None
    elif target == "array":
        cls = np.array([1, 6, 2])
        t = cls
    elif target == "fn":
        cls = np.array([5, 5, 5])
        t = lambda scores: scores[:, 5]  # noqa: E731
    else:
        cls = np.full(B, target)
        t = target
    expected = np_finish(np_method("grad_cam", a, np_grad(a, v, cls)))
    got = gcj.grad_cam(tap, x, t, upsample=False)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=2e-5)


def test_counterfactual_negates_gradients():
    tap, x, v = make_problem(5)
    a = np.abs(x)
    cls = np.array([0, 1, 2])
    expected = np_finish(np_method("grad_cam", a, -np_grad(a, v, cls)))
    got = gcj.grad_cam(tap, x, cls, upsample=False, counterfactual=True)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=2e-5)


def test_upsampling_matches_half_pixel_bilinear():
    tap, x, v = make_problem(6)
    raw = np.asarray(gcj.grad_cam(tap, x, 1, upsample=False, normalize=False))
    up = np.asarray(gcj.grad_cam(tap, jnp.asarray(x), 1, normalize=False, upsample=True))
    assert up.shape == (B, H, W)  # the layer is at input resolution here: nothing to do
    np.testing.assert_allclose(up, raw, rtol=1e-6)

    # A 2x2 layer map upsampled to 4x4 with half-pixel centres (torch/OpenCV convention):
    m = jnp.asarray([[[0.0, 1.0], [2.0, 3.0]]])
    got = np.asarray(gcj.postprocess.upsample_to(m, (4, 4), "bilinear"))[0]
    src = (np.arange(4) + 0.5) / 2 - 0.5
    src = np.clip(src, 0, 1)
    expected = np.array(
        [[(1 - sy) * ((1 - sx) * 0 + sx * 1) + sy * ((1 - sx) * 2 + sx * 3) for sx in src] for sy in src]
    )
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_normalised_maps_are_in_unit_interval_and_zero_map_stays_zero():
    tap, x, _ = make_problem(7)
    maps = np.asarray(gcj.grad_cam(tap, x))
    assert np.all(np.isfinite(maps)) and maps.min() >= 0 and maps.max() <= 1
    np.testing.assert_allclose(maps.max(axis=(1, 2)), 1.0)
    zero_tap = gcj.split_tap(lambda x: jnp.zeros_like(x), lambda a: a.mean(axis=(1, 2)))
    zmaps = np.asarray(gcj.grad_cam(zero_tap, x, 0))
    assert np.all(zmaps == 0)
    for method in METHODS:
        assert np.all(np.isfinite(np.asarray(gcj.cam(zero_tap, x, 0, method)))), method


def test_token_and_vector_activations():
    r = np.random.default_rng(8)
    tokens = r.normal(size=(2, 1 + 9, 4)).astype(np.float32)  # a class token + a 3x3 grid
    v = r.normal(size=(4, 3)).astype(np.float32)
    tap = gcj.split_tap(lambda t: t * 1.0, lambda a: jnp.tanh(a[:, 1:]).mean(1) @ v)
    got = gcj.grad_cam(tap, tokens, 2, upsample=False, normalize=False, relu=False, drop_tokens=1)
    a = tokens[:, 1:].reshape(2, 3, 3, 4)
    g = (1 - np.tanh(a) ** 2) * v[:, 2] / 9
    np.testing.assert_allclose(np.asarray(got), np_method("grad_cam", a, g), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="square grid"):
        gcj.grad_cam(tap, tokens, 2, upsample=False)
    rect = gcj.grad_cam(tap, tokens, 2, upsample=False, drop_tokens=1, grid=(1, 9))
    assert rect.shape == (2, 1, 9)

    vec = r.normal(size=(2, 5)).astype(np.float32)
    wv = r.normal(size=(5, 3)).astype(np.float32)
    vtap = gcj.split_tap(lambda t: t * 1.0, lambda a: jnp.tanh(a) @ wv)
    got = gcj.grad_cam(vtap, vec, 1, upsample=False, normalize=False, relu=False)
    expected = ((1 - np.tanh(vec) ** 2) * wv[:, 1] * vec).sum(-1)
    np.testing.assert_allclose(np.asarray(got)[:, 0, 0], expected, rtol=1e-5)


def test_vmap_and_jit_compose():
    tap, x, _ = make_problem(9)
    stacked = jnp.stack([x, x[::-1]])
    out = jax.vmap(lambda xb: gcj.grad_cam(tap, xb, 2))(stacked)
    np.testing.assert_allclose(np.asarray(out[0]), np.asarray(gcj.grad_cam(tap, x, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(out[1]), np.asarray(gcj.grad_cam(tap, x[::-1], 2)), rtol=1e-5, atol=1e-6
    )


def test_differentiable_with_respect_to_input_and_params():
    r = np.random.default_rng(10)
    x = r.normal(size=(2, 4, 4, 3)).astype(np.float32)
    v = r.normal(size=(3, 5)).astype(np.float32)

    def raw(x, v):
        tap = gcj.split_tap(lambda x: jnp.tanh(x), lambda a: jnp.einsum("bhwk,kc->bc", jnp.sin(a), v))
        return gcj.grad_cam(tap, x, 1, upsample=False, normalize=False, relu=False)

    def loss(x, v):
        return jnp.sum(raw(x, v) ** 2)

    gx, gv = jax.grad(loss, argnums=(0, 1))(x, v)

    # Central finite differences in float64 NumPy on the closed form of the raw map.
    def np_loss(x, v):
        a = np.tanh(x)
        g = np.cos(a) * v[:, 1] / 1.0
        m = np.einsum("bk,bhwk->bhw", g.mean((1, 2)), a)
        return np.sum(m**2)

    x64, v64 = x.astype(np.float64), v.astype(np.float64)
    eps = 1e-5
    for idx in [(0, 1, 2, 0), (1, 3, 0, 2)]:
        d = np.zeros_like(x64)
        d[idx] = eps
        fd = (np_loss(x64 + d, v64) - np_loss(x64 - d, v64)) / (2 * eps)
        np.testing.assert_allclose(float(gx[idx]), fd, rtol=1e-3, atol=1e-5)
    d = np.zeros_like(v64)
    d[2, 1] = eps
    fd = (np_loss(x64, v64 + d) - np_loss(x64, v64 - d)) / (2 * eps)
    np.testing.assert_allclose(float(gv[2, 1]), fd, rtol=1e-3, atol=1e-5)


def test_bfloat16_model_gives_float32_maps_close_to_float32():
    tap, x, v = make_problem(11)
    bf_tap = gcj.split_tap(
        lambda x: jnp.abs(x).astype(jnp.bfloat16),
        lambda a: jnp.einsum("bhwk,kc->bc", jnp.tanh(a), v.astype(jnp.bfloat16)) / (H * W),
    )
    m32 = gcj.grad_cam(tap, x, 2)
    m16 = gcj.grad_cam(bf_tap, x, 2)
    assert m16.dtype == jnp.float32
    assert np.corrcoef(np.asarray(m32).ravel(), np.asarray(m16).ravel())[0, 1] > 0.99


def test_plain_callable_tap():
    tap, x, v = make_problem(12)

    def my_tap(x, delta=None):
        a = jnp.abs(x)
        seen = a if delta is None else a + delta
        return jnp.einsum("bhwk,kc->bc", jnp.tanh(seen), v) / (H * W), a

    np.testing.assert_allclose(
        np.asarray(gcj.grad_cam(my_tap, x, 3)), np.asarray(gcj.grad_cam(tap, x, 3)), rtol=1e-6
    )


# ---------------------------------------------------------------------------- bad input


def test_bad_targets_say_what_is_wrong():
    tap, x, _ = make_problem()
    with pytest.raises(ValueError, match="out of range: the model has 7 classes"):
        gcj.grad_cam(tap, x, 7)
    with pytest.raises(ValueError, match="out of range"):
        gcj.grad_cam(tap, x, [0, 9])
    with pytest.raises(ValueError, match="out of range"):
        gcj.grad_cam(tap, x, np.array([0, -1, 2]))
    with pytest.raises(ValueError, match="out of range"):  # checked under an outer jit too
        jax.jit(lambda x: gcj.grad_cam(tap, x, [9]))(x)
    with pytest.raises(ValueError, match="out of range"):
        jax.jit(lambda x: gcj.cam(tap, x, 8, "layer_cam"))(x)
    with pytest.raises(ValueError, match="out of range"):
        gcj.guided_grad_cam(tap, x, 7)
    with pytest.raises(ValueError, match="one class per example"):
        gcj.grad_cam(tap, x, np.array([0, 1]))
    with pytest.raises(TypeError, match="integer class indices"):
        gcj.grad_cam(tap, x, np.array([0.5, 1, 2]))
    with pytest.raises(TypeError, match="must hold ints"):
        gcj.grad_cam(tap, x, [0, "dog"])
    with pytest.raises(ValueError, match=r"\(B,\) or \(B, K\)"):
        gcj.grad_cam(tap, x, lambda s: s[..., None])
    with pytest.raises(ValueError, match="Unknown CAM method 'gradcam'.*grad_cam"):
        gcj.cam(tap, x, 0, "gradcam")
    with pytest.raises(ValueError, match="interpolation"):
        gcj.grad_cam(tap, x, 0, interpolation="area")


def test_upsample_needs_images():
    tap = gcj.split_tap(lambda t: t, lambda a: a.mean(1))
    with pytest.raises(ValueError, match="upsample=False"):
        gcj.grad_cam(tap, jnp.ones((2, 5, 3)), 0, drop_tokens=1, grid=(2, 2))


def test_segmentation_style_scores_need_a_callable_target():
    seg = gcj.split_tap(lambda x: x * 1.0, lambda a: a)  # scores (B, H, W, C)
    x = jnp.ones((1, 4, 4, 3))
    with pytest.raises(ValueError, match="callable target"):
        gcj.grad_cam(seg, x, 0)
    mask = jnp.zeros((4, 4)).at[:2, :2].set(1.0)
    maps = gcj.grad_cam(
        seg, x, lambda s: jnp.sum(s[..., 1] * mask, axis=(1, 2)), upsample=False, normalize=False
    )
    assert maps.shape == (1, 4, 4)


def test_vector_layer_with_normalisation_is_refused():
    vtap = gcj.split_tap(lambda t: t * 1.0, lambda a: jnp.tanh(a) @ jnp.ones((5, 3)))
    with pytest.raises(ValueError, match="no spatial extent"):
        gcj.grad_cam(vtap, jnp.ones((2, 5)), 1, upsample=False)


@pytest.mark.parametrize("interpolation", ["bicubic", "lanczos3"])
def test_zero_evidence_stays_zero_after_overshooting_kernels(interpolation):
    # One hot spot on a 6x6 layer map: the ReLU-ed map is 0 elsewhere, and must stay >= 0 and
    # exactly 0 far from the spot after upsampling.
    a = np.zeros((1, 6, 6, 1), np.float32)
    a[0, 2, 2, 0] = 1.0
    tap = gcj.split_tap(lambda x: jnp.asarray(a) + 0 * x[:, :6, :6, :1], lambda a: a.sum(axis=(1, 2)))
    maps = np.asarray(gcj.grad_cam(tap, jnp.zeros((1, 48, 48, 3)), 0, interpolation=interpolation))
    assert maps.min() >= 0
    assert maps[0, 46:, 46:].max() == 0  # beyond the kernels' support (3 layer pixels)


def test_callable_targets_with_arrays_do_not_recompile():
    import functools

    traces = []
    tap, x, _ = make_problem(13)

    def masked(scores, weights):
        traces.append(1)
        return scores @ weights

    r = np.random.default_rng(0)
    for _ in range(3):
        t = functools.partial(masked, weights=jnp.asarray(r.normal(size=(NCLS,)).astype(np.float32)))
        gcj.grad_cam(tap, x, t)
    assert len(traces) <= 2  # traced for shape checks and compilation once, not once per call
