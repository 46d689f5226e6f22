"""ASHA's promotion rule (raydd.asha, Li et al. 2020 Algorithm 2) without Ray."""
from __future__ import annotations

import math

import pytest

from raydd.asha import CONTINUE, WAIT, PromotionLadder


def test_nobody_is_promoted_before_eta_results_exist():
    ladder = PromotionLadder([10, 40], reduction_factor=3)
    assert ladder.on_result("a", 10, 0.9) == WAIT  # Ray's percentile rule would continue the first arrival
    assert ladder.on_result("b", 10, 0.5) == WAIT
    assert ladder.next_promotion({"a", "b"}) is None
    assert ladder.on_result("c", 10, 0.7) == WAIT  # n = 3: top 1 is a, who is waiting
    assert ladder.next_promotion({"a", "b", "c"}) == "a"
    assert ladder.next_promotion({"b", "c"}) is None  # a is promoted once; b and c are not in the top 1
    assert ladder.promoted(0) == {"a"}


def test_a_trial_in_the_top_continues_and_reports_between_rungs_are_ignored():
    ladder = PromotionLadder([10, 40], reduction_factor=2)
    assert ladder.on_result("a", 5, 0.1) == CONTINUE  # below the first rung
    assert ladder.on_result("a", 10, 0.3) == WAIT
    assert ladder.on_result("b", 10, 0.6) == CONTINUE  # n = 2: top 1 is b itself
    assert ladder.on_result("b", 20, 0.6) == CONTINUE  # between rungs
    assert ladder.level("b") == 0 and ladder.level("a") == 0
    assert ladder.on_result("b", 40, 0.8) == WAIT  # alone at rung 1
    assert ladder.on_result("a", 10, 0.3) == WAIT  # the same rung again: still waiting


def test_highest_rung_first_and_final_quota_of_an_idle_group():
    ladder = PromotionLadder([1, 3], reduction_factor=2)
    decisions = [ladder.on_result(t, 1, s) for t, s in (("a", 0.2), ("b", 0.9), ("c", 0.4), ("d", 0.8))]
    assert decisions == [WAIT, CONTINUE, WAIT, CONTINUE]  # n = 2: top 1 = b; n = 4: top 2 = b, d
    assert ladder.on_result("b", 3, 0.95) == WAIT  # alone at rung 1: ⌊1/2⌋ = 0
    assert ladder.on_result("d", 3, 0.85) == WAIT  # n = 2 at rung 1: top 1 = b, who waits
    ladder.on_result("c", 1, 0.4)  # a repeated report changes nothing
    assert ladder.next_promotion({"a", "b", "c", "d"}) == "b"  # rung 1 before rung 0
    assert ladder.next_promotion({"a", "c", "d"}) is None
    # idle group: at least one per rung — already met at both rungs, so a, c, d have lost
    assert ladder.next_promotion({"a", "c", "d"}, final=True) is None


def test_idle_group_promotes_at_least_one_per_rung():
    ladder = PromotionLadder([2, 4], reduction_factor=2)
    assert ladder.on_result("real", 2, 0.9) == WAIT
    assert ladder.on_result("noise", 2, 0.2) == WAIT
    assert ladder.next_promotion({"real", "noise"}) == "real"
    assert ladder.on_result("real", 4, 0.93) == WAIT
    assert ladder.next_promotion({"real", "noise"}) is None  # ⌊1/2⌋ = 0 at rung 1 while others could come
    assert ladder.quota(1) == 0 and ladder.quota(1, final=True) == 1
    assert ladder.next_promotion({"real", "noise"}, final=True) == "real"
    assert ladder.next_promotion({"noise"}, final=True) is None  # rung 0's quota (1) is used by real


def test_skipped_rungs_min_mode_and_nan_scores():
    ladder = PromotionLadder([2, 4, 8], reduction_factor=2, mode="min")
    assert ladder.on_result("a", 5, 1.0) == WAIT  # first report past two rungs: recorded at both, waits at rung 1
    assert ladder.level("a") == 1 and set(ladder.recorded(0)) == {"a"} and ladder.promoted(0) == {"a"}
    assert ladder.on_result("b", 4, 0.5) == CONTINUE  # lower is better: b beats a at rung 1
    nan = PromotionLadder([1], reduction_factor=2)
    assert nan.on_result("x", 1, math.nan) == WAIT
    assert nan.on_result("y", 1, 0.1) == CONTINUE  # NaN ranks last
    assert nan.on_result("z", 1, None) == WAIT


@pytest.mark.parametrize("kwargs, message", [
    ({"rungs": [0, 2], "reduction_factor": 2}, "rungs=[0, 2] are invalid"),
    ({"rungs": [4, 2], "reduction_factor": 2}, "rungs=[4, 2] are invalid"),
    ({"rungs": [2], "reduction_factor": 1}, "reduction_factor=1 is invalid"),
    ({"rungs": [2], "reduction_factor": 2, "mode": "best"}, "mode='best' is invalid"),
])
def test_bad_ladders_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        PromotionLadder(**kwargs)


def test_a_ladder_without_rungs_lets_every_trial_continue():
    """A group whose grace period is its whole budget has no rung: nobody waits at max_t (a trial
    paused at its last report would be resumed only to report again)."""
    ladder = PromotionLadder([], reduction_factor=3)
    assert [ladder.on_result(t, 10, s) for t, s in (("a", 0.1), ("b", 0.9), ("c", 0.5))] == [CONTINUE] * 3
    assert ladder.next_promotion({"a", "b", "c"}) is None and ladder.next_promotion({"a"}, final=True) is None


def test_grouped_asha_does_not_pause_a_group_whose_grace_period_is_its_budget():
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from raydd.sweep.scheduler import grouped_asha

    def trial(name, iterations, eval_every):
        return SimpleNamespace(trial_id=name, config={"method": "dm", "dataset": "digits", "ipc": 2,
                                                      "iterations": iterations, "eval_every": eval_every})

    whole = grouped_asha(variant="promotion")  # grace = the first evaluation = the whole budget: no rung
    whole.set_search_properties("eval_acc", "max")
    decisions = [whole.on_trial_result(None, trial(name, 6, 6), {"iterations": 6, "eval_acc": acc})
                 for name, acc in (("a", 0.2), ("b", 0.9))]
    assert decisions == [TrialScheduler.CONTINUE] * 2
    laddered = grouped_asha(variant="promotion")  # rungs at 2 (< 6): the first arrival waits for η results
    laddered.set_search_properties("eval_acc", "max")
    assert laddered.on_trial_result(None, trial("a", 6, 2), {"iterations": 2, "eval_acc": 0.2}) == TrialScheduler.PAUSE


def test_grouped_asha_starts_trials_in_creation_order_whatever_order_tune_lists_them():
    """A restore re-adds Tune's trials most recent result first; with one trial at a time the order trials reach
    a rung decides the promotions, so the scheduler starts them in creation order (the trial id's count)."""
    from types import SimpleNamespace

    from ray.tune.experiment import Trial

    from raydd.sweep.scheduler import grouped_asha

    config = {"method": "dm", "dataset": "digits", "ipc": 1, "iterations": 9, "eval_every": 1}
    trials = [SimpleNamespace(trial_id=f"ab12_{i:05d}", config=config, status=Trial.PENDING) for i in (2, 10, 0, 1)]
    controller = SimpleNamespace(get_trials=lambda: trials, search_alg=SimpleNamespace(is_finished=lambda: True))
    scheduler = grouped_asha(grace_period=1, variant="promotion")
    scheduler.set_search_properties("eval_acc", "max")
    started = []
    for _ in range(4):
        chosen = scheduler.choose_trial_to_run(controller)
        chosen.status = Trial.RUNNING
        started.append(chosen.trial_id)
        chosen.status = Trial.TERMINATED
    assert started == ["ab12_00000", "ab12_00001", "ab12_00002", "ab12_00010"]


@pytest.mark.parametrize("kwargs, named", [
    ({"grace_period": 0}, "grace_period=0"),
    ({"max_t": 0}, "max_t=0"),
    ({"max_t": 2.5}, "max_t=2.5"),
    ({"reduction_factor": 1}, "reduction_factor=1"),
    ({"reduction_factor": "4"}, "reduction_factor='4'"),
    ({"variant": "median"}, "variant='median'"),
])
def test_both_asha_entry_points_refuse_the_same_bad_arguments_in_one_line(kwargs, named):
    from raydd.sweep.rungs import check_asha
    from raydd.sweep.scheduler import grouped_asha

    args = {"grace_period": None, "reduction_factor": 3, "max_t": None, "variant": "promotion", **kwargs}
    for call in (lambda: grouped_asha(**kwargs), lambda: check_asha(**args)):
        with pytest.raises(ValueError) as err:
            call()
        assert named in str(err.value) and "\n" not in str(err.value)
