"""DD-Ranking's robustness scores (raydd/evaluation/robustness.py): hand-computed values, the scale bug,
seeded runs that repeat exactly, and how every score is assembled from the networks' accuracies."""
from __future__ import annotations

import math

import pytest
import torch

from raydd.evaluation import EvalConfig, train_and_test
from raydd.evaluation.robustness import (
    RobustnessConfig,
    augmentation_robust_score,
    label_robust_score,
    networks_per_call,
    random_subset,
    robustness_metrics,
)
from raydd.methods import SyntheticSet

pytestmark = pytest.mark.usefixtures("single_thread")

EVAL = EvalConfig(model={"arch": "convnet", "width": 8, "depth": 2}, epochs=4, batch_size=64, device="cpu")


def a_set(train, ipc=2, syn_lr=None, soft=False) -> SyntheticSet:
    subset = train.per_class(ipc, seed=3)
    labels = torch.nn.functional.one_hot(subset.labels, 10).float() * 0.9 + 0.01 if soft else subset.labels
    return SyntheticSet(subset.images.clone(), labels, {**train.info.to_dict(), "zca": False}, "random",
                        syn_lr=syn_lr)


def test_scores_by_hand_and_the_percent_scale_bug():
    # a = 0.5 * 0.10 - 0.5 * 0.20 = -0.05;  LRS = (e^-0.05 - e^-1) / (e - e^-1)
    expected = (0.951229424500714 - 0.36787944117144233) / (2.718281828459045 - 0.36787944117144233)
    assert label_robust_score(0.10, 0.20) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.24819, abs=1e-5)
    # DD-Ranking v0.2.0 feeds percentages: a = -5, "LRS" = -0.1537, outside [0, 1] and a different number
    percent = (math.exp(-5) - math.exp(-1)) / (math.e - math.exp(-1))
    assert percent == pytest.approx(-0.15365, abs=1e-5) and abs(percent - expected) > 0.4
    with pytest.raises(ValueError, match=r"ior=10.0 is not an accuracy difference in \[-1, 1\]: pass accuracies "
                                         r"as fractions"):
        label_robust_score(10.0, 20.0)
    # b = 0.5 * 0.30 + 0.5 * 0.10 = 0.2;  ARS = (e^0.2 - e^-1) / (e - e^-1)
    assert augmentation_robust_score(0.30, 0.10) == pytest.approx((1.2214027581601699 - 0.36787944117144233)
                                                                  / (2.718281828459045 - 0.36787944117144233))
    assert label_robust_score(1.0, 0.0, lam=1.0) == pytest.approx(1.0)  # the bounds
    assert label_robust_score(0.0, 1.0, lam=0.0) == pytest.approx(0.0)
    assert augmentation_robust_score(0.0, 0.0, gamma=0.3) == pytest.approx(label_robust_score(0.0, 0.0))


@pytest.mark.parametrize("kwargs, message", [
    ({"metrics": ["hlr", "fid"]}, r"metrics \['hlr', 'fid'\] are invalid: accepted one or more of hlr, ior, lrs, ars"),
    ({"metrics": []}, "are invalid"),
    ({"runs": 0}, "RobustnessConfig.runs=0 is invalid"),
    ({"lrs_lambda": 1.5}, "RobustnessConfig.lrs_lambda=1.5 is out of range"),
    ({"full_acc": 85.0}, "RobustnessConfig.full_acc=85.0 is out of range"),
    ({"lr_grid": []}, r"RobustnessConfig.lr_grid=\[\] is invalid"),
])
def test_bad_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        RobustnessConfig(**kwargs)
    assert "\n" not in str(err.value)


def test_random_subsets_are_class_balanced_and_seeded(digits):
    train, _ = digits
    x, y = random_subset(train, [2] * 10, seed=5)
    assert torch.bincount(y, minlength=10).tolist() == [2] * 10
    again, _ = random_subset(train, [2] * 10, seed=5)
    other, _ = random_subset(train, [2] * 10, seed=6)
    assert torch.equal(x, again) and not torch.equal(x, other)
    with pytest.raises(ValueError, match="needs 9999 images of class 0"):
        random_subset(train, [9999] + [1] * 9, seed=0)


def test_every_score_is_assembled_from_seeded_networks(digits):
    """Each run's accuracies are those of networks trained here independently with the run's seed; HLR,
    IOR, LRS and ARS follow from them by the formulas; the lr grid keeps the best lr; two calls agree."""
    train, test = digits
    syn = a_set(train, syn_lr=0.02)
    config = RobustnessConfig(runs=2, lr_grid=(0.005, 0.05), full_acc=0.9, seed=7)
    result = robustness_metrics(syn, train, test, config, EVAL)
    assert [r["seed"] for r in result.runs] == [7, 8]
    run = result.runs[1]

    def acc(x, y, lr, dsa):
        cfg = EvalConfig(**{**EVAL.to_dict(), "num_models": 1, "seed": 8, "dsa": dsa, "lr": lr})
        return train_and_test(x, y, test, train.info, cfg, lr=lr).accuracies[0]

    assert run["set"] == acc(syn.images, syn.labels, 0.02, True) and run["set_lr"] == 0.02  # its learned lr
    rx, ry = random_subset(train, [2] * 10, 8)
    grid = {lr: acc(rx, ry, lr, True) for lr in (0.005, 0.05)}
    assert run["random"] == max(grid.values()) and grid[run["random_lr"]] == run["random"]
    assert run["set_no_aug"] == acc(syn.images, syn.labels, 0.02, False)
    assert run["random_no_aug"] == max(acc(rx, ry, lr, False) for lr in (0.005, 0.05))
    assert run["hlr"] == pytest.approx(0.9 - run["set"]) and run["ior"] == pytest.approx(run["set"] - run["random"])
    assert run["lrs"] == pytest.approx(label_robust_score(run["ior"], run["hlr"]))
    assert run["ars"] == pytest.approx(augmentation_robust_score(run["ior"], run["set_no_aug"] - run["random_no_aug"]))
    assert result.mean("lrs") == pytest.approx((result.runs[0]["lrs"] + run["lrs"]) / 2) and 0 <= run["lrs"] <= 1
    assert robustness_metrics(syn, train, test, config, EVAL).runs == result.runs  # fixed seeds: the same numbers
    assert "| LRS |" in str(result) and set(result.summary()) == {"hlr", "hlr_std", "ior", "ior_std", "lrs",
                                                                  "lrs_std", "ars", "ars_std"}


def test_full_data_lr_search_and_soft_sets(digits):
    train, test = digits
    small_train = train.per_class(20, seed=0)
    syn = a_set(train)  # no learned lr: the set's lr is searched too
    counted: list[str] = []
    config = RobustnessConfig(metrics=["hlr", "lrs"], runs=1, lr_grid=(0.01, 0.1))
    result = robustness_metrics(syn, small_train, test, config, EVAL, on_network=counted.append)
    full_cfg = EvalConfig(**{**EVAL.to_dict(), "num_models": 1, "seed": 0, "lr": 0.01})
    assert result.full_acc == train_and_test(small_train.images, small_train.labels, test, train.info, full_cfg,
                                             lr=0.01).accuracies[0]
    assert result.runs[0]["set_lr"] in (0.01, 0.1) and result.metrics == ("hlr", "lrs")
    assert len(counted) == networks_per_call(syn, config, EVAL) == 1 + 2 + 2  # full, set grid, random grid
    soft = a_set(train, soft=True)
    with pytest.raises(ValueError, match="ior, lrs and ars of a soft-label set .* ask for hlr only"):
        robustness_metrics(soft, train, test, config, EVAL)
    hlr_only = robustness_metrics(soft, small_train, test, RobustnessConfig(metrics=["hlr"], runs=1, full_acc=0.5,
                                                                            lr_grid=(0.05,)), EVAL)
    assert hlr_only.runs[0]["hlr"] == pytest.approx(0.5 - hlr_only.runs[0]["set_hard"])


def test_condense_scores_its_last_set_on_the_standard_protocol_only(digits):
    from raydd.condense import condense
    from raydd.evaluation import EDCEvalConfig
    from raydd.methods import get_method, make_config

    train, test = digits
    with get_method("dm")(make_config("dm", "digits", 1, width=8, batch_real=16), train, None, device="cpu",
                          seed=0) as method:
        with pytest.raises(ValueError, match="robustness scores run on the standard protocol: the evaluation "
                                             "config is EDCEvalConfig"):
            condense(method, 2, eval_config=EDCEvalConfig(epochs=1), test=test, progress=False,
                     robustness=RobustnessConfig(runs=1))
        assert method.iteration == 0  # refused before any work
        one_net = EvalConfig(**{**EVAL.to_dict(), "num_models": 1, "lr": 0.05})
        result = condense(method, 2, eval_config=one_net, test=test, progress=False,
                          robustness=RobustnessConfig(metrics=["ior"], runs=1))
    scores = result.robustness
    assert scores.metrics == ("ior",) and [r["seed"] for r in scores.runs] == [0]
    # run 0's set network is the evaluation's network (seed 0, lr 0.05, same protocol): the same accuracy
    assert scores.runs[0]["set"] == result.last_eval[1].accuracies[0] and scores.runs[0]["set_lr"] == 0.05
