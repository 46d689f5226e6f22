"""The trajectory farm end to end on real offline data (scikit-learn digits)."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from raydd.farm import FarmSpec, farm
from raydd.farm.ray_pool import FarmResourceError
from raydd.store import TrajectoryStore

TINY = dict(dataset="digits", recipe="expert", recipe_options={"epochs": 3, "batch_size": 128},
            model={"width": 16}, train_per_class=40, trajectories=4, workers=2)


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.fixture(scope="module")
def farmed(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("farm") / "store"
    spec = FarmSpec(store=str(root), **TINY)
    report = farm(spec, progress=False)
    return spec, report


def test_farm_writes_every_trajectory(farmed):
    spec, report = farmed
    assert len(report.trajectory_ids) == 4 and len(set(report.trajectory_ids)) == 4
    assert len(report.trained) == 4 and report.skipped == []
    store = TrajectoryStore(spec.store)
    infos = store.list(dataset="digits", kind="expert")
    assert sorted(i.trajectory_id for i in infos) == sorted(report.trajectory_ids)
    for info in infos:
        assert info.epochs == [0, 1, 2, 3]
        traj = store.open(info.trajectory_id)
        assert traj.meta["recipe_config"]["epochs"] == 3 and traj.meta["recipe_config"]["lr"] == 0.01
        assert traj.meta["model"]["width"] == 16
        assert traj.params(0).shape == traj.params(3).shape
        assert not torch.equal(traj.params(0), traj.params(3))  # it trained
    assert all(r.ok for r in store.verify())
    assert {r.seed for r in report.trained} == {0, 1, 2, 3}
    assert "trajectory" in report.table() and "test_acc" in report.table()


def test_rerun_trains_nothing(farmed):
    spec, first = farmed
    before = {p: p.stat().st_mtime_ns for p in _files(Path(spec.store))}
    again = farm(spec, progress=False)
    assert again.trained == []
    assert sorted(again.skipped) == sorted(first.trajectory_ids)
    assert again.trajectory_ids == first.trajectory_ids
    assert {p: p.stat().st_mtime_ns for p in _files(Path(spec.store))} == before


def test_killed_worker_is_retried_and_store_stays_valid(ray_session, tmp_path):
    root = tmp_path / "store"
    epochs = 60
    spec = FarmSpec(store=str(root), **{**TINY, "trajectories": 3, "train_per_class": 100,
                                        "recipe_options": {"epochs": epochs, "batch_size": 128}})
    killed: list[int] = []
    partial_at_kill: list[str] = []

    def kill_once(event):
        # Progress events reach the driver through a queue polled every 0.2 s, so an event can arrive after
        # its trajectory was published. Kill only a worker whose trajectory is still being written (its
        # temp file is there) and has many epochs left, so the kill lands mid-trajectory.
        if event["type"] != "epoch" or killed or event["pid"] == os.getpid() or event["epoch"] > epochs // 3:
            return
        partial = [p.name for p in _files(root) if p.name.startswith(f".{event['trajectory_id']}.")]
        if partial:
            partial_at_kill.extend(partial)
            killed.append(event["pid"])
            os.kill(event["pid"], signal.SIGKILL)  # a worker process this test's farm started

    report = farm(spec, progress=False, on_event=kill_once)
    assert killed, "the fault was never injected"
    assert partial_at_kill, "the worker was killed outside a trajectory: nothing partial to clean up"
    assert len(report.trained) == 3
    assert max(r.attempts for r in report.trained) == 2
    store = TrajectoryStore(str(root))
    results = store.verify()
    assert len(results) == 3 and all(r.ok for r in results), results
    assert [p.name for p in _files(root) if not p.name.endswith(".arrow")] == []  # no partial left behind
    for tid in report.trajectory_ids:
        assert store.open(tid).epochs == list(range(epochs + 1))


def test_local_backend_matches_ray(farmed, tmp_path):
    spec, report = farmed
    local = FarmSpec.from_dict({**spec.to_dict(), "store": str(tmp_path / "local"), "backend": "local",
                                "trajectories": 1})
    out = farm(local, progress=False)
    assert out.trajectory_ids == report.trajectory_ids[:1]  # same config + seed -> same id
    a = TrajectoryStore(spec.store).open(out.trajectory_ids[0])
    b = TrajectoryStore(local.store).open(out.trajectory_ids[0])
    torch.testing.assert_close(a.params(3), b.params(3), rtol=1e-4, atol=1e-5)


def _same_trajectories(store_a: str, store_b: str, ids: list[str], epochs: list[int]) -> None:
    a, b = TrajectoryStore(store_a), TrajectoryStore(store_b)
    for tid in ids:
        ta, tb = a.open(tid), b.open(tid)
        assert ta.epochs == tb.epochs
        for epoch in epochs:
            torch.testing.assert_close(ta.params(epoch), tb.params(epoch), rtol=1e-4, atol=1e-5)
        assert "trained_together" not in ta.meta and tb.meta["trained_together"] > 1


def test_packed_workers_write_the_same_trajectories(farmed, tmp_path):
    """pack=2 on Ray (two packs on one worker) and pack=3 locally (a pack of 3, then one alone): the same
    ids and, to float tolerance, the same snapshots as one trajectory at a time."""
    spec, report = farmed
    ray_packed = FarmSpec.from_dict({**spec.to_dict(), "store": str(tmp_path / "ray"), "pack": 2, "workers": 1})
    out = farm(ray_packed, progress=False)
    assert out.trajectory_ids == report.trajectory_ids and len(out.trained) == 4
    _same_trajectories(spec.store, ray_packed.store, report.trajectory_ids, [0, 1, 3])
    local_packed = FarmSpec.from_dict({**spec.to_dict(), "store": str(tmp_path / "local"), "pack": 3,
                                       "backend": "local"})
    events = []
    out = farm(local_packed, progress=False, on_event=events.append)
    assert out.trajectory_ids == report.trajectory_ids
    assert {e["trajectory_id"] for e in events if e["type"] == "epoch"} == set(report.trajectory_ids)
    _same_trajectories(spec.store, local_packed.store, report.trajectory_ids[:3], [0, 3])


def test_packed_pretrain_keeps_each_experts_cutmix(tmp_path):
    """The pretrain recipe draws CutMix per network from its own generator: packed = one at a time."""
    base = dict(TINY, recipe="pretrain", recipe_options={"epochs": 2, "batch_size": 64, "cutmix_prob": 0.5},
                trajectories=2, backend="local")
    one = farm(FarmSpec(store=str(tmp_path / "one"), **base), progress=False)
    two = farm(FarmSpec(store=str(tmp_path / "two"), **{**base, "pack": 2}), progress=False)
    assert one.trajectory_ids == two.trajectory_ids
    a, b = TrajectoryStore(str(tmp_path / "one")), TrajectoryStore(str(tmp_path / "two"))
    for tid in one.trajectory_ids:
        torch.testing.assert_close(a.open(tid).params(2), b.open(tid).params(2), rtol=1e-4, atol=1e-5)


def _scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_farm_writes_expert_curves_for_tensorboard(farmed, tmp_path):
    from raydd.cli import main

    spec, report = farmed
    logdir = tmp_path / "tb"
    again = farm(FarmSpec.from_dict({**spec.to_dict(), "tensorboard": str(logdir)}), progress=False)
    assert again.trained == []  # stored ones get their curves too, nothing is retrained
    runs = sorted(p.parent for p in logdir.rglob("events.out.tfevents.*"))
    assert [r.name for r in runs] == sorted(report.trajectory_ids)
    store = TrajectoryStore(spec.store)
    for run in runs:
        scalars = _scalars(run)
        expected = [m for m in store.open(run.name).metrics() if m["test_acc"] == m["test_acc"]]  # not NaN
        assert [step for step, _ in scalars["test_acc"]] == [m["epoch"] for m in expected] == [1, 2, 3]
        assert [v for _, v in scalars["test_acc"]] == pytest.approx([m["test_acc"] for m in expected], abs=1e-6)
    # the same from the CLI for the whole store; a second call keeps what is there
    assert main(["store", "tensorboard", spec.store, str(tmp_path / "cli")]) == 0
    assert len(list((tmp_path / "cli").rglob("events.out.tfevents.*"))) == 4
    assert main(["store", "tensorboard", spec.store, str(tmp_path / "cli")]) == 0
    assert len(list((tmp_path / "cli").rglob("events.out.tfevents.*"))) == 4
    with pytest.raises(ValueError, match="tensorboard='s3://b/tb' is invalid"):
        FarmSpec.from_dict({**spec.to_dict(), "tensorboard": "s3://b/tb"})


@pytest.mark.parametrize("change, message", [
    ({"dataset": "imagenet-42"}, "unknown dataset 'imagenet-42'"),
    ({"model": {"arch": "vgg99"}}, "unknown model arch 'vgg99'"),
    ({"recipe": "distill"}, "unknown recipe 'distill'"),
    ({"recipe_options": {"epochs": 0}}, "epochs=0 is invalid"),
    ({"recipe_options": {"epochz": 3}}, "unknown expert recipe option(s) ['epochz']"),
    ({"dataset": "mnist", "data_root": "/nonexistent/raydd-data"}, "data_root='/nonexistent/raydd-data' does not exist"),
    ({"trajectories": 0}, "trajectories=0 is invalid"),
    ({"dtype": "int8"}, "dtype='int8' is invalid"),
    ({"pack": 0}, "pack=0 is invalid"),
    ({"recipe": "ssd_teacher", "pack": 2}, "pack=2 is invalid for recipe 'ssd_teacher'"),
])
def test_bad_spec_is_refused_before_any_work(tmp_path, change, message):
    with pytest.raises(ValueError) as err:
        FarmSpec(store=str(tmp_path / "store"), **{**TINY, **change})
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "store").exists()


def test_missing_dataset_files_name_the_place_looked(tmp_path):
    from raydd.data.datasets import DataNotFoundError

    spec = FarmSpec(store=str(tmp_path / "store"), **{**TINY, "dataset": "fashion_mnist",
                                                       "data_root": str(tmp_path)})
    with pytest.raises(DataNotFoundError) as err:
        farm(spec, progress=False)
    assert str(tmp_path) in str(err.value) and "--download" in str(err.value)
    assert not (tmp_path / "store").exists()


def test_gpus_on_cpu_cluster_fail_fast(ray_session, tmp_path):
    spec = FarmSpec(store=str(tmp_path / "store"), **{**TINY, "gpus_per_worker": 0.25})
    with pytest.raises(FarmResourceError, match=r"gpus_per_worker=0.25 but the Ray cluster has 0 GPU"):
        farm(spec, progress=False)
    assert not (tmp_path / "store").exists()
