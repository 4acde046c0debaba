"""Multi-layer taps: several layers' activations and gradients from one forward pass and one vjp.

Every adapter is checked on the same three-block net (tests/nets.py) against a hand-written
``jax.vjp`` of that net with one additive delta per block output (independent of the library),
and against its own single-layer taps.
"""

import jax
import jax.numpy as jnp
import nets
import numpy as np
import pytest

import gradcam_jax as gcj

X = np.random.default_rng(1).normal(size=(2, 8, 8, 3)).astype(np.float32)
BLOCKS = ("block1", "block2", "block3")


@pytest.fixture(scope="module")
def w():
    return nets.weights(0, c2=8)


def hand_reference(w, x, classes):
    """Block outputs and d score[b, classes[b]] / d block output, by a hand-written jax.vjp."""

    def conv(h, name):
        k, b = w[name]
        y = jax.lax.conv_general_dilated(h, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jax.nn.relu(y + b)

    def forward(deltas):
        h, acts = x, []
        for name, d in zip(BLOCKS, deltas, strict=True):
            a = conv(h, name)
            acts.append(a)
            h = a + d
        scores = h.mean(axis=(1, 2)) @ w["fc"][0] + w["fc"][1]
        return scores[np.arange(x.shape[0]), classes], acts

    zeros = [jnp.zeros_like(a) for a in forward([0.0, 0.0, 0.0])[1]]
    selected, pullback, acts = jax.vjp(forward, zeros, has_aux=True)
    (grads,) = pullback(jnp.ones_like(selected))
    return [np.asarray(a) for a in acts], [np.asarray(g) for g in grads]


def assert_matches_hand(out, w, names, classes=(0, 3)):
    """``out``: Grads of a multi-layer tap at the three blocks (names in block order), K targets."""
    assert list(out.activation) == list(names)
    assert list(out.grads) == list(names)
    for k, c in enumerate(classes):
        acts, grads = hand_reference(w, X, np.full(X.shape[0], c))
        for name, a, g in zip(names, acts, grads, strict=True):
            np.testing.assert_allclose(
                np.asarray(out.activation[name]), a, rtol=1e-5, atol=1e-6, err_msg=name
            )
            np.testing.assert_allclose(np.asarray(out.grads[name][k]), g, rtol=1e-4, atol=1e-6, err_msg=name)


def marked_forward(w):
    def forward(x, mark):
        h = x
        for name in BLOCKS:
            k, b = w[name]
            y = jax.lax.conv_general_dilated(h, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
            h = mark(name, jax.nn.relu(y + b))
        return h.mean(axis=(1, 2)) @ w["fc"][0] + w["fc"][1]

    return forward


# --------------------------------------------------------------------------------------------
# The core: Linen and marked_tap
# --------------------------------------------------------------------------------------------


def test_linen_several_layers_match_hand_vjp_and_single_layer_taps(w):
    module, variables = nets.linen(w)
    tap = gcj.linen_tap(module, variables, layers=["block3", "block1", "block2"])  # any order given
    assert tap.multi and tap.layers == ("block3", "block1", "block2")
    out = gcj.activations_and_grads(tap, X, target=[0, 3])
    assert_matches_hand(out, w, BLOCKS)  # keys in call order
    single = gcj.activations_and_grads(gcj.linen_tap(module, variables, "block2"), X, target=[0, 3])
    np.testing.assert_allclose(np.asarray(out.activation["block2"]), np.asarray(single.activation), atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.grads["block2"]), np.asarray(single.grads), atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.selected), np.asarray(single.selected), atol=1e-6)
    layer = out.layer("block1")
    assert isinstance(layer, gcj.Grads) and layer.activation.shape == (2, 8, 8, 8)
    assert list(out.per_layer()) == list(BLOCKS)


def test_marked_tap_matches_hand_vjp_and_split_tap(w):
    tap = gcj.marked_tap(marked_forward(w), layers="block*")
    out = gcj.activations_and_grads(tap, X, target=[0, 3])
    assert_matches_hand(out, w, BLOCKS)
    # The single-layer form agrees with split_tap on the same net.
    features, head = nets.split_functions(w)
    ref = gcj.grad_cam(gcj.split_tap(features, head), X, 1, upsample=False, normalize=False, relu=False)
    one = gcj.marked_tap(marked_forward(w), "block2")
    got = gcj.grad_cam(one, X, 1, upsample=False, normalize=False, relu=False)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-6)
    assert gcj.marked_layers(marked_forward(w), X) == list(BLOCKS)


def test_one_forward_pass_for_every_layer_and_class(w):
    """Three blocks, two classes: the jaxpr holds each forward convolution once, and the backward
    convolutions down to the first tapped block once each (the pullback is vmapped over classes)."""
    module, variables = nets.linen(w)
    for tap in (
        gcj.linen_tap(module, variables, layers=list(BLOCKS)),
        gcj.marked_tap(marked_forward(w), layers=list(BLOCKS)),
    ):
        jaxpr = jax.make_jaxpr(lambda x, tap=tap: gcj.activations_and_grads(tap, x, [0, 3]))(X)
        # 3 forward convolutions + 2 input-gradient convolutions (through block3 and block2).
        assert str(jaxpr).count("conv_general_dilated") == 5, jaxpr


def test_select_gives_a_single_layer_tap_for_every_explainer(w):
    module, variables = nets.linen(w)
    tap = gcj.linen_tap(module, variables, layers=["block*"])
    single = gcj.linen_tap(module, variables, "block2")
    for picked in (tap.select("block2"), tap.select(1), tap.select(-2)):
        assert not picked.multi
        np.testing.assert_allclose(
            np.asarray(gcj.grad_cam(picked, X, [0, 3])),
            np.asarray(gcj.grad_cam(single, X, [0, 3])),
            atol=1e-6,
        )
    # head() with a dict replaces some layers and leaves the others computed; select's too.
    a_new = np.random.default_rng(2).uniform(size=(2, 8, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(tap.select("block3").head(X, a_new)),
        np.asarray(a_new.mean(axis=(1, 2)) @ w["fc"][0] + w["fc"][1]),
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        np.asarray(tap.head(X, {"block3": a_new})),
        np.asarray(a_new.mean(axis=(1, 2)) @ w["fc"][0] + w["fc"][1]),
        rtol=1e-5,
        atol=1e-6,
    )


def test_patterns_follow_path_segments_and_call_order(w):
    module, variables = nets.linen(w)

    def keys(layers):
        return list(gcj.linen_tap(module, variables, layers=layers)(X)[1])

    assert keys("block*") == list(BLOCKS)  # '*' does not cross '/'
    assert keys("*/conv") == ["block1/conv", "block2/conv", "block3/conv"]
    assert keys("**") == ["block1", "block1/conv", "block2", "block2/conv", "block3", "block3/conv", "fc"]
    assert keys(["block[13]", "block?/conv", "block1"]) == [
        "block1",
        "block1/conv",
        "block2/conv",
        "block3",
        "block3/conv",
    ]
    assert keys(["fc", "block[!1]"]) == ["block2", "block3", "fc"]


def test_errors_say_what_exists_and_how_to_fix(w):
    module, variables = nets.linen(w)
    with pytest.raises(
        ValueError,
        match=r"pattern 'stage\*' matched no layer called; layer 'block9' was not called .*"
        r"Layers called, in order: block1, block1/conv, block2",
    ):
        gcj.linen_tap(module, variables, layers=["block1", "stage*", "block9"])(X)
    tap = gcj.linen_tap(module, variables, layers=["block1", "block3"])
    with pytest.raises(
        ValueError, match=r"grad_cam explains one layer.*2 layers \(block1, block3\).*tap\.select"
    ):
        gcj.grad_cam(tap, X)
    with pytest.raises(ValueError, match=r"guided_grad_cam explains one layer"):
        gcj.guided_grad_cam(tap, X)
    with pytest.raises(ValueError, match=r"score_cam explains one layer"):
        gcj.score_cam(tap, X)
    with pytest.raises(
        ValueError, match=r"recorded no layer 'block2'; its layers, in call order: block1, block3"
    ):
        gcj.grad_cam(tap.select("block2"), X)
    with pytest.raises(ValueError, match=r"select\(5\): the tap records 2 layer"):
        gcj.grad_cam(tap.select(5), X)
    with pytest.raises(ValueError, match="already has one layer"):
        gcj.linen_tap(module, variables, "block1").select("block1")
    with pytest.raises(TypeError, match=r"as a dict \{layer: array\}"):
        tap(X, jnp.zeros((2, 8, 8, 8)))
    with pytest.raises(TypeError, match="not both"):
        gcj.linen_tap(module, variables, "block1", layers=["block2"])
    with pytest.raises(TypeError, match="non-empty list"):
        gcj.linen_tap(module, variables, layers=[])
    with pytest.raises(TypeError, match="not both"):
        gcj.marked_tap(marked_forward(w))


def test_layer_called_twice_keeps_the_call_rule():
    import flax.linen as nn

    class Shared(nn.Module):
        @nn.compact
        def __call__(self, x):
            conv = nn.Conv(3, (3, 3), padding="SAME", name="shared")
            h = nn.relu(conv(x))
            h = nn.relu(nn.Conv(3, (3, 3), padding="SAME", name="mid")(h))
            return nn.Dense(4, name="fc")(nn.relu(conv(h)).mean(axis=(1, 2)))

    m = Shared()
    v = m.init(jax.random.key(0), X)
    with pytest.raises(ValueError, match=r"layer 'shared' was called 2 times.*call=i"):
        gcj.linen_tap(m, v, layers=["shared", "mid"])(X)
    both = gcj.activations_and_grads(gcj.linen_tap(m, v, layers=["shared", "mid"], call=0), X, 1)
    first = gcj.activations_and_grads(gcj.linen_tap(m, v, "shared", call=0), X, 1)
    np.testing.assert_allclose(np.asarray(both.grads["shared"]), np.asarray(first.grads), atol=1e-6)
