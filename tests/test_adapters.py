"""The four ways to build a tap agree on one network, and each fails clearly on bad layers."""

import jax
import jax.numpy as jnp
import nets
import numpy as np
import pytest

import gradcam_jax as gcj
from gradcam_jax._nnx import nnx_layers

X = np.random.default_rng(1).normal(size=(2, 12, 12, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def w():
    return nets.weights(0)


def all_taps(w):
    module, variables = nets.linen(w)
    features, head = nets.split_functions(w)
    return {
        "split": gcj.split_tap(features, head),
        "linen": gcj.linen_tap(module, variables, "block2"),
        "nnx_path": gcj.nnx_tap(nets.nnx_model(w), "block2"),
        "nnx_callable": gcj.nnx_tap(nets.nnx_model(w), lambda m: m.block2),
        "equinox": gcj.equinox_tap(nets.equinox_model(w), where=lambda m: m.blocks[1]),
    }


def test_adapters_agree_on_activation_scores_and_maps(w):
    taps = all_taps(w)
    ref_scores, ref_a = taps["split"](X)
    ref_maps = gcj.grad_cam(taps["split"], X, [0, 3], upsample=False, normalize=False, relu=False)
    for name, tap in taps.items():
        scores, a = tap(X)
        assert a.shape == (2, 12, 12, 16), name
        np.testing.assert_allclose(
            np.asarray(scores), np.asarray(ref_scores), rtol=1e-5, atol=1e-5, err_msg=name
        )
        np.testing.assert_allclose(np.asarray(a), np.asarray(ref_a), rtol=1e-5, atol=1e-5, err_msg=name)
        maps = gcj.grad_cam(tap, X, [0, 3], upsample=False, normalize=False, relu=False)
        np.testing.assert_allclose(np.asarray(maps), np.asarray(ref_maps), rtol=1e-4, atol=1e-6, err_msg=name)


def test_tap_head_reruns_only_the_top(w):
    taps = all_taps(w)
    _, head = nets.split_functions(w)
    a_new = jnp.asarray(np.random.default_rng(2).uniform(size=(2, 12, 12, 16)).astype(np.float32))
    expected = np.asarray(head(a_new))
    for name, tap in taps.items():
        np.testing.assert_allclose(
            np.asarray(tap.head(X, a_new)), expected, rtol=1e-5, atol=1e-5, err_msg=name
        )
    # Under jit, the layers below the tap are dead code: only block3's conv remains.
    module, variables = nets.linen(w)
    text = (
        jax.jit(lambda x, a: gcj.linen_tap(module, variables, "block2").head(x, a)).lower(X, a_new).as_text()
    )
    assert text.count("convolution") == 1


def test_user_model_is_not_edited(w):
    model = nets.nnx_model(w)
    before = type(model.block2)
    gcj.grad_cam(gcj.nnx_tap(model, "block2"), X, 1)
    assert type(model.block2) is before
    eq = nets.equinox_model(w)
    leaves = jax.tree_util.tree_leaves(eq)
    gcj.grad_cam(gcj.equinox_tap(eq, lambda m: m.blocks[1]), X, 1)
    assert all(a is b for a, b in zip(leaves, jax.tree_util.tree_leaves(eq), strict=False))


def test_linen_unknown_layer_lists_layers_in_call_order(w):
    module, variables = nets.linen(w)
    tap = gcj.linen_tap(module, variables, "stage9")
    with pytest.raises(
        ValueError,
        match=r"'stage9' was not called\. Layers called, in order: "
        r"block1, block1/conv, block2, block2/conv, block3, block3/conv, fc",
    ):
        gcj.grad_cam(tap, X)
    assert gcj.linen_layers(module, variables, X) == [
        "block1",
        "block1/conv",
        "block2",
        "block2/conv",
        "block3",
        "block3/conv",
        "fc",
    ]


def test_linen_layer_called_twice_needs_call_index():
    import flax.linen as nn

    class Shared(nn.Module):
        @nn.compact
        def __call__(self, x):
            conv = nn.Conv(3, (3, 3), padding="SAME", name="shared")
            x = nn.relu(conv(x))
            x = nn.relu(conv(x))
            return nn.Dense(4, name="fc")(x.mean(axis=(1, 2)))

    m = Shared()
    v = m.init(jax.random.key(0), X)
    with pytest.raises(ValueError, match=r"called 2 times.*call=i"):
        gcj.grad_cam(gcj.linen_tap(m, v, "shared"), X)
    first = gcj.grad_cam(gcj.linen_tap(m, v, "shared", call=0), X, 1)
    second = gcj.grad_cam(gcj.linen_tap(m, v, "shared", call=1), X, 1)
    assert first.shape == second.shape == (2, 12, 12)
    assert not np.allclose(np.asarray(first), np.asarray(second))
    with pytest.raises(ValueError, match="called only 2"):
        gcj.grad_cam(gcj.linen_tap(m, v, "shared", call=5), X)


def test_nnx_bad_path_lists_submodules(w):
    with pytest.raises(ValueError, match=r"no submodule 'block9'.*submodules: block1, block1\.conv, block2"):
        gcj.nnx_tap(nets.nnx_model(w), "block9")


def test_equinox_not_called_submodule(w):
    import equinox as eqx

    eq = nets.equinox_model(w)

    class WithSpare(eqx.Module):
        net: object
        spare: object

        def __call__(self, x):
            return self.net(x)

    model = WithSpare(eq, eq.blocks[0])
    with pytest.raises(ValueError, match="was not called"):
        gcj.grad_cam(gcj.equinox_tap(model, lambda m: m.spare), X)


def test_importing_the_package_needs_no_framework():
    import subprocess
    import sys

    code = (
        "import sys, gradcam_jax; "
        "frameworks = ('equinox', 'flax.nnx', 'torch', 'haiku', 'keras', 'transformers'); "
        "bad = [m for m in frameworks if m in sys.modules]; "
        "print(bad); assert not bad, bad"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr + out.stdout


def test_taps_are_pytrees_and_params_are_differentiable(w):
    module, variables = nets.linen(w)
    tap = gcj.linen_tap(module, variables, "block2")

    def loss(variables):
        t = tap.with_params(variables)
        return jnp.sum(gcj.grad_cam(t, X, 2, upsample=False, normalize=False))

    grads = jax.grad(loss)(variables)
    norms = jax.tree_util.tree_map(lambda g: float(jnp.abs(g).sum()), grads)
    assert norms["params"]["block3"]["conv"]["kernel"] > 0
    assert norms["params"]["block1"]["conv"]["kernel"] > 0


def test_equinox_models_with_static_fields():
    """Activation functions, Lambda layers and Dropout flags are not jit arguments."""
    import equinox as eqx

    key = jax.random.key(0)
    k1, k2, k3 = jax.random.split(key, 3)
    conv = eqx.nn.Conv2d(3, 6, 3, padding=1, key=k1)
    features = eqx.nn.Sequential([conv, eqx.nn.Lambda(jax.nn.relu), eqx.nn.Dropout(0.1, inference=True)])
    mlp = eqx.nn.MLP(6, 4, width_size=8, depth=1, activation=jax.nn.relu, key=k2)

    class Net(eqx.Module):
        features: eqx.nn.Sequential
        mlp: eqx.nn.MLP

        def __call__(self, x):
            return self.mlp(self.features(x).mean(axis=(1, 2)))

    net = Net(features, mlp)
    tap = gcj.equinox_tap(net, lambda m: m.features)
    maps = gcj.grad_cam(tap, X, 2, upsample=False, normalize=False, relu=False)
    # Independent: the same computation through split_tap on plain functions.
    wk, bk = np.asarray(conv.weight), np.asarray(conv.bias)

    def feats(x):
        y = jax.lax.conv_general_dilated(
            x,
            jnp.asarray(wk.transpose(2, 3, 1, 0)),
            (1, 1),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return jax.nn.relu(y + bk[:, 0, 0])

    ref = gcj.split_tap(feats, lambda a: jax.vmap(mlp)(a.mean(axis=(1, 2))))
    expected = gcj.grad_cam(ref, X, 2, upsample=False, normalize=False, relu=False)
    np.testing.assert_allclose(np.asarray(maps), np.asarray(expected), rtol=1e-4, atol=1e-6)
    assert gcj.score_cam(tap, X, 2, chunk_size=8).shape == (2, 12, 12)
    assert gcj.guided_grad_cam(tap, X, 2).shape == (2, 12, 12, 3)


def test_building_the_same_tap_again_does_not_recompile(w):
    import flax.linen as nn

    traces = []

    class Counted(nn.Module):
        @nn.compact
        def __call__(self, x):
            traces.append(1)
            x = nn.relu(nn.Conv(4, (3, 3), name="conv")(x))
            return nn.Dense(3, name="fc")(x.mean(axis=(1, 2)))

    m = Counted()
    v = m.init(jax.random.key(0), X)
    gcj.grad_cam(gcj.linen_tap(m, v, "conv"), X, 1)
    after_first = len(traces)
    for _ in range(3):
        gcj.grad_cam(gcj.linen_tap(m, v, "conv"), X, 1)
    assert len(traces) == after_first


def test_linen_method_goes_to_apply():
    import flax.linen as nn

    class TwoHeads(nn.Module):
        def setup(self):
            self.conv = nn.Conv(4, (3, 3))
            self.fc = nn.Dense(3)

        def __call__(self, x):
            return self.fc(nn.relu(self.conv(x)).mean(axis=(1, 2)))

        def negated(self, x):
            return -self(x)

    m = TwoHeads()
    v = m.init(jax.random.key(0), X)
    plain = gcj.grad_cam(gcj.linen_tap(m, v, "conv"), X, 1, upsample=False, normalize=False, relu=False)
    neg = gcj.grad_cam(
        gcj.linen_tap(m, v, "conv", method=TwoHeads.negated),
        X,
        1,
        upsample=False,
        normalize=False,
        relu=False,
    )
    np.testing.assert_allclose(np.asarray(neg), -np.asarray(plain), rtol=1e-5, atol=1e-7)


def test_building_the_same_split_tap_again_does_not_recompile():
    traces = []

    def features(x):
        traces.append(1)
        return jnp.tanh(x)

    def head(a):
        return a.mean(axis=(1, 2))

    gcj.grad_cam(gcj.split_tap(features, head), X, 1)
    after_first = len(traces)
    for _ in range(3):
        gcj.grad_cam(gcj.split_tap(features, head), X, 1)
    assert len(traces) == after_first


# --------------------------------------------------------------------------------------------
# output= and activation_layout= (every adapter ends with adapt_tap)
# --------------------------------------------------------------------------------------------


def raw(tap, x, target, **kwargs):
    return np.asarray(gcj.grad_cam(tap, x, target, upsample=False, normalize=False, relu=False, **kwargs))


def test_equinox_channels_first_input_with_activation_layout(w):
    """Channels-first input given as is (layout="NCHW"): channels_first=False + activation_layout."""
    eq = nets.equinox_model(w)
    where = lambda m: m.blocks[1]
    expected = raw(gcj.equinox_tap(eq, where), X, [2])
    tap = gcj.equinox_tap(eq, where, channels_first=False, activation_layout="NCHW")
    x_nchw = X.transpose(0, 3, 1, 2)
    assert jax.eval_shape(tap, x_nchw)[1].shape == (2, 12, 12, 16)
    np.testing.assert_allclose(raw(tap, x_nchw, [2], layout="NCHW"), expected, rtol=1e-5, atol=1e-6)
    # The layer above sees the edit in its own layout: the head recomputes the same scores.
    _, a = tap(x_nchw)
    np.testing.assert_allclose(np.asarray(tap.head(x_nchw, a)), np.asarray(tap(x_nchw)[0]), atol=1e-5)


def test_linen_activation_layout_and_output(w):
    """A Linen layer whose output is channels-first, and a model whose output is a dict."""
    import flax.linen as nn

    class ToNCHW(nn.Module):
        @nn.compact
        def __call__(self, x):
            return jnp.transpose(nn.relu(nn.Conv(16, (3, 3), padding="SAME", name="conv")(x)), (0, 3, 1, 2))

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(8, (3, 3), padding="SAME", name="block1")(x))
            a = jnp.transpose(ToNCHW(name="block2")(x), (0, 2, 3, 1))
            a = nn.relu(nn.Conv(16, (3, 3), padding="SAME", name="block3")(a))
            return {"logits": nn.Dense(5, name="fc")(a.mean(axis=(1, 2))), "features": a}

    module, variables = nets.linen(w)
    p = variables["params"]
    params = {**p, "block1": p["block1"]["conv"], "block3": p["block3"]["conv"]}
    expected = raw(gcj.linen_tap(module, variables, "block2"), X, [1])
    tap = gcj.linen_tap(Net(), {"params": params}, "block2", activation_layout="NCHW")  # .logits by default
    np.testing.assert_allclose(raw(tap, X, [1]), expected, rtol=1e-5, atol=1e-6)
    negated = gcj.linen_tap(
        Net(), {"params": params}, "block2", activation_layout="NCHW", output=lambda o: -o["logits"]
    )
    np.testing.assert_allclose(raw(negated, X, [1]), -expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(
        ValueError, match="output='scores' is not in the model's output; its keys: logits, features"
    ):
        jax.eval_shape(gcj.linen_tap(Net(), {"params": params}, "block2", output="scores"), X)


# --------------------------------------------------------------------------------------------
# Flax NNX: a CNN in the style of the Flax documentation, call=, nnx_layers
# --------------------------------------------------------------------------------------------


def docs_cnn():
    from functools import partial

    from flax import nnx

    class CNN(nnx.Module):
        def __init__(self, *, rngs: nnx.Rngs):
            self.conv1 = nnx.Conv(3, 8, kernel_size=(3, 3), rngs=rngs)
            self.conv2 = nnx.Conv(8, 16, kernel_size=(3, 3), rngs=rngs)
            self.avg_pool = partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
            self.linear1 = nnx.Linear(16 * 3 * 3, 32, rngs=rngs)
            self.linear2 = nnx.Linear(32, 5, rngs=rngs)

        def __call__(self, x):
            x = self.avg_pool(nnx.relu(self.conv1(x)))
            x = self.avg_pool(nnx.relu(self.conv2(x)))
            x = x.reshape(x.shape[0], -1)
            x = nnx.relu(self.linear1(x))
            return self.linear2(x)

    return CNN(rngs=nnx.Rngs(0))


def docs_cnn_reference(model):
    """``(x, classes (B,)) -> raw Grad-CAM at conv2``: a hand split of the model and one jax.vjp."""
    from flax import nnx

    def features(x):
        return model.conv2(model.avg_pool(nnx.relu(model.conv1(x))))

    def head(a):
        h = model.avg_pool(nnx.relu(a))
        return model.linear2(nnx.relu(model.linear1(h.reshape(h.shape[0], -1))))

    def grad_cam(x, classes):
        a = features(x)
        logits, pullback = jax.vjp(head, a)
        (da,) = pullback(jax.nn.one_hot(jnp.asarray(classes), logits.shape[-1]))
        return np.asarray((da.mean(axis=(1, 2), keepdims=True) * a).sum(-1)), np.asarray(logits)

    return grad_cam


def test_nnx_docs_cnn_matches_hand_written_vjp_for_every_target_kind():
    model = docs_cnn()
    reference = docs_cnn_reference(model)
    expected, logits = reference(X, [1, 3])
    tap = gcj.nnx_tap(model, "conv2")
    assert np.abs(raw(tap, X, jnp.asarray([1, 3])) - expected).max() <= 1e-5
    top = logits.argmax(-1)
    assert np.abs(raw(tap, X, None) - reference(X, top)[0]).max() <= 1e-5
    assert np.abs(raw(tap, X, 4) - reference(X, [4, 4])[0]).max() <= 1e-5
    pairs = raw(tap, X, jnp.asarray([[1, 0], [3, 0]]))
    assert pairs.shape == (2, 2, 6, 6) and np.abs(pairs[:, 0] - expected).max() <= 1e-5
    assert nnx_layers(model, X) == ["conv1", "conv2", "linear1", "linear2"]  # no avg_pool: not a module


def test_nnx_params_differentiable_guided_backprop_and_model_unchanged():
    from flax import nnx

    model = docs_cnn()
    before, cls = jax.tree_util.tree_leaves(nnx.state(model)), type(model)
    tap = gcj.nnx_tap(model, lambda m: m.conv2)

    def loss(state):
        return jnp.sum(gcj.grad_cam(tap.with_params(state), X, 2, upsample=False, normalize=False))

    grads = jax.grad(loss)(tap.params)
    assert sum(float(jnp.abs(g).sum()) for g in jax.tree_util.tree_leaves(grads["conv1"])) > 0
    guided = np.asarray(gcj.guided_backprop(tap, X, 2))
    assert guided.shape == X.shape and np.abs(guided).max() > 0
    assert type(model.conv2) is nnx.Conv and type(model) is cls
    assert all(a is b for a, b in zip(before, jax.tree_util.tree_leaves(nnx.state(model)), strict=True))


def test_nnx_call_index_and_layer_list():
    from flax import nnx

    class Shared(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(3, 3, (3, 3), rngs=rngs)
            self.fc = nnx.Linear(3, 4, rngs=rngs)
            self.spare = nnx.Linear(3, 4, rngs=rngs)

        def __call__(self, x):
            x = nnx.relu(self.conv(x))
            x = nnx.relu(self.conv(x))
            return self.fc(x.mean(axis=(1, 2))) + 0 * self.fc.kernel[0, 0]  # reads the layer too

    m = Shared(nnx.Rngs(0))
    assert nnx_layers(m, X) == ["conv", "conv", "fc"]
    with pytest.raises(ValueError, match=r"called 2 times.*nnx_tap\(\.\.\., call=i\), 0 <= i < 2"):
        jax.eval_shape(gcj.nnx_tap(m, "conv"), X)
    first = raw(gcj.nnx_tap(m, "conv", call=0), X, 1)
    second = raw(gcj.nnx_tap(m, "conv", call=1), X, 1)
    assert first.shape == second.shape == (2, 12, 12) and not np.allclose(first, second)
    with pytest.raises(ValueError, match="called only 2"):
        jax.eval_shape(gcj.nnx_tap(m, "conv", call=5), X)
    with pytest.raises(
        ValueError, match=r"'spare' was not called\. Layers called, in order: conv, conv, fc\."
    ):
        jax.eval_shape(gcj.nnx_tap(m, "spare"), X)
    # The forward pass reads the tapped layer's attributes (fc.kernel): they stay readable.
    assert jax.eval_shape(gcj.nnx_tap(m, "fc"), X)[1].shape == (2, 4)
