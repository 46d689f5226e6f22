"""SweepSpec: YAML loading and validation, all before (and without) Ray."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from raydd.sweep.spec import Knob, SweepSpec, default_trial_iterations

REPO = Path(__file__).resolve().parents[1]

GOOD = {
    "name": "quick-digits", "dataset": "digits", "store": "raydd-store", "methods": ["dm", "mtt"],
    "ipcs": [1, 10], "iterations": 200, "eval_every": 50,
    "knobs": {"dm": {"lr_img": {"loguniform": [0.1, 10]}, "init": {"grid": ["real", "noise"]}},
              "mtt": {"alpha": {"choice": [0.01, 0.001]}, "syn_steps": 5}},
    "samples": 2, "scheduler": {"type": "asha", "grace_period": 50, "reduction_factor": 3},
    "resources": {"cpu": 1, "gpu": 0},
}


def spec(**changes):
    data = json.loads(json.dumps(GOOD))
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return SweepSpec.from_dict(data)


def test_good_spec_parses_and_counts_trials(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    s = SweepSpec.from_yaml(path)
    assert s.methods == ("dm", "mtt") and s.ipcs == (1, 10)
    assert s.knobs["dm"]["lr_img"] == Knob("loguniform", (0.1, 10))
    assert s.grid_points("dm") == [{"init": "real"}, {"init": "noise"}] and s.grid_points("mtt") == [{}]
    assert s.num_trials == 2 * (2 + 1) * 2 * 1  # samples x (dm grid 2 + mtt 1) x ipcs x seeds
    assert s.iterations == {"dm": 200, "mtt": 200} and s.max_iterations == 200
    assert SweepSpec.from_dict(s.to_dict()) == s  # round trip through plain data


def test_default_iterations_follow_each_method():
    s = spec(methods=["dm", "mtt"], iterations={"dm": 50, "default": "default"}, knobs={}, scheduler={"type": "fifo"})
    assert s.trial_iterations("dm", 1) == 50
    assert s.trial_iterations("mtt", 10) == default_trial_iterations("mtt", "digits", 10) == 5000
    if "edc" in _registered():  # EDC's planned horizon (cosine lr) is its published per-dataset count
        from raydd.methods.base import make_config

        assert default_trial_iterations("edc", "digits", 10) == make_config("edc", "digits", 10).total_iterations


def _registered():
    from raydd.methods.base import METHODS

    return set(METHODS)


@pytest.mark.parametrize("changes, message", [
    ({"methods": ["dm", "nope"]}, "unknown method 'nope': accepted"),
    ({"methods": []}, "methods is empty"),
    ({"knobs": {"dm": {"lam": 1.0}}}, "method 'dm' does not use the shared knob 'lam'"),
    ({"knobs": {"dm": {"no_such_knob": 1.0}}}, "method 'dm' has no knob 'no_such_knob': accepted"),
    ({"knobs": {"dm": {"lr_img": {"loguniform": [10, 0.1]}}}}, "empty or inverted range"),
    ({"knobs": {"dm": {"lr_img": {"loguniform": [1, 1]}}}}, "empty or inverted range"),
    ({"knobs": {"dm": {"lr_img": {"loguniform": [0, 1]}}}}, "expected 0 < low < high"),
    ({"knobs": {"dm": {"lr_img": {"uniform": [1]}}}}, "expected [low, high]"),
    ({"knobs": {"dm": {"init": {"grid": []}}}}, "knobs.dm.init.grid is an empty list"),
    ({"knobs": {"dm": {"init": ["real", "noise"]}}}, "ambiguous"),
    ({"knobs": {"dm": {"init": {"sample": [1, 2]}}}}, "exactly one of"),
    ({"knobs": {"dm": {"lr_img": {"grid": [1.0, -2.0]}}}}, "knobs.dm.lr_img: value -2.0 (IPC 1) is refused"),
    ({"knobs": {"dm": {"init": "sideways"}}}, "init='sideways' is invalid"),
    ({"knobs": {"edc_x": {"lr": 1}}}, "knobs given for method 'edc_x', which is not in methods"),
    ({"knobs": {"mtt": {"alpha": 0.01, "syn_lr_init": 0.01}}}, "set 'syn_lr_init' twice"),
    ({"ipcs": [1, 0]}, "ipc=0 is invalid: expected an integer >= 1"),
    ({"ipcs": []}, "ipcs is empty"),
    ({"iterations": 0}, "iterations[dm]=0 is invalid"),
    ({"iterations": -5}, "is invalid: expected an integer >= 1"),
    ({"iterations": "lots"}, "iterations='lots' is invalid"),
    ({"samples": 0}, "samples=0 is invalid"),
    ({"eval_every": -1}, "eval_every=-1 is invalid"),
    ({"eval_every": "often"}, "eval_every='often' is invalid: expected an integer >= 0 or 'rungs'"),
    ({"eval_every": "rungs", "scheduler": {"type": "fifo"}}, "eval_every='rungs' is invalid without ASHA"),
    ({"scheduler": {"type": "pbt"}}, "scheduler.type='pbt' is invalid: accepted asha, fifo"),
    ({"scheduler": {"grace_period": 500}}, "grace_period=500 is invalid: expected <= max_t (200"),
    ({"scheduler": {"reduction_factor": 1}}, "reduction_factor=1 is invalid"),
    ({"scheduler": {"variant": "eager"}}, "scheduler.variant='eager' is invalid: accepted promotion, stopping"),
    ({"max_concurrent": 2}, "max_concurrent=2 is invalid with scheduler.variant='promotion'"),
    ({"scheduler": {"reduction_factor": 2.5}}, "reduction_factor=2.5 is invalid: expected an integer >= 2"),
    ({"scheduler": {"grace_period": 60}}, "grace_period=60 is invalid: expected a multiple of eval_every of dm (50)"),
    ({"resources": {"cpu": 0}}, "resources.cpu=0 is invalid"),
    ({"resources": {"gpu": -1}}, "resources.gpu=-1 is invalid"),
    ({"resources": {"tpu": 1}}, "unknown resources key(s) ['tpu']"),
    ({"dataset": "imagenet"}, "unknown dataset 'imagenet'"),
    ({"eval": {"num_models": 0}}, "EvalConfig.num_models=0 is invalid"),
    ({"farm": {"nope": {}}}, "nope"),
    ({"farm": {"expert": {"trajectories": 0}}}, "trajectories=0 is invalid"),
    ({"farm": {"expert": {"store": "elsewhere"}}}, "come from the sweep spec"),
    ({"knobs": {"dm": {"zeta": {"grid": [1, 2]}}}}, "method 'dm' does not use the shared knob 'zeta'"),
    ({"knobs": {"dm": {"eval.nope": 1}}}, "knob 'eval.nope': the evaluation protocol has no setting 'nope'"),
    ({"knobs": {"dm": {"eval.epochs": {"grid": [10, 0]}}}}, "knobs.dm.eval.epochs: value 0 (IPC 1) is refused"),
    ({"eval": {"epochs": 10, "zeta": 2}}, "unknown standard evaluation setting(s) ['zeta']"),
    ({"eval": {"protocol": "fancy"}}, "eval protocol 'fancy' is invalid: accepted standard, edc"),
    ({"eval": {"teachers": True}}, "true only with protocol edc"),
    ({"final_eval": {"protocol": "edc"}}, "final_eval.protocol is not accepted"),
    ({"final_eval": {"epochs": 0}}, "EvalConfig.epochs=0 is invalid"),
    ({"method_eval": {"edc": {}}}, "method_eval given for method 'edc', which is not in methods"),
    ({"method_eval": {"dm": {"protocol": "edc", "ema_decay": 2}}}, "EDCEvalConfig.ema_decay=2 is out of range"),
    ({"metrics": ["hlr", "fid"]}, "metrics ['hlr', 'fid'] are invalid: accepted one or more of hlr, ior, lrs, ars"),
    ({"metrics": {"metrics": ["lrs"], "runz": 2}}, "unknown metrics setting(s) ['runz']"),
    ({"metrics": {"lrs_lambda": 2}}, "RobustnessConfig.lrs_lambda=2 is out of range"),
    ({"metrics": 3}, "metrics=3 is invalid: expected a list of scores"),
    ({"metrics": ["lrs"], "method_eval": {"dm": {"protocol": "edc"}}},
     "metrics run on the standard protocol, but method 'dm' is evaluated with protocol 'edc'"),
    ({"device": "tpu"}, "device='tpu' is invalid"),
    ({"store": 3}, "store=3 is invalid"),
    ({"frobnicate": 1}, "unknown sweep spec key(s) ['frobnicate']"),
    ({"iterations": None}, "lacks required key(s) ['iterations']"),
    ({"name": "a/b"}, "name='a/b' is invalid"),
])
def test_invalid_specs_are_refused_with_one_line(changes, message):
    with pytest.raises(ValueError) as info:
        spec(**changes)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_rungs_evaluation_follows_the_asha_rule():
    from raydd.sweep.rungs import asha_rungs

    assert asha_rungs(800, 50, 4) == [50, 200, 800]
    assert asha_rungs(200, None, 3) == [22, 66, 198, 200]  # grace = max_t // 9, like GroupedASHA
    assert asha_rungs(100, 50, 4, max_t=800) == [50, 100]  # a shorter trial: its end
    s = spec(eval_every="rungs", scheduler={"type": "asha", "grace_period": 25, "reduction_factor": 2})
    assert s.asha_settings() == {"grace_period": 25, "reduction_factor": 2}


def test_zeta_and_eval_knobs_land_on_the_evaluation():
    s = spec(methods=["dm"], eval={"protocol": "edc", "epochs": 20, "model": "convnet"},
             knobs={"dm": {"zeta": {"grid": [1, 2, 4]}, "eval.batch_size": 10}})
    assert s.grid_points("dm") == [{"zeta": 1}, {"zeta": 2}, {"zeta": 4}]
    with pytest.raises(ValueError, match=r"knobs.dm.zeta: value 0 \(IPC 1\) is refused: .*zeta=0"):
        spec(methods=["dm"], eval={"protocol": "edc"}, knobs={"dm": {"zeta": {"grid": [1, 0]}}})


def test_per_method_and_final_evaluation():
    s = spec(eval={"epochs": 30, "num_models": 2}, method_eval={"dm": {"protocol": "edc", "epochs": 40}},
             final_eval={"num_models": 5}, knobs={"dm": {"zeta": {"grid": [1, 2]}}})
    assert s.eval_settings("mtt") == {"epochs": 30, "num_models": 2}
    assert s.eval_settings("dm") == {"protocol": "edc", "epochs": 40}
    assert s.final_eval_settings("dm") == {"protocol": "edc", "epochs": 40, "num_models": 5}
    assert s.final_eval_settings("mtt") == {"epochs": 30, "num_models": 5}


def test_knob_for_method_not_in_sweep():
    with pytest.raises(ValueError, match="knobs given for method 'mtt', which is not in methods"):
        spec(methods=["dm"], knobs={"mtt": {"syn_steps": 3}})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        SweepSpec.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        SweepSpec.from_yaml(bad)


def test_validation_is_pure_no_ray(tmp_path):
    """Validating good and bad specs never imports (let alone starts) Ray."""
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(GOOD))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**GOOD, "ipcs": [0]}))
    code = textwrap.dedent(f"""
        import sys
        from raydd.sweep.spec import SweepSpec
        SweepSpec.from_yaml({str(good)!r})
        try:
            SweepSpec.from_yaml({str(bad)!r})
        except ValueError as err:
            print("refused:", err)
        assert "ray" not in sys.modules, "validation imported ray"
        print("pure")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "refused: ipc=0 is invalid" in out.stdout and "pure" in out.stdout


@pytest.mark.parametrize("path", sorted((REPO / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_specs_validate(path, tmp_path):
    data = yaml.safe_load(path.read_text())
    assert set(data["methods"]) <= _registered(), sorted(set(data["methods"]) - _registered())
    overrides = {}
    if data.get("data_root") and not Path(data["data_root"]).exists():  # e.g. CIFAR-10 pickles on the cluster
        overrides["data_root"] = str(tmp_path)
    s = SweepSpec.from_yaml(path, **overrides)
    assert s.num_trials >= 1 and s.name == data["name"]
