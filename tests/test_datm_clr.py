"""DATM-CLR on real (tiny) data: the contrastive loss, both strategies, inner momentum, resume."""
from __future__ import annotations

import math

import pytest
import torch

from raydd.methods import make_config
from raydd.methods.matching import soft_cross_entropy
from raydd.methods.datm_clr import DATMCLR, DATMCLRConfig, supervised_nt_xent
from raydd.store import TrajectoryStore


pytestmark = pytest.mark.usefixtures("single_thread")


def small(ipc: int = 2, **overrides) -> DATMCLRConfig:
    knobs = dict(syn_steps=6, expert_epochs=2, max_start_epoch=4, current_max_start_epoch=None, lr_img=100.0,
                 lr_lr=1e-5, lr_y=20.0, threshold=None, proj_dim=32)
    knobs.update(overrides)
    return make_config("datm_clr", "digits", ipc, **knobs)


# ----------------------------------------------------------------------------- eq. 2
def test_nt_xent_matches_hand_computed_values():
    # two classes, one image each, identical views: s = 1 for a pair of views, 0 across classes.
    # anchor: -log(e^{1/τ} / (e^{1/τ} + 2 e^0)) = log(1 + 2 e^{-1/τ}); τ = 0.5 -> log(1 + 2 e^{-2})
    z = torch.eye(2)
    assert supervised_nt_xent(z, z, torch.tensor([0, 1]), 0.5).item() == pytest.approx(math.log(1 + 2 * math.exp(-2)))

    # three images, classes (0, 0, 1), 2-d features: every ordered same-class pair of the six
    # views is a positive pair of eq. 2, the two class-1 views are the negatives of the class-0 anchors.
    z1 = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    z2 = torch.tensor([[0.8, 0.6], [1.0, 0.0], [-1.0, 0.0]])
    classes, tau = [0, 0, 1], 0.1
    views = [(v, classes[i % 3]) for i, v in enumerate(torch.cat([z1, z2]).tolist())]

    def sim(a, b):
        return (a[0] * b[0] + a[1] * b[1]) / math.hypot(*a) / math.hypot(*b) / tau

    terms = []
    for i, (a, ca) in enumerate(views):
        negatives = sum(math.exp(sim(a, b)) for b, cb in views if cb != ca)
        for p, (b, cb) in enumerate(views):
            if p != i and cb == ca:
                terms.append(-math.log(math.exp(sim(a, b)) / (math.exp(sim(a, b)) + negatives)))
    assert len(terms) == 2 * 6 + 2 * 1  # class-0 views: 4 anchors x 3 positives; class-1 views: 2 x 1
    expected = sum(terms) / len(terms)
    got = supervised_nt_xent(z1, z2, torch.tensor(classes), tau)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_nt_xent_without_negatives_is_zero_with_finite_gradients():
    z1 = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    z2 = z1.detach().clone().requires_grad_(True)
    loss = supervised_nt_xent(z1, z2, torch.zeros(3, dtype=torch.long), 0.1)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(z1.grad).all() and torch.isfinite(z2.grad).all()


# ----------------------------------------------------------------------------- config
def test_defaults_and_aliases():
    cfg = make_config("datm_clr", "cifar10", 1)
    # a plain-SGD student (reading (a) of Sec. 4.1, DATM's code); the momentum reading is the variant 0.5
    assert (cfg.syn_steps, cfg.inner_momentum, cfg.temperature, cfg.strategy) == (20, 0.0, 0.1, "fusion")
    assert (cfg.con_weight, cfg.tm_weight, cfg.update_weight) == (0.1, 1.0, 0.1)
    assert (cfg.lr_img, cfg.lr_y, cfg.max_start_epoch, cfg.threshold, cfg.zca) == (100.0, 5.0, 4, 1.1, True)  # DATM's
    tuned = make_config("datm_clr", "digits", 2, alpha=0.3, tau=0.2, lam=0.5, current_max_start_epoch=None)
    assert (tuned.con_weight, tuned.temperature, tuned.update_weight) == (0.3, 0.2, 0.5)


def test_multiple_views_are_the_default_only_where_the_paper_reports_them():
    # Table 3 reports "Multiple" (every DSA op per view) on CIFAR-10/100; elsewhere one op per view
    assert {d: make_config("datm_clr", d, 10).multi_aug for d in ("cifar10", "cifar100", "fashion_mnist", "mnist",
                                                                 "digits")} == {
        "cifar10": True, "cifar100": True, "fashion_mnist": False, "mnist": False, "digits": False}
    assert make_config("datm_clr", "fashion_mnist", 10, multi_aug=True).multi_aug is True  # still a knob


def test_config_errors(digits, digits_experts, tmp_path):
    cases = [
        (dict(strategy="both"), "strategy='both' is invalid: accepted fusion, update"),
        (dict(tau=0.0), r"temperature=0.0 is out of range: expected \(0"),
        (dict(tau=-1.0), "temperature=-1.0 is out of range"),
        (dict(dsa=False), "dsa=False is invalid"),
        (dict(alpha=-0.1), "con_weight=-0.1 is out of range"),
        (dict(inner_momentum=1.0), "inner_momentum=1.0 is out of range"),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            small(**overrides)
        assert "\n" not in str(err.value)
    train, _ = digits
    with pytest.raises(ValueError, match="ipc=1000 is larger than the smallest class"):
        DATMCLR(small(ipc=1000), train, digits_experts, device="cpu")
    with pytest.raises(ValueError, match="no trajectories in store .* farm experts first"):
        DATMCLR(small(), train, TrajectoryStore(tmp_path / "empty"), device="cpu")


# ----------------------------------------------------------------------------- the method
@pytest.mark.parametrize("strategy, multi_aug", [("fusion", False), ("update", False), ("fusion", True)])
def test_strategies_run_and_report_both_terms(digits, digits_experts, strategy, multi_aug):
    train, _ = digits
    method = DATMCLR(small(strategy=strategy, alpha=0.5, multi_aug=multi_aug), train, digits_experts, device="cpu",
                     seed=0)
    assert method.side.view_dsa.config.single_per_call is not multi_aug
    problems = [(e.trajectory_id, t) for e in method.experts for t in (0, 2)]

    def fixed_loss():
        return sum(method.matching_loss(tid, t, seed=7) for tid, t in problems) / len(problems)

    before = fixed_loss()
    head = [p.detach().clone() for p in method.side.head.parameters()]
    metrics = [method.step() for _ in range(15)]
    after = fixed_loss()
    assert after < 0.9 * before, (before, after)  # at least 10 % lower after 15 iterations
    for m in metrics:
        assert {"loss", "loss_tm", "loss_con", "skipped", "grad_norm_img", "peak_mem_mb", "time_s"} <= set(m)
        assert m["loss_con"] > 0
        expected = 0.5 * m["loss_con"] + m["loss_tm"] if strategy == "fusion" else m["loss_tm"]
        assert m["loss"] == pytest.approx(expected, rel=1e-5)
    assert not all(torch.equal(a, b) for a, b in zip(head, method.side.head.parameters()))  # the head is learned
    syn = method.synthetic_set()
    assert syn.method == "datm_clr" and syn.soft and syn.config["strategy"] == strategy


def test_inner_steps_use_momentum_sgd(digits, digits_experts):
    """θ̂_{n+1} = θ̂_n − α·v_{n+1}, v_{n+1} = μ·v_n + ∇L_ce(x1) (fusion: CE only inside the loop)."""
    train, _ = digits
    method = DATMCLR(small(syn_steps=3, inner_momentum=0.5), train, digits_experts, device="cpu", seed=2)
    theta0 = method.expert_params(method.experts[0].trajectory_id, 1)
    got = method.unroll(theta0, torch.Generator().manual_seed(5), create_graph=False)[0]

    gen = torch.Generator().manual_seed(5)
    images, labels, alpha = method.images.detach(), method.labels.logits.detach(), float(method.syn_lr.detach())
    params, velocity = theta0.clone(), torch.zeros_like(theta0)
    for _ in range(3):
        idx = torch.randperm(len(images), generator=gen)  # batch_syn None: all of S each step
        x1 = method.side.view_dsa(images[idx], generator=gen)
        method.side.view_dsa(images[idx], generator=gen)  # the second view draws from the same generator
        params.requires_grad_(True)
        (grad,) = torch.autograd.grad(soft_cross_entropy(method.flat_model(params, x1), labels[idx]), params)
        velocity = 0.5 * velocity + grad
        params = (params - alpha * velocity).detach()
    assert torch.allclose(got, params, atol=1e-6)
    plain = DATMCLR(small(syn_steps=3, inner_momentum=0.0), train, digits_experts, device="cpu", seed=2)
    assert not torch.allclose(plain.unroll(theta0, torch.Generator().manual_seed(5), create_graph=False)[0], got)


def test_a_skipped_step_frees_its_unrolled_graph(digits, digits_experts):
    """A tiny threshold skips every step (no backward): the unrolled graph built with create_graph=True
    must still be freed when the step returns (it once leaked ~2 GB per skipped step)."""
    import gc
    import weakref

    train, _ = digits
    method = DATMCLR(small(threshold=1e-12), train, digits_experts, device="cpu", seed=0)
    embed, outputs = method.flat_model.embed, []

    def recording_embed(params, x):
        feats = embed(params, x)
        outputs.append(weakref.ref(feats))
        return feats

    method.flat_model.embed = recording_embed
    for _ in range(2):
        assert method.step()["skipped"] == 1.0
    gc.collect()
    assert len(outputs) == 2 * 2 * method.config.syn_steps  # two views per inner step
    assert [r for r in outputs if r() is not None] == []


def test_raydd_methods_says_which_momentum_reading_is_the_default(capsys):
    from raydd.cli import main

    assert main(["methods", "datm_clr", "--dataset", "cifar10", "--ipc", "1"]) == 0
    out = capsys.readouterr().out
    assert "inner_momentum = 0.0" in out
    assert "plain-SGD student, as DATM's code does (inner_momentum=0, the default)" in out
    assert "inner_momentum=0.5 is the literal reading, a momentum student" in out
