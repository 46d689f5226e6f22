"""Tests for the Arrow trajectory store (raydd.store)."""

from __future__ import annotations

import math
import multiprocessing
import os
import shutil
import warnings

import pyarrow as pa
import pytest
import torch

from raydd.store import (
    CorruptTrajectoryError,
    CorruptTrajectoryWarning,
    TrajectoryNotFoundError,
    TrajectoryStore,
    UnknownEpochError,
    trajectory_id,
)
from raydd.store.cli import format_info, format_ls, format_verify

PARAM_LAYOUT = [("conv.weight", [4, 3, 3, 3]), ("conv.bias", [4]), ("fc.weight", [10, 4]), ("fc.bias", [10])]
NUM_PARAMS = 4 * 27 + 4 + 40 + 10
BUFFER_LAYOUT = [("bn.running_mean", [4]), ("bn.running_var", [4])]
METRICS = ["train_loss", "train_acc", "test_loss", "test_acc"]
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def make_id(**payload) -> str:
    base = {"recipe": "mtt", "recipe_config": {"lr": 0.01}, "model": {"name": "convnet"},
            "dataset": {"name": "mnist"}, "seed": 0}
    return trajectory_id({**base, **payload})


def write(store, tid=None, *, epochs=range(4), dtype="float32", kind="expert", recipe="mtt",
          dataset="mnist", model="convnet", buffers=False, seed=0, extra=None):
    """Write a trajectory of random params; returns (info, {epoch: params})."""
    tid = tid or make_id(kind=kind, recipe=recipe, dataset=dataset, model=model, seed=seed, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    written = {}
    w = store.writer(trajectory_id=tid, kind=kind, recipe=recipe, recipe_config={"lr": 0.01, "epochs": 4},
                     seed=seed, model={"name": model, "width": 4}, param_layout=PARAM_LAYOUT,
                     buffer_layout=BUFFER_LAYOUT if buffers else (), dtype=dtype,
                     dataset={"name": dataset, "fingerprint": "abc"}, metric_names=METRICS, extra=extra)
    for e in epochs:
        p = torch.randn(NUM_PARAMS, generator=gen).to(getattr(torch, dtype))
        b = torch.rand(8, generator=gen) if buffers else None
        w.append(e, p, buffers=b, metrics={"train_loss": 1.0 / (e + 1), "test_acc": 0.1 * e})
        written[e] = (p.clone(), None if b is None else b.clone())
    return w.commit(), written


@pytest.fixture
def store(tmp_path):
    return TrajectoryStore(tmp_path / "store")


def one_file(store):
    (info,) = store.list()
    return info.path


# --- ids and round trips ----------------------------------------------------------
def test_trajectory_id_is_canonical():
    a = trajectory_id({"seed": 1, "recipe": "mtt", "recipe_config": {"b": 2, "a": 1}})
    b = trajectory_id({"recipe_config": {"a": 1, "b": 2}, "recipe": "mtt", "seed": 1})
    assert a == b and len(a) == 20 and int(a, 16) >= 0
    assert a != trajectory_id({"seed": 2, "recipe": "mtt", "recipe_config": {"b": 2, "a": 1}})


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip_is_bit_exact(store, dtype):
    info, written = write(store, dtype=dtype)
    tdt = getattr(torch, dtype)
    assert info.dtype == dtype and info.num_params == NUM_PARAMS and info.epochs == [0, 1, 2, 3]
    with store.open(info.trajectory_id) as traj:
        for epoch, (params, _) in written.items():
            got = traj.params(epoch)
            assert got.dtype == tdt and got.shape == (NUM_PARAMS,)
            assert torch.equal(got.view(BITS[tdt]), params.view(BITS[tdt]))
            assert torch.equal(traj.params(epoch, verify=True).view(BITS[tdt]), params.view(BITS[tdt]))
            assert traj.params(epoch, dtype=torch.float64).dtype == torch.float64
        state = traj.state_dict(2)
        assert list(state) == [name for name, _ in PARAM_LAYOUT]
        assert state["conv.weight"].shape == (4, 3, 3, 3) and state["fc.bias"].shape == (10,)
        assert torch.equal(state["fc.bias"].view(BITS[tdt]), written[2][0][-10:].view(BITS[tdt]))


def test_params_are_cast_to_store_dtype(store):
    tid = make_id(cast=True)
    p = torch.randn(NUM_PARAMS, dtype=torch.float64)
    with store.writer(trajectory_id=tid, kind="expert", recipe="mtt", recipe_config={}, seed=0,
                      model={"name": "convnet"}, param_layout=PARAM_LAYOUT, dtype=torch.float16,
                      dataset={"name": "mnist"}) as w:
        w.append(0, p)
    with store.open(tid) as traj:
        assert torch.equal(traj.params(0).view(torch.int16), p.half().view(torch.int16))


def test_buffers_round_trip(store):
    info, written = write(store, buffers=True)
    with store.open(info.trajectory_id) as traj:
        for epoch, (_, buffers) in written.items():
            assert torch.equal(traj.buffers(epoch).view(torch.int32), buffers.view(torch.int32))
        state = traj.state_dict(1)
        assert state["bn.running_var"].shape == (4,)
        assert torch.equal(state["bn.running_var"], written[1][1][4:])
    info2, _ = write(store, kind="teacher", buffers=False)
    with store.open(info2.trajectory_id) as traj:
        assert traj.buffers(0) is None


def test_metadata_round_trip(store):
    info, _ = write(store, extra={"note": "hello", "farm": {"run": 3}})
    with store.open(info.trajectory_id) as traj:
        meta = traj.meta
        assert meta["trajectory_id"] == info.trajectory_id and meta["kind"] == "expert"
        assert meta["recipe"] == "mtt" and meta["recipe_config"] == {"lr": 0.01, "epochs": 4}
        assert meta["seed"] == 0 and meta["model"] == {"name": "convnet", "width": 4}
        assert meta["param_layout"] == [[n, s] for n, s in PARAM_LAYOUT]
        assert meta["buffer_layout"] == [] and meta["dtype"] == "float32"
        assert meta["dataset"] == {"name": "mnist", "fingerprint": "abc"}
        assert meta["metric_names"] == METRICS
        assert set(meta["versions"]) == {"raydd", "torch", "pyarrow", "python"}
        assert meta["created_at"] and meta["host"] and meta["format_version"] == 1
        assert meta["note"] == "hello" and meta["farm"] == {"run": 3}
        assert traj.info.num_snapshots == 4 and traj.info.wall_time_s >= 0
        assert traj.epochs == [0, 1, 2, 3]
        rows = traj.metrics()
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    assert rows[2]["train_loss"] == pytest.approx(1 / 3) and rows[3]["test_acc"] == pytest.approx(0.3)
    assert math.isnan(rows[0]["train_acc"])  # metrics not given are NaN
    assert info.final_metrics["test_acc"] == pytest.approx(0.3)


def test_explicit_wall_time_and_commit_info(store):
    w = store.writer(trajectory_id="abc123", kind="observer", recipe="edc", recipe_config={}, seed=1,
                     model={"name": "resnet"}, param_layout=PARAM_LAYOUT, dataset={"name": "cifar10"})
    w.append(7, torch.zeros(NUM_PARAMS))
    info = w.commit(wall_time_s=12.5)
    assert info.wall_time_s == 12.5 and info.num_snapshots == 1 and info.epochs == [7]
    assert info.path == store.path_for("abc123")
    assert info.path.endswith(os.path.join("cifar10", "resnet", "observer", "abc123.arrow"))
    assert store.list()[0].wall_time_s == 12.5 and store.exists("abc123")


def test_zero_copy_read(store):
    info, written = write(store)
    with store.open(info.trajectory_id) as traj:
        traj.params(1)  # warm up lazily initialised Arrow state
        before = pa.total_allocated_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "non-writable tensor" warning either
            t = traj.params(1)
        assert pa.total_allocated_bytes() == before
        with open("/proc/self/maps") as f:  # the tensor's memory is a mapping of the file itself
            maps = [line.split() for line in f]
        ptr = t.data_ptr()
        owners = [m[-1] for m in maps if len(m) >= 6 and int(m[0].split("-")[0], 16) <= ptr < int(m[0].split("-")[1], 16)]
        assert owners == [os.path.realpath(info.path)]
        t.add_(1.0)  # private copy-on-write: neither the file nor later reads change
        assert torch.equal(traj.params(1), written[1][0])
    with store.open(info.trajectory_id) as traj:
        assert torch.equal(traj.params(1), written[1][0])
    assert torch.equal(t, written[1][0] + 1.0)  # still valid after close


# --- errors and corruption ---------------------------------------------------------
def test_unknown_epoch_and_unknown_id(store):
    info, _ = write(store, epochs=[0, 2, 4])
    with store.open(info.trajectory_id) as traj:
        with pytest.raises(UnknownEpochError, match=r"epoch 3 .*stored epochs: \[0, 2, 4\]") as err:
            traj.params(3)
        assert isinstance(err.value, KeyError) and str(err.value).startswith("epoch 3 is not stored")
    with pytest.raises(TrajectoryNotFoundError, match="nope"):
        store.open("nope")
    assert issubclass(TrajectoryNotFoundError, KeyError) and not store.exists("nope")


@pytest.mark.parametrize("keep", [0, 7, 0.5, -1])
def test_truncated_file_is_rejected(store, keep):
    info, _ = write(store)
    data = open(info.path, "rb").read()
    n = int(len(data) * keep) if isinstance(keep, float) else (keep % len(data) if keep < 0 else keep)
    with open(info.path, "wb") as f:
        f.write(data[:n])
    with pytest.raises(CorruptTrajectoryError):
        store.open(info.trajectory_id)
    assert not store.exists(info.trajectory_id)
    with pytest.warns(CorruptTrajectoryWarning, match=info.trajectory_id):
        assert store.list() == []
    (result,) = store.verify()
    assert not result.ok and result.path == info.path and result.reason
    text, code = format_verify(store)
    assert code == 1 and "FAIL" in text


def test_bit_flip_detected_by_crc(store):
    info, written = write(store)
    data = bytearray(open(info.path, "rb").read())
    where = data.find(written[2][0].numpy().tobytes())
    assert where > 0
    data[where + 17] ^= 0x40
    with open(info.path, "wb") as f:
        f.write(data)
    with store.open(info.trajectory_id) as traj:  # the footer is intact
        traj.params(1)  # healthy snapshots of the file are still handed out
        traj.params(2, verify=False)  # only an explicitly unverified read returns the damaged bytes
        with pytest.raises(CorruptTrajectoryError, match=f"{info.path}: epoch 2: params crc32 mismatch"):
            traj.params(2)  # every read is verified (issue 14: a corrupt snapshot never reaches a method)
    (result,) = store.verify()
    assert not result.ok and "crc32" in result.reason and "epoch 2" in result.reason


def test_abort_and_exception_publish_nothing(store):
    kwargs = dict(kind="expert", recipe="mtt", recipe_config={}, seed=0, model={"name": "convnet"},
                  param_layout=PARAM_LAYOUT, dataset={"name": "mnist"})
    with pytest.raises(RuntimeError, match="boom"):
        with store.writer(trajectory_id="crashed", **kwargs) as w:
            w.append(0, torch.zeros(NUM_PARAMS))
            w.append(1, torch.zeros(NUM_PARAMS))
            raise RuntimeError("boom")
    w = store.writer(trajectory_id="aborted", **kwargs)
    w.append(0, torch.zeros(NUM_PARAMS))
    w.abort()
    with pytest.raises(RuntimeError, match="aborted"):
        w.append(1, torch.zeros(NUM_PARAMS))
    with pytest.raises(ValueError, match="no snapshots"):
        store.writer(trajectory_id="empty", **kwargs).commit()
    root = store.root
    assert [files for _, _, files in os.walk(root) if files] == []
    assert store.list() == [] and store.verify() == []


def test_writer_validates_inputs(store):
    w = store.writer(trajectory_id="v", kind="expert", recipe="mtt", recipe_config={}, seed=0,
                     model={"name": "convnet"}, param_layout=PARAM_LAYOUT, buffer_layout=BUFFER_LAYOUT,
                     dataset={"name": "mnist"}, metric_names=["test_acc"])
    with pytest.raises(ValueError, match="elements"):
        w.append(0, torch.zeros(NUM_PARAMS + 1), buffers=torch.zeros(8))
    with pytest.raises(ValueError, match="buffers"):
        w.append(0, torch.zeros(NUM_PARAMS))
    with pytest.raises(ValueError, match="unknown metrics"):
        w.append(0, torch.zeros(NUM_PARAMS), buffers=torch.zeros(8), metrics={"bogus": 1.0})
    w.append(3, torch.zeros(NUM_PARAMS), buffers=torch.zeros(8))
    with pytest.raises(ValueError, match="increase"):
        w.append(3, torch.zeros(NUM_PARAMS), buffers=torch.zeros(8))
    w.abort()
    with pytest.raises(ValueError, match="name"):
        store.writer(trajectory_id="v", kind="expert", recipe="mtt", recipe_config={}, seed=0, model={},
                     param_layout=PARAM_LAYOUT, dataset={"name": "mnist"})
    with pytest.raises(ValueError, match="invalid trajectory id"):
        store.writer(trajectory_id="../x", kind="expert", recipe="mtt", recipe_config={}, seed=0,
                     model={"name": "m"}, param_layout=PARAM_LAYOUT, dataset={"name": "mnist"})


def test_stale_temp_files_reported(store):
    info, _ = write(store)
    temp = os.path.join(os.path.dirname(info.path), f".{info.trajectory_id}.deadbeef.arrow.partial")
    with open(temp, "wb") as f:
        f.write(b"half a file")
    assert [i.path for i in store.list()] == [info.path]  # temp files are invisible to readers
    fresh = {r.path: r for r in store.verify()}
    assert fresh[temp].ok and "in progress" in fresh[temp].reason
    os.utime(temp, (1_000_000, 1_000_000))
    stale = {r.path: r for r in store.verify()}
    # a dead writer's leftover is a warning, not a failure: the published files are complete (issue 14)
    assert stale[temp].ok and stale[temp].warning and "dead writer" in stale[temp].reason and stale[info.path].ok
    assert store.gc() == [temp] and not os.path.exists(temp) and os.path.exists(info.path)
    text, code = format_verify(store)
    assert code == 0 and "WARN" not in text


def test_same_id_commit_overwrites(store):
    info1, _ = write(store, seed=5)
    info2, written = write(store, seed=5)
    assert info1.path == info2.path and len(store.list()) == 1
    assert all(r.ok for r in store.verify())


# --- concurrency -----------------------------------------------------------------
def _write_in_subprocess(root: str, tid: str, seed: int) -> None:
    store = TrajectoryStore(root)
    with store.writer(trajectory_id=tid, kind="expert", recipe="mtt", recipe_config={"seed": seed}, seed=seed,
                      model={"name": "convnet"}, param_layout=PARAM_LAYOUT, dataset={"name": "mnist"},
                      metric_names=["test_acc"]) as w:
        for epoch in range(20):
            w.append(epoch, torch.full((NUM_PARAMS,), float(seed)), metrics={"test_acc": epoch / 20})


def test_concurrent_writers(tmp_path):
    root = str(tmp_path / "store")
    jobs = [(f"distinct{i}", i) for i in range(4)] + [("shared", 7), ("shared", 7)]
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_in_subprocess, args=(root, tid, seed)) for tid, seed in jobs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    store = TrajectoryStore(root)
    infos = store.list()
    assert sorted(i.trajectory_id for i in infos) == ["distinct0", "distinct1", "distinct2", "distinct3", "shared"]
    assert all(i.num_snapshots == 20 for i in infos)
    results = store.verify()
    assert len(results) == 5 and all(r.ok for r in results)  # no temp files left behind
    with store.open("shared") as traj:
        assert torch.equal(traj.params(19), torch.full((NUM_PARAMS,), 7.0))


# --- catalogue ------------------------------------------------------------------
def test_list_filters(store):
    write(store, kind="expert", dataset="mnist")
    write(store, kind="expert", dataset="cifar10")
    write(store, kind="teacher", recipe="ssd", dataset="cifar10")
    write(store, kind="observer", recipe="edc", model="resnet18", dataset="cifar10")
    assert len(store.list()) == 4
    assert {i.dataset_name for i in store.list(kind="expert")} == {"mnist", "cifar10"}
    assert [i.kind for i in store.list(dataset="cifar10", recipe="ssd")] == ["teacher"]
    assert [i.model_name for i in store.list(model="resnet18")] == ["resnet18"]
    assert store.list(dataset="imagenet") == [] and store.list(recipe="nope") == []


def test_file_uri_root(tmp_path):
    store = TrajectoryStore(f"file://{tmp_path}/store")
    info, written = write(store)
    assert store.exists(info.trajectory_id)
    with store.open(info.trajectory_id) as traj:
        assert torch.equal(traj.params(3), written[3][0])


# --- CLI text -------------------------------------------------------------------
def test_cli_formats(store):
    info, _ = write(store, kind="expert")
    write(store, kind="teacher", recipe="ssd", dtype="bfloat16")
    text = format_ls(store)
    lines = text.splitlines()
    assert lines[0].split() == ["id", "dataset", "model", "kind", "recipe", "snapshots", "dtype", "size_MiB",
                                "test_acc_%", "wall_s", "status"]  # accuracy in percent, as the farm's table
    row = next(line.split() for line in lines if line.startswith(info.trajectory_id))
    assert row[1:7] == ["mnist", "convnet", "expert", "mtt", "4", "float32"] and row[8] == "30.00"
    assert row[10] == "ok"
    assert lines[-1] == "2 trajectories"
    assert len(format_ls(store, kind="teacher").splitlines()) == 3
    assert "no trajectories" in format_ls(store, kind="student")

    info_text = format_info(store, info.trajectory_id)
    assert info.trajectory_id in info_text and '"recipe_config"' in info_text and '"lr": 0.01' in info_text
    table = info_text.split("metrics:\n")[1].splitlines()
    assert table[0].split() == ["epoch", *METRICS]
    assert table[3].split() == ["2", "0.3333", "-", "-", "0.2000"]

    text, code = format_verify(store)
    assert code == 0 and text.count("OK") == 2 and "2 files checked, 0 problems" in text
    shutil.copyfile(info.path, info.path + ".bak")  # not a trajectory name: ignored
    with open(info.path, "r+b") as f:
        f.truncate(100)
    text, code = format_verify(store)
    assert code == 1 and f"FAIL  {info.path}" in text and "1 problem " in text
