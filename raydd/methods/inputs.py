"""What a method reads from the trajectory store, found and checked in one place.

A method's config declares its inputs as ``TrajectoryNeed``s (``MethodConfig.needs()``): the
farm recipe that writes them, the store kinds that serve, the epochs it reads, its model and ZCA
filters, explicit ids, how many it needs. ``StoreInputs`` (built by ``CondensationMethod``)
then, for every method alike:

- finds the matching trajectories (``find``): dataset, kind, model, ids, ZCA space, normalisation,
  one model only where the method needs one, and that their networks fit the training data;
- renders the exact ``raydd farm ...`` command for what is missing (``farm_command``), used in
  every "nothing to read" error, by ``raydd methods`` and by sweeps that farm for their methods;
- rebuilds the farm's training view once (``training_view``: the class-balanced subset the farm
  trained on and the ZCA whitening it fitted), and warns when the data differs from the farm's;
- hands out open trajectories (``params``, an LRU of open files) and frozen networks at an epoch
  (``network``); every snapshot read is crc32-checked by the store, and a corrupt trajectory is
  reported once (``skip``: a CorruptTrajectoryWarning naming the file and epoch) so the method can
  go on with the healthy ones.

Everything here is plain torch/pyarrow: no Ray.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from ..data.datasets import ImageDataset
from ..models import ModelSpec, build_model, load_flat_params
from ..models.spec import fields_from_name
from ..store import CorruptTrajectoryError, CorruptTrajectoryWarning

NORM_NAMES = {"batch": "BatchNorm", "instance": "instance norm", "none": "no norm"}


@dataclass(frozen=True)
class TrajectoryNeed:
    """One kind of trajectory a method reads (see the module doc)."""

    recipe: str  # the farm recipe that writes them (the farm command uses it)
    role: str = "trajectories"  # what messages call them: experts, observers, students, ...
    kinds: tuple[str, ...] | None = None  # store kinds that serve, searched in this order; None: the recipe's
    epochs: int | None = None  # the highest epoch it reads (farm --epochs); None: the recipe's default
    count: int = 1  # how many it needs at least (farm --trajectories)
    model: str | None = None  # store model-name filter, e.g. 'convnet3-w128-in'
    zca: bool | None = None  # trained on ZCA-whitened data (True/False); None: either, but one space
    zca_knob: bool = False  # the method has a 'zca' knob (errors then suggest --set zca=...)
    norm: str | None = None  # the normalisation it needs ('batch': BatchNorm statistics)
    ids: tuple[str, ...] | None = None  # exactly these trajectory ids (in this order)
    one_model: bool = True  # all of one model (several stored models is then an error naming them)
    recipe_config: tuple[tuple[str, Any], ...] = ()  # recipe-config entries they must have (SSD: their teacher)
    farm_model: tuple[tuple[str, Any], ...] = ()  # model fields the farm command suggests, e.g. arch resnet18

    def store_kinds(self) -> tuple[str, ...]:
        if self.kinds is not None:
            return self.kinds
        from ..farm.recipes import get_recipe

        return (get_recipe(self.recipe).kind,)

    def filters(self, dataset: str) -> str:
        kinds = " or ".join(self.store_kinds())
        return ", ".join(f"{k}={v}" for k, v in (("dataset", dataset), ("kind", kinds), ("model", self.model)) if v)

    def model_fields(self) -> dict[str, Any]:
        """ModelSpec fields the farm must use: the suggested ones, the model filter, the normalisation."""
        fields = dict(self.farm_model)
        if self.model is not None:
            fields.update(fields_from_name(self.model))
        if self.norm is not None:
            fields["norm"] = self.norm
        return fields

    def farm_fields(self, *, count: int | None = None, epochs: int | None = None) -> dict[str, Any]:
        """The FarmSpec fields that farm these trajectories: recipe, its epochs, model, data space, and how
        many (``count`` and ``epochs`` given replace the need's own; without ``count``, a need of one leaves
        the count to the farm's default)."""
        epochs = self.epochs if epochs is None else epochs
        options = {**dict(self.recipe_config), **({} if epochs is None else {"epochs": epochs})}
        fields = {"recipe": self.recipe, "recipe_options": options,
                  "model": self.model_fields(), "zca": bool(self.zca)}
        if count is not None or self.count > 1:
            fields["trajectories"] = self.count if count is None else count
        return fields

    def describe(self) -> str:
        """One line for ``raydd methods``: what is read and how much of it."""
        parts = [f"{self.role}: store kind {' or '.join(self.store_kinds())} (recipe {self.recipe})"]
        if self.epochs is not None:
            parts.append(f"epochs 0..{self.epochs}")
        parts.append(f">= {self.count}" if self.count > 1 else "at least 1")
        for key, value in (("model", self.model), ("zca", self.zca), ("norm", self.norm), ("ids", self.ids)):
            if value is not None:
                parts.append(f"{key}={value}")
        return ", ".join(parts)


def farm_command(need: TrajectoryNeed, dataset: str, store_root: str, *, data_root: str | None = None) -> str:
    """The ``raydd farm`` command that writes what ``need`` asks for."""
    fields = need.farm_fields()
    words = ["raydd farm", f"--recipe {fields['recipe']}"]
    words += [f"--{key} {fields['model'][key]}" for key in ("norm", "arch", "depth", "width") if key in fields["model"]]
    words += [f"--dataset {dataset}", f"--store {store_root}"]
    if data_root:
        words.append(f"--data-root {data_root}")
    if "epochs" in fields["recipe_options"]:
        words.append(f"--epochs {fields['recipe_options']['epochs']}")
    words += [f"--set {key}={value}" for key, value in fields["recipe_options"].items() if key != "epochs"]
    if "trajectories" in fields:
        words.append(f"--trajectories {fields['trajectories']}")
    if fields["zca"]:
        words.append("--zca")
    return " ".join(words)


def farm_commands(needs: Iterable[TrajectoryNeed], dataset: str, store_root: str, *,
                  data_root: str | None = None) -> str:
    """The farm commands of several needs, in order ("A, then B")."""
    return ", then ".join(farm_command(n, dataset, store_root, data_root=data_root) for n in needs)


def longest_of_each_lineage(infos: list) -> list:
    """``infos`` with one trajectory per lineage of a prefix-exact recipe (one training run stored at several
    lengths): the one storing the most snapshots; order kept."""
    from ..farm.recipes import RECIPES

    longest: dict[str, Any] = {}
    for info in infos:
        recipe = RECIPES.get(info.recipe)
        if recipe is not None and recipe.prefix_exact:
            key = info.lineage
            if key not in longest or len(info.epochs) > len(longest[key].epochs):
                longest[key] = info
    return [i for i in infos if not (RECIPES.get(i.recipe) and RECIPES[i.recipe].prefix_exact)
            or longest[i.lineage] is i]


def fits(spec: dict, info) -> bool:
    """A stored network (ModelSpec dict) takes the data's images and predicts its classes."""
    return (spec["channels"], spec["num_classes"], tuple(spec["resolution"])) == \
        (info.channels, info.num_classes, tuple(info.resolution))


@dataclass
class TrainingView:
    """The data a farm trained on: its class-balanced subset and, for ZCA farms, its fitted whitening."""

    pool: ImageDataset  # in the dataset's normalisation (not whitened)
    zca: Any | None  # raydd.data.zca.ZCAWhitening or None

    def model_space(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` in the space the farm's networks saw (whitened for ZCA farms)."""
        return self.zca.transform(images) if self.zca is not None else images


class StoreInputs:
    """A method's view of the store: ``find``, ``farm_command``, ``training_view``, ``params``, ``network``.

    ``needs`` are all the method's needs (the farm command in errors names every one of them, in
    order: an SSD teacher before its students).
    """

    max_open = 32  # open trajectory files kept (least recently used closed first)

    def __init__(self, store, train: ImageDataset, dataset: str, needs: tuple[TrajectoryNeed, ...] = ()) -> None:
        self.store = store
        self.train = train
        self.dataset = dataset
        self.needs = tuple(needs)
        self._open: dict[str, Any] = {}
        self._views: dict[tuple, TrainingView] = {}
        self.corrupt: dict[str, str] = {}  # trajectory id -> why it is skipped

    # ------------------------------------------------------------------ commands
    def farm_command(self, *needs: TrajectoryNeed) -> str:
        """The farm command(s) for ``needs`` (default: all of the method's)."""
        return farm_commands(needs or self.needs, self.dataset, self.store.root,
                             data_root=(self.train.source or {}).get("root"))

    def missing(self, message: str, *needs: TrajectoryNeed) -> ValueError:
        """A one-line ValueError: ``message`` followed by the farm command(s)."""
        return ValueError(f"{message}: {self.farm_command(*needs)}")

    # ------------------------------------------------------------------ discovery
    def list(self, need: TrajectoryNeed) -> list:
        """The stored trajectories of ``need``'s dataset, kinds, model and recipe config (unchecked)."""
        infos = [i for kind in need.store_kinds() for i in self.store.list(dataset=self.dataset, kind=kind,
                                                                             model=need.model)]
        wanted = dict(need.recipe_config)
        return [i for i in infos if all(i.meta.get("recipe_config", {}).get(k) == v for k, v in wanted.items())]

    def find(self, need: TrajectoryNeed) -> list:
        """The TrajectoryInfos that serve ``need`` (checked, store order; ``need.ids`` order if given). Of a
        prefix-exact recipe's trajectories of one lineage (one training run stored at several lengths, e.g. after
        an extension) only the one storing the most snapshots is kept: each run is one trajectory."""
        store, shown, role = self.store, need.filters(self.dataset), need.role
        infos = longest_of_each_lineage(self.list(need))
        if not infos:
            noun = role if role.endswith("trajectories") else "trajectories"
            raise self.missing(f"no {noun} in store {store.root} match {shown}; farm {role} first")
        if need.ids is not None:
            by_id = {i.trajectory_id: i for i in infos}
            absent = [t for t in need.ids if t not in by_id]
            if absent:
                ids = ", ".join(list(by_id)[:5])
                raise ValueError(f"trajectory {absent[0]!r} is not in store {store.root} among the {len(infos)} "
                                 f"{role} matching {shown} (available: {ids}; raydd store ls {store.root} --kind "
                                 f"{need.store_kinds()[0]})")
            infos = [by_id[t] for t in dict.fromkeys(need.ids)]
        infos = self._one_space(need, infos, shown)
        if need.norm is not None:
            wrong = [i for i in infos if i.meta["model"].get("norm") != need.norm]
            if wrong:
                i = wrong[0]
                raise self.missing(f"{i.trajectory_id} ({i.model_name}) has norm={i.meta['model'].get('norm')!r} "
                                   f"but {NORM_NAMES[need.norm]} {role} are needed")
        models = sorted({i.model_name for i in infos})
        if need.one_model and len(models) > 1:
            raise ValueError(f"store {store.root} holds {role} matching {shown} for several models {models}: "
                             f"choose one with --set model=NAME")
        usable = [i for i in infos if fits(i.meta["model"], self.train.info)]
        if not usable:
            spec, info = infos[0].meta["model"], self.train.info
            raise ValueError(f"the {len(infos)} {role} matching {shown} in {store.root} ({spec['name']}: "
                             f"{spec['channels']}ch, {tuple(spec['resolution'])}, {spec['num_classes']} classes) do "
                             f"not fit the training data {info.name} ({info.channels}ch, {tuple(info.resolution)}, "
                             f"{info.num_classes} classes): load the dataset at their resolution")
        return usable

    def _one_space(self, need: TrajectoryNeed, infos: list, shown: str) -> list:
        """Keep the ZCA space ``need.zca`` asks for; with None, refuse a mix of both spaces."""
        zca_of = {i.trajectory_id: bool(i.meta["dataset"].get("zca", False)) for i in infos}
        if need.zca is None:
            if need.one_model and len(set(zca_of.values())) > 1:  # several networks: each keeps its own space
                raise ValueError(f"store {self.store.root} holds {need.role} matching {shown} both with and without "
                                 f"ZCA: choose one space with --set zca=true or --set zca=false")
            return infos
        matching = [i for i in infos if zca_of[i.trajectory_id] == need.zca]
        if not matching:
            space, wanted = ("without", "with") if need.zca else ("with", "without")
            knob = f"use --set zca={str(not need.zca).lower()} or " if need.zca_knob else ""
            raise self.missing(f"the {len(infos)} {need.role} matching {shown} in {self.store.root} were trained "
                               f"{space} ZCA whitening, this method works {wanted} it: {knob}farm {need.role} in "
                               f"that space")
        return matching

    # ------------------------------------------------------------------ the farm's data
    def training_view(self, meta: dict) -> TrainingView:
        """The training data as the farm that wrote ``meta`` saw it (its subset and ZCA fit), built once."""
        data = meta["dataset"]
        per_class, zca = data.get("train_per_class"), bool(data.get("zca", False))
        key = (per_class, zca)
        if key not in self._views:
            pool = self.train.per_class(per_class, seed=0) if per_class else self.train  # farm.task.prepare_data
            whitening = None
            if zca:
                from ..data.zca import ZCAWhitening

                whitening = ZCAWhitening(eps=0.1).fit(pool.images)  # the farm's fit
            self._views[key] = TrainingView(pool, whitening)
        return self._views[key]

    def check_fingerprint(self, meta: dict, role: str, consequence: str = "matching still runs") -> None:
        """Warn (once per call) when the training data is not the data the farm trained on."""
        data = meta["dataset"]
        expected = data.get("fingerprint")
        if not expected or data.get("zca"):
            return
        if self.training_view(meta).pool.fingerprint() != expected:
            warnings.warn(f"the training data differs from the data the {role} were trained on (fingerprint "
                          f"{expected}): {consequence}", stacklevel=3)

    # ------------------------------------------------------------------ reading
    def open(self, trajectory_id: str):
        """An open Trajectory (kept open for later calls; least recently used closed beyond ``max_open``)."""
        traj = self._open.pop(trajectory_id, None)
        if traj is None:
            traj = self.store.open(trajectory_id)
            while len(self._open) >= self.max_open:
                self._open.pop(next(iter(self._open))).close()
        self._open[trajectory_id] = traj
        return traj

    def params(self, trajectory_id: str, epoch: int, device: torch.device) -> torch.Tensor:
        """The flat float32 parameters of one snapshot, copied to ``device``."""
        return self.open(trajectory_id).params(epoch, dtype=torch.float32).to(device, copy=True)

    def network(self, info, device: torch.device, epoch: int | None = None) -> nn.Module:
        """The trajectory's network at ``epoch`` (default: its last), BatchNorm buffers included: eval mode,
        frozen. Its random initialisation is overwritten, so the global RNG is left untouched."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = build_model(ModelSpec.from_dict(info.meta["model"]))
        net = self.load_network(net.to(device), info.trajectory_id, epoch).eval()
        for p in net.parameters():
            p.requires_grad_(False)
        return net

    def load_network(self, net: nn.Module, trajectory_id: str, epoch: int | None = None) -> nn.Module:
        """Load one snapshot (parameters and BatchNorm buffers; default: the last) into ``net``, in place."""
        traj = self.open(trajectory_id)
        epoch = max(traj.epochs) if epoch is None else epoch
        device = next(net.parameters()).device
        buffers = traj.buffers(epoch, dtype=torch.float32)
        return load_flat_params(net, traj.params(epoch, dtype=torch.float32).to(device, copy=True),
                                None if buffers is None else buffers.to(device, copy=True))

    def skip(self, trajectory_id: str, error: CorruptTrajectoryError) -> None:
        """Note that ``trajectory_id`` is corrupt (warned once, naming the file and the epoch) and close it;
        the method goes on without it."""
        if trajectory_id not in self.corrupt:
            self.corrupt[trajectory_id] = error.reason
            warnings.warn(f"skipping corrupt trajectory {error.path}: {error.reason}", CorruptTrajectoryWarning,
                          stacklevel=2)
        traj = self._open.pop(trajectory_id, None)
        if traj is not None:
            traj.close()

    def healthy(self, infos: list, load) -> list:
        """``[load(info) for info in infos]`` without the corrupt ones (each skipped once)."""
        out = []
        for info in infos:
            try:
                out.append(load(info))
            except CorruptTrajectoryError as err:
                self.skip(info.trajectory_id, err)
        return out

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()
