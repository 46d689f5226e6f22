"""Seeded, class-balanced labelled/unlabelled split for semi-supervised experiments."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SemiSupervisedSplit", "semi_supervised_split"]


@dataclass(frozen=True, eq=False)
class SemiSupervisedSplit:
    """Sorted int64 index tensors into the dataset; together they cover it exactly once."""

    labelled: Tensor
    unlabelled: Tensor
    fraction: float
    seed: int

    @property
    def num_labelled(self) -> int:
        return int(self.labelled.numel())

    @property
    def num_unlabelled(self) -> int:
        return int(self.unlabelled.numel())

    def labelled_mask(self) -> Tensor:
        """Boolean mask over the whole dataset, True where the sample is labelled."""
        mask = torch.zeros(self.num_labelled + self.num_unlabelled, dtype=torch.bool)
        mask[self.labelled] = True
        return mask


def semi_supervised_split(labels: Tensor, fraction: float = 0.1, seed: int = 0,
                          min_per_class: int = 1) -> SemiSupervisedSplit:
    """Pick ``max(min_per_class, round(fraction * n_c))`` (capped at ``n_c``) labelled samples per class.

    ``round`` is half-up. Draws come from a local ``torch.Generator`` seeded with ``seed``, so
    the split depends only on (labels, fraction, seed, min_per_class), never on global RNG state.
    """
    if not isinstance(labels, Tensor) or labels.dim() != 1:
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"semi_supervised_split labels {shape} are invalid; expected a 1-D tensor of class ids")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"semi_supervised_split labels dtype {labels.dtype} is invalid; expected an integer tensor")
    if labels.numel() == 0:
        raise ValueError("semi_supervised_split labels are empty; expected at least one sample")
    if (isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or math.isnan(fraction)
            or not 0.0 < fraction <= 1.0):
        raise ValueError(f"semi_supervised_split fraction={fraction!r} is invalid; accepted: a number in (0, 1]")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"semi_supervised_split seed={seed!r} is invalid; expected a non-negative int")
    if isinstance(min_per_class, bool) or not isinstance(min_per_class, int) or min_per_class < 0:
        raise ValueError(f"semi_supervised_split min_per_class={min_per_class!r} is invalid; expected an int >= 0")

    labels = labels.detach().to("cpu", torch.int64)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    chosen = []
    for cls in torch.unique(labels, sorted=True).tolist():  # fixed class order => reproducible draws
        members = torch.nonzero(labels == cls, as_tuple=False).flatten()
        n_c = members.numel()
        k = min(n_c, max(min_per_class, math.floor(fraction * n_c + 0.5)))
        chosen.append(members[torch.randperm(n_c, generator=generator)[:k]])
    labelled = torch.sort(torch.cat(chosen)).values
    mask = torch.ones(labels.numel(), dtype=torch.bool)
    mask[labelled] = False
    unlabelled = torch.nonzero(mask, as_tuple=False).flatten()
    return SemiSupervisedSplit(labelled=labelled, unlabelled=unlabelled, fraction=float(fraction), seed=seed)
