"""SSD recipes (raydd/farm/ssd.py): FixMatch teacher and dual-consistency students on offline digits."""
from __future__ import annotations

import math
import shutil

import pytest
import torch
from torch import nn

from raydd.farm import FarmSpec, farm, get_recipe, plan_tasks, prepare_data
from raydd.farm import ssd
from raydd.farm.recipes import RecipeContext
from raydd.farm.task import data_fingerprint, model_spec_for
from raydd.store import TrajectoryStore

TEACHER_OPTS = {"epochs": 2, "batch_size": 8, "mu": 3, "ema_decay": 0.5, "eval_every": 1}
STUDENT_OPTS = {"epochs": 2, "batch_size": 64}
COMMON = dict(dataset="digits", model={"width": 8}, train_per_class=30, backend="local", trajectories=1)


def teacher_spec(root, **kw) -> FarmSpec:
    opts = {**TEACHER_OPTS, **kw.pop("recipe_options", {})}
    return FarmSpec(store=str(root), recipe="ssd_teacher", recipe_options=opts, **{**COMMON, **kw})


def student_spec(root, **kw) -> FarmSpec:
    opts = {**STUDENT_OPTS, **kw.pop("recipe_options", {})}
    return FarmSpec(store=str(root), recipe="ssd_student", recipe_options=opts, **{**COMMON, **kw})


class ListSink:
    def __init__(self):
        self.rows = []

    def append(self, epoch, params, *, buffers=None, metrics=None):
        self.rows.append((epoch, params.clone(), None if buffers is None else buffers.clone(), dict(metrics or {})))


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def data():
    return prepare_data(teacher_spec("unused"))


@pytest.fixture(scope="module")
def farmed(tmp_path_factory, data):
    """One teacher (seed 0) and one student (teacher='auto') in a real store."""
    root = tmp_path_factory.mktemp("ssd") / "store"
    teacher = farm(teacher_spec(root), progress=False, data=data)
    student = farm(student_spec(root), progress=False, data=data)
    return root, teacher.trajectory_ids[0], student.trajectory_ids[0]


@pytest.fixture(scope="module")
def two_teachers(tmp_path_factory, farmed, data):
    """A copy of the store with a second teacher of the same split (seed 1)."""
    root, tid0, _ = farmed
    root2 = tmp_path_factory.mktemp("ssd2") / "store"
    shutil.copytree(root, root2)
    tid1 = farm(teacher_spec(root2, seed=1), progress=False, data=data).trajectory_ids[0]
    return root2, tid0, tid1


def ctx_for(spec: FarmSpec, data, store_root=None) -> RecipeContext:
    train, test = data.datasets()
    return RecipeContext(train, test, model_spec_for(spec, data.info), seed=0, store_root=store_root)


# ----------------------------------------------------------------------------- registration and configs
def test_recipes_registered_with_paper_defaults():
    t, s = get_recipe("ssd_teacher"), get_recipe("ssd_student")
    assert (t.kind, s.kind) == ("teacher", "student")
    assert t.metric_names == ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "mask_rate")
    assert s.metric_names == ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "ce", "intra", "inter")
    assert t.default_norm == "batch" and s.default_norm == "instance" and s.prepare is not None
    tc, sc = t.make_config(), s.make_config()
    assert (tc.labelled_fraction, tc.split_seed, tc.threshold, tc.lambda_u, tc.mu) == (0.1, 0, 0.95, 1.0, 7)
    assert (tc.lr, tc.momentum, tc.weight_decay, tc.nesterov, tc.batch_size) == (0.03, 0.9, 5e-4, True, 64)
    assert (sc.lr, sc.batch_size, sc.teacher, sc.labelled_fraction, sc.split_seed) == (0.01, 256, "auto", 0.1, 0)
    assert (sc.lambda_intra, sc.lambda_inter, sc.keep_epochs) == (1.0, 1.0, None)


@pytest.mark.parametrize("recipe, options, match", [
    ("ssd_teacher", {"labelled_fraction": 0}, "labelled_fraction"),
    ("ssd_teacher", {"labelled_fraction": 1.5}, "labelled_fraction"),
    ("ssd_student", {"labelled_fraction": -0.1}, "labelled_fraction"),
    ("ssd_student", {"labelled_fraction": float("nan")}, "labelled_fraction"),
    ("ssd_student", {"lambda_intra": -1.0}, "lambda_intra"),
    ("ssd_student", {"lambda_inter": -0.5}, "lambda_inter"),
    ("ssd_student", {"lambda_inter": float("inf")}, "lambda_inter"),
    ("ssd_teacher", {"lambda_u": -1.0}, "lambda_u"),
    ("ssd_teacher", {"threshold": 1.5}, "threshold"),
    ("ssd_teacher", {"mu": 0}, "mu"),
    ("ssd_teacher", {"ema_decay": 1.0}, "ema_decay"),
    ("ssd_teacher", {"split_seed": -1}, "split_seed"),
    ("ssd_teacher", {"momentum": 0.0}, "nesterov"),
    ("ssd_teacher", {"lr_schedule": "step"}, "lr_schedule"),
    ("ssd_student", {"split_seed": 1.5}, "split_seed"),
    ("ssd_student", {"teacher": ""}, "teacher"),
    ("ssd_student", {"keep_epochs": -1}, "keep_epochs"),
    ("ssd_student", {"temperature": 4}, "unknown"),
])
def test_bad_options_are_rejected(recipe, options, match):
    with pytest.raises(ValueError, match=match):
        FarmSpec(store="unused", recipe=recipe, recipe_options=options, **COMMON)


# ----------------------------------------------------------------------------- end to end through the farm
def test_teacher_stores_initial_and_final_weights(farmed):
    root, tid, _ = farmed
    store = TrajectoryStore(root)
    [info] = store.list(kind="teacher")
    assert info.trajectory_id == tid and info.recipe == "ssd_teacher"
    assert info.epochs == [0, 2]
    with store.open(tid) as traj:
        assert traj.meta["model"]["norm"] == "batch"
        assert traj.meta["recipe_config"]["threshold"] == 0.95 and traj.meta["recipe_config"]["mu"] == 3
        assert traj.buffers(2) is not None  # BatchNorm running statistics
        assert not torch.equal(traj.params(0), traj.params(2))
        final = traj.metrics()[-1]
    assert set(ssd.TEACHER_METRICS) <= set(final)
    assert 0.0 <= final["mask_rate"] <= 1.0 and 0.0 <= final["test_acc"] <= 1.0
    assert math.isfinite(final["train_loss"]) and final["lr"] < 0.03  # cosine decay after the first epoch


def test_student_resolves_auto_teacher_and_snapshots_every_epoch(farmed):
    root, tid, sid = farmed
    store = TrajectoryStore(root)
    [info] = store.list(kind="student")
    assert info.trajectory_id == sid and info.recipe == "ssd_student"
    assert info.epochs == [0, 1, 2]
    with store.open(sid) as traj:
        assert traj.meta["recipe_config"]["teacher"] == tid  # resolved before hashing
        assert traj.meta["model"]["norm"] == "instance"
        assert traj.buffers(1) is None
        assert not torch.equal(traj.params(0), traj.params(2))
        metrics = traj.metrics()
    for row in metrics[1:]:
        for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "ce", "intra", "inter"):
            assert math.isfinite(row[key]), (key, row)
        assert row["ce"] >= 0 and row["intra"] >= 0 and row["inter"] >= -1e-6 and row["lr"] == 0.01
    # rerunning plans the same id (auto resolves to the same teacher) and trains nothing
    again = farm(student_spec(root), progress=False)
    assert again.trained == [] and again.skipped == [sid]


def test_student_keep_epochs(farmed, data, tmp_path):
    root, tid, _ = farmed
    spec = student_spec(root, recipe_options={"epochs": 3, "keep_epochs": 1, "teacher": tid})
    [task] = plan_tasks(spec, data, data_fingerprint(data))
    sink = ListSink()
    ssd.run_ssd_student(spec.recipe_config().__class__(**task.recipe_config), ctx_for(spec, data, str(root)), sink)
    assert [row[0] for row in sink.rows] == [0, 1, 3]


def test_student_id_depends_on_teacher(two_teachers, farmed, data):
    root2, tid0, tid1 = two_teachers
    _, _, sid_auto = farmed
    fp = data_fingerprint(data)
    [t0] = plan_tasks(student_spec(root2, recipe_options={"teacher": tid0}), data, fp)
    [t1] = plan_tasks(student_spec(root2, recipe_options={"teacher": tid1}), data, fp)
    assert t0.trajectory_id != t1.trajectory_id
    assert t0.trajectory_id == sid_auto  # explicit id == what "auto" resolved to in the one-teacher store
    assert (t0.recipe_config["teacher"], t1.recipe_config["teacher"]) == (tid0, tid1)


def test_two_teachers_make_auto_ambiguous(two_teachers, data):
    root2, tid0, tid1 = two_teachers
    with pytest.raises(ValueError, match=r"2 ssd_teacher trajectories.*--set teacher=<id>") as err:
        plan_tasks(student_spec(root2), data, data_fingerprint(data))
    assert tid0 in str(err.value) and tid1 in str(err.value) and "\n" not in str(err.value)


def test_no_teacher_is_a_clear_error(tmp_path, data):
    with pytest.raises(ValueError, match=r"no ssd_teacher trajectory.*farm one first.*--set teacher=<id>") as err:
        plan_tasks(student_spec(tmp_path / "empty"), data, data_fingerprint(data))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="not in store"):
        plan_tasks(student_spec(tmp_path / "empty", recipe_options={"teacher": "0" * 20}), data,
                   data_fingerprint(data))


def test_split_mismatch_is_a_clear_error(farmed, data):
    root, tid, _ = farmed
    fp = data_fingerprint(data)
    for options in ({"teacher": tid, "split_seed": 1}, {"teacher": tid, "labelled_fraction": 0.2},
                    {"split_seed": 1}):  # explicit teacher, explicit teacher, auto
        with pytest.raises(ValueError, match="split mismatch"):
            plan_tasks(student_spec(root, recipe_options=options), data, fp)
    # the recipe checks again at run time (e.g. when called without the farm)
    spec = student_spec(root)
    cfg = get_recipe("ssd_student").make_config({**STUDENT_OPTS, "teacher": tid, "split_seed": 3})
    with pytest.raises(ValueError, match="split mismatch"):
        ssd.run_ssd_student(cfg, ctx_for(spec, data, str(root)), ListSink())
    with pytest.raises(ValueError, match="not resolved"):
        ssd.run_ssd_student(get_recipe("ssd_student").make_config(STUDENT_OPTS), ctx_for(spec, data, str(root)),
                            ListSink())


def test_teacher_on_other_data_is_rejected(farmed):
    root, tid, _ = farmed
    other = prepare_data(student_spec(root, train_per_class=20))
    with pytest.raises(ValueError, match="other data"):
        plan_tasks(student_spec(root, train_per_class=20, recipe_options={"teacher": tid}), other,
                   data_fingerprint(other))


# ----------------------------------------------------------------------------- only D^l's labels are used
def _corrupt_unlabelled(data, split):
    labels = data.train_labels.copy()
    unl = split.unlabelled.numpy()
    labels[unl] = (labels[unl] + 3) % 10
    return type(data)(data.train_images, labels, data.test_images, data.test_labels, data.info)


def test_teacher_never_reads_unlabelled_labels(data, monkeypatch):
    spec = teacher_spec("unused")
    cfg = spec.recipe_config()
    clean_split = ssd.semi_supervised_split(torch.from_numpy(data.train_labels), cfg.labelled_fraction,
                                            cfg.split_seed)
    # the split itself is the experimental protocol (class-balanced, Sec. 4.1); keep it fixed
    monkeypatch.setattr(ssd, "_split", lambda labels, c: clean_split)
    runs = []
    for d in (data, _corrupt_unlabelled(data, clean_split)):
        sink = ListSink()
        ssd.run_ssd_teacher(cfg, ctx_for(spec, d), sink)
        runs.append(sink.rows)
    assert [r[0] for r in runs[0]] == [0, 2]
    for a, b in zip(*runs):
        assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
        assert repr(a[3]) == repr(b[3])  # same metrics (nan-safe comparison)


def test_student_never_reads_unlabelled_labels(farmed, data, monkeypatch):
    root, tid, _ = farmed
    spec = student_spec(root)
    cfg = get_recipe("ssd_student").make_config({**STUDENT_OPTS, "teacher": tid})
    clean_split = ssd.semi_supervised_split(torch.from_numpy(data.train_labels), 0.1, 0)
    monkeypatch.setattr(ssd, "_split", lambda labels, c: clean_split)
    fp = data_fingerprint(data)
    monkeypatch.setattr(ssd, "_fingerprint", lambda ds: fp)
    runs = []
    for d in (data, _corrupt_unlabelled(data, clean_split)):
        sink = ListSink()
        ssd.run_ssd_student(cfg, ctx_for(spec, d, str(root)), sink)
        runs.append(sink.rows)
    assert [r[0] for r in runs[0]] == [0, 1, 2]
    for a, b in zip(*runs):
        assert torch.equal(a[1], b[1])


def _tiny_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


def test_dual_consistency_loss_uses_only_labelled_labels():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 1, 8, 8, generator=gen)
    y = torch.randint(10, (12,), generator=gen)
    labelled = torch.zeros(12, dtype=torch.bool)
    labelled[[0, 3, 7]] = True
    student, teacher = _tiny_net(0), _tiny_net(1)
    aug = ssd.weak_augment(get_recipe("ssd_teacher").make_config(), flip_ok=True)
    augment = lambda t, g: aug(t, generator=g)  # noqa: E731

    def loss_with(labels):
        loss, parts = ssd.dual_consistency_loss(student, teacher, x, labels, labelled, augment=augment,
                                                generator=torch.Generator().manual_seed(5),
                                                lambda_intra=0.7, lambda_inter=0.3)
        return loss, parts

    corrupted = y.clone()
    corrupted[~labelled] = (y[~labelled] + 1) % 10
    corrupted[5] = -100  # even invalid class ids are never read
    (l1, p1), (l2, p2) = loss_with(y), loss_with(corrupted)
    assert torch.equal(l1, l2)
    assert all(torch.equal(getattr(p1, k), getattr(p2, k)) for k in ("ce", "intra", "inter"))
    assert float(p1.ce) > 0 and float(p1.intra) > 0 and float(p1.inter) > 0
    assert torch.allclose(l1, p1.ce + 0.7 * p1.intra + 0.3 * p1.inter)
    changed = y.clone()
    changed[0] = (y[0] + 1) % 10  # a labelled sample's label does matter
    assert not torch.equal(loss_with(changed)[0], l1)


def test_dual_consistency_terms():
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.randint(10, (6,))
    net = _tiny_net(0)
    g = torch.Generator()
    # no augmentation: the two views coincide (intra = 0); teacher == student: inter = 0
    loss, parts = ssd.dual_consistency_loss(net, net, x, y, torch.tensor([1, 0, 0, 1, 0, 0]).bool(), augment=None,
                                            generator=g, lambda_intra=1.0, lambda_inter=1.0)
    assert abs(float(parts.intra)) < 1e-10 and abs(float(parts.inter)) < 1e-6
    # CE is summed over the labelled samples and divided by the batch size (paper's sums, per batch)
    ce_ref = torch.nn.functional.cross_entropy(net(x)[[0, 3]], y[[0, 3]], reduction="sum") / 6
    assert torch.allclose(parts.ce, ce_ref.detach())
    # everything labelled: no intra term; nothing labelled: no CE
    _, p_all = ssd.dual_consistency_loss(net, _tiny_net(2), x, y, torch.ones(6, dtype=torch.bool), augment=None,
                                         generator=g, lambda_intra=1.0, lambda_inter=1.0)
    _, p_none = ssd.dual_consistency_loss(net, _tiny_net(2), x, y, torch.zeros(6, dtype=torch.bool), augment=None,
                                          generator=g, lambda_intra=1.0, lambda_inter=1.0)
    assert float(p_all.intra) == 0.0 and float(p_none.ce) == 0.0 and float(p_none.inter) > 0

    class OneHotTeacher(nn.Module):  # p_T = one-hot(y): KL(p_T || p_S) = -log p_S[y] = CE
        def forward(self, inp):
            return 200.0 * torch.nn.functional.one_hot(y, 10).float()

    _, p_kl = ssd.dual_consistency_loss(net, OneHotTeacher(), x, y, torch.zeros(6, dtype=torch.bool), augment=None,
                                        generator=g, lambda_intra=1.0, lambda_inter=1.0)
    assert torch.allclose(p_kl.inter, torch.nn.functional.cross_entropy(net(x), y).detach(), atol=1e-5)


# ----------------------------------------------------------------------------- FixMatch
class LogitsNet(nn.Module):
    """Returns its input as logits: inputs [n, 10, 1, 1]; one trainable scale so backward works."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x.flatten(1) * self.scale


def test_fixmatch_mask_respects_threshold():
    gen = torch.Generator().manual_seed(0)
    n_u = 40
    weak = torch.randn(n_u, 10, generator=gen) * torch.linspace(0.1, 6, n_u)[:, None]
    strong = torch.randn(n_u, 10, generator=gen)
    x_l, y_l = torch.randn(4, 10, generator=gen), torch.randint(10, (4,), generator=gen)
    conf, pseudo = torch.softmax(weak, 1).max(1)
    as_img = lambda t: t.view(-1, 10, 1, 1)  # noqa: E731
    for tau in (0.0, 0.5, 0.95, float(conf.median()), 1.0):
        net = LogitsNet()
        loss, parts = ssd.fixmatch_loss(net, as_img(x_l), y_l, as_img(weak), as_img(strong), threshold=tau,
                                        lambda_u=2.0)
        expected_mask = (conf >= tau).float()
        assert torch.equal(parts.mask, expected_mask)
        assert torch.equal(parts.pseudo, pseudo)
        unsup = (torch.nn.functional.cross_entropy(strong, pseudo, reduction="none") * expected_mask).mean()
        ce = torch.nn.functional.cross_entropy(x_l, y_l)
        assert torch.allclose(parts.unsup, unsup) and torch.allclose(loss, ce + 2.0 * unsup)
        loss.backward()  # pseudo-labels are detached: the gradient flows through the strong view only
    assert 0 < float((conf >= conf.median()).float().mean()) < 1  # the median case is a real partial mask


# ----------------------------------------------------------------------------- augmentations
def test_strong_augmentation_is_seeded_and_stronger_than_weak():
    x = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    cfg = get_recipe("ssd_teacher").make_config()
    weak = ssd.weak_augment(cfg, flip_ok=True)
    strong = ssd.StrongAugment(weak, x.amin(dim=(0, 2, 3)), num_ops=2, cutout=0.5)
    a = strong(x, torch.Generator().manual_seed(3))
    b = strong(x, torch.Generator().manual_seed(3))
    w = weak(x, generator=torch.Generator().manual_seed(3))
    assert a.shape == x.shape and torch.equal(a, b)
    assert not torch.equal(a, strong(x, torch.Generator().manual_seed(4)))
    assert (a - x).abs().mean() > (w - x).abs().mean()
    for op in ssd.StrongAugment.OPS[1:]:  # every op keeps the shape and changes something at magnitude 1
        out = getattr(strong, "_" + op)(x[:4], torch.ones(4))
        assert out.shape == x[:4].shape and not torch.equal(out, x[:4]), op
    assert ssd.weak_augment(cfg, flip_ok=False).config.strategy == "crop"
    assert ssd.weak_augment(get_recipe("ssd_teacher").make_config({"dsa": False}), flip_ok=True) is None
