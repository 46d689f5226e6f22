"""Losing a node in the middle of a farm, on a three-node Ray cluster (``three_node_cluster.py``, its own
process): every trajectory is trained once — the lost node's by a worker that remains — and the store verifies
clean. The farm runs as the user runs it, ``raydd farm --address``."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import S3_CREDENTIALS, checkpointed, moto_s3

HERE = Path(__file__).parent


def _raydd(*args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.Popen([sys.executable, "-m", "raydd.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


@pytest.fixture(scope="module")
def cluster():
    """The three-node cluster process, shared by this module's tests (its nodes carry the moto credentials, as a
    cluster's nodes would carry real ones)."""
    pytest.importorskip("ray")
    env = {**{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "AWS_PROFILE")}, **S3_CREDENTIALS}
    proc = subprocess.Popen([sys.executable, str(HERE / "three_node_cluster.py")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    address = proc.stdout.readline().strip()
    assert address, "the cluster did not start"
    try:
        yield proc, address, []  # the third: nodes removed and not yet replaced
    finally:
        proc.stdin.write("quit\n")
        proc.stdin.close()
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait(timeout=60)


def _tell(proc: subprocess.Popen, order: str, answer: str) -> None:
    proc.stdin.write(order + "\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == answer


@pytest.fixture
def three_nodes(cluster):
    """(address, remove_node) of the cluster with three nodes again (a node removed by an earlier test is
    replaced first)."""
    proc, address, removed = cluster
    while removed:
        _tell(proc, "add", "added")
        removed.pop()

    def remove_node() -> None:
        _tell(proc, "remove", "removed")
        removed.append(True)

    return address, remove_node


def _farm_loses_a_node(address, remove_node, store_uri: str, training, published):
    """``raydd farm`` on the cluster into ``store_uri``; a worker node is removed once ``training()`` says the
    workers are at it; the farm must train every trajectory once (the lost one twice, attempt 2) and the store
    must verify clean. ``published()``: the trajectory files in the store afterwards."""
    farm = _raydd("farm", "--store", store_uri, "--address", address, "--dataset", "digits", "--trajectories", "4",
                  "--epochs", "6", "--width", "16", "--workers", "3", "--train-per-class", "40", "--quiet")
    try:
        deadline = time.time() + 300
        while not training():
            assert farm.poll() is None and time.time() < deadline, farm.communicate()[1][-2000:]
            time.sleep(0.1)
        remove_node()
        out, err = farm.communicate(timeout=300)  # before the fix: hung, the retry given to a worker never placed
    finally:
        if farm.poll() is None:
            farm.kill()
            farm.communicate()
    assert farm.returncode == 0, err[-2000:]
    assert "4 trained, 0 already stored" in out
    rows = [line.split() for line in out.splitlines() if line.rstrip().endswith(" trained")]
    attempts = sorted(int(row[-2]) for row in rows)
    assert len(rows) == 4 and attempts[-1] == 2 and attempts[:3] == [1, 1, 1]  # the lost one: a second attempt
    assert len(published()) == 4
    verify = subprocess.run([sys.executable, "-m", "raydd.cli", "store", "verify", store_uri], capture_output=True,
                            text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "WARN" not in verify.stdout and "4 files checked, 0 problems" in verify.stdout, verify.stdout


def test_a_farm_survives_losing_a_node(three_nodes, tmp_path):
    address, remove_node = three_nodes
    store = tmp_path / "store"
    _farm_loses_a_node(address, remove_node, str(store),
                       training=lambda: any(p.name.endswith(".partial") for p in store.rglob("*")),
                       published=lambda: list(store.rglob("*.arrow")))
    assert not [p for p in store.rglob("*") if p.name.endswith(".partial")]


@pytest.fixture
def s3_bucket(monkeypatch):
    """An ``s3://`` store URI on a local moto server (127.0.0.1), its credentials in the environment of the
    farm (the cluster's nodes have them from the start), and a boto3 client."""
    with moto_s3(monkeypatch, "farm") as (endpoint, client):
        yield f"s3://farm/lost?endpoint_override={endpoint}&scheme=http&region=us-east-1", client


def test_a_farm_into_s3_survives_losing_a_node(three_nodes, s3_bucket):
    """The same farm into the S3 store: an object is put whole, so the lost node leaves no object behind; its
    claim dies with it and the retry takes the trajectory over."""
    from raydd.store import TrajectoryStore

    uri, client = s3_bucket
    address, remove_node = three_nodes
    store = TrajectoryStore(uri)

    def trajectory_objects():
        found = client.list_objects_v2(Bucket="farm", Prefix="lost/").get("Contents", [])
        return [o["Key"] for o in found if o["Key"].endswith(".arrow")]

    _farm_loses_a_node(address, remove_node, uri, training=lambda: len(store.claims()) >= 3,
                       published=trajectory_objects)
    assert not store.claims()  # every claim released: none left for a later farm to wait on


def test_without_an_address_raydd_starts_its_own_ray(monkeypatch):
    """No --address and no RAY_ADDRESS: a Ray of raydd's own (``address="local"``), never the cluster a stale
    /tmp/ray/ray_current_cluster names — a cluster killed without grace leaves that file, and joining it hung."""
    ray = pytest.importorskip("ray")
    from raydd.farm.ray_pool import connect
    from raydd.sweep.runner import _connect

    asked = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda address=None, **kwargs: asked.append(address))
    assert connect(None) and _connect(None)
    assert asked == ["local", "local"]
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert connect(None) and _connect("10.0.0.2:6379")
    assert asked[2:] == ["10.0.0.1:6379", "10.0.0.2:6379"]


def test_a_sweep_survives_losing_a_node(three_nodes, tmp_path):
    """``raydd sweep --address`` on the three nodes, one trial per node; a worker node is removed once a trial
    has checkpointed. The lost trial is retried from its checkpoint (``max_failures``) and every trial ends with
    the iterations and accuracy of the same sweep run on the three nodes without interruption (FIFO: no decision
    depends on the order results arrive in). Both run through the CLI: a Ray started on this machine after the
    cluster would take over the drivers joining it (trials cancelled before they start, a test-only setup)."""
    import json

    import yaml

    from raydd.sweep.runner import run_sweep
    from raydd.sweep.spec import SweepSpec

    address, remove_node = three_nodes
    spec = {"name": "nodes", "dataset": "digits", "store": None, "methods": ["dm"], "ipcs": [1], "iterations": 40,
            "eval_every": 10, "eval": {"model": {"arch": "convnet", "width": 16}, "num_models": 1, "epochs": 60,
                                       "lr": 0.05},
            "knobs": {"dm": {"lr_img": {"grid": [0.1, 1.0, 10.0]}, "width": 16, "batch_real": 32}},
            "scheduler": {"type": "fifo"}, "resources": {"cpu": 1, "gpu": 0}, "max_failures": 2}
    spec_file = tmp_path / "nodes.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    uninterrupted = _raydd("sweep", str(spec_file), "--storage", str(tmp_path / "straight"), "--address", address,
                           "--quiet")
    _, err = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, err[-2000:]
    straight = run_sweep(SweepSpec.from_dict({**spec, "storage": str(tmp_path / "straight")}), progress=False,
                         resume=True)  # a finished sweep: its records, nothing run
    assert straight.num_errors == 0 and straight.complete
    experiment = tmp_path / "lost" / "nodes"
    sweep = _raydd("sweep", str(spec_file), "--storage", str(tmp_path / "lost"), "--address", address, "--quiet")
    try:
        deadline = time.time() + 300
        while len({p.parent.parent for p in experiment.glob("dm_ipc1_*/checkpoint_*/trial.json")}) < 3:
            assert sweep.poll() is None and time.time() < deadline, sweep.communicate()[1][-2000:]
            time.sleep(0.1)
        seen = {t.name: checkpointed(t) for t in experiment.glob("dm_ipc1_*")}  # all three running, one per node
        remove_node()
        lost_at = time.time()
        out, err = sweep.communicate(timeout=300)
    finally:
        if sweep.poll() is None:
            sweep.kill()
            sweep.communicate()
    assert sweep.returncode == 0, err[-2000:]
    assert "3 trial(s), 0 errored, 0 unfinished" in out + err, (out + err)[-2000:]
    restarts = {}  # the lost node's trial: started again after the loss, from a checkpoint at or after `seen`
    for trial in experiment.glob("dm_ipc1_*"):
        rows = [json.loads(line) for line in (trial / "segments.jsonl").read_text().splitlines()]
        restarts.update({trial.name: r["from"] for r in rows if r["status"] == "started" and r["time"] > lost_at})
    assert len(restarts) == 1, restarts
    (name, start), = restarts.items()
    assert start >= seen[name] > 0 and start % 10 == 0, (start, seen)
    twins = {t["knobs"]["lr_img"]: (t["iterations"], t["acc_mean"]) for t in straight.trials}
    resumed = run_sweep(SweepSpec.from_dict({**spec, "storage": str(tmp_path / "lost")}), progress=False,
                        resume=True)  # a finished sweep: its own records, nothing run
    assert {t["knobs"]["lr_img"]: (t["iterations"], t["acc_mean"]) for t in resumed.trials} == twins
