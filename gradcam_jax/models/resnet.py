"""ResNet (He et al., 2015) in Flax Linen, laid out like torchvision's so its weights port over.

Images are channels-last ``(B, H, W, 3)``. Module paths are ``stem``, ``stage1`` ...
``stage4`` (each holding ``block0``, ``block1``, ...) and ``head``; the output of ``stage4``
is the usual Grad-CAM layer (``7 x 7 x 2048`` at 224 px for ResNet-50).

Correspondence with torchvision (for porting weights):

==========================  ===================================
torchvision                 here
==========================  ===================================
``conv1`` / ``bn1``         ``stem/conv`` / ``stem/bn``
``layer{i}.{j}.convN``      ``stage{i}/block{j}/convN``
``layer{i}.{j}.bnN``        ``stage{i}/block{j}/bnN``
``layer{i}.{j}.downsample`` ``stage{i}/block{j}/downsample_conv``, ``.../downsample_bn``
``fc``                      ``head``
==========================  ===================================

Conv kernels are ``(kh, kw, in, out)`` here and ``(out, in, kh, kw)`` in torch; the Dense
kernel is the transpose of ``fc.weight``. BatchNorm ``weight``/``bias`` are ``scale``/``bias``
in ``params``; ``running_mean``/``running_var`` are ``mean``/``var`` in ``batch_stats``.
:func:`torch_state_dict_to_flax` applies this table to a torchvision state dict, and
:func:`resnet_for_torch` builds the matching model.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ._convs import conv_general_dilated
from .torch_names import TorchNames, state_dict_arrays

__all__ = [
    "ResNet",
    "ResNetStage",
    "BasicBlock",
    "Bottleneck",
    "Stem",
    "STAGE_SIZES",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "init_resnet",
    "torch_state_dict_to_flax",
    "torch_stage_sizes",
    "torch_uses_bottleneck",
    "resnet_for_torch",
]

Dtype = Any

# torchvision initialises convolutions with Kaiming-normal over fan_out; doing the same keeps
# random-weight activations at a sensible scale through 50+ layers.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _pad(k: int) -> tuple[tuple[int, int], tuple[int, int]]:
    # Explicit symmetric padding k // 2, as torch does. "SAME" would pad asymmetrically for
    # stride 2 and shift every feature map by one pixel relative to torchvision.
    p = k // 2
    return ((p, p), (p, p))


def _conv(features: int, k: int, stride: int, dtype: Dtype, name: str) -> nn.Conv:
    return nn.Conv(
        features,
        (k, k),
        strides=(stride, stride),
        padding=_pad(k),
        use_bias=False,
        kernel_init=_conv_init,
        dtype=dtype,
        param_dtype=jnp.float32,
        # On CPU, a 3x3 convolution on a map smaller than its kernel (stage 4 at 32-64 px) runs as
        # one matrix product instead of XLA's swapped-operand loop (gradcam_jax/models/_convs.py).
        conv_general_dilated=conv_general_dilated,
        name=name,
    )


def _bn(train: bool, dtype: Dtype, name: str, zero_scale: bool = False) -> nn.BatchNorm:
    # momentum 0.9 / eps 1e-5 are torch's defaults (torch's momentum 0.1 weighs the new batch).
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        dtype=dtype,
        param_dtype=jnp.float32,
        scale_init=nn.initializers.zeros if zero_scale else nn.initializers.ones,
        name=name,
    )


class Stem(nn.Module):
    """7x7/2 convolution, BatchNorm, ReLU, 3x3/2 max-pool (padding 1): /4 resolution."""

    features: int = 64
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = _conv(self.features, 7, 2, self.dtype, "conv")(x)
        x = nn.relu(_bn(train, self.dtype, "bn")(x))
        # flax pads max_pool with -inf, like torch's MaxPool2d(3, 2, padding=1).
        return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34). Output channels: ``features``."""

    features: int
    stride: int = 1
    zero_init_residual: bool = False
    dtype: Dtype = jnp.float32

    expansion = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        out_features = self.features * self.expansion
        y = _conv(self.features, 3, self.stride, self.dtype, "conv1")(x)
        y = nn.relu(_bn(train, self.dtype, "bn1")(y))
        y = _conv(self.features, 3, 1, self.dtype, "conv2")(y)
        y = _bn(train, self.dtype, "bn2", self.zero_init_residual)(y)
        return nn.relu(y + _shortcut(x, out_features, self.stride, train, self.dtype))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, as in torchvision's "v1.5"), 1x1 expand (x4)."""

    features: int
    stride: int = 1
    zero_init_residual: bool = False
    dtype: Dtype = jnp.float32

    expansion = 4

    @nn.compact
    def __call__(self, x, train: bool = False):
        out_features = self.features * self.expansion
        y = _conv(self.features, 1, 1, self.dtype, "conv1")(x)
        y = nn.relu(_bn(train, self.dtype, "bn1")(y))
        y = _conv(self.features, 3, self.stride, self.dtype, "conv2")(y)
        y = nn.relu(_bn(train, self.dtype, "bn2")(y))
        y = _conv(out_features, 1, 1, self.dtype, "conv3")(y)
        y = _bn(train, self.dtype, "bn3", self.zero_init_residual)(y)
        return nn.relu(y + _shortcut(x, out_features, self.stride, train, self.dtype))


def _shortcut(x, out_features: int, stride: int, train: bool, dtype: Dtype):
    # Called from inside a compact block, so the submodules below belong to that block.
    if stride == 1 and x.shape[-1] == out_features:
        return x
    s = _conv(out_features, 1, stride, dtype, "downsample_conv")(x)
    return _bn(train, dtype, "downsample_bn")(s)


class ResNetStage(nn.Module):
    """``num_blocks`` blocks at one resolution; the first one carries the stride."""

    block_cls: type[nn.Module]
    num_blocks: int
    features: int
    stride: int = 1
    zero_init_residual: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        for i in range(self.num_blocks):
            x = self.block_cls(
                self.features,
                stride=self.stride if i == 0 else 1,
                zero_init_residual=self.zero_init_residual,
                dtype=self.dtype,
                name=f"block{i}",
            )(x, train)
        return x


class ResNet(nn.Module):
    """A torchvision-layout ResNet on channels-last images.

    Attributes:
      stage_sizes: blocks per stage, e.g. ``(3, 4, 6, 3)``.
      block_cls: :class:`BasicBlock` or :class:`Bottleneck`.
      num_classes: outputs of the ``head`` Dense layer.
      width: channels of the stem and of the first stage's blocks (doubled per stage).
      zero_init_residual: start each block's last BatchNorm scale at 0 (torchvision option).
      dtype: computation dtype (e.g. ``jnp.bfloat16``); parameters stay ``float32`` and the
        logits are returned as ``float32``.

    Call as ``model.apply(variables, x)`` (inference: BatchNorm uses its running averages) or
    ``model.apply(variables, x, train=True, mutable=["batch_stats"])``.
    """

    stage_sizes: Sequence[int]
    block_cls: type[nn.Module]
    num_classes: int = 1000
    width: int = 64
    zero_init_residual: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = Stem(self.width, dtype=self.dtype, name="stem")(x, train)
        for i, n in enumerate(self.stage_sizes):
            x = ResNetStage(
                self.block_cls,
                n,
                self.width * 2**i,
                stride=1 if i == 0 else 2,
                zero_init_residual=self.zero_init_residual,
                dtype=self.dtype,
                name=f"stage{i + 1}",
            )(x, train)
        # Pool and classify in float32: cheap, and keeps bf16 rounding out of the scores.
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=jnp.float32, name="head")(x)


STAGE_SIZES = {
    18: ((2, 2, 2, 2), BasicBlock),
    34: ((3, 4, 6, 3), BasicBlock),
    50: ((3, 4, 6, 3), Bottleneck),
    101: ((3, 4, 23, 3), Bottleneck),
    152: ((3, 8, 36, 3), Bottleneck),
}


def _factory(depth: int):
    sizes, block = STAGE_SIZES[depth]

    def make(num_classes: int = 1000, dtype: Dtype = jnp.float32, **kwargs) -> ResNet:
        return ResNet(stage_sizes=sizes, block_cls=block, num_classes=num_classes, dtype=dtype, **kwargs)

    make.__name__ = make.__qualname__ = f"resnet{depth}"
    make.__doc__ = (
        f"ResNet-{depth} ({block.__name__} blocks, stages {sizes}). Extra keyword "
        f"arguments (``width``, ``zero_init_residual``) go to :class:`ResNet`."
    )
    return make


resnet18 = _factory(18)
resnet34 = _factory(34)
resnet50 = _factory(50)
resnet101 = _factory(101)
resnet152 = _factory(152)


def init_resnet(model: nn.Module, key, image_size: int = 224):
    """Random variables (``params`` and ``batch_stats``) for ``model`` on square RGB images."""
    x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    # jit: initialising op by op is slow for a 100-layer model.
    return jax.jit(functools.partial(model.init, train=False))(key, x)


# --------------------------------------------------------------------------------------------
# Weights: torchvision names -> the module paths above
# --------------------------------------------------------------------------------------------


def torch_stage_sizes(model_or_state) -> tuple[int, ...]:
    """Blocks per stage of a torchvision-layout ResNet (a torch module or its state dict)."""
    state = model_or_state.state_dict() if hasattr(model_or_state, "state_dict") else model_or_state
    sizes = []
    for i in range(1, 5):
        blocks = {int(k.split(".")[1]) for k in state if k.startswith(f"layer{i}.")}
        if not blocks:
            raise ValueError(f"No parameters named 'layer{i}.*': not a torchvision-layout ResNet state dict.")
        sizes.append(max(blocks) + 1)
    return tuple(sizes)


def torch_uses_bottleneck(model_or_state) -> bool:
    """Whether a torchvision-layout ResNet has :class:`Bottleneck` blocks (ResNet-50 and deeper)."""
    state = model_or_state.state_dict() if hasattr(model_or_state, "state_dict") else model_or_state
    return "layer1.0.conv3.weight" in state


def torch_state_dict_to_flax(torch_model) -> dict[str, dict]:
    """Port a torchvision-layout ResNet's weights to :class:`ResNet` variables.

    Accepts a torch module (``torchvision.models.resnet50()``) or its state dict (torch tensors
    or NumPy arrays, e.g. from :func:`gradcam_jax.zoo.load_pth`); PyTorch is not imported here.
    Returns ``{"params": ..., "batch_stats": ...}`` as nested dicts of float32 NumPy arrays,
    laid out as in the table of this module's docstring.

    Every tensor of the state dict except the BatchNorm step counters is used exactly once; an
    unexpected or missing name raises ``ValueError``. Build the matching model with
    :func:`resnet_for_torch` (or the same stage sizes and block type, e.g. :func:`resnet50` for
    ``torchvision.models.resnet50()``); then ``model.apply(variables, x_nhwc)`` equals
    ``net(x_nchw)`` (eval mode) to float32 rounding.
    """
    state = state_dict_arrays(torch_model)
    names = TorchNames(
        state, source="The state dict", kind="a torchvision-layout ResNet", layout="this ResNet layout"
    )
    params: dict[str, dict] = {}
    stats: dict[str, dict] = {}
    stem_bn, stem_stats = names.bn("bn1")
    params["stem"] = {"conv": names.conv("conv1"), "bn": stem_bn}
    stats["stem"] = {"bn": stem_stats}
    n_convs = 3 if torch_uses_bottleneck(state) else 2
    for i, n_blocks in enumerate(torch_stage_sizes(state), start=1):
        stage_p, stage_s = {}, {}
        for j in range(n_blocks):
            src = f"layer{i}.{j}."
            block_p, block_s = {}, {}
            for n in range(1, n_convs + 1):
                block_p[f"conv{n}"] = names.conv(src + f"conv{n}")
                block_p[f"bn{n}"], block_s[f"bn{n}"] = names.bn(src + f"bn{n}")
            if src + "downsample.0.weight" in names:
                block_p["downsample_conv"] = names.conv(src + "downsample.0")
                block_p["downsample_bn"], block_s["downsample_bn"] = names.bn(src + "downsample.1")
            stage_p[f"block{j}"], stage_s[f"block{j}"] = block_p, block_s
        params[f"stage{i}"], stats[f"stage{i}"] = stage_p, stage_s
    params["head"] = names.dense("fc")
    names.check_all_used()
    return {"params": params, "batch_stats": stats}


def resnet_for_torch(torch_model, dtype: Dtype = None) -> ResNet:
    """The :class:`ResNet` whose variables :func:`torch_state_dict_to_flax` fills for ``torch_model``.

    ``dtype``: the computation dtype (default float32); parameters stay float32.
    """
    state = torch_model.state_dict() if hasattr(torch_model, "state_dict") else torch_model
    block = Bottleneck if torch_uses_bottleneck(state) else BasicBlock
    return ResNet(
        stage_sizes=torch_stage_sizes(state),
        block_cls=block,
        num_classes=int(state["fc.weight"].shape[0]),
        width=int(state["conv1.weight"].shape[0]),
        dtype=jnp.float32 if dtype is None else dtype,
    )
