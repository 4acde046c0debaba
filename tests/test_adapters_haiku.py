"""haiku_tap on Haiku's own ResNet18 (random init, 64 px) against a hand-written ``jax.vjp`` Grad-CAM,
and its error messages on a small custom module."""

import functools

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradcam_jax as gcj
from gradcam_jax._haiku import haiku_layers, haiku_tap

LAYER = "res_net18/~/block_group_3"
RAW = {"upsample": False, "normalize": False, "relu": False}


def resnet18_fn(x, is_training):
    return hk.nets.ResNet18(num_classes=10)(x, is_training=is_training)


@pytest.fixture(scope="module")
def resnet():
    net = hk.transform_with_state(resnet18_fn)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 64, 64, 3)), jnp.float32)
    # Jitted: traced once rather than run op by op (much faster to set up on a CPU).
    params, state = jax.jit(net.init, static_argnames="is_training")(
        jax.random.PRNGKey(0), x, is_training=True
    )
    # Haiku zero-initialises the classifier: give it random weights, or every gradient is 0.
    rng = np.random.default_rng(1)
    head = params["res_net18/~/logits"]
    params = {
        **params,
        "res_net18/~/logits": {k: jnp.asarray(rng.normal(size=v.shape), v.dtype) for k, v in head.items()},
    }
    # One training-mode pass fills the batch-norm moving averages (they start at zero).
    _, state = jax.jit(net.apply, static_argnames="is_training")(params, state, None, x, is_training=True)
    return net, params, state, x


def reference_grad_cam(net, params, state, x, cotangent):
    """Grad-CAM by hand: A recorded with an interceptor, the head (mean + logits) written out."""
    maps, scores, head_scores = _reference(net, params, state, x, cotangent)
    np.testing.assert_allclose(np.asarray(head_scores), np.asarray(scores), rtol=1e-5, atol=1e-5)
    return np.asarray(maps), np.asarray(scores)


@functools.partial(jax.jit, static_argnums=0)
def _reference(net, params, state, x, cotangent):
    recorded = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and context.module.module_name == LAYER:
            recorded.append(out)
        return out

    with hk.intercept_methods(record):
        scores, _ = net.apply(params, state, None, x, is_training=False)
    (a,) = recorded
    w, b = params["res_net18/~/logits"]["w"], params["res_net18/~/logits"]["b"]
    head = lambda a: jnp.mean(a, axis=(1, 2)) @ w + b
    head_scores, pull = jax.vjp(head, a)
    (da,) = pull(cotangent)
    return jnp.sum(jnp.mean(da, axis=(1, 2), keepdims=True) * a, axis=-1), scores, head_scores


def one_hot(classes):
    return jax.nn.one_hot(jnp.asarray(classes), 10)


def test_layers_are_listed_in_call_order(resnet):
    net, params, state, x = resnet
    names = haiku_layers(net, params, x, state=state, is_training=False)
    assert names[0] == "res_net18"
    assert names.index("res_net18/~/block_group_2") < names.index(LAYER) < names.index("res_net18/~/logits")
    assert all(not n.endswith("average") for n in names)  # methods other than __call__ are not listed


def test_grad_cam_equals_hand_written_vjp_for_every_target_kind(resnet):
    net, params, state, x = resnet
    tap = haiku_tap(net, params, LAYER, state=state, is_training=False)
    assert tap(x)[1].shape == (2, 2, 2, 512)
    classes = np.array([3, 7])
    ref, scores = reference_grad_cam(net, params, state, x, one_hot(classes))
    maps = gcj.grad_cam(tap, x, classes, **RAW)
    assert maps.shape == (2, 2, 2)
    assert np.abs(np.asarray(maps) - ref).max() <= 1e-5

    top, _ = reference_grad_cam(net, params, state, x, one_hot(scores.argmax(-1)))
    assert np.abs(np.asarray(gcj.grad_cam(tap, x, None, **RAW)) - top).max() <= 1e-5
    five, _ = reference_grad_cam(net, params, state, x, one_hot([5, 5]))
    assert np.abs(np.asarray(gcj.grad_cam(tap, x, 5, **RAW)) - five).max() <= 1e-5

    multi = np.array([[1, 4], [2, 9]])
    both = np.asarray(gcj.grad_cam(tap, x, multi, **RAW))
    assert both.shape == (2, 2, 2, 2)
    for k in range(2):
        ref_k, _ = reference_grad_cam(net, params, state, x, one_hot(multi[:, k]))
        assert np.abs(both[:, k] - ref_k).max() <= 1e-5


def test_maps_are_differentiable_with_respect_to_the_params(resnet):
    net, params, state, x = resnet
    tap = haiku_tap(net, params, LAYER, state=state, is_training=False)
    assert jax.tree.structure(tap.params) == jax.tree.structure((params, state))
    loss = lambda p: gcj.grad_cam(tap.with_params((p, state)), x, 3, **RAW).sum()
    grads = jax.jit(jax.grad(loss))(params)
    leaves = [np.asarray(g) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(g).all() for g in leaves)
    assert sum(float(np.abs(g).sum()) for g in leaves) > 0


def test_guided_backprop_and_score_cam_run(resnet):
    net, params, state, x = resnet
    tap = haiku_tap(net, params, LAYER, state=state, is_training=False)
    guided = np.asarray(gcj.guided_backprop(lambda x: tap(x)[0], x, 3))
    assert guided.shape == x.shape and np.isfinite(guided).all() and np.abs(guided).sum() > 0
    maps = np.asarray(gcj.score_cam(tap, x, top_n=4))  # 4 masked passes, not 512
    assert maps.shape == (2, 64, 64) and np.isfinite(maps).all()


def test_building_the_same_tap_twice_reuses_the_compiled_kernel(resnet):
    net, params, state, x = resnet
    first = haiku_tap(net, params, LAYER, state=state, is_training=False)
    again = haiku_tap(net, params, LAYER, state=state, is_training=False)
    assert first.apply == again.apply and hash(first.apply) == hash(again.apply)
    assert (
        first.apply
        != haiku_tap(net, params, "res_net18/~/block_group_2", state=state, is_training=False).apply
    )


# --------------------------------------------------------------------------------------------
# A small custom module: a shared layer, unknown layers, a non-array output, rng handling


class SharedConvNet(hk.Module):
    """``shared`` is applied twice; ``pair`` returns a tuple."""

    def __call__(self, x):
        shared = hk.Conv2D(3, 3, name="shared")
        h = jax.nn.relu(shared(jax.nn.relu(shared(x))))
        h = Pair(name="pair")(h)[0]
        h = jax.nn.relu(hk.Conv2D(4, 3, name="conv")(h))
        return hk.Linear(5, name="head")(jnp.mean(h, axis=(1, 2)))


class Pair(hk.Module):
    def __call__(self, x):
        return x, x


@pytest.fixture(scope="module")
def small():
    net = hk.without_apply_rng(hk.transform(lambda x: SharedConvNet(name="net")(x)))
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 8, 8, 3)), jnp.float32)
    return net, jax.jit(net.init)(jax.random.PRNGKey(0), x), x


def test_a_module_called_twice_asks_for_call(small):
    net, params, x = small
    assert haiku_layers(net, params, x).count("net/shared") == 2
    with pytest.raises(ValueError, match=r"called 2 times.*call=i"):
        haiku_tap(net, params, "net/shared")(x)
    first, second = (haiku_tap(net, params, "net/shared", call=i)(x)[1] for i in (0, 1))
    assert first.shape == second.shape == (2, 8, 8, 3)
    assert not np.allclose(first, second)
    with pytest.raises(ValueError, match=r"call=2 asked for.*only 2 time"):
        haiku_tap(net, params, "net/shared", call=2)(x)


def test_an_unknown_module_lists_the_modules_called_in_order(small):
    net, params, x = small
    with pytest.raises(ValueError, match="not called") as info:
        haiku_tap(net, params, "net/conv_9")(x)
    assert "net, net/shared, net/shared, net/pair, net/conv, net/head" in str(info.value)


def test_a_module_with_a_non_array_output_is_refused(small):
    net, params, x = small
    with pytest.raises(ValueError, match="returns tuple, not an array"):
        haiku_tap(net, params, "net/pair")(x)


def test_rng_handling_for_each_kind_of_transform(small):
    net, params, x = small
    with pytest.raises(TypeError, match="without_apply_rng"):
        haiku_tap(net, params, "net/conv", rng=jax.random.PRNGKey(0))
    with pytest.raises(TypeError, match="transform_with_state"):
        haiku_tap(net, params, "net/conv", state={})
    expected = haiku_tap(net, params, "net/conv")(x)
    with_rng = hk.transform(lambda x: SharedConvNet(name="net")(x))
    for kwargs in ({}, {"rng": jax.random.PRNGKey(1)}):
        got = haiku_tap(with_rng, params, "net/conv", **kwargs)(x)
        np.testing.assert_allclose(np.asarray(got[0]), np.asarray(expected[0]), rtol=1e-6)
    stateful = hk.without_apply_rng(hk.transform_with_state(lambda x: SharedConvNet(name="net")(x)))
    got = haiku_tap(stateful, params, "net/conv")(x)  # state=None: an empty state
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(expected[1]), rtol=1e-6)
    with pytest.raises(TypeError, match="hk.transform"):
        haiku_tap(lambda x: x, params, "net/conv")
