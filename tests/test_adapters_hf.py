"""hf_tap on Hugging Face's own Flax classes (ResNet, ViT, CLIP), tiny configs, random weights.

Every map is checked against a Grad-CAM written here by hand: the model is run through its own
``__call__`` (Hugging Face's transposition and variable nesting) under
``flax.linen.intercept_methods``, with the layer's output ``A`` replaced by ``A + delta``; one
``jax.vjp`` in ``delta`` gives ``dA``. Weights are drawn with NumPy into the shapes the model
declares (``_do_init=False``, ``params_shape_tree``): Hugging Face's own initialiser compiles op
by op for ~20 s per model.
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradcam_jax as gcj
from gradcam_jax import _hf

B = 2
RESNET_LAYER = "resnet/encoder/stages/2"
VIT_LAYER = "vit/encoder/layer/1/layernorm_before"  # the last block's (normalised) input
CLIP_LAYER = "vision_model/encoder/layers/1/layer_norm1"


def random_params(shapes, seed=0):
    """Variables of the declared shapes: fan-in scaled kernels, positive variances."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "var":
            return rng.uniform(0.5, 1.5, leaf.shape).astype(leaf.dtype)
        if name == "scale":
            return (1 + 0.1 * rng.normal(size=leaf.shape)).astype(leaf.dtype)
        if len(leaf.shape) >= 2:
            return (rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))).astype(leaf.dtype)
        return (0.3 * rng.normal(size=leaf.shape)).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def resnet():
    from transformers import FlaxResNetForImageClassification, ResNetConfig

    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1], num_labels=5)
    model = FlaxResNetForImageClassification(config, input_shape=(1, 64, 64, 3), _do_init=False)
    return model, random_params(model.params_shape_tree)


@pytest.fixture(scope="module")
def vit():
    from transformers import FlaxViTForImageClassification, ViTConfig

    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=5,
    )
    model = FlaxViTForImageClassification(config, _do_init=False)
    return model, random_params(model.params_shape_tree, seed=1)


@pytest.fixture(scope="module")
def clip():
    from transformers import CLIPConfig, FlaxCLIPModel

    text = dict(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=8,
    )
    vision = dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=2)
    config = CLIPConfig(
        text_config=text, vision_config={**vision, "num_attention_heads": 2}, projection_dim=8
    )
    model = FlaxCLIPModel(config, _do_init=False)
    return model, random_params(model.params_shape_tree, seed=2)


def images(size, seed=0):
    return np.random.default_rng(seed).normal(size=(B, 3, size, size)).astype(np.float32)


def reference_grad_cam(run_model, path, drop_tokens=0):
    """``(x, target) -> (logits, raw Grad-CAM sum_k mean(dA^k) A^k)`` at module ``path``, jitted;
    ``target`` is ``(B,)`` class indices."""
    import flax.linen as nn

    def scores(x, delta):
        seen = {}

        def interceptor(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name == "__call__" and "/".join(context.module.path) == path:
                seen["a"] = out
                out = out + delta
            return out

        with nn.intercept_methods(interceptor):
            return run_model(x), seen["a"]

    @jax.jit
    def reference(x, target):
        shape = jax.eval_shape(scores, x, 0.0)[1].shape
        logits, pullback, a = jax.vjp(lambda d: scores(x, d), jnp.zeros(shape), has_aux=True)
        (da,) = pullback(jax.nn.one_hot(target, logits.shape[-1], dtype=logits.dtype))
        if drop_tokens:  # tokens (B, 1 + n*n, D) -> a grid (B, n, n, D)
            side = int(round((a.shape[1] - drop_tokens) ** 0.5))
            a = a[:, drop_tokens:].reshape(B, side, side, -1)
            da = da[:, drop_tokens:].reshape(B, side, side, -1)
        return logits, (da.mean(axis=(1, 2), keepdims=True) * a).sum(-1)

    return reference


def raw(tap, x, target, **kwargs):
    return np.asarray(gcj.grad_cam(tap, x, target, upsample=False, normalize=False, relu=False, **kwargs))


def test_resnet_grad_cam_matches_hand_written_vjp_for_every_target_kind(resnet):
    model, params = resnet
    x = images(64)
    reference = reference_grad_cam(lambda x: model(x, params=params).logits, RESNET_LAYER)
    logits, expected = reference(x, jnp.asarray([1, 3]))
    top = np.asarray(logits).argmax(-1)
    tap = _hf.hf_tap(model, RESNET_LAYER, params=params)
    got = raw(tap, x, jnp.asarray([1, 3]), layout="NCHW")  # (B,): one class per example
    assert got.shape == (B, 4, 4) and np.abs(expected).max() > 1e-3
    assert np.abs(got - np.asarray(expected)).max() <= 1e-5
    cases = {  # target -> the classes it means for each example
        None: top,  # each example's top class, from the logits hf_tap took by default
        4: [4, 4],
    }
    for target, classes in cases.items():
        want = np.asarray(reference(x, jnp.asarray(classes))[1])
        assert np.abs(raw(tap, x, target, layout="NCHW") - want).max() <= 1e-5, target
    pairs = raw(tap, x, jnp.asarray([[1, 4], [3, 4]]), layout="NCHW")  # (B, K)
    assert pairs.shape == (B, 2, 4, 4)
    assert np.abs(pairs[:, 0] - np.asarray(expected)).max() <= 1e-5


def test_resnet_input_layouts(resnet):
    model, params = resnet
    x = images(64, seed=1)
    tap = _hf.hf_tap(model, RESNET_LAYER, params=params)
    nchw = raw(tap, x, jnp.asarray([1, 3]), layout="NCHW")
    # Images already channels-last: pixel_layout="NHWC" feeds the module as they are.
    nhwc = _hf.hf_tap(model, RESNET_LAYER, params=params, pixel_layout="NHWC")
    np.testing.assert_allclose(raw(nhwc, x.transpose(0, 2, 3, 1), jnp.asarray([1, 3])), nchw, atol=1e-6)
    # Finished maps come back in the input's spatial shape.
    assert gcj.grad_cam(tap, x, 1, layout="NCHW").shape == (B, 64, 64)


def test_resnet_params_are_differentiable_and_guided_backprop_runs(resnet):
    model, params = resnet
    x = images(64, seed=2)
    tap = _hf.hf_tap(model, RESNET_LAYER, params=params)

    def loss(variables):
        return jnp.sum(gcj.grad_cam(tap.with_params(variables), x, 1, layout="NCHW", upsample=False))

    grads = jax.grad(loss)(tap.params)
    assert set(grads) == {"params", "batch_stats"}
    stem = grads["params"]["resnet"]["embedder"]["embedder"]["convolution"]["kernel"]
    assert float(jnp.abs(stem).sum()) > 0
    guided = np.asarray(gcj.guided_backprop(tap, x, 1))
    assert guided.shape == x.shape and np.isfinite(guided).all() and np.abs(guided).max() > 0


def test_variables_nesting_is_detected_and_model_is_unchanged(resnet, vit):
    model, params = resnet
    leaves = jax.tree_util.tree_leaves(params)
    # Anything with .module and .params: ResNet's params already hold both collections.
    holder = types.SimpleNamespace(module=model.module, params=params)
    tap = _hf.hf_tap(holder, RESNET_LAYER)
    assert set(tap.params) == {"params", "batch_stats"} and tap.params is params
    # ViT's are a bare parameter dict: nested under "params".
    vmodel, vparams = vit
    vtap = _hf.hf_tap(types.SimpleNamespace(module=vmodel.module, params=vparams), VIT_LAYER)
    assert set(vtap.params) == {"params"} and vtap.params["params"] is vparams
    gcj.grad_cam(
        tap, images(64), jnp.asarray([1, 3]), layout="NCHW", upsample=False, normalize=False, relu=False
    )
    assert all(a is b for a, b in zip(leaves, jax.tree_util.tree_leaves(params), strict=True))
    assert holder.module is model.module


def test_errors_name_the_fix(resnet):
    model, params = resnet
    x = images(64)
    with pytest.raises(ValueError, match=r"collection \"batch_stats\".*pass params= with every collection"):
        _hf.hf_tap(model, RESNET_LAYER, params=params["params"])(x)
    with pytest.raises(ValueError, match="_do_init=False.*params="):
        _hf.hf_tap(model, RESNET_LAYER)
    with pytest.raises(TypeError, match="Hugging Face Flax model"):
        _hf.hf_tap(object(), RESNET_LAYER)
    with pytest.raises(ValueError, match=r"'resnet/nope' was not called.*resnet/encoder/stages/2, "):
        jax.eval_shape(_hf.hf_tap(model, "resnet/nope", params=params), x)
    layers = _hf.hf_layers(model, x, params=params)
    assert layers[:3] == ["resnet", "resnet/embedder", "resnet/embedder/embedder"]
    assert RESNET_LAYER in layers and layers[-1] == "classifier/1"


def test_vit_last_block_input_with_drop_tokens(vit):
    model, params = vit
    x = images(32, seed=3)
    reference = reference_grad_cam(lambda x: model(x, params=params).logits, VIT_LAYER, drop_tokens=1)
    _, expected = reference(x, jnp.asarray([2, 2]))
    tap = _hf.hf_tap(model, VIT_LAYER, params=params)
    assert jax.eval_shape(tap, x)[1].shape == (B, 17, 32)
    got = raw(tap, x, 2, layout="NCHW", drop_tokens=1)
    assert got.shape == (B, 4, 4) and np.abs(expected).max() > 1e-3
    assert np.abs(got - np.asarray(expected)).max() <= 1e-5
    assert VIT_LAYER in _hf.hf_layers(model, x, params=params)


def test_clip_image_text_similarity_as_the_target(clip):
    model, params = clip
    x = images(32, seed=4)
    ids = jnp.asarray([[1, 5, 7, 2], [1, 9, 3, 2], [1, 4, 4, 2]], dtype=jnp.int32)  # three texts
    run = lambda x: model(ids, x, params=params).logits_per_image  # (B, 3): one column per text
    reference = reference_grad_cam(run, CLIP_LAYER, drop_tokens=1)
    _, expected = reference(x, jnp.asarray([2, 0]))
    tap = _hf.hf_tap(model, CLIP_LAYER, params=params, input_ids=ids, output="logits_per_image")
    assert jax.eval_shape(tap, x)[0].shape == (B, 3)
    # A callable output: the cosine similarity itself, i.e. logits_per_image / exp(logit_scale).
    cosine = lambda out: out.image_embeds @ out.text_embeds.T
    tap_cos = _hf.hf_tap(model, CLIP_LAYER, params=params, input_ids=ids, output=cosine)
    got = raw(tap_cos, x, jnp.asarray([2, 0]), layout="NCHW", drop_tokens=1)
    assert got.shape == (B, 4, 4) and np.abs(expected).max() > 1e-4
    scale = float(np.exp(params["logit_scale"]))
    assert np.abs(got * scale - np.asarray(expected)).max() <= 1e-5
    # CLIP's output has no logits: the default refuses and lists the fields.
    with pytest.raises(ValueError, match="no 'logits'.*logits_per_image"):
        jax.eval_shape(_hf.hf_tap(model, CLIP_LAYER, params=params, input_ids=ids), x)
