"""FarmSpec: what to farm, validated once, from flags, a YAML file or Python."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..data.datasets import check_dataset_name
from ..models.spec import ModelSpec
from ..training import ENGINES, check_precision
from ..validation import check_choice, check_int, check_range
from .recipes import RECIPES, get_recipe

STORE_DTYPES = ("float32", "float16", "bfloat16")
BACKENDS = ("ray", "local")


@dataclass(frozen=True)
class FarmSpec:
    """A farm: ``trajectories`` runs of ``recipe`` with seeds ``seed, seed+1, ...``.

    ``model`` holds ModelSpec overrides (arch, width, depth, norm, ...); channels,
    resolution and class count come from the dataset. ``recipe_options`` override
    the recipe's paper defaults (e.g. ``{"epochs": 50}``).
    """

    store: str = "raydd-store"
    dataset: str = "digits"
    data_root: str | None = None
    download: bool = False
    resolution: int | None = None
    zca: bool = False
    train_per_class: int | None = None  # class-balanced subset of the training set (quick runs)
    recipe: str = "expert"
    recipe_options: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    trajectories: int = 4
    seed: int = 0
    dtype: str = "float32"
    # Forward/loss arithmetic of the training (raydd.training.PRECISIONS): fp32, or bf16 autocast. Parameters,
    # optimizer state and the stored snapshots stay float32 (``dtype`` is the stored one). Part of the
    # trajectory id when not fp32, so fp32 ids are those of farms before the option existed.
    precision: str = "fp32"
    # How the training steps run (raydd.training.ENGINES): eager, or graph (pre-drawn randomness, data on the
    # device, CUDA graphs on CUDA: raydd.graphs). Not part of the trajectory id: the same trajectory either way.
    engine: str = "eager"
    backend: str = "ray"
    workers: int = 2
    pack: int = 1  # trajectories each worker trains together as one computation (same trajectories)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    address: str | None = None  # Ray cluster address; None: RAY_ADDRESS, else a local cluster
    max_retries: int = 2  # per trajectory, after a worker dies
    lease_ttl_s: float = 60.0  # a claim on a trajectory expires this long after its last renewal
    device: str = "auto"
    tensorboard: str | None = None  # local directory: every trajectory's per-epoch curves (raydd.store.tensorboard)

    def __post_init__(self) -> None:
        check_dataset_name(self.dataset)
        recipe = get_recipe(self.recipe)
        recipe.make_config(self.recipe_options)  # unknown keys, epochs <= 0, ... fail here
        unknown = sorted(set(self.model) - set(ModelSpec.__dataclass_fields__) - {"name"})
        if unknown:
            raise ValueError(f"unknown model option(s) {unknown}: accepted "
                             f"{sorted(k for k in ModelSpec.__dataclass_fields__ if k not in ('channels', 'num_classes', 'resolution'))}")
        ModelSpec(**{"norm": recipe.default_norm, **self.model})  # validates arch/norm/width values
        for key in ("trajectories", "workers", "pack"):
            check_int(key, getattr(self, key))
        if self.pack > 1 and not recipe.trains_together:
            together = sorted(name for name, r in RECIPES.items() if r.trains_together)
            raise ValueError(f"pack={self.pack} is invalid for recipe {self.recipe!r}: it trains one network at a "
                             f"time (pack > 1 works with {', '.join(together)})")
        check_choice("dtype", self.dtype, STORE_DTYPES)
        check_precision("precision", self.precision)
        if self.precision not in recipe.precisions:
            raise ValueError(f"precision={self.precision!r} is invalid for recipe {self.recipe!r}: it trains in "
                             f"{', '.join(recipe.precisions)} only")
        check_choice("engine", self.engine, ENGINES)
        if self.engine not in recipe.engines:
            raise ValueError(f"engine={self.engine!r} is invalid for recipe {self.recipe!r}: it trains with "
                             f"{', '.join(recipe.engines)} only")
        check_choice("backend", self.backend, BACKENDS)
        check_range("cpus_per_worker", self.cpus_per_worker, low=0, low_open=True)
        check_range("gpus_per_worker", self.gpus_per_worker, low=0)
        check_int("train_per_class", self.train_per_class, none_ok=True)
        check_int("max_retries", self.max_retries, low=0)
        check_range("lease_ttl_s", self.lease_ttl_s, low=1)
        if self.tensorboard is not None and (not isinstance(self.tensorboard, str) or not self.tensorboard
                                             or "://" in self.tensorboard):
            raise ValueError(f"tensorboard={self.tensorboard!r} is invalid: expected a local directory (or None)")
        if self.data_root is not None and not Path(self.data_root).expanduser().exists() and not self.download:
            raise ValueError(f"data_root={self.data_root!r} does not exist; point it at the dataset folder "
                             f"(e.g. ../shared/datasets) or pass --download (download=True in Python; needs "
                             f"internet)")
        if self.resolution is not None:
            from ..data.datasets import check_resolution

            check_resolution(self.resolution)

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.trajectories)]

    def recipe_config(self):
        return get_recipe(self.recipe).make_config(self.recipe_options)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FarmSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown farm spec key(s) {unknown}: accepted {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "FarmSpec":
        path = Path(path)
        if not path.exists():
            raise ValueError(f"farm spec {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"farm spec {path} must be a YAML mapping of FarmSpec fields")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data)
