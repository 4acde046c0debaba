"""The architectures (Flax Linen, channels-last), each with its map from PyTorch parameter names.

``resnet``: torchvision-layout ResNets (random weights for examples, tests and benchmarks;
:func:`~gradcam_jax.models.resnet.torch_state_dict_to_flax` ports a torchvision checkpoint).
``efficientnet_lite``: EfficientNet-Lite, the architecture of the zoo's pretrained
``efficientnet_lite0`` (:func:`~gradcam_jax.models.efficientnet_lite.torch_state_dict_to_flax`
reads the PyTorch port's checkpoint). ``mobilenet_v2``: torchvision's MobileNetV2, the zoo's
``mobilenet_v2``. ``torch_names``: the state-dict reader both converters use.
"""

from .efficientnet_lite import EfficientNetLite as EfficientNetLite
from .mobilenet_v2 import MobileNetV2 as MobileNetV2
from .resnet import STAGE_SIZES as STAGE_SIZES
from .resnet import BasicBlock as BasicBlock
from .resnet import Bottleneck as Bottleneck
from .resnet import ResNet as ResNet
from .resnet import ResNetStage as ResNetStage
from .resnet import Stem as Stem
from .resnet import init_resnet as init_resnet
from .resnet import resnet18 as resnet18
from .resnet import resnet34 as resnet34
from .resnet import resnet50 as resnet50
from .resnet import resnet101 as resnet101
from .resnet import resnet152 as resnet152

__all__ = [
    "ResNet",
    "ResNetStage",
    "BasicBlock",
    "Bottleneck",
    "Stem",
    "STAGE_SIZES",
    "init_resnet",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "EfficientNetLite",
    "MobileNetV2",
]
