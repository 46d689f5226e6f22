"""Published settings: one per (method, dataset, IPC) a method's paper reports, and the scales they run at.

The registry is derived from the method registry — each method config states its paper's numbers
(``reported``), its published rows (``defaults``) and how the numbers were measured (``paper``:
``PaperProtocol``) — so no table of methods lives here. A scale shrinks a setting for a smaller machine
and says so: ``paper`` runs it as published, ``cpu`` is the CPU-sized variant of benchmarks/condense.py
(300 images per class, width-32 networks, 200 iterations, a few short trajectories, 2 evaluation
networks × 200 epochs), ``tiny`` is a smoke run that checks the pipeline end to end in seconds to a minute (on digits: ``--on digits``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..farm.recipes import get_recipe
from ..methods import METHODS, get_method
from ..methods.base import PaperProtocol
from ..plan import Shrink, farm_jobs, plan_config
from ..validation import check_int


@dataclass(frozen=True)
class ReproScale:
    """How far a published setting is shrunk; every departure is listed by ``departures``."""

    name: str
    train_per_class: int | None = None  # a class-balanced subset of the training split
    width: int | None = None  # ConvNet width of the farmed and the evaluation networks
    teacher_width: int | None = None  # width of a farmed teacher that is not a ConvNet (SSD's ResNet-18)
    iterations: int | None = None  # cap on the condensation iterations
    trajectories: int | None = None  # cap on the trajectories farmed per recipe
    epochs: int | None = None  # cap on their epochs
    syn_steps: int | None = None  # cap on unrolled student steps (trajectory matching)
    eval_models: int | None = None  # cap on evaluation networks
    eval_epochs: int | None = None  # cap on their epochs
    ipc: int | None = None  # cap on images per class: the published row's knobs on fewer images (smoke runs)
    knobs: tuple[tuple[str, Any], ...] = ()  # method knobs set at this scale, in the methods that have them

    def departures(self) -> str:
        listed = self._size_departures()
        if self.knobs:
            listed.append(", ".join(f"{k}={v}" for k, v in self.knobs) + " where the method has the knob")
        return ", ".join(listed) or "none (the paper's protocol)"

    def _size_departures(self) -> list[str]:
        fields = [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self) if f.name not in ("name", "knobs")]
        return [f"{k.replace('_', ' ')} {v}" for k, v in fields if v is not None]

    @property
    def shrinks(self) -> bool:
        """Whether the scale shrinks the published setting (sizes, counts, epochs), not only sets knobs."""
        return bool(self._size_departures())

    def capped(self, trajectories: int | None = None, epochs: int | None = None) -> "ReproScale":
        """This scale with fewer (or shorter) trajectories farmed per recipe, e.g. the paper's protocol with 8
        of its 100 experts on a machine lent for minutes; the caps are departures, listed as such."""
        check_int("trajectories", trajectories, none_ok=True)
        check_int("trajectory_epochs", epochs, none_ok=True)

        def cap(new: int | None, old: int | None) -> int | None:
            return old if new is None else new if old is None else min(new, old)

        return dataclasses.replace(self, trajectories=cap(trajectories, self.trajectories),
                                   epochs=cap(epochs, self.epochs))



SCALES: dict[str, ReproScale] = {
    "paper": ReproScale("paper"),
    "cpu": ReproScale("cpu", train_per_class=300, width=32, iterations=200, trajectories=4, epochs=10,
                      syn_steps=20, eval_models=2, eval_epochs=200),
    # the tiny experts and teacher (a few dozen SGD steps) classify too few images correctly for DATM's
    # selection of correctly classified images and SSD's teacher-agreed labels; digits has < 200 images per
    # class, fewer than DANCE/PTLM's IPC-50 rows initialise from: the smoke run says so and steps around it
    "tiny": ReproScale("tiny", train_per_class=100, width=16, teacher_width=16, iterations=2, trajectories=1,
                       epochs=8, syn_steps=2, eval_models=1, eval_epochs=2, ipc=10,
                       knobs=(("init_correct", False), ("syn_labels", "hard"))),
}


@dataclass(frozen=True)
class PublishedSetting:
    name: str  # "<method>_<dataset>_ipc<k>"
    method: str
    dataset: str
    ipc: int
    paper_acc: float  # %, the paper's number under its own protocol
    paper: PaperProtocol

    @property
    def iterations(self) -> int:
        """The paper's iteration count for this row (the published config's planned length)."""
        return get_method(self.method).config_cls.defaults(self.dataset, self.ipc).planned_iterations

    def plan(self, scale: ReproScale, on: str | None = None) -> tuple[Any, list[tuple[Any, int, int | None]]]:
        """(config, farm jobs) of a run at ``scale``, by the one planner (``raydd.plan``: its order): the
        published row (on dataset ``on`` when given: a smoke run elsewhere, at most ``scale.ipc`` images per
        class), the scale's knobs and ``--set`` (``scale.knobs``, where the method has them), the scaled
        iteration count, the scale's shrinking; one farm job per trajectory need as (need, count, epochs): the
        paper's count and epochs (else the method's own need), capped by the scale, never below what the
        config reads."""
        fields = {f.name for f in dataclasses.fields(get_method(self.method).config_cls)}
        shrink = Shrink(width=scale.width, syn_steps=scale.syn_steps, trajectories=scale.trajectories,
                        epochs=scale.epochs) if scale.shrinks else None
        config, sizes = plan_config(self.method, self.dataset, self.ipc, iterations=self.run_iterations(scale),
                                    knobs={k: v for k, v in scale.knobs if k in fields}, on=on, ipc_cap=scale.ipc,
                                    shrink=shrink, trajectories=self.paper.trajectories)
        return config, [(job.need, job.count, job.epochs) for job in farm_jobs(config, sizes)]

    def departures(self, scale: ReproScale, on: str | None = None) -> str:
        """What the run of this setting at ``scale`` does differently from the paper: the scale's caps that bind
        for this setting (an IPC cap above its IPC, trajectory caps for a method that reads none, or an epoch
        cap above what a prefix-exact recipe farms, are not departures) and the knobs it sets that the method
        has."""
        published = get_method(self.method).config_cls.defaults(self.dataset, self.ipc)
        config, jobs = self.plan(scale, on)
        listed = []
        if scale.train_per_class is not None:
            listed.append(f"train per class {scale.train_per_class}")
        if scale.width is not None:
            listed.append(f"width {scale.width}")
        if scale.teacher_width is not None and any(need.role == "teacher" and need.model_fields().get("arch")
                                                   not in (None, "convnet") for need, _, _ in jobs):
            listed.append(f"teacher width {scale.teacher_width}")
        if scale.iterations is not None and scale.iterations < self.iterations:
            listed.append(f"iterations {scale.iterations}")
        for need, count, epochs in jobs:
            paper_count, paper_epochs = self.paper.trajectories.get(need.recipe, (None, None))
            if scale.trajectories is not None and count < (paper_count or need.count):
                listed.append(f"trajectories {count}")
            recipe = get_recipe(need.recipe)
            full = paper_epochs or need.epochs or recipe.config_cls().epochs  # the paper's, else the recipe's
            if scale.epochs is not None and epochs is not None and epochs < full and not recipe.prefix_exact:
                listed.append(f"{need.recipe} epochs {epochs}")
        if scale.syn_steps is not None and getattr(config, "syn_steps", None) is not None \
                and config.syn_steps < published.syn_steps:
            listed.append(f"syn steps {config.syn_steps}")
        settings, paper_eval = self.eval_settings(scale), self.paper.eval
        if scale.eval_models is not None and settings.get("num_models", 5) < paper_eval.get("num_models", 5):
            listed.append(f"eval models {settings['num_models']}")
        if scale.eval_epochs is not None and settings.get("epochs", 300) < paper_eval.get("epochs", 300):
            listed.append(f"eval epochs {settings['epochs']}")
        if scale.ipc is not None and self.ipc > scale.ipc:
            listed.append(f"ipc {scale.ipc}")
        fields = {f.name for f in dataclasses.fields(published)}
        knobs = [(k, v) for k, v in scale.knobs if k in fields]
        if knobs:
            listed.append(", ".join(f"{k}={v}" for k, v in knobs))
        return ", ".join(dict.fromkeys(listed)) or "none (the paper's protocol)"

    def run_iterations(self, scale: ReproScale) -> int:
        return min(self.iterations, scale.iterations or self.iterations)

    def eval_settings(self, scale: ReproScale) -> dict[str, Any]:
        """The paper's evaluation (protocol settings), shrunk to ``scale``."""
        settings = dict(self.paper.eval)
        if scale.eval_models is not None:
            settings["num_models"] = min(settings.get("num_models", 5), scale.eval_models)
        if scale.eval_epochs is not None:
            settings["epochs"] = min(settings.get("epochs", 300), scale.eval_epochs)
        if scale.width is not None and settings.get("protocol", "standard") == "standard":
            model = settings.get("model", "convnet")
            if model == "convnet" or (isinstance(model, dict) and model.get("arch", "convnet") == "convnet"):
                settings["model"] = {**(model if isinstance(model, dict) else {}), "arch": "convnet",
                                     "width": scale.width}
        return settings


def published_settings() -> dict[str, PublishedSetting]:
    """Every (method, dataset, IPC) a registered method's paper reports, by name."""
    out: dict[str, PublishedSetting] = {}
    for name, cls in METHODS.items():
        config_cls = cls.config_cls
        if config_cls.paper is None:
            continue
        for (dataset, ipc), acc in sorted(config_cls.reported.items()):
            key = f"{name}_{dataset}_ipc{ipc}"
            out[key] = PublishedSetting(key, name, dataset, ipc, float(acc), config_cls.paper)
    return out


def get_setting(name: str) -> PublishedSetting:
    settings = published_settings()
    if name not in settings:
        close = [s for s in settings if name.split("_")[0] == s.split("_")[0]] or list(settings)
        raise ValueError(f"unknown published setting {name!r}: e.g. {', '.join(close[:6])} "
                         f"(raydd reproduce --list shows all {len(settings)})")
    return settings[name]


def get_scale(name: str) -> ReproScale:
    if name not in SCALES:
        raise ValueError(f"scale {name!r} is invalid: accepted {', '.join(SCALES)}")
    return SCALES[name]
