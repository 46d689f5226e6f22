"""SyntheticSet: the product of every condensation method, saved without pickles.

Images live in the space the method trained in: the dataset's normalisation, or ZCA
space when ``zca`` holds a fitted whitening (then ``ZCAWhitening.inverse`` maps them
back to the normalised space, and evaluation whitens the test set the same way).
Labels are int64 class ids ``[N]`` or float32 probability rows ``[N, K]`` (methods that
learn logits store ``softmax(logits)``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data.datasets import DatasetInfo
from .serial import load_tree, save_tree

KIND = "synthetic_set"
FORMAT_VERSION = 1


@dataclass
class SyntheticSet:
    images: torch.Tensor  # [N, C, H, W] float32
    labels: torch.Tensor  # [N] int64, or [N, K] float32 probabilities
    dataset: dict[str, Any]  # DatasetInfo.to_dict() plus "zca": bool
    method: str
    config: dict[str, Any] = field(default_factory=dict)
    syn_lr: float | None = None  # learned step size (TM methods): the evaluation lr by default
    iteration: int = 0
    zca: dict[str, torch.Tensor] | None = None  # ZCAWhitening.state_dict() when images are whitened
    meta: dict[str, Any] = field(default_factory=dict)  # provenance (expert model, store, seed, ...)

    def __post_init__(self) -> None:
        if not isinstance(self.images, torch.Tensor) or self.images.dim() != 4:
            raise ValueError(f"synthetic images must be a tensor [N, C, H, W], got "
                             f"{tuple(getattr(self.images, 'shape', ())) or type(self.images).__name__}")
        n = self.images.shape[0]
        lab = self.labels
        if lab.dim() == 1:
            if lab.dtype != torch.int64:
                raise ValueError(f"hard synthetic labels must be int64, got {lab.dtype}")
        elif lab.dim() != 2 or not lab.is_floating_point():
            raise ValueError(f"synthetic labels must be int64 [N] or float [N, K], got {lab.dtype} {tuple(lab.shape)}")
        if lab.shape[0] != n:
            raise ValueError(f"{n} synthetic images but {lab.shape[0]} labels")
        for key in ("name", "channels", "resolution", "num_classes", "mean", "std"):
            if key not in self.dataset:
                raise ValueError(f"synthetic set dataset info lacks {key!r}")
        if lab.dim() == 2 and lab.shape[1] != self.dataset["num_classes"]:
            raise ValueError(f"soft labels have {lab.shape[1]} columns, dataset has {self.dataset['num_classes']} classes")

    # ------------------------------------------------------------------ views
    @property
    def info(self) -> DatasetInfo:
        d = self.dataset
        return DatasetInfo(name=d["name"], channels=int(d["channels"]), resolution=tuple(d["resolution"]),
                           num_classes=int(d["num_classes"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
                           class_names=tuple(d.get("class_names", ())), flip_ok=bool(d.get("flip_ok", True)))

    @property
    def soft(self) -> bool:
        return self.labels.dim() == 2

    @property
    def hard_labels(self) -> torch.Tensor:
        return self.labels.argmax(1) if self.soft else self.labels

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def zca_whitening(self):
        """The fitted ZCAWhitening the images live in, or None."""
        if self.zca is None:
            return None
        from ..data.zca import ZCAWhitening

        return ZCAWhitening.from_state_dict(self.zca)

    def pixels(self) -> torch.Tensor:
        """Images in [0, 1]-ish pixel space for viewing: ZCA-inverted, then unnormalised."""
        x = self.images.detach().float().cpu()
        zca = self.zca_whitening()
        if zca is not None:
            x = zca.inverse(x)
        mean = torch.tensor(self.dataset["mean"], dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.dataset["std"], dtype=x.dtype).view(1, -1, 1, 1)
        return x * std + mean

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write to ``path`` (safetensors: tensors + JSON metadata; temp file + os.replace)."""
        return save_tree(path, {
            "format_version": FORMAT_VERSION,
            "images": self.images.detach().float(),
            "labels": self.labels.detach(),
            "dataset": self.dataset, "method": self.method, "config": self.config,
            "syn_lr": None if self.syn_lr is None else float(self.syn_lr),
            "iteration": int(self.iteration), "zca": self.zca, "meta": self.meta,
        }, kind=KIND)


def load_synthetic(path: str | os.PathLike) -> SyntheticSet:
    """Read a set written by ``SyntheticSet.save`` (no pickles: safe on untrusted files)."""
    tree = load_tree(path, kind=KIND)
    version = tree.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: synthetic set format version {version} is not supported (expected {FORMAT_VERSION})")
    return SyntheticSet(**tree)
