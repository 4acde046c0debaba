"""The four ways to build a tap agree on one network, and each fails clearly on bad layers."""

import jax
import jax.numpy as jnp
import nets
import numpy as np
import pytest

import gradcam_jax as gcj

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


def test_nnx_bad_path_names_attributes(w):
    with pytest.raises(ValueError, match="no attribute 'block9'.*block1"):
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
        "bad = [m for m in ('equinox', 'flax.nnx', 'flax.linen', 'torch') if m in sys.modules]; "
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
