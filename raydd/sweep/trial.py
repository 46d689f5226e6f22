"""One sweep trial: its plain plan (``TrialSettings``) and the Tune trainable that runs it.

A trial = (method, dataset, IPC, knobs, seed). ``condensation_trainable`` loads the data, builds
the method and runs it through the one condensation loop (``raydd.condense.condense``) with two
sinks: ``TensorBoard`` (the trial's ``tensorboard/`` directory) and ``TuneReport``, which at every
evaluation reports to Tune::

    iterations      condensation iterations done (ASHA's time attribute; not training_iteration)
    eval_acc        mean final test accuracy of the evaluation networks (the sweep metric)
    eval_acc_std    their standard deviation
    loss            mean method loss since the previous report; train/<name>: every other step metric
    syn_lr          the learned step size, for methods that learn one
    final_acc[_std] the extra end-of-trial evaluation (``final_eval``), when the spec asks for one

and attaches a checkpoint with the method's complete state (safetensors: images, optimiser and
RNG states), so a trial that fails is retried from its last report and an interrupted sweep
resumes. The trial also keeps its latest synthetic set in ``synthetic.safetensors``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import ray
from ray import tune

from ..condense import EvalRecord, Run, Sink, TensorBoard, condense
from ..methods import get_method, load_checkpoint, save_checkpoint
from ..plan import RunPlan, plan_run
from .rungs import RUNGS, asha_rungs
from .spec import default_trial_iterations, resolve_knob, robustness_config

METRIC = "eval_acc"
MODE = "max"
TIME_ATTR = "iterations"
CHECKPOINT_FILE = "method.safetensors"
SYNTHETIC_FILE = "synthetic.safetensors"
TRIAL_STATE_FILE = "trial.json"
SEGMENTS_FILE = "segments.jsonl"  # a trial's run segments (restarts, resumes): from, steps, status, pid, time
_TRIAL_KEYS = {"method", "dataset", "ipc", "seed", "iterations", "eval_every", "asha", "store", "data_root",
               "resolution", "eval", "final_eval", "metrics", "device", "knobs", "arm"}


@dataclass(frozen=True)
class TrialSettings:
    """A trial's plan: plain data, knob names already resolved to the fields they set."""

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
    method_knobs: dict  # config field -> value
    eval_knobs: dict  # evaluation field -> value
    asha: dict = field(default_factory=dict)  # grace_period / reduction_factor / max_t, for eval_every="rungs"
    metrics: dict | None = None  # RobustnessConfig fields: DD-Ranking's scores of the last set

    @classmethod
    def from_config(cls, config: dict) -> "TrialSettings":
        """A trial's settings from its Tune config.

        A sweep's config nests the method, its iteration count and its knobs (already resolved by the
        spec: ``method_knobs``, ``eval_knobs``) in ``arm``. A hand-written config names the method and
        its knobs directly: under ``knobs`` or as any key that is not a trial setting (so
        ``{"method": "dm", "lr_img": 3.0, ...}`` works); those names (fields, shared symbols lam/tau/
        alpha/zeta, ``eval.<field>``) are resolved here. ``iterations`` may be "default".
        """
        config = dict(config)
        arm = dict(config.pop("arm", None) or {})
        method_knobs = dict(arm.pop("method_knobs", None) or {})
        eval_knobs = dict(arm.pop("eval_knobs", None) or {})
        given = {**(config.pop("knobs", None) or {}), **(arm.pop("knobs", None) or {})}
        config.update(arm)
        for key in ("method", "dataset", "ipc", "iterations"):
            if key not in config:
                raise ValueError(f"trial config lacks {key!r}: give method, dataset, ipc, iterations")
        given.update({k: v for k, v in config.items() if k not in _TRIAL_KEYS})
        for name, value in given.items():
            where, target = resolve_knob(config["method"], name, config.get("eval"))
            (method_knobs if where == "method" else eval_knobs)[target] = value
        ipc = int(config["ipc"])
        iterations = config["iterations"]
        if iterations == "default":
            iterations = default_trial_iterations(config["method"], config["dataset"], ipc)
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations={iterations!r} is invalid: expected an integer >= 1 or 'default'")
        every = config.get("eval_every", 0)
        if every != RUNGS and (isinstance(every, bool) or not isinstance(every, int) or every < 0):
            raise ValueError(f"eval_every={every!r} is invalid: expected an integer >= 0 or 'rungs'")
        return cls(method=config["method"], dataset=config["dataset"], ipc=ipc, seed=int(config.get("seed", 0)),
                   iterations=iterations, eval_every=every, store=config.get("store"),
                   data_root=config.get("data_root"), resolution=config.get("resolution"),
                   eval=dict(config.get("eval") or {}), final_eval=config.get("final_eval"),
                   device=config.get("device", "auto"), method_knobs=method_knobs, eval_knobs=eval_knobs,
                   asha=dict(config.get("asha") or {}), metrics=config.get("metrics"))

    @property
    def knobs(self) -> dict:
        """The knobs as the leaderboard shows them: config fields, evaluation settings as ``eval.<field>``."""
        return {**self.method_knobs, **{f"eval.{k}": v for k, v in self.eval_knobs.items()}}

    def plan(self, final: bool = False) -> RunPlan:
        """The trial's run by the planner (``raydd.plan``): the method's published defaults, planned for the
        trial's length, with its knobs; the evaluation with the evaluation knobs (``final``: the extra
        end-of-trial one, None when the spec asks for none)."""
        settings = self.final_eval if final else self.eval
        return plan_run(self.method, self.dataset, self.ipc, iterations=self.iterations, knobs=self.method_knobs,
                        eval_settings=None if final and not settings else {**settings, **self.eval_knobs},
                        data_root=self.data_root)

    def method_config(self):
        return self.plan().config

    def eval_config(self, final: bool = False):
        return self.plan(final).eval_config

    def eval_points(self) -> list[int]:
        if self.eval_every == RUNGS:
            return asha_rungs(self.iterations, self.asha.get("grace_period"), self.asha.get("reduction_factor", 3),
                              self.asha.get("max_t"))
        every = self.eval_every or self.iterations
        points = list(range(every, self.iterations + 1, every))
        return points if points and points[-1] == self.iterations else points + [self.iterations]


# --------------------------------------------------------------------------- reporting to Tune
class TuneReport(Sink):
    """At every evaluation: ``tune.report`` of the metrics (module doc) with a checkpoint of the method."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.history: dict[str, Any] = {"evals": [], "restored_from": []}
        self._reset(0.0)

    def _reset(self, step_seconds: float) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.last: dict[str, float] = {}
        self.steps_at, self.seconds_at = 0, step_seconds

    def restore(self, method) -> bool:
        """Resume ``method`` (and this trial's history) from its newest checkpoint: Tune's, or a newer one in
        the trial's directory (Tune's experiment state can lag behind a driver that was killed). True when
        that checkpoint is the trial's last: it finished, and ``report_finished`` says so again."""
        newest = _newest_checkpoint(tune.get_checkpoint())
        if newest is None:
            return False
        with newest.as_directory() as d:
            load_checkpoint(method, Path(d) / CHECKPOINT_FILE)
            self.history = json.loads((Path(d) / TRIAL_STATE_FILE).read_text())
        self.history["restored_from"].append(method.iteration)
        return bool(self.history.get("finished"))

    def report_finished(self) -> None:
        """A restarted trial's last result, reported again: a trial that had finished runs nothing more (its
        checkpoints and synthetic set are already in the trial directory); one that had not goes on after it."""
        tune.report(dict(self.history["last"]))

    def on_start(self, run: Run) -> None:
        """Two lines per run segment in the trial directory: where it started, and (unless the process was
        killed) how many steps it ran and how it ended."""
        self._segment({"from": run.resumed_from, "status": "started"})

    def on_end(self, run: Run, status: str) -> None:
        self._segment({"from": run.resumed_from, "steps": run.steps, "status": status})

    def _segment(self, line: dict) -> None:
        path = self.workdir / SEGMENTS_FILE
        if not path.exists():  # a restarted trial (new worker, new working directory): carry the earlier lines
            _copy_from_trial_dir(SEGMENTS_FILE, path)
        with open(path, "a") as f:
            f.write(json.dumps({**line, "pid": os.getpid(), "time": round(time.time(), 3)}) + "\n")

    def on_step(self, run: Run, metrics: dict[str, float]) -> None:
        self.steps_at += 1
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.sums[key] = self.sums.get(key, 0.0) + float(value)
                self.counts[key] = self.counts.get(key, 0) + 1
                self.last[key] = float(value)

    def on_eval(self, run: Run, record: EvalRecord) -> None:
        it, result, syn = record.iteration, record.result, record.synthetic
        report: dict[str, Any] = {
            TIME_ATTR: it, METRIC: result.mean, f"{METRIC}_std": result.std, "eval_models": len(result.accuracies),
            "eval_time_s": record.seconds,
            "loss": self.sums.get("loss", float("nan")) / max(1, self.counts.get("loss", 0)),
            "seconds_per_iteration": (run.step_seconds - self.seconds_at) / max(1, self.steps_at),
            "restored_from": self.history["restored_from"][-1] if self.history["restored_from"] else 0,
        }
        report.update({f"train/{k}": self.sums[k] / self.counts[k] for k in self.sums if k != "loss"})
        if syn.syn_lr is not None:
            report["syn_lr"] = float(syn.syn_lr)
        elif "syn_lr" in self.last:
            report["syn_lr"] = self.last["syn_lr"]
        if record.final is not None:
            report.update({"final_acc": record.final.mean, "final_acc_std": record.final.std,
                           "final_models": len(record.final.accuracies)})
            self.history["final"] = [record.final.mean, record.final.std, len(record.final.accuracies)]
        if record.robustness is not None:  # DD-Ranking's scores: hlr, ior, lrs, ars and their _std
            report.update(record.robustness.summary())
        self.history["evals"].append([it, result.mean, result.std])
        self.history["last"] = {k: v for k, v in report.items() if isinstance(v, (int, float))}
        self.history["finished"] = it >= run.iterations
        syn.save(self.workdir / SYNTHETIC_FILE)
        report["node_id"] = ray.get_runtime_context().get_node_id()
        with tempfile.TemporaryDirectory(prefix="raydd-ckpt-") as d:
            save_checkpoint(run.method, Path(d) / CHECKPOINT_FILE)
            syn.save(Path(d) / SYNTHETIC_FILE)
            (Path(d) / TRIAL_STATE_FILE).write_text(json.dumps(self.history))
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(d))
        self._reset(run.step_seconds)


def _copy_from_trial_dir(name: str, dest: Path) -> None:
    """Copy ``name`` from the trial's directory in the sweep's storage to ``dest``, if it is there."""
    import pyarrow.fs as pafs

    try:
        storage = tune.get_context().get_storage()
        fs, source = storage.storage_filesystem, f"{storage.trial_fs_path}/{name}"
        if fs.get_file_info(source).type == pafs.FileType.File:
            with fs.open_input_stream(source) as f:
                dest.write_bytes(f.read())
    except Exception:  # noqa: BLE001 - outside a Tune session: nothing to carry
        pass


def _checkpoint_iteration(checkpoint) -> int:
    try:
        with checkpoint.as_directory() as d:
            return int(json.loads((Path(d) / TRIAL_STATE_FILE).read_text())["last"][TIME_ATTR])
    except (OSError, KeyError, ValueError, TypeError):
        return -1


def _newest_checkpoint(registered):
    """The newest of Tune's checkpoint and the ``checkpoint_*`` directories in the trial's storage dir."""
    import pyarrow.fs as pafs

    candidates = [registered] if registered is not None else []
    try:
        storage = tune.get_context().get_storage()
        fs, trial_dir = storage.storage_filesystem, storage.trial_fs_path
        for entry in fs.get_file_info(pafs.FileSelector(trial_dir, allow_not_found=True)):
            if entry.type == pafs.FileType.Directory and entry.base_name.startswith("checkpoint_"):
                candidates.append(tune.Checkpoint(entry.path, filesystem=fs))
    except Exception:  # noqa: BLE001 - outside a Tune session, or a store without listings: Tune's choice
        pass
    scored = [(_checkpoint_iteration(c), i, c) for i, c in enumerate(candidates)]
    scored = [x for x in scored if x[0] >= 0]
    return max(scored, key=lambda x: (x[0], -x[1]))[2] if scored else None


# --------------------------------------------------------------------------- the trainable
def _trial_device(requested: str) -> str:
    """'auto' means the GPU Ray assigned to this trial, else CPU (never a GPU the trial did not ask for)."""
    if requested != "auto":
        return requested
    import torch

    return "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"


def _on_device(config, device: str):
    """An evaluation config whose device 'auto' becomes the trial's device."""
    if config is None or getattr(config, "device", None) != "auto":
        return config
    return dataclasses.replace(config, device=device)


def _trial_threads() -> int:
    try:
        cpus = tune.get_context().get_trial_resources().required_resources.get("CPU", 1)
    except Exception:  # noqa: BLE001 - outside a Tune session
        cpus = 1
    return max(1, int(cpus))


def condensation_trainable(config: dict, *, sinks: Sequence[Sink] = ()) -> None:
    """Tune function trainable: one condensation trial (see the module docstring for what it reports).

    ``sinks`` are added to the trial's loop (e.g. a test's fault injection: wrap this function).
    """
    import torch

    from ..data.datasets import load_train_test
    from ..store import TrajectoryStore

    s = TrialSettings.from_config(config)
    torch.set_num_threads(_trial_threads())
    workdir = Path.cwd()  # Tune's per-trial working directory: synced to the trial dir (sync_artifacts)
    method = None
    try:
        plan = s.plan()
        device = _trial_device(s.device)
        eval_cfg = _on_device(plan.eval_config, device)
        final_cfg = _on_device(s.eval_config(final=True), device)
        train, test = load_train_test(s.dataset, plan.data_root, resolution=s.resolution)
        store = TrajectoryStore(s.store) if s.store else None
        with get_method(s.method)(plan.config, train, store, device=device, seed=s.seed) as method:
            reporter = TuneReport(workdir)
            if reporter.restore(method):
                reporter.report_finished()
                return
            if reporter.history.get("last"):
                # restarted from a checkpoint: its report again before going on. A driver killed between the
                # trial's report and ASHA's decision on it lost that decision; without this the scheduler would
                # judge the trial at its rung on a later report (a duplicate is ignored: already judged there)
                reporter.report_finished()
            condense(method, s.iterations, eval_every=s.eval_points(), eval_config=eval_cfg,
                     final_eval_config=final_cfg, test=test, robustness=robustness_config(s.metrics),
                     sinks=[TensorBoard(workdir / "tensorboard"), reporter, *sinks], progress=False)
    except (ValueError, FloatingPointError) as err:
        # A bad setting or a diverged run fails the same way on every retry: reported once, not retried.
        tune.report({TIME_ATTR: method.iteration if method is not None else 0,
                     "trial_error": f"{type(err).__name__}: {str(err).splitlines()[0]}"})
