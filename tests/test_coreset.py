"""Coreset baselines (random, herding, k-center): selection rules, class balance, quality, errors."""
from __future__ import annotations

import pytest
import torch

import raydd.methods.coreset  # noqa: F401  (registers "random", "herding", "kcenter")
from raydd.methods.base import get_method, load_checkpoint, make_config, save_checkpoint
from raydd.methods.coreset import herding, k_center_greedy, selection_metrics
from raydd.methods.synthetic import load_synthetic
from raydd.store import TrajectoryStore

IPC = 5


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from raydd.farm import FarmSpec, farm

    root = tmp_path_factory.mktemp("coreset-store")
    farm(FarmSpec(store=str(root), dataset="digits", recipe="pretrain",
                  recipe_options={"epochs": 3, "batch_size": 64}, model={"width": 16}, trajectories=2,
                  backend="local"), progress=False)
    return TrajectoryStore(root)


def _method(name, train, store=None, seed=0, ipc=IPC, **overrides):
    return get_method(name)(make_config(name, "digits", ipc, **overrides), train, store, device="cpu", seed=seed)


def _check_balanced(method, train, ipc=IPC):
    method.step()
    sel = method.selected
    assert len(sel) == ipc * 10 and len(set(sel.tolist())) == len(sel)
    assert train.labels[sel].tolist() == [c for c in range(10) for _ in range(ipc)]
    out = method.synthetic_set()
    assert torch.equal(out.images, train.images[sel]) and torch.equal(out.labels, train.labels[sel])
    return sel


# ------------------------------------------------------------------ the selection rules themselves
def test_herding_rule_tracks_the_mean():
    x = torch.tensor([[0.0], [10.0], [3.0], [6.0], [-10.0]])  # class mean 1.8
    # k=1: nearest to 1.8 is 3; k=2: nearest to 2*1.8 - 3 = 0.6 is 0; k=3: nearest to 3*1.8 - 3 = 2.4 is 6
    assert herding(x, 3).tolist() == [2, 0, 3]
    assert herding(x, 5).sort().values.tolist() == [0, 1, 2, 3, 4]  # without replacement


def test_kcenter_rule_is_farthest_point():
    x = torch.tensor([[0.0], [1.0], [9.0], [10.0], [5.0], [5.0]])
    assert k_center_greedy(x, 4, first=4).tolist() == [4, 0, 3, 1]  # 5 -> 0 (tie with 10: first) -> 10 -> ...
    dup = torch.zeros(3, 2)  # duplicates of a center are still distinct picks
    assert sorted(k_center_greedy(dup, 3, first=0).tolist()) == [0, 1, 2]


# ------------------------------------------------------------------ random
def test_random_is_balanced_seeded_and_needs_no_store(digits):
    train, _ = digits
    a = _check_balanced(_method("random", train, seed=1), train)
    b = _check_balanced(_method("random", train, seed=1), train)
    c = _check_balanced(_method("random", train, seed=2), train)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_one_shot_steps_and_resume(digits, tmp_path):
    train, _ = digits
    method = _method("random", train, seed=4)
    first = method.step()
    assert set(first) >= {"loss", "coverage_radius", "selected", "selection_time_s"}
    selected = method.selected.clone()
    assert method.step() == first and torch.equal(method.selected, selected) and method.iteration == 2
    save_checkpoint(method, tmp_path / "random.safetensors")
    resumed = load_checkpoint(_method("random", train, seed=4), tmp_path / "random.safetensors")
    assert torch.equal(resumed.selected, selected) and resumed.step() == first and resumed.iteration == 3


# ------------------------------------------------------------------ herding and k-center
def test_herding_and_kcenter_are_balanced_and_deterministic(digits, store):
    train, _ = digits
    for name in ("herding", "kcenter"):
        a = _check_balanced(_method(name, train, store, seed=0), train)
        b = _check_balanced(_method(name, train, store, seed=7), train)
        assert torch.equal(a, b), name  # deterministic: no randomness in the rule
    r1 = _method("kcenter", train, store, seed=1, start="random")
    r2 = _method("kcenter", train, store, seed=1, start="random")
    assert torch.equal(_check_balanced(r1, train), _check_balanced(r2, train))


def test_quality_against_random_in_the_expert_embedding(digits, store):
    train, _ = digits
    herd = _method("herding", train, store)
    kc = _method("kcenter", train, store)
    h_metrics, k_metrics = herd.step(), kc.step()
    feats = herd.features
    assert feats.shape[0] == len(train) and torch.equal(feats, kc.features)  # same (first) expert
    for seed in range(3):
        rand = _method("random", train, seed=seed)
        rand.step()
        m = selection_metrics(feats, train.labels, rand.selected, 10)
        assert h_metrics["loss"] < m["loss"] / 1.5, (h_metrics, m)  # herding's mean is far closer
        assert k_metrics["coverage_radius"] < m["coverage_radius"], (k_metrics, m)  # k-center covers better
    assert h_metrics == selection_metrics(feats, train.labels, herd.selected, 10) | {
        "selected": 50.0, "selection_time_s": h_metrics["selection_time_s"]}


def test_explicit_trajectory_and_provenance(digits, store, tmp_path):
    train, _ = digits
    infos = store.list(dataset="digits", kind="pretrain")
    assert len(infos) == 2
    second = infos[1].trajectory_id
    method = _method("herding", train, store, trajectory=second)
    out = load_synthetic(method.synthetic_set().save(tmp_path / "herding.safetensors"))
    assert out.meta["indices"] == method.selected.tolist()
    assert out.meta["expert"] == second and out.meta["expert_kind"] == "pretrain" and out.meta["expert_epoch"] == 3
    auto = _method("herding", train, store)
    assert auto.expert.trajectory_id == infos[0].trajectory_id
    ckpt = auto.state_dict()
    with pytest.raises(ValueError, match="checkpoint selected with expert"):
        method.load_state_dict(ckpt)


# ------------------------------------------------------------------ errors
def test_errors(digits, store, tmp_path):
    train, _ = digits
    with pytest.raises(ValueError, match="ipc=1000 is larger than the smallest class"):
        _method("random", train, ipc=1000)
    with pytest.raises(ValueError, match="ipc=1000 is larger than the smallest class"):
        _method("herding", train, store, ipc=1000)
    empty = TrajectoryStore(tmp_path / "empty")
    for name in ("herding", "kcenter"):
        with pytest.raises(ValueError, match="no trajectories in store .* raydd farm --recipe expert "
                                             "--dataset digits"):
            _method(name, train, empty)
        with pytest.raises(ValueError, match="pass a TrajectoryStore"):
            _method(name, train, None)
    with pytest.raises(ValueError, match="raydd farm --recipe expert"):
        _method("kcenter", train, store, expert_kind="expert")
    with pytest.raises(ValueError, match="trajectory 'nope' is not in store"):
        _method("herding", train, store, trajectory="nope")
    with pytest.raises(ValueError, match="unknown HerdingConfig knob 'lr_img'"):
        make_config("herding", "digits", 1, lr_img=1.0)
    with pytest.raises(ValueError, match="unknown RandomConfig knob 'trajectory'"):
        make_config("random", "digits", 1, trajectory="auto")
    with pytest.raises(ValueError, match="start='far' is invalid: accepted mean, random"):
        make_config("kcenter", "digits", 1, start="far")
