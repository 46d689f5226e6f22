"""Networks: ConvNet, ResNet-10/18, VGG-11 and AlexNet built from a plain-data ModelSpec, plus flat-parameter
tools."""
from __future__ import annotations

from torch import nn

from .classic import ClassicNet
from .convnet import ConvNet
from .flat import FlatModel, ParamLayout, flatten_buffers, flatten_params, load_flat_params
from .resnet import ResNet
from .spec import ARCHITECTURES, ModelSpec, default_depth


def build_model(spec: ModelSpec | dict) -> nn.Module:
    """Rebuild the exact module described by ``spec`` (a ModelSpec or its to_dict())."""
    if isinstance(spec, dict):
        spec = ModelSpec.from_dict(spec)
    if spec.arch == "convnet":
        return ConvNet(spec)
    if spec.arch in ("vgg11", "alexnet"):
        return ClassicNet(spec)
    return ResNet(spec)


__all__ = [
    "ARCHITECTURES", "ClassicNet", "ConvNet", "FlatModel", "ModelSpec", "ParamLayout", "ResNet", "build_model",
    "default_depth", "flatten_buffers", "flatten_params", "load_flat_params",
]
