"""SweepSpec: a Tune sweep of condensation methods, read from YAML and validated before Ray starts.

    name: quick-digits
    dataset: digits
    store: raydd-store
    methods: [dm, random]
    ipcs: [1, 10]
    iterations: 200            # or "default" (each method's published count) or {dm: 200, mtt: 500}
    eval_every: 50             # or "rungs" (ASHA): evaluate only at ASHA's rungs and at the end
    eval: {model: convnet, num_models: 2, epochs: 100}
    knobs: {dm: {lr_img: {loguniform: [0.1, 10]}}}
    samples: 2
    scheduler: {type: asha, grace_period: 50, reduction_factor: 3}   # variant: promotion (default) | stopping
    resources: {cpu: 1, gpu: 0}

Knob values: a constant, or exactly one of ``{grid: [..]}`` (every value, expanded into
separate trials), ``{choice: [..]}`` (one sampled per trial), ``{uniform: [low, high]}``,
``{loguniform: [low, high]}`` (low > 0), ``{randint: [low, high]}`` (integers, high
exclusive). Knob names are a method's config fields or the shared symbols lam, tau,
alpha, zeta, which each config maps onto its own field (``MethodConfig.aliases``); a
symbol the method does not use is refused. Every candidate value (grid/choice values,
range ends) is checked against the method's config for every IPC, so an out-of-range
knob fails here, not in trial 37 an hour in. Nothing here imports or starts Ray.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..evaluation import protocol_config, protocol_fields
from ..methods import get_method, make_config
from ..methods.base import method_key
from ..validation import check_int, is_number
from .rungs import ASHA_VARIANTS, RUNGS, check_asha

SHARED_KNOBS = ("lam", "tau", "alpha", "zeta")
KNOB_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
SCHEDULERS = ("asha", "fifo")


# --------------------------------------------------------------------------- knobs
@dataclass(frozen=True)
class Knob:
    """One knob's values: ``kind`` is 'const' or one of KNOB_KINDS."""

    kind: str
    values: tuple

    @classmethod
    def parse(cls, where: str, raw: Any) -> "Knob":
        if isinstance(raw, dict):
            if len(raw) != 1 or next(iter(raw)) not in KNOB_KINDS:
                raise ValueError(f"{where}={raw!r} is invalid: expected a constant or exactly one of "
                                 f"{{{', '.join(f'{k}: [...]' for k in KNOB_KINDS)}}}")
            kind, values = next(iter(raw.items()))
            if not isinstance(values, (list, tuple)):
                raise ValueError(f"{where}.{kind}={values!r} is invalid: expected a list")
            values = tuple(values)
            if kind in ("grid", "choice"):
                if not values:
                    raise ValueError(f"{where}.{kind} is an empty list: give at least one value")
                return cls(kind, values)
            if len(values) != 2 or not all(is_number(v) for v in values):
                raise ValueError(f"{where}.{kind}={list(values)!r} is invalid: expected [low, high] (two numbers)")
            low, high = values
            if not low < high:
                raise ValueError(f"{where}.{kind}=[{low}, {high}] is an empty or inverted range: expected low < high")
            if kind == "loguniform" and low <= 0:
                raise ValueError(f"{where}.loguniform=[{low}, {high}] is invalid: expected 0 < low < high")
            if kind == "randint" and not all(isinstance(v, int) for v in values):
                raise ValueError(f"{where}.randint=[{low}, {high}] is invalid: expected integers (high exclusive)")
            return cls(kind, (low, high))
        if isinstance(raw, (list, tuple)):
            raise ValueError(f"{where}={list(raw)!r} is ambiguous: write {{grid: [...]}} (one trial per value) "
                             f"or {{choice: [...]}} (sampled)")
        return cls("const", (raw,))

    def candidates(self) -> list:
        """Values to validate: every listed value, or both ends of a range (high exclusive)."""
        if self.kind in ("const", "grid", "choice"):
            return list(self.values)
        low, high = self.values
        if self.kind == "randint":
            return [low, high - 1]
        return [low, math.nextafter(float(high), float(low))]

    @property
    def first(self):
        return self.candidates()[0]

    def to_yaml(self) -> Any:
        return self.values[0] if self.kind == "const" else {self.kind: list(self.values)}


def resolve_knob(method: str, name: str, eval_settings: dict | None = None) -> tuple[str, str]:
    """Where a knob name lands: ('method', config field) or ('eval', evaluation field).

    Method fields and the shared symbols the method's config maps (``aliases``) land on
    the method; ``eval.<field>`` lands on the evaluation config, and so does ``zeta`` (the
    evaluation LR-smoothing ζ) when the method does not map it itself but the evaluation
    protocol has it (protocol edc). Anything else is a ValueError naming what is accepted.
    """
    config_cls = get_method(method).config_cls
    fields = protocol_fields(eval_settings)
    if name.startswith("eval."):
        target = name[len("eval."):]
        if target not in fields or target == "device":
            raise ValueError(f"knob {name!r}: the evaluation protocol has no setting {target!r}: accepted "
                             f"{', '.join('eval.' + f for f in sorted(fields - {'device'}))}")
        return "eval", target
    target = config_cls.knob_target(name)
    if target is not None:
        return "method", target
    if name == "zeta" and "zeta" in fields:
        return "eval", "zeta"
    shared = ", ".join(f"{a} (= {t})" for a, t in config_cls.aliases.items()) or "none"
    if name == "zeta":
        raise ValueError(f"method {method!r} does not use the shared knob 'zeta' and its evaluation protocol has no "
                         f"LR smoothing ζ: use 'eval: {{protocol: edc}}' (smoothing schedule), or drop zeta")
    if name in SHARED_KNOBS:
        raise ValueError(f"method {method!r} does not use the shared knob {name!r}: its shared knobs are {shared}")
    raise ValueError(f"method {method!r} has no knob {name!r}: accepted {', '.join(config_cls.knobs())}; "
                     f"shared knobs {shared}; evaluation settings as eval.<name>")


# --------------------------------------------------------------------------- the spec
@dataclass(frozen=True)
class SweepSpec:
    """A sweep: every method x IPC x seed x grid point, ``samples`` times (random knobs re-drawn)."""

    name: str
    dataset: str
    methods: tuple[str, ...]
    ipcs: tuple[int, ...]
    iterations: dict[str, int | str]  # per method: a count or "default" (see default_trial_iterations)
    eval_every: int | str | dict[str, int | str] = 0  # evaluate + report every k iterations and at the end (0:
    # at the end only; "rungs": at the ASHA rungs grace·rf^k and the end); a mapping gives it per method
    store: str = "raydd-store"
    data_root: str | None = None
    resolution: int | None = None
    knobs: dict[str, dict[str, Knob]] = field(default_factory=dict)
    seeds: tuple[int, ...] = (0,)
    samples: int = 1
    scheduler: dict[str, Any] = field(default_factory=lambda: {"type": "asha"})
    resources: dict[str, float] = field(default_factory=lambda: {"cpu": 1.0, "gpu": 0.0})
    eval: dict[str, Any] = field(default_factory=dict)  # periodic evaluation: protocol (standard|edc) + its fields
    method_eval: dict[str, dict[str, Any]] = field(default_factory=dict)  # per method: replaces ``eval``
    final_eval: dict[str, Any] | None = None  # overrides of the method's eval for one extra evaluation at the end
    metrics: dict[str, Any] | None = None  # DD-Ranking's scores of each trial's last set: RobustnessConfig fields
    # (``metrics: [hlr, ior, lrs, ars]`` is short for ``metrics: {metrics: [...]}``)
    max_failures: int = 2  # per trial: retried from its last checkpoint
    max_concurrent: int | None = None
    storage: str = "raydd-sweeps"  # where Tune writes the experiment (directory or URI)
    device: str = "auto"
    farm: dict[str, Any] = field(default_factory=dict)  # recipe -> FarmSpec fields, or a list of them (--farm)

    def __post_init__(self) -> None:
        from ..data.datasets import check_dataset_name

        if not isinstance(self.name, str) or not self.name or "/" in self.name or self.name.strip() != self.name:
            raise ValueError(f"name={self.name!r} is invalid: expected a non-empty name without '/'")
        check_dataset_name(self.dataset)
        if not self.methods:
            raise ValueError("methods is empty: list at least one method")
        for m in self.methods:
            get_method(m)
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods={list(self.methods)} lists a method twice")
        if not self.ipcs:
            raise ValueError("ipcs is empty: list at least one IPC (images per class), e.g. [1, 10, 50]")
        for ipc in self.ipcs:
            check_int("ipc", ipc)
        if not self.seeds:
            raise ValueError("seeds is empty: list at least one seed, e.g. [0]")
        for seed in self.seeds:
            check_int("seed", seed, low=0)
        for m in self.methods:
            if m not in self.iterations:
                raise ValueError(f"iterations has no entry for method {m!r}")
            if self.iterations[m] != "default":
                check_int(f"iterations[{m}]", self.iterations[m])
        if isinstance(self.eval_every, dict):
            unknown = sorted(set(self.eval_every) - set(self.methods) - {"default"})
            if unknown:
                raise ValueError(f"eval_every names {unknown}, which are not in methods {list(self.methods)}")
        for m in self.methods:
            where = f"eval_every[{m}]" if isinstance(self.eval_every, dict) else "eval_every"
            every = self.method_eval_every(m)
            if every == RUNGS:
                if self.scheduler.get("type") != "asha":
                    raise ValueError(f"{where}='rungs' is invalid without ASHA (scheduler.type="
                                     f"{self.scheduler.get('type')!r}): give a number of iterations")
                continue
            if isinstance(every, str):
                raise ValueError(f"{where}={every!r} is invalid: expected an integer >= 0 or 'rungs'")
            check_int(where, every, low=0)
        check_int("samples", self.samples)
        check_int("max_failures", self.max_failures, low=0)
        if self.max_concurrent is not None:
            check_int("max_concurrent", self.max_concurrent)
        if self.resolution is not None:
            check_int("resolution", self.resolution)
        for key in ("store", "data_root"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{key}={value!r} is invalid: expected a directory or URI (or null)")
        if not isinstance(self.storage, str) or not self.storage:
            raise ValueError(f"storage={self.storage!r} is invalid: expected a directory or URI")
        if not isinstance(self.device, str) or self.device.split(":")[0] not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device={self.device!r} is invalid: accepted auto (the trial's GPU if it has one), "
                             f"cpu, cuda")
        self._check_resources()
        self._check_scheduler()
        for key in ("eval", "final_eval"):
            settings = getattr(self, key)
            if settings is not None and not isinstance(settings, dict):
                raise ValueError(f"{key}={settings!r} is invalid: expected a mapping of evaluation settings")
        for method, settings in self.method_eval.items():
            if method not in self.methods:
                raise ValueError(f"method_eval given for method {method!r}, which is not in methods "
                                 f"{list(self.methods)}")
            if not isinstance(settings, dict):
                raise ValueError(f"method_eval.{method}={settings!r} is invalid: expected a mapping of evaluation "
                                 f"settings")
        if self.final_eval is not None and "protocol" in self.final_eval:
            raise ValueError("final_eval.protocol is not accepted: final_eval overrides settings of each method's "
                             "eval (same protocol); set the protocol in eval or method_eval")
        for method in self.methods:
            protocol_config(self.dataset, self.eval_settings(method))
            if self.final_eval is not None:
                protocol_config(self.dataset, self.final_eval_settings(method))
        self._check_metrics()
        self._check_knobs()
        self._check_farm()

    # ------------------------------------------------------------------ checks
    def _check_metrics(self) -> None:
        """``metrics``: a list of scores or a mapping of RobustnessConfig fields, on the standard protocol."""
        if self.metrics is None:
            return
        settings = self.metrics
        if isinstance(settings, (list, tuple, str)):
            settings = {"metrics": list(settings) if not isinstance(settings, str) else [settings]}
        if not isinstance(settings, dict):
            raise ValueError(f"metrics={self.metrics!r} is invalid: expected a list of scores (hlr, ior, lrs, ars) "
                             f"or a mapping of RobustnessConfig fields")
        robustness_config(settings)
        object.__setattr__(self, "metrics", json.loads(json.dumps(settings)))
        for method in self.methods:
            settings = self.final_eval_settings(method) or self.eval_settings(method)
            if settings.get("protocol", "standard") != "standard":
                raise ValueError(f"metrics run on the standard protocol, but method {method!r} is evaluated with "
                                 f"protocol {settings['protocol']!r}")

    def _check_resources(self) -> None:
        unknown = sorted(set(self.resources) - {"cpu", "gpu"})
        if unknown:
            raise ValueError(f"unknown resources key(s) {unknown}: accepted cpu, gpu")
        cpu, gpu = self.resources.get("cpu", 1.0), self.resources.get("gpu", 0.0)
        if not is_number(cpu) or cpu <= 0:
            raise ValueError(f"resources.cpu={cpu!r} is invalid: expected a number > 0 per trial")
        if not is_number(gpu) or gpu < 0:
            raise ValueError(f"resources.gpu={gpu!r} is invalid: expected a number >= 0 per trial "
                             f"(fractions share a GPU)")
        if gpu > 1 and gpu != int(gpu):
            raise ValueError(f"resources.gpu={gpu!r} is invalid: fractions only below 1 (e.g. 0.25), else whole GPUs")

    def _check_scheduler(self) -> None:
        s = self.scheduler
        kind = s.get("type")
        if kind not in SCHEDULERS:
            raise ValueError(f"scheduler.type={kind!r} is invalid: accepted {', '.join(SCHEDULERS)}")
        allowed = {"type"} | ({"grace_period", "reduction_factor", "max_t", "variant"} if kind == "asha" else set())
        unknown = sorted(set(s) - allowed)
        if unknown:
            raise ValueError(f"unknown scheduler key(s) {unknown} for type {kind}: accepted {sorted(allowed)}")
        if kind == "asha":
            variant = s.get("variant", ASHA_VARIANTS[0])
            max_t = s.get("max_t", self.max_iterations)
            check_asha(s.get("grace_period"), s.get("reduction_factor", 3), max_t, variant, where="scheduler.")
            if variant == "promotion" and self.max_concurrent is not None:
                raise ValueError(f"max_concurrent={self.max_concurrent} is invalid with scheduler.variant='promotion': "
                                 f"Tune counts the trials paused at a rung as running, so new trials never start; "
                                 f"limit concurrency with resources (cpu/gpu per trial) or use variant: stopping")
            if "grace_period" in s:
                grace = s["grace_period"]
                for m in self.methods:
                    every = self.method_eval_every(m)
                    if every and every != RUNGS and grace % every:
                        raise ValueError(f"scheduler.grace_period={grace} is invalid: expected a multiple of "
                                         f"eval_every of {m} ({every}), so that every ASHA rung is an evaluation")

    def _check_knobs(self) -> None:
        """Resolves every knob name once (``self.targets``) and tries every candidate value on each IPC."""
        targets: dict[str, dict[str, tuple[str, str]]] = {}
        for method, knobs in self.knobs.items():
            if method not in self.methods:
                raise ValueError(f"knobs given for method {method!r}, which is not in methods {list(self.methods)}")
            where: dict[str, tuple[str, str]] = {}
            for name in knobs:
                target = resolve_knob(method, name, self.eval_settings(method))
                if target in where.values():
                    other = next(n for n, t in where.items() if t == target)
                    raise ValueError(f"knobs for {method!r} set {target[1]!r} twice ({other!r} and {name!r})")
                where[name] = target
            targets[method] = where
            base = {name: knob.first for name, knob in knobs.items()}
            for ipc in self.ipcs:
                for name, knob in [(None, None), *knobs.items()]:
                    for value in [None] if knob is None else knob.candidates()[1:] if knob.kind != "const" else []:
                        values = base if name is None else {**base, name: value}
                        method_knobs = {k: v for k, v in values.items() if where[k][0] == "method"}
                        eval_knobs = {where[k][1]: v for k, v in values.items() if where[k][0] == "eval"}
                        try:
                            make_config(method, self.dataset, ipc, **method_knobs)
                            protocol_config(self.dataset, self.eval_settings(method), **eval_knobs)
                            if self.final_eval is not None:
                                protocol_config(self.dataset, self.final_eval_settings(method), **eval_knobs)
                        except ValueError as err:
                            what = f"knobs.{method} (IPC {ipc})" if name is None else \
                                f"knobs.{method}.{name}: value {value!r} (IPC {ipc})"
                            raise ValueError(f"{what} is refused: {err}") from None
        object.__setattr__(self, "targets", targets)  # derived, not a field: {method: {knob name: (where, field)}}

    def _check_farm(self) -> None:
        from ..farm.recipes import get_recipe

        for recipe, entries in self.farm.items():
            get_recipe(recipe)
            entries = entries if isinstance(entries, list) else [entries]
            if not entries:
                raise ValueError(f"farm.{recipe} is an empty list: give at least one mapping of FarmSpec fields")
            for overrides in entries:
                if not isinstance(overrides, dict):
                    raise ValueError(f"farm.{recipe}={overrides!r} is invalid: expected a mapping of FarmSpec fields "
                                     f"(or a list of them)")
                fixed = {"store", "dataset", "recipe"} & set(overrides)
                if fixed:
                    raise ValueError(f"farm.{recipe} sets {sorted(fixed)}: these come from the sweep spec")
        self.farm_specs()

    # ------------------------------------------------------------------ views
    def asha_settings(self) -> dict[str, Any] | None:
        """ASHA's grace_period / reduction_factor / max_t as given (None: no ASHA), for 'rungs' evaluation."""
        if self.scheduler.get("type") != "asha":
            return None
        return {k: self.scheduler[k] for k in ("grace_period", "reduction_factor", "max_t") if k in self.scheduler}

    def method_eval_every(self, method: str) -> int | str:
        if isinstance(self.eval_every, dict):
            return self.eval_every.get(method, self.eval_every.get("default", 0))
        return self.eval_every

    def eval_settings(self, method: str) -> dict[str, Any]:
        """The periodic evaluation of ``method``'s trials: ``method_eval[method]`` if given, else ``eval``."""
        return dict(self.method_eval.get(method, self.eval))

    def final_eval_settings(self, method: str) -> dict[str, Any] | None:
        """The end-of-trial evaluation: the method's eval with ``final_eval`` applied (None: none)."""
        return None if self.final_eval is None else {**self.eval_settings(method), **self.final_eval}

    def trial_iterations(self, method: str, ipc: int) -> int:
        value = self.iterations[method]
        return default_trial_iterations(method, self.dataset, ipc) if value == "default" else value

    @property
    def max_iterations(self) -> int:
        return max(self.trial_iterations(m, ipc) for m in self.methods for ipc in self.ipcs)

    @property
    def cpu(self) -> float:
        return float(self.resources.get("cpu", 1.0))

    @property
    def gpu(self) -> float:
        return float(self.resources.get("gpu", 0.0))

    def grid_points(self, method: str) -> list[dict[str, Any]]:
        """The grid-knob combinations of ``method`` (one empty dict when it has no grid knob)."""
        points: list[dict[str, Any]] = [{}]
        for name, knob in self.knobs.get(method, {}).items():
            if knob.kind == "grid":
                points = [{**p, name: v} for p in points for v in knob.values]
        return points

    def arms(self, pinned: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """The plain trial plans: one per method x grid point, knob names resolved to the fields they set
        (``method_knobs``: config fields, ``eval_knobs``: evaluation fields; values are constants or Knobs
        still to sample). ``pinned``: {method: {field: value}} constants added where the spec sets none
        (the model a sweep farmed)."""
        arms = []
        for method in self.methods:
            knobs, where = self.knobs.get(method, {}), getattr(self, "targets", {}).get(method, {})
            for point in self.grid_points(method):
                method_knobs: dict[str, Any] = {}
                eval_knobs: dict[str, Any] = {}
                for name, knob in knobs.items():
                    kind, target = where[name]
                    value = point[name] if name in point else knob.values[0] if knob.kind == "const" else knob
                    (method_knobs if kind == "method" else eval_knobs)[target] = value
                for key, value in (pinned or {}).get(method, {}).items():
                    method_knobs.setdefault(key, value)
                arm = {"method": method, "iterations": self.iterations[method], "method_knobs": method_knobs,
                       "eval_knobs": eval_knobs, "eval_every": self.method_eval_every(method),
                       "eval": self.eval_settings(method)}
                if self.final_eval is not None:
                    arm["final_eval"] = self.final_eval_settings(method)
                if self.metrics is not None:
                    arm["metrics"] = self.metrics
                if arm["eval_every"] == RUNGS:
                    arm["asha"] = self.asha_settings()
                arms.append(arm)
        return arms

    @property
    def num_trials(self) -> int:
        arms = sum(len(self.grid_points(m)) for m in self.methods)
        return self.samples * arms * len(self.ipcs) * len(self.seeds)

    def farm_specs(self, **extra: Any) -> list:
        """The FarmSpecs of the ``farm`` section (a mapping or a list of mappings per recipe) on this
        sweep's store, dataset and data; ``extra`` fills fields an entry does not set (e.g. backend)."""
        from ..farm.spec import FarmSpec

        specs = []
        for recipe, entries in self.farm.items():
            for overrides in entries if isinstance(entries, list) else [entries]:
                fields = {"store": self.store, "dataset": self.dataset, "data_root": self.data_root,
                          "resolution": self.resolution, "recipe": recipe}
                specs.append(FarmSpec.from_dict({**fields, **extra, **overrides}))
        return specs

    def to_dict(self) -> dict[str, Any]:
        """Plain data that ``from_dict`` reads back (knobs in their YAML form)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["methods"] = list(self.methods)
        out["ipcs"] = list(self.ipcs)
        out["seeds"] = list(self.seeds)
        out["knobs"] = {m: {k: v.to_yaml() for k, v in ks.items()} for m, ks in self.knobs.items()}
        return json.loads(json.dumps(out))

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SweepSpec":
        if not isinstance(data, dict):
            raise ValueError(f"a sweep spec must be a mapping of SweepSpec fields, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown sweep spec key(s) {unknown}: accepted {sorted(known)}")
        missing = sorted({"name", "dataset", "methods", "ipcs", "iterations"} - set(data))
        if missing:
            raise ValueError(f"sweep spec lacks required key(s) {missing}")
        data = dict(data)
        methods = data["methods"]
        methods = [methods] if isinstance(methods, str) else methods
        if not isinstance(methods, (list, tuple)):
            raise ValueError(f"methods={methods!r} is invalid: expected a list of method names")
        for m in methods:
            get_method(m)
        data["methods"] = tuple(method_key(m) for m in methods)
        for key in ("ipcs", "seeds"):
            if key in data:
                value = data[key]
                value = [value] if isinstance(value, int) and not isinstance(value, bool) else value
                if not isinstance(value, (list, tuple)):
                    raise ValueError(f"{key}={value!r} is invalid: expected a list of integers")
                data[key] = tuple(value)
        data["iterations"] = _iterations(data["iterations"], data["methods"])
        knobs = data.get("knobs") or {}
        if not isinstance(knobs, dict) or not all(isinstance(v, dict) for v in knobs.values()):
            raise ValueError(f"knobs={knobs!r} is invalid: expected {{method: {{knob: value or range}}}}")
        data["knobs"] = {method_key(m): {k: Knob.parse(f"knobs.{m}.{k}", v) for k, v in ks.items()}
                         for m, ks in knobs.items()}
        if isinstance(data.get("method_eval"), dict):
            data["method_eval"] = {method_key(m): v for m, v in data["method_eval"].items()}
        for key in ("scheduler", "resources", "eval", "farm", "method_eval"):
            if key in data and data[key] is None:
                data.pop(key)
            elif key in data and not isinstance(data[key], dict):
                raise ValueError(f"{key}={data[key]!r} is invalid: expected a mapping")
        if "scheduler" in data:
            data["scheduler"] = {"type": "asha", **data["scheduler"]}
        if "resources" in data:
            data["resources"] = {"cpu": 1.0, "gpu": 0.0, **data["resources"]}
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "SweepSpec":
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"sweep spec {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except UnicodeDecodeError:
            raise ValueError(f"sweep spec {path} is not a text (UTF-8) YAML file") from None
        except yaml.YAMLError as err:
            raise ValueError(f"sweep spec {path} is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ValueError(f"sweep spec {path} must be a YAML mapping of SweepSpec fields")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data)


def default_trial_iterations(method: str, dataset: str, ipc: int) -> int:
    """'default' iterations: the published count of the method's setting for (dataset, IPC)."""
    return make_config(method, dataset, ipc).planned_iterations


def _iterations(raw: Any, methods: tuple[str, ...]) -> dict[str, int | str]:
    if isinstance(raw, dict):
        unknown = sorted(set(raw) - set(methods) - {"default"})
        if unknown:
            raise ValueError(f"iterations names {unknown}, which are not in methods {list(methods)}")
        return {m: raw.get(m, raw.get("default", "default")) for m in methods}
    if raw != "default" and (isinstance(raw, bool) or not isinstance(raw, int)):
        raise ValueError(f"iterations={raw!r} is invalid: expected an integer >= 1, 'default' or {{method: n}}")
    return {m: raw for m in methods}


def robustness_config(settings: dict | None):
    """The RobustnessConfig of a spec's ``metrics`` mapping (None: no scores); one-line errors."""
    import dataclasses as _dc

    from ..evaluation.robustness import RobustnessConfig

    if not settings:
        return None
    known = {f.name for f in _dc.fields(RobustnessConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"unknown metrics setting(s) {unknown}: accepted {sorted(known)}")
    return RobustnessConfig(**settings)
