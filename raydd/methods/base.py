"""The one interface every condensation method implements, its config base and the registry.

The contract (docs/ADDING_A_METHOD.md walks through it):

- A config (``MethodConfig`` subclass: frozen, typed, validated once) holds every knob with the
  published defaults (``defaults(dataset, ipc)``), names the shared sweep symbols it maps
  (``aliases``), declares what it reads from the store (``needs()``: ``TrajectoryNeed``s), how a
  run of N iterations is planned (``horizon`` / ``for_run(N)``: the length of its schedules),
  which (dataset, IPC) settings its paper publishes (``published``) and how it shrinks for a
  small machine (``scaled``).
- A method (``CondensationMethod`` subclass) is built from ``(config, train, store, *, device,
  seed)``, checks the config against the data and the store before doing any work (the store
  through ``self.inputs``, a ``StoreInputs``), then advances one iteration per ``step()``.
  ``state_dict()`` captures everything needed to resume bit-exactly, including the states of the
  method's own random generators: methods draw randomness only from ``self.rng`` (random.Random)
  and ``self.generator`` (a CPU torch.Generator), never from the global RNGs.
- ``@register_method`` and one import line in ``raydd/methods/__init__.py`` make it available to
  every entry point (``raydd condense``, ``raydd methods``, sweeps, benchmarks).

>>> cfg = make_config("mtt", "digits", ipc=2, syn_steps=10)
>>> method = get_method("mtt")(cfg, train, TrajectoryStore("raydd-store"), seed=0)
>>> for _ in range(100): metrics = method.step()
>>> method.synthetic_set().save("digits_ipc2.safetensors")
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import resource
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..data.datasets import ImageDataset, check_dataset_name
from ..overrides import check_annotations
from ..training import resolve_device
from ..validation import check_range
from .inputs import StoreInputs, TrajectoryNeed
from .serial import load_tree, save_tree
from .synthetic import SyntheticSet

CHECKPOINT_KIND = "method_checkpoint"


# --------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class PaperProtocol:
    """How a method's paper measured its ``reported`` numbers (``raydd reproduce`` runs it): where the
    numbers are, the evaluation (a protocol's settings for ``raydd.evaluation.protocol_config``), the
    trajectories it trains per farm recipe as (count, epochs) — None where the paper and its code do not
    say (the method's own need is used then) — and notes on departures."""

    source: str
    eval: dict[str, Any] = dataclasses.field(default_factory=dict)
    trajectories: dict[str, tuple[int | None, int | None]] = dataclasses.field(default_factory=dict)
    notes: str = ""


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's config: frozen, typed, validated on construction.

    Field annotations are enforced (ints given for float fields are converted; bools are
    never accepted as numbers). Subclasses add their knobs with defaults, range checks in
    ``__post_init__`` (call ``super().__post_init__()`` first), and ``defaults(dataset, ipc)``
    with the published settings. ``aliases`` maps the shared sweep symbols (lam, tau,
    alpha, zeta) to the field that plays that role in the method.
    """

    dataset: str
    ipc: int

    aliases: ClassVar[dict[str, str]] = {}
    default_iterations: ClassVar[int] = 1000  # the paper's iteration count (see planned_iterations)
    horizon: ClassVar[str | None] = None  # the field holding the planned run length (an lr/injection schedule's)
    published: ClassVar[tuple[tuple[str, int], ...]] = ()  # (dataset, ipc) rows of ``defaults`` from the paper
    reported: ClassVar[dict[tuple[str, int], float]] = {}  # the paper's accuracy (%) at (dataset, ipc), own protocol
    paper: ClassVar[PaperProtocol | None] = None  # how ``reported`` was measured (raydd reproduce)

    def __post_init__(self) -> None:
        check_annotations(self)
        check_dataset_name(self.dataset)
        if self.ipc < 1:
            raise ValueError(f"ipc={self.ipc} is invalid: expected an integer >= 1 (images per class)")

    def check(self, name: str, **bounds: Any) -> None:
        """One-line ValueError when field ``name`` is outside the bounds of ``validation.check_range``
        (``low``, ``high``, ``low_open``, ``high_open``); None (an unset optional field) passes."""
        check_range(f"{type(self).__name__}.{name}", getattr(self, name), none_ok=True, **bounds)

    @classmethod
    def defaults(cls, dataset: str, ipc: int) -> "MethodConfig":
        """The published settings for (dataset, ipc); subclasses override."""
        return cls(dataset=dataset, ipc=ipc)

    # ------------------------------------------------------------------ what the method reads and plans
    def needs(self) -> tuple[TrajectoryNeed, ...]:
        """The trajectories this configuration reads from the store (none: it needs no store)."""
        return ()

    @property
    def planned_iterations(self) -> int:
        """The iterations this setting runs by default: the horizon field's value where the config has
        one (EDC's per-dataset counts), else the paper's count ``default_iterations``."""
        return int(getattr(self, self.horizon)) if self.horizon else int(self.default_iterations)

    def for_run(self, iterations: int) -> "MethodConfig":
        """This config for a run of ``iterations`` iterations: the one way every entry point sets the
        horizon of a method's schedules (EDC's cosine lr, PTLM's |T|; DATM overrides it for its window
        growth). Knobs set explicitly afterwards (``with_overrides``) win."""
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations={iterations!r} is invalid: expected an integer >= 1")
        return dataclasses.replace(self, **{self.horizon: iterations}) if self.horizon else self

    def scaled(self, scale: "Scale") -> "MethodConfig":
        """This setting shrunk to ``scale`` (fewer/shorter trajectories, narrower networks, fewer unrolled
        steps), for CPU-sized runs; every departure is a knob value, printed with the config."""
        return self

    @classmethod
    def knobs(cls) -> list[str]:
        """Names accepted as overrides (every field but dataset and ipc, plus the aliases)."""
        return [f.name for f in dataclasses.fields(cls) if f.name not in ("dataset", "ipc")]

    @classmethod
    def resolve_knobs(cls, overrides: dict[str, Any]) -> dict[str, Any]:
        """``overrides`` with aliases replaced by the knobs they name; unknown knobs are a ValueError listing
        the accepted ones."""
        resolved = {}
        for key, value in overrides.items():
            target = cls.knob_target(key)
            if target is None:
                accepted = cls.knobs() + [f"{a} (= {t})" for a, t in cls.aliases.items()]
                raise ValueError(f"unknown {cls.__name__} knob {key!r}: accepted {', '.join(accepted)}")
            resolved[target] = value
        return resolved

    @classmethod
    def knob_target(cls, name: str) -> str | None:
        """The field a knob name sets (itself, or the field a shared symbol maps to); None if none."""
        target = cls.aliases.get(name, name)
        return target if target in cls.knobs() else None

    def with_overrides(self, **overrides: Any) -> "MethodConfig":
        """A copy with ``overrides`` applied (``resolve_knobs``), validated like any config."""
        return dataclasses.replace(self, **self.resolve_knobs(overrides))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MethodConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} key(s) {unknown}: accepted {sorted(known)}")
        return cls(**data)


@dataclass(frozen=True)
class Scale:
    """How far a published setting is shrunk for a small machine (``MethodConfig.scaled``): the CPU-scaled
    benchmark table, the contract tests and CPU-sized reproductions use it."""

    width: int = 32  # ConvNet width of the networks a method builds itself (DM's embedders)
    syn_steps: int = 20  # cap on unrolled student steps (trajectory matching)
    epochs: dict[str, int] = dataclasses.field(default_factory=dict)  # farm recipe -> epochs of its trajectories
    counts: dict[str, int] = dataclasses.field(default_factory=dict)  # farm recipe -> trajectories farmed


def process_peak_rss_mb() -> float:
    """High-water mark of this process's resident memory (MiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 2 ** 10


class StepMeter:
    """Wall time and peak memory of one ``step()``, started when built.

    ``finish(metrics)`` adds ``time_s`` and, on CUDA, ``peak_mem_mb`` = the peak allocation
    during the step above the allocation at its start; on CPU ``rss_peak_mb`` (the process's
    resident high-water mark) and, when the method measured its unrolled graph, ``peak_mem_mb``
    = that graph's size (``graph_mb``).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.started = time.perf_counter()
        self.base_mem: int | None = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.base_mem = torch.cuda.memory_allocated(device)

    def finish(self, metrics: dict[str, float], *, graph_mb: float | None = None) -> dict[str, float]:
        if self.base_mem is not None:
            metrics["peak_mem_mb"] = (torch.cuda.max_memory_allocated(self.device) - self.base_mem) / 2 ** 20
        else:
            if graph_mb is not None:
                metrics["peak_mem_mb"] = graph_mb
            metrics["rss_peak_mb"] = process_peak_rss_mb()
        metrics["time_s"] = time.perf_counter() - self.started
        return metrics


def embed_classes_together(where: str, value: bool | None, norm: str, device: torch.device) -> bool:
    """Resolve a distribution-matching method's ``embed_classes_together`` knob (DM, DANCE, PTLM).

    True: every class's real images in one embedder forward and every class's synthetic images in
    another, one backward; exact only when samples are embedded independently (instance norm, no
    norm), so True with a batch-norm embedder is refused. False: class by class. None: together on
    CUDA only and only where exact (one class at a time keeps CPU memory low, benchmarks/embed_together.py).
    """
    if value is None:
        return device.type == "cuda" and norm != "batch"
    if value and norm == "batch":
        raise ValueError(f"{where}=True is refused with a batch-norm embedder (batch statistics would mix the "
                         f"classes): accepted with norm instance or none; use false or null with norm batch")
    return bool(value)


def check_ipc(ipc: int, train: ImageDataset) -> None:
    """IPC must be >= 1 and at most the size of the smallest class of ``train``."""
    if ipc < 1:
        raise ValueError(f"ipc={ipc} is invalid: expected an integer >= 1 (images per class)")
    counts = torch.bincount(train.labels, minlength=train.info.num_classes)
    smallest = int(counts.min())
    if ipc > smallest:
        c = int(counts.argmin())
        raise ValueError(f"ipc={ipc} is larger than the smallest class of {train.info.name}/{train.split} "
                         f"(class {c} has {smallest} images): use ipc <= {smallest}")


# --------------------------------------------------------------------------- methods
class CondensationMethod(ABC):
    """A condensation method: ``step()`` advances one iteration and returns its metrics."""

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""  # display name (tables, raydd methods); default: the name
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig

    def __init__(self, config: MethodConfig, train: ImageDataset, store=None, *,
                 device: str | torch.device = "auto", seed: int = 0) -> None:
        if not isinstance(config, self.config_cls):
            raise ValueError(f"{self.name} needs a {self.config_cls.__name__}, got {type(config).__name__}; "
                             f"build one with make_config({self.name!r}, dataset, ipc, ...)")
        if not isinstance(train, ImageDataset):
            raise ValueError(f"train must be an ImageDataset, got {type(train).__name__}")
        if config.dataset != train.info.name:
            raise ValueError(f"config is for dataset {config.dataset!r} but the training data is {train.info.name!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed={seed!r} is invalid: expected an integer >= 0")
        needs = config.needs()
        if needs and store is None:
            roles = " and ".join(dict.fromkeys(n.role for n in needs))
            raise ValueError(f"{self.name} reads {roles} from the trajectory store: pass a TrajectoryStore "
                             f"(--store ROOT)")
        self.config = config
        self.train = train
        self.store = store
        self.inputs = StoreInputs(store, train, config.dataset, needs) if needs else None
        self.device = resolve_device(device)
        self.seed = seed
        self.rng = random.Random(seed)  # host-side choices (which expert, which start epoch)
        self.generator = torch.Generator().manual_seed(seed)  # tensor draws (init, batches, augmentation)
        self._iteration = 0
        self._check_ipc()

    def _check_ipc(self) -> None:
        """IPC against the training data (``check_data``; a method whose pool differs overrides this)."""
        self.check_data(self.config, self.train)

    @classmethod
    def check_data(cls, config: MethodConfig, train: ImageDataset) -> None:
        """What can be checked from the config and the training data alone, before any work (sweeps run
        it for every trial before Ray starts): by default IPC against the smallest class."""
        check_ipc(config.ipc, train)

    @property
    def iteration(self) -> int:
        """Iterations completed so far."""
        return self._iteration

    @abstractmethod
    def step(self) -> dict[str, float]:
        """Advance one iteration; return its metrics (always including ``loss``)."""

    @abstractmethod
    def synthetic_set(self) -> SyntheticSet:
        """A detached CPU copy of the current synthetic set."""

    def _synthetic(self, images: torch.Tensor, labels: torch.Tensor, meta: dict[str, Any], *, whitened: bool = False,
                   syn_lr: float | None = None, zca: dict[str, torch.Tensor] | None = None) -> SyntheticSet:
        """The ``SyntheticSet`` of ``images`` and ``labels`` (CPU copies) made by this method now: the training
        data's description (``whitened``: the images live in its ZCA space, ``zca`` that whitening's state), the
        method, its config and iteration; ``meta``: its provenance."""
        return SyntheticSet(images=images, labels=labels, dataset={**self.train.info.to_dict(), "zca": whitened},
                            method=self.name, config=self.config.to_dict(), syn_lr=syn_lr, iteration=self._iteration,
                            zca=zca, meta=meta)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: subclasses extend this dict (tensors are copies)."""
        rng_version, rng_words, rng_gauss = self.rng.getstate()
        return {
            "method": self.name, "config": self.config.to_dict(), "seed": self.seed,
            "iteration": self._iteration,
            "rng": {"version": rng_version, "words": list(rng_words), "gauss": rng_gauss},
            "generator": self.generator.get_state().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` output; a checkpoint of another method or config is a ValueError."""
        if state.get("method") != self.name:
            raise ValueError(f"checkpoint is for method {state.get('method')!r}, not {self.name!r}")
        # how the iterations run (engine) does not change what they compute: a checkpoint resumes under either
        mine, theirs = ({k: v for k, v in _plain(c).items() if k != "engine"}
                        for c in (self.config.to_dict(), state.get("config", {})))
        if mine != theirs:
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise ValueError(f"checkpoint config differs from this method's config in {diff}")
        self.seed = int(state["seed"])
        self._iteration = int(state["iteration"])
        r = state["rng"]
        self.rng.setstate((r["version"], tuple(r["words"]), r["gauss"]))
        self.generator.set_state(state["generator"].clone())

    def teacher_models(self) -> list | None:
        """Networks an evaluation protocol may relabel with (EDC's observers); None: the method has none."""
        return None

    def close(self) -> None:
        """Release resources (open trajectory files); the method stays usable where it can."""
        if self.inputs is not None:
            self.inputs.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _plain(data: dict) -> dict:
    """``data`` as it reads back from JSON (tuples become lists), for comparisons."""
    return json.loads(json.dumps(data))


def clone_tree(obj: Any) -> Any:
    """Deep copy of nested dicts/lists with every tensor cloned (optimiser states share buffers)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: clone_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(clone_tree(v) for v in obj)
    return obj


def save_checkpoint(method: CondensationMethod, path: str | os.PathLike):
    """Write ``method.state_dict()`` to ``path`` (safetensors, atomic, no pickles)."""
    return save_tree(path, method.state_dict(), kind=CHECKPOINT_KIND)


def load_checkpoint(method: CondensationMethod, path: str | os.PathLike) -> CondensationMethod:
    """Restore a checkpoint written by ``save_checkpoint`` into ``method`` (returns it)."""
    method.load_state_dict(load_tree(path, kind=CHECKPOINT_KIND))
    return method


# --------------------------------------------------------------------------- registry
METHODS: dict[str, type[CondensationMethod]] = {}


def register_method(cls: type[CondensationMethod]) -> type[CondensationMethod]:
    """Class decorator: make ``cls`` available as ``get_method(cls.name)``."""
    if not cls.name or cls.name != cls.name.lower():
        raise ValueError(f"{cls.__name__}.name={cls.name!r} is invalid: expected a lower-case name")
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"method {cls.name!r} is already registered by {METHODS[cls.name].__name__}")
    if not cls.label:
        cls.label = cls.name
    METHODS[cls.name] = cls
    return cls


def method_key(name: str) -> str:
    """A method's registry name from how a user wrote it: ``DATM-CLR`` and `` datm_clr`` are ``datm_clr``."""
    return str(name).strip().lower().replace("-", "_")


def get_method(name: str) -> type[CondensationMethod]:
    key = method_key(name)
    if key not in METHODS:
        raise ValueError(f"unknown method {name!r}: accepted {', '.join(sorted(METHODS))}")
    return METHODS[key]


def make_config(method: str, dataset: str, ipc: int, *, iterations: int | None = None, on: str | None = None,
                ipc_cap: int | None = None, **overrides: Any) -> MethodConfig:
    """The config of a run of ``method``: the planner's steps 1-5 (``raydd.plan`` states the whole order).

    The published settings for (dataset, ipc); the same row on dataset ``on`` and at most ``ipc_cap`` images
    per class, where given; the knobs ``overrides`` (aliases resolved); the run length ``iterations``
    (``MethodConfig.for_run``; None: the published count); the knobs again, so an explicit knob wins over
    what the run length plans (a knob applies first too because ``for_run`` may read it)."""
    config_cls = get_method(method).config_cls
    knobs = config_cls.resolve_knobs(overrides)
    config = config_cls.defaults(dataset, ipc)
    moved: dict[str, Any] = {}
    if on is not None and on != dataset:
        moved["dataset"] = on
    if ipc_cap is not None and config.ipc > ipc_cap:
        moved["ipc"] = ipc_cap
    if moved or knobs:  # validated again with the new values
        config = dataclasses.replace(config, **moved, **knobs)
    if iterations is not None:
        config = config.for_run(iterations)
        if knobs:
            config = dataclasses.replace(config, **knobs)
    return config
