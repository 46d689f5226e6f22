"""DATM on real (tiny) data: 2 experts farmed on scikit-learn digits into a temporary store."""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from raydd.methods import load_synthetic, make_config
from raydd.methods.datm import DATM, DATMConfig, start_epoch_upper
from raydd.methods.matching import soft_cross_entropy
from raydd.store import TrajectoryStore


pytestmark = pytest.mark.usefixtures("single_thread")


def small(ipc: int = 2, **overrides) -> DATMConfig:
    knobs = dict(syn_steps=8, expert_epochs=2, max_start_epoch=4, current_max_start_epoch=None, lr_img=100.0,
                 lr_lr=1e-5, lr_y=20.0, threshold=None)
    knobs.update(overrides)
    return make_config("datm", "digits", ipc, **knobs)


def test_defaults_follow_the_reference_configs():
    c1, c10, c50 = (make_config("datm", "cifar10", ipc) for ipc in (1, 10, 50))
    assert (c1.syn_steps, c1.lr_img, c1.lr_y, c1.lr_lr, c1.threshold) == (80, 100.0, 5.0, 1e-7, 1.1)
    assert (c1.min_start_epoch, c1.current_max_start_epoch, c1.max_start_epoch) == (0, None, 4)
    assert (c10.lr_img, c10.lr_y, c10.current_max_start_epoch, c10.max_start_epoch, c10.expansion_end_epoch) == \
        (100.0, 2.0, 10, 20, 1000)
    assert (c50.lr_img, c50.current_max_start_epoch, c50.max_start_epoch, c50.expansion_end_epoch) == \
        (1000.0, 20, 40, 2000)
    assert all(c.label_momentum == 0.9 and c.syn_lr_init == 0.01 and c.zca and c.init_correct for c in (c1, c10, c50))
    assert DATMConfig.default_iterations == 10000
    digits = make_config("datm", "digits", 10)
    assert digits.zca is False and digits.syn_lr_init is None and digits.syn_steps == 10
    assert make_config("datm", "mnist", 10).syn_steps == 80
    assert make_config("datm", "digits", 2, alpha=0.02).syn_lr_init == 0.02


def test_start_epoch_window_grows_linearly(digits, digits_experts):
    cfg = small(current_max_start_epoch=2, max_start_epoch=6, expansion_end_epoch=8)
    # upper = min(T+, T0 + floor((T+ - T0) * it / E)) with T0=2, T+=6, E=8
    assert [start_epoch_upper(cfg, it) for it in (0, 1, 2, 4, 7, 8, 100)] == [2, 2, 3, 4, 5, 6, 6]
    assert start_epoch_upper(small(max_start_epoch=6), 0) == 6  # no expansion

    train, _ = digits
    method = DATM(small(min_start_epoch=1, current_max_start_epoch=2, max_start_epoch=4, expansion_end_epoch=4),
                  train, digits_experts, device="cpu", seed=0)
    seen = {}
    for it in (0, 2, 4, 9):
        method._iteration = it  # the window follows the iteration count
        seen[it] = {method.sample_expert()[1] for _ in range(60)}
    assert seen == {0: {1}, 2: {1, 2}, 4: {1, 2, 3}, 9: {1, 2, 3}}


def test_soft_label_init_picks_correctly_classified_images(digits, digits_experts, tmp_path):
    train, _ = digits
    method = DATM(small(ipc=3), train, digits_experts, device="cpu", seed=4)
    classes = torch.arange(10).repeat_interleave(3)
    assert torch.equal(method.labels.classes, classes)
    logits = torch.stack([method_logits(method, e.trajectory_id, method.images) for e in method.experts])
    correct = logits.argmax(2) == classes  # [experts, N]
    assert correct.any(0).all()  # every picked image is classified correctly by an expert
    mean_correct = (logits * correct.unsqueeze(2)).sum(0) / correct.sum(0).unsqueeze(1)
    assert torch.allclose(method.labels.logits.detach(), mean_correct, atol=1e-5)
    assert torch.equal(method.labels.logits.argmax(1), classes)
    for i, c in enumerate(classes.tolist()):  # real images of their class
        pool = train.images[train.class_indices(c)]
        assert (pool - method.images[i]).flatten(1).abs().amax(1).min() == 0

    # the first expert alone suffices here, so all picks are its correct predictions
    first = method_logits(method, method.experts[0].trajectory_id, method.images).argmax(1)
    assert torch.equal(first, classes)

    plain = DATM(small(ipc=3, init_correct=False), train, digits_experts, device="cpu", seed=4)
    assert torch.allclose(plain.labels.logits.detach(), method_logits(plain, plain.experts[0].trajectory_id, plain.images))

    syn = method.synthetic_set()
    assert syn.soft and torch.allclose(syn.labels, F.softmax(method.labels.logits.detach(), 1))
    assert torch.allclose(syn.labels.sum(1), torch.ones(30))
    loaded = load_synthetic(syn.save(tmp_path / "datm.safetensors"))
    assert torch.equal(loaded.meta["label_logits"], method.labels.logits.detach())
    assert loaded.method == "datm" and torch.equal(loaded.hard_labels, classes)

    with pytest.raises(ValueError, match="classified correctly") as err:  # a random-init expert is right for few
        DATM(small(ipc=100, label_epoch=0), train, digits_experts, device="cpu")
    assert "\n" not in str(err.value)


def method_logits(method: DATM, trajectory_id: str, images: torch.Tensor) -> torch.Tensor:
    """Independent recomputation: the expert's last snapshot, evaluated with its own module."""
    from raydd.models import build_model, load_flat_params

    with method.store.open(trajectory_id) as traj:
        last = traj.params(max(traj.epochs), dtype=torch.float32)
        net = load_flat_params(build_model(traj.meta["model"]), last).eval()
    with torch.no_grad():
        return net(images.detach())


def test_matching_loss_goes_down_on_fixed_problems(digits, digits_experts):
    train, _ = digits
    method = DATM(small(), train, digits_experts, device="cpu", seed=0)
    problems = [(e.trajectory_id, t) for e in method.experts for t in (0, 2)]

    def fixed_loss():
        return sum(method.matching_loss(tid, t, seed=7) for tid, t in problems) / len(problems)

    before, labels_before = fixed_loss(), method.labels.logits.detach().clone()
    metrics = [method.step() for _ in range(15)]
    after = fixed_loss()
    assert after < 0.75 * before, (before, after)
    assert not torch.equal(method.labels.logits.detach(), labels_before)  # the logits are learned
    for m in metrics:
        assert {"loss", "loss_tm", "skipped", "start_epoch", "start_upper", "grad_norm_y", "peak_mem_mb"} <= set(m)
        assert m["skipped"] == 0.0 and m["loss"] == m["loss_tm"]


def test_threshold_skips_the_update(digits, digits_experts):
    train, _ = digits
    method = DATM(small(threshold=1e-3), train, digits_experts, device="cpu", seed=1)
    images, labels, lr = method.images.detach().clone(), method.labels.logits.detach().clone(), float(method.syn_lr.detach())
    metrics = [method.step() for _ in range(3)]
    assert [m["skipped"] for m in metrics] == [1.0, 1.0, 1.0] and method.iteration == 3
    assert all(m["loss_tm"] > 1e-3 for m in metrics)
    assert torch.equal(method.images, images) and torch.equal(method.labels.logits, labels)
    assert float(method.syn_lr.detach()) == lr
    assert method.opt_img.state_dict()["state"] == {}  # no optimiser ever stepped

    loose = DATM(small(threshold=10.0), train, digits_experts, device="cpu", seed=1)
    assert loose.step()["skipped"] == 0.0 and not torch.equal(loose.images, images)


def test_soft_cross_entropy():
    logits, target = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.0, 1.0, 0.0]])
    expected = -(F.softmax(target, 1) * F.log_softmax(logits, 1)).sum()
    assert torch.allclose(soft_cross_entropy(logits, target), expected)
    hard = torch.tensor([[50.0, 0.0, 0.0]])  # a near one-hot target is plain cross-entropy
    assert torch.allclose(soft_cross_entropy(logits, hard), F.cross_entropy(logits, torch.tensor([0])))


def test_errors(digits, digits_experts, tmp_path):
    train, _ = digits
    cases = [
        (dict(pix_init="noise"), "pix_init='noise' is invalid"),
        (dict(current_max_start_epoch=6), "current_max_start_epoch=6 is invalid"),
        (dict(min_start_epoch=4), "min_start_epoch=4 is invalid"),
        (dict(threshold=0.0), "threshold=0.0 is out of range"),
        (dict(label_momentum=1.0), "label_momentum=1.0 is out of range"),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            small(**overrides)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="ipc=500 is larger than the smallest class"):
        DATM(small(ipc=500), train, digits_experts, device="cpu")
    with pytest.raises(ValueError, match="no trajectories in store .* match dataset=digits"):
        DATM(small(), train, TrajectoryStore(tmp_path / "empty"), device="cpu")
    with pytest.raises(ValueError, match="label_epoch=99 is not stored"):
        DATM(small(label_epoch=99), train, digits_experts, device="cpu")
