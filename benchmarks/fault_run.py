"""Scripted fault run: kill -9 the farm driver, a farm worker and the sweep driver, then re-run/resume.

Not a test (the tests cover each fault on its own, faster); this runs them end to end through the
CLI, the way a user meets them, and prints what happened:

    python benchmarks/fault_run.py            # ~5 minutes on 2 cores, in a temporary directory

1. ``raydd farm`` (Ray backend) is killed with SIGKILL — the driver and the Ray it started — while
   trajectories are being written; the same command is run again.
2. One farm worker (a Ray actor process) is killed with SIGKILL mid-trajectory; the farm goes on.
3. ``raydd sweep`` is killed with SIGKILL mid-sweep and resumed with ``--resume``; the same sweep is
   also run without interruption, and the two leaderboards are compared.

Afterwards: ``raydd store verify`` on the store (must pass, no warnings about leftovers), each
trajectory trained exactly once (published ids and the farms' own counts), and the same leaderboard.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

FARM = ["--dataset", "digits", "--trajectories", "4", "--epochs", "40", "--width", "16", "--workers", "2",
        "--train-per-class", "60"]
SWEEP = {"name": "faults", "dataset": "digits", "store": None, "methods": ["dm"], "ipcs": [1], "iterations": 9,
         "eval_every": "rungs", "eval": {"model": {"arch": "convnet", "width": 16}, "num_models": 1, "epochs": 30,
                                         "lr": 0.05},
         "knobs": {"dm": {"lr_img": {"grid": [0.001, 0.1, 1.0, 10.0]}, "width": 16, "batch_real": 32}},
         "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 3}, "resources": {"cpu": 2, "gpu": 0}}


def raydd(*args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.Popen([sys.executable, "-m", "raydd.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 900) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def kill_tree(proc: subprocess.Popen) -> int:
    """SIGKILL a driver this script started and every process it started; how many were killed."""
    family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.communicate(timeout=60)
    return len(family)


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            raise SystemExit(f"{what}: the command ended first:\n{proc.communicate()[1][-2000:]}")
        time.sleep(0.05)
    raise SystemExit(f"{what}: timed out")


def published(store: Path) -> list[str]:
    return sorted(p.stem for p in store.rglob("*.arrow"))


def partials(store: Path) -> list[Path]:
    return [p for p in store.rglob("*") if p.name.endswith(".partial")]


def verify(store: Path) -> tuple[int, str]:
    code, out, err = finish(raydd("store", "verify", str(store)))
    return code, (out + err).strip().splitlines()[-1]


def farm_driver_kill(tmp: Path) -> list[str]:
    store = tmp / "store-driver"
    lines = []
    proc = raydd("farm", "--store", str(store), *FARM, "--quiet")
    wait_for(lambda: published(store) and partials(store), proc, "farm (driver kill)")
    before = published(store)
    killed = kill_tree(proc)
    lines.append(f"farm driver: SIGKILL of the driver and {killed - 1} process(es) it started with {len(before)} "
                 f"trajectory(ies) published, {len(partials(store))} being written")
    code, out, err = finish(raydd("farm", "--store", str(store), *FARM, "--quiet"))
    summary = next(line for line in out.splitlines() if " trained, " in line)
    after = published(store)
    lines.append(f"  re-run: exit {code}; {summary}")
    trained_now = int(summary.split(" trained")[0])
    lines.append(f"  published before the kill {len(before)} + trained by the re-run {trained_now} = {len(after)} "
                 f"trajectories (each once: {len(before) + trained_now == len(after) == 4}); leftovers "
                 f"{len(partials(store))}")
    vcode, vline = verify(store)
    lines.append(f"  raydd store verify: exit {vcode}: {vline}")
    return lines


def farm_worker_kill(tmp: Path) -> list[str]:
    store = tmp / "store-worker"
    proc = raydd("farm", "--store", str(store), *FARM)
    wait_for(lambda: partials(store), proc, "farm (worker kill)")

    def workers():
        return [c for c in psutil.Process(proc.pid).children(recursive=True)
                if any("FarmWorker" in part for part in c.cmdline())]

    wait_for(lambda: workers(), proc, "farm worker process")
    victim = workers()[0]
    victim.send_signal(signal.SIGKILL)
    code, out, err = finish(proc)
    summary = next(line for line in out.splitlines() if " trained, " in line)
    retried = [line for line in out.splitlines() if line.rstrip().endswith(" trained") and line.split()[-2] != "1"]
    lines = [f"farm worker: SIGKILL of worker pid {victim.pid} mid-trajectory",
             f"  the farm went on: exit {code}; {summary}; trajectories needing a second attempt: {len(retried)}",
             f"  published {len(published(store))} (each once), leftovers {len(partials(store))}"]
    vcode, vline = verify(store)
    lines.append(f"  raydd store verify: exit {vcode}: {vline}")
    return lines


def leaderboard(experiment: Path) -> list[tuple]:
    with open(experiment / "leaderboard.csv") as f:
        return [(r["method"], r["ipc"], r["knobs"], r["acc_mean"], r["iterations"], r["stopped_early"])
                for r in csv.DictReader(f)]


def sweep_driver_kill(tmp: Path) -> list[str]:
    spec = tmp / "faults.yaml"
    spec.write_text(yaml.safe_dump(SWEEP))
    code, _, _ = finish(raydd("sweep", str(spec), "--storage", str(tmp / "straight"), "--quiet"))
    straight = leaderboard(tmp / "straight" / "faults")
    lines = [f"sweep, uninterrupted: exit {code}; leaderboard {straight}"]
    experiment = tmp / "killed" / "faults"
    decisions = experiment / "asha_decisions.jsonl"
    proc = raydd("sweep", str(spec), "--storage", str(tmp / "killed"), "--quiet")

    def judged_three():
        if not decisions.exists() or not list(experiment.glob("experiment_state*.json")):
            return False
        return len(json.loads(decisions.read_text())["groups"]["dm|ipc1"]["level"]) >= 3

    wait_for(judged_three, proc, "sweep (driver kill)")
    killed = kill_tree(proc)
    lines.append(f"sweep driver: SIGKILL of the driver and {killed - 1} process(es) it started, 3 of 4 trials "
                 f"judged at the first rung")
    code, out, err = finish(raydd("sweep", str(spec), "--storage", str(tmp / "killed"), "--resume", "--quiet"))
    resumed = leaderboard(experiment)
    lines.append(f"  --resume: exit {code}; same leaderboard as uninterrupted: {resumed == straight}")
    code, out, err = finish(raydd("sweep", str(spec), "--storage", str(tmp / "killed"), "--resume"))
    lines.append(f"  --resume again: exit {code}; {err.strip().splitlines()[-1]}")
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.parse_args(argv)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="raydd-faults-") as d:
        tmp = Path(d)
        for step in (farm_driver_kill, farm_worker_kill, sweep_driver_kill):
            t0 = time.time()
            for line in step(tmp):
                print(line, flush=True)
            print(f"  ({time.time() - t0:.0f} s)\n", flush=True)
    print(f"fault run: {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
