"""Only rectifiers of activations are ReLUs (issue 12, item 6).

Normalisation layers clamp a variance at zero (``max(0, mean(x**2) - mean(x)**2)``); that clamp
is not a ReLU. Models whose only "ReLU" is such a clamp — LayerNorm / RMSNorm / GroupNorm +
GELU models from Flax, NNX, Equinox, Hugging Face and equimo, built from their own packages —
are refused by Guided Backprop and Deconvnet; a model with LayerNorm *and* ReLUs gets the
guided rule at its ReLUs only, checked against the same model with ``gcj.guided_relu`` written
in by hand.
"""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gradcam_jax as gcj

X_IMG = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
X_VEC = np.random.default_rng(1).normal(size=(3, 12)).astype(np.float32)


def count(fn, x) -> int:
    return gcj.count_relus(jax.make_jaxpr(fn)(x))


# ------------------------------------------------------------------ models without a ReLU


class LinenMLP(nn.Module):
    norm: str = "layer"

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(16)(x)
        h = nn.LayerNorm()(h) if self.norm == "layer" else nn.RMSNorm()(h)
        return nn.Dense(4)(nn.gelu(h))


class LinenCNN(nn.Module):
    norm: str = "layer"

    @nn.compact
    def __call__(self, x):
        h = nn.Conv(8, (3, 3))(x)
        h = nn.LayerNorm()(h) if self.norm == "layer" else nn.GroupNorm(num_groups=2)(h)
        h = nn.gelu(h).mean(axis=(1, 2))
        return nn.Dense(4)(nn.LayerNorm()(h))  # a LayerNorm on pooled features too


def linen_fn(module, x):
    variables = module.init(jax.random.key(0), x)
    return lambda x: module.apply(variables, x)


def equinox_fn():
    k1, k2 = jax.random.split(jax.random.key(2))
    model = [eqx.nn.Linear(12, 16, key=k1), eqx.nn.LayerNorm(16), eqx.nn.Linear(16, 4, key=k2)]

    def one(x):
        return model[2](jax.nn.gelu(model[1](model[0](x))))

    return jax.vmap(one)


def equinox_groupnorm_fn():
    conv = eqx.nn.Conv2d(3, 8, 3, padding=1, key=jax.random.key(3))
    norm = eqx.nn.GroupNorm(2, 8)
    head = eqx.nn.Linear(8, 4, key=jax.random.key(4))

    def one(x):  # (H, W, C)
        h = jax.nn.gelu(norm(conv(jnp.moveaxis(x, -1, 0))))
        return head(h.mean(axis=(1, 2)))

    return jax.vmap(one)


def nnx_fn():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.fc1 = nnx.Linear(12, 16, rngs=rngs)
            self.norm = nnx.LayerNorm(16, rngs=rngs)
            self.fc2 = nnx.Linear(16, 4, rngs=rngs)

        def __call__(self, x):
            return self.fc2(nnx.gelu(self.norm(self.fc1(x))))

    return Net(nnx.Rngs(0))


def batchnorm_training_fn(x):
    module = nn.BatchNorm(use_running_average=False)
    variables = module.init(jax.random.key(0), x)
    w = jnp.asarray(np.random.default_rng(5).normal(size=(12, 4)).astype(np.float32))
    return lambda x: jnp.tanh(module.apply(variables, x, mutable=["batch_stats"])[0]) @ w


def mean_last(x):
    return jnp.mean(x, -1, keepdims=True)


NO_RELU = {
    "linen_layernorm_gelu_mlp": lambda: (linen_fn(LinenMLP("layer"), X_VEC), X_VEC),
    "linen_rmsnorm_gelu_mlp": lambda: (linen_fn(LinenMLP("rms"), X_VEC), X_VEC),
    "linen_layernorm_gelu_cnn": lambda: (linen_fn(LinenCNN("layer"), X_IMG), X_IMG),
    "linen_groupnorm_gelu_cnn": lambda: (linen_fn(LinenCNN("group"), X_IMG), X_IMG),
    "linen_batchnorm_training": lambda: (batchnorm_training_fn(X_VEC), X_VEC),
    "only_a_layernorm": lambda: (linen_fn(nn.LayerNorm(), X_VEC), X_VEC),
    "equinox_layernorm_gelu": lambda: (equinox_fn(), X_VEC),
    "equinox_groupnorm_gelu": lambda: (equinox_groupnorm_fn(), X_IMG),
    "nnx_layernorm_gelu": lambda: (nnx_fn(), X_VEC),
    "jnp_var_clamped": lambda: (lambda x: jnp.maximum(jnp.var(x, -1, keepdims=True), 0.0) * x, X_VEC),
    "variance_by_hand": lambda: (
        lambda x: jnp.maximum(mean_last(x**2.0) - mean_last(x) ** 2, 0.0) * x,
        X_VEC,
    ),
}


def assert_refused(fn, x):
    assert count(fn, x) == 0
    for explainer in (gcj.guided_backprop, gcj.deconvnet):
        with pytest.raises(ValueError, match="no ReLU") as info:
            explainer(fn, x, 0)
        assert "gcj.gradients" in str(info.value) and "gcj.smooth_grad" in str(info.value)


@pytest.mark.parametrize("name", list(NO_RELU))
def test_norm_layer_clamps_are_not_relus(name):
    fn, x = NO_RELU[name]()
    jaxpr = str(jax.make_jaxpr(fn)(x))
    if name not in ("linen_rmsnorm_gelu_mlp",):  # flax's RMSNorm has no clamp at all
        assert " max " in jaxpr  # the clamp is there; it is just not a ReLU
    assert_refused(fn, x)
    # Plain gradients, the suggested alternative, work.
    assert np.all(np.isfinite(np.asarray(gcj.gradients(fn, x, 0))))


def test_guided_grad_cam_refuses_a_layernorm_gelu_tap():
    module, x = LinenCNN("layer"), X_IMG
    variables = module.init(jax.random.key(0), x)
    tap = gcj.linen_tap(module, variables, "Conv_0")
    with pytest.raises(ValueError, match="no ReLU"):
        gcj.guided_grad_cam(tap, x, 0)


@pytest.fixture(scope="module")
def hf_vit():
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=5,
    )
    return transformers.FlaxViTForImageClassification(config, seed=0)


def test_hugging_face_vit_is_refused(hf_vit):
    x = np.random.default_rng(6).normal(size=(2, 3, 32, 32)).astype(np.float32)  # pixel_values: NCHW
    assert_refused(lambda x: hf_vit(pixel_values=x, params=hf_vit.params).logits, x)


def test_equimo_convnext_is_refused():
    models = pytest.importorskip("equimo.models")
    net = models.ConvNeXt(depths=[1, 1, 1, 1], dims=[8, 8, 8, 8], num_classes=5, key=jax.random.key(7))
    x = np.random.default_rng(7).normal(size=(2, 3, 32, 32)).astype(np.float32)  # (C, H, W) per example
    assert_refused(jax.vmap(lambda xi: net(xi, inference=True)), x)


# ------------------------------------------------------------------ LayerNorm and real ReLUs


class Mixed(nn.Module):
    """conv -> LayerNorm -> act -> conv -> GroupNorm -> act6 -> pool -> LayerNorm -> act -> dense."""

    act: object = jax.nn.relu
    act6: object = jax.nn.relu6

    @nn.compact
    def __call__(self, x):
        h = self.act(nn.LayerNorm()(nn.Conv(6, (3, 3))(x)))
        h = self.act6(3.0 * nn.GroupNorm(num_groups=2)(nn.Conv(6, (3, 3))(h)))
        h = self.act(nn.LayerNorm()(h.mean(axis=(1, 2))))
        return nn.Dense(4)(h)


@pytest.mark.parametrize(
    "explainer,relu,relu6",
    [
        (gcj.guided_backprop, gcj.guided_relu, gcj.guided_relu6),
        (gcj.deconvnet, gcj.deconv_relu, gcj.deconv_relu6),
    ],
    ids=["guided", "deconvnet"],
)
def test_layernorm_with_relus_gets_the_rule_at_the_relus_only(explainer, relu, relu6):
    x = X_IMG
    variables = Mixed().init(jax.random.key(8), x)
    model = lambda x: Mixed().apply(variables, x)  # noqa: E731
    by_hand = lambda x: Mixed(act=relu, act6=relu6).apply(variables, x)  # noqa: E731
    assert count(model, x) == 3  # the three activations; not the three norm layers' clamps
    target = np.array([1, 3])
    got = np.asarray(explainer(model, x, target))
    expected = np.asarray(gcj.gradients(by_hand, x, target))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
    plain = np.asarray(gcj.gradients(model, x, target))
    assert not np.allclose(plain, expected, atol=1e-3 * np.abs(expected).max())  # the rule mattered


def test_equinox_layernorm_with_relu():
    k1, k2 = jax.random.split(jax.random.key(9))
    lin1, norm, lin2 = eqx.nn.Linear(12, 16, key=k1), eqx.nn.LayerNorm(16), eqx.nn.Linear(16, 4, key=k2)

    def net(act):
        return jax.vmap(lambda x: lin2(act(norm(lin1(x)))))

    assert count(net(jax.nn.relu), X_VEC) == 1
    got = gcj.guided_backprop(net(jax.nn.relu), X_VEC, 2)
    expected = gcj.gradients(net(gcj.guided_relu), X_VEC, 2)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ what still counts


W12 = jnp.asarray(np.random.default_rng(10).normal(size=(12, 12)).astype(np.float32))


@pytest.mark.parametrize(
    "fn",
    [
        lambda x: jax.nn.relu(x @ W12),
        lambda x: jnp.clip(x @ W12, 0, 6),
        lambda x: jax.nn.relu(x.mean(axis=-1, keepdims=True)) * x,  # after a pool
        lambda x: jax.nn.relu(x.mean(axis=0) @ W12) * x,  # a squeeze-and-excitation block
        lambda x: jax.nn.relu(1.0 - jnp.sum((x - W12[0]) ** 2, -1, keepdims=True)) * x,  # a shifted moment
        lambda x: jax.nn.relu(nn.LayerNorm(use_scale=False, use_bias=False).apply({}, x)),  # after a norm
        lambda x: jax.nn.relu((x - x.mean(0)) * jax.lax.rsqrt(jnp.var(x, 0) + 1e-5)),  # a norm written out
    ],
    ids=["dense", "clip", "pool", "squeeze_excite", "shifted_moment", "layernorm_relu", "norm_by_hand"],
)
def test_rectifiers_of_activations_still_count(fn):
    assert count(fn, X_VEC) == 1
    assert gcj.guided_backprop(fn, X_VEC, 0).shape == X_VEC.shape


def test_norm_layers_inside_scan_and_jit():
    norm = nn.LayerNorm()
    variables = norm.init(jax.random.key(0), X_VEC)

    def scanned(act):
        def body(h, _):
            return act(jax.jit(lambda h: norm.apply(variables, h))(h) @ W12), None

        return lambda x: jax.lax.scan(body, x, None, length=2)[0]

    assert count(scanned(jax.nn.gelu), X_VEC) == 0
    assert count(scanned(jax.nn.relu), X_VEC) == 1
