"""One trajectory, end to end, without Ray: data -> recipe -> store.

The Ray workers call ``run_trajectories`` (one task, or a pack trained together); so do the ``local`` backend,
the benchmarks and the tests.
"""
from __future__ import annotations

import contextlib
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
    precision: str = "fp32"  # forward/loss arithmetic (FarmSpec.precision)


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
    if data.info.get("image_format"):  # provenance: e.g. CIFAR-10 read from its JPEG copy
        dataset["image_format"] = data.info["image_format"]
    config = spec.recipe_config()
    if recipe.prepare is not None:
        config = recipe.prepare(config, spec.store, dataset)
    recipe_config = config.to_dict()
    tasks = []
    for seed in spec.seeds:
        payload = {"recipe": spec.recipe, "recipe_config": recipe_config, "model": model, "dataset": dataset,
                   "seed": seed, "dtype": spec.dtype}
        if spec.precision != "fp32":  # hashed only when set: fp32 keeps the ids farmed before the option existed
            payload["precision"] = spec.precision
        tasks.append(TrajectoryTask(trajectory_id(payload), seed, spec.recipe, recipe_config, model, dataset,
                                    spec.dtype, spec.store, spec.precision))
    return tasks


def data_fingerprint(data: FarmData) -> str:
    train, _ = data.datasets()
    return train.fingerprint()


def run_trajectory(task: TrajectoryTask, data: FarmData, *, device: str = "auto",
                   on_epoch: Callable[[int, int, dict], None] | None = None,
                   store: TrajectoryStore | None = None) -> TrajectoryResult:
    """Train one trajectory and publish it atomically; nothing is published if training fails."""
    return run_trajectories([task], data, device=device, on_epoch=(lambda tid, *a: on_epoch(*a)) if on_epoch else None,
                            store=store)[0]


def run_trajectories(tasks: list[TrajectoryTask], data: FarmData, *, device: str = "auto",
                     on_epoch: Callable[[str, int, int, dict], None] | None = None,
                     store: TrajectoryStore | None = None) -> list[TrajectoryResult]:
    """Train several trajectories of one recipe, model and dataset as one computation (the recipe's networks
    stacked: the farm's ``pack``) and publish each atomically; nothing is published if training fails.
    ``on_epoch(trajectory_id, epoch, total, metrics)``."""
    first = tasks[0]
    if any((t.recipe, t.recipe_config, t.model, t.dataset, t.dtype, t.precision) !=
           (first.recipe, first.recipe_config, first.model, first.dataset, first.dtype, first.precision)
           for t in tasks):
        raise ValueError("trajectories trained together must share recipe, config, model, dataset, dtype and "
                         "precision")
    recipe = get_recipe(first.recipe)
    if len(tasks) > 1 and not recipe.trains_together:
        raise ValueError(f"recipe {first.recipe!r} trains one network at a time: pack=1")
    config = recipe.make_config(first.recipe_config)
    model_spec = ModelSpec.from_dict(first.model)
    train, test = data.datasets()
    dev = resolve_device(device)
    layout_net = build_model(model_spec)
    layouts = {"param_layout": ParamLayout.of_parameters(layout_net).to_list(),
               "buffer_layout": ParamLayout.of_buffers(layout_net).to_list()}
    store = store or TrajectoryStore(first.store)
    extra = {"device": str(dev), "precision": first.precision, **({"trained_together": len(tasks)} if len(tasks) > 1 else {})}
    start = time.perf_counter()
    with contextlib.ExitStack() as open_writers:
        writers, ctxs = [], []
        for task in tasks:
            writers.append(open_writers.enter_context(store.writer(
                trajectory_id=task.trajectory_id, kind=recipe.kind, recipe=task.recipe,
                recipe_config=task.recipe_config, seed=task.seed, model=task.model, **layouts, dtype=task.dtype,
                dataset=task.dataset, metric_names=list(recipe.metric_names), extra=extra,
            )))
            report = (lambda *a, _tid=task.trajectory_id: on_epoch(_tid, *a)) if on_epoch else None
            ctxs.append(RecipeContext(train, test, model_spec, task.seed, dev, report, store_root=task.store,
                                      precision=task.precision))
        finals = recipe.run(config, ctxs, writers) if len(tasks) > 1 else [recipe.run(config, ctxs[0], writers[0])]
    seconds = time.perf_counter() - start
    return [TrajectoryResult(t.trajectory_id, t.seed, final, seconds) for t, final in zip(tasks, finals)]
