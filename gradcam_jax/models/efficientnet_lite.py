"""EfficientNet-Lite in Flax Linen, channels-last, with PyTorch-checkpoint conversion.

EfficientNet-Lite (Tan & Le, 2019; the "Lite" variants of the TensorFlow TPU repository) is
EfficientNet without squeeze-and-excitation, with ReLU6 instead of swish, and with the stem
(32 channels) and head (1280 channels) left unscaled. The network is:

    stem      3x3 conv, stride 2 -> BN -> ReLU6                        (224 -> 112, 32 ch)
    blocks_i  16 inverted-residual (MBConv) blocks in 7 stages:
                [1x1 expand conv -> BN -> ReLU6]   (absent when the expand ratio is 1)
                kxk depthwise conv, stride s -> BN -> ReLU6
                1x1 project conv -> BN
                + input, when stride 1 and channels in == out (stochastic depth in training)
    head      1x1 conv -> BN -> ReLU6                                  (7 x 7 x 1280)
    (global average pool, dropout 0.2)
    fc        dense, 1000 ImageNet classes

Convolutions pad the TensorFlow "SAME" way — output size ``ceil(n / stride)``, total padding
``max((out - 1) * stride + k - n, 0)``, the smaller half before and the larger half after —
which is what the TensorFlow original does and what the PyTorch port reproduces (it fixes
these pads for 224 x 224 inputs at construction; computing them from the input's shape, as
here, is the same at 224 and matches TensorFlow at other sizes). BatchNorm uses
``epsilon = 1e-3`` and a running-average decay of 0.99 (Flax's ``momentum`` is that decay; the
PyTorch port's ``momentum = 0.01`` is one minus it).

Every stage of the network is a named module, so layer paths read naturally: ``"stem"``,
``"blocks_7"``, ``"blocks_7/depthwise"``, ``"blocks_7/depthwise/conv"``, ``"head"``, ``"fc"``.
Each ``ConvBN`` module's output is after its activation, so tapping ``"head"`` gives the final
7 x 7 x 1280 feature map after ReLU6 — the usual Grad-CAM layer — and ``"head/bn"`` the same
before the ReLU6.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ._blocks import ConvBNAct, same_padding
from .torch_names import TorchNames

__all__ = [
    "EfficientNetLite",
    "ConvBN",
    "MBConv",
    "LITE0_STAGES",
    "same_padding",
    "torch_state_dict_to_flax",
    "random_variables",
]

#: One stage: (repeats, kernel, stride of the first block, expand ratio, channels in, channels out).
Stage = tuple[int, int, int, int, int, int]

LITE0_STAGES: tuple[Stage, ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)

BN_EPSILON = 1e-3
BN_DECAY = 0.99


class ConvBN(ConvBNAct):
    """Convolution (no bias, TensorFlow "SAME" padding) -> BatchNorm (epsilon 1e-3) -> optional ReLU6.

    Submodules ``conv`` and ``bn``; the module's output is after the activation
    (:class:`~gradcam_jax.models._blocks.ConvBNAct` with EfficientNet-Lite's constants).
    """

    padding: str = "same"
    bn_epsilon: float = BN_EPSILON
    bn_decay: float = BN_DECAY


class MBConv(nn.Module):
    """Inverted residual block: [expand] -> depthwise -> project (+ input)."""

    features_in: int
    features_out: int
    kernel: int
    stride: int
    expand_ratio: int
    drop_path_rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        hidden = self.features_in * self.expand_ratio
        h = x
        if self.expand_ratio != 1:
            h = ConvBN(hidden, 1, name="expand")(h, train)
        h = ConvBN(hidden, self.kernel, self.stride, depthwise=True, name="depthwise")(h, train)
        h = ConvBN(self.features_out, 1, relu6=False, name="project")(h, train)
        if self.stride == 1 and self.features_in == self.features_out:
            if self.drop_path_rate > 0:
                # Stochastic depth: drop the whole residual branch per example.
                h = nn.Dropout(
                    self.drop_path_rate, broadcast_dims=(1, 2, 3), deterministic=not train, name="drop_path"
                )(h)
            h = h + x
        return h


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite for ``(B, H, W, 3)`` inputs; returns ``(B, num_classes)`` logits.

    The defaults are EfficientNet-Lite0. ``train=True`` uses batch statistics (pass
    ``mutable=["batch_stats"]``), dropout and stochastic depth (pass a ``"dropout"`` rng).
    """

    stages: Sequence[Stage] = LITE0_STAGES
    num_classes: int = 1000
    stem_features: int = 32
    head_features: int = 1280
    dropout_rate: float = 0.2
    drop_connect_rate: float = 0.2

    @nn.compact
    def __call__(self, x, train: bool = False):
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(
                f"EfficientNetLite takes channels-last RGB batches (B, H, W, 3); got shape "
                f"{tuple(x.shape)}. Use the model's preprocess() on uint8 images."
            )
        x = ConvBN(self.stem_features, 3, 2, name="stem")(x, train)
        n_blocks = sum(stage[0] for stage in self.stages)
        index = 0
        for repeats, kernel, stride, expand, c_in, c_out in self.stages:
            for r in range(repeats):
                x = MBConv(
                    c_in if r == 0 else c_out,
                    c_out,
                    kernel,
                    stride if r == 0 else 1,
                    expand,
                    drop_path_rate=self.drop_connect_rate * index / n_blocks,
                    name=f"blocks_{index}",
                )(x, train)
                index += 1
        x = ConvBN(self.head_features, 1, name="head")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dropout(self.dropout_rate, deterministic=not train, name="dropout")(x)
        return nn.Dense(self.num_classes, name="fc")(x)


# --------------------------------------------------------------------------------------------
# Weights: PyTorch port's state dict -> Flax variables
# --------------------------------------------------------------------------------------------


def torch_state_dict_to_flax(
    state: Mapping[str, np.ndarray], stages: Sequence[Stage] = LITE0_STAGES
) -> dict[str, dict]:
    """Map the PyTorch port's state dict (``_conv_stem.weight`` ...) to Flax variables.

    Returns ``{"params": ..., "batch_stats": ...}`` for :class:`EfficientNetLite`, as nested
    dicts of float32 NumPy arrays. Every tensor of the state dict except the BatchNorm step
    counters must be used, and every Flax variable filled: a mismatch raises ``ValueError``.
    """
    names = TorchNames(
        state, source="The checkpoint", kind="an EfficientNet-Lite state dict", layout="this architecture"
    )

    def conv_bn(conv_key: str, bn_key: str) -> tuple[dict, dict]:
        conv = names.conv(conv_key)
        bn_params, bn_stats = names.bn(bn_key)
        return {"conv": conv, "bn": bn_params}, {"bn": bn_stats}

    params: dict[str, dict] = {}
    stats: dict[str, dict] = {}
    params["stem"], stats["stem"] = conv_bn("_conv_stem", "_bn0")
    index = 0
    for repeats, _kernel, _stride, expand, _cin, _cout in stages:
        for _ in range(repeats):
            src = f"_blocks.{index}."
            parts = [("depthwise", "_depthwise_conv", "_bn1"), ("project", "_project_conv", "_bn2")]
            if expand != 1:
                parts.insert(0, ("expand", "_expand_conv", "_bn0"))
            block_p: dict[str, dict] = {}
            block_s: dict[str, dict] = {}
            for name, conv, bn in parts:
                block_p[name], block_s[name] = conv_bn(src + conv, src + bn)
            params[f"blocks_{index}"], stats[f"blocks_{index}"] = block_p, block_s
            index += 1
    params["head"], stats["head"] = conv_bn("_conv_head", "_bn1")
    params["fc"] = names.dense("_fc")
    names.check_all_used()
    return {"params": params, "batch_stats": stats}


def random_variables(module, seed: int = 0, size: int = 224) -> dict[str, dict]:
    """Random variables for ``module``, drawn with NumPy in a fraction of a second.

    Convolution and dense kernels are He-normal (``std = sqrt(2 / fan_in)``), biases zero,
    BatchNorm scales one with running mean 0 and variance 1. Flax's own ``module.init`` gives
    the same tree but compiles the random initialisers of 4.7M parameters, which takes many
    seconds on a CPU; this is meant for tests and demos without the pretrained weights.
    """
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.float32))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = getattr(path[-1], "key", str(path[-1]))
        shape, dtype = leaf.shape, leaf.dtype
        if name == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(dtype)
        if name in ("scale", "var"):
            return np.ones(shape, dtype)
        return np.zeros(shape, dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)
