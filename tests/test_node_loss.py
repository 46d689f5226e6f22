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

HERE = Path(__file__).parent


def _raydd(*args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.Popen([sys.executable, "-m", "raydd.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


@pytest.fixture
def three_nodes():
    pytest.importorskip("ray")
    proc = subprocess.Popen([sys.executable, str(HERE / "three_node_cluster.py")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    address = proc.stdout.readline().strip()
    assert address, "the cluster did not start"

    def remove_node() -> None:
        proc.stdin.write("remove\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "removed"

    try:
        yield address, remove_node
    finally:
        proc.stdin.write("quit\n")
        proc.stdin.close()
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait(timeout=60)


def test_a_farm_survives_losing_a_node(three_nodes, tmp_path):
    address, remove_node = three_nodes
    store = tmp_path / "store"
    farm = _raydd("farm", "--store", str(store), "--address", address, "--dataset", "digits", "--trajectories", "4",
                  "--epochs", "6", "--width", "16", "--workers", "3", "--train-per-class", "40", "--quiet")
    try:
        deadline = time.time() + 300
        while not any(p.name.endswith(".partial") for p in store.rglob("*")):  # the workers are training
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
    assert len(list(store.rglob("*.arrow"))) == 4 and not [p for p in store.rglob("*") if p.name.endswith(".partial")]
    verify = subprocess.run([sys.executable, "-m", "raydd.cli", "store", "verify", str(store)], capture_output=True,
                            text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr


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
