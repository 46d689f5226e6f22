"""One trajectory, end to end, without Ray: data -> recipe -> store.

The Ray workers call ``run_trajectory``; so do the sequential ``local`` backend,
the benchmarks and the tests.
"""
from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ..data.datasets import DatasetInfo, ImageDataset, load_dataset
from ..models import ModelSpec, ParamLayout, build_model
from ..store import TrajectoryStore, trajectory_id
from ..training import resolve_device
from .recipes import RecipeContext, get_recipe
from .spec import FarmSpec


@dataclass(frozen=True)
class TrajectoryTask:
    """Everything a worker needs to train and publish one trajectory (plain data)."""

    trajectory_id: str
    seed: int
    recipe: str
    recipe_config: dict[str, Any]
    model: dict[str, Any]
    dataset: dict[str, Any]  # name, fingerprint, zca, resolution, train_per_class
    dtype: str
    store: str


@dataclass
class TrajectoryResult:
    trajectory_id: str
    seed: int
    final: dict[str, float]
    wall_time_s: float
    host: str = field(default_factory=platform.node)
    attempts: int = 1


@dataclass
class FarmData:
    """The training and test split as plain arrays: cheap to place in Ray's object store once."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    info: dict[str, Any]

    @classmethod
    def from_datasets(cls, train: ImageDataset, test: ImageDataset) -> "FarmData":
        return cls(train.images.numpy(), train.labels.numpy(), test.images.numpy(), test.labels.numpy(),
                   train.info.to_dict())

    def datasets(self) -> tuple[ImageDataset, ImageDataset]:
        info = DatasetInfo(**{**self.info, "resolution": tuple(self.info["resolution"]),
                              "mean": tuple(self.info["mean"]), "std": tuple(self.info["std"]),
                              "class_names": tuple(self.info["class_names"])})
        # Arrays from the object store are read-only shared memory: wrap without copying, never write.
        train = ImageDataset(_tensor(self.train_images), _tensor(self.train_labels), info, "train")
        test = ImageDataset(_tensor(self.test_images), _tensor(self.test_labels), info, "test")
        return train, test


def _tensor(array: np.ndarray) -> torch.Tensor:
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def prepare_data(spec: FarmSpec) -> FarmData:
    """Load, subset and (optionally) ZCA-whiten the data a farm trains on."""
    train = load_dataset(spec.dataset, "train", spec.data_root, download=spec.download, resolution=spec.resolution)
    test = load_dataset(spec.dataset, "test", spec.data_root, download=spec.download, resolution=spec.resolution)
    if spec.train_per_class is not None:
        train = train.per_class(spec.train_per_class, seed=0)
    if spec.zca:
        from ..data.zca import ZCAWhitening

        zca = ZCAWhitening().fit(train.images)
        train, test = zca.whiten(train), zca.whiten(test)
    return FarmData.from_datasets(train, test)


def model_spec_for(spec: FarmSpec, info: dict[str, Any]) -> ModelSpec:
    recipe = get_recipe(spec.recipe)
    return ModelSpec(**{"norm": recipe.default_norm, **{k: v for k, v in spec.model.items() if k != "name"},
                        "channels": info["channels"], "resolution": tuple(info["resolution"]),
                        "num_classes": info["num_classes"]})


def plan_tasks(spec: FarmSpec, data: FarmData, fingerprint: str) -> list[TrajectoryTask]:
    """One task per seed; the id hashes everything that determines the trajectory."""
    recipe = get_recipe(spec.recipe)
    model = model_spec_for(spec, data.info).to_dict()
    dataset = {"name": spec.dataset, "fingerprint": fingerprint, "zca": spec.zca,
               "resolution": list(data.info["resolution"]), "train_per_class": spec.train_per_class,
               "num_train": int(len(data.train_labels)), "num_classes": data.info["num_classes"]}
    config = spec.recipe_config()
    if recipe.prepare is not None:
        config = recipe.prepare(config, spec.store, dataset)
    recipe_config = config.to_dict()
    tasks = []
    for seed in spec.seeds:
        payload = {"recipe": spec.recipe, "recipe_config": recipe_config, "model": model, "dataset": dataset,
                   "seed": seed, "dtype": spec.dtype}
        tasks.append(TrajectoryTask(trajectory_id(payload), seed, spec.recipe, recipe_config, model, dataset,
                                    spec.dtype, spec.store))
    return tasks


def data_fingerprint(data: FarmData) -> str:
    train, _ = data.datasets()
    return train.fingerprint()


def run_trajectory(task: TrajectoryTask, data: FarmData, *, device: str = "auto",
                   on_epoch: Callable[[int, int, dict], None] | None = None,
                   store: TrajectoryStore | None = None) -> TrajectoryResult:
    """Train one trajectory and publish it atomically; nothing is published if training fails."""
    recipe = get_recipe(task.recipe)
    config = recipe.make_config(task.recipe_config)
    model_spec = ModelSpec.from_dict(task.model)
    train, test = data.datasets()
    dev = resolve_device(device)
    layout_net = build_model(model_spec)
    store = store or TrajectoryStore(task.store)
    start = time.perf_counter()
    writer = store.writer(
        trajectory_id=task.trajectory_id, kind=recipe.kind, recipe=task.recipe, recipe_config=task.recipe_config,
        seed=task.seed, model=task.model, param_layout=ParamLayout.of_parameters(layout_net).to_list(),
        buffer_layout=ParamLayout.of_buffers(layout_net).to_list(), dtype=task.dtype, dataset=task.dataset,
        metric_names=list(recipe.metric_names), extra={"device": str(dev)},
    )
    with writer:
        ctx = RecipeContext(train, test, model_spec, task.seed, dev, on_epoch, store_root=task.store)
        final = recipe.run(config, ctx, writer)
    return TrajectoryResult(task.trajectory_id, task.seed, final, time.perf_counter() - start)
