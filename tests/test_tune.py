"""Ray Tune sweeps: ASHA on a real (tiny) sweep, leaderboard, TensorBoard, fault recovery, resume."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from raydd.condense import Sink
from raydd.sweep.runner import SweepResourceError, run_sweep
from raydd.sweep.scheduler import asha
from raydd.sweep.space import knob_space
from raydd.sweep.spec import SweepSpec
from raydd.sweep.trial import TIME_ATTR, TrialSettings, condensation_trainable

EVAL = {"model": {"arch": "convnet", "width": 16}, "num_models": 1, "epochs": 100, "lr": 0.05}


def make_expert_store(root: Path) -> str:
    """Two tiny MTT experts on digits (re-running skips what the store already has)."""
    from raydd.farm import FarmSpec, farm

    farm(FarmSpec(store=str(root), dataset="digits", recipe="expert", train_per_class=30,
                  recipe_options={"epochs": 2, "batch_size": 64, "eval_every": 2}, model={"width": 8, "depth": 2},
                  trajectories=2, backend="local"), progress=False)
    return str(root)


@pytest.fixture(scope="module")
def expert_store(tmp_path_factory):
    return make_expert_store(tmp_path_factory.getbasetemp() / "tune_expert_store")


# --------------------------------------------------------------------------- pure helpers
def test_knob_space_maps_shared_knobs_onto_each_method():
    from ray import tune

    grid = tune.grid_search([0.01, 0.001])
    assert knob_space("mtt", alpha=grid) == {"syn_lr_init": grid}
    assert knob_space("dm", lr_img=3.0) == {"lr_img": 3.0}
    with pytest.raises(ValueError, match="method 'dm' does not use the shared knob 'tau'"):
        knob_space("dm", tau=0.1)
    with pytest.raises(ValueError, match="sets 'syn_lr_init' twice"):
        knob_space("mtt", alpha=0.1, syn_lr_init=0.2)
    assert knob_space("dm", zeta=2.0, eval_protocol="edc") == {"eval.zeta": 2.0}  # ζ: evaluation LR smoothing


def test_asha_uses_the_iteration_counter():
    scheduler = asha(max_t=90)
    assert scheduler._time_attr == TIME_ATTR
    assert scheduler._max_t == 90 and scheduler._reduction_factor == 3
    assert sorted(rung for rung, _ in scheduler._brackets[0]._rungs) == [10, 30, 90]  # grace period 90 // 9
    with pytest.raises(ValueError, match="grace_period=100 is invalid"):
        asha(max_t=90, grace_period=100)


def test_trial_settings_flat_nested_and_horizon():
    flat = TrialSettings.from_config({"method": "dm", "dataset": "digits", "ipc": 2, "iterations": 7,
                                      "eval_every": 3, "lr_img": 2.0})
    assert flat.knobs == {"lr_img": 2.0} and flat.eval_points() == [3, 6, 7]
    rungs = TrialSettings.from_config({"method": "dm", "dataset": "digits", "ipc": 2, "iterations": 800,
                                       "eval_every": "rungs", "asha": {"grace_period": 50, "reduction_factor": 4}})
    assert rungs.eval_points() == [50, 200, 800]
    assert flat.method_config().lr_img == 2.0
    nested = TrialSettings.from_config({"arm": {"method": "mtt", "iterations": "default", "knobs": {"alpha": 0.02}},
                                        "dataset": "digits", "ipc": 1})
    assert nested.iterations == 5000 and nested.method_config().syn_lr_init == 0.02
    with pytest.raises(ValueError, match="method 'dm' does not use the shared knob 'zeta'"):
        TrialSettings.from_config({"method": "dm", "dataset": "digits", "ipc": 1, "iterations": 5, "zeta": 2})
    edc_eval = TrialSettings.from_config({"method": "dm", "dataset": "digits", "ipc": 1, "iterations": 5,
                                          "eval": {"protocol": "edc", "epochs": 7}, "knobs": {"zeta": 3.0}})
    assert edc_eval.method_knobs == {} and edc_eval.eval_config().zeta == 3.0 and edc_eval.eval_config().epochs == 7
    from raydd.methods.base import METHODS

    if "ptlm" in METHODS:  # the injection schedule's T is the trial's own length unless set explicitly
        ptlm = TrialSettings.from_config({"method": "ptlm", "dataset": "digits", "ipc": 1, "iterations": 40})
        assert ptlm.method_config().total_iterations == 40


def test_leaderboard_prefers_complete_trials_and_flags_unfinished_sweeps():
    from raydd.sweep.leaderboard import build_leaderboard, leaderboard_markdown

    def rec(acc, iterations, target=10, error=False, **knobs):
        return {"method": "dm", "ipc": 1, "seed": 0, "knobs": knobs, "iterations": iterations,
                "target_iterations": target, "acc_mean": acc, "acc_std": 0.01, "source": "eval", "eval_models": 2,
                "trial_id": f"t{acc}", "path": f"/x/t{acc}", "error": error}

    records = [rec(0.9, 5, lr_img=1.0), rec(0.8, 10, lr_img=2.0), rec(None, 0, error=True), rec(0.7, 10)]
    ((row, best),) = build_leaderboard(records)
    assert (row.acc_mean, row.iterations, row.knobs) == (0.8, 10, {"lr_img": 2.0})  # a complete run wins
    assert (row.trials, row.stopped_early, row.errored) == (4, 1, 1)
    assert "Incomplete: 2 trial(s)" in leaderboard_markdown([row], "x", unfinished=2)
    assert "| dm | 1 | 80.00 ± 1.00 | eval, 2 nets | 10/10 | 4 (1, 1) | lr_img=2 |" in leaderboard_markdown([row])


# --------------------------------------------------------------------------- sweeps
@pytest.fixture(scope="module")
def asha_sweep(ray_session, expert_store, tmp_path_factory):
    """2 methods x 2 configs (real vs noise init): ASHA must stop the noise-initialised ones early.

    Promotion ASHA (the default variant), rf 2, rungs at 2 and 4: whatever the order in which the
    two trials of a group reach rung 2, only the better (real) one is promoted; alone at rung 4
    it waits until its group is idle, then goes on to 6 (at least one per rung); noise is stopped.
    """
    spec = SweepSpec.from_dict({
        "name": "asha", "dataset": "digits", "store": expert_store, "methods": ["mtt", "dm"], "ipcs": [2],
        "iterations": 6, "eval_every": 2, "eval": EVAL,
        "knobs": {"mtt": {"pix_init": {"grid": ["real", "noise"]}, "syn_steps": 4, "max_start_epoch": 1,
                          "expert_epochs": 1, "lr_img": 1.0},
                  "dm": {"init": {"grid": ["real", "noise"]}, "lr_img": 0.1, "width": 16, "batch_real": 32}},
        "scheduler": {"type": "asha", "grace_period": 2, "reduction_factor": 2},
        "resources": {"cpu": 1, "gpu": 0}, "storage": str(tmp_path_factory.mktemp("sweeps")),
        "metrics": {"metrics": ["hlr", "ior", "lrs", "ars"], "runs": 1, "lr_grid": [0.05], "full_acc": 0.95},
    })
    return spec, run_sweep(spec, progress=False)


def test_asha_sweep_stops_weak_trials_and_writes_leaderboard(asha_sweep):
    spec, result = asha_sweep
    trials = result.trials
    assert len(trials) == 4 and not any(t["error"] for t in trials)
    by_init = {(t["method"], t["knobs"].get("pix_init", t["knobs"].get("init"))): t for t in trials}
    for method in ("mtt", "dm"):  # ASHA within each (method, IPC): noise init stopped at the first rung
        real, noise = by_init[(method, "real")], by_init[(method, "noise")]
        assert (real["iterations"], noise["iterations"]) == (6, 2)
        assert real["acc_mean"] > noise["acc_mean"] + 0.2
    # leaderboard: best (method, IPC) rows, real init wins, files and best synthetic sets written
    rows = {(r.method, r.ipc): r for r in result.rows}
    assert set(rows) == {("mtt", 2), ("dm", 2)}
    for (method, _), row in rows.items():
        assert row.iterations == row.target_iterations == 6 and row.trials == 2 and row.stopped_early == 1
        assert row.knobs.get("pix_init", row.knobs.get("init")) == "real"
        from raydd.methods.synthetic import load_synthetic

        syn = load_synthetic(row.synthetic_path)
        assert syn.method == method and len(syn) == 20 and syn.iteration == 6
    with open(result.leaderboard_csv) as f:
        table = list(csv.DictReader(f))
    assert {(r["method"], r["ipc"]) for r in table} == {("mtt", "2"), ("dm", "2")}
    md = Path(result.leaderboard_md).read_text()
    assert "| mtt | 2 |" in md and "| dm | 2 |" in md
    # the spec's metrics: DD-Ranking's scores of each best set, computed at the trial's last iteration
    from raydd.evaluation.robustness import label_robust_score

    assert "| HLR | IOR | LRS | ARS |" in md.replace(" knobs |", "")
    for row in rows.values():
        s = row.scores
        assert set(s) == {"hlr", "hlr_std", "ior", "ior_std", "lrs", "lrs_std", "ars", "ars_std"}
        assert s["lrs"] == pytest.approx(label_robust_score(s["ior"], s["hlr"]))  # one run: mean = the run
        # the set's network is the evaluation's own (same seed, lr 0.05, protocol): HLR = 0.95 - its accuracy
        assert 0 <= s["ars"] <= 1 and s["hlr"] == pytest.approx(0.95 - row.acc_mean, abs=1e-9)
    assert not any(t.get("scores") for t in trials if t["iterations"] < 6)  # stopped trials get no scores
    assert "syn_lr" in next(t for t in trials if t["method"] == "mtt") and \
        next(t for t in trials if t["method"] == "mtt")["syn_lr"] > 0
    assert Path(result.experiment_path, "sweep_spec.json").exists()


def test_tensorboard_has_scalars_images_and_hparams(asha_sweep):
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, SCALARS, EventAccumulator

    _, result = asha_sweep
    full = next(t for t in result.trials if t["iterations"] == 6)
    own = EventAccumulator(str(Path(full["path"]) / "tensorboard"), size_guidance={IMAGES: 0, SCALARS: 0}).Reload()
    tags = own.Tags()
    assert {"eval/acc_mean", "eval/acc_std", "train/loss"} <= set(tags["scalars"])
    assert [e.step for e in own.Scalars("eval/acc_mean")] == [2, 4, 6]
    images = own.Images("synthetic/images")
    assert [e.step for e in images] == [0, 2, 4, 6] and images[-1].width > 0
    tune_events = EventAccumulator(full["path"]).Reload()  # Tune's TBXLogger: every reported number
    assert "ray/tune/eval_acc" in tune_events.Tags()["scalars"]
    for events in {p.parent for p in Path(full["path"]).rglob("events.out.tfevents.*")}:  # one HParams
        with pytest.raises(KeyError):  # session per trial: the leaderboard's, none from Tune in the trial dir
            EventAccumulator(str(events)).Reload().PluginTagToContent("hparams")
    runs = sorted(p for p in Path(result.hparams_dir).iterdir() if p.is_dir())
    assert len(runs) == 4
    from tensorboard.plugins.hparams import plugin_data_pb2

    root = EventAccumulator(result.hparams_dir).Reload()
    content = root.PluginTagToContent("hparams")["_hparams_/experiment"]
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content).experiment
    columns = {h.name for h in experiment.hparam_infos}
    assert {"method", "ipc", "seed", "pix_init", "init", "lr_img", "syn_steps"} <= columns  # union over methods
    run = EventAccumulator(str(runs[0])).Reload()
    assert "_hparams_/session_start_info" in run.PluginTagToContent("hparams")
    assert "hparams/acc_mean" in run.Tags()["scalars"]


def test_resume_refuses_silent_overwrite_and_continues(asha_sweep, tmp_path, capsys):
    import argparse

    import yaml

    from raydd.sweep.cli import add_sweep_parser, cmd_sweep

    spec, result = asha_sweep
    storage = str(Path(result.experiment_path).parent)
    with pytest.raises(ValueError, match=r"has finished already \(leaderboard: .*leaderboard.md\): pass --resume"):
        run_sweep(spec, progress=False, storage=storage)
    board = Path(result.leaderboard_md).stat().st_mtime_ns
    again = run_sweep(spec, storage=storage, resume=True)  # finished: nothing runs, Ray does not start
    assert "has finished already, nothing to run; leaderboard: " in capsys.readouterr().err
    assert [(r.method, r.ipc, r.trial_id, r.acc_mean) for r in again.rows] == \
           [(r.method, r.ipc, r.trial_id, r.acc_mean) for r in result.rows]
    assert Path(result.leaderboard_md).stat().st_mtime_ns == board  # not rewritten
    # the CLI: raydd sweep <spec.yaml> --resume --storage PATH
    path = tmp_path / "asha.yaml"
    path.write_text(yaml.safe_dump(spec.to_dict()))
    parser = argparse.ArgumentParser(prog="raydd")
    add_sweep_parser(parser.add_subparsers(dest="command"))
    assert cmd_sweep(parser.parse_args(["sweep", str(path), "--resume", "--storage", storage, "--quiet"])) == 0
    out = capsys.readouterr().out
    assert "| mtt | 2 |" in out and "| dm | 2 |" in out
    changed = SweepSpec.from_dict({**spec.to_dict(), "ipcs": [3]})
    with pytest.raises(ValueError, match=r"the spec differs .* in \['ipcs'\]"):
        run_sweep(changed, progress=False, storage=storage, resume=True)


FAULT_MARKER = ".test_fault_injected_at_{}"


class FaultAt(Sink):
    """Raises once at each of ``points`` (a marker file in the trial directory remembers it), some time
    after the last report, like a real crash: Tune has registered the checkpoint by then."""

    def __init__(self, points) -> None:
        self.points = set(points)

    def on_step(self, run, metrics) -> None:
        import time

        marker = Path.cwd() / FAULT_MARKER.format(run.method.iteration)
        if run.method.iteration in self.points and not marker.exists():
            marker.write_text(str(run.method.iteration))
            time.sleep(1.0)
            raise RuntimeError(f"test fault injected at iteration {run.method.iteration}")


def faulty_trainable(config: dict) -> None:
    """The sweep trainable with a fault at iterations 3 and 5 (a wrapper the test passes to run_sweep)."""
    condensation_trainable(config, sinks=[FaultAt([3, 5])])


def test_failed_trial_resumes_exactly_from_its_checkpoint(ray_session, one_thread, tmp_path):
    """Fault at iteration 3: Tune retries the trial from its iteration-2 checkpoint (max_failures=1).
    Fault at iteration 5: retries used up, the trial errors and the sweep ends; ``resume=True``
    restarts it from its iteration-4 checkpoint. The result equals an uninterrupted run."""
    spec = SweepSpec.from_dict({
        "name": "fault", "dataset": "digits", "store": None, "methods": ["dm"], "ipcs": [2], "iterations": 6,
        "eval_every": 2, "eval": {**EVAL, "epochs": 5},
        "knobs": {"dm": {"lr_img": 0.5, "width": 16, "batch_real": 32}}, "scheduler": {"type": "fifo"},
        "max_failures": 1, "storage": str(tmp_path),
    })
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import this test module
    first = run_sweep(spec, progress=False, trainable=faulty_trainable)
    (trial,) = first.trials
    assert trial["error"] and trial["iterations"] == 4 and first.num_errors == 1
    from raydd.sweep.cli import sweep_exit_code

    assert sweep_exit_code(first) == 1  # errored trials: the sweep exits non-zero, the leaderboard says why
    assert "- dm IPC 2 (trial" in first.markdown() and \
        "RuntimeError: test fault injected at iteration 5" in first.markdown()
    resumed = run_sweep(spec, progress=False, resume=True, trainable=faulty_trainable)
    (trial,) = resumed.trials
    assert not trial["error"] and trial["iterations"] == 6 and resumed.num_errors == 0
    for it in (3, 5):  # both faults did happen
        assert Path(trial["path"], FAULT_MARKER.format(it)).read_text() == str(it)
    progress = list(csv.DictReader(open(Path(trial["path"]) / "progress.csv")))
    # each restart reports its checkpoint's result again (ASHA ignores the repeat) before reporting new ones
    assert [(int(float(r[TIME_ATTR])), int(float(r["restored_from"]))) for r in progress] == \
           [(2, 0), (2, 0), (4, 2), (4, 2), (6, 4)]
    # exact: the twice-restored trial ends where an uninterrupted run of the same method ends
    from raydd.data.datasets import load_train_test
    from raydd.methods.base import get_method
    from raydd.methods.synthetic import load_synthetic

    settings = TrialSettings.from_config({"method": "dm", "dataset": "digits", "ipc": 2, "iterations": 6,
                                          "lr_img": 0.5, "width": 16, "batch_real": 32})
    train, _ = load_train_test("digits")
    with one_thread():
        method = get_method("dm")(settings.method_config(), train, None, device="cpu", seed=0)
        for _ in range(6):
            method.step()
    final = load_synthetic(resumed.rows[0].synthetic_path)
    torch.testing.assert_close(final.images, method.synthetic_set().images, rtol=1e-5, atol=1e-6)


def test_gpu_request_on_cpu_cluster_fails_fast(ray_session, tmp_path):
    spec = SweepSpec.from_dict({"name": "gpu", "dataset": "digits", "store": None, "methods": ["dm"], "ipcs": [1],
                                "iterations": 2, "resources": {"cpu": 1, "gpu": 0.5}, "storage": str(tmp_path)})
    with pytest.raises(SweepResourceError, match="resources.gpu=0.5 per trial but the Ray cluster has 0 GPU"):
        run_sweep(spec, progress=False)
    assert not (tmp_path / "gpu").exists()


def test_missing_store_is_refused_before_ray(tmp_path):
    spec = SweepSpec.from_dict({"name": "nostore", "dataset": "digits", "store": str(tmp_path / "empty"),
                                "methods": ["mtt"], "ipcs": [1], "iterations": 2, "storage": str(tmp_path)})
    with pytest.raises(ValueError, match="needs 'expert' trajectories of digits but store .* has none"):
        run_sweep(spec, progress=False)


def test_resumed_segment_event_file_sorts_after_the_previous_one(tmp_path, monkeypatch):
    """A trial resumed within the same second must not have its TensorBoard steps read first."""
    import time

    from torch.utils.tensorboard import SummaryWriter

    from raydd.condense import segment_writer as _segment_writer

    first = _segment_writer(SummaryWriter, tmp_path)
    first.add_scalar("x", 1.0, 2)
    first.close()
    second = _segment_writer(SummaryWriter, tmp_path)  # same second: must wait for the next one
    second.add_scalar("x", 2.0, 4)
    second.close()
    names = sorted(p.name for p in tmp_path.glob("events.out.tfevents.*"))
    assert len(names) == 2 and int(names[0].split(".")[3]) < int(names[1].split(".")[3])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert [e.step for e in EventAccumulator(str(tmp_path)).Reload().Scalars("x")] == [2, 4]
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    _segment_writer(SummaryWriter, tmp_path / "fresh").close()  # no earlier segment: no wait
    assert slept == []


def test_a_sweep_reads_the_model_its_farm_section_farms(tmp_path, digits):
    """The README's order (``raydd farm``, then a sweep with its own ``farm:`` section) leaves two expert
    models in the store: the sweep's MTT trials read the one its section farms, and the check before
    Ray says which model it is; without a farm section the ambiguity is refused before Ray starts."""
    from raydd.farm import FarmSpec, farm
    from raydd.sweep.runner import check_store, pinned_models

    store = str(tmp_path / "store")
    for width in (8, 12):  # e.g. `raydd farm` at one width, the sweep's farm section at another
        farm(FarmSpec(store=store, dataset="digits", recipe="expert", recipe_options={"epochs": 2, "batch_size": 64},
                      model={"width": width, "depth": 2}, trajectories=1, backend="local"), progress=False)
    base = {"name": "pin", "dataset": "digits", "store": store, "methods": ["mtt", "dm"], "ipcs": [1],
            "iterations": 2, "storage": str(tmp_path), "knobs": {"mtt": {"max_start_epoch": 1, "expert_epochs": 1}}}
    farmed = SweepSpec.from_dict({**base, "farm": {"expert": {"model": {"width": 12, "depth": 2}}}})
    pinned = pinned_models(farmed, digits[0])
    assert pinned == {"mtt": {"model": "convnet2-w12-in"}}  # DM reads no store and chooses no model
    check_store(farmed, store, digits[0], pinned)  # no ambiguity left
    assert all(arm["method_knobs"].get("model") == "convnet2-w12-in" for arm in farmed.arms(pinned)
               if arm["method"] == "mtt")
    unpinned = SweepSpec.from_dict(base)
    with pytest.raises(ValueError, match=r"method 'mtt' \(IPC 1\): .*several models .*choose one with --set model"):
        check_store(unpinned, store, digits[0], pinned_models(unpinned, digits[0]))
    chosen = SweepSpec.from_dict({**base, "farm": {"expert": {"model": {"width": 12, "depth": 2}}},
                                  "knobs": {"mtt": {**base["knobs"]["mtt"], "model": "convnet2-w8-in"}}})
    assert pinned_models(chosen, digits[0]) == {}  # a model the spec chooses itself is kept
