"""Planning a run, the one way every entry point does it.

``plan_run(method, dataset, ipc, iterations=, knobs=, shrink=, ...)`` turns what a user asked for into a
``RunPlan``: the method's config, the trajectories to farm for it (``FarmJob``: one per need the config
declares), the evaluation config and the data root. ``raydd condense``, ``raydd reproduce`` (every scale),
sweep trials and the sweep's farm section (so ``raydd quickstart``), and benchmarks/condense.py call it.

The config is built in one fixed order:

1. the method's published settings for (dataset, IPC) (``MethodConfig.defaults``);
2. ``on``: the same row run on another dataset (a smoke run of a published setting), and ``ipc_cap``;
3. the knobs (``--set``, a sweep's knobs, a scale's own knobs; aliases resolved by the config);
4. the run length (``MethodConfig.for_run``: EDC's cosine horizon, PTLM's |T|, DATM's window growth);
5. the knobs again: an explicit knob wins over what the run length plans;
6. with a ``Shrink``: the method shrunk for a small machine (``MethodConfig.scaled``) to the farm's
   per-recipe trajectory counts and epochs (the paper's or the caller's, capped by the shrink);
7. the knobs a third time: an explicit knob also wins over the shrinking.

The knobs apply before steps 4 and 6 too because those read them (DATM's window growth reads the window,
MTT's shrinking the expert epochs).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from .data.datasets import data_root_for
from .methods import Scale, get_method, make_config
from .methods.base import MethodConfig
from .methods.inputs import TrajectoryNeed


@dataclass(frozen=True)
class Shrink:
    """How far a run is shrunk for a small machine; None leaves that size as published."""

    width: int | None = None  # ConvNet width of the networks a method builds itself (DM's embedders)
    syn_steps: int | None = None  # cap on unrolled student steps (trajectory matching)
    trajectories: int | None = None  # cap on the trajectories farmed per recipe
    epochs: int | None = None  # cap on their epochs
    recipes: Mapping[str, tuple[int | None, int | None]] = dataclasses.field(default_factory=dict)  # recipe ->
    # (count cap, epochs cap) for that recipe alone (benchmarks/condense.py's --experts, --expert-epochs, ...)

    def caps(self, recipe: str) -> tuple[int | None, int | None]:
        """(count cap, epochs cap) of ``recipe``'s trajectories: the tighter of the global and its own."""
        count, epochs = self.recipes.get(recipe, (None, None))

        def tighter(a: int | None, b: int | None) -> int | None:
            return a if b is None else b if a is None else min(a, b)

        return tighter(self.trajectories, count), tighter(self.epochs, epochs)


@dataclass(frozen=True)
class FarmJob:
    """The trajectories of one need to farm: how many, and how many epochs (None: the recipe's default)."""

    need: TrajectoryNeed
    count: int
    epochs: int | None


@dataclass(frozen=True)
class RunPlan:
    method: str
    dataset: str  # the data the run reads (``on`` where given)
    iterations: int  # condensation iterations to run
    config: MethodConfig
    farm: tuple[FarmJob, ...]  # what the config reads, to farm first (empty: it reads no store)
    eval_config: Any  # the evaluation config (raydd.evaluation), None when the run is not evaluated
    data_root: str | None  # None for a built-in dataset (digits)

    @property
    def needs(self) -> tuple[TrajectoryNeed, ...]:
        return self.config.needs()


def plan_config(method: str, dataset: str, ipc: int, *, iterations: int | None = None,
                knobs: Mapping[str, Any] | None = None, on: str | None = None, ipc_cap: int | None = None,
                shrink: Shrink | None = None, trajectories: Mapping[str, tuple[int | None, int | None]] | None = None
                ) -> tuple[MethodConfig, dict[str, tuple[int, int | None]]]:
    """(config, {recipe: (count, epochs) to farm}) by the module's fixed order; see ``plan_run``."""
    knobs = get_method(method).config_cls.resolve_knobs(dict(knobs or {}))
    config = make_config(method, dataset, ipc, iterations=iterations, on=on, ipc_cap=ipc_cap, **knobs)
    farm = _farm_sizes(config.needs(), trajectories or {}, shrink)
    if shrink is not None:
        config = config.scaled(Scale(width=shrink.width or getattr(config, "width", None) or 128,
                                     syn_steps=shrink.syn_steps or 10 ** 9,
                                     epochs={r: e for r, (_, e) in farm.items() if e is not None},
                                     counts={r: c for r, (c, _) in farm.items()}))
        if knobs:
            config = dataclasses.replace(config, **knobs)
    return config, farm


def _farm_sizes(needs, trajectories, shrink: Shrink | None) -> dict[str, tuple[int, int | None]]:
    """{recipe: (count, epochs)}: the requested ones (else the need's own), capped by the shrink; without a
    count cap never fewer than the need reads."""
    out: dict[str, tuple[int, int | None]] = {}
    for need in needs:
        cap_count, cap_epochs = shrink.caps(need.recipe) if shrink is not None else (None, None)
        count, epochs = trajectories.get(need.recipe, (None, None))
        count, epochs = count or need.count, epochs or need.epochs
        if cap_count is not None:
            count = min(count, cap_count)
        if cap_epochs is not None:  # a recipe's default length (epochs None) is capped too
            epochs = cap_epochs if epochs is None else min(epochs, cap_epochs)
        out[need.recipe] = (count if cap_count is not None else max(count, need.count), epochs)
    return out


def farm_jobs(config: MethodConfig, sizes: Mapping[str, tuple[int, int | None]] | None = None) -> tuple[FarmJob, ...]:
    """One job per need of ``config``: the planned size of its recipe (else the need's own), never fewer or
    shorter than the config reads; a prefix-exact recipe farms exactly the epochs read (the first epochs of a
    longer trajectory of it are those of one that stops there, bit for bit)."""
    from .farm.recipes import get_recipe

    jobs = []
    for need in config.needs():
        count, epochs = (sizes or {}).get(need.recipe, (need.count, need.epochs))
        if epochs is not None and need.epochs is not None:
            epochs = max(epochs, need.epochs)
        if need.epochs is not None and get_recipe(need.recipe).prefix_exact:
            epochs = need.epochs
        jobs.append(FarmJob(need, max(count, need.count), epochs))
    return tuple(jobs)


def plan_run(method: str, dataset: str, ipc: int, *, iterations: int | None = None,
             knobs: Mapping[str, Any] | None = None, on: str | None = None, ipc_cap: int | None = None,
             shrink: Shrink | None = None, trajectories: Mapping[str, tuple[int | None, int | None]] | None = None,
             eval_settings: Mapping[str, Any] | None = None, data_root: str | None = None) -> RunPlan:
    """The plan of one run (module doc: the order).

    ``iterations``: the run length (None: the setting's published count); ``knobs``: config fields or shared
    symbols; ``trajectories``: {recipe: (count, epochs)} to farm instead of the needs' own (a paper's
    protocol; None entries keep the need's); ``eval_settings``: protocol settings
    (``raydd.evaluation.protocol_config``; None: no evaluation). Every value is validated here, before any
    data is loaded; a bad one is a one-line ValueError.
    """
    from .evaluation import protocol_config

    config, sizes = plan_config(method, dataset, ipc, iterations=iterations, knobs=knobs, on=on, ipc_cap=ipc_cap,
                                shrink=shrink, trajectories=trajectories)
    run_dataset = on or dataset
    return RunPlan(method=get_method(method).name, dataset=run_dataset,
                   iterations=config.planned_iterations if iterations is None else iterations, config=config,
                   farm=farm_jobs(config, sizes),
                   eval_config=None if eval_settings is None else protocol_config(run_dataset, dict(eval_settings)),
                   data_root=data_root_for(run_dataset, data_root))
