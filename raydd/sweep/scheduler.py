"""Tune schedulers of a sweep: ASHA run separately within each (method, IPC) group.

``GroupedASHA`` (what sweeps use, via ``grouped_asha``) keeps one rung ladder per (method, IPC):
by default the ASHA paper's promotion rule (``raydd.asha.PromotionLadder``: a trial that reaches a
rung is paused, its checkpoint holding the method state, until it ranks in the top ⌊n/η⌋ there),
or Ray's stopping ``ASHAScheduler`` per group (``variant="stopping"``). Arguments are validated by
``raydd.sweep.rungs.check_asha``, the same check the sweep spec uses.
"""
from __future__ import annotations

import json
from typing import Any

import pyarrow.fs as pafs
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from ..asha import CONTINUE, PromotionLadder
from .leaderboard import write_text
from .rungs import asha_rungs, check_asha, default_grace_period
from .trial import MODE, TIME_ATTR, TrialSettings

# Not *.json: Tune copies the experiment directory's *.json files to the driver at a resume and back at
# every sync, which would put an old copy over the decisions of the resumed run.
DECISIONS_FILE = "asha_decisions.jsonl"


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

    Every decision is saved with the experiment (``asha_decisions.jsonl``: each group's rung
    records and promotions, the trials stopped) as it is made, so a resumed sweep continues
    with the same ladders: a stopped trial stays stopped, a trial waiting at a rung waits,
    even when the driver was killed before Tune saved its own state.
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
        self._decisions: tuple[Any, str] | None = None  # (filesystem, path), found from the first trial
        self._saved_groups: dict[str, Any] = {}  # the decisions of the run this one resumes
        self._metric = None
        self._mode = None

    def set_search_properties(self, metric, mode, **spec) -> bool:
        if (self._metric and metric) or (self._mode and mode):
            return False
        self._metric = metric or self._metric
        self._mode = mode or self._mode
        return True

    # ------------------------------------------------------------------ saved decisions
    def _open_decisions(self, trial) -> None:
        """Locate the experiment's decision file from the trial's storage and load what an earlier run saved."""
        if self._decisions is not None:
            return
        storage = getattr(trial, "storage", None)
        if storage is None:  # a trial outside an experiment (unit tests of the scheduler): nothing to persist
            self._decisions = (None, "")
            return
        fs, path = storage.storage_filesystem, f"{storage.experiment_fs_path}/{DECISIONS_FILE}"
        self._decisions = (fs, path)
        if fs.get_file_info(path).type == pafs.FileType.File:
            with fs.open_input_stream(path) as f:
                saved = json.loads(f.read().decode())
            if saved.get("variant") != self.variant:
                raise ValueError(f"{path} holds decisions of ASHA variant {saved.get('variant')!r}, "
                                 f"not {self.variant!r}")
            self._saved_groups = saved.get("groups", {})
            self._stopped |= set(saved.get("stopped", []))

    def _save_decisions(self) -> None:
        fs, path = self._decisions or (None, "")
        if fs is None:
            return
        groups = {_group_name(key): _child_state(child, self.variant) for key, child in self._groups.items()}
        write_text(fs, path, json.dumps({"variant": self.variant, "groups": groups,
                                          "stopped": sorted(self._stopped)}, sort_keys=True))

    # ------------------------------------------------------------------ groups
    def _scheduler_for(self, trial):
        self._open_decisions(trial)
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
                saved = self._saved_groups.get(_group_name(key))
                if saved is not None:
                    _load_child_state(child, self.variant, saved)
                self._groups[key] = child
        return self._groups[key]

    def _stop_revived(self, tune_controller, trials) -> None:
        """Trials this sweep stopped that a resume brought back (Tune's state lagged behind the decision)."""
        for t in trials:
            if t.trial_id in self._stopped and t.status in (Trial.PENDING, Trial.PAUSED):
                tune_controller.stop_trial(t)

    # ------------------------------------------------------------------ Tune's hooks
    def on_trial_add(self, tune_controller, trial) -> None:
        child = self._scheduler_for(trial)
        if self.variant == "stopping":
            child.on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result) -> str:
        child = self._scheduler_for(trial)
        if self.variant == "stopping":
            decision = child.on_trial_result(tune_controller, trial, result)
            if decision == TrialScheduler.STOP:
                self._stopped.add(trial.trial_id)
            self._save_decisions()
            return decision
        if TIME_ATTR not in result or self._metric not in result:
            return TrialScheduler.CONTINUE
        decision = child.on_result(trial.trial_id, int(result[TIME_ATTR]), result[self._metric])
        self._save_decisions()
        return TrialScheduler.CONTINUE if decision == CONTINUE else TrialScheduler.PAUSE

    def on_trial_complete(self, tune_controller, trial, result) -> None:
        if self.variant == "stopping":
            self._scheduler_for(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        if self.variant == "stopping":
            self._scheduler_for(trial).on_trial_remove(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller):
        # In creation order, not Tune's list order (which a restore or a retried trial reshuffles): with one
        # trial at a time, which configuration reaches a rung first decides ASHA's promotions, so a resumed
        # sweep must start them in the order the uninterrupted one did.
        trials = sorted(tune_controller.get_trials(), key=creation_order)
        for t in trials:
            self._scheduler_for(t)
        self._stop_revived(tune_controller, trials)
        if self.variant == "stopping":
            return super().choose_trial_to_run(tune_controller)
        ladder = {t.trial_id: self._groups[self._trial_group[t.trial_id]] for t in trials}

        def waiting(t) -> bool:  # at a rung, not promoted: paused, or pending after a resume
            return t.status in (Trial.PAUSED, Trial.PENDING) and ladder[t.trial_id].is_waiting(t.trial_id)

        for t in trials:  # 0. promoted before the driver stopped, not yet resumed
            if t.status == Trial.PAUSED and not waiting(t):
                return t
        by_group: dict[tuple, list] = {}
        for t in trials:
            by_group.setdefault(self._trial_group[t.trial_id], []).append(t)
        paused = {key: {t.trial_id: t for t in members if waiting(t)} for key, members in by_group.items()}
        for key, candidates in paused.items():  # 1. promote a waiting trial (highest rung first)
            chosen = self._groups[key].next_promotion(set(candidates)) if candidates else None
            if chosen is not None:
                self._save_decisions()
                return candidates[chosen]
        for t in trials:  # 2. else a new configuration (or one that was running when the sweep stopped)
            if t.status == Trial.PENDING and not waiting(t):
                return t
        if not tune_controller.search_alg.is_finished():
            return None
        for key, candidates in paused.items():  # 3. an idle group: close its rungs (at least one reaches max_t)
            busy = any(t.status == Trial.RUNNING or (t.status == Trial.PENDING and not waiting(t))
                       for t in by_group[key])
            if not candidates or busy:
                continue
            chosen = self._groups[key].next_promotion(set(candidates), final=True)
            if chosen is None:  # nothing promotable any more: the waiting trials have lost
                self._stopped.update(candidates)
            self._save_decisions()
            if chosen is not None:
                return candidates[chosen]
            for t in candidates.values():
                tune_controller.stop_trial(t)
        return None

    def debug_string(self) -> str:
        if self.variant == "stopping":
            stopped = sum(child._num_stopped for child in self._groups.values())
        else:
            stopped = len(self._stopped)
        return (f"Using ASHA ({self.variant}) per (method, IPC) group: {len(self._groups)} group(s), "
                f"{stopped} trial(s) stopped early")


def creation_order(trial) -> tuple[int, str]:
    """Sort key of trials by the order Tune created them: its trial ids end in a running count
    (``<experiment>_00003``), kept by a restore."""
    _, _, count = trial.trial_id.rpartition("_")
    return (int(count), trial.trial_id) if count.isdigit() else (2**63, trial.trial_id)


def _group_name(key: tuple) -> str:
    return f"{key[0]}|ipc{key[1]}"


def _child_state(child, variant: str) -> Any:
    """A group's ladder as JSON data: the promotion ladder's records, or Ray's ASHA rungs (milestone, records)."""
    if variant == "promotion":
        return child.state()
    return [[milestone, dict(recorded)] for bracket in child._brackets for milestone, recorded in bracket._rungs]


def _load_child_state(child, variant: str, state: Any) -> None:
    if variant == "promotion":
        child.load_state(state)
        return
    saved = {float(milestone): recorded for milestone, recorded in state}
    for bracket in child._brackets:
        for milestone, recorded in bracket._rungs:
            recorded.update(saved.get(float(milestone), {}))


def grouped_asha(grace_period: int | None = None, reduction_factor: int = 3, max_t: int | None = None,
                 variant: str = "promotion") -> GroupedASHA:
    """ASHA run separately within each (method, IPC) group (see GroupedASHA); what sweeps use."""
    return GroupedASHA(grace_period, reduction_factor, max_t, variant)
