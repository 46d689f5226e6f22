"""Ray Tune sweeps of condensation methods: the trial trainable, search spaces, ASHA, leaderboard.

One trial = (method, dataset, IPC, knobs, seed). ``condensation_trainable`` loads the data
once, builds the method, runs its iterations and every ``eval_every`` iterations (and at
the end) evaluates the synthetic set and reports to Tune::

    iterations      condensation iterations done (ASHA's time attribute; not training_iteration)
    eval_acc        mean final test accuracy of the evaluation networks (the sweep metric)
    eval_acc_std    their standard deviation
    loss            mean method loss since the previous report; train/<name>: every other step metric
    syn_lr          the learned step size, for methods that learn one
    final_acc[_std] the extra end-of-trial evaluation (``final_eval``), when the spec asks for one

Each report carries a checkpoint with the method's complete state (safetensors: images,
optimiser and RNG states), so a trial that fails is retried from its last report and
an interrupted sweep resumes (``run_sweep(spec, resume=True)``). Each trial also writes,
in its directory, ``tensorboard/`` (every step metric, the evaluation accuracy and a grid
of the synthetic images at every evaluation) and ``synthetic.safetensors`` (its latest
synthetic set). After the sweep the experiment directory holds ``leaderboard.csv``,
``leaderboard.md``, ``trials.csv``, ``best/<method>_ipc<k>.safetensors`` and
``tensorboard_hparams/`` (TensorBoard's HPARAMS view over all trials).

    raydd sweep sweeps/quick.yaml [--resume] [--storage PATH]
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .sweep_spec import (ASHA_VARIANTS, RUNGS, SHARED_KNOBS, SweepSpec, asha_rungs, default_grace_period,
                         default_trial_iterations, eval_config, horizon_field, method_class, resolve_knob)

METRIC = "eval_acc"
MODE = "max"
TIME_ATTR = "iterations"
CHECKPOINT_FILE = "method.safetensors"
SYNTHETIC_FILE = "synthetic.safetensors"
TRIAL_STATE_FILE = "trial.json"
TEST_FAULT_KEY = "_test_fault_at_iteration"  # test-only: raise once at each of these iterations (see run_sweep)
TEST_FAULT_MARKER = ".test_fault_injected_at_{}"

# Which farm recipe feeds which method when the method class does not say (``farm_recipe``).
_FARM_RECIPES = {"mtt": "expert", "datm": "expert", "datm_clr": "expert", "dance": "pretrain", "ptlm": "pretrain",
                 "edc": "observer"}  # fallback only: configs normally name their store kind (expert_kind, ...)
_TRIAL_KEYS = {"method", "dataset", "ipc", "seed", "iterations", "eval_every", "asha", "store", "data_root", "resolution",
               "eval", "final_eval", "device", "knobs", "arm", TEST_FAULT_KEY}


class InjectedTestFault(RuntimeError):
    """Raised by the trainable when a test asked for a fault (``_test_fault_at_iteration``)."""


# --------------------------------------------------------------------------- one trial
@dataclass(frozen=True)
class TrialSettings:
    method: str
    dataset: str
    ipc: int
    seed: int
    iterations: int
    eval_every: int | str  # iterations, or "rungs" (with ``asha``: evaluate at the ASHA rungs only)
    store: str | None
    data_root: str | None
    resolution: int | None
    eval: dict
    final_eval: dict | None
    device: str
    knobs: dict  # as given (field names, shared symbols, eval.<name>)
    fault_at: tuple[int, ...]  # test-only fault injection
    method_knobs: dict  # config field -> value
    eval_knobs: dict  # evaluation field -> value (eval.<name>, or zeta under the edc protocol)
    asha: dict = field(default_factory=dict)  # grace_period / reduction_factor / max_t, for eval_every="rungs"

    @classmethod
    def from_config(cls, config: dict) -> "TrialSettings":
        """A trial's settings from its Tune config.

        Method knobs are the entries of ``config["knobs"]`` plus any key that is not a trial
        setting (so ``{"method": "dm", "lr_img": 3.0, ...}`` works); a sweep nests the method,
        its iteration count and its knobs in ``config["arm"]``. ``iterations`` may be
        "default" (``default_trial_iterations``).
        """
        config = dict(config)
        arm = dict(config.pop("arm", None) or {})
        knobs = dict(config.pop("knobs", None) or {})
        knobs.update(arm.pop("knobs", None) or {})
        config.update(arm)
        for key in ("method", "dataset", "ipc", "iterations"):
            if key not in config:
                raise ValueError(f"trial config lacks {key!r}: give method, dataset, ipc, iterations")
        knobs.update({k: v for k, v in config.items() if k not in _TRIAL_KEYS})
        method_knobs, eval_knobs = {}, {}
        for name, value in knobs.items():
            where, target = resolve_knob(config["method"], name, config.get("eval"))
            (method_knobs if where == "method" else eval_knobs)[target] = value
        ipc = int(config["ipc"])
        iterations = config["iterations"]
        if iterations == "default":
            iterations = default_trial_iterations(config["method"], config["dataset"], ipc)
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations={iterations!r} is invalid: expected an integer >= 1 or 'default'")
        return cls(method=config["method"], dataset=config["dataset"], ipc=ipc,
                   seed=int(config.get("seed", 0)), iterations=iterations,
                   eval_every=_eval_every(config.get("eval_every", 0)), store=config.get("store"),
                   data_root=config.get("data_root"), resolution=config.get("resolution"),
                   eval=dict(config.get("eval") or {}), final_eval=config.get("final_eval"),
                   device=config.get("device", "auto"), knobs=knobs, fault_at=_fault_points(config.get(TEST_FAULT_KEY)),
                   method_knobs=method_knobs, eval_knobs=eval_knobs, asha=dict(config.get("asha") or {}))

    def method_config(self):
        """The method's config: published defaults, the knobs, and the schedule horizon = this trial's length."""
        from .methods.base import make_config

        config = make_config(self.method, self.dataset, self.ipc, **self.method_knobs)
        horizon = horizon_field(type(config))
        if horizon is not None and horizon not in self.method_knobs:
            config = config.with_overrides(**{horizon: self.iterations})
        return config

    def eval_config(self, final: bool = False):
        """The (final) evaluation config with the evaluation knobs applied; None if no final evaluation."""
        settings = self.final_eval if final else self.eval
        if final and not settings:
            return None
        return eval_config(self.dataset, settings, **self.eval_knobs)

    @property
    def uses_teachers(self) -> bool:
        return bool(self.eval.get("teachers", False))

    def eval_points(self) -> list[int]:
        if self.eval_every == RUNGS:
            return asha_rungs(self.iterations, self.asha.get("grace_period"), self.asha.get("reduction_factor", 3),
                              self.asha.get("max_t"))
        every = self.eval_every or self.iterations
        points = list(range(every, self.iterations + 1, every))
        return points if points and points[-1] == self.iterations else points + [self.iterations]


def _eval_every(value) -> int | str:
    if value == RUNGS:
        return RUNGS
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"eval_every={value!r} is invalid: expected an integer >= 0 or 'rungs'")
    return value


def _fault_points(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))


def _inject_test_fault(iteration: int, points: tuple[int, ...], workdir: Path) -> None:
    """Test-only: raise InjectedTestFault the first time the trial reaches each iteration in ``points``."""
    marker = workdir / TEST_FAULT_MARKER.format(iteration)
    if iteration in points and not marker.exists():
        marker.write_text(str(iteration))
        time.sleep(1.0)  # like a real crash, some time after the last report: Tune has registered its checkpoint
        raise InjectedTestFault(f"test-only fault injected at iteration {iteration}")


def _trial_device(requested: str) -> str:
    """'auto' means the GPU Ray assigned to this trial, else CPU (never a GPU the trial did not ask for)."""
    if requested != "auto":
        return requested
    import ray
    import torch

    return "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"


def _on_device(config, device: str):
    """An evaluation config whose device 'auto' becomes the trial's device (never a GPU it did not ask for)."""
    import dataclasses

    if config is None or getattr(config, "device", None) != "auto":
        return config
    return dataclasses.replace(config, device=device)


def _trial_threads() -> int:
    from ray import tune

    try:
        cpus = tune.get_context().get_trial_resources().required_resources.get("CPU", 1)
    except Exception:  # noqa: BLE001 - outside a Tune session
        cpus = 1
    return max(1, int(cpus))


def _segment_writer(writer_cls, logdir: Path):
    """A SummaryWriter for one run segment of a trial, whose event file sorts after the earlier segments'.

    A paused (ASHA) or failed trial resumes in a new process that writes a new event file into
    the same directory. TensorBoard reads a run's files in name order, and the name starts with
    the creation second followed by host and pid, so a segment started within the same second as
    the previous one could sort before it and show its steps first. Waiting (at most one second)
    until the clock has passed every existing file's second keeps the order true.
    """
    seconds = (p.name.split(".")[3:4] for p in logdir.glob("events.out.tfevents.*"))  # [] or [second]
    stamps = [int(s[0]) for s in seconds if s and s[0].isdigit()]
    if stamps:
        wait = max(stamps) + 1 - time.time()
        if wait > 0:
            time.sleep(wait)
    return writer_cls(log_dir=str(logdir))


def condensation_trainable(config: dict) -> None:
    """Tune function trainable: one condensation trial (see the module docstring for what it reports)."""
    import torch
    from ray import tune
    from torch.utils.tensorboard import SummaryWriter

    from .condense import StepSizeWatch, image_grid
    from .data.datasets import load_train_test
    from .methods.base import load_checkpoint, save_checkpoint
    from .store import TrajectoryStore

    s = TrialSettings.from_config(config)
    torch.set_num_threads(_trial_threads())
    cls = method_class(s.method)
    method_config = s.method_config()
    device = _trial_device(s.device)
    eval_cfg = _on_device(s.eval_config(), device)
    final_cfg = _on_device(s.eval_config(final=True), device)
    train, test = load_train_test(s.dataset, s.data_root, resolution=s.resolution)
    store = TrajectoryStore(s.store) if s.store else None
    method = cls(method_config, train, store, device=device, seed=s.seed)
    workdir = Path.cwd()  # Tune's per-trial working directory: synced to the trial dir (sync_artifacts)

    history: dict[str, Any] = {"evals": [], "restored_from": []}
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            load_checkpoint(method, Path(d) / CHECKPOINT_FILE)
            history = json.loads((Path(d) / TRIAL_STATE_FILE).read_text())
        history["restored_from"].append(method.iteration)
    writer = _segment_writer(SummaryWriter, workdir / "tensorboard")
    if method.iteration == 0:
        writer.add_image("synthetic/images", image_grid(method.synthetic_set()), 0)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    last: dict[str, float] = {}
    step_time = 0.0
    steps = 0
    reported = False
    points = set(s.eval_points())
    step_size = StepSizeWatch()  # the warning lands in the trial's log
    try:
        while method.iteration < s.iterations:
            t0 = time.perf_counter()
            metrics = method.step()
            step_time += time.perf_counter() - t0
            steps += 1
            step_size.check(metrics, method.iteration)
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    sums[key] = sums.get(key, 0.0) + float(value)
                    counts[key] = counts.get(key, 0) + 1
                    last[key] = float(value)
                    writer.add_scalar(f"train/{key}", value, method.iteration)
            if s.fault_at:
                _inject_test_fault(method.iteration, s.fault_at, workdir)
            if method.iteration not in points:
                continue
            report = _evaluate_and_log(method, test, eval_cfg, s.uses_teachers, writer, image_grid)
            history["evals"].append([method.iteration, report["eval_acc"], report["eval_acc_std"]])
            report.update({"loss": sums.get("loss", float("nan")) / max(1, counts.get("loss", 0)),
                           "seconds_per_iteration": step_time / max(1, steps),
                           "restored_from": history["restored_from"][-1] if history["restored_from"] else 0})
            report.update({f"train/{k}": sums[k] / counts[k] for k in sums if k != "loss"})
            if "syn_lr" in last and "syn_lr" not in report:
                report["syn_lr"] = last["syn_lr"]
            if method.iteration == s.iterations and final_cfg is not None:
                final = evaluate(method, method.synthetic_set(), test, final_cfg, s.uses_teachers)
                report.update({"final_acc": final.mean, "final_acc_std": final.std,
                               "final_models": len(final.accuracies)})
                writer.add_scalar("eval/final_acc", final.mean, method.iteration)
                history["final"] = [final.mean, final.std, len(final.accuracies)]
            history["last"] = {k: v for k, v in report.items() if isinstance(v, (int, float))}
            writer.flush()
            _report(tune, method, history, report, save_checkpoint, workdir)
            reported = True
            sums, counts, step_time, steps = {}, {}, 0.0, 0
        if not reported:  # restored from the final checkpoint: report it once more so Tune sees a result
            last_report = history.get("last") or _evaluate_and_log(method, test, eval_cfg, s.uses_teachers, writer,
                                                                   image_grid)
            _report(tune, method, history, dict(last_report), save_checkpoint, workdir)
    finally:
        writer.close()
        method.close()


def evaluate(method, syn, test, config, teachers: bool = False):
    """Evaluate ``syn`` with ``config``'s protocol (EvalConfig: standard; EDCEvalConfig: EDC's soft-label one).

    ``teachers=True`` (EDC protocol) relabels every augmented batch with the method's
    observers (``method.observer_models()``), as EDC's reference code does.
    """
    from .evaluate import EvalConfig, evaluate_synthetic

    if isinstance(config, EvalConfig):
        return evaluate_synthetic(syn, test, config)
    from .evaluate_edc import evaluate_edc

    models = None
    if teachers:
        if not hasattr(method, "observer_models"):
            raise ValueError(f"eval teachers=true needs observer models, which method {method.name!r} does not have")
        models = method.observer_models()
    return evaluate_edc(syn, test, config, teachers=models)


def _evaluate_and_log(method, test, eval_cfg, teachers: bool, writer, image_grid) -> dict[str, Any]:
    syn = method.synthetic_set()
    t0 = time.perf_counter()
    result = evaluate(method, syn, test, eval_cfg, teachers)
    it = method.iteration
    writer.add_scalar("eval/acc_mean", result.mean, it)
    writer.add_scalar("eval/acc_std", result.std, it)
    writer.add_image("synthetic/images", image_grid(syn), it)
    report: dict[str, Any] = {TIME_ATTR: it, METRIC: result.mean, f"{METRIC}_std": result.std,
                              "eval_models": len(result.accuracies), "eval_time_s": time.perf_counter() - t0}
    if syn.syn_lr is not None:
        report["syn_lr"] = float(syn.syn_lr)
        writer.add_scalar("synthetic/syn_lr", float(syn.syn_lr), it)
    return report


def _report(tune, method, history: dict, report: dict, save_checkpoint, workdir: Path) -> None:
    import ray

    syn = method.synthetic_set()
    syn.save(workdir / SYNTHETIC_FILE)
    report["node_id"] = ray.get_runtime_context().get_node_id()
    with tempfile.TemporaryDirectory(prefix="raydd-ckpt-") as d:
        save_checkpoint(method, Path(d) / CHECKPOINT_FILE)
        syn.save(Path(d) / SYNTHETIC_FILE)
        (Path(d) / TRIAL_STATE_FILE).write_text(json.dumps(history))
        tune.report(report, checkpoint=tune.Checkpoint.from_directory(d))


# --------------------------------------------------------------------------- search spaces
def knob_space(method: str, *, lam: Any = None, tau: Any = None, alpha: Any = None, zeta: Any = None,
               eval_protocol: str = "standard", **fields: Any) -> dict[str, Any]:
    """{knob: value or Tune domain} for ``method``: shared symbols mapped onto its config fields.

    >>> knob_space("ptlm", lam=tune.grid_search([1, 5, 10]), tau=tune.loguniform(0.05, 1))
    {'inject_scale': ..., 'sharpen_tau': ...}

    ``zeta`` (and ``eval.<name>`` fields) land on the evaluation config as ``eval.zeta``
    when the method does not map it and ``eval_protocol`` has it (edc). A shared knob the
    method does not use is a ValueError; None means: not swept. Pass the result as a
    trial's ``knobs`` (``condensation_trainable`` config).
    """
    out: dict[str, Any] = {}
    given = {"lam": lam, "tau": tau, "alpha": alpha, "zeta": zeta}
    for name, value in [*given.items(), *fields.items()]:
        if value is None:
            continue
        where, target = resolve_knob(method, name, {"protocol": eval_protocol})
        key = target if where == "method" else f"eval.{target}"
        if key in out:
            raise ValueError(f"knob_space({method!r}) sets {target!r} twice")
        out[key] = value
    return out


def asha(max_t: int, grace_period: int | None = None, reduction_factor: float = 3):
    """ASHA on the condensation-iteration counter: rungs at grace_period · reduction_factor^k (< max_t).

    Trials report at evaluations only: make every rung an evaluation point (grace_period a
    multiple of eval_every, integer reduction_factor; see ``default_grace_period``).
    """
    from ray.tune.schedulers import ASHAScheduler

    grace = default_grace_period(max_t) if grace_period is None else grace_period
    if not 1 <= grace <= max_t:
        raise ValueError(f"grace_period={grace} is invalid: expected 1 <= grace_period <= max_t ({max_t})")
    if not reduction_factor > 1:
        raise ValueError(f"reduction_factor={reduction_factor} is invalid: expected > 1")
    return ASHAScheduler(time_attr=TIME_ATTR, max_t=max_t, grace_period=grace, reduction_factor=reduction_factor)


def _trial_group(config: dict) -> tuple[str, int, int, int]:
    """(method, IPC, the trial's iteration count, its eval_every) of a trial config."""
    s = TrialSettings.from_config(config)
    return s.method, s.ipc, s.iterations, s.eval_every


def _grouped_asha_class():
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import FIFOScheduler, TrialScheduler

    from .asha import CONTINUE, PromotionLadder

    class GroupedASHA(FIFOScheduler):
        """ASHA within each (method, IPC) group: a trial only competes with trials of its own method and IPC.

        One global ASHA would stop every IPC-1 trial (IPC 50 always scores higher) and every
        trial of a weaker method, leaving the leaderboard's rows for them half-trained. Each
        group gets its own rungs with max_t = the group's iteration count (or ``max_t``) and
        the grace period (default: the group's first evaluation, ``default_grace_period``),
        clamped to max_t.

        ``variant='promotion'`` (default): the ASHA paper's promotion rule (``raydd.asha``): a
        trial at a rung is paused (its checkpoint holds the method state) until it ranks in the
        top ⌊n/η⌋ there, then resumed. ``variant='stopping'``: Ray's ASHAScheduler per group
        (percentile cutoff; the first trials to reach a rung always continue).
        """

        def __init__(self, grace_period: int | None = None, reduction_factor: float = 3, max_t: int | None = None,
                     variant: str = "promotion"):
            super().__init__()
            _check_asha_args(grace_period, reduction_factor, max_t, variant)
            self.grace_period = grace_period
            self.reduction_factor = reduction_factor
            self.max_t = max_t
            self.variant = variant
            self._groups: dict[tuple, Any] = {}
            self._trial_group: dict[str, tuple] = {}
            self._stopped: set[str] = set()
            self._metric = None
            self._mode = None

        def set_search_properties(self, metric, mode, **spec) -> bool:
            if (self._metric and metric) or (self._mode and mode):
                return False
            self._metric = metric or self._metric
            self._mode = mode or self._mode
            return True

        def _scheduler_for(self, trial):
            key = self._trial_group.get(trial.trial_id)
            if key is None:
                method, ipc, iterations, eval_every = _trial_group(trial.config)
                key = (method, ipc)
                self._trial_group[trial.trial_id] = key
                if key not in self._groups:
                    max_t = self.max_t or iterations
                    grace = min(self.grace_period or default_grace_period(max_t, eval_every), max_t)
                    if self.variant == "stopping":
                        child = asha(max_t, grace, self.reduction_factor)
                        child.set_search_properties(self._metric, self._mode)
                    else:
                        rungs = asha_rungs(max_t, grace, int(self.reduction_factor))[:-1]  # judged below max_t
                        child = PromotionLadder(rungs, int(self.reduction_factor), self._mode or MODE)  # [] : no rung
                    self._groups[key] = child
            return self._groups[key]

        def on_trial_add(self, tune_controller, trial) -> None:
            child = self._scheduler_for(trial)
            if self.variant == "stopping":
                child.on_trial_add(tune_controller, trial)
                return
            last = getattr(trial, "last_result", None) or {}
            if TIME_ATTR in last and self._metric in last:  # a resumed sweep: rebuild the rungs from the trials
                child.on_result(trial.trial_id, int(last[TIME_ATTR]), last[self._metric])

        def on_trial_result(self, tune_controller, trial, result) -> str:
            child = self._scheduler_for(trial)
            if self.variant == "stopping":
                return child.on_trial_result(tune_controller, trial, result)
            if TIME_ATTR not in result or self._metric not in result:
                return TrialScheduler.CONTINUE
            decision = child.on_result(trial.trial_id, int(result[TIME_ATTR]), result[self._metric])
            return TrialScheduler.CONTINUE if decision == CONTINUE else TrialScheduler.PAUSE

        def on_trial_complete(self, tune_controller, trial, result) -> None:
            if self.variant == "stopping":
                self._scheduler_for(trial).on_trial_complete(tune_controller, trial, result)

        def on_trial_remove(self, tune_controller, trial) -> None:
            if self.variant == "stopping":
                self._scheduler_for(trial).on_trial_remove(tune_controller, trial)

        def choose_trial_to_run(self, tune_controller):
            if self.variant == "stopping":
                return super().choose_trial_to_run(tune_controller)
            trials = tune_controller.get_trials()
            by_group: dict[tuple, list] = {}
            for t in trials:
                self._scheduler_for(t)
                by_group.setdefault(self._trial_group[t.trial_id], []).append(t)
            paused = {key: {t.trial_id: t for t in members if t.status == Trial.PAUSED}
                      for key, members in by_group.items()}
            for key, waiting in paused.items():  # 1. promote a paused trial (highest rung first)
                chosen = self._groups[key].next_promotion(set(waiting)) if waiting else None
                if chosen is not None:
                    return waiting[chosen]
            for t in trials:  # 2. else a new configuration
                if t.status == Trial.PENDING:
                    return t
            if not tune_controller.search_alg.is_finished():
                return None
            for key, waiting in paused.items():  # 3. an idle group: close its rungs (at least one reaches max_t)
                if not waiting or any(t.status in (Trial.PENDING, Trial.RUNNING) for t in by_group[key]):
                    continue
                chosen = self._groups[key].next_promotion(set(waiting), final=True)
                if chosen is not None:
                    return waiting[chosen]
                for t in waiting.values():  # nothing promotable any more: the waiting trials have lost
                    self._stopped.add(t.trial_id)
                    tune_controller.stop_trial(t)
            return None

        def debug_string(self) -> str:
            if self.variant == "stopping":
                stopped = sum(child._num_stopped for child in self._groups.values())
            else:
                stopped = len(self._stopped)
            return (f"Using ASHA ({self.variant}) per (method, IPC) group: {len(self._groups)} group(s), "
                    f"{stopped} trial(s) stopped early")

    return GroupedASHA


def _check_asha_args(grace_period, reduction_factor, max_t, variant) -> None:
    """One validation for both public entry points (grouped_asha and GroupedASHA)."""
    for key, value in (("grace_period", grace_period), ("max_t", max_t)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{key}={value!r} is invalid: expected an integer >= 1 (or None: the group's default)")
    if isinstance(reduction_factor, bool) or not isinstance(reduction_factor, (int, float)) or not reduction_factor > 1:
        raise ValueError(f"reduction_factor={reduction_factor!r} is invalid: expected a number > 1")
    if variant not in ASHA_VARIANTS:
        raise ValueError(f"variant={variant!r} is invalid: accepted {', '.join(ASHA_VARIANTS)}")


def grouped_asha(grace_period: int | None = None, reduction_factor: float = 3, max_t: int | None = None,
                 variant: str = "promotion"):
    """ASHA run separately within each (method, IPC) group (see GroupedASHA); what sweeps use."""
    _check_asha_args(grace_period, reduction_factor, max_t, variant)  # before Ray is imported
    return __getattr__("GroupedASHA")(grace_period, reduction_factor, max_t, variant)


def __getattr__(name: str):
    # GroupedASHA subclasses a Ray class: built on first use so that importing raydd.tune (the CLI
    # does) does not import Ray; registered as raydd.tune.GroupedASHA so Tune can pickle it by reference.
    if name == "GroupedASHA":
        cls = _grouped_asha_class()
        cls.__name__ = cls.__qualname__ = name
        cls.__module__ = __name__
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _domain(knob):
    from ray import tune

    if knob.kind == "const":
        return knob.values[0]
    if knob.kind == "grid":
        return tune.grid_search(list(knob.values))
    if knob.kind == "choice":
        return tune.choice(list(knob.values))
    return getattr(tune, knob.kind)(*knob.values)


def param_space(spec: SweepSpec, *, store: str | None = None, data_root: str | None = None) -> dict[str, Any]:
    """Tune's param space: one ``arm`` per method x grid point (its knobs sampled inside), x IPC x seed.

    Under ASHA the arms start in a seeded shuffled order (the same for every run of the spec):
    asynchronous ASHA promotes a trial that is in the top 1/rf of what a rung has recorded so
    far, so a grid started corner-first (e.g. all good settings first) lets the early trials run
    to the end before anything better or worse has been seen.
    """
    import random

    from ray import tune

    arms = []
    for method in spec.methods:
        knobs = spec.knobs.get(method, {})
        for point in spec.grid_points(method):
            arm_knobs = {k: _domain(v) for k, v in knobs.items() if v.kind != "grid"}
            arm_knobs.update(point)
            arm = {"method": method, "iterations": spec.iterations[method], "knobs": arm_knobs,
                   "eval_every": spec.method_eval_every(method), "eval": spec.eval_settings(method)}
            if spec.final_eval is not None:
                arm["final_eval"] = spec.final_eval_settings(method)
            if arm["eval_every"] == RUNGS:
                arm["asha"] = spec.asha_settings()
            arms.append(arm)
    if spec.scheduler.get("type") == "asha":
        random.Random(0).shuffle(arms)
    space = {
        "arm": tune.grid_search(arms), "ipc": tune.grid_search(list(spec.ipcs)),
        "seed": tune.grid_search(list(spec.seeds)) if len(spec.seeds) > 1 else spec.seeds[0],
        "dataset": spec.dataset, "store": store, "data_root": data_root,
        "resolution": spec.resolution, "device": spec.device,
    }
    return space


def _trial_id_from_path(path: str | None) -> str:
    """The Tune trial id ('c38f5_00011') at the end of a trial directory named by ``_trial_dirname``."""
    return "_".join(Path(path or "").name.rsplit("_", 2)[-2:])


def _trial_dirname(trial) -> str:
    cfg = trial.config
    method = (cfg.get("arm") or {}).get("method", cfg.get("method", "trial"))
    return f"{method}_ipc{cfg.get('ipc')}_{trial.trial_id}"


# --------------------------------------------------------------------------- cluster checks
class SweepResourceError(ValueError):
    """The cluster can never run the requested trials (e.g. GPUs asked on a GPU-less cluster)."""


def check_cluster(spec: SweepSpec) -> int:
    """Fail fast on per-trial resources the Ray cluster cannot satisfy; return how many trials fit at once."""
    import ray

    total = ray.cluster_resources()
    gpus = total.get("GPU", 0.0)
    if spec.gpu > 0 and gpus < spec.gpu:
        raise SweepResourceError(f"resources.gpu={spec.gpu:g} per trial but the Ray cluster has {gpus:g} GPU(s): "
                                 f"use gpu: 0 on a CPU-only cluster, or join a cluster with GPUs")
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    node_cpus = max((n["Resources"].get("CPU", 0.0) for n in nodes), default=0.0)
    if spec.cpu > node_cpus:
        raise SweepResourceError(f"resources.cpu={spec.cpu:g} per trial but the largest node has {node_cpus:g} CPU(s)")
    fit = int(total.get("CPU", 0.0) // spec.cpu)
    if spec.gpu > 0:
        fit = min(fit, int(gpus // spec.gpu + 1e-9))
    return max(1, fit)


def store_kinds(spec: SweepSpec, method: str) -> tuple[str, ...]:
    """Store kinds ``method`` reads (any one suffices); () when it needs no store.

    Read from the method config's ``*_kind`` fields (expert_kind, observer_kind, ...) with
    the spec's constant knobs applied; 'auto' means the module's AUTO_KINDS.
    """
    import dataclasses

    from .methods.base import make_config

    cls = method_class(method)
    if not getattr(cls, "needs_store", False):
        return ()
    consts = {k: v.values[0] for k, v in spec.knobs.get(method, {}).items()
              if v.kind == "const" and resolve_knob(method, k, spec.eval_settings(method))[0] == "method"}
    config = make_config(method, spec.dataset, spec.ipcs[0], **consts)
    kinds: list[str] = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name.endswith("_kind") and isinstance(value, str):
            if value == "auto":
                kinds += list(getattr(sys.modules[cls.__module__], "AUTO_KINDS", ("expert", "pretrain")))
            else:
                kinds.append(value)
    if not kinds:
        recipe = getattr(cls, "farm_recipe", None) or _FARM_RECIPES.get(cls.name)
        if recipe is None:
            raise ValueError(f"method {cls.name!r} reads a trajectory store but its config names no *_kind field "
                             f"and the class no farm_recipe")
        from .farm.recipes import get_recipe

        kinds.append(get_recipe(recipe).kind)
    return tuple(dict.fromkeys(kinds))


def farm_recipe(spec: SweepSpec, method: str) -> str | None:
    """The farm recipe that produces what ``method`` reads (None: it needs no store)."""
    from .farm.recipes import RECIPES

    kinds = store_kinds(spec, method)
    if not kinds:
        return None
    named = getattr(method_class(method), "farm_recipe", None)
    if named:
        return named
    for kind in kinds:
        for name, recipe in RECIPES.items():
            if recipe.kind == kind:
                return name
    raise ValueError(f"no registered farm recipe produces store kind(s) {list(kinds)} that {method!r} reads")


def check_store(spec: SweepSpec, store_root: str) -> None:
    """Every method that reads trajectories finds some of a kind it reads for the dataset in the store."""
    from .store import TrajectoryStore

    store = TrajectoryStore(store_root)
    for method in spec.methods:
        kinds = store_kinds(spec, method)
        if kinds and not any(store.list(dataset=spec.dataset, kind=kind) for kind in kinds):
            recipe = farm_recipe(spec, method)
            raise ValueError(f"method {method!r} needs {' or '.join(repr(k) for k in kinds)} trajectories of "
                             f"{spec.dataset} but store {store.root} has none: farm them first (raydd farm "
                             f"--recipe {recipe} --dataset {spec.dataset} --store {store.root}), or add "
                             f"'farm: {{{recipe}: {{...}}}}' to the spec and run with --farm (or sweeps/submit.py)")


def farm_for_sweep(spec: SweepSpec, *, backend: str = "ray", progress: bool = True,
                   tensorboard: str | None = None) -> list:
    """Farm every ``spec.farm`` recipe into the sweep's store (what exists is skipped); return the reports.

    ``tensorboard``: a local directory for the farmed trajectories' curves (unless an entry sets its own).

    A method that reads the store but whose recipe has no ``farm`` entry is left to
    ``check_store`` (the store may already hold its trajectories).
    """
    from .farm import farm

    reports = []
    extra = {"backend": backend} if tensorboard is None else {"backend": backend, "tensorboard": tensorboard}
    for farm_spec in spec.farm_specs(**extra):
        if progress:
            print(f"raydd sweep: farming {farm_spec.trajectories} x {farm_spec.recipe} on {spec.dataset} into "
                  f"{spec.store}", file=sys.stderr)
        reports.append(farm(farm_spec, progress=progress))
    return reports


# --------------------------------------------------------------------------- results
@dataclass
class LeaderboardRow:
    method: str
    ipc: int
    acc_mean: float  # final test accuracy (mean over the evaluation networks) of the best trial
    acc_std: float
    source: str  # "final_eval" or "eval" (which evaluation the accuracy comes from)
    eval_models: int
    iterations: int  # iterations the best trial ran
    target_iterations: int
    trials: int  # trials of this (method, IPC), stopped early or not
    stopped_early: int
    errored: int
    seed: int
    knobs: dict
    trial_id: str
    trial_path: str
    synthetic_path: str | None  # the copy in <experiment>/best/


@dataclass
class SweepResult:
    name: str
    experiment_path: str
    rows: list[LeaderboardRow]
    trials: list[dict]
    leaderboard_csv: str
    leaderboard_md: str
    trials_csv: str
    hparams_dir: str | None
    num_errors: int
    wall_time_s: float
    unfinished: int = 0  # trials neither terminated nor errored (an interrupted sweep): resume=True finishes them
    result_grid: Any = field(default=None, repr=False)

    @property
    def complete(self) -> bool:
        return self.unfinished == 0

    def markdown(self) -> str:
        return leaderboard_markdown(self.rows, self.name, unfinished=self.unfinished)


def _trial_record(result, spec: SweepSpec) -> dict:
    settings = TrialSettings.from_config(result.config or {})
    metrics = result.metrics or {}
    knobs = settings.knobs
    source = "final_eval" if "final_acc" in metrics else "eval"
    acc = metrics.get("final_acc", metrics.get(METRIC))
    std = metrics.get("final_acc_std", metrics.get(f"{METRIC}_std"))
    return {
        "method": settings.method, "ipc": settings.ipc, "seed": settings.seed,
        "knobs": knobs, "iterations": int(metrics.get(TIME_ATTR, 0) or 0),
        "target_iterations": settings.iterations, "acc_mean": acc, "acc_std": std, "source": source,
        "eval_models": int(metrics.get("final_models" if source == "final_eval" else "eval_models", 0) or 0),
        "eval_acc": metrics.get(METRIC), "syn_lr": metrics.get("syn_lr"),
        "trial_id": metrics.get("trial_id") or _trial_id_from_path(result.path), "path": result.path,
        "error": result.error is not None,
        "node_id": metrics.get("node_id"), "checkpoint": result.checkpoint,
    }


def build_leaderboard(records: list[dict]) -> list[tuple[LeaderboardRow, dict]]:
    """Best trial per (method, IPC): among trials that ran all their iterations (if any did), highest accuracy."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in records:
        groups.setdefault((r["method"], r["ipc"]), []).append(r)
    rows = []
    for (method, ipc), group in sorted(groups.items()):
        scored = [r for r in group if r["acc_mean"] is not None and math.isfinite(r["acc_mean"])]
        if not scored:
            continue
        complete = [r for r in scored if r["iterations"] >= r["target_iterations"]]
        best = max(complete or scored, key=lambda r: (r["acc_mean"], -(r["acc_std"] or 0.0)))
        rows.append((LeaderboardRow(
            method=method, ipc=ipc, acc_mean=float(best["acc_mean"]), acc_std=float(best["acc_std"] or 0.0),
            source=best["source"], eval_models=best["eval_models"], iterations=best["iterations"],
            target_iterations=best["target_iterations"], trials=len(group),
            stopped_early=sum(1 for r in group if not r["error"] and r["iterations"] < r["target_iterations"]),
            errored=sum(1 for r in group if r["error"]), seed=best["seed"], knobs=best["knobs"],
            trial_id=best["trial_id"], trial_path=best["path"], synthetic_path=None), best))
    return rows


def leaderboard_markdown(rows: list[LeaderboardRow], name: str = "", *, unfinished: int = 0) -> str:
    lines = [f"### Leaderboard {name}".rstrip(), ""]
    if unfinished:
        lines += [f"**Incomplete: {unfinished} trial(s) did not finish (interrupted sweep); resume it with "
                  f"`raydd sweep <spec> --resume`.**", ""]
    lines += [
             "| method | IPC | accuracy (%) | evaluation | iterations | trials (early-stopped, errored) | knobs |",
             "|---|---:|---:|---|---:|---|---|"]
    for r in rows:
        knobs = ", ".join(f"{k}={_short(v)}" for k, v in sorted(r.knobs.items())) or "defaults"
        lines.append(f"| {r.method} | {r.ipc} | {100 * r.acc_mean:.2f} ± {100 * r.acc_std:.2f} | "
                     f"{r.source}, {r.eval_models} nets | {r.iterations}/{r.target_iterations} | "
                     f"{r.trials} ({r.stopped_early}, {r.errored}) | {knobs} |")
    lines += ["", "Accuracy: mean ± std of the final test accuracy of freshly trained networks on the best trial's "
              "synthetic set (never the best epoch)."]
    return "\n".join(lines) + "\n"


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _csv(rows: list[dict]) -> str:
    if not rows:
        return ""
    buf = io.StringIO()
    keys = list(rows[0])
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v
                         for k, v in row.items()})
    return buf.getvalue()


def _write_text(fs, path: str, text: str) -> None:
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def _copy_synthetic(record: dict, fs, dest: str) -> bool:
    """Copy the trial's synthetic set (trial dir, else its latest checkpoint) to ``dest``."""
    import pyarrow.fs as pafs

    candidates = []
    if record["path"]:
        candidates.append((fs, f"{record['path']}/{SYNTHETIC_FILE}"))
    ckpt = record.get("checkpoint")
    if ckpt is not None:
        candidates.append((ckpt.filesystem, f"{ckpt.path}/{SYNTHETIC_FILE}"))
    for src_fs, src in candidates:
        if src_fs.get_file_info(src).type == pafs.FileType.File:
            pafs.copy_files(src, dest, source_filesystem=src_fs, destination_filesystem=fs)
            return True
    return False


def _hparams_value(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value, sort_keys=True)


def write_hparams(records: list[dict], fs, experiment_path: str) -> str:
    """TensorBoard HPARAMS view: one run per trial (method, IPC, seed, knobs) against its accuracy.

    One experiment summary at the top (the union of every trial's hyperparameters, so the
    table has a column per knob of any method) and one session per trial.
    """
    import pyarrow.fs as pafs
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    dest = f"{experiment_path}/tensorboard_hparams"
    runs = []
    for r in records:
        if r["acc_mean"] is None:
            continue
        hp = {"method": r["method"], "ipc": r["ipc"], "seed": r["seed"],
              **{k: _hparams_value(v) for k, v in sorted(r["knobs"].items())}}
        metrics = {"hparams/acc_mean": float(r["acc_mean"]), "hparams/acc_std": float(r["acc_std"] or 0.0),
                   "hparams/iterations": float(r["iterations"])}
        runs.append((f"{r['method']}_ipc{r['ipc']}_{r['trial_id']}", hp, metrics))
    textual = {k for _, hp, _ in runs for k, v in hp.items() if isinstance(v, (str, bool))}
    for _, hp, _ in runs:  # one type per column: a column with any text value is all text
        for k in textual & set(hp):
            hp[k] = str(hp[k])
    union: dict[str, Any] = {}
    for _, hp, _ in runs:
        for k, v in hp.items():
            union.setdefault(k, v)
    discrete = {k: sorted({hp[k] for _, hp, _ in runs if k in hp}) for k in textual}
    with tempfile.TemporaryDirectory(prefix="raydd-hparams-") as tmp:
        if runs:
            experiment, _, _ = hparams_summary(union, runs[0][2], hparam_domain_discrete=discrete)
            with SummaryWriter(log_dir=tmp) as root:
                root.file_writer.add_summary(experiment)
            for run_name, hp, metrics in runs:
                _, start, end = hparams_summary(hp, metrics)
                with SummaryWriter(log_dir=os.path.join(tmp, run_name)) as writer:
                    writer.file_writer.add_summary(start)
                    writer.file_writer.add_summary(end)
                    for key, value in metrics.items():
                        writer.add_scalar(key, value)
        fs.create_dir(dest, recursive=True)
        pafs.copy_files(tmp, dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return dest


def summarize(result_grid, spec: SweepSpec, *, wall_time_s: float = 0.0) -> SweepResult:
    """Leaderboard, trial table, best synthetic sets and the hparams view, written into the experiment dir."""
    fs = result_grid.filesystem
    exp = result_grid.experiment_path
    records = [_trial_record(res, spec) for res in result_grid]
    statuses = _trial_statuses(result_grid)
    for r in records:
        r["status"] = statuses.get(r["trial_id"], "ERROR" if r["error"] else "UNKNOWN")
    unfinished = len(result_grid) - result_grid.num_terminated - result_grid.num_errors
    board = build_leaderboard(records)
    fs.create_dir(f"{exp}/best", recursive=True)
    rows = []
    for row, best in board:
        dest = f"{exp}/best/{row.method}_ipc{row.ipc}.safetensors"
        if _copy_synthetic(best, fs, dest):
            row.synthetic_path = dest
        rows.append(row)
    trials = [{k: v for k, v in r.items() if k != "checkpoint"} for r in records]
    paths = {name: f"{exp}/{name}" for name in ("leaderboard.csv", "leaderboard.md", "trials.csv")}
    _write_text(fs, paths["leaderboard.csv"], _csv([asdict(r) for r in rows]))
    _write_text(fs, paths["leaderboard.md"], leaderboard_markdown(rows, spec.name, unfinished=unfinished))
    _write_text(fs, paths["trials.csv"], _csv(trials))
    hparams = write_hparams(records, fs, exp) if records else None
    return SweepResult(spec.name, exp, rows, trials, paths["leaderboard.csv"], paths["leaderboard.md"],
                       paths["trials.csv"], hparams, sum(1 for r in records if r["error"]), wall_time_s,
                       unfinished, result_grid)


def _trial_statuses(result_grid) -> dict[str, str]:
    """{trial id: Tune status} (TERMINATED, ERROR, PENDING, RUNNING, PAUSED); {} if Ray hides them."""
    analysis = getattr(result_grid, "_experiment_analysis", None)
    return {t.trial_id: t.status for t in getattr(analysis, "trials", None) or []}


# --------------------------------------------------------------------------- running a sweep
def _absolute(location: str) -> str:
    return location if "://" in location else str(Path(location).expanduser().resolve())


def _connect(address: str | None) -> bool:
    import logging

    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    ray.init(address=address, include_dashboard=False, logging_level=logging.ERROR)
    return True


def run_sweep(spec: SweepSpec, *, progress: bool = True, resume: bool = False, storage: str | None = None,
              address: str | None = None, _test_trial_config: dict | None = None) -> SweepResult:
    """Run ``spec`` with Ray Tune and write the leaderboard into ``<storage>/<name>``.

    Uses the running Ray instance, else joins ``address`` / RAY_ADDRESS, else starts a local
    one (shut down again at the end). With ``resume=True`` an interrupted sweep in the same
    directory continues: finished trials are kept, unfinished and errored ones restart from
    their last checkpoint. ``_test_trial_config`` is for tests only (fault injection).
    """
    from ray import tune

    started_at = time.perf_counter()
    storage = _absolute(storage or spec.storage)
    store = _absolute(spec.store) if spec.store else None
    data_root = _absolute(spec.data_root) if spec.data_root else None
    if store is not None:
        check_store(spec, store)
    else:
        needy = [m for m in spec.methods if store_kinds(spec, m)]
        if needy:
            raise ValueError(f"methods {needy} read a trajectory store but the spec has store: null")
    experiment = f"{storage.rstrip('/')}/{spec.name}"
    can_restore = tune.Tuner.can_restore(experiment)
    if can_restore and not resume:
        raise ValueError(f"sweep {experiment} already exists: pass --resume to continue it, or choose another "
                         f"name/--storage")
    started = _connect(address)
    try:
        check_cluster(spec)
        _warn_local_storage(storage, progress)
        trainable = tune.with_resources(condensation_trainable, {"cpu": spec.cpu, "gpu": spec.gpu})
        if can_restore:
            _check_same_spec(spec, experiment)
            if progress:
                print(f"raydd sweep: resuming {experiment}", file=sys.stderr)
            tuner = tune.Tuner.restore(experiment, trainable, resume_errored=True)
        else:
            if resume and progress:
                print(f"raydd sweep: nothing to resume at {experiment}; starting it", file=sys.stderr)
            tuner = _new_tuner(spec, trainable, storage, store, data_root, progress, _test_trial_config)
            _save_spec(spec, experiment)
        grid = tuner.fit()
        return summarize(grid, spec, wall_time_s=time.perf_counter() - started_at)
    finally:
        if started:
            import ray

            ray.shutdown()


def _warn_local_storage(storage: str, progress: bool) -> None:
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1 and "://" not in storage and progress:
        print(f"raydd sweep: {len(nodes)} nodes but storage {storage} is a local path: every node must mount it "
              f"(NFS), else use a URI such as s3://bucket/raydd-sweeps (--storage)", file=sys.stderr)


def _new_tuner(spec, trainable, storage, store, data_root, progress, test_config):
    from ray import tune

    space = param_space(spec, store=store, data_root=data_root)
    space.update(test_config or {})
    scheduler = None
    if spec.scheduler["type"] == "asha":
        scheduler = grouped_asha(spec.scheduler.get("grace_period"), spec.scheduler.get("reduction_factor", 3),
                                 spec.scheduler.get("max_t"), spec.scheduler.get("variant", "promotion"))
    return tune.Tuner(
        trainable, param_space=space,
        tune_config=tune.TuneConfig(metric=METRIC, mode=MODE, scheduler=scheduler, num_samples=spec.samples,
                                    max_concurrent_trials=spec.max_concurrent, trial_dirname_creator=_trial_dirname,
                                    reuse_actors=True),
        run_config=tune.RunConfig(
            name=spec.name, storage_path=storage, verbose=1 if progress else 0,
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            sync_config=tune.SyncConfig(sync_artifacts=True)))


def _fs(location: str):
    import pyarrow.fs as pafs

    if "://" in location:
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), location


def _save_spec(spec: SweepSpec, experiment: str) -> None:
    fs, path = _fs(experiment)
    fs.create_dir(path, recursive=True)
    _write_text(fs, f"{path}/sweep_spec.json", json.dumps(spec.to_dict(), indent=2, sort_keys=True))


def _check_same_spec(spec: SweepSpec, experiment: str) -> None:
    import pyarrow.fs as pafs

    fs, path = _fs(experiment)
    target = f"{path}/sweep_spec.json"
    if fs.get_file_info(target).type != pafs.FileType.File:
        return
    with fs.open_input_stream(target) as f:
        saved = json.loads(f.read().decode())
    mine = spec.to_dict()
    ignore = {"storage"}  # everything else is fixed when the sweep starts (Tune restores its own copy)
    diff = sorted(k for k in set(saved) | set(mine) if k not in ignore and saved.get(k) != mine.get(k))
    if diff:
        raise ValueError(f"cannot resume {experiment}: the spec differs from the one it was started with in {diff}")


# --------------------------------------------------------------------------- CLI
def add_sweep_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep", help="run a Ray Tune sweep of condensation methods from a YAML spec",
        description="Run every method x IPC x knob setting of a sweep spec as Tune trials (ASHA stops weak ones "
                    "early on the evaluation accuracy), then write a leaderboard, the best synthetic sets and "
                    "TensorBoard logs into <storage>/<name>.")
    p.add_argument("spec", help="sweep spec YAML (see sweeps/quick.yaml)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep with the same name")
    p.add_argument("--storage", help="where to write the experiment: a directory or a URI such as s3://bucket/sweeps "
                                     "(default: the spec's storage, raydd-sweeps)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    p.add_argument("--farm", action="store_true",
                   help="first farm the spec's 'farm:' recipes into its store (what exists is skipped)")
    p.add_argument("--quiet", action="store_true", help="no Tune progress table")


def cmd_sweep(args) -> int:
    spec = SweepSpec.from_yaml(args.spec)
    print(f"raydd sweep: {spec.name}: {spec.num_trials} trial(s) of {', '.join(spec.methods)} on {spec.dataset} "
          f"IPC {list(spec.ipcs)}", file=sys.stderr)
    started = _connect(getattr(args, "address", None)) if getattr(args, "farm", False) else False
    try:
        if getattr(args, "farm", False):
            farm_for_sweep(spec, progress=not args.quiet)
        result = run_sweep(spec, progress=not args.quiet, resume=args.resume, storage=args.storage,
                           address=getattr(args, "address", None))
    finally:
        if started:
            import ray

            ray.shutdown()
    print(result.markdown())
    print(f"{len(result.trials)} trial(s), {result.num_errors} errored, {result.unfinished} unfinished, "
          f"{result.wall_time_s:.0f} s; results in {result.experiment_path}; "
          f"TensorBoard: tensorboard --logdir {result.experiment_path}")
    if not result.complete:
        return 3
    return 0 if result.rows else 1


__all__ = ["METRIC", "SHARED_KNOBS", "TIME_ATTR", "LeaderboardRow", "SweepResourceError", "SweepResult", "SweepSpec",
           "TrialSettings", "add_sweep_parser", "asha", "build_leaderboard", "check_cluster", "check_store",
           "cmd_sweep", "condensation_trainable", "evaluate", "farm_for_sweep", "farm_recipe", "grouped_asha",
           "knob_space", "leaderboard_markdown", "param_space", "run_sweep", "store_kinds", "summarize"]
