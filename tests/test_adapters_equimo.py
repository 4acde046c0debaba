"""equinox_tap on an Equinox model zoo's own class: equimo's ConvNeXt (tiny config, random weights).

equimo models take one channels-first example ``(C, H, W)``. The maps are checked against a
Grad-CAM written here by hand from the model's own blocks (a ``jax.vjp`` of the layers above
the tapped stage), for channels-last input (``channels_first=True``, the default) and for
channels-first input (``channels_first=False, activation_layout="NCHW"``, explainers called
with ``layout="NCHW"``). The weights are NumPy draws into the shapes equimo's constructor
declares (``eqx.filter_eval_shape``): its own initialiser runs op by op for ~15 s.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradcam_jax as gcj

B = 2
KEY = jax.random.key(0)


@pytest.fixture(scope="module")
def convnext():
    from equimo.models.convnext import ConvNeXt

    shapes = eqx.filter_eval_shape(
        ConvNeXt, 3, depths=[1, 1, 1, 1], dims=[8, 16, 16, 32], num_classes=5, key=KEY
    )
    rng = np.random.default_rng(0)

    def draw(leaf):
        if not isinstance(leaf, jax.ShapeDtypeStruct):
            return leaf
        if len(leaf.shape) < 2:  # biases, norm weights, layer scales: near one, so every branch counts
            return jnp.asarray((1 + 0.3 * rng.normal(size=leaf.shape)).astype(leaf.dtype))
        scale = 1 / np.sqrt(np.prod(leaf.shape[1:]))
        return jnp.asarray((rng.normal(size=leaf.shape) * scale).astype(leaf.dtype))

    return jax.tree_util.tree_map(draw, shapes)


def images(seed=0):
    return np.random.default_rng(seed).normal(size=(B, 64, 64, 3)).astype(np.float32)


def reference(model):
    """``(x_nchw, target (B,)) -> raw Grad-CAM`` at ``model.blocks[2]``, from the model's own parts."""
    keys = jax.random.split(jax.random.key(42), len(model.blocks) + 1)[1:]

    def features(x):
        for block, key in zip(model.blocks[:3], keys[:3], strict=True):
            x = block(x, key=key)
        return x

    def head(a):
        a = model.blocks[3](a, key=keys[3])
        return model.head(model.norm(a.mean((1, 2))))

    @jax.jit
    def grad_cam(x, target):
        a = jax.vmap(features)(x)
        logits, pullback = jax.vjp(jax.vmap(head), a)
        (da,) = pullback(jax.nn.one_hot(target, logits.shape[-1]))
        return (da.mean(axis=(2, 3))[:, :, None, None] * a).sum(1)  # (B, h, w)

    return grad_cam


def raw(tap, x, target, **kwargs):
    return np.asarray(gcj.grad_cam(tap, x, target, upsample=False, normalize=False, relu=False, **kwargs))


def test_grad_cam_matches_hand_written_vjp_in_both_layouts(convnext):
    x = images()
    x_nchw = x.transpose(0, 3, 1, 2)
    expected = np.asarray(reference(convnext)(x_nchw, jnp.asarray([1, 3])))
    assert expected.shape == (B, 4, 4) and np.abs(expected).max() > 1e-2, np.abs(expected).max()
    where = lambda m: m.blocks[2]
    tap = gcj.equinox_tap(convnext, where)  # channels-last input, transposed for the model
    assert np.abs(raw(tap, x, jnp.asarray([1, 3])) - expected).max() <= 1e-5
    # Channels-first input as given: activation_layout= is the general form of channels_first.
    first = gcj.equinox_tap(convnext, where, channels_first=False, activation_layout="NCHW")
    assert jax.eval_shape(first, x_nchw)[1].shape == (B, 4, 4, 16)  # channels-last for the methods
    assert np.abs(raw(first, x_nchw, jnp.asarray([1, 3]), layout="NCHW") - expected).max() <= 1e-5
    assert gcj.grad_cam(first, x_nchw, 1, layout="NCHW").shape == (B, 64, 64)


def test_every_target_kind(convnext):
    x = images(1)
    x_nchw = jnp.asarray(x.transpose(0, 3, 1, 2))
    ref = reference(convnext)
    tap = gcj.equinox_tap(convnext, lambda m: m.blocks[2])
    top = np.asarray(jax.jit(jax.vmap(convnext))(x_nchw)).argmax(-1)
    for target, classes in ((None, top), (4, [4, 4])):
        want = np.asarray(ref(x_nchw, jnp.asarray(classes)))
        assert np.abs(raw(tap, x, target) - want).max() <= 1e-5, target
    pairs = raw(tap, x, jnp.asarray([[0, 4], [2, 4]]))
    assert pairs.shape == (B, 2, 4, 4)
    assert np.abs(pairs[:, 0] - np.asarray(ref(x_nchw, jnp.asarray([0, 2])))).max() <= 1e-5


def test_params_are_differentiable_and_the_model_is_unchanged(convnext):
    x = images(2)
    leaves = jax.tree_util.tree_leaves(convnext)
    tap = gcj.equinox_tap(convnext, lambda m: m.blocks[2])

    def loss(params):
        return jnp.sum(gcj.grad_cam(tap.with_params(params), x, 1, upsample=False, normalize=False))

    grads = jax.grad(loss)(tap.params)
    stem = [g for g in jax.tree_util.tree_leaves(grads.blocks[0]) if g is not None]
    assert stem and any(float(jnp.abs(g).sum()) > 0 for g in stem)
    assert all(a is b for a, b in zip(leaves, jax.tree_util.tree_leaves(convnext), strict=True))
