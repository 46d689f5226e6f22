"""bf16 autocast as an option (FarmSpec.precision, EvalConfig.precision): off by default and then the numbers
and trajectory ids of before; on, forward passes and losses in bfloat16, parameters and optimizer state float32,
accuracy within noise of fp32 (digits, CPU)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from raydd.evaluation import EvalConfig, protocol_config, train_and_test
from raydd.evaluation.edc import EDCEvalConfig
from raydd.farm import FarmSpec
from raydd.farm.task import data_fingerprint, plan_tasks, prepare_data, run_trajectory
from raydd.models import ModelSpec, build_model
from raydd.store import TrajectoryStore, trajectory_id
from raydd.training import (NetworkStack, autocast, evaluate_model, evaluate_together, train_epoch,
                            train_epoch_together)

pytestmark = pytest.mark.usefixtures("single_thread")

CPU = torch.device("cpu")
TINY = dict(dataset="digits", recipe="expert", recipe_options={"epochs": 1, "batch_size": 128}, trajectories=2,
            train_per_class=20, model={"width": 16, "depth": 1}, backend="local")


@pytest.fixture(scope="module")
def farm_data():
    spec = FarmSpec(store="unused", **TINY)
    data = prepare_data(spec)
    return data, data_fingerprint(data)


def _ids(spec, farm_data):
    data, fingerprint = farm_data
    return plan_tasks(spec, data, fingerprint)


def test_fp32_default_keeps_the_trajectory_ids(farm_data, tmp_path):
    default = _ids(FarmSpec(store=str(tmp_path), **TINY), farm_data)
    explicit = _ids(FarmSpec(store=str(tmp_path), **TINY, precision="fp32"), farm_data)
    assert FarmSpec().precision == "fp32"
    assert [t.trajectory_id for t in default] == [t.trajectory_id for t in explicit]
    # The id of before the option: the same payload, no precision in it.
    for task in default:
        before = trajectory_id({"recipe": task.recipe, "recipe_config": task.recipe_config, "model": task.model,
                                "dataset": task.dataset, "seed": task.seed, "dtype": task.dtype})
        assert task.trajectory_id == before and task.precision == "fp32"


def test_bf16_has_its_own_ids_and_is_recorded(farm_data, tmp_path):
    fp32 = _ids(FarmSpec(store=str(tmp_path), **TINY), farm_data)
    bf16 = _ids(FarmSpec(store=str(tmp_path), **TINY, precision="bf16"), farm_data)
    assert all(t.precision == "bf16" for t in bf16)
    assert not {t.trajectory_id for t in fp32} & {t.trajectory_id for t in bf16}
    data, _ = farm_data
    run_trajectory(bf16[0], data, device="cpu")
    run_trajectory(fp32[0], data, device="cpu")
    store = TrajectoryStore(str(tmp_path))
    with store.open(bf16[0].trajectory_id) as traj:
        assert traj.meta["precision"] == "bf16" and traj.meta["dtype"] == "float32"
        assert traj.params(1).dtype == torch.float32 and torch.isfinite(traj.params(1)).all()
    with store.open(fp32[0].trajectory_id) as traj:
        assert traj.meta["precision"] == "fp32"


class Probe(nn.Module):
    """A linear classifier that records the dtype a matmul gets in its forward (bfloat16 under autocast)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.seen = []

    def forward(self, x):
        self.seen.append((torch.ones(2, 2) @ torch.ones(2, 2)).dtype)
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_forward_runs_in_the_precision_asked_and_state_stays_float32(digits, precision, dtype):
    train, test = digits
    net = Probe()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    train_epoch(net, opt, train.images[:256], train.labels[:256], batch_size=128,
                generator=torch.Generator().manual_seed(0), device=CPU, precision=precision)
    evaluate_model(net, test.images[:128], test.labels[:128], device=CPU, precision=precision)
    assert set(net.seen) == {dtype}
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert all(s["momentum_buffer"].dtype == torch.float32 for s in opt.state.values())
    assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32  # nothing left behind
    with autocast("fp32", CPU):  # fp32 enters no autocast at all
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def _spec(info):
    return ModelSpec(arch="convnet", width=32, depth=2, channels=info.channels, resolution=tuple(info.resolution),
                     num_classes=info.num_classes)


def test_bf16_expert_epochs_match_fp32_accuracy(digits):
    train, test = digits
    accs = {}
    for precision in ("fp32", "bf16"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = build_model(_spec(train.info))
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        gen = torch.Generator().manual_seed(0)
        for _ in range(3):
            train_epoch(net, opt, train.images, train.labels, batch_size=64, generator=gen, device=CPU,
                        precision=precision)
        accs[precision] = evaluate_model(net, test.images, test.labels, device=CPU, precision=precision).acc
    assert accs["fp32"] > 0.7
    assert abs(accs["bf16"] - accs["fp32"]) < 0.05, accs


def test_bf16_networks_trained_together_match_fp32(digits):
    train, test = digits
    out = {}
    for precision in ("fp32", "bf16"):
        nets = []
        for seed in (0, 1):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                nets.append(build_model(_spec(train.info)))
        stack = NetworkStack(nets)
        opt = torch.optim.SGD(stack.parameters(), lr=0.01, momentum=0.9)
        gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
        for _ in range(2):
            train_epoch_together(stack, opt, train.images, train.labels, batch_size=64, generators=gens,
                                 device=CPU, cutmix_prob=0.5, precision=precision)
        out[precision] = [s.acc for s in evaluate_together(stack, test.images, test.labels, device=CPU,
                                                           precision=precision)]
        assert all(p.dtype == torch.float32 for p in stack.parameters())
    for a, b in zip(out["fp32"], out["bf16"]):
        assert abs(a - b) < 0.05, out


def test_bf16_evaluation_protocol_matches_fp32(digits):
    train, test = digits
    subset = train.per_class(10, seed=0)
    results = {}
    for precision in ("fp32", "bf16"):
        config = EvalConfig(model={"arch": "convnet", "width": 32, "depth": 2}, num_models=2, epochs=30,
                            device="cpu", together=True, precision=precision)
        results[precision] = train_and_test(subset.images, subset.labels, test, train.info, config, lr=0.01)
    assert results["bf16"].config["precision"] == "bf16"
    assert results["fp32"].mean > 0.6
    assert abs(results["bf16"].mean - results["fp32"].mean) < 0.06, {k: r.accuracies for k, r in results.items()}


def test_precision_settings_accepted_where_evaluations_are_configured(tmp_path):
    assert EvalConfig().precision == "fp32" and EDCEvalConfig().precision == "fp32"
    assert protocol_config("digits", {"precision": "bf16"}).precision == "bf16"
    assert protocol_config("digits", {"protocol": "edc", "precision": "bf16"}).precision == "bf16"
    from raydd.sweep.spec import SweepSpec

    base = {"name": "p", "dataset": "digits", "methods": ["random"], "ipcs": [1], "iterations": 1,
            "storage": str(tmp_path)}
    SweepSpec.from_dict({**base, "eval": {"precision": "bf16"}})
    with pytest.raises(ValueError, match="precision='fp16' is invalid: accepted fp32, bf16"):
        SweepSpec.from_dict({**base, "eval": {"precision": "fp16"}})
    path = tmp_path / "farm.yaml"
    path.write_text("dataset: digits\nprecision: bf16\n")
    assert FarmSpec.from_yaml(path).precision == "bf16"


@pytest.mark.parametrize("make, message", [
    (lambda: FarmSpec(precision="fp16"), "precision='fp16' is invalid: accepted fp32, bf16"),
    (lambda: FarmSpec(precision=16), "precision=16 is invalid: accepted fp32, bf16"),
    (lambda: FarmSpec(recipe="ssd_teacher", precision="bf16"),
     "precision='bf16' is invalid for recipe 'ssd_teacher': it trains in fp32 only"),
    (lambda: EvalConfig(precision="half"), "EvalConfig.precision='half' is invalid: accepted fp32, bf16"),
    (lambda: EDCEvalConfig(precision="BF16"), "EDCEvalConfig.precision='BF16' is invalid: accepted fp32, bf16"),
])
def test_bad_precision_is_one_clear_line(make, message):
    with pytest.raises(ValueError) as err:
        make()
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("argv", [
    lambda tmp: ["farm", "--precision", "fp16", "--store", str(tmp / "store"), "--backend", "local"],
    lambda tmp: ["evaluate", str(tmp / "set.safetensors"), "--precision", "fp16", "--device", "cpu"],
])
def test_bad_precision_on_the_command_line(argv, tmp_path, capsys):
    from raydd.cli import main
    from raydd.data.datasets import load_dataset
    from raydd.methods import SyntheticSet

    info = load_dataset("digits", "train").info
    SyntheticSet(torch.zeros(10, 1, 8, 8), torch.arange(10), {**info.to_dict(), "zca": False},
                 "random").save(tmp_path / "set.safetensors")
    code = main(argv(tmp_path))
    errors = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert code == 2 and len(errors) == 1 and "precision='fp16' is invalid: accepted fp32, bf16" in errors[0]
    assert not (tmp_path / "store").exists()
