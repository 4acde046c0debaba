"""Third-party model classes, built from their own packages, as ``--model third_party_models:FACTORY``
(tests/test_third_party_cli.py).

Each factory returns a :class:`ThirdPartyModel` following ``gradcam_jax.cli.models.ExplainableModel``
(``preprocess``, ``tap``, ``logits``, ``class_names``, ``tap_at``, ``default_layer``, ``input_size``,
``name``) around a tiny, randomly initialised model:

- ``hf_resnet``: Hugging Face ``FlaxResNetForImageClassification`` (``gcj.hf_tap``); its input is
  channels-first ``pixel_values`` (``layout = "NCHW"``: run ``explain-dir`` with ``--layout NCHW``);
- ``hf_vit``: Hugging Face ``FlaxViTForImageClassification``, tapped at the last block's
  ``layernorm_before`` (NCHW too). Its tap drops the class token itself (:func:`patch_tokens`),
  so its maps equal ``grad_cam(..., drop_tokens=1)`` of the plain ``hf_tap``
  (:meth:`ViTModel.token_tap_at`); ``hf_vit_tokens`` keeps the token tap, for
  ``explain-dir --drop-tokens 1``;
- ``haiku_resnet18``: ``haiku.nets.ResNet18`` (``transform_with_state``, a non-zero head);
- ``keras_cnn``: a Keras 3 ``Sequential`` CNN on the JAX backend;
- ``equimo_convnext``: equimo's ConvNeXt (an Equinox model zoo);
- ``nnx_cnn``: the CNN of the Flax NNX documentation.

Weights are NumPy draws into the shapes each model declares (``jax.eval_shape``) where the
framework's own initialiser would compile op by op; inputs are 32 x 32, five classes.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from functools import partial
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "jax")  # before keras is imported (keras_cnn)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import gradcam_jax as gcj  # noqa: E402

SIZE = 32
CLASS_NAMES = ("ant", "bee", "cat", "dog", "eel")
VIT_LAYER = "vit/encoder/layer/1/layernorm_before"  # the last block's (normalised) input


@dataclasses.dataclass(eq=False)
class ThirdPartyModel:
    """A model for ``--model``: ``make_tap(layer) -> tap`` and ``forward(x) -> logits`` around a
    third-party model; ``layout`` is the layout ``preprocess`` returns (``None``: channels-last)."""

    name: str
    default_layer: str
    make_tap: Callable[[str], Any]
    forward: Callable[[Any], Any]
    layout: str | None = None
    class_names: tuple[str, ...] = CLASS_NAMES
    input_size: int = SIZE

    def __post_init__(self):
        self.tap = self.tap_at(self.default_layer)

    def preprocess(self, images):
        """uint8 ``(H, W, 3)`` or ``(B, H, W, 3)`` -> float32 ``(B, 32, 32, 3)`` in [-1, 1]
        (``(B, 3, 32, 32)`` for an NCHW model); jax.numpy only, so it traces under ``jit``."""
        x = jnp.asarray(images, jnp.float32)
        x = x[None] if x.ndim == 3 else x
        if x.shape[1:3] != (SIZE, SIZE):
            x = jax.image.resize(x, (x.shape[0], SIZE, SIZE, x.shape[-1]), method="bilinear")
        x = x / 127.5 - 1.0
        return jnp.transpose(x, (0, 3, 1, 2)) if self.layout == "NCHW" else x

    def logits(self, x):
        return self.forward(x)

    def tap_at(self, layer: str):
        return self.make_tap(layer)


def random_like(shapes, seed: int, *, out_first: bool = False, ones: bool = False):
    """Arrays of the declared shapes: fan-in scaled kernels (``out_first``: the output axis is
    the first, as in Equinox; else the last, as in Flax and Haiku), positive variances, scales
    near one, small biases (``ones``: every vector near one, so every residual branch counts)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if not isinstance(leaf, jax.ShapeDtypeStruct):
            return leaf
        name, shape = jax.tree_util.keystr(path), leaf.shape
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            return jnp.zeros(shape, leaf.dtype)
        if "var" in name:  # batch-norm variances (Flax batch_stats, Haiku var_ema)
            value = rng.uniform(0.5, 1.5, shape)
        elif int(np.prod(shape)) == max(shape, default=1):  # a vector, whatever its singleton axes
            near_one = ones or name.endswith(("scale']", "scale"))
            value = (1.0 if near_one else 0.0) + (0.3 if ones else 0.1) * rng.normal(size=shape)
        else:
            fan_in = np.prod(shape[1:]) if out_first else np.prod(shape[:-1])
            value = rng.normal(size=shape) / np.sqrt(fan_in)
        return jnp.asarray(value.astype(leaf.dtype))

    return jax.tree_util.tree_map_with_path(draw, shapes)


# --------------------------------------------------------------------------------------------
# Hugging Face Flax


def hf_resnet() -> ThirdPartyModel:
    """``FlaxResNetForImageClassification`` (4 stages, 8-32 channels), tapped after stage 1 (4 x 4)."""
    from transformers import FlaxResNetForImageClassification, ResNetConfig

    config = ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1], num_labels=len(CLASS_NAMES)
    )
    model = FlaxResNetForImageClassification(config, input_shape=(1, SIZE, SIZE, 3), _do_init=False)
    params = random_like(model.params_shape_tree, 0)
    return ThirdPartyModel(
        name="hf_resnet",
        default_layer="resnet/encoder/stages/1",
        make_tap=lambda layer: gcj.hf_tap(model, layer, params=params),
        forward=lambda x: model(x, params=params).logits,
        layout="NCHW",
    )


def patch_tokens(tap: gcj.Tap, drop: int = 1) -> gcj.Tap:
    """``tap`` whose activation is the token activation without its ``drop`` leading tokens (the
    class token): what ``drop_tokens=drop`` does inside the explainers, done in the tap. Edits
    reach the remaining tokens only."""
    inner = tap.apply

    def apply(params, x, edit):
        def edit_patches(a):
            return jnp.concatenate([a[:, :drop], edit(a[:, drop:])], axis=1)

        scores, a = inner(params, x, None if edit is None else edit_patches)
        return scores, a[:, drop:]

    return gcj.Tap(apply, tap.params, tap.name)


@dataclasses.dataclass(eq=False)
class ViTModel(ThirdPartyModel):
    """A ViT: ``tap_at`` drops the class token (:func:`patch_tokens`); ``token_tap_at`` does not."""

    make_token_tap: Callable[[str], Any] | None = None

    def token_tap_at(self, layer: str):
        assert self.make_token_tap is not None
        return self.make_token_tap(layer)


def hf_vit() -> ViTModel:
    """``FlaxViTForImageClassification``: 32 px, 8 px patches (4 x 4 tokens and a class token)."""
    from transformers import FlaxViTForImageClassification, ViTConfig

    config = ViTConfig(
        image_size=SIZE,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=len(CLASS_NAMES),
    )
    model = FlaxViTForImageClassification(config, _do_init=False)
    params = random_like(model.params_shape_tree, 1)
    token_tap = partial(gcj.hf_tap, model, params=params)
    return ViTModel(
        name="hf_vit",
        default_layer=VIT_LAYER,
        make_tap=lambda layer: patch_tokens(token_tap(layer)),
        forward=lambda x: model(x, params=params).logits,
        layout="NCHW",
        make_token_tap=token_tap,
    )


def hf_vit_tokens() -> ViTModel:
    """The same ViT whose tap keeps the class token: run ``explain-dir`` with ``--drop-tokens 1``."""
    vit = hf_vit()
    assert vit.make_token_tap is not None
    return dataclasses.replace(vit, name="hf_vit_tokens", make_tap=vit.make_token_tap)


# --------------------------------------------------------------------------------------------
# Haiku, Keras, Equinox (equimo), Flax NNX


def _resnet18(x, is_training):
    import haiku as hk

    return hk.nets.ResNet18(num_classes=len(CLASS_NAMES))(x, is_training=is_training)


def haiku_resnet18() -> ThirdPartyModel:
    """``haiku.nets.ResNet18``, every parameter and batch-norm statistic random (the head too:
    Haiku zero-initialises it), tapped after block group 1 (4 x 4 at 32 px)."""
    import haiku as hk

    net = hk.transform_with_state(_resnet18)
    spec = jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.float32)
    shapes = jax.eval_shape(partial(net.init, is_training=True), jax.random.key(0), spec)
    params, state = random_like(shapes, 2)
    return ThirdPartyModel(
        name="haiku_resnet18",
        default_layer="res_net18/~/block_group_1",
        make_tap=lambda layer: gcj.haiku_tap(net, params, layer, state=state, is_training=False),
        forward=lambda x: net.apply(params, state, None, x, is_training=False)[0],
    )


def keras_cnn() -> ThirdPartyModel:
    """A Keras 3 ``Sequential`` CNN (Keras's own random init), tapped at its second convolution."""
    import keras

    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [
            keras.Input((SIZE, SIZE, 3)),
            keras.layers.Conv2D(8, 3, activation="relu", name="conv1"),
            keras.layers.MaxPooling2D(2, name="pool1"),
            keras.layers.Conv2D(16, 3, activation="relu", name="conv2"),
            keras.layers.GlobalAveragePooling2D(name="pool2"),
            keras.layers.Dense(len(CLASS_NAMES), name="dense"),
        ],
        name="keras_cnn",
    )
    return ThirdPartyModel(
        name="keras_cnn",
        default_layer="conv2",
        make_tap=lambda layer: gcj.keras_tap(model, layer),
        forward=lambda x: model(x, training=False),
    )


def _block(index: str):
    """``where=`` for equinox_tap: the ConvNeXt stage ``blocks[index]``."""
    return lambda m: m.blocks[int(index)]


def equimo_convnext() -> ThirdPartyModel:
    """equimo's ConvNeXt (4 stages, 8-32 channels), tapped after stage ``blocks.1`` (4 x 4)."""
    import equinox as eqx
    from equimo.models.convnext import ConvNeXt

    dims = dict(depths=[1, 1, 1, 1], dims=[8, 16, 16, 32], num_classes=len(CLASS_NAMES))
    shapes = eqx.filter_eval_shape(ConvNeXt, 3, **dims, key=jax.random.key(0))
    model = random_like(shapes, 4, out_first=True, ones=True)
    return ThirdPartyModel(
        name="equimo_convnext",
        default_layer="blocks.1",
        make_tap=lambda layer: gcj.equinox_tap(model, _block(layer.rpartition(".")[2])),
        forward=lambda x: jax.vmap(model)(jnp.moveaxis(x, -1, 1)),  # equimo takes one (C, H, W) image
    )


def _nnx_cnn():
    """The CNN of the Flax NNX documentation's first example, for 32 x 32 x 3 images."""
    from flax import nnx

    class CNN(nnx.Module):
        def __init__(self, *, rngs: nnx.Rngs):
            self.conv1 = nnx.Conv(3, 8, kernel_size=(3, 3), rngs=rngs)
            self.conv2 = nnx.Conv(8, 16, kernel_size=(3, 3), rngs=rngs)
            self.avg_pool = partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
            self.linear1 = nnx.Linear(16 * 8 * 8, 32, rngs=rngs)
            self.linear2 = nnx.Linear(32, len(CLASS_NAMES), rngs=rngs)

        def __call__(self, x):
            x = self.avg_pool(nnx.relu(self.conv1(x)))
            x = self.avg_pool(nnx.relu(self.conv2(x)))
            x = x.reshape(x.shape[0], -1)
            x = nnx.relu(self.linear1(x))
            return self.linear2(x)

    return CNN(rngs=nnx.Rngs(5))


def nnx_cnn() -> ThirdPartyModel:
    """The Flax-docs NNX CNN (NNX's own random init), tapped at ``conv2`` (16 x 16)."""
    model = _nnx_cnn()
    return ThirdPartyModel(
        name="nnx_cnn",
        default_layer="conv2",
        make_tap=lambda layer: gcj.nnx_tap(model, layer),
        forward=lambda x: model(x),
    )


#: The factories, by name (``--model third_party_models:NAME``).
FACTORIES = ("hf_resnet", "hf_vit", "haiku_resnet18", "keras_cnn", "equimo_convnext", "nnx_cnn")
