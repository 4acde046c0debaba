"""The CPU rewrites of ``gradcam_jax.models._convs``: same numbers, same gradients, only on CPU.

Expected values come from a NumPy convolution written out below (a loop over the kernel's taps),
from ``jax.lax.conv_general_dilated`` (what the models called before) and from PyTorch.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax import export, lax

import gradcam_jax as gcj
from gradcam_jax import zoo
from gradcam_jax._rules import GUIDED
from gradcam_jax.models import _blocks, resnet
from gradcam_jax.models._convs import NHWC, conv_general_dilated, depthwise_taps, im2col_conv
from gradcam_jax.models._depthwise import tap_sum
from gradcam_jax.models.efficientnet_lite import EfficientNetLite, random_variables, same_padding


@pytest.fixture(autouse=True)
def fresh_traces():
    """Tests below trace a model with ``lax.conv_general_dilated`` patched in; drop those traces after."""
    yield
    jax.clear_caches()


def np_conv(x, w, stride, pads, groups=1):
    """NHWC x HWIO convolution by hand: for each tap, a strided slice times the tap's matrix."""
    x = np.pad(x, ((0, 0), *pads, (0, 0))).astype(np.float64)
    kh, kw, cin_g, cout = w.shape
    oh = (x.shape[1] - kh) // stride[0] + 1
    ow = (x.shape[2] - kw) // stride[1] + 1
    out = np.zeros((x.shape[0], oh, ow, cout))
    cout_g = cout // groups
    for p in range(kh):
        for q in range(kw):
            tap = x[
                :, p : p + (oh - 1) * stride[0] + 1 : stride[0], q : q + (ow - 1) * stride[1] + 1 : stride[1]
            ]
            for g in range(groups):
                xs = tap[..., g * cin_g : (g + 1) * cin_g]
                ws = w[p, q, :, g * cout_g : (g + 1) * cout_g]
                out[..., g * cout_g : (g + 1) * cout_g] += xs @ ws
    return out


CASES = [  # (input H, W, kernel, stride, pads)
    ((9, 9), 3, (1, 1), ((1, 1), (1, 1))),
    ((9, 8), 3, (2, 2), ((0, 1), (0, 1))),
    ((7, 7), 5, (2, 2), ((1, 2), (1, 2))),
    ((6, 6), 5, (1, 1), ((2, 2), (2, 2))),
]


@pytest.mark.parametrize("hw, k, stride, pads", CASES)
def test_depthwise_taps_is_a_depthwise_convolution(hw, k, stride, pads):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, *hw, 6)).astype(np.float32)
    w = rng.standard_normal((k, k, 1, 6)).astype(np.float32)
    out = np.asarray(depthwise_taps(jnp.asarray(x), jnp.asarray(w), stride, pads))
    np.testing.assert_allclose(out, np_conv(x, w, stride, pads, groups=6), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hw, k, stride, pads", [((2, 2), 3, (1, 1), ((1, 1), (1, 1))), *CASES])
def test_im2col_conv_is_a_dense_convolution(hw, k, stride, pads):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, *hw, 5)).astype(np.float32)
    w = rng.standard_normal((k, k, 5, 7)).astype(np.float32)
    out = np.asarray(im2col_conv(jnp.asarray(x), jnp.asarray(w), stride, pads))
    np.testing.assert_allclose(out, np_conv(x, w, stride, pads), rtol=1e-5, atol=1e-5)


# (input H/W, kernel shape, groups, stride, rewritten): depthwise, a 3x3 whose output is 2x2 (im2col;
# stride 1 and 2), and a grouped convolution the rewrite must leave alone.
WRAPPER_CASES = [
    (7, (5, 5, 1, 4), 4, 2, True),
    (2, (3, 3, 4, 6), 1, 1, True),
    (4, (3, 3, 4, 6), 1, 2, True),
    (5, (3, 3, 2, 6), 2, 1, False),
]


@pytest.mark.parametrize("size, wshape, groups, stride, rewritten", WRAPPER_CASES)
def test_conv_general_dilated_values_and_gradients(size, wshape, groups, stride, rewritten):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, size, size, 4)).astype(np.float32))
    w = jnp.asarray(rng.standard_normal(wshape).astype(np.float32))
    pads = [(wshape[0] // 2, wshape[0] // 2)] * 2
    kwargs = {"dimension_numbers": NHWC, "feature_group_count": groups}

    def ours(x, w):
        return conv_general_dilated(x, w, (stride, stride), pads, **kwargs)

    def xla(x, w):
        return lax.conv_general_dilated(x, w, (stride, stride), pads, **kwargs)

    out = jax.jit(ours)(x, w)
    expected = np_conv(np.asarray(x), np.asarray(w), (stride, stride), pads, groups)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)
    ct = jnp.asarray(rng.standard_normal(out.shape).astype(np.float32))
    # Under jit: one compilation each (op by op, every slice of the rewrite compiles on its own).
    g_ours = jax.jit(jax.grad(lambda x, w: jnp.sum(ours(x, w) * ct), argnums=(0, 1)))(x, w)
    g_xla = jax.grad(lambda x, w: jnp.sum(xla(x, w) * ct), argnums=(0, 1))(x, w)
    for a, b in zip(g_ours, g_xla, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
    # vmap over an extra leading axis, as chunked perturbation methods do.
    stacked = jax.jit(jax.vmap(ours, in_axes=(0, None)))(jnp.stack([x, 2 * x]), w)
    np.testing.assert_allclose(np.asarray(stacked[1]), 2 * np.asarray(out), rtol=1e-5, atol=1e-4)
    # On this CPU the lowered program has a convolution exactly when no rewrite applies ...
    assert ("convolution" in jax.jit(ours).lower(x, w).as_text()) is not rewritten
    # ... and lowered for a GPU it is always lax's convolution.
    assert "convolution" in export.export(jax.jit(ours), platforms=["cuda"])(x, w).mlir_module()


def lax_depthwise(x, w, stride, pads):
    return lax.conv_general_dilated(
        x, w, (stride, stride), pads, dimension_numbers=NHWC, feature_group_count=x.shape[-1]
    )


def pads_of(kind, h, w, k, stride):
    """TensorFlow "SAME" (EfficientNet-Lite: (0, 1) at stride 2 on even sizes) or symmetric (MobileNetV2)."""
    if kind == "tf":
        return (same_padding(h, k, stride), same_padding(w, k, stride))
    return (((k - 1) // 2,) * 2,) * 2


# 8 x 7 inputs: an even and an odd side, so TF "SAME" pads differ between the two axes at stride 2
# (at stride 1 both kinds pad (k - 1) / 2 on each side).
GRAD_CASES = [(3, 1, "tf"), (5, 1, "tf"), *((k, 2, kind) for k in (3, 5) for kind in ("tf", "symmetric"))]


@pytest.mark.parametrize("k, stride, kind", GRAD_CASES)
def test_depthwise_gradients_equal_lax(k, stride, kind):
    # depthwise_taps' own derivative rule (a polyphase tap sum for the input gradient) against
    # the gradients of lax.conv_general_dilated, in the input and the kernel, batch 1 and 8,
    # under jit and under vmap (per-example gradients).
    rng = np.random.default_rng(k * 10 + stride)
    pads = pads_of(kind, 8, 7, k, stride)
    w = jnp.asarray(rng.standard_normal((k, k, 1, 3)).astype(np.float32))
    for batch in (1, 8):
        x = jnp.asarray(rng.standard_normal((batch, 8, 7, 3)).astype(np.float32))
        ct = jnp.asarray(rng.standard_normal(lax_depthwise(x, w, stride, pads).shape).astype(np.float32))

        def loss(conv, x, w, ct=ct):
            return jnp.sum(conv(x, w, (stride, stride), pads) * ct)

        ours = jax.jit(jax.grad(lambda x, w: loss(depthwise_taps, x, w), argnums=(0, 1)))(x, w)
        ref = jax.jit(
            jax.grad(lambda x, w: loss(lambda x, w, s, p: lax_depthwise(x, w, s[0], p), x, w), (0, 1))
        )(x, w)
        for a, b in zip(ours, ref, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    per_example = jax.jit(
        jax.vmap(
            jax.grad(lambda x, w, ct: loss(depthwise_taps, x[None], w, ct[None]), argnums=(0, 1)),
            in_axes=(0, None, 0),
        )
    )(x, w, ct)
    np.testing.assert_allclose(np.asarray(per_example[0]), np.asarray(ref[0]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(per_example[1].sum(0)), np.asarray(ref[1]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k, stride", [(5, 2), (3, 1)])
def test_depthwise_higher_order_derivatives_equal_lax(k, stride):
    # Forward mode, forward over reverse (a Hessian-vector product, as ShapleyCAM takes) and
    # reverse over reverse (a gradient penalty, as the explanation losses take).
    rng = np.random.default_rng(7)
    pads = pads_of("tf", 8, 7, k, stride)
    x, xd = (jnp.asarray(rng.standard_normal((2, 8, 7, 3)).astype(np.float32)) for _ in range(2))
    w, wd = (jnp.asarray(rng.standard_normal((k, k, 1, 3)).astype(np.float32)) for _ in range(2))
    convs = {"ours": lambda x, w: depthwise_taps(x, w, (stride, stride), pads)}
    convs["lax"] = lambda x, w: lax_depthwise(x, w, stride, pads)

    def derivatives(conv, x, w, xd, wd):
        input_grad = jax.grad(lambda x, w: jnp.sum(jnp.tanh(conv(x, w))), argnums=0)
        return [
            jax.jvp(conv, (x, w), (xd, wd))[1],
            jax.jvp(lambda x: input_grad(x, w), (x,), (xd,))[1],
            *jax.grad(lambda x, w: jnp.sum(input_grad(x, w) ** 2), (0, 1))(x, w),
        ]

    got = {name: jax.jit(functools.partial(derivatives, conv))(x, w, xd, wd) for name, conv in convs.items()}
    for a, b in zip(got["ours"], got["lax"], strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_depthwise_reverse_mode_is_the_tap_sum_rule():
    # The input gradient jax.grad builds is the polyphase tap sum: no interior padding (the
    # zero-interleaved cotangent of the plain transpose) in the stride-2 program.
    x = jnp.ones((1, 8, 8, 4))
    w = jnp.ones((5, 5, 1, 4))
    grad = jax.jit(jax.grad(lambda x: jnp.sum(depthwise_taps(x, w, (2, 2), ((1, 2), (1, 2))) ** 2)))
    text = grad.lower(x).as_text()
    assert "interior = [0, 1, 1, 0]" not in text and "stablehlo.slice" in text
    plain = jax.jit(jax.grad(lambda x: jnp.sum(tap_sum(x, w, (2, 2), ((1, 2), (1, 2))) ** 2)))
    assert "interior = [0, 1, 1, 0]" in plain.lower(x).as_text()


def test_other_arguments_go_to_lax_unchanged():
    x = jnp.ones((1, 5, 5, 4))
    w = jnp.ones((3, 3, 1, 4))
    # Dilation and string padding are not rewritten: the program keeps its convolution.
    dilated = jax.jit(
        lambda x, w: conv_general_dilated(
            x, w, (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=NHWC, feature_group_count=4
        )
    )
    assert "convolution" in dilated.lower(x, w).as_text()
    np.testing.assert_allclose(
        np.asarray(dilated(x, w)),
        np.asarray(
            lax.conv_general_dilated(
                x, w, (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=NHWC, feature_group_count=4
            )
        ),
    )


def _small_lite():
    module = EfficientNetLite(
        stages=((1, 3, 1, 1, 32, 16), (2, 5, 2, 6, 16, 24)), head_features=64, num_classes=10
    )
    return module, random_variables(module, seed=3, size=32)


def test_guided_backprop_through_the_rewritten_model(monkeypatch):
    # The jaxpr rewrite of guided backprop sees the CPU branch's ordinary primitives.
    module, variables = _small_lite()
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    fn = lambda x: module.apply(variables, x)  # noqa: E731
    gb = gcj.guided_backprop(fn, x, target=3)
    monkeypatch.setattr(_blocks, "conv_general_dilated", lax.conv_general_dilated)
    jax.clear_caches()  # the kernels' traces are cached by the model's structure
    gb_lax = gcj.guided_backprop(lambda x: module.apply(variables, x), x, target=3)
    assert float(jnp.abs(gb).max()) > 0
    np.testing.assert_allclose(np.asarray(gb), np.asarray(gb_lax), rtol=1e-4, atol=1e-6)


STRIDE_2_SLICE = re.compile(r" slice\(.*slice=\{\[\d+:\d+(?::1)?\], \[\d+:\d+:2\], \[\d+:\d+:2\]")


def strided_taps_in(compiled_text: str) -> int:
    """Stride-2 slices in an optimised CPU program: one per tap of each stride-2 tap sum computed."""
    return len(STRIDE_2_SLICE.findall(compiled_text))


def test_guided_backprop_reads_the_relu6_mask_instead_of_recomputing_the_tap_sum(monkeypatch):
    # The small Lite's 5x5 stride-2 depthwise layer is 25 stride-2 slices. With the guided ReLU6's
    # mask kept from the forward pass (_rules.stored_for_backward), XLA:CPU computes that tap sum
    # twice (the activation, the mask), not four times as with guided ReLU + min's own gradient.
    module, variables = _small_lite()
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))

    def program():
        jax.clear_caches()
        fn = jax.jit(lambda v, x: gcj.guided_backprop(lambda x: module.apply(v, x), x, 3))
        compiled = fn.lower(variables, x).compile()
        return compiled(variables, x), strided_taps_in(compiled.as_text())

    gb, taps = program()
    monkeypatch.setattr(GUIDED, "clipped", None)  # the chained rule, as before guided_clipped_relu
    gb_chained, taps_chained = program()
    assert taps == 2 * 25 and taps_chained >= 4 * 25, (taps, taps_chained)
    # Same maps (random inputs never land exactly on the ReLU6's ties x == 0 or x == 6).
    assert float(jnp.abs(gb).max()) > 0
    np.testing.assert_allclose(np.asarray(gb), np.asarray(gb_chained), rtol=1e-5, atol=1e-7)


def test_training_gradients_through_the_rewritten_model(monkeypatch):
    # Parameter and input gradients of a small EfficientNet-Lite (3x3 stride 1, 5x5 stride 2
    # depthwise layers) with the CPU rewrite equal those of the model on lax's convolution.
    module, variables = _small_lite()
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    ct = jax.random.normal(jax.random.key(2), (2, 10))

    def loss(params, x):
        return jnp.sum(module.apply({**variables, "params": params}, x) * ct)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"], x)
    monkeypatch.setattr(_blocks, "conv_general_dilated", lax.conv_general_dilated)
    jax.clear_caches()  # the trace of the model is cached by its structure
    expected = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"], x)
    flat, flat_expected = jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(expected)
    assert len(flat) == len(flat_expected) and float(jnp.abs(grads[1]).max()) > 0
    for a, b in zip(flat, flat_expected, strict=True):
        scale = float(jnp.abs(b).max()) + 1e-6
        np.testing.assert_allclose(np.asarray(a) / scale, np.asarray(b) / scale, atol=1e-5)


@pytest.fixture(scope="module")
def lite0():
    return zoo.efficientnet_lite0()


def test_lite0_logits_unchanged_and_equal_to_torch(lite0, monkeypatch):
    # 136 px: not 224, so the TensorFlow "SAME" pads are computed from the input on both sides.
    x = lite0.preprocess(zoo.demo_image(), size=136)
    x = jnp.concatenate([x, x[:, ::-1]])
    new = np.asarray(jax.jit(lite0.module.apply)(lite0.variables, x))
    monkeypatch.setattr(_blocks, "conv_general_dilated", lax.conv_general_dilated)
    jax.clear_caches()  # the kernels' traces are cached by the model's structure
    old = np.asarray(jax.jit(lite0.module.apply)(lite0.variables, x))
    # Only the order of float32 additions changed: 1e-5 relative to the largest logit (about 13).
    assert np.abs(new - old).max() <= 1e-5 * np.abs(old).max(), np.abs(new - old).max()
    import efficientnet_lite_pytorch as lite  # the test extra's torch reference, as in test_zoo

    net = lite.EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=str(lite0.source), image_size=None
    )
    with torch.no_grad():
        ref = net.eval()(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())).numpy()
    assert np.abs(new - ref).max() < 1e-3
    assert (new.argmax(-1) == ref.argmax(-1)).all()


def test_resnet_small_inputs_unchanged(monkeypatch):
    # At 64 px ResNet's stage 4 is 2x2: its four 3x3 convolutions (ResNet-18) take the im2col path.
    model = resnet.resnet18(num_classes=10)
    variables = random_variables(model, seed=1, size=64)
    x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
    # 20 convolutions in ResNet-18: the stem, 16 in the blocks, 3 shortcuts; 4 of them became dots.
    assert jax.jit(model.apply).lower(variables, x).as_text().count("stablehlo.convolution") == 16
    new = np.asarray(jax.jit(model.apply)(variables, x))
    monkeypatch.setattr(resnet, "conv_general_dilated", lax.conv_general_dilated)
    jax.clear_caches()  # the kernels' traces are cached by the model's structure
    old = np.asarray(jax.jit(model.apply)(variables, x))
    assert np.abs(old).max() > 1
    assert np.abs(new - old).max() <= 1e-5 * np.abs(old).max(), (np.abs(new - old).max(), np.abs(old).max())
