"""The planner (raydd.plan): one documented order of defaults, run length, shrinking and knobs; the farm jobs a
config's needs imply; the data-root rule; and ``raydd reproduce --plan`` showing what it decided."""
from __future__ import annotations

import pytest

from raydd.cli import main
from raydd.data.datasets import data_root_for
from raydd.methods import make_config
from raydd.plan import Shrink, plan_config, plan_run


def test_without_a_shrink_the_plan_is_the_python_apis_config():
    plan = plan_run("edc", "cifar10", 10, iterations=120, knobs={"lr": 0.1})
    assert plan.config == make_config("edc", "cifar10", 10, iterations=120, lr=0.1)
    assert (plan.iterations, plan.config.total_iterations, plan.eval_config) == (120, 120, None)
    assert plan_run("edc", "cifar10", 10).iterations == make_config("edc", "cifar10", 10).planned_iterations


def test_an_explicit_knob_wins_over_the_run_length_and_the_shrinking_and_feeds_both():
    # over the run length (PTLM's |T|) and over the shrinking (MTT's N cap, DM's embedder width)
    assert plan_config("ptlm", "cifar10", 10, iterations=50, knobs={"total_iterations": 70})[0].total_iterations == 70
    assert plan_config("mtt", "cifar10", 1, shrink=Shrink(syn_steps=2), knobs={"syn_steps": 7})[0].syn_steps == 7
    assert plan_config("mtt", "cifar10", 1, shrink=Shrink(syn_steps=2))[0].syn_steps == 2
    assert plan_config("dm", "cifar10", 10, shrink=Shrink(width=32), knobs={"width": 64})[0].width == 64
    # ...and the run length reads it: a growing window set by a knob grows over 1000 of 10000 iterations
    config, _ = plan_config("datm", "cifar10", 1, iterations=1000, knobs={"current_max_start_epoch": 2})
    assert config.expansion_end_epoch == 100  # 1000 (the IPC-1 row's) x 1000 / 10000
    assert make_config("datm", "cifar10", 1, iterations=1000).expansion_end_epoch == 1000  # no window: unplanned


def test_farm_jobs_follow_the_needs_capped_by_the_shrink_and_never_below_what_is_read():
    plan = plan_run("mtt", "cifar10", 1, trajectories={"expert": (100, 50)}, data_root="/data")
    (job,) = plan.farm
    # the paper's 100 experts; the expert recipe is prefix-exact: exactly the epochs MTT reads (T+ + M = 2 + 2)
    assert (job.need.recipe, job.count, job.epochs, plan.data_root) == ("expert", 100, 4, "/data")
    shrunk = plan_run("mtt", "cifar10", 1, shrink=Shrink(width=32, syn_steps=20, trajectories=4, epochs=10),
                      trajectories={"expert": (100, 50)})
    assert [(j.count, j.epochs) for j in shrunk.farm] == [(4, 4)] and shrunk.config.syn_steps == 20
    # a recipe's own cap (benchmarks/condense.py's --pretrain-experts): DANCE reads at most that many experts
    dance = plan_run("dance", "cifar10", 10, shrink=Shrink(recipes={"pretrain": (2, None)}))
    assert dance.config.num_experts == 2 and [j.count for j in dance.farm] == [2]
    assert plan_run("dm", "digits", 1).farm == ()


def test_the_data_root_rule_and_the_evaluation_are_planned_before_any_work():
    assert data_root_for("digits", "/somewhere") is None and data_root_for("cifar10", "/d") == "/d"
    plan = plan_run("dm", "digits", 1, data_root="/somewhere", eval_settings={"epochs": 7, "num_models": 2})
    assert plan.data_root is None and (plan.eval_config.epochs, plan.eval_config.num_models) == (7, 2)
    with pytest.raises(ValueError, match=r"unknown standard evaluation setting\(s\) \['epoch'\]"):
        plan_run("dm", "digits", 1, eval_settings={"epoch": 7})
    with pytest.raises(ValueError, match=r"unknown DMConfig knob 'lr'"):
        plan_run("dm", "digits", 1, knobs={"lr": 1.0})


def test_reproduce_plan_shows_an_explicit_knob_winning_over_the_scale(capsys):
    """Through the command line: at the tiny scale N is capped at 2, and --set syn_steps=7 wins over the cap."""
    assert main(["reproduce", "mtt_cifar10_ipc1", "--scale", "tiny", "--plan"]) == 0
    assert "syn_steps=2" in capsys.readouterr().out
    assert main(["reproduce", "mtt_cifar10_ipc1", "--scale", "tiny", "--set", "syn_steps=7", "--plan"]) == 0
    out = capsys.readouterr().out
    assert "syn_steps=7" in out and "syn_steps=2" not in out
