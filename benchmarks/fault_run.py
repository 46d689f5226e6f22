"""Scripted fault run: kill -9 the farm driver, a farm worker and the sweep driver, then re-run/resume.

Not a test (the tests cover each fault on its own, faster); this runs them end to end through the
CLI, the way a user meets them, and prints what happened:

    python benchmarks/fault_run.py            # ~10 minutes on 2 cores, in a temporary directory
    python benchmarks/fault_run.py --only sweep_ctrl_c farm_node_loss

1. ``raydd farm`` (Ray backend) is killed with SIGKILL — the driver and the Ray it started — while
   trajectories are being written; the same command is run again.
2. One farm worker (a Ray actor process) is killed with SIGKILL mid-trajectory; the farm goes on.
3. ``raydd sweep`` is killed with SIGKILL mid-sweep and resumed with ``--resume``; the same sweep is
   also run without interruption, and the two leaderboards are compared.
4. ``raydd sweep`` gets Ctrl-C (SIGINT) a few seconds in: it must exit 130 as unfinished, never "finished", and
   ``--resume`` must end on the uninterrupted leaderboard.
5. A node is lost: on a three-node Ray cluster (``ray.cluster_utils.Cluster``, one CPU per node), the farm runs
   with ``--address`` and one worker node is killed without grace mid-farm; the farm must finish with every
   trajectory trained once; the same farm into the S3 store (a local moto server). Then a sweep on the same
   kind of cluster loses a node: its trials there are retried from their checkpoints (``max_failures``) and the
   leaderboard must equal the uninterrupted one.

Afterwards: ``raydd store verify`` on the store (must pass, no warnings about leftovers), each
trajectory trained exactly once (published ids and the farms' own counts), and the same leaderboard.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
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
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # SIGINT reaches it (not ignored)
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


def verify(store: Path | str) -> tuple[int, str]:
    code, out, err = finish(raydd("store", "verify", str(store)))
    return code, (out + err).strip().splitlines()[-1]


def farm_report(ended: tuple[int, str, str], store: str, ids: list[str], leftovers: list, lead: str = ""
                ) -> list[str]:
    """What a farm that met a fault printed and left: its exit and summary, retried trajectories, what the
    store holds (each of the 4 once?) and ``raydd store verify``'s verdict."""
    code, out, err = ended
    summary = next((line for line in out.splitlines() if " trained, " in line), err.strip()[-500:])
    retried = [line for line in out.splitlines() if line.rstrip().endswith(" trained") and line.split()[-2] != "1"]
    vcode, vline = verify(store)
    return [f"  {lead}exit {code}; {summary}; trajectories needing a second attempt: {len(retried)}",
            f"  published {len(ids)} (each once: {len(ids) == len(set(ids)) == 4}), leftovers {len(leftovers)}",
            f"  raydd store verify: exit {vcode}: {vline}"]


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
    return [f"farm worker: SIGKILL of worker pid {victim.pid} mid-trajectory",
            *farm_report(finish(proc), str(store), published(store), partials(store), "the farm went on: ")]


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


def sweep_ctrl_c(tmp: Path) -> list[str]:
    spec = tmp / "ctrlc.yaml"
    spec.write_text(yaml.safe_dump({**SWEEP, "name": "ctrlc"}))
    code, _, _ = finish(raydd("sweep", str(spec), "--storage", str(tmp / "ctrlc-straight"), "--quiet"))
    straight = leaderboard(tmp / "ctrlc-straight" / "ctrlc")
    proc = raydd("sweep", str(spec), "--storage", str(tmp / "ctrlc"), "--quiet")
    experiment = tmp / "ctrlc" / "ctrlc"
    wait_for(lambda: list(experiment.glob("experiment_state*.json")), proc, "sweep (Ctrl-C)")
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    code, out, err = finish(proc)
    last = err.strip().splitlines()[-1] if err.strip() else ""
    lines = [f"sweep Ctrl-C: SIGINT once the experiment had started; exit {code} (130 expected); "
             f"finished marker written: {(experiment / 'sweep_done.json').exists()}; last line: {last}"]
    code, out, err = finish(raydd("sweep", str(spec), "--storage", str(tmp / "ctrlc"), "--resume", "--quiet"))
    lines.append(f"  --resume: exit {code}; same leaderboard as uninterrupted: {leaderboard(experiment) == straight}")
    return lines


class ThreeNodes:
    """A head and two worker nodes of one CPU each on this machine; ``lose()`` kills a worker node outright."""

    def __enter__(self) -> "ThreeNodes":
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        self.workers = [self.cluster.add_node(num_cpus=1) for _ in range(2)]
        self.cluster.wait_for_nodes()
        return self

    @property
    def address(self) -> str:
        return self.cluster.address

    def lose(self) -> None:
        self.cluster.remove_node(self.workers.pop(0), allow_graceful=False)

    def __exit__(self, *exc) -> None:
        self.cluster.shutdown()


def _farm_loses_a_node(store_uri: str, training, published_ids, leftovers, what: str) -> list[str]:
    farm_args = [*FARM[:-4], "--workers", "3", "--train-per-class", "60"]
    with ThreeNodes() as nodes:
        proc = raydd("farm", "--store", store_uri, "--address", nodes.address, *farm_args)
        wait_for(training, proc, f"farm ({what})")
        nodes.lose()
        lost_at = time.time()
        ended = finish(proc)
    return [f"farm {what}: a worker node of three killed mid-farm ({time.time() - lost_at:.0f} s to the end)",
            *farm_report(ended, store_uri, published_ids(), leftovers())]


def farm_node_loss(tmp: Path) -> list[str]:
    store = tmp / "store-node"
    return _farm_loses_a_node(str(store), lambda: partials(store), lambda: published(store),
                              lambda: partials(store), "node loss")


def farm_node_loss_s3(tmp: Path) -> list[str]:
    """The same into the S3 store on a local moto server; the workers start training once three are claimed."""
    import boto3
    from moto.server import ThreadedMotoServer

    from raydd.store import TrajectoryStore

    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"})
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # not a line per S3 request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        client = boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1")
        client.create_bucket(Bucket="faults")
        uri = f"s3://faults/farm?endpoint_override={host}:{port}&scheme=http&region=us-east-1"
        store = TrajectoryStore(uri)

        def objects() -> list[str]:  # object keys, less pyarrow's directory markers
            found = client.list_objects_v2(Bucket="faults", Prefix="farm/").get("Contents", [])
            return [o["Key"] for o in found if not o["Key"].endswith("/")]

        lines = _farm_loses_a_node(uri, lambda: len(store.claims()) >= 3,
                                   lambda: [k.rsplit("/", 1)[1] for k in objects() if k.endswith(".arrow")],
                                   lambda: [k for k in objects() if not k.endswith(".arrow")], "node loss, S3 store")
        lines.append(f"  claims left in the store: {len(store.claims())}")
        return lines
    finally:
        server.stop()


def sweep_node_loss(tmp: Path) -> list[str]:
    spec_dict = {**SWEEP, "name": "nodes", "resources": {"cpu": 1, "gpu": 0}, "max_failures": 2}
    spec = tmp / "nodes.yaml"
    spec.write_text(yaml.safe_dump(spec_dict))
    with ThreeNodes() as nodes:
        code, _, _ = finish(raydd("sweep", str(spec), "--storage", str(tmp / "nodes-straight"), "--address",
                                  nodes.address, "--quiet"))
    straight = leaderboard(tmp / "nodes-straight" / "nodes")
    lines = [f"sweep on three nodes, uninterrupted: exit {code}; {len(straight)} leaderboard rows"]
    experiment = tmp / "nodes-lost" / "nodes"
    with ThreeNodes() as nodes:
        proc = raydd("sweep", str(spec), "--storage", str(tmp / "nodes-lost"), "--address", nodes.address, "--quiet")
        wait_for(lambda: any(experiment.rglob("checkpoint_*")), proc, "sweep (node loss)")
        nodes.lose()
        code, out, err = finish(proc)
    lines.append(f"sweep node loss: a worker node of three killed once a trial had checkpointed; exit {code}; "
                 f"same leaderboard as uninterrupted: {leaderboard(experiment) == straight}")
    return lines


STEPS = (farm_driver_kill, farm_worker_kill, sweep_driver_kill, sweep_ctrl_c, farm_node_loss, farm_node_loss_s3,
         sweep_node_loss)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=[s.__name__ for s in STEPS], help="run these scenarios only")
    args = p.parse_args(argv)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="raydd-faults-") as d:
        tmp = Path(d)
        for step in (s for s in STEPS if not args.only or s.__name__ in args.only):
            t0 = time.time()
            for line in step(tmp):
                print(line, flush=True)
            print(f"  ({time.time() - t0:.0f} s)\n", flush=True)
    print(f"fault run: {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
