"""The architectures (Flax Linen, channels-last), each with its map from PyTorch parameter names.

``resnet``: torchvision-layout ResNets (random weights for examples, tests and benchmarks;
:func:`~gradcam_jax.models.resnet.torch_state_dict_to_flax` ports a torchvision checkpoint).
``efficientnet_lite``: EfficientNet-Lite, the architecture of the zoo's pretrained
``efficientnet_lite0`` (:func:`~gradcam_jax.models.efficientnet_lite.torch_state_dict_to_flax`
reads the PyTorch port's checkpoint). ``torch_names``: the state-dict reader both converters use.
"""

from .efficientnet_lite import EfficientNetLite
from .resnet import (
    STAGE_SIZES,
    BasicBlock,
    Bottleneck,
    ResNet,
    ResNetStage,
    Stem,
    init_resnet,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
)

__all__ = [
    "ResNet", "ResNetStage", "BasicBlock", "Bottleneck", "Stem", "STAGE_SIZES", "init_resnet",
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "EfficientNetLite",
]
