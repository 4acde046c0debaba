"""The convolution -> BatchNorm -> ReLU6 block that EfficientNet-Lite and MobileNetV2 share.

The two architectures build their stems, expansions, depthwise and projection layers from the
same three operations and differ only in constants: EfficientNet-Lite pads the TensorFlow
"SAME" way (:func:`same_padding`) and uses BatchNorm ``epsilon = 1e-3``, decay 0.99;
torchvision's MobileNetV2 pads symmetrically by ``(k - 1) // 2`` with ``epsilon = 1e-5``,
decay 0.9. :class:`ConvBNAct` takes those as attributes; each architecture subclasses it with
its own defaults (``efficientnet_lite.ConvBN``, ``mobilenet_v2.ConvBNReLU6``), so parameter
paths (``conv``, ``bn``) and outputs are those of the two former copies.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from ._convs import conv_general_dilated

__all__ = ["ConvBNAct", "same_padding", "conv_padding"]


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding of one spatial axis: ``(before, after)``.

    Output size ``ceil(size / stride)``, total padding ``max((out - 1) * stride + kernel - size, 0)``,
    the smaller half before.

    >>> same_padding(224, 3, 2), same_padding(56, 5, 2), same_padding(14, 5, 1)
    ((0, 1), (1, 2), (2, 2))
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def conv_padding(kind: str, hw: tuple[int, int], kernel: int, stride: int) -> list[tuple[int, int]]:
    """Pads of both spatial axes: ``kind`` ``"same"`` (TensorFlow) or ``"symmetric"`` (``(k - 1) // 2``).

    >>> conv_padding("same", (224, 224), 3, 2), conv_padding("symmetric", (224, 224), 3, 2)
    ([(0, 1), (0, 1)], [(1, 1), (1, 1)])
    """
    if kind == "same":
        return [same_padding(n, kernel, stride) for n in hw]
    if kind == "symmetric":
        return [((kernel - 1) // 2, (kernel - 1) // 2)] * 2
    raise ValueError(f"padding must be 'same' (TensorFlow) or 'symmetric'; got {kind!r}")


class ConvBNAct(nn.Module):
    """Convolution (no bias) -> BatchNorm -> optional ReLU6; submodules ``conv`` and ``bn``.

    Attributes:
      features: output channels (for ``depthwise``, the input channels).
      kernel, stride: square kernel size and stride.
      depthwise: one group per input channel (``feature_group_count = C``).
      relu6: apply ReLU6 after BatchNorm (the module's output is after it).
      padding: ``"same"`` (TensorFlow, from the input's size) or ``"symmetric"``.
      bn_epsilon, bn_decay: BatchNorm's epsilon and running-average decay (Flax's ``momentum``).
    """

    features: int
    kernel: int = 1
    stride: int = 1
    depthwise: bool = False
    relu6: bool = True
    padding: str = "same"
    bn_epsilon: float = 1e-3
    bn_decay: float = 0.99

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(
            self.features,
            (self.kernel, self.kernel),
            strides=(self.stride, self.stride),
            padding=conv_padding(self.padding, (x.shape[1], x.shape[2]), self.kernel, self.stride),
            use_bias=False,
            feature_group_count=x.shape[-1] if self.depthwise else 1,
            # XLA:CPU runs depthwise convolutions as a slow generic loop; this runs them as a
            # sum over the kernel's taps there (gradcam_jax/models/_convs.py), same numbers.
            conv_general_dilated=conv_general_dilated,
            name="conv",
        )(x)
        x = nn.BatchNorm(
            use_running_average=not train, momentum=self.bn_decay, epsilon=self.bn_epsilon, name="bn"
        )(x)
        return jax.nn.relu6(x) if self.relu6 else x
