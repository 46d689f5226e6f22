"""ASHA's promotion rule as plain Python (no Ray): which trial moves up a rung, and when.

Li et al., "A System for Massively Parallel Hyperparameter Tuning" (MLSys 2020), Algorithm 2:
rungs r_0 < r_1 < ... (condensation iterations here); a configuration that finishes rung k
waits there; whenever a worker is free, ``get_job`` promotes a waiting configuration that is
among the top ⌊n_k/η⌋ of the n_k results recorded at rung k (highest rung first, each
configuration at most once per rung), and only when nothing is promotable starts a new
configuration at the bottom rung.

Ray Tune's ``ASHAScheduler`` is the *stopping* variant instead: a trial continues when its
result is at or above the (1 − 1/η) percentile of the results recorded so far at that rung.
The first trials to reach a rung always pass (one result is its own percentile), so when
trials run one or two at a time (a laptop, a small cluster) the first few configurations of
a grid run to max_t whatever their quality. Here nobody is promoted before η results exist
at a rung.

A grid is finite, so a group eventually goes idle (no trial running or pending, the search
finished) with trials still waiting. Then each rung promotes up to max(1, ⌊n_k/η⌋) in total,
like synchronous successive halving, so that at least one configuration reaches max_t;
whoever still waits when nothing more is promotable has lost and is stopped.

Tune glue: ``raydd.sweep.scheduler.GroupedASHA`` pauses a waiting trial (its checkpoint holds the full
method state) and resumes it from that checkpoint when it is promoted.
"""
from __future__ import annotations

import math

CONTINUE = "continue"
WAIT = "wait"
MODES = ("max", "min")


class PromotionLadder:
    """The rungs of one (method, IPC) group and who has been measured and promoted at each.

    No rungs (the grace period is the whole budget): nobody is ever judged, every trial continues.
    """

    def __init__(self, rungs: list[int], reduction_factor: int, mode: str = "max") -> None:
        if not isinstance(rungs, (list, tuple)) or any(isinstance(r, bool) or int(r) != r or r < 1 for r in rungs) \
                or list(rungs) != sorted(set(rungs)):
            raise ValueError(f"rungs={rungs!r} are invalid: expected increasing positive iteration counts "
                             f"(empty: no rung, every trial continues)")
        if isinstance(reduction_factor, bool) or int(reduction_factor) != reduction_factor or reduction_factor < 2:
            raise ValueError(f"reduction_factor={reduction_factor!r} is invalid: expected an integer >= 2")
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is invalid: accepted {', '.join(MODES)}")
        self.rungs = [int(r) for r in rungs]
        self.reduction_factor = int(reduction_factor)
        self.mode = mode
        self._scores: list[dict[str, float]] = [{} for _ in self.rungs]  # arrival order = tie-break order
        self._promoted: list[set[str]] = [set() for _ in self.rungs]
        self._level: dict[str, int] = {}  # trial -> highest rung it has a result at

    # ------------------------------------------------------------------ results
    def on_result(self, trial_id: str, iterations: int, score: float | None) -> str:
        """Record a report at ``iterations``; CONTINUE, or WAIT (pause at the rung until promoted)."""
        reached = [k for k, r in enumerate(self.rungs) if r <= iterations]
        if not reached:
            return CONTINUE
        top = reached[-1]
        if trial_id in self._scores[top]:  # judged at this rung already: a later report before the next rung
            return CONTINUE if trial_id in self._promoted[top] else WAIT
        value = self._key(score)
        for k in reached:  # a rung skipped between two evaluations gets this (later) result, like Ray's ASHA
            self._scores[k].setdefault(trial_id, value)
            if k < top:
                self._promoted[k].add(trial_id)  # it is past those rungs already
        self._level[trial_id] = top
        if trial_id in self.promotable(top):
            self._promoted[top].add(trial_id)
            return CONTINUE
        return WAIT

    def _key(self, score: float | None) -> float:
        """Higher is better; a missing or NaN score ranks last."""
        if score is None or not math.isfinite(float(score)):
            return -math.inf
        return float(score) if self.mode == "max" else -float(score)

    # ------------------------------------------------------------------ promotions
    def quota(self, rung: int, *, final: bool = False) -> int:
        """How many may be promoted from ``rung`` in total: ⌊n/η⌋, or at least 1 once the group is idle."""
        n = len(self._scores[rung])
        q = n // self.reduction_factor
        return max(q, 1 if n else 0) if final else q

    def promotable(self, rung: int, *, final: bool = False) -> list[str]:
        """Trials waiting at ``rung`` that rank in its top ``quota``, best first (Algorithm 2: top_k
        of the rung minus those already promoted from it)."""
        scores = self._scores[rung]
        ranked = sorted(scores, key=lambda t: -scores[t])  # stable: earlier arrivals win ties
        return [t for t in ranked[:self.quota(rung, final=final)]
                if t not in self._promoted[rung] and self._level.get(t) == rung]

    def next_promotion(self, waiting: set[str] | frozenset[str], *, final: bool = False) -> str | None:
        """Algorithm 2's get_job among the trials in ``waiting`` (paused): highest rung first. Marks it promoted."""
        for k in reversed(range(len(self.rungs))):
            for trial_id in self.promotable(k, final=final):
                if trial_id in waiting:
                    self._promoted[k].add(trial_id)
                    return trial_id
        return None

    # ------------------------------------------------------------------ persistence
    def state(self) -> dict:
        """Everything recorded so far, as plain JSON data (a sweep saves it with the experiment)."""
        return {"rungs": self.rungs, "scores": [list(s.items()) for s in self._scores],
                "promoted": [sorted(p) for p in self._promoted], "level": dict(self._level)}

    def load_state(self, state: dict) -> None:
        """Restore ``state()`` output; rungs that differ from this ladder's are a ValueError."""
        if list(state.get("rungs", [])) != self.rungs:
            raise ValueError(f"saved ASHA rungs {state.get('rungs')} differ from this ladder's {self.rungs}")
        self._scores = [{t: float(v) for t, v in items} for items in state["scores"]]
        self._promoted = [set(p) for p in state["promoted"]]
        self._level = {t: int(k) for t, k in state["level"].items()}

    # ------------------------------------------------------------------ views
    def level(self, trial_id: str) -> int | None:
        return self._level.get(trial_id)

    def is_waiting(self, trial_id: str) -> bool:
        """Measured at its highest rung and not promoted from it: it may not run on until promoted."""
        top = self._level.get(trial_id)
        return top is not None and trial_id not in self._promoted[top]

    def promoted(self, rung: int) -> set[str]:
        return set(self._promoted[rung])

    def recorded(self, rung: int) -> dict[str, float]:
        return dict(self._scores[rung])
