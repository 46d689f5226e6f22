"""Differentiable Siamese Augmentation (DSA).

Zhao & Bilen, "Dataset Condensation with Differentiable Siamese Augmentation", ICML 2021,
as used by DC/DSA/DM/MTT. Operation set and default magnitudes follow the reference
``ParamDiffAug``/``DiffAugment`` (VICO-UoE/DatasetCondensation, utils.py); this is an
independent implementation that draws every random parameter from a *local*
``torch.Generator`` (never the global torch RNG).

Seeding semantics:

* ``dsa(x, seed=s)`` is the *siamese* mode: a single parameter set is drawn from a generator
  seeded with ``s`` and shared by every sample in the batch (the reference draws per-sample
  parameters and then copies those of sample 0; drawing one set directly gives the same
  behaviour and makes the transform independent of the batch size). Calling it on the real
  batch and on the synthetic batch with the same seed applies the same transform to both.
* ``dsa(x, generator=g)`` draws independent per-sample parameters from ``g`` (plain
  differentiable augmentation, e.g. when training an evaluation network).
* ``dsa(x)`` behaves like ``generator=`` with a fresh, OS-entropy-seeded generator.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from ...validation import check_bool, check_range

__all__ = ["DSA", "DSAConfig", "DSADraw", "DSATable", "DSA_OPS", "NO_FLIP_DATASETS", "dsa_for_dataset", "make_dsa"]

#: Accepted operation names, in the order they are applied when ``single_per_call`` is False.
DSA_OPS: tuple[str, ...] = ("color", "crop", "cutout", "flip", "scale", "rotate")
DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"  # the references' --dsa_strategy default: every op

#: Datasets of handwritten digits: a horizontal flip changes their meaning, so no flip.
NO_FLIP_DATASETS: frozenset[str] = frozenset({"digits", "mnist"})

_FLIP_PROBABILITY = 0.5  # reference prob_flip
_NO_OP_STRATEGIES = ("none",)


def standard_strides(x: Tensor) -> Tensor:
    """``x`` in row-major (NCHW) strides. The crop's gather leaves a one-channel batch in strides that
    ``is_contiguous()`` accepts but the convolution reads as channels-last; on CPU that path's input gradient
    was 8e-4 off the float64 value where the NCHW path's is 2e-7 off (measured on DANCE's loss,
    benchmarks/reference_equivalence.py --methods dance), so the copy is made whenever the strides differ."""
    if x.stride() == torch.empty(x.shape, device="meta").stride():
        return x
    return x.clone(memory_format=torch.contiguous_format)


def _parse_strategy(strategy: object) -> tuple[str, ...]:
    if not isinstance(strategy, str) or not strategy.strip():
        raise ValueError(
            f"DSAConfig.strategy={strategy!r} is invalid; expected a '_'-separated subset of "
            f"{', '.join(DSA_OPS)} (or 'none')"
        )
    if strategy.strip().lower() in _NO_OP_STRATEGIES:
        return ()
    ops = tuple(strategy.split("_"))
    unknown = [op for op in ops if op not in DSA_OPS]
    if unknown:
        raise ValueError(
            f"DSAConfig.strategy={strategy!r} has unknown op(s) {unknown}; accepted: "
            f"{', '.join(DSA_OPS)} (or 'none')"
        )
    dupes = sorted({op for op in ops if ops.count(op) > 1})
    if dupes:
        raise ValueError(f"DSAConfig.strategy={strategy!r} repeats op(s) {dupes}; list each op once")
    return ops


@dataclass(frozen=True)
class DSAConfig:
    """Parameters of DSA; defaults are those of the reference ``ParamDiffAug``."""

    strategy: str = DSA_STRATEGY  # '_'-separated subset of DSA_OPS, or 'none'
    scale: float = 1.2  # ratio_scale: per-axis scale drawn in [1/scale, scale]
    rotate_degrees: float = 15.0  # angle drawn in [-rotate_degrees, rotate_degrees]
    crop_pad_fraction: float = 0.125  # max translation as a fraction of the side
    cutout_fraction: float = 0.5  # cutout square side as a fraction of the side
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5
    single_per_call: bool = True  # reference aug_mode 'S': one op of the strategy per call
    # Sampling grid of scale and rotate (F.affine_grid/grid_sample): False is DSA's own code (VICO-UoE/
    # DatasetCondensation utils.py: torch's default since 1.3); MTT's and DATM's utils.py pass True.
    align_corners: bool = False

    def __post_init__(self) -> None:
        _parse_strategy(self.strategy)
        check_range("DSAConfig.scale", self.scale, low=1.0)
        check_range("DSAConfig.rotate_degrees", self.rotate_degrees, low=0.0, high=180.0, low_open=True)
        check_range("DSAConfig.crop_pad_fraction", self.crop_pad_fraction, low=0.0, high=1.0, low_open=True,
                    high_open=True)
        check_range("DSAConfig.cutout_fraction", self.cutout_fraction, low=0.0, high=1.0, low_open=True)
        for name in ("brightness", "saturation", "contrast"):
            check_range(f"DSAConfig.{name}", getattr(self, name), low=0.0, low_open=True)
        check_bool("DSAConfig.single_per_call", self.single_per_call, "one op per call, or every op")
        check_bool("DSAConfig.align_corners", self.align_corners, "True (MTT/DATM code) or False (DSA code)")

    @property
    def ops(self) -> tuple[str, ...]:
        """The operations of ``strategy`` in order (empty for 'none')."""
        return _parse_strategy(self.strategy)

    def without_flip(self) -> "DSAConfig":
        """Copy of this config with 'flip' removed from the strategy ('none' if nothing is left)."""
        ops = tuple(op for op in self.ops if op != "flip")
        return replace(self, strategy="_".join(ops) if ops else "none")


class DSA:
    """Differentiable (siamese) augmentation of image batches ``[N, C, H, W]``."""

    def __init__(self, config: DSAConfig | None = None) -> None:
        if config is None:
            config = DSAConfig()
        if not isinstance(config, DSAConfig):
            raise ValueError(f"DSA config={config!r} is invalid; expected a DSAConfig")
        self.config = config
        self.ops = config.ops

    def __repr__(self) -> str:
        return f"DSA({self.config!r})"

    def __call__(self, x: Tensor, seed: int | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Augment ``x`` [N,C,H,W]; differentiable w.r.t. ``x``.

        With ``seed`` the call is siamese (one parameter set for the whole batch, the same for
        every call with that seed, whatever the batch size). With ``generator`` (or neither)
        every sample gets its own parameters.
        """
        if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"DSA input {shape} is invalid; expected a floating-point tensor [N, C, H, W]")
        if seed is not None and generator is not None:
            raise ValueError("DSA got both seed and generator; pass seed (siamese) or generator (per-sample), not both")
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
                raise ValueError(f"DSA seed={seed!r} is invalid; expected a non-negative int or None")
            generator = torch.Generator(device="cpu")
            generator.manual_seed(seed)
            n_params = 1
        else:
            if generator is None:
                generator = torch.Generator(device="cpu")
                generator.manual_seed(random.SystemRandom().getrandbits(63))
            elif not isinstance(generator, torch.Generator):
                raise ValueError(f"DSA generator={generator!r} is invalid; expected a torch.Generator or None")
            n_params = x.shape[0]
        if not self.ops or x.shape[0] == 0:
            return x
        return self.apply(x, self.draw(generator, n_params, tuple(x.shape[-2:])))

    # ----------------------------------------------------------------- drawing and applying
    def draw(self, generator: torch.Generator, n: int, size: tuple[int, int]) -> "DSADraw":
        """The random parameters of one call on ``n`` parameter sets (1: siamese) for images of ``size``
        (H, W), drawn from ``generator`` in the order ``__call__`` draws them: the op pick first (one op per
        call), then each op's values in the order the op uses them."""
        if self.config.single_per_call:
            pick = int(torch.randint(len(self.ops), (1,), generator=generator, device=generator.device))
            ops = (self.ops[pick],)
        else:
            ops = self.ops
        return DSADraw(ops, {op: _DRAWS[op](self, generator, n, size) for op in ops})

    def apply(self, x: Tensor, draw: "DSADraw") -> Tensor:
        """``x`` transformed by the ops of ``draw`` with its values (differentiable w.r.t. ``x``)."""
        for op in draw.ops:
            x = _OP_FNS[op](self, x, *draw.values[op])
        return standard_strides(x)

    def table(self, draws: "list[DSADraw]", sizes: list[int]) -> "DSATable":
        """Several calls' draws as one fixed-shape table for a batch that concatenates their images (call j's
        ``sizes[j]`` images; each call's draw holds one parameter set per image): every op of the strategy
        gets a value per image (zero where the image's call did not draw that op) and, with one op per call,
        each image the index of its call's op. ``apply_table`` on the concatenated batch gives what ``apply``
        gives each call's images, while its shape never depends on which ops were drawn (a CUDA graph)."""
        total = sum(sizes)
        values: dict[str, list[Tensor]] = {}
        op_index = torch.zeros(total, dtype=torch.int64)
        start = 0
        for draw, size in zip(draws, sizes):
            if self.config.single_per_call:
                op_index[start:start + size] = self.ops.index(draw.ops[0])
            for op in self.ops:
                got = draw.values.get(op)
                if got is not None and any(len(v) != size for v in got):
                    raise ValueError(f"DSA table: a call of {size} images drew {len(got[0])} parameter sets for {op}")
                slots = values.setdefault(op, [torch.zeros(total, dtype=dt) for dt in _SLOT_DTYPES[op]])
                if got is not None:
                    for slot, v in zip(slots, got):
                        slot[start:start + size] = v
            start += size
        return DSATable(op_index if self.config.single_per_call else None,
                        {op: tuple(values[op]) for op in self.ops})

    def apply_table(self, x: Tensor, table: "DSATable") -> Tensor:
        """``x`` (the images of the table's calls, concatenated) transformed as ``apply`` transforms each call's
        images. One op per call: every op is computed on every image and each image keeps the output of its
        own op (``torch.where``: a selection, no arithmetic, so values and gradients are ``apply``'s); every
        op per call: the ops in order, as ``apply``."""
        if table.op_index is None:
            for op in self.ops:
                x = _OP_FNS[op](self, x, *table.values[op])
            return standard_strides(x)
        out = x
        for j, op in enumerate(self.ops):
            chosen = (table.op_index == j).view(-1, 1, 1, 1)
            out = torch.where(chosen, _OP_FNS[op](self, x, *table.values[op]), out)
        return standard_strides(out)

    # ----------------------------------------------------------------- parameter draws (CPU generator)
    @staticmethod
    def _rand(g: torch.Generator, n: int) -> Tensor:
        """Uniform [0,1) draws as float64 on the generator's device (dtype-independent)."""
        return torch.rand(n, generator=g, dtype=torch.float64, device=g.device)

    @staticmethod
    def _randint(g: torch.Generator, low: int, high: int, n: int) -> Tensor:
        return torch.randint(low, high, (n,), generator=g, device=g.device)

    def _draw_color(self, g, n, size):
        return self._rand(g, n), self._rand(g, n), self._rand(g, n)

    def _draw_flip(self, g, n, size):
        return (self._rand(g, n),)

    def _draw_scale(self, g, n, size):
        return self._rand(g, n), self._rand(g, n)

    def _draw_rotate(self, g, n, size):
        return (self._rand(g, n),)

    def _draw_crop(self, g, n, size):
        H, W = size
        ratio = self.config.crop_pad_fraction
        max_h, max_w = int(H * ratio + 0.5), int(W * ratio + 0.5)
        return self._randint(g, -max_h, max_h + 1, n), self._randint(g, -max_w, max_w + 1, n)

    def _cutout_size(self, H: int, W: int) -> tuple[int, int]:
        ratio = self.config.cutout_fraction
        return max(int(H * ratio + 0.5), 1), max(int(W * ratio + 0.5), 1)

    def _draw_cutout(self, g, n, size):
        H, W = size
        ch, cw = self._cutout_size(H, W)
        return self._randint(g, 0, H + (1 - ch % 2), n), self._randint(g, 0, W + (1 - cw % 2), n)

    # ----------------------------------------------------------------- operations (on drawn values)
    @staticmethod
    def _on(values: Tensor, x: Tensor) -> Tensor:
        """Drawn float64 values as ``x``'s dtype on its device, one per sample (or one for all)."""
        return values.to(device=x.device, dtype=x.dtype)

    def _color(self, x: Tensor, rb: Tensor, rs: Tensor, rc: Tensor) -> Tensor:
        c = self.config
        x = x + (self._on(rb, x).view(-1, 1, 1, 1) - 0.5) * c.brightness
        mean_c = x.mean(dim=1, keepdim=True)
        x = (x - mean_c) * (self._on(rs, x).view(-1, 1, 1, 1) * c.saturation) + mean_c
        mean_all = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - mean_all) * (self._on(rc, x).view(-1, 1, 1, 1) + c.contrast) + mean_all

    def _flip(self, x: Tensor, r: Tensor) -> Tensor:
        do_flip = (self._on(r, x) < _FLIP_PROBABILITY).view(-1, 1, 1, 1)
        return torch.where(do_flip, x.flip(3), x)

    def _warp(self, x: Tensor, theta: Tensor) -> Tensor:
        theta = theta.expand(x.shape[0], 2, 3)
        corners = self.config.align_corners
        grid = F.affine_grid(theta, list(x.shape), align_corners=corners)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=corners)

    def _scale(self, x: Tensor, rx: Tensor, ry: Tensor) -> Tensor:
        ratio = self.config.scale
        sx = self._on(rx, x) * (ratio - 1.0 / ratio) + 1.0 / ratio
        sy = self._on(ry, x) * (ratio - 1.0 / ratio) + 1.0 / ratio
        zero = torch.zeros_like(sx)
        theta = torch.stack([torch.stack([sx, zero, zero], -1), torch.stack([zero, sy, zero], -1)], 1)
        return self._warp(x, theta)

    def _rotate(self, x: Tensor, r: Tensor) -> Tensor:
        # The reference's order of operations (its rand_rotate), so its float32 rounding is the same.
        angle = (self._on(r, x) - 0.5) * 2 * self.config.rotate_degrees / 180 * math.pi
        cos, sin, zero = torch.cos(angle), torch.sin(angle), torch.zeros_like(angle)
        theta = torch.stack([torch.stack([cos, -sin, zero], -1), torch.stack([sin, cos, zero], -1)], 1)
        return self._warp(x, theta)

    def _crop(self, x: Tensor, th: Tensor, tw: Tensor) -> Tensor:
        # Translation by an integer shift with zero fill ("pad then crop").
        N, _, H, W = x.shape
        th, tw = th.to(device=x.device).expand(N), tw.to(device=x.device).expand(N)
        padded = F.pad(x, (1, 1, 1, 1))  # a zero border that out-of-range indices clamp onto
        rows = (torch.arange(H, device=x.device)[None, :] + th[:, None] + 1).clamp(0, H + 1)
        cols = (torch.arange(W, device=x.device)[None, :] + tw[:, None] + 1).clamp(0, W + 1)
        batch = torch.arange(N, device=x.device)[:, None, None]
        out = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # [N, H, W, C]
        return out.permute(0, 3, 1, 2)

    def _cutout(self, x: Tensor, top: Tensor, left: Tensor) -> Tensor:
        N, _, H, W = x.shape
        ch, cw = self._cutout_size(H, W)
        top, left = top.to(device=x.device) - ch // 2, left.to(device=x.device) - cw // 2
        ar_h = torch.arange(H, device=x.device)[None, :]
        ar_w = torch.arange(W, device=x.device)[None, :]
        in_h = (ar_h >= top[:, None]) & (ar_h < top[:, None] + ch)  # [n, H]
        in_w = (ar_w >= left[:, None]) & (ar_w < left[:, None] + cw)  # [n, W]
        keep = ~(in_h[:, :, None] & in_w[:, None, :])  # [n, H, W]
        return x * keep.unsqueeze(1).to(x.dtype)


@dataclass(frozen=True)
class DSADraw:
    """One call's drawn parameters: the ops it applies, in order, and each op's drawn values (CPU tensors with
    one entry per parameter set: 1 for a siamese call, else one per image)."""

    ops: tuple[str, ...]
    values: dict[str, tuple[Tensor, ...]]

    def repeated(self, n: int) -> "DSADraw":
        """A siamese draw (one parameter set) as ``n`` equal per-image sets: what ``apply`` broadcasts."""
        return DSADraw(self.ops, {op: tuple(v.expand(n).clone() for v in vs) for op, vs in self.values.items()})


@dataclass(frozen=True)
class DSATable:
    """Several calls' draws in a fixed shape (``DSA.table``): per op of the strategy one value per image
    (zeros where not drawn) and, with one op per call, each image's op index (None: every op applies)."""

    op_index: Tensor | None
    values: dict[str, tuple[Tensor, ...]]

    def to(self, device) -> "DSATable":
        return DSATable(None if self.op_index is None else self.op_index.to(device),
                        {op: tuple(v.to(device) for v in vs) for op, vs in self.values.items()})

    def tensors(self) -> list[Tensor]:
        """Every tensor of the table in a fixed order (to copy into a CUDA graph's static inputs)."""
        out = [] if self.op_index is None else [self.op_index]
        return out + [v for op in sorted(self.values) for v in self.values[op]]


_FLOAT, _INT = torch.float64, torch.int64
_SLOT_DTYPES = {"color": (_FLOAT,) * 3, "crop": (_INT,) * 2, "cutout": (_INT,) * 2, "flip": (_FLOAT,),
                "scale": (_FLOAT,) * 2, "rotate": (_FLOAT,)}

_DRAWS = {
    "color": DSA._draw_color,
    "crop": DSA._draw_crop,
    "cutout": DSA._draw_cutout,
    "flip": DSA._draw_flip,
    "scale": DSA._draw_scale,
    "rotate": DSA._draw_rotate,
}

_OP_FNS = {
    "color": DSA._color,
    "crop": DSA._crop,
    "cutout": DSA._cutout,
    "flip": DSA._flip,
    "scale": DSA._scale,
    "rotate": DSA._rotate,
}


def dsa_for_dataset(dataset_name: str, config: DSAConfig | None = None) -> DSA:
    """A DSA for ``dataset_name``: flip is dropped for handwritten digits ('digits', 'mnist'),
    where mirroring changes the class; kept otherwise (e.g. 'fashion_mnist', 'cifar10')."""
    if not isinstance(dataset_name, str) or not dataset_name.strip():
        raise ValueError(f"dsa_for_dataset dataset_name={dataset_name!r} is invalid; expected a non-empty string")
    if config is None:
        config = DSAConfig()
    key = dataset_name.strip().lower().replace("-", "_")
    if key in NO_FLIP_DATASETS:
        config = config.without_flip()
    return DSA(config)


def make_dsa(strategy: str = DSAConfig.strategy, *, flip_ok: bool, single_per_call: bool = True,
             align_corners: bool = False) -> DSA:
    """DSA with ``strategy`` for data whose ``DatasetInfo.flip_ok`` is ``flip_ok`` (flip dropped when False)."""
    config = DSAConfig(strategy=strategy, single_per_call=single_per_call, align_corners=align_corners)
    return DSA(config if flip_ok else config.without_flip())
