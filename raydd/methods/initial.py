"""The synthetic set's starting point as the reference codes draw it: the class of each image, and real images
picked at random per class (``pix_init='real'``, DM's ``init='real'``, EDC's Sec. 3.2 ③)."""
from __future__ import annotations

from collections.abc import Sequence

import torch


def class_labels(num_classes: int, ipc: int) -> torch.Tensor:
    """The class of each synthetic image, class by class: ``[0]*ipc + [1]*ipc + ...`` (int64)."""
    return torch.arange(num_classes).repeat_interleave(ipc)


def random_real_indices(class_indices: Sequence[torch.Tensor], per_class: int,
                        generator: torch.Generator) -> torch.Tensor:
    """Indices of ``per_class`` random images of each class, class by class: one permutation of each class's
    indices drawn from ``generator`` in class order, its first ``per_class`` kept."""
    return torch.cat([idx[torch.randperm(len(idx), generator=generator)[:per_class]] for idx in class_indices])
