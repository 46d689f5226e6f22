"""Prefix-exact farming: an expert of E epochs is the first E epochs of a longer one; a need is served by a longer
stored trajectory, and a stored one is extended instead of trained again (the local backend, no Ray)."""
from __future__ import annotations

import pytest
import torch

from raydd.farm import FarmSpec, farm
from raydd.store import CorruptTrajectoryError, TrajectoryStore

pytestmark = pytest.mark.usefixtures("single_thread")


def _spec(root, epochs: int, **extra) -> FarmSpec:
    options = {"epochs": epochs, "batch_size": 64, **extra.pop("options", {})}
    return FarmSpec(store=str(root), dataset="digits", backend="local", trajectories=extra.pop("trajectories", 2),
                    recipe=extra.pop("recipe", "expert"), recipe_options=options,
                    model={"width": 8, "depth": 2}, train_per_class=40, **extra)


def _snapshots(store: TrajectoryStore, tid: str) -> list[tuple]:
    with store.open(tid) as traj:
        return [(row["epoch"], traj.params(row["epoch"]).clone(),
                 None if traj.buffers(row["epoch"]) is None else traj.buffers(row["epoch"]).clone(),
                 {k: v for k, v in row.items() if k != "epoch"}) for row in traj.metrics()]


def _same(a: list[tuple], b: list[tuple]) -> None:
    assert [s[0] for s in a] == [s[0] for s in b]
    for (_, pa, ba, ma), (_, pb, bb, mb) in zip(a, b):
        assert torch.equal(pa, pb)
        assert (ba is None and bb is None) or torch.equal(ba, bb)
        assert ma.keys() == mb.keys()
        assert all(ma[k] == mb[k] or (ma[k] != ma[k] and mb[k] != mb[k]) for k in ma)  # NaN where not measured


@pytest.fixture(scope="module")
def long_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("long") / "store"
    report = farm(_spec(root, 12), progress=False)
    return TrajectoryStore(root), report.trajectory_ids


def test_a_short_expert_is_the_first_epochs_of_a_long_one(tmp_path, long_store):
    store, long_ids = long_store
    short = farm(_spec(tmp_path / "short", 5), progress=False)
    short_store = TrajectoryStore(tmp_path / "short")
    for sid, lid in zip(short.trajectory_ids, long_ids):
        _same(_snapshots(short_store, sid), _snapshots(store, lid)[:6])


@pytest.mark.parametrize("pack", [1, 2])
def test_extending_a_stored_expert_equals_training_the_longer_one(tmp_path, long_store, pack):
    store, long_ids = long_store
    if pack > 1:  # packed networks round like packed networks (tests/test_farm.py): compare with a packed run
        farm(_spec(tmp_path / "packed", 12, pack=pack), progress=False)
        store = TrajectoryStore(tmp_path / "packed")
    farm(_spec(tmp_path / "s", 5, pack=pack), progress=False)
    report = farm(_spec(tmp_path / "s", 12, pack=pack), progress=False)
    assert report.trajectory_ids == long_ids  # the longer run's own ids
    assert sorted(report.extended) == sorted(long_ids) and len(report.trained) == 2
    extended = TrajectoryStore(tmp_path / "s")
    for lid in long_ids:
        _same(_snapshots(extended, lid), _snapshots(store, lid))
        with extended.open(lid) as traj:
            assert traj.meta["extended_from"] and traj.info.resumable


def test_a_longer_stored_expert_serves_a_shorter_need(long_store):
    store, long_ids = long_store
    report = farm(_spec(store.root, 5), progress=False)
    assert report.trained == [] and sorted(report.served.values()) == sorted(long_ids)
    assert report.trajectory_ids == long_ids  # what the farm hands on are the stored trajectories


def test_readers_see_one_trajectory_per_training_run(tmp_path, digits):
    from raydd.methods import MTT, make_config

    root = tmp_path / "both"
    farm(_spec(root, 5, trajectories=1), progress=False)
    farm(_spec(root, 8, trajectories=1), progress=False)  # extends it: the 5-epoch file stays too
    store = TrajectoryStore(root)
    assert len(store.list(kind="expert")) == 2
    train, _ = digits
    method = MTT(make_config("mtt", "digits", 1, syn_steps=2, expert_epochs=2, max_start_epoch=6), train, store,
                 device="cpu")
    assert len(method.experts) == 1 and max(method.experts[0].starts) == 5  # the 8-epoch one


def test_a_schedule_that_depends_on_the_length_is_trained_whole(tmp_path):
    root = tmp_path / "pretrain"
    farm(_spec(root, 3, recipe="pretrain", trajectories=1), progress=False)
    report = farm(_spec(root, 6, recipe="pretrain", trajectories=1), progress=False)
    assert report.extended == [] and report.served == {} and len(report.trained) == 1
    with TrajectoryStore(root).open(report.trajectory_ids[0]) as traj:
        assert not traj.info.resumable


def test_the_graph_engine_extends_to_the_same_trajectory(tmp_path, long_store):
    store, long_ids = long_store
    farm(_spec(tmp_path / "g", 5, engine="graph"), progress=False)
    report = farm(_spec(tmp_path / "g", 12, engine="graph"), progress=False)
    assert sorted(report.extended) == sorted(long_ids)
    for lid in long_ids:  # digits is one-channel: equal to rounding (tests/test_graphs.py says why)
        for (ea, pa, _, _), (eb, pb, _, _) in zip(_snapshots(TrajectoryStore(tmp_path / "g"), lid),
                                                  _snapshots(store, lid)):
            assert ea == eb
            torch.testing.assert_close(pa, pb, rtol=1e-3, atol=1e-4)


def test_a_damaged_resume_state_is_reported(tmp_path):
    import base64

    import pyarrow as pa
    import pyarrow.ipc as ipc

    root = tmp_path / "bad"
    report = farm(_spec(root, 2, trajectories=1), progress=False)
    store = TrajectoryStore(root)
    path = store.open(report.trajectory_ids[0]).info.path
    with open(path, "rb") as f:
        reader = ipc.open_file(pa.BufferReader(f.read()))
    batches = [reader.get_batch_with_custom_metadata(i) for i in range(reader.num_record_batches)]
    schema = reader.schema
    last, md = batches[-1]
    md = {k.decode(): v.decode() for k, v in md.items()}
    blob = bytearray(base64.b64decode(md["resume_state"]))
    blob[-1] ^= 0xFF
    md["resume_state"] = base64.b64encode(bytes(blob)).decode()
    with pa.OSFile(path, "wb") as sink, ipc.new_file(sink, schema) as out:
        for batch, m in batches[:-1]:
            out.write_batch(batch, custom_metadata=m)
        out.write_batch(last, custom_metadata=md)
    with pytest.raises(CorruptTrajectoryError, match="resume state crc32 mismatch"):
        TrajectoryStore(root).open(report.trajectory_ids[0]).resume_state()
