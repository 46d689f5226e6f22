"""Promises that hold under corrupt bytes, kills and races (issue 14): verified reads, claims before
training, no leaked temp files, one clear line on Ctrl-C."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from raydd.farm import FarmSpec, farm
from raydd.methods import get_method, make_config
from raydd.store import CorruptTrajectoryError, CorruptTrajectoryWarning, TrajectoryStore
from raydd.store.cli import format_ls, format_verify
from raydd.store.lease import Claim, lease_name

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = dict(dataset="digits", recipe="expert", recipe_options={"epochs": 2, "batch_size": 128},
            model={"width": 8, "depth": 2}, train_per_class=20, backend="local")


def leftovers(root) -> list[str]:
    """Every file under ``root`` that is not a published trajectory (temp files, claims)."""
    return sorted(str(p) for p in Path(root).rglob("*") if p.is_file() and not p.name.endswith(".arrow"))


def flip_byte(path: str, tensor: torch.Tensor) -> None:
    """Flip one bit inside the stored bytes of ``tensor`` (a snapshot's parameters) in the file."""
    data = bytearray(open(path, "rb").read())
    where = data.find(tensor.numpy().tobytes())
    assert where > 0
    data[where + 17] ^= 0x40
    with open(path, "wb") as f:
        f.write(data)


# --------------------------------------------------------------------------- 1. verified reads
def test_a_corrupt_snapshot_never_reaches_a_method(tmp_path, digits):
    train, _ = digits
    root = tmp_path / "store"
    farm(FarmSpec(store=str(root), trajectories=2, **{**TINY, "recipe_options": {"epochs": 3, "batch_size": 128}}),
         progress=False)
    store = TrajectoryStore(root)
    bad, good = store.list()
    with store.open(bad.trajectory_id) as traj:
        flip_byte(bad.path, traj.params(0).clone())
    # the store says so: ls marks the file, verify fails it, naming the epoch
    listing = format_ls(store)
    assert "CORRUPT: epoch 0: params crc32 mismatch" in listing and listing.endswith("2 trajectories, 1 corrupt")
    text, code = format_verify(store)
    assert code == 1 and f"FAIL  {bad.path}: epoch 0: params crc32 mismatch" in text
    # a method reading it reports it once (naming the file and the epoch) and goes on with the healthy expert
    config = make_config("mtt", "digits", 1, syn_steps=2, max_start_epoch=1, expert_epochs=1)
    with pytest.warns(CorruptTrajectoryWarning, match=f"{bad.path}: epoch 0: params crc32 mismatch") as caught:
        with get_method("mtt")(config, train, store, device="cpu", seed=0) as method:
            losses = [method.step()["loss"] for _ in range(8)]
    assert len([w for w in caught if issubclass(w.category, CorruptTrajectoryWarning)]) == 1
    assert [e.trajectory_id for e in method.experts] == [good.trajectory_id] and all(map(torch.isfinite,
                                                                                        map(torch.tensor, losses)))
    with store.open(bad.trajectory_id) as traj, pytest.raises(CorruptTrajectoryError, match="epoch 0"):
        traj.params(0)


# --------------------------------------------------------------------------- 2. claims and leftovers
def test_two_farms_at_once_train_each_trajectory_once(tmp_path):
    root = str(tmp_path / "store")
    spec = FarmSpec(store=root, trajectories=4, **TINY)
    reports: list = []
    errors: list = []

    def run() -> None:
        try:
            reports.append(farm(spec, progress=False))
        except Exception as err:  # noqa: BLE001 - a farm that fails fails the test below
            errors.append(err)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(reports) == 2
    trained = [r.trajectory_id for report in reports for r in report.trained]
    assert sorted(trained) == sorted(reports[0].trajectory_ids)  # every trajectory trained exactly once
    for report in reports:  # each farm accounts for every trajectory: its own, the other's, already stored
        mine = {r.trajectory_id for r in report.trained}
        assert mine | set(report.by_others) | set(report.skipped) == set(report.trajectory_ids)
    store = TrajectoryStore(root)
    assert len(store.list()) == 4 and all(r.ok and not r.warning for r in store.verify())
    assert leftovers(root) == []  # no claims, no temp files


def test_a_trajectory_published_between_the_check_and_the_claim_is_not_trained_again(tmp_path, monkeypatch):
    """The other farm publishes, then releases its claim, just after this farm looked: this farm's claim then
    succeeds, and only a second look under the claim keeps it from training the trajectory again (the race
    test above hit this window now and then)."""
    from raydd.farm import plan_tasks, prepare_data
    from raydd.farm.claims import WorkQueue
    from raydd.farm.task import data_fingerprint

    spec = FarmSpec(store=str(tmp_path / "store"), trajectories=1, **TINY)
    data = prepare_data(spec)
    (task,) = plan_tasks(spec, data, data_fingerprint(data))
    store = TrajectoryStore(spec.store)
    looks = iter([False, True])  # not there at the first look, published by the second
    monkeypatch.setattr(store, "exists", lambda tid: next(looks))
    queue = WorkQueue(store, [task], ttl_s=60)
    try:
        assert queue.take() is None and queue.empty and queue.by_others == [task.trajectory_id]
        assert queue.held() == [] and leftovers(spec.store) == []  # its claim was released
    finally:
        queue.close()


def test_leftovers_of_a_dead_farm_are_cleaned_and_its_claims_taken_over(tmp_path, digits):
    """A farm killed mid-trajectory leaves a claim and a temp file: the next farm removes both and trains
    the trajectory; a claim that expired on another host is taken over as well."""
    from raydd.farm import plan_tasks, prepare_data
    from raydd.farm.claims import claim_meta
    from raydd.farm.task import data_fingerprint

    root = str(tmp_path / "store")
    spec = FarmSpec(store=root, trajectories=3, **TINY)
    data = prepare_data(spec)
    tasks = plan_tasks(spec, data, data_fingerprint(data))
    store = TrajectoryStore(root)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # a process of this host that has exited
    claim_dir = Path(store.claim_path(claim_meta(tasks[0]))).parent
    claim_dir.mkdir(parents=True)
    for task, claim in ((tasks[0], Claim(tasks[0].trajectory_id, socket.gethostname(), dead_pid, "t0", time.time() + 600)),
                        (tasks[1], Claim(tasks[1].trajectory_id, "elsewhere", 1, "t1", time.time() - 1))):
        (claim_dir / lease_name(task.trajectory_id)).write_bytes(claim.to_json())
    partial = claim_dir / f".{tasks[0].trajectory_id}.0123456789ab.arrow.partial"
    partial.write_bytes(b"half a trajectory")
    report = farm(spec, progress=False, data=data)
    assert sorted(report.cleaned) == sorted([str(partial), str(claim_dir / lease_name(tasks[0].trajectory_id)),
                                             str(claim_dir / lease_name(tasks[1].trajectory_id))])
    assert len(report.trained) == 3 and leftovers(root) == []
    assert all(r.ok and not r.warning for r in store.verify())


def test_a_live_claim_is_waited_for_then_taken_over_when_it_expires(tmp_path):
    from raydd.farm import plan_tasks, prepare_data
    from raydd.farm.claims import claim_meta
    from raydd.farm.task import data_fingerprint

    root = str(tmp_path / "store")
    spec = FarmSpec(store=root, trajectories=2, **TINY)
    data = prepare_data(spec)
    tasks = plan_tasks(spec, data, data_fingerprint(data))
    store = TrajectoryStore(root)
    path = Path(store.claim_path(claim_meta(tasks[1])))
    path.parent.mkdir(parents=True)
    path.write_bytes(Claim(tasks[1].trajectory_id, "other-host", 7, "x", time.time() + 4).to_json())
    started = time.perf_counter()
    report = farm(spec, progress=False, data=data)
    assert [r.trajectory_id for r in report.trained] == [tasks[0].trajectory_id, tasks[1].trajectory_id]
    assert time.perf_counter() - started >= 3  # it waited for the other farm's claim to expire
    assert leftovers(root) == []


def test_verify_reports_a_dead_writers_leftovers_as_warnings(tmp_path):
    root = str(tmp_path / "store")
    farm(FarmSpec(store=root, trajectories=1, **TINY), progress=False)
    store = TrajectoryStore(root)
    (info,) = store.list()
    folder = Path(info.path).parent
    (folder / lease_name("feedc0de")).write_bytes(Claim("feedc0de", "gone", 1, "t", time.time() - 5).to_json())
    text, code = format_verify(store)
    assert code == 0 and "WARN" in text and "dead claim" in text and "1 warning" in text
    assert store.gc() == [str(folder / lease_name("feedc0de"))] and leftovers(root) == []


# --------------------------------------------------------------------------- 3. Ctrl-C
def test_ctrl_c_of_a_farm_leaves_nothing_and_says_so_in_one_line(tmp_path):
    root = tmp_path / "store"
    cmd = [sys.executable, "-m", "raydd.cli", "farm", "--store", str(root), "--backend", "local", "--epochs", "60",
           "--width", "8", "--trajectories", "2", "--train-per-class", "20", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.name.endswith(".partial") for p in root.rglob("*")):
        time.sleep(0.05)
    assert any(p.name.endswith(".partial") for p in root.rglob("*")), "no trajectory was being written"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("raydd farm: interrupted")
    assert leftovers(root) == []  # its temp file and its claims are gone
    assert all(r.ok for r in TrajectoryStore(root).verify())


# --------------------------------------------------------------------------- 8. what the CLI prints
def test_cli_version_id_prefixes_percent_and_one_line_warnings(tmp_path, capsys):
    from raydd.cli import main

    root = tmp_path / "store"
    farm(FarmSpec(store=str(root), trajectories=2, **{**TINY, "recipe_options": {"epochs": 3, "batch_size": 128}}),
         progress=False)
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("raydd ")
    store = TrajectoryStore(root)
    bad, good = sorted(store.list(), key=lambda t: t.trajectory_id)
    prefix = next(good.trajectory_id[:n] for n in range(1, 21) if not bad.trajectory_id.startswith(
        good.trajectory_id[:n]))
    assert main(["store", "info", str(root), prefix]) == 0 and good.trajectory_id in capsys.readouterr().out
    assert main(["store", "info", str(root), ""]) == 2  # an ambiguous prefix: one line naming the matches
    assert "raydd store: error: " in capsys.readouterr().err
    # one unit for accuracy: percent in `store ls` as in the farm table
    assert main(["store", "ls", str(root)]) == 0
    listing = capsys.readouterr().out
    assert "test_acc_%" in listing and f"{100 * good.final_metrics['test_acc']:.2f}" in listing
    # a corrupt trajectory read by a method: one warning line, no Python source line
    with store.open(bad.trajectory_id) as traj:
        flip_byte(bad.path, traj.params(0).clone())
    code = main(["condense", "--method", "mtt", "--dataset", "digits", "--ipc", "1", "--store", str(root),
                 "--iterations", "2", "--set", "syn_steps=2", "--set", "max_start_epoch=1", "--set",
                 "expert_epochs=1", "--out", str(tmp_path / "mtt.safetensors"), "--quiet"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    warned = [line for line in err if "crc32 mismatch" in line]
    assert code == 0 and len(warned) == 1 and warned[0].startswith("raydd: warning: ") and bad.path in warned[0]
    assert not any("warnings.warn" in line or line.startswith("  ") for line in err), err
