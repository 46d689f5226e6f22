"""Tune schedulers of a sweep: ASHA run separately within each (method, IPC) group.

``GroupedASHA`` (what sweeps use, via ``grouped_asha``) keeps one rung ladder per (method, IPC):
by default the ASHA paper's promotion rule (``raydd.asha.PromotionLadder``: a trial that reaches a
rung is paused, its checkpoint holding the method state, until it ranks in the top ⌊n/η⌋ there),
or Ray's stopping ``ASHAScheduler`` per group (``variant="stopping"``). Arguments are validated by
``raydd.sweep.rungs.check_asha``, the same check the sweep spec uses.
"""
from __future__ import annotations

from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from ..asha import CONTINUE, PromotionLadder
from .rungs import asha_rungs, check_asha, default_grace_period
from .trial import MODE, TIME_ATTR, TrialSettings


def asha(max_t: int, grace_period: int | None = None, reduction_factor: int = 3) -> ASHAScheduler:
    """Ray's ASHA (stopping variant) on the condensation-iteration counter: rungs at grace_period ·
    reduction_factor^k (< max_t). Trials report at evaluations only: make every rung an evaluation point."""
    check_asha(grace_period, reduction_factor, max_t)
    grace = default_grace_period(max_t) if grace_period is None else grace_period
    return ASHAScheduler(time_attr=TIME_ATTR, max_t=max_t, grace_period=grace, reduction_factor=reduction_factor)


def _trial_group(config: dict) -> tuple[str, int, int, int | str]:
    """(method, IPC, the trial's iteration count, its eval_every) of a trial config."""
    s = TrialSettings.from_config(config)
    return s.method, s.ipc, s.iterations, s.eval_every


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

    def __init__(self, grace_period: int | None = None, reduction_factor: int = 3, max_t: int | None = None,
                 variant: str = "promotion"):
        super().__init__()
        check_asha(grace_period, reduction_factor, max_t, variant)
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


def grouped_asha(grace_period: int | None = None, reduction_factor: int = 3, max_t: int | None = None,
                 variant: str = "promotion") -> GroupedASHA:
    """ASHA run separately within each (method, IPC) group (see GroupedASHA); what sweeps use."""
    return GroupedASHA(grace_period, reduction_factor, max_t, variant)
