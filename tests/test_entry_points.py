"""Every entry point runs the same loop on the same plan (``raydd.plan``): ``raydd condense``, the Python API
and a one-trial sweep give a bit-identical synthetic set for the same (method, dataset, IPC, knobs, iterations,
seed), and set a method's horizon (EDC's cosine schedule, PTLM's |T|, DATM's window growth) the same way.
(benchmarks/condense.py plans through the same ``plan_config``; benchmarks/same_numbers.py checks its sets.)"""
from __future__ import annotations

import argparse

import pytest
import torch

from raydd.cli import main as raydd_main
from raydd.condense import condense
from raydd.condense_cli import add_condense_parser, condense_plan
from raydd.methods import get_method, load_synthetic, make_config

IPC, ITERATIONS, SEED = 2, 4, 0
KNOBS = {  # a trajectory method and a distribution method, small enough for a test
    "mtt": {"syn_steps": 3, "expert_epochs": 2, "max_start_epoch": 3, "lr_img": 100.0},
    "dm": {"width": 16, "batch_real": 32, "lr_img": 0.5},
}


def same(a, b) -> bool:
    return torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and a.syn_lr == b.syn_lr


@pytest.fixture(scope="module")
def sets_by_entry_point(digits, digits_experts, tmp_path_factory, ray_session):
    from raydd.sweep.runner import run_sweep
    from raydd.sweep.spec import SweepSpec
    from conftest import one_torch_thread

    train, _ = digits
    out: dict[str, dict] = {m: {} for m in KNOBS}
    work = tmp_path_factory.mktemp("entry_points")
    tiny = {"model": {"arch": "convnet", "width": 8, "depth": 2}, "num_models": 1, "epochs": 2}
    with one_torch_thread():
        for method, knobs in KNOBS.items():
            # the Python API
            config = make_config(method, "digits", IPC, iterations=ITERATIONS, **knobs)
            with get_method(method)(config, train, digits_experts, device="cpu", seed=SEED) as m:
                out[method]["python"] = condense(m, ITERATIONS, progress=False).synthetic
            # raydd condense
            path = work / f"{method}.safetensors"
            sets = [w for k, v in knobs.items() for w in ("--set", f"{k}={v}")]
            assert raydd_main(["condense", "--method", method, "--dataset", "digits", "--ipc", str(IPC),
                               "--iterations", str(ITERATIONS), "--store", str(digits_experts.root), "--out",
                               str(path), "--seed", str(SEED), "--device", "cpu", "--quiet", *sets]) == 0
            out[method]["cli"] = load_synthetic(path)
    # a sweep: one trial per method (constant knobs), Tune trainable on a Ray worker
    spec = SweepSpec.from_dict({
        "name": "entry", "dataset": "digits", "store": str(digits_experts.root), "methods": list(KNOBS),
        "ipcs": [IPC], "iterations": ITERATIONS, "eval_every": ITERATIONS, "eval": tiny, "knobs": KNOBS,
        "scheduler": {"type": "fifo"}, "resources": {"cpu": 1, "gpu": 0}, "device": "cpu",
        "storage": str(work / "sweeps")})
    result = run_sweep(spec, progress=False)
    for row in result.rows:
        out[row.method]["sweep"] = load_synthetic(row.synthetic_path)
    return out


@pytest.mark.parametrize("method", sorted(KNOBS))
def test_every_entry_point_gives_the_same_synthetic_set(method, sets_by_entry_point):
    sets = sets_by_entry_point[method]
    assert set(sets) == {"python", "cli", "sweep"}
    reference = sets["python"]
    assert reference.iteration == ITERATIONS
    for where, syn in sets.items():
        assert same(syn, reference), f"{method}: {where} differs from the Python API"
        assert syn.config == reference.config, f"{method}: {where} ran another config"


@pytest.mark.parametrize("method, ipc, field, expected", [
    ("edc", 10, "total_iterations", 120),  # EDC's cosine lr runs over the run
    ("ptlm", 10, "total_iterations", 120),  # PTLM's |T| (Eq. 4-5)
    ("datm", 10, "expansion_end_epoch", 12),  # DATM's window grows over 1000 of 10000 iterations: 12 of 120
])
def test_the_horizon_is_set_the_same_way_everywhere(method, ipc, field, expected):
    from raydd.sweep.trial import TrialSettings

    iterations = 120
    python = make_config(method, "digits", ipc, iterations=iterations)
    parser = argparse.ArgumentParser()
    add_condense_parser(parser.add_subparsers())
    plan = condense_plan(parser.parse_args(["condense", "--method", method, "--dataset", "digits",
                                            "--ipc", str(ipc), "--iterations", str(iterations)]))
    cli, cli_iterations = plan.config, plan.iterations
    trial = TrialSettings.from_config({"arm": {"method": method, "iterations": iterations, "method_knobs": {},
                                               "eval_knobs": {}}, "dataset": "digits", "ipc": ipc}).method_config()
    assert cli_iterations == iterations
    for config in (python, cli, trial):
        assert getattr(config, field) == expected and config == python
    # an explicit knob wins over the horizon, everywhere alike
    assert getattr(make_config(method, "digits", ipc, iterations=iterations, **{field: 7}), field) == 7
