"""Multi-layer taps: several layers' activations and gradients from one forward pass and one vjp.

Every adapter is checked on the same three-block net (tests/nets.py) against a hand-written
``jax.vjp`` of that net with one additive delta per block output (independent of the library),
and against its own single-layer taps.
"""

import functools

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


@functools.partial(jax.jit, static_argnames="target")
def grads_of(tap, x, target):
    """activations_and_grads under jit: one compilation instead of hundreds of eager dispatches."""
    return gcj.activations_and_grads(tap, x, list(target) if isinstance(target, tuple) else target)


def hand_reference(w, x, classes):
    """Block outputs and d score[b, classes[b]] / d block output, by a hand-written jax.vjp."""
    acts, grads = _hand_vjp(w, jnp.asarray(x), jnp.asarray(classes))
    return [np.asarray(a) for a in acts], [np.asarray(g) for g in grads]


@jax.jit
def _hand_vjp(w, x, classes):
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
        return scores[jnp.arange(x.shape[0]), classes], acts

    zeros = [jnp.zeros_like(a) for a in jax.eval_shape(forward, [0.0, 0.0, 0.0])[1]]
    selected, pullback, acts = jax.vjp(forward, zeros, has_aux=True)
    (grads,) = pullback(jnp.ones_like(selected))
    return acts, grads


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
    out = grads_of(tap, X, (0, 3))
    assert_matches_hand(out, w, BLOCKS)  # keys in call order
    single = grads_of(gcj.linen_tap(module, variables, "block2"), X, (0, 3))
    np.testing.assert_allclose(np.asarray(out.activation["block2"]), np.asarray(single.activation), atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.grads["block2"]), np.asarray(single.grads), atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.selected), np.asarray(single.selected), atol=1e-6)
    layer = out.layer("block1")
    assert isinstance(layer, gcj.Grads) and layer.activation.shape == (2, 8, 8, 8)
    assert list(out.per_layer()) == list(BLOCKS)


def test_marked_tap_matches_hand_vjp_and_split_tap(w):
    tap = gcj.marked_tap(marked_forward(w), layers="block*")
    out = grads_of(tap, X, (0, 3))
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
    picked = tap.select("block2")
    assert not picked.multi and picked.name == "block2"
    np.testing.assert_allclose(
        np.asarray(gcj.grad_cam(picked, X, [0, 3])), np.asarray(gcj.grad_cam(single, X, [0, 3])), atol=1e-6
    )
    forward = jax.jit(lambda t, x: t(x)[1])
    for index in (1, -2):  # positions in call order: block1, block2, block3
        np.testing.assert_allclose(np.asarray(forward(tap.select(index), X)), np.asarray(forward(single, X)))
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
    with pytest.raises(
        ValueError, match=r"names layer\(s\) 'block2' that it does not record.*block1, block3"
    ):
        tap(X, {"block1": jnp.zeros((2, 8, 8, 8)), "block2": jnp.zeros((2, 8, 8, 8))})
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
    both = grads_of(gcj.linen_tap(m, v, layers=["shared", "mid"], call=0), X, 1)
    first = grads_of(gcj.linen_tap(m, v, "shared", call=0), X, 1)
    np.testing.assert_allclose(np.asarray(both.grads["shared"]), np.asarray(first.grads), atol=1e-6)


# --------------------------------------------------------------------------------------------
# Every adapter
# --------------------------------------------------------------------------------------------


def adapter_taps(w, kind):
    """``(multi-layer tap at the three blocks by a pattern or a list, its keys, single-layer tap at
    block2)`` for one adapter."""
    if kind == "nnx":
        model = nets.nnx_model(w)
        return gcj.nnx_tap(model, layers="block*"), list(BLOCKS), gcj.nnx_tap(model, "block2")
    if kind == "nnx_callables":
        model = nets.nnx_model(w)
        picks = [lambda m: m.block1, "block2", lambda m: m.block3]
        return gcj.nnx_tap(model, layers=picks), list(BLOCKS), gcj.nnx_tap(model, lambda m: m.block2)
    if kind == "equinox":
        model = nets.equinox_model(w)
        picks = ["blocks.[12]", lambda m: m.blocks[0]]  # any order: keys come in call order
        names = ["blocks.0", "blocks.1", "blocks.2"]
        return gcj.equinox_tap(model, layers=picks), names, gcj.equinox_tap(model, lambda m: m.blocks[1])
    if kind == "haiku":
        net, params = nets.haiku_net(w)
        return gcj.haiku_tap(net, params, layers="block?"), list(BLOCKS), gcj.haiku_tap(net, params, "block2")
    if kind == "keras":
        model = nets.keras_net(w)
        return gcj.keras_tap(model, layers=["block*"]), list(BLOCKS), gcj.keras_tap(model, "block2")
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["nnx", "nnx_callables", "equinox", "haiku", "keras"])
def test_every_adapter_matches_hand_vjp_single_layer_taps_and_traces_one_pass(w, kind):
    tap, names, single = adapter_taps(w, kind)
    assert tap.multi and not single.multi
    out = grads_of(tap, X, (0, 3))
    assert_matches_hand(out, w, names)
    one = grads_of(single, X, (0, 3))
    np.testing.assert_allclose(np.asarray(out.activation[names[1]]), np.asarray(one.activation), atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.grads[names[1]]), np.asarray(one.grads), atol=1e-6)
    jaxpr = str(jax.make_jaxpr(lambda x: gcj.activations_and_grads(tap, x, [0, 3]))(X))
    assert jaxpr.count("conv_general_dilated") == 5, jaxpr  # 3 forward + 2 backward, for all layers
    assert jax.eval_shape(tap.select(names[1]), X)[1].shape == one.activation.shape


def test_adapter_errors_list_the_layers(w):
    with pytest.raises(
        ValueError, match=r"pattern 'stage\*' matched no layer called.*block1, block1\.conv, block2"
    ):
        gcj.nnx_tap(nets.nnx_model(w), layers=["block1", "stage*"])(X)
    with pytest.raises(ValueError, match=r"no submodule 'block9'"):
        gcj.nnx_tap(nets.nnx_model(w), layers=["block9"])
    net, params = nets.haiku_net(w)
    with pytest.raises(ValueError, match=r"pattern 'conv\*' matched no module called.*block1, block1/conv"):
        gcj.haiku_tap(net, params, layers=["conv*"])(X)
    keras_model = nets.keras_net(w)
    with pytest.raises(
        ValueError, match=r"pattern 'conv\*' matches no layer.*block1, block2, block3, pool, fc"
    ):
        gcj.keras_tap(keras_model, layers=["block1", "conv*"])
    with pytest.raises(TypeError, match="not both"):
        gcj.keras_tap(keras_model, "block1", layers=["block2"])
    with pytest.raises(TypeError, match=r"non-empty list of callables"):
        gcj.equinox_tap(nets.equinox_model(w), layers=[])
    with pytest.raises(
        ValueError, match=r"pattern 'block\*' matches no submodule.*blocks\.0, blocks\.0\.conv, blocks\.1"
    ):
        gcj.equinox_tap(nets.equinox_model(w), layers=["block*"])
    assert gcj.equinox_layers(nets.equinox_model(w))[:3] == ["blocks.0", "blocks.0.conv", "blocks.1"]
    with pytest.raises(TypeError, match="not both"):
        gcj.equinox_tap(nets.equinox_model(w), lambda m: m.blocks[0], layers=[lambda m: m.blocks[1]])


def test_equinox_named_nested_layers_and_the_call_rule(w):
    import equinox as eqx

    model = nets.equinox_model(w)
    tap = gcj.equinox_tap(model, layers={"outer": lambda m: m.blocks[1], "inner": lambda m: m.blocks[1].conv})
    acts = tap(X)[1]
    assert list(acts) == ["outer", "inner"]  # entered in that order
    np.testing.assert_allclose(np.asarray(acts["outer"]), np.maximum(np.asarray(acts["inner"]), 0), atol=1e-6)

    class Twice(eqx.Module):
        net: eqx.Module

        def __call__(self, x):
            b = self.net.blocks
            return self.net.fc(b[2](b[1](b[1](b[0](x)))).mean(axis=(1, 2)))

    twice = Twice(nets.equinox_model(nets.weights(0, c2=8)))
    with pytest.raises(ValueError, match=r"submodule 'net\.blocks\.1' was called 2 times.*call=i"):
        gcj.equinox_tap(twice, layers=[lambda m: m.net.blocks[1], lambda m: m.net.blocks[2]])(X)
    got = gcj.equinox_tap(twice, layers=[lambda m: m.net.blocks[1]], call=1)(X)[1]["net.blocks.1"]
    assert got.shape == (2, 8, 8, 8)


def test_hugging_face_vit_blocks_by_pattern_match_a_hand_written_vjp():
    import flax.linen as nn
    import third_party_models as tpm
    from transformers import FlaxViTForImageClassification, ViTConfig

    config = ViTConfig(
        image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, num_labels=5,
    )  # fmt: skip
    model = FlaxViTForImageClassification(config, _do_init=False)
    params = tpm.random_like(model.params_shape_tree, 1)
    x = np.random.default_rng(3).normal(size=(2, 3, 16, 16)).astype(np.float32)
    names = ["vit/encoder/layer/0/layernorm_before", "vit/encoder/layer/1/layernorm_before"]
    tap = gcj.hf_tap(model, layers="vit/encoder/layer/*/layernorm_before", params=params)
    out = grads_of(tap, x, 2)
    assert list(out.grads) == names

    def scores(deltas):  # the model through its own __call__, each block input + its delta
        seen = {}

        def interceptor(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            path = "/".join(context.module.path)
            if context.method_name == "__call__" and path in deltas:
                seen[path] = out
                out = out + deltas[path]
            return out

        with nn.intercept_methods(interceptor):
            return model(x, params=params).logits[:, 2], seen

    @jax.jit
    def reference(zeros):
        selected, pullback, acts = jax.vjp(scores, zeros, has_aux=True)
        return acts, pullback(jnp.ones_like(selected))[0]

    acts, grads = reference({n: jnp.zeros((2, 5, 16)) for n in names})
    for n in names:
        assert np.abs(np.asarray(grads[n])).max() > 1e-4
        np.testing.assert_allclose(np.asarray(out.activation[n]), np.asarray(acts[n]), atol=1e-5)
        np.testing.assert_allclose(np.asarray(out.grads[n]), np.asarray(grads[n]), atol=1e-5)
    assert jax.eval_shape(tap.select(names[-1]), x)[1].shape == (2, 5, 16)


def test_multi_layer_tap_is_a_pytree_jits_and_differentiates(w):
    module, variables = nets.linen(w)
    tap = gcj.linen_tap(module, variables, layers=["block1", "block3"])
    leaves, treedef = jax.tree_util.tree_flatten(tap)
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert rebuilt.layers == ("block1", "block3")
    fused = jax.jit(lambda t, x: sum(g.sum() for g in gcj.activations_and_grads(t, x, 1).grads.values()))
    np.testing.assert_allclose(
        float(fused(tap, X)),
        sum(float(g.sum()) for g in hand_reference(w, X, np.full(2, 1))[1][::2]),
        rtol=1e-4,
    )
    assert tap.with_params(variables).layers == tap.layers


def test_call_order_survives_jit_vmap_and_vjp():
    """JAX sorts a plain dict's keys when it rebuilds one; the layers stay in call order."""

    def forward(x, mark):
        h = mark("zeta", jnp.tanh(x))
        h = mark("alpha", 2.0 * h)
        return mark("mid", h + 1.0).mean(axis=(1, 2))

    tap = gcj.marked_tap(forward, layers=["mid", "alpha", "zeta"])
    out = grads_of(tap, X, (0, 1))
    assert list(out.activation) == list(out.grads) == ["zeta", "alpha", "mid"]
    acts = jax.vmap(lambda x: tap(x[None])[1])(X)
    assert list(acts) == ["zeta", "alpha", "mid"]
    # d mean(mid) / d alpha = 1 / (H W) everywhere; d / d zeta = 2 / (H W).
    np.testing.assert_allclose(np.asarray(out.grads["alpha"][1, :, :, :, 1]), 1 / 64, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out.grads["zeta"][0, :, :, :, 0]), 2 / 64, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out.grads["zeta"][0, :, :, :, 1]), 0.0)
