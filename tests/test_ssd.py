"""SSD condensation (raydd/methods/ssd.py) on tiny digits: a FixMatch teacher and 2 students farmed locally."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import raydd.methods.ssd as ssd_module
from raydd.data.datasets import ImageDataset
from raydd.data.semisup import semi_supervised_split
from raydd.methods import MTTConfig, make_config
from raydd.methods.ssd import SSD, SSDConfig
from raydd.models import ModelSpec, build_model, load_flat_params
from raydd.store import TrajectoryStore

FRACTION = 0.02  # the labelled fraction of conftest's ssd_store (3 labelled digits per class)


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def split(digits):
    return semi_supervised_split(digits[0].labels, FRACTION, 0)


def config(ipc=2, **overrides):
    knobs = dict(syn_steps=8, expert_epochs=2, max_start_epoch=2, lr_img=100.0, lr_lr=1e-5)
    knobs.update(overrides)
    return make_config("ssd", "digits", ipc, **knobs)


def teacher_probs(store, tid, images):
    """The teacher's probabilities, computed here independently of the method."""
    with store.open(tid) as traj:
        net = build_model(ModelSpec.from_dict(traj.meta["model"]))
        load_flat_params(net, traj.params(traj.epochs[-1]).float(), traj.buffers(traj.epochs[-1]).float())
    with torch.no_grad():
        return torch.softmax(net.eval()(images), dim=1)


# ----------------------------------------------------------------------------- config
def test_defaults_follow_mtt_with_student_lr():
    for dataset, ipc in (("cifar10", 10), ("cifar10", 1), ("digits", 10), ("fashion_mnist", 50)):
        cfg, mtt = SSDConfig.defaults(dataset, ipc), MTTConfig.defaults(dataset, ipc)
        assert cfg.syn_lr_init is None  # Alg. 1 line 3: α = α_0, the students' lr
        for key in ("syn_steps", "expert_epochs", "max_start_epoch", "lr_img", "lr_lr", "zca", "dsa_strategy"):
            assert getattr(cfg, key) == getattr(mtt, key), key
    cfg = make_config("ssd", "digits", 1, alpha=0.02)
    assert (cfg.syn_lr_init, cfg.expert_kind, cfg.syn_labels, cfg.teacher, cfg.pseudo_threshold) == \
        (0.02, "student", "teacher", None, 0.0)
    for bad, match in (({"syn_labels": "argmax"}, "syn_labels"), ({"expert_kind": "expert"}, "expert_kind"),
                       ({"pseudo_threshold": 1.5}, "pseudo_threshold"), ({"teacher": " "}, "teacher")):
        with pytest.raises(ValueError, match=match):
            make_config("ssd", "digits", 1, **bad)


# ----------------------------------------------------------------------------- matching
def test_matching_loss_goes_down_on_fixed_problems(digits, ssd_store):
    store, tid = ssd_store
    method = SSD(config(), digits[0], store, device="cpu", seed=0)
    assert method.teacher_id == tid and len(method.experts) == 2
    assert float(method.syn_lr.detach()) == pytest.approx(0.01)  # the students' lr
    problems = [(e.trajectory_id, t) for e in method.experts for t in e.starts]

    def fixed_loss():
        return sum(method.matching_loss(s, t, seed=5) for s, t in problems) / len(problems)

    before = fixed_loss()
    metrics = [method.step() for _ in range(12)]
    after = fixed_loss()
    assert after < 0.85 * before, (before, after)
    assert all({"loss", "syn_lr", "peak_mem_mb", "time_s"} <= set(m) for m in metrics)


def test_a_checkpoint_of_another_teacher_is_refused(digits, ssd_store):
    store, _ = ssd_store
    cfg = config(ipc=4, syn_steps=4, batch_syn=16)
    first = SSD(cfg, digits[0], store, device="cpu", seed=3)
    first.step()
    bad = first.state_dict() | {"teacher": "0" * 20}
    with pytest.raises(ValueError, match="teacher"):
        SSD(cfg, digits[0], store, device="cpu", seed=3).load_state_dict(bad)


# ----------------------------------------------------------------------------- initialisation
def test_init_uses_only_labelled_images_when_enough(digits, ssd_store, split):
    store, tid = ssd_store
    train = digits[0]
    method = SSD(config(ipc=2, syn_labels="hard"), train, store, device="cpu", seed=1)
    idx = method.init_indices
    assert torch.isin(idx, split.labelled).all()
    assert train.labels[idx].tolist() == [c for c in range(10) for _ in range(2)] == method.labels.targets.tolist()
    assert torch.equal(method.images, train.images[idx])
    syn = method.synthetic_set()
    assert syn.meta["init_from_labelled"] == [2] * 10 and syn.meta["init_from_unlabelled"] == [0] * 10
    assert (syn.meta["teacher"], syn.meta["labelled_fraction"], syn.meta["split_seed"]) == (tid, FRACTION, 0)
    assert (syn.meta["num_labelled"], syn.meta["num_unlabelled"]) == (split.num_labelled, split.num_unlabelled)
    assert syn.method == "ssd" and syn.labels.dtype == torch.int64


def test_top_up_takes_the_teachers_most_confident_unlabelled(digits, ssd_store, split):
    store, tid = ssd_store
    train = digits[0]
    probs = teacher_probs(store, tid, train.images)
    conf, pred = probs.max(1)
    method = SSD(config(ipc=5, syn_labels="hard"), train, store, device="cpu", seed=0)
    counts = torch.bincount(train.labels[split.labelled], minlength=10)
    assert (counts == 3).all()  # 2% of ~144 per class
    for c in range(10):
        picks = method.init_indices[c * 5:(c + 1) * 5]
        own, extra = picks[:3], picks[3:]
        assert torch.isin(own, split.labelled).all() and (train.labels[own] == c).all()
        assert torch.isin(extra, split.unlabelled).all() and (pred[extra] == c).all()
        pool = split.unlabelled[pred[split.unlabelled] == c]
        best = pool[torch.sort(conf[pool], descending=True, stable=True).indices[:2]]
        assert extra.tolist() == best.tolist()
    assert method.labels.targets.tolist() == [c for c in range(10) for _ in range(5)]
    assert method.synthetic_set().meta["init_from_unlabelled"] == [2] * 10

    # labels from the teacher: argmax (class-balanced by construction), or its probabilities
    teacher = SSD(config(ipc=5), train, store, device="cpu", seed=0)
    assert torch.equal(teacher.labels.targets, pred[teacher.init_indices])
    assert teacher.labels.targets.tolist() == [c for c in range(10) for _ in range(5)]
    soft = SSD(config(ipc=5, syn_labels="soft"), train, store, device="cpu", seed=0)
    assert torch.allclose(soft.labels.targets, probs[soft.init_indices], atol=1e-5)
    soft.step()
    assert soft.synthetic_set().labels.shape == (50, 10)


def test_labels_of_unlabelled_samples_are_never_read(digits, ssd_store, split, monkeypatch):
    store, _ = ssd_store
    train = digits[0]
    cfg = config(ipc=5, syn_steps=4)  # 3 labelled + 2 pseudo-labelled per class
    clean = SSD(cfg, train, store, device="cpu", seed=2)
    corrupt = train.labels.clone()
    corrupt[split.unlabelled] = (corrupt[split.unlabelled] + 1 + torch.arange(split.num_unlabelled) % 9) % 10
    assert (corrupt[split.unlabelled] != train.labels[split.unlabelled]).all()
    corrupted = ImageDataset(train.images, corrupt, train.info, train.split, train.source)
    # the split is the protocol's (it decides who is labelled): hand the method the same one
    monkeypatch.setattr(ssd_module, "semi_supervised_split", lambda labels, fraction, seed: split)
    with pytest.warns(UserWarning, match="differs from the data the student trajectories were trained on"):
        dirty = SSD(cfg, corrupted, store, device="cpu", seed=2)
    assert torch.equal(clean.images, dirty.images) and torch.equal(clean.labels.targets, dirty.labels.targets)
    for _ in range(2):
        clean.step(), dirty.step()
    assert torch.equal(clean.images, dirty.images) and torch.equal(clean.syn_lr, dirty.syn_lr)


# ----------------------------------------------------------------------------- errors
def test_no_student_trajectories_names_both_farm_commands(digits, tmp_path):
    with pytest.raises(ValueError, match=r"no student trajectories.*raydd farm --recipe ssd_teacher.*"
                                         r"raydd farm --recipe ssd_student") as err:
        SSD(config(), digits[0], TrajectoryStore(tmp_path / "empty"), device="cpu")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="pass a TrajectoryStore"):
        SSD(config(), digits[0], None)


def test_bad_ipc_teacher_and_epochs_are_clear_errors(digits, ssd_store):
    store, tid = ssd_store
    with pytest.raises(ValueError, match=r"ipc=400 is too large for the semi-supervised split.*class \d+ has 3 "
                                         r"labelled images and \d+ unlabelled images pseudo-labelled") as err:
        SSD(config(ipc=400, syn_labels="hard"), digits[0], store, device="cpu")
    assert "\n" not in str(err.value) and tid in str(err.value)
    with pytest.raises(ValueError, match="teacher='nope' has no students"):
        SSD(config(teacher="nope"), digits[0], store, device="cpu")
    with pytest.raises(ValueError, match=r"t\+5.*raydd farm --recipe ssd_teacher.*--recipe ssd_student"):
        SSD(config(expert_epochs=5), digits[0], store, device="cpu")
    wrong = dataclasses.replace(config(), dataset="mnist")
    with pytest.raises(ValueError, match="dataset"):
        SSD(wrong, digits[0], store, device="cpu")
