"""VGG-11 and AlexNet in the small-image variants of the dataset-condensation reference code
(VICO-UoE/DatasetCondensation ``networks.py``, used for the cross-architecture tables of DC, DSA, DM,
MTT and DATM).

- VGG-11: conv3x3 -> norm -> ReLU blocks of 64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M
  (M: 2x2 max-pool), then a linear classifier; instance norm (GroupNorm(C, C), affine) by default
  as the reference ``VGG11``, batch norm for ``VGG11BN``. Five max-pools: 32x32 inputs end at 1x1.
- AlexNet: conv5x5(128) -> ReLU -> M -> conv5x5(192) -> ReLU -> M -> conv3x3(256) -> conv3x3(192) ->
  conv3x3(192) (each with ReLU) -> M -> linear; no norm by default as the reference ``AlexNet``
  (batch norm after each conv: ``AlexNetBN``).

``width`` scales every layer (VGG-11: 64 = the reference, AlexNet: 128 = the reference). 28x28
single-channel inputs get a padded first convolution (VGG-11: 3, AlexNet: 4) so that the maps are
those of 32x32 inputs, as in the reference; other sizes work where the pools leave at least 1x1.
"""
from __future__ import annotations

import torch
from torch import nn

from .classic_layout import plan
from .convnet import make_norm
from .spec import ModelSpec

class ClassicNet(nn.Module):
    """VGG-11 or AlexNet (``spec.arch``): conv -> norm -> ReLU blocks and max-pools, then a linear layer."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        layers, _, sides = plan(spec.arch, spec.channels, spec.resolution, spec.width)
        modules: list[nn.Module] = []
        for layer in layers:
            if layer == "M":
                modules.append(nn.MaxPool2d(2))
            else:
                in_ch, out, kernel, pad = layer
                modules += [nn.Conv2d(in_ch, out, kernel, padding=pad), make_norm(spec.norm, out), nn.ReLU()]
        self.features = nn.Sequential(*modules)
        last_channels = [layer for layer in layers if layer != "M"][-1][1]
        self.feature_dim = last_channels * sides[0] * sides[1]
        self.classifier = nn.Linear(self.feature_dim, spec.num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))
