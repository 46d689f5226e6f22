"""PTLM on real (tiny) data: 2 pre-trained experts farmed on scikit-learn digits, plus its formulas."""
from __future__ import annotations


import pytest
import torch
from torch.nn import functional as F

import raydd.methods.ptlm  # noqa: F401  (registers "ptlm")
from raydd.methods import make_config
from raydd.methods.ptlm import PTLM, PTLMConfig, capacity_mask, injection_ratio, pseudo_label
from raydd.store import TrajectoryStore

# Experts: the pretrain_experts fixture of conftest.py, shared with tests/test_dance.py.
pytestmark = pytest.mark.usefixtures("single_thread")


def config(ipc: int = 2, **overrides) -> PTLMConfig:
    return make_config("ptlm", "digits", ipc, **{"num_experts": 2, **overrides})


# --------------------------------------------------------------------------- formulas
def test_injection_schedule():
    # Eq. 5: r = (t/λ)/|T|, the weight of θ*
    assert injection_ratio(1, 100, 1.0) == pytest.approx(0.01)
    assert injection_ratio(50, 100, 1.0) == pytest.approx(0.5)
    assert injection_ratio(100, 100, 1.0) == pytest.approx(1.0)
    assert injection_ratio(100, 100, 10.0) == pytest.approx(0.1)  # App. E: λ=10 injects only 10%
    assert injection_ratio(60, 100, 2.0) == pytest.approx(0.3)
    assert injection_ratio(250, 100, 1.0) == 1.0  # clamped past |T|
    assert injection_ratio(80, 100, 0.5) == 1.0  # and for λ < 1
    assert injection_ratio(0, 100, 1.0) == 0.0


def test_extractor_follows_eq5(digits, pretrain_experts):
    train, _ = digits
    cfg = config(lam=2, total_iterations=100)  # shared symbol λ -> inject_scale
    assert cfg.inject_scale == 2.0
    method = PTLM(cfg, train, pretrain_experts, device="cpu", seed=0)
    e = method.experts[1]
    assert torch.allclose(method.extractor(e, 60), 0.3 * e.final + 0.7 * e.initial)
    assert torch.equal(method.extractor(e, 400), e.final)
    assert method.step()["inject_ratio"] == pytest.approx(1 / 200)  # iteration t counts from 1


def test_pseudo_labels_drop_misclassified_and_sharpen():
    probs = torch.tensor([[0.1, 0.8, 0.1],
                          [0.7, 0.2, 0.1],  # predicted 0: dropped for class 1
                          [0.2, 0.6, 0.2]])
    y_avg = torch.tensor([0.15, 0.7, 0.15])  # mean of rows 0 and 2 (Eq. 7)
    got = pseudo_label(probs, 1, 0.1)
    assert torch.allclose(got, F.softmax(y_avg / 0.1, dim=0))  # Eq. 8
    assert got.sum().item() == pytest.approx(1.0) and got.argmax().item() == 1
    assert pseudo_label(probs, 1, 0.01)[1] > got[1] > pseudo_label(probs, 1, 1.0)[1]  # smaller τ: sharper
    assert torch.allclose(pseudo_label(probs, 0, 0.1), F.softmax(probs[1] / 0.1, dim=0))
    assert pseudo_label(probs, 2, 0.1) is None  # no correctly classified sample of class 2


def test_capacity_selection_rule():
    sim = torch.tensor([0.1, 0.2, 0.3, 0.4, 1.0])  # s_min 0.1, s_max 1.0, s_mean 0.4
    keep = lambda p, typical: capacity_mask(sim, p, typical=typical).tolist()  # noqa: E731
    # IPC < α: typical samples; the least similar are dropped as t/|T| grows (strict >, Eq. 4)
    assert keep(0.0, True) == [False, True, True, True, True]
    assert keep(0.5, True) == [False, False, True, True, True]  # > 0.25
    assert keep(1.0, True) == [False, False, False, False, True]  # > s_mean
    # IPC >= α: diverse samples; the most similar are dropped as t/|T| grows
    assert keep(0.0, False) == [True] * 5
    assert keep(0.5, False) == [True, True, True, True, False]  # <= 0.7
    assert keep(1.0, False) == [True, True, True, True, False]  # <= s_mean
    assert capacity_mask(torch.full((4,), 0.3), 1.0, typical=True).all()  # all equal: nothing is atypical


def test_selection_side_follows_ipc_threshold(digits, pretrain_experts):
    train, _ = digits
    kept = {}
    for alpha in (50, 2):  # IPC 2 < 50: typical; IPC 2 >= 2: diverse
        method = PTLM(config(alpha=alpha, total_iterations=1), train, pretrain_experts, device="cpu", seed=4)
        assert method.typical == (alpha == 50)
        kept[alpha] = method.step()["keep_fraction"]  # t/|T| = 1: split at the mean score
    # same seed -> same batches and features: "> s_mean" and "<= s_mean" partition every batch
    assert 0 < kept[50] < 1 and 0 < kept[2] < 1
    assert kept[50] + kept[2] == pytest.approx(1.0)
    whole = PTLM(config(capacity=False, total_iterations=1), train, pretrain_experts, device="cpu", seed=4)
    assert whole.step()["keep_fraction"] == 1.0


# --------------------------------------------------------------------------- the method
def test_losses_go_down_with_two_separate_updates(digits, pretrain_experts):
    train, _ = digits
    assert PTLM(config(), train, pretrain_experts, device="cpu").lr_img == pytest.approx(0.02)  # 0.01 x IPC
    method = PTLM(config(total_iterations=20, lr_img=0.1), train, pretrain_experts, device="cpu", seed=0)
    assert method.factor == 2
    updates = []
    step = method.optimizer.step
    method.optimizer.step = lambda *a, **k: (updates.append(method.iteration), step(*a, **k))[1]

    def fixed():  # fixed experts, iteration t (injection + selection), batches and augmentations
        match = sum(method.matching_loss(e, t=t, seed=5) for e in range(2) for t in (5, 15))
        return match, method.pseudo_label_loss(0, seed=5)

    match_before, plm_before = fixed()
    metrics = [method.step() for _ in range(8)]
    match_after, plm_after = fixed()
    assert match_after < 0.9 * match_before, (match_before, match_after)
    assert plm_after < plm_before, (plm_before, plm_after)
    assert updates == [i for i in range(8) for _ in range(2)]  # Algorithm 1: an update per loss
    for m in metrics:
        assert {"loss", "ptm_loss", "plm_loss", "keep_fraction", "inject_ratio", "plm_classes", "time_s"} <= set(m)
        assert m["loss"] == pytest.approx(m["ptm_loss"] + m["plm_loss"])  # Eq. 10
        assert m["plm_classes"] == 10  # the experts classify every class's batch partly right
    syn = method.synthetic_set()
    assert syn.method == "ptlm" and syn.images.shape == (80, 1, 8, 8)  # decoded: IPC·l² per class
    assert syn.labels.tolist() == [c for c in range(10) for _ in range(8)]

    ptm_only = PTLM(config(plm=False), train, pretrain_experts, device="cpu", seed=0)
    m = ptm_only.step()
    assert m["plm_loss"] == 0 and m["loss"] == m["ptm_loss"] and "grad_norm_plm" not in m


def test_errors_are_one_line_value_errors(digits, pretrain_experts, tmp_path):
    train, _ = digits
    assert config(tau=0.2, alpha=10).sharpen_tau == 0.2 and config(alpha=10).ipc_threshold == 10
    cases = [
        (lambda: PTLM(config(ipc=35), train, pretrain_experts, device="cpu"), r"ipc=35 with factor=2 needs 140"),
        (lambda: PTLM(config(), train, TrajectoryStore(tmp_path / "empty"), device="cpu"),
         r"no trajectories .* kind=pretrain.*raydd farm --recipe pretrain"),
        (lambda: PTLM(config(expert_kind="expert"), train, pretrain_experts, device="cpu"), r"kind=expert"),
        (lambda: config(zeta=2), r"unknown PTLMConfig knob 'zeta'.*tau \(= sharpen_tau\)"),
        (lambda: config(tau=0), r"sharpen_tau=0.0 is out of range"),
        (lambda: config(lam=-1), r"inject_scale=-1.0 is out of range"),
        (lambda: config(alpha=0), r"ipc_threshold=0 is out of range"),
        (lambda: config(total_iterations=0), r"total_iterations=0 is out of range"),
    ]
    for build, pattern in cases:
        with pytest.raises(ValueError, match=pattern) as err:
            build()
        assert "\n" not in str(err.value)
