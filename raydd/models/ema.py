"""Exponential moving average of a model's parameters (the one EMA in raydd).

Used by EDC's evaluation protocol ("EMA-based evaluation") and by the SSD teacher recipe
(FixMatch evaluates an EMA of the weights).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..validation import check_bool, check_range


class ModelEMA:
    """ema ← d·ema + (1 − d)·θ after every optimiser step, starting from the model's initial parameters.

    ``warmup=True`` uses d_k = min(d, (1 + k) / (10 + k)) at the k-th update (TensorFlow's
    ExponentialMovingAverage with num_updates), so a short run does not keep a large share of
    the random initialisation (0.999^1000 ≈ 0.37). ``model(net)`` is a copy of ``net`` with the
    EMA parameters and ``net``'s own buffers (BatchNorm running statistics), like the reference
    codes' parameter swap; ``net`` is untouched.
    """

    def __init__(self, model: nn.Module, decay: float, *, warmup: bool = False) -> None:
        check_range("EMA decay", decay, low=0, high=1, high_open=True)
        self.decay = float(decay)
        self.warmup = check_bool("EMA warmup", warmup)
        self.updates = 0
        self.shadow = [p.detach().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        k = self.updates
        decay = min(self.decay, (1.0 + k) / (10.0 + k)) if self.warmup else self.decay
        for ema, p in zip(self.shadow, model.parameters()):
            ema.mul_(decay).add_(p.detach(), alpha=1.0 - decay)

    @torch.no_grad()
    def model(self, model: nn.Module) -> nn.Module:
        out = copy.deepcopy(model)
        for p, ema in zip(out.parameters(), self.shadow):
            p.copy_(ema)
        return out.eval()
