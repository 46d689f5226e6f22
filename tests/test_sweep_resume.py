"""A sweep killed with SIGKILL and resumed ends as the same sweep run without interruption; sweeps that
cannot run are refused before Ray starts; a finished sweep (and the quickstart) re-runs as a no-op."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from raydd.sweep.runner import run_sweep
from raydd.sweep.scheduler import DECISIONS_FILE
from raydd.sweep.spec import SweepSpec
from conftest import checkpointed

EVAL = {"model": {"arch": "convnet", "width": 16}, "num_models": 1, "epochs": 30, "lr": 0.05}


def promotion_spec(storage: Path) -> SweepSpec:
    """Four DM configurations, one trial at a time (2 CPUs per trial on a 2-CPU cluster: a fixed arrival
    order, so ASHA's decisions are a function of the results alone), promotion ASHA with rungs at 1 and 3
    of 9 iterations."""
    return SweepSpec.from_dict({
        "name": "killed", "dataset": "digits", "store": None, "methods": ["dm"], "ipcs": [1], "iterations": 9,
        "eval_every": "rungs", "eval": EVAL,
        "knobs": {"dm": {"lr_img": {"grid": [0.001, 0.1, 1.0, 10.0]}, "width": 16, "batch_real": 32}},
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 3},
        "resources": {"cpu": 2, "gpu": 0}, "storage": str(storage),
    })


def trial_dirs(experiment: Path) -> dict[float, Path]:
    """{lr_img: trial directory} of an experiment."""
    found = {}
    for params in experiment.glob("dm_ipc1_*/params.json"):
        found[json.loads(params.read_text())["arm"]["method_knobs"]["lr_img"]] = params.parent
    return found


def segments(trial: Path) -> list[dict]:
    path = trial / "segments.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the sweep's driver and every process it started (its local Ray), nothing else."""
    import psutil

    family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def straight(ray_session, tmp_path_factory):
    storage = tmp_path_factory.mktemp("straight")
    # left by a run interrupted before Tune saved its state: decisions about trials that no longer exist, which a
    # new sweep there must not count (this ghost would outrank every trial at rung 1 and stop them all)
    (storage / "killed").mkdir()
    (storage / "killed" / DECISIONS_FILE).write_text(json.dumps({"variant": "promotion", "stopped": [], "groups": {
        "dm|ipc1": {"rungs": [1, 3], "scores": [[["ghost_00000", 1.0]], []], "promoted": [[], []],
                    "level": {"ghost_00000": 0}}}}))
    straight = run_sweep(promotion_spec(storage), progress=False)
    assert straight.num_errors == 0 and straight.complete
    return straight


@pytest.mark.parametrize("kill_when", ["first checkpoint", "three judged"])
def test_kill_and_resume_gives_the_uninterrupted_leaderboard(ray_session, straight, tmp_path, kill_when):
    """Killed as soon as a trial's first checkpoint is written (often before ASHA has decided on its rung
    report) or once three trials have been judged: every trial ends where the uninterrupted sweep left it."""
    by_lr = {t["knobs"]["lr_img"]: t for t in straight.trials}
    assert sorted(t["iterations"] for t in straight.trials) == [1, 1, 1, 9]  # ASHA stopped three early

    # the same sweep in a driver process of its own, killed -9 in the middle
    storage = tmp_path / "killed"
    spec_file = tmp_path / "killed.yaml"
    spec_file.write_text(yaml.safe_dump(promotion_spec(storage).to_dict()))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a Ray of its own, killed with it
    proc = subprocess.Popen([sys.executable, "-m", "raydd.cli", "sweep", str(spec_file)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    experiment = storage / "killed"
    decisions = experiment / "asha_decisions.jsonl"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if kill_when == "first checkpoint":
                if any(checkpointed(d) for d in experiment.glob("dm_ipc1_*")):
                    break
            elif decisions.exists() and list(experiment.glob("experiment_state*.json")):
                level = json.loads(decisions.read_text())["groups"]["dm|ipc1"]["level"]
                if len(level) >= 3:
                    break
            time.sleep(0.05)
        assert proc.poll() is None, f"the sweep ended before it could be killed: {proc.communicate()[1][-2000:]}"
        kill_tree(proc)
        killed_at = time.time()
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    _, err = proc.communicate()
    assert "raydd sweep: " in err and "/4 trials done | dm IPC 1 " in err, err[-2000:]  # raydd's progress line
    assert "Trial status" not in err and "To visualize your results with TensorBoard" not in err  # ...not Ray's
    before_kill = {d.name: checkpointed(d) for d in experiment.glob("dm_ipc1_*")}
    assert any(before_kill.values()), before_kill  # killed after some trial had reported

    resumed = run_sweep(promotion_spec(storage), progress=False, resume=True)
    assert resumed.num_errors == 0 and resumed.complete
    # the same leaderboard: best configuration, accuracy and iterations per group
    assert [(r.method, r.ipc, r.knobs, r.acc_mean, r.iterations, r.stopped_early) for r in resumed.rows] == \
           [(r.method, r.ipc, r.knobs, r.acc_mean, r.iterations, r.stopped_early) for r in straight.rows]
    # every trial where the uninterrupted sweep left it: no finished trial re-run, no stopped one revived
    for t in resumed.trials:
        twin = by_lr[t["knobs"]["lr_img"]]
        assert (t["iterations"], t["acc_mean"]) == (twin["iterations"], twin["acc_mean"]), t["knobs"]
    # work lost to the kill: a trial runs again after the kill only if it had not finished, and from its
    # last report before the kill, so at most the iterations up to its next evaluation point (one rung)
    # are done twice
    for lr, trial in trial_dirs(experiment).items():
        done_before = before_kill.get(trial.name, 0)
        after = [s["from"] for s in segments(trial) if s["status"] == "started" and s["time"] > killed_at]
        if done_before == by_lr[lr]["iterations"]:
            assert after == [], (lr, segments(trial))  # finished before the kill: not run again
        elif after:
            assert after[0] == done_before, (lr, after, done_before)


def test_a_sweep_whose_trials_cannot_run_is_refused_before_ray(tmp_path):
    import ray

    was_running = ray.is_initialized()
    spec = SweepSpec.from_dict({"name": "toolarge", "dataset": "digits", "store": None, "methods": ["dm", "dance"],
                                "ipcs": [1, 500], "iterations": 2, "storage": str(tmp_path)})
    with pytest.raises(ValueError, match=r"method 'dm' at IPC 500: ipc=500 is larger than the smallest class of "
                                         r"digits/train \(class \d has \d+ images\): use ipc <= \d+"):
        run_sweep(spec, progress=False)
    assert ray.is_initialized() == was_running and not (tmp_path / "toolarge").exists()
    dance = SweepSpec.from_dict({"name": "factor", "dataset": "digits", "store": str(tmp_path / "s"),
                                 "methods": ["dance"], "ipcs": [50], "iterations": 2, "storage": str(tmp_path)})
    with pytest.raises(ValueError, match=r"method 'dance' at IPC 50: ipc=50 with factor=2 needs 200 real images"):
        run_sweep(dance, progress=False)


def test_quickstart_twice_runs_the_sweep_once(ray_session, tmp_path, monkeypatch, capsys):
    """The second ``raydd quickstart`` reuses the store and the finished sweep: exit 0, same leaderboard."""
    import raydd.quickstart as quickstart
    from raydd.cli import build_parser

    tiny = {"name": "quickstart", "dataset": "digits", "methods": ["random", "dm"], "ipcs": [1], "iterations": 2,
            "eval": {**EVAL, "epochs": 5}, "knobs": {"dm": {"width": 16, "batch_real": 32}},
            "resources": {"cpu": 1, "gpu": 0}}
    monkeypatch.setattr(quickstart, "quickstart_spec",
                        lambda **overrides: SweepSpec.from_dict({**tiny, **overrides}))
    args = build_parser().parse_args(["quickstart", "--store", str(tmp_path / "store"),
                                      "--storage", str(tmp_path / "sweeps")])
    assert args.func(args) == 0
    first = capsys.readouterr()
    board = tmp_path / "sweeps" / "quickstart" / "leaderboard.md"
    stamp = board.stat().st_mtime_ns
    assert args.func(args) == 0
    second = capsys.readouterr()
    assert "has finished already, nothing to run" in second.err and board.stat().st_mtime_ns == stamp
    table = [line for line in first.out.splitlines() if line.startswith("| ")]
    assert table and table == [line for line in second.out.splitlines() if line.startswith("| ")]


def test_progress_line_counts_groups_best_and_eta():
    from types import SimpleNamespace

    from raydd.sweep.progress import SweepProgress

    def trial(tid, method, ipc, status, iterations=None, acc=None):
        result = {} if iterations is None else {"iterations": iterations, "eval_acc": acc}
        config = {"method": method, "dataset": "digits", "ipc": ipc, "iterations": 10}
        return SimpleNamespace(trial_id=tid, config=config, status=status, last_result=result)

    progress = SweepProgress(show=False)
    trials = [trial("a", "dm", 1, "TERMINATED", 10, 0.5), trial("b", "dm", 1, "RUNNING", 5, 0.7),
              trial("c", "mtt", 1, "PENDING")]
    progress._done_at_start = 0  # nothing was done before this run started
    progress._started = time.monotonic() - 60.0  # a minute in: 15 of 30 planned iterations done
    line = progress.line(trials)
    assert line.startswith("raydd sweep: 1/3 trials done | dm IPC 1 1/2 best 70.0% | mtt IPC 1 0/1 | 60 s elapsed")
    assert line.endswith("ETA <= 60 s")


@pytest.mark.slow
@pytest.mark.parametrize("when", ["early", "after a checkpoint"])
def test_ctrl_c_leaves_an_unfinished_sweep_that_resumes(ray_session, tmp_path, when):
    """Ctrl-C at any moment: one line naming the command that continues, exit 130, no sweep_done.json (the sweep
    is unfinished, never finished); --resume then finishes it."""
    spec = promotion_spec(tmp_path / "sweeps")
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec.to_dict()))
    proc = subprocess.Popen([sys.executable, "-m", "raydd.cli", "sweep", str(path), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    experiment = tmp_path / "sweeps" / "killed"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if when == "early" and experiment.exists():
            break
        if when != "early" and any(checkpointed(d) for d in trial_dirs(experiment).values()):
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=240)
    lines = [line for line in err.splitlines() if line.startswith("raydd sweep: interrupted")]
    assert proc.returncode == 130, err[-2000:]
    assert len(lines) == 1 and f"continue with: raydd sweep {path} --quiet --resume" in lines[0]
    assert "Traceback" not in err and "Tuner.restore" not in err
    assert not (experiment / "sweep_done.json").exists()
    resumed = run_sweep(spec, progress=False, resume=True)
    assert resumed.complete and resumed.num_errors == 0 and (experiment / "sweep_done.json").exists()
    assert sorted(t["iterations"] for t in resumed.trials) == [1, 1, 1, 9]
