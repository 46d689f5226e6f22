"""SSD's strong augmentation A(·) (FixMatch's RandAugment variant, used by the ``ssd_teacher`` farm
recipe; raydd.farm.ssd)."""
from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from .dsa import DSA


class StrongAugment:
    """A(·): a RandAugment-like chain on tensors (FixMatch's RA variant, App. "RandAugment").

    weak(x) -> ``num_ops`` ops per sample, each drawn uniformly from STRONG_OPS with its own
    magnitude m ~ U(0, 1) -> Cutout of side U(0, ``cutout``)·size filled with 0.

    Ranges follow FixMatch Table 12: brightness/color/contrast/sharpness blend factor in
    [0.05, 0.95] towards the degenerate image (black / greyscale / mean / smoothed), rotate
    ±30°, shear ±0.3, translate ±30% of the side. The data is normalised (maybe ZCA-whitened)
    floats, not 8-bit pixels, so: "black" is the training set's per-channel minimum, greyscale
    is the channel mean, geometric ops and Cutout fill with 0 (≈ the mean, FixMatch's grey), and
    the 8-bit-only ops AutoContrast, Equalize, Posterize and Solarize are left out.
    All draws come from the generator passed in (per-sample parameters).
    """

    OPS = ("identity", "brightness", "color", "contrast", "sharpness", "rotate", "shear_x", "shear_y",
           "translate_x", "translate_y")

    def __init__(self, weak: DSA | None, floor: torch.Tensor, num_ops: int = 2, cutout: float = 0.5):
        self.weak = weak
        self.floor = floor.detach().view(1, -1, 1, 1)
        self.num_ops = num_ops
        self.cutout = cutout

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.weak is not None:
            x = self.weak(x, generator=generator)
        n = x.shape[0]
        for _ in range(self.num_ops):
            choice = torch.randint(len(self.OPS), (n,), generator=generator).to(x.device)
            mag = torch.rand(n, generator=generator, dtype=torch.float64).to(x.device, x.dtype)
            out = x.clone()
            for i, op in enumerate(self.OPS):
                idx = torch.nonzero(choice == i, as_tuple=False).flatten()
                if op == "identity" or idx.numel() == 0:
                    continue
                out[idx] = getattr(self, "_" + op)(x[idx], mag[idx])
            x = out
        if self.cutout > 0:
            x = self._cutout(x, generator)
        return x.contiguous()

    @staticmethod
    def _blend(x: torch.Tensor, degenerate: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        factor = (0.05 + 0.9 * m).view(-1, 1, 1, 1)  # FixMatch Table 12: [0.05, 0.95]
        return degenerate + factor * (x - degenerate)

    def _brightness(self, x, m):
        return self._blend(x, self.floor.to(x.device, x.dtype).expand_as(x), m)

    def _color(self, x, m):
        return self._blend(x, x.mean(dim=1, keepdim=True).expand_as(x), m)

    def _contrast(self, x, m):
        return self._blend(x, x.mean(dim=(1, 2, 3), keepdim=True).expand_as(x), m)

    def _sharpness(self, x, m):
        c = x.shape[1]
        kernel = torch.ones(3, 3, device=x.device, dtype=x.dtype)
        kernel[1, 1] = 5.0
        kernel = (kernel / 13.0).expand(c, 1, 3, 3)  # PIL's SMOOTH filter, the Sharpness degenerate
        smooth = x.clone()
        if x.shape[-1] > 2 and x.shape[-2] > 2:
            smooth[:, :, 1:-1, 1:-1] = F.conv2d(x, kernel, groups=c)
        return self._blend(x, smooth, m)

    @staticmethod
    def _warp(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, tx: torch.Tensor,
              c: torch.Tensor, d: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
        theta = torch.stack([torch.stack([a, b, tx], -1), torch.stack([c, d, ty], -1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def _rotate(self, x, m):
        angle = (2 * m - 1) * (30.0 / 180.0 * math.pi)  # ±30°
        cos, sin, zero = torch.cos(angle), torch.sin(angle), torch.zeros_like(m)
        return self._warp(x, cos, -sin, zero, sin, cos, zero)

    def _shear_x(self, x, m):
        s, one, zero = (2 * m - 1) * 0.3, torch.ones_like(m), torch.zeros_like(m)
        return self._warp(x, one, s, zero, zero, one, zero)

    def _shear_y(self, x, m):
        s, one, zero = (2 * m - 1) * 0.3, torch.ones_like(m), torch.zeros_like(m)
        return self._warp(x, one, zero, zero, s, one, zero)

    def _translate_x(self, x, m):
        t, one, zero = (2 * m - 1) * 0.3 * 2, torch.ones_like(m), torch.zeros_like(m)  # grid spans 2
        return self._warp(x, one, zero, t, zero, one, zero)

    def _translate_y(self, x, m):
        t, one, zero = (2 * m - 1) * 0.3 * 2, torch.ones_like(m), torch.zeros_like(m)
        return self._warp(x, one, zero, zero, zero, one, t)

    def _cutout(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n, _, h, w = x.shape
        frac = torch.rand(n, generator=g, dtype=torch.float64) * self.cutout
        cy = torch.randint(h, (n,), generator=g)
        cx = torch.randint(w, (n,), generator=g)
        sh = (frac * h).round().long()
        sw = (frac * w).round().long()
        top, left = cy - sh // 2, cx - sw // 2
        ar_h, ar_w = torch.arange(h)[None, :], torch.arange(w)[None, :]
        in_h = (ar_h >= top[:, None]) & (ar_h < (top + sh)[:, None])
        in_w = (ar_w >= left[:, None]) & (ar_w < (left + sw)[:, None])
        keep = ~(in_h[:, :, None] & in_w[:, None, :])
        return x * keep.unsqueeze(1).to(x.device, x.dtype)
