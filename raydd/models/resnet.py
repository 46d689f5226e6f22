"""ResNet-10/18 with a small-image stem (3x3 conv, stride 1, no max-pool), BN or IN."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .convnet import make_norm
from .spec import ModelSpec

BLOCKS = {"resnet10": (1, 1, 1, 1), "resnet18": (2, 2, 2, 2)}


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.norm1 = make_norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.norm2 = make_norm(norm, planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), make_norm(norm, planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        base = spec.width
        self.stem = nn.Sequential(
            nn.Conv2d(spec.channels, base, 3, stride=1, padding=1, bias=False),
            make_norm(spec.norm, base),
            nn.ReLU(),
        )
        stages = []
        in_planes = base
        for i, blocks in enumerate(BLOCKS[spec.arch]):
            planes = base * 2**i
            for j in range(blocks):
                stages.append(BasicBlock(in_planes, planes, 2 if (i > 0 and j == 0) else 1, spec.norm))
                in_planes = planes
        self.layers = nn.Sequential(*stages)
        self.feature_dim = in_planes
        self.classifier = nn.Linear(in_planes, spec.num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.stem(x))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))
