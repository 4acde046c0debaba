"""Guided Backprop / Deconvnet rules against hand computations, the jaxpr rewrite across model
styles, and parity with Captum's GuidedBackprop, Deconvolution and GuidedGradCam."""

import captum.attr as captum_attr  # the test extras install torch==2.13.0 and captum
import jax
import jax.numpy as jnp
import nets
import numpy as np
import pytest
import torch
from conftest import JIT_OR_NOT

import gradcam_jax as gcj
from gradcam_jax._rules import guided_clipped_relu

# ------------------------------------------------------------------ rules by hand (NumPy)

R = np.random.default_rng(0)
W1 = R.normal(size=(12, 10)).astype(np.float32)
W2 = R.normal(size=(10, 8)).astype(np.float32)
W3 = R.normal(size=(8, 4)).astype(np.float32)
XV = R.normal(size=(5, 2, 2, 3)).astype(np.float32)


def mlp(x, act=jax.nn.relu):
    h = x.reshape(x.shape[0], -1)
    return act(act(h @ W1) @ W2) @ W3


def np_backward(x, cls, rule, clip=None):
    """Input gradients of scores[:, cls] with the ReLU backward ``rule`` applied by hand."""
    h0 = x.reshape(x.shape[0], -1).astype(np.float64)
    z1 = h0 @ W1
    a1 = np.maximum(z1, 0) if clip is None else np.clip(z1, 0, clip)
    z2 = a1 @ W2
    g = np.broadcast_to(W3[:, cls].T, (x.shape[0], W3.shape[0])).astype(np.float64)

    def through(g, z):
        if rule == "plain":
            return g * ((z > 0) & (z < (clip if clip else np.inf)))
        if rule == "guided":
            return g * ((z > 0) & (z < (clip if clip else np.inf))) * (g > 0)
        return g * (g > 0)  # deconvnet ignores the forward input

    g = through(g, z2) @ W2.T
    g = through(g, z1) @ W1.T
    return g.reshape(x.shape)


@pytest.mark.parametrize(
    "rule,fn", [("guided", gcj.guided_backprop), ("deconvnet", gcj.deconvnet), ("plain", gcj.gradients)]
)
@JIT_OR_NOT
def test_rules_match_hand_computation(rule, fn, wrap):
    got = wrap(lambda x: fn(mlp, x, 2))(XV)
    np.testing.assert_allclose(np.asarray(got), np_backward(XV, 2, rule), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rule,fn", [("guided", gcj.guided_backprop), ("deconvnet", gcj.deconvnet)])
def test_relu6_rules(rule, fn):
    x = XV * 3.0  # push some units above 6
    got = fn(lambda x: mlp(x, jax.nn.relu6), x, 1)
    np.testing.assert_allclose(np.asarray(got), np_backward(x, 1, rule, clip=6.0), rtol=1e-4, atol=1e-4)
    # The exported custom_vjp ReLU6s follow the same rules.
    got2 = gcj.gradients(lambda x: mlp(x, gcj.guided_relu6 if rule == "guided" else gcj.deconv_relu6), x, 1)
    np.testing.assert_allclose(np.asarray(got2), np_backward(x, 1, rule, clip=6.0), rtol=1e-4, atol=1e-4)


# x == 0 and x == c exactly, just inside and outside (0, c), for c = 6 and c = 3.
EDGES = np.array([-2.0, 0.0, 1e-3, 1.0, 2.999, 3.0, 3.5, 5.999, 6.0, 7.0], np.float32)


@JIT_OR_NOT
def test_guided_relu6_backward_is_one_mask(wrap):
    # g * (0 < x < c) * (g > 0) by NumPy; the ties x == 0 and x == c pass nothing.
    x = np.concatenate([EDGES, EDGES])
    g = np.repeat(np.array([1.5, -0.5], np.float32), EDGES.size)
    y, pullback = jax.vjp(wrap(gcj.guided_relu6), jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(y), np.clip(x, 0, 6))
    np.testing.assert_array_equal(np.asarray(pullback(jnp.asarray(g))[0]), g * ((x > 0) & (x < 6)) * (g > 0))
    c = jnp.float32(3.0)
    _, pullback = jax.vjp(wrap(guided_clipped_relu), jnp.asarray(x), c)
    dx, dc = pullback(jnp.asarray(g))
    np.testing.assert_array_equal(np.asarray(dx), g * ((x > 0) & (x < 3)) * (g > 0))
    assert float(dc) == 0.0


@pytest.mark.parametrize(
    "act,c",
    [
        (jax.nn.relu6, 6.0),
        (lambda x: jnp.clip(x, 0.0, 3.0), 3.0),
        (lambda x: jax.lax.clamp(0.0, x, 3.0), 3.0),
        (lambda x: jnp.minimum(jnp.maximum(x, 0.0), 3.0), 3.0),
    ],
    ids=["relu6", "clip", "clamp", "min_max"],
)
def test_every_clipped_relu_gets_the_one_mask_rule(act, c):
    # The rewrite turns each spelling of a clipped ReLU into guided_clipped_relu: the NumPy formula,
    # with nothing passed at the ties x == 0 and x == c (where min's own gradient would pass g / 2).
    x = np.tile(EDGES, 3)
    w = np.random.default_rng(4).normal(size=x.size).astype(np.float32)
    got = jax.jit(jax.grad(gcj.guided(lambda x: jnp.sum(jnp.asarray(w) * act(x)))))(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(got), w * ((x > 0) & (x < c)) * (w > 0))


@pytest.mark.parametrize(
    "clipped",
    [lambda x, h: jax.lax.clamp(0.0, x, h), lambda x, h: jnp.minimum(jnp.maximum(x, 0.0), h)],
    ids=["clamp", "min_max"],
)
def test_a_traced_clip_bound_keeps_its_gradient(clipped):
    # A learned upper bound h: d/dh sum(w * clip(x, 0, h)) = sum of w where x > h, by NumPy,
    # through the guided rewrite too (only a constant bound takes guided_clipped_relu).
    x = np.array([-1.0, 0.5, 2.0, 5.0, 8.0], np.float32)
    w = np.array([1.0, 2.0, 3.0, 4.0, -5.0], np.float32)
    h = jnp.float32(3.0)
    loss = lambda x, h: jnp.sum(jnp.asarray(w) * clipped(x, h))  # noqa: E731
    dh = jax.grad(gcj.guided(loss), argnums=1)(jnp.asarray(x), h)
    assert float(dh) == float(w[x > 3.0].sum())


def test_exported_relus_have_the_rules():
    x = jnp.array([-1.0, 2.0, 3.0, -4.0])
    g = jnp.array([1.0, 1.0, -1.0, -1.0])
    _, pb = jax.vjp(gcj.guided_relu, x)
    np.testing.assert_array_equal(np.asarray(pb(g)[0]), [0.0, 1.0, 0.0, 0.0])
    _, pb = jax.vjp(gcj.deconv_relu, x)
    np.testing.assert_array_equal(np.asarray(pb(g)[0]), [1.0, 1.0, 0.0, 0.0])
    np.testing.assert_array_equal(np.asarray(gcj.guided_relu(x)), [0.0, 2.0, 3.0, 0.0])


def test_k_targets_and_callable_target():
    many = gcj.guided_backprop(mlp, XV, [0, 3])
    assert many.shape == (5, 2) + XV.shape[1:]
    for i, c in enumerate([0, 3]):
        np.testing.assert_allclose(np.asarray(many[:, i]), np_backward(XV, c, "guided"), rtol=1e-4, atol=1e-5)
    fn_t = gcj.guided_backprop(mlp, XV, lambda s: s[:, 3])
    np.testing.assert_allclose(np.asarray(fn_t), np_backward(XV, 3, "guided"), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ the rewrite reaches every ReLU


def conv(x, k):
    return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


K1 = (R.normal(size=(3, 3, 3, 6)) * 0.5).astype(np.float32)
K2 = (R.normal(size=(3, 3, 6, 6)) * 0.3).astype(np.float32)
WF = R.normal(size=(6, 4)).astype(np.float32)
XI = R.normal(size=(2, 8, 8, 3)).astype(np.float32)


def explicit(relu):
    """The reference: the net written with the exported custom_vjp ReLU, no rewrite needed."""
    return lambda x: relu(conv(relu(conv(x, K1)), K2)).mean(axis=(1, 2)) @ WF


def styles():
    relu = jax.nn.relu
    return {
        "functional_in_jit": jax.jit(
            lambda x: relu(conv(jax.jit(relu)(conv(x, K1)), K2)).mean(axis=(1, 2)) @ WF
        ),
        "maximum": lambda x: jnp.maximum(conv(jnp.maximum(conv(x, K1), 0.0), K2), 0).mean(axis=(1, 2)) @ WF,
        "remat": jax.checkpoint(lambda x: relu(conv(relu(conv(x, K1)), K2)).mean(axis=(1, 2)) @ WF),
        "scan": lambda x: (
            jax.lax.scan(lambda h, k: (relu(conv(h, k)), None), relu(conv(x, K1)), K2[None])[0].mean(
                axis=(1, 2)
            )
            @ WF
        ),
        "cond": lambda x: (
            jax.lax.cond(
                True, lambda h: relu(conv(relu(conv(h, K1)), K2)), lambda h: jnp.zeros((2, 8, 8, 6)), x
            ).mean(axis=(1, 2))
            @ WF
        ),
    }


@pytest.mark.parametrize("style", list(styles()))
def test_rewrite_catches_relus_in_every_style(style):
    fn = styles()[style]
    for transform, relu in ((gcj.guided_backprop, gcj.guided_relu), (gcj.deconvnet, gcj.deconv_relu)):
        expected = gcj.gradients(explicit(relu), XI, 1)
        got = transform(fn, XI, 1)
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-4, atol=1e-5)
        plain = gcj.gradients(fn, XI, 1)
        assert not np.allclose(np.asarray(plain), np.asarray(expected), atol=1e-5)  # the rule mattered


def test_flax_and_equinox_models_and_taps_get_the_guided_rule():
    w = nets.weights(3)
    x = np.random.default_rng(4).normal(size=(2, 10, 10, 3)).astype(np.float32)
    features, head = nets.split_functions(w)

    def guided_reference(x):
        def conv_relu(h, name):
            k, b = w[name]
            return gcj.guided_relu(conv(h, k) + b)

        a = conv_relu(conv_relu(conv_relu(x, "block1"), "block2"), "block3")
        return a.mean(axis=(1, 2)) @ w["fc"][0] + w["fc"][1]

    expected = np.asarray(gcj.gradients(guided_reference, x, 3))
    module, variables = nets.linen(w)
    eq = nets.equinox_model(w)
    candidates = {
        "linen_apply": lambda x: module.apply(variables, x),
        "linen_tap": gcj.linen_tap(module, variables, "block2"),
        "equinox_vmap": lambda x: jax.vmap(eq)(jnp.moveaxis(x, -1, 1)),
        "equinox_tap": gcj.equinox_tap(eq, lambda m: m.blocks[1]),
        "nnx_tap": gcj.nnx_tap(nets.nnx_model(w), "block2"),
    }
    for name, fn in candidates.items():
        got = gcj.guided_backprop(fn, x, 3)
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-6, err_msg=name)


def test_no_relu_is_refused():
    with pytest.raises(ValueError, match="no ReLU"):
        gcj.guided_backprop(lambda x: jnp.tanh(x).reshape(x.shape[0], -1) @ jnp.ones((12, 3)), XV, 0)
    with pytest.raises(ValueError, match="no ReLU"):
        gcj.deconvnet(lambda x: jnp.tanh(x).reshape(x.shape[0], -1) @ jnp.ones((12, 3)), XV, 0)


def test_target_out_of_range():
    with pytest.raises(ValueError, match="out of range: the model has 4 classes"):
        gcj.guided_backprop(mlp, XV, 4)


def test_smooth_grad_is_the_mean_over_noisy_copies():
    key = jax.random.key(0)
    got = gcj.smooth_grad(mlp, XV, 1, key=key, n_samples=8, noise_level=0.1)
    axes = (1, 2, 3)
    sigma = 0.1 * (XV.max(axis=axes, keepdims=True) - XV.min(axis=axes, keepdims=True))
    noise = np.asarray(jax.random.normal(key, (8,) + XV.shape, jnp.float32)) * sigma
    expected = np.mean([np_backward(XV + n, 1, "plain") for n in noise], axis=0)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-3, atol=1e-5)
    chunked = gcj.smooth_grad(mlp, XV, 1, key=key, n_samples=8, noise_level=0.1, chunk_size=3)
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(got), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ Guided Grad-CAM


def test_guided_grad_cam_normalisation_keeps_signs_and_scales_to_unit_peak():
    w = nets.weights(6)
    x = np.random.default_rng(8).normal(size=(2, 16, 16, 3)).astype(np.float32)
    tap = gcj.split_tap(*nets.pooled_split_functions(w))
    raw = np.asarray(gcj.guided_grad_cam(tap, x, [1, 2], normalize=False))
    norm = np.asarray(gcj.guided_grad_cam(tap, x, [1, 2]))
    assert raw.shape == norm.shape == (2, 2, 16, 16, 3)
    np.testing.assert_allclose(np.abs(norm).max(axis=(2, 3, 4)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(
        norm * np.abs(raw).max(axis=(2, 3, 4), keepdims=True), raw, rtol=1e-5, atol=1e-7
    )


# ------------------------------------------------------------------ Captum parity


def torch_input(x):
    return torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float64)).requires_grad_(True)


@pytest.mark.parametrize("seed", [0, 1])
def test_parity_with_captum_guided_backprop_and_deconvolution(seed):
    w = nets.weights(seed)
    x = np.random.default_rng(20 + seed).normal(size=(3, 12, 12, 3)).astype(np.float32)
    target = np.array([0, 2, 4])
    net = nets.torch_model(w, dtype=torch.float64)
    module, variables = nets.linen(w)
    fn = lambda x: module.apply(variables, x)  # noqa: E731
    for ours, theirs in (
        (gcj.guided_backprop, captum_attr.GuidedBackprop),
        (gcj.deconvnet, captum_attr.Deconvolution),
    ):
        expected = theirs(net).attribute(torch_input(x), target=torch.as_tensor(target)).detach().numpy()
        got = np.asarray(ours(fn, x, target)).transpose(0, 3, 1, 2)
        scale = np.abs(expected).max()
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * scale)


def test_parity_with_captum_guided_grad_cam_nearest():
    w = nets.weights(9)
    x = np.random.default_rng(9).normal(size=(2, 16, 16, 3)).astype(np.float32)
    target = np.array([1, 3])
    pooled_net = nets.torch_pooled_model(w, dtype=torch.float64)
    ggc = captum_attr.GuidedGradCam(pooled_net, pooled_net.pool)
    expected = ggc.attribute(torch_input(x), target=torch.as_tensor(target), interpolate_mode="nearest")
    expected = expected.detach().numpy()

    tap = gcj.split_tap(*nets.pooled_split_functions(w))
    got = gcj.guided_grad_cam(tap, x, target, interpolation="nearest", normalize=False)
    got = np.asarray(got).transpose(0, 3, 1, 2)
    scale = np.abs(expected).max()
    assert scale > 0
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * scale)


# ------------------------------------------------------------------ what is and is not a ReLU


def test_min_with_a_literal_first_and_relu6_written_by_hand():
    w = jnp.asarray(W3[:8, :4])
    x = jnp.asarray(R.normal(size=(3, 8)).astype(np.float32)) * 4
    hand = gcj.guided_backprop(lambda x: jnp.minimum(6.0, jnp.maximum(0.0, x)) @ w, x, 1)
    ref = gcj.gradients(lambda x: gcj.guided_relu6(x) @ w, x, 1)
    np.testing.assert_allclose(np.asarray(hand), np.asarray(ref), rtol=1e-6)
    # A min with a literal that is not a ReLU's clip is left alone (and does not crash).
    other = gcj.guided_backprop(lambda x: jnp.minimum(1.0, jnp.tanh(jax.nn.relu(x))) @ w, x, 1)
    assert other.shape == x.shape


@pytest.mark.parametrize(
    "act", [jax.nn.softplus, jax.nn.log_sigmoid, jax.nn.mish], ids=["softplus", "log_sigmoid", "mish"]
)
def test_smooth_activations_containing_max_are_not_relus(act):
    w = jnp.asarray(W3[:8, :4])
    x = jnp.asarray(R.normal(size=(3, 8)).astype(np.float32))
    assert gcj.count_relus(jax.make_jaxpr(act)(x)) == 0
    with pytest.raises(ValueError, match="no ReLU"):
        gcj.guided_backprop(lambda x: act(x) @ w, x, 0)
    # Beside a real ReLU, the smooth one keeps its own derivative.
    mixed = gcj.guided_backprop(lambda x: jax.nn.relu(act(x) @ jnp.eye(8)) @ w, x, 0)
    ref = gcj.gradients(lambda x: gcj.guided_relu(act(x) @ jnp.eye(8)) @ w, x, 0)
    np.testing.assert_allclose(np.asarray(mixed), np.asarray(ref), rtol=1e-5, atol=1e-7)


def test_integer_clamps_are_not_relus():
    w = jnp.asarray(W3[:8, :4])
    x = jnp.asarray(R.normal(size=(3, 8)).astype(np.float32))
    fn = lambda x: jnp.tanh(x) @ w + jnp.clip(jnp.argmax(x, -1), 0, 5)[:, None]  # noqa: E731
    with pytest.raises(ValueError, match="no ReLU"):
        gcj.guided_backprop(fn, x, 0)


def test_smooth_grad_default_target_is_the_clean_top_class():
    key = jax.random.key(1)
    top = np.asarray(mlp(jnp.asarray(XV))).argmax(-1)
    default = gcj.smooth_grad(mlp, XV, None, key=key, n_samples=6, noise_level=0.5)
    explicit = gcj.smooth_grad(mlp, XV, top, key=key, n_samples=6, noise_level=0.5)
    np.testing.assert_allclose(np.asarray(default), np.asarray(explicit), rtol=1e-6)


def test_parity_with_captum_guided_backprop_times_bilinear_layer_grad_cam():
    """Guided Grad-CAM with the paper's bilinear upsampling, built from Captum's parts."""
    w = nets.weights(10)
    x = np.random.default_rng(10).normal(size=(2, 16, 16, 3)).astype(np.float32)
    target = np.array([0, 4])
    pooled = nets.torch_pooled_model(w, dtype=torch.float64)
    xt = torch_input(x)
    gb = captum_attr.GuidedBackprop(pooled).attribute(xt, target=torch.as_tensor(target))
    cam = captum_attr.LayerGradCam(pooled, pooled.pool).attribute(
        xt, target=torch.as_tensor(target), relu_attributions=True
    )
    cam = captum_attr.LayerAttribution.interpolate(cam, (16, 16), "bilinear")
    expected = (gb * cam).detach().numpy()
    tap = gcj.split_tap(*nets.pooled_split_functions(w))
    got = np.asarray(gcj.guided_grad_cam(tap, x, target, normalize=False)).transpose(0, 3, 1, 2)
    scale = np.abs(expected).max()
    assert scale > 0
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * scale)
