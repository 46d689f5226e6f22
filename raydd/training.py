"""Plain-torch training helpers shared by the farm recipes and the evaluation protocols."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass
class EpochStats:
    loss: float
    acc: float


def minibatches(n: int, batch_size: int, generator: torch.Generator, shuffle: bool = True):
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


def cutmix(x: torch.Tensor, y: torch.Tensor, beta: float, generator: torch.Generator
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """CutMix (Yun et al. 2019): paste a box from a shuffled batch; returns (x, y_a, y_b, lam).

    Every draw comes from ``generator`` (λ ~ Beta(β, β) through a NumPy generator seeded from it: torch's
    Beta sampler only reads the global RNG), so a trajectory is a function of its seed."""
    if beta > 0:
        seed = int(torch.randint(2 ** 62, (1,), generator=generator))
        lam = float(np.random.default_rng(seed).beta(beta, beta))
    else:
        lam = 1.0
    perm = torch.randperm(x.shape[0], generator=generator).to(x.device)
    h, w = x.shape[-2:]
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(torch.randint(h, (1,), generator=generator)), int(torch.randint(w, (1,), generator=generator))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    x = x.clone()
    x[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
    lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)
    return x, y, y[perm], lam


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
                *, batch_size: int, generator: torch.Generator, device: torch.device,
                augment: Augment | None = None, cutmix_prob: float = 0.0, cutmix_beta: float = 1.0
                ) -> EpochStats:
    """One pass over (images, labels) with cross-entropy; hard or soft (probability) labels."""
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    for idx in minibatches(len(labels), batch_size, generator):
        x = images[idx].to(device, non_blocking=True)
        y = labels[idx].to(device, non_blocking=True)
        if augment is not None:
            x = augment(x, generator)
        if cutmix_prob > 0 and float(torch.rand(1, generator=generator)) < cutmix_prob:
            x, ya, yb, lam = cutmix(x, y, cutmix_beta, generator)
            out = model(x)
            loss = lam * F.cross_entropy(out, ya) + (1 - lam) * F.cross_entropy(out, yb)
        else:
            out = model(x)
            loss = F.cross_entropy(out, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += float(loss.detach()) * len(idx)
        hard = y.argmax(1) if y.dim() == 2 else y
        correct += int((out.argmax(1) == hard).sum())
        seen += len(idx)
    return EpochStats(total_loss / max(seen, 1), correct / max(seen, 1))


@torch.no_grad()
def evaluate_model(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, device: torch.device,
                   batch_size: int = 1024) -> EpochStats:
    """Loss and accuracy on a labelled set (model in eval mode)."""
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(labels), batch_size):
        x = images[start:start + batch_size].to(device)
        y = labels[start:start + batch_size].to(device)
        out = model(x)
        total_loss += float(F.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
    model.train(was_training)
    n = max(len(labels), 1)
    return EpochStats(total_loss / n, correct / n)


def check_gpus_here(gpus: float, what: str) -> None:
    """``gpus`` per worker on this machine alone (no cluster joined): torch must see at least that many."""
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus > 0 and have < gpus:
        raise ValueError(f"{what}={gpus:g} but this machine has {have} GPU(s) and no Ray cluster is joined "
                         f"(--address / RAY_ADDRESS): use {what}=0, or join a cluster with GPUs")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' (or None) picks CUDA when available, else CPU; an unavailable CUDA request is an error."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available here: use 'cpu' or 'auto'")
    return dev
