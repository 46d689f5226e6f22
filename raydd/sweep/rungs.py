"""ASHA's rung arithmetic and the one validation of its arguments (no Ray).

A trial is judged only where it reports, i.e. at its evaluations, so the rungs grace·rf^k must be
evaluation points: the grace period is the first evaluation (or a ninth of the budget) and the
reduction factor an integer. Both the sweep spec and the Tune schedulers validate their arguments
with ``check_asha``.
"""
from __future__ import annotations

from typing import Any

from ..validation import check_choice, check_int

ASHA_VARIANTS = ("promotion", "stopping")  # the ASHA paper's promotion rule (raydd.asha), Ray's ASHAScheduler
RUNGS = "rungs"  # eval_every value: evaluate exactly where ASHA decides


def check_asha(grace_period: Any = None, reduction_factor: Any = 3, max_t: Any = None,
               variant: Any = ASHA_VARIANTS[0], *, where: str = "") -> None:
    """One-line ValueError for a bad ASHA argument (``where``: a prefix such as "scheduler.")."""
    check_int(f"{where}grace_period", grace_period, none_ok=True)
    check_int(f"{where}max_t", max_t, none_ok=True)
    if isinstance(reduction_factor, bool) or not isinstance(reduction_factor, int) or reduction_factor < 2:
        raise ValueError(f"{where}reduction_factor={reduction_factor!r} is invalid: expected an integer >= 2 "
                         f"(rungs at grace_period * reduction_factor^k must be evaluation points)")
    check_choice(f"{where}variant", variant, ASHA_VARIANTS)
    if grace_period is not None and max_t is not None and grace_period > max_t:
        raise ValueError(f"{where}grace_period={grace_period} is invalid: expected <= max_t ({max_t} iterations)")


def default_grace_period(max_t: int, eval_every: int | str = 0) -> int:
    """ASHA's first rung: the first evaluation (``eval_every``), else a ninth of the budget."""
    if eval_every and eval_every != RUNGS:
        return min(eval_every, max_t)
    return max(1, max_t // 9)


def asha_rungs(iterations: int, grace_period: int | None = None, reduction_factor: int = 3,
               max_t: int | None = None) -> list[int]:
    """The iterations at which a trial of ``iterations`` iterations is judged, plus its end.

    Same rule as the schedulers: max_t = ``max_t`` or the trial's count, grace =
    ``grace_period`` or ``default_grace_period(max_t)``, rungs at grace·rf^k below max_t.
    """
    top = max_t or iterations
    grace = min(grace_period or default_grace_period(top), top)
    points, r = [], grace
    while r < top:
        points.append(r)
        r *= reduction_factor
    return sorted({p for p in points if p < iterations} | {iterations})
