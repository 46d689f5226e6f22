"""One trajectory, end to end, without Ray: data -> recipe -> store.

The Ray workers call ``run_trajectories`` (one task, or a pack trained together); so do the ``local`` backend,
the benchmarks and the tests.
"""
from __future__ import annotations

import contextlib
import dataclasses
import platform
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ..data.datasets import DatasetInfo, ImageDataset, load_dataset
from ..models import ModelSpec, ParamLayout, build_model
from ..store import TrajectoryStore, lineage_id, trajectory_id
from ..training import resolve_device
from .recipes import RecipeContext, ResumePoint, get_recipe
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
    engine: str = "eager"  # how the training steps run (FarmSpec.engine; not hashed: the same trajectory)
    # a stored shorter trajectory of the same lineage (prefix-exact recipes) this one extends, and its last epoch
    extend_from: str | None = None
    extend_epoch: int | None = None

    def payload(self) -> dict[str, Any]:
        """What the trajectory id hashes (and, without its length options, the lineage id)."""
        payload = {"recipe": self.recipe, "recipe_config": self.recipe_config, "model": self.model,
                   "dataset": self.dataset, "seed": self.seed, "dtype": self.dtype}
        if self.precision != "fp32":  # hashed only when set: fp32 keeps the ids farmed before the option existed
            payload["precision"] = self.precision
        return payload

    def stored_epochs(self) -> set[int]:
        """The epochs its file will store: 0..keep_epochs (all without it) and the last one."""
        epochs = int(self.recipe_config["epochs"])
        keep_to = self.recipe_config.get("keep_epochs")
        return set(range(0, (epochs if keep_to is None else min(keep_to, epochs)) + 1)) | {epochs}


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
        config = recipe.prepare(config, spec.store, dataset, model)
    recipe_config = config.to_dict()
    tasks = []
    for seed in spec.seeds:
        task = TrajectoryTask("", seed, spec.recipe, recipe_config, model, dataset, spec.dtype, spec.store,
                              spec.precision, spec.engine)
        tasks.append(dataclasses.replace(task, trajectory_id=trajectory_id(task.payload())))
    return tasks


def link_prefixes(tasks: list[TrajectoryTask], store: TrajectoryStore) -> tuple[list[TrajectoryTask], dict[str, str]]:
    """For a prefix-exact recipe (``Recipe.prefix_exact``): the tasks that a stored trajectory of the same lineage
    already serves — it stores every epoch the task would — as {task id: serving id}, and the tasks a shorter
    stored one can be extended into (``extend_from``: the longest resumable one holding every epoch the task
    stores up to its last). Other tasks are returned unchanged."""
    if not tasks or not get_recipe(tasks[0].recipe).prefix_exact:
        return tasks, {}
    first = tasks[0]
    lineages: dict[str, list] = {}
    for info in store.list(dataset=first.dataset["name"], kind=get_recipe(first.recipe).kind,
                           model=first.model["name"]):
        try:
            lineages.setdefault(info.lineage, []).append(info)
        except KeyError:  # metadata without a field the lineage needs: not a farm's trajectory
            continue
    served: dict[str, str] = {}
    linked = []
    for task in tasks:
        family = lineages.get(lineage_id(task.payload()), [])
        wanted = task.stored_epochs()
        if store.exists(task.trajectory_id) or not family:
            linked.append(task)
            continue
        covering = [i for i in family if wanted <= set(i.epochs)]
        if covering:
            served[task.trajectory_id] = max(covering, key=lambda i: (len(i.epochs), i.trajectory_id)).trajectory_id
            linked.append(task)
            continue
        last = max(wanted)
        prefixes = [i for i in family if i.resumable and i.epochs[-1] < last
                    and {e for e in wanted if e <= i.epochs[-1]} <= set(i.epochs)]
        if prefixes:
            source = max(prefixes, key=lambda i: (i.epochs[-1], i.trajectory_id))
            task = dataclasses.replace(task, extend_from=source.trajectory_id, extend_epoch=source.epochs[-1])
        linked.append(task)
    return linked, served


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
    if any((t.recipe, t.recipe_config, t.model, t.dataset, t.dtype, t.precision, t.engine, t.extend_epoch) !=
           (first.recipe, first.recipe_config, first.model, first.dataset, first.dtype, first.precision, first.engine,
            first.extend_epoch) for t in tasks):
        raise ValueError("trajectories trained together must share recipe, config, model, dataset, dtype, "
                         "precision, engine and the epoch they continue from")
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
    derived = None
    if recipe.derive is not None:  # once for the task's networks: their value, and metadata for their files
        derived, meta = recipe.derive(config, RecipeContext(train, test, model_spec, first.seed, dev,
                                                            store_root=first.store))
        extra.update(meta)
    start = time.perf_counter()
    with contextlib.ExitStack() as open_writers:
        writers, ctxs = [], []
        for task in tasks:
            task_extra = {**extra, "lineage": lineage_id(task.payload())} if recipe.prefix_exact else extra
            if task.extend_from is not None:
                task_extra["extended_from"] = task.extend_from
            writer = open_writers.enter_context(store.writer(
                trajectory_id=task.trajectory_id, kind=recipe.kind, recipe=task.recipe,
                recipe_config=task.recipe_config, seed=task.seed, model=task.model, **layouts, dtype=task.dtype,
                dataset=task.dataset, metric_names=list(recipe.metric_names), extra=task_extra,
            ))
            writers.append(writer)
            resume = _copy_prefix(task, store, writer) if task.extend_from is not None else None
            report = (lambda *a, _tid=task.trajectory_id: on_epoch(_tid, *a)) if on_epoch else None
            ctxs.append(RecipeContext(train, test, model_spec, task.seed, dev, report, store_root=task.store,
                                      precision=task.precision, engine=task.engine, resume_from=resume,
                                      derived=derived))
        finals = recipe.run(config, ctxs, writers) if len(tasks) > 1 else [recipe.run(config, ctxs[0], writers[0])]
    seconds = time.perf_counter() - start
    return [TrajectoryResult(t.trajectory_id, t.seed, final, seconds) for t, final in zip(tasks, finals)]


def _copy_prefix(task: TrajectoryTask, store: TrajectoryStore, writer) -> ResumePoint:
    """Copy the snapshots of the stored trajectory ``task`` extends that ``task`` stores into ``writer`` (as they
    are: the same bytes a run from the start would write) and return where its training stopped."""
    if not get_recipe(task.recipe).prefix_exact:
        raise ValueError(f"recipe {task.recipe!r} is not prefix-exact: its trajectories cannot be extended")
    with store.open(task.extend_from) as source:
        if lineage_id(task.payload()) != source.info.lineage:
            raise ValueError(f"trajectory {task.extend_from} is not a shorter run of {task.trajectory_id}")
        state = source.resume_state()
        if state is None:
            raise ValueError(f"trajectory {task.extend_from} holds no resume state: it cannot be extended")
        last = source.epochs[-1]
        wanted = task.stored_epochs()
        for row in source.metrics():
            epoch = row.pop("epoch")
            if epoch in wanted:
                writer.append(epoch, source.params(epoch), buffers=source.buffers(epoch), metrics=row)
        params = state["params"] if "params" in state else source.params(last, torch.float32).clone()
        buffers = source.buffers(last)
        return ResumePoint(last, params, None if buffers is None else buffers.float().clone(), state["generator"],
                           state.get("momentum"))
