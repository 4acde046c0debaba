"""Reference models for examples, tests and benchmarks (Flax Linen, channels-last)."""

from .resnet import (
    STAGE_SIZES, BasicBlock, Bottleneck, ResNet, ResNetStage, Stem, init_resnet, resnet18,
    resnet34, resnet50, resnet101, resnet152,
)

__all__ = [
    "ResNet", "ResNetStage", "BasicBlock", "Bottleneck", "Stem", "STAGE_SIZES", "init_resnet",
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
]
