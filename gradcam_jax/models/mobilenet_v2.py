"""MobileNetV2 in Flax Linen, channels-last, in torchvision's layout (and its checkpoint's names).

MobileNetV2 (Sandler et al., CVPR 2018, https://arxiv.org/abs/1801.04381) as torchvision
builds it (``torchvision.models.mobilenet_v2``, width 1.0):

    features_0       3x3 conv, stride 2 -> BN -> ReLU6                     (224 -> 112, 32 ch)
    features_1..17   inverted residual blocks, settings (t, c, n, s) of the paper's table 2:
                       (1, 16, 1, 1) (6, 24, 2, 2) (6, 32, 3, 2) (6, 64, 4, 2)
                       (6, 96, 3, 1) (6, 160, 3, 2) (6, 320, 1, 1)
                     each: [1x1 expand conv -> BN -> ReLU6] (absent when t = 1)
                           3x3 depthwise conv, stride s -> BN -> ReLU6
                           1x1 project conv -> BN (linear bottleneck)
                           + input, when stride 1 and channels in == out
    features_18      1x1 conv -> BN -> ReLU6                               (7 x 7 x 1280)
    (global average pool, dropout 0.2)
    classifier       dense, 1000 ImageNet classes

Convolutions pad symmetrically by ``(k - 1) // 2`` (PyTorch's ``padding=1`` for 3 x 3);
BatchNorm uses torchvision's ``eps = 1e-5``. Module ``features_i`` is torchvision's
``features[i]``, so ``"features_18"`` is the layer pytorch-grad-cam's examples tap
(``model.features[-1]``): the 7 x 7 x 1280 map after its ReLU6.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from ._blocks import ConvBNAct
from .torch_names import TorchNames

__all__ = ["MobileNetV2", "ConvBNReLU6", "InvertedResidual", "SETTINGS", "torch_state_dict_to_flax"]

#: (expand ratio t, channels c, repeats n, first stride s), the paper's table 2.
SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)

BN_EPSILON = 1e-5
BN_DECAY = 0.9  # torchvision's momentum 0.1


class ConvBNReLU6(ConvBNAct):
    """Convolution (no bias, symmetric padding) -> BatchNorm (epsilon 1e-5) -> optional ReLU6.

    Submodules ``conv`` and ``bn``: :class:`~gradcam_jax.models._blocks.ConvBNAct` with
    torchvision's constants.
    """

    padding: str = "symmetric"
    bn_epsilon: float = BN_EPSILON
    bn_decay: float = BN_DECAY


class InvertedResidual(nn.Module):
    """[expand] -> depthwise -> project (+ input): submodules ``expand``, ``depthwise``, ``project``."""

    features_in: int
    features_out: int
    stride: int
    expand_ratio: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        hidden = self.features_in * self.expand_ratio
        h = x
        if self.expand_ratio != 1:
            h = ConvBNReLU6(hidden, 1, name="expand")(h, train)
        h = ConvBNReLU6(hidden, 3, self.stride, depthwise=True, name="depthwise")(h, train)
        h = ConvBNReLU6(self.features_out, 1, relu6=False, name="project")(h, train)
        if self.stride == 1 and self.features_in == self.features_out:
            h = h + x
        return h


class MobileNetV2(nn.Module):
    """MobileNetV2 for ``(B, H, W, 3)`` inputs; returns ``(B, num_classes)`` logits."""

    num_classes: int = 1000
    dropout_rate: float = 0.2

    @nn.compact
    def __call__(self, x, train: bool = False):
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(
                f"MobileNetV2 takes channels-last RGB batches (B, H, W, 3); got shape {tuple(x.shape)}. "
                f"Use the model's preprocess() on uint8 images."
            )
        x = ConvBNReLU6(32, 3, 2, name="features_0")(x, train)
        index, c_in = 1, 32
        for t, c, n, s in SETTINGS:
            for r in range(n):
                x = InvertedResidual(c_in, c, s if r == 0 else 1, t, name=f"features_{index}")(x, train)
                index, c_in = index + 1, c
        x = ConvBNReLU6(1280, 1, name=f"features_{index}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dropout(self.dropout_rate, deterministic=not train, name="dropout")(x)
        return nn.Dense(self.num_classes, name="classifier")(x)


def torch_state_dict_to_flax(state: Mapping[str, np.ndarray]) -> dict[str, dict]:
    """torchvision's MobileNetV2 state dict (``features.0.0.weight`` ...) -> Flax variables.

    Returns ``{"params": ..., "batch_stats": ...}`` for :class:`MobileNetV2`. Every tensor but
    the BatchNorm step counters must be used and every Flax variable filled, else ``ValueError``.
    """
    names = TorchNames(
        state, source="The checkpoint", kind="a torchvision MobileNetV2 state dict", layout="MobileNetV2"
    )

    def conv_bn(conv_key: str, bn_key: str) -> tuple[dict, dict]:
        bn_params, bn_stats = names.bn(bn_key)
        return {"conv": names.conv(conv_key), "bn": bn_params}, {"bn": bn_stats}

    params: dict[str, dict] = {}
    stats: dict[str, dict] = {}
    params["features_0"], stats["features_0"] = conv_bn("features.0.0", "features.0.1")
    index = 1
    for t, _c, n, _s in SETTINGS:
        for _ in range(n):
            src = f"features.{index}.conv."
            if t == 1:  # conv.0 = depthwise ConvBNReLU, conv.1 = project conv, conv.2 = its BN
                parts = [("depthwise", src + "0.0", src + "0.1"), ("project", src + "1", src + "2")]
            else:
                parts = [
                    ("expand", src + "0.0", src + "0.1"),
                    ("depthwise", src + "1.0", src + "1.1"),
                    ("project", src + "2", src + "3"),
                ]
            block_p: dict[str, dict] = {}
            block_s: dict[str, dict] = {}
            for name, conv, bn in parts:
                block_p[name], block_s[name] = conv_bn(conv, bn)
            params[f"features_{index}"], stats[f"features_{index}"] = block_p, block_s
            index += 1
    params[f"features_{index}"], stats[f"features_{index}"] = conv_bn(
        f"features.{index}.0", f"features.{index}.1"
    )
    params["classifier"] = names.dense("classifier.1")
    names.check_all_used()
    return {"params": params, "batch_stats": stats}
