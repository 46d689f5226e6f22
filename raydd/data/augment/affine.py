"""Per-sample affine augmentation: RandomResizedCrop (+ flip) as affine matrices, applied by bilinear
resampling (differentiable in the images). EDC's synthesis (raydd.methods.edc) and its evaluation
protocol (raydd.evaluation.edc) use it."""
from __future__ import annotations

import math

import torch
from torch.nn import functional as F


def random_resized_crop_params(n: int, generator: torch.Generator, *, scale: tuple[float, float],
                               ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True) -> torch.Tensor:
    """Affine matrices [n, 2, 3] of per-sample RandomResizedCrop (+ horizontal flip).

    Area fraction ~ U(scale), aspect ratio log-uniform in ``ratio``, crop sides clipped to
    the image, centre uniform over the valid positions; drawn on the CPU from ``generator``.
    """
    area = torch.empty(n, dtype=torch.float64).uniform_(scale[0], scale[1], generator=generator)
    log_r = torch.empty(n, dtype=torch.float64).uniform_(math.log(ratio[0]), math.log(ratio[1]),
                                                          generator=generator)
    aspect = torch.exp(log_r)
    w = torch.sqrt(area * aspect).clamp(max=1.0)  # fractions of the side
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (torch.rand(n, dtype=torch.float64, generator=generator) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, dtype=torch.float64, generator=generator) * 2 - 1) * (1 - h)
    sign = torch.ones(n, dtype=torch.float64)
    if flip:
        sign = torch.where(torch.rand(n, dtype=torch.float64, generator=generator) < 0.5, -sign, sign)
    zero = torch.zeros_like(w)
    return torch.stack([torch.stack([w * sign, zero, cx], -1), torch.stack([zero, h, cy], -1)], 1)


def apply_affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Bilinear resampling of ``x`` [N, C, H, W] by ``theta`` [N, 2, 3]; differentiable in ``x``."""
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
