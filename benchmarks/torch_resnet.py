"""A PyTorch ResNet (v1.5, torchvision's layout and parameter names) for peer benchmarks.

torchvision does not install beside the CPU torch build these machines use, so the peers'
side of a benchmark builds its ResNet here. Parameter names follow torchvision
(``conv1``, ``bn1``, ``layer1.0.conv2``, ``layer1.0.downsample.0``, ``fc``), so a torchvision
state dict loads unchanged, and :func:`to_flax` ports the weights into
``gradcam_jax.models.ResNet``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

STAGES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, width, stride):
        super().__init__()
        cout = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)  # stride here: v1.5
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=False)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + shortcut)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, width, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=False)
        self.downsample = None
        if stride != 1 or cin != width:
            self.downsample = nn.Sequential(nn.Conv2d(cin, width, 1, stride, bias=False), nn.BatchNorm2d(width))

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + shortcut)


class ResNet(nn.Module):
    def __init__(self, depth=50, num_classes=1000):
        super().__init__()
        block = Bottleneck if depth >= 50 else BasicBlock
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=False)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for i, (n, width) in enumerate(zip(STAGES[depth], (64, 128, 256, 512))):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, width, 2 if (j == 0 and i > 0) else 1))
                cin = width * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorm layers non-trivial statistics so parity checks exercise them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


# --------------------------------------------------------------------------------------------
# Weights: torchvision names -> the Flax ResNet's module paths
# --------------------------------------------------------------------------------------------


def _state_dict_numpy(model_or_state) -> dict:
    """A ``{name: float32 ndarray}`` view of a torch module's state dict (or of a state dict)."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    out = {}
    for name, value in state.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().to("cpu", torch.float32).numpy() if value.is_floating_point() \
                else value.detach().cpu().numpy()
        out[name] = np.asarray(value)
    return out


def stage_sizes(model_or_state) -> tuple:
    """Blocks per stage of a torchvision-layout ResNet, read from its parameter names."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    sizes = []
    for i in range(1, 5):
        blocks = {int(k.split(".")[1]) for k in state if k.startswith(f"layer{i}.")}
        if not blocks:
            raise ValueError(f"No parameters named 'layer{i}.*': not a torchvision-layout ResNet state dict.")
        sizes.append(max(blocks) + 1)
    return tuple(sizes)


def is_bottleneck(model_or_state) -> bool:
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    return "layer1.0.conv3.weight" in state


def to_flax(torch_model) -> dict:
    """Port a torchvision-layout ResNet's weights to ``gradcam_jax.models.ResNet`` variables.

    Accepts a ``torch.nn.Module`` (``torchvision.models.resnet50()``, :class:`ResNet` here) or
    its state dict. Returns ``{"params": ..., "batch_stats": ...}`` as nested dicts of float32
    NumPy arrays, laid out as the Flax model's module paths (``stem/conv``, ``stem/bn``,
    ``stage{i}/block{j}/conv{n}``, ``.../downsample_conv``, ``.../downsample_bn``, ``head``;
    see the table in ``gradcam_jax/models/resnet.py``). Convolution kernels go from torch's
    ``(out, in, kh, kw)`` to ``(kh, kw, in, out)``, the Dense kernel is ``fc.weight`` transposed,
    BatchNorm ``weight``/``bias``/``running_mean``/``running_var`` become
    ``scale``/``bias`` (params) and ``mean``/``var`` (batch_stats).

    Every tensor of the state dict except the BatchNorm step counters is used exactly once; an
    unexpected or missing name raises ``ValueError``. Build the matching Flax model with the
    same stage sizes (:func:`stage_sizes`) and block type (:func:`is_bottleneck`), e.g.
    ``gradcam_jax.models.resnet50()`` for ``torchvision.models.resnet50()``; then
    ``model.apply(to_flax(net), x_nhwc)`` equals ``net(x_nchw)`` (eval mode) to float32 rounding.
    """
    state = _state_dict_numpy(torch_model)
    used = set()

    def take(key):
        if key not in state:
            raise ValueError(f"The state dict has no tensor {key!r}; is it a torchvision-layout ResNet?")
        used.add(key)
        return np.asarray(state[key], np.float32)

    def conv(key):  # torch (out, in, kh, kw) -> flax (kh, kw, in, out)
        return {"kernel": np.ascontiguousarray(np.transpose(take(key + ".weight"), (2, 3, 1, 0)))}

    def bn(key):
        return ({"scale": take(key + ".weight"), "bias": take(key + ".bias")},
                {"mean": take(key + ".running_mean"), "var": take(key + ".running_var")})

    params, stats = {}, {}
    stem_bn, stem_stats = bn("bn1")
    params["stem"] = {"conv": conv("conv1"), "bn": stem_bn}
    stats["stem"] = {"bn": stem_stats}
    n_convs = 3 if is_bottleneck(state) else 2
    for i, n_blocks in enumerate(stage_sizes(state), start=1):
        stage_p, stage_s = {}, {}
        for j in range(n_blocks):
            src, block_p, block_s = f"layer{i}.{j}.", {}, {}
            for n in range(1, n_convs + 1):
                block_p[f"conv{n}"] = conv(src + f"conv{n}")
                block_p[f"bn{n}"], block_s[f"bn{n}"] = bn(src + f"bn{n}")
            if src + "downsample.0.weight" in state:
                block_p["downsample_conv"] = conv(src + "downsample.0")
                block_p["downsample_bn"], block_s["downsample_bn"] = bn(src + "downsample.1")
            stage_p[f"block{j}"], stage_s[f"block{j}"] = block_p, block_s
        params[f"stage{i}"], stats[f"stage{i}"] = stage_p, stage_s
    params["head"] = {"kernel": np.ascontiguousarray(take("fc.weight").T), "bias": take("fc.bias")}

    unused = sorted(k for k in state if k not in used and not k.endswith("num_batches_tracked"))
    if unused:
        raise ValueError(f"The state dict has tensors this ResNet layout does not use: {unused[:10]}.")
    return {"params": params, "batch_stats": stats}


def flax_model_for(torch_model, dtype=None):
    """The ``gradcam_jax.models.ResNet`` whose variable tree :func:`to_flax` fills for ``torch_model``."""
    import jax.numpy as jnp

    from gradcam_jax.models import resnet as flax_resnet

    state = torch_model.state_dict() if isinstance(torch_model, nn.Module) else torch_model
    block = flax_resnet.Bottleneck if is_bottleneck(state) else flax_resnet.BasicBlock
    return flax_resnet.ResNet(stage_sizes=stage_sizes(state), block_cls=block,
                              num_classes=int(state["fc.weight"].shape[0]),
                              width=int(state["conv1.weight"].shape[0]),
                              dtype=jnp.float32 if dtype is None else dtype)
