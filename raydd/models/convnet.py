"""ConvNet of the dataset-condensation literature (DC, DSA, DM, MTT, DATM).

Each block is conv3x3(width) -> norm -> activation -> pool(2); a linear classifier
follows. Instance norm is GroupNorm(width, width) with affine parameters, as in the
reference code. For 28x28 single-channel inputs the first convolution pads by 3 so
that the feature map is 32x32, which gives the reference parameter count.
"""
from __future__ import annotations

import torch
from torch import nn

from .spec import ModelSpec


def make_norm(norm: str, width: int) -> nn.Module:
    if norm == "instance":
        return nn.GroupNorm(width, width, affine=True)
    if norm == "batch":
        return nn.BatchNorm2d(width)
    return nn.Identity()


def make_activation(name: str) -> nn.Module:
    """The activation after each block's norm. ReLU works in place, as the reference ConvNet's does: the same
    values, one activation buffer less per block (out of place, the CPU test pass page-faulted a fresh buffer for
    every batch: 1.6x the reference's CPU, benchmarks/expert_epoch.py)."""
    return {"relu": nn.ReLU(inplace=True), "leakyrelu": nn.LeakyReLU(0.01), "sigmoid": nn.Sigmoid()}[name]


class ConvNet(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = spec.channels
        height, width = spec.resolution
        for d in range(spec.depth):
            pad = 3 if (d == 0 and spec.channels == 1 and (height, width) == (28, 28)) else 1
            layers.append(nn.Conv2d(in_ch, spec.width, kernel_size=3, padding=pad))
            height, width = height + 2 * pad - 2, width + 2 * pad - 2
            layers.append(make_norm(spec.norm, spec.width))
            layers.append(make_activation(spec.activation))
            if spec.pooling != "none" and min(height, width) >= 2:
                layers.append(nn.AvgPool2d(2) if spec.pooling == "avg" else nn.MaxPool2d(2))
                height, width = height // 2, width // 2
            in_ch = spec.width
        self.features = nn.Sequential(*layers)
        self.feature_dim = spec.width * height * width
        self.classifier = nn.Linear(self.feature_dim, spec.num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened features before the classifier (used by DM, herding, k-center)."""
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))
