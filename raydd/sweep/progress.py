"""What a sweep shows while it runs (Tune callbacks on the driver).

``SweepProgress``: raydd's own progress line on stderr instead of Ray Tune's status tables
(those only with ``raydd sweep --verbose``; ``tune_console``): trials done / total per (method, IPC) group, the
best evaluation accuracy so far in each, elapsed time and an ETA from the condensation
iterations still planned (an upper bound: ASHA stops some trials early). A line at most every
``every_s`` seconds, and whenever a trial finishes or errors.

``ScalarTBXLogger``: Tune's TensorBoard logger without its HParams session, so TensorBoard's
HParams view has the one session per trial that the leaderboard writes.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time

from ray.tune import Callback
from ray.tune.experiment import Trial
from ray.tune.logger import TBXLoggerCallback

from ..condense import format_duration
from .leaderboard import first_error_line
from .trial import METRIC, TIME_ATTR, TrialSettings

_FINISHED = (Trial.TERMINATED, Trial.ERROR)


class SweepProgress(Callback):
    """One progress line per update on stderr (see the module docstring); ``show=False``: nothing at all."""

    def __init__(self, show: bool = True, every_s: float = 10.0) -> None:
        self.show = show
        self.every_s = every_s
        self._started = None
        self._last_print = 0.0
        self._done_at_start = None  # iterations already done when this run (or resume) started
        self._best: dict[tuple[str, int], float] = {}
        self._plans: dict[str, TrialSettings] = {}

    def _plan(self, trial) -> TrialSettings:
        if trial.trial_id not in self._plans:
            self._plans[trial.trial_id] = TrialSettings.from_config(trial.config)
        return self._plans[trial.trial_id]

    def _iterations(self, trial) -> tuple[int, int]:
        """(iterations done, iterations planned) of a trial: a finished trial's remaining ones are done."""
        planned = self._plan(trial).iterations
        if trial.status in _FINISHED:
            return planned, planned
        return min(planned, int((trial.last_result or {}).get(TIME_ATTR, 0) or 0)), planned

    def line(self, trials) -> str:
        """The progress line for ``trials`` (their status and last results)."""
        now = time.monotonic()
        groups: dict[tuple[str, int], list[int]] = {}
        done_iters = planned_iters = 0
        for t in trials:
            s = self._plan(t)
            counts = groups.setdefault((s.method, s.ipc), [0, 0])
            counts[0] += t.status in _FINISHED
            counts[1] += 1
            score = (t.last_result or {}).get(METRIC)
            if isinstance(score, float) and score == score:
                key = (s.method, s.ipc)
                self._best[key] = max(self._best.get(key, score), score)
            done, planned = self._iterations(t)
            done_iters += done
            planned_iters += planned
        if self._done_at_start is None:
            self._done_at_start = done_iters
        finished = sum(c[0] for c in groups.values())
        parts = []
        for (method, ipc), (done, total) in sorted(groups.items()):
            best = self._best.get((method, ipc))
            parts.append(f"{method} IPC {ipc} {done}/{total}" + (f" best {100 * best:.1f}%" if best is not None else ""))
        elapsed = now - (self._started or now)
        progress = done_iters - self._done_at_start
        if finished == len(trials):
            eta = "done"
        elif progress > 0:
            eta = f"ETA <= {format_duration(elapsed * (planned_iters - done_iters) / progress)}"
        else:
            eta = "ETA after the first evaluation"
        return (f"raydd sweep: {finished}/{len(trials)} trials done | " + " | ".join(parts) +
                f" | {format_duration(elapsed)} elapsed, {eta}")

    def _print(self, trials, *, force: bool = False) -> None:
        now = time.monotonic()
        if self.show and (force or now - self._last_print >= self.every_s):
            self._last_print = now
            print(self.line(trials), file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ Tune's hooks
    def setup(self, **info) -> None:
        self._started = time.monotonic()

    def on_step_end(self, iteration, trials, **info) -> None:
        self._print(trials)  # a heartbeat while no trial reports

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if "trial_error" in result and self.show:
            print(f"raydd sweep: trial {trial.trial_id} ({self._plan(trial).method} IPC {self._plan(trial).ipc}) "
                  f"errored: {result['trial_error']}", file=sys.stderr, flush=True)
        self._print(trials)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._print(trials, force=True)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        s = self._plan(trial)
        if self.show:
            print(f"raydd sweep: trial {trial.trial_id} ({s.method} IPC {s.ipc}) errored: "
                  f"{first_error_line(_trial_error(trial)) or 'error'}",
                  file=sys.stderr, flush=True)
        self._print(trials, force=True)


def _trial_error(trial):
    try:
        return trial.get_error()
    except Exception:  # noqa: BLE001 - the error file may not be readable (yet): the line says "error"
        return None


@contextlib.contextmanager
def tune_console(verbose: bool):
    """Ray Tune's own console output during ``Tuner.fit``: its status tables with ``verbose``, else none
    (Tune's classic output engine, chosen by RAY_AIR_NEW_OUTPUT=0 for the duration, prints nothing at
    verbosity 0; the new engine would still print its banner and a TensorBoard hint of its own)."""
    if verbose:
        yield
        return
    before = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = before


class ScalarTBXLogger(TBXLoggerCallback):
    """Tune's per-trial TensorBoard scalars, without the HParams session it adds at the end of each trial
    (the leaderboard's ``tensorboard_hparams`` holds one session per trial, with the raydd knob names)."""

    def _try_log_hparams(self, trial, result) -> None:
        return None
