"""raydd reproduce: the registry of published settings, two settings end to end at the tiny scale on digits,
a budget stop that --resume continues to the uninterrupted result, and the ledger."""
from __future__ import annotations

import pytest
import torch

from raydd.methods import METHODS, load_synthetic
from raydd.reproduce import SCALES, list_settings, parse_budget, published_settings, read_ledger, reproduce

pytestmark = pytest.mark.usefixtures("single_thread")


def test_every_reported_number_is_a_setting_with_its_protocol():
    settings = published_settings()
    expected = {f"{name}_{d}_ipc{i}" for name, cls in METHODS.items() for (d, i) in cls.config_cls.reported}
    assert set(settings) == expected and len(settings) >= 50
    mtt = settings["mtt_cifar10_ipc1"]
    assert (mtt.paper_acc, mtt.paper.source, mtt.iterations) == (46.3, "MTT Table 1", 5000)
    config, jobs = mtt.plan(SCALES["paper"])
    # the first 4 epochs of the paper's 100 x 50 experts: MTT reads epochs 0..4 and the expert recipe is prefix-exact
    assert [(need.recipe, count, epochs) for need, count, epochs in jobs] == [("expert", 100, 4)]
    assert config.zca and config.syn_steps == 50  # the published CIFAR-10 IPC 1 row
    # MTT's utils.py evaluates with its DSA grid (align_corners=True): its evaluate_synset, bit for bit
    assert mtt.eval_settings(SCALES["paper"]) == {"epochs": 1000, "num_models": 5, "dsa_align_corners": True}
    scaled, jobs = mtt.plan(SCALES["cpu"])  # every departure is a knob value
    assert scaled.syn_steps == 20 and [(c, e) for _, c, e in jobs] == [(4, 4)]  # 4 experts, the epochs MTT reads
    assert settings["edc_cifar10_ipc10"].eval_settings(SCALES["paper"])["model"] == "resnet18-bn"
    for setting in settings.values():  # every setting plans and has a valid evaluation at every scale
        for scale in SCALES.values():
            setting.plan(scale)
    capped, jobs = mtt.plan(SCALES["paper"].capped(trajectories=8, epochs=30))  # the paper's protocol, 8 of 100
    assert [(c, e) for _, c, e in jobs] == [(8, 4)] and capped.syn_steps == 50 and capped.max_start_epoch == 2
    assert SCALES["paper"].capped(trajectories=8).departures() == "trajectories 8"
    assert SCALES["cpu"].capped(trajectories=2).trajectories == 2 and SCALES["cpu"].capped(trajectories=9).trajectories == 4
    table = list_settings(ledger="")
    assert f"{len(settings)} published settings" in table and "| mtt_cifar10_ipc1 | 46.3 (MTT Table 1) | 5000 |" in table


def test_two_settings_end_to_end_on_digits(tmp_path):
    ledger = tmp_path / "ledger.jsonl"
    common = dict(scale="tiny", on="digits", store=str(tmp_path / "store"), workdir=str(tmp_path / "work"),
                  ledger=ledger, device="cpu", progress=False)
    mtt = reproduce("mtt_cifar10_ipc1", **common)  # farms its experts (ZCA, as the CIFAR-10 row), condenses
    dm = reproduce("dm_fashion_mnist_ipc10", **common)  # needs no trajectories
    for out, n in ((mtt, 10), (dm, 100)):
        assert out.finished and out.iterations == 2 and 0 <= out.result.mean <= 1 and 0 <= out.random.mean <= 1
        assert len(load_synthetic(tmp_path / "work" / f"{out.setting.name}-tiny-on-digits" / "synthetic.safetensors")) == n
    assert mtt.trajectories[0]["recipe"] == "expert" and mtt.trajectories[0]["trained"] == 1
    rows = read_ledger(ledger)
    assert [(r["setting"], r["scale"], r["on"], r["iterations"]) for r in rows] == \
           [("mtt_cifar10_ipc1", "tiny", "digits", 2), ("dm_fashion_mnist_ipc10", "tiny", "digits", 2)]
    assert rows[1]["acc_mean"] == dm.result.mean and rows[1]["paper_acc"] == 83.5 and rows[1]["device"] == "cpu"
    assert rows[1]["seed"] == 0
    assert "| mtt | 2 / 5000 |" in mtt.table() and "Random (same evaluation)" in mtt.table()
    assert "| mtt_cifar10_ipc1 | 46.3 (MTT Table 1) | 5000 | – | – |" in list_settings(ledger)  # smoke rows apart


def test_settings_sharing_a_store_read_their_own_teacher(tmp_path):
    """Two SSD settings farm different teachers (the CIFAR-10 row whitens with ZCA) into one store: each run
    pins the teacher it farmed, where SSD's teacher='auto' would find two and stop."""
    common = dict(scale="tiny", on="digits", store=str(tmp_path / "store"), workdir=str(tmp_path / "work"),
                  ledger="", device="cpu", progress=False, trajectory_epochs=2)
    outs = [reproduce(name, **common) for name in ("ssd_mnist_ipc1", "ssd_cifar10_ipc1")]
    assert all(out.finished and out.result is not None for out in outs)
    from raydd.store import TrajectoryStore

    teachers = TrajectoryStore(tmp_path / "store").list(recipe="ssd_teacher")
    assert len(teachers) == 2
    used = {load_synthetic(tmp_path / "work" / f"{o.setting.name}-tiny-e2-on-digits" / "synthetic.safetensors")
            .meta.get("teacher") for o in outs}
    assert used == {t.trajectory_id for t in teachers}


def test_capped_and_packed_farm_is_reported(tmp_path):
    """--trajectories caps the paper's count (a departure in the table and the ledger), --pack trains the
    experts together, and a paper-scale row with a cap says so in --list."""
    ledger = tmp_path / "ledger.jsonl"
    out = reproduce("mtt_cifar10_ipc1", scale="tiny", on="digits", store=str(tmp_path / "store"),
                    workdir=str(tmp_path / "work"), ledger=ledger, device="cpu", progress=False,
                    trajectories=1, trajectory_epochs=5, pack=2)
    # the expert recipe is prefix-exact: whatever the cap above it, the farm trains the 4 epochs MTT reads
    assert out.trajectories[0]["count"] == 1 and out.trajectories[0]["epochs"] == 4
    assert (tmp_path / "work" / "mtt_cifar10_ipc1-tiny-t1-e5-on-digits" / "synthetic.safetensors").exists()
    # the cap of 5 epochs does not bind (4 are read), so it is no departure; the cap of 1 trajectory is one
    assert "trajectories 1" in out.row["departures"] and "epochs" not in out.row["departures"].replace(
        "eval epochs", "") and "expert 1 x 4 epochs" in out.table()
    row = {**out.row, "on": None, "scale": "paper", "departures": "trajectories 8"}
    ledger.write_text(__import__("json").dumps(row) + "\n")
    assert "; 2/5000 it, cpu, trajectories 8, " in list_settings(ledger)


def test_a_budget_stop_resumes_to_the_uninterrupted_result(tmp_path):
    common = dict(scale="tiny", on="digits", device="cpu", progress=False, ledger=tmp_path / "ledger.jsonl")
    straight = reproduce("dm_fashion_mnist_ipc1", workdir=str(tmp_path / "a"), **common)
    stopped = reproduce("dm_fashion_mnist_ipc1", workdir=str(tmp_path / "b"), budget="0.000001s", **common)
    assert (stopped.iterations, stopped.planned, stopped.finished) == (1, 2, False)
    assert "Stopped at iteration 1 of 2 (budget): raydd reproduce dm_fashion_mnist_ipc1 --scale tiny --resume" \
        in stopped.table()
    with pytest.raises(ValueError, match="holds an earlier run of dm_fashion_mnist_ipc1: pass --resume"):
        reproduce("dm_fashion_mnist_ipc1", workdir=str(tmp_path / "b"), **common)
    resumed = reproduce("dm_fashion_mnist_ipc1", workdir=str(tmp_path / "b"), resume=True, **common)
    assert resumed.finished and resumed.row["resumed_from"] == 1
    a, b = (load_synthetic(tmp_path / d / "dm_fashion_mnist_ipc1-tiny-on-digits" / "synthetic.safetensors")
            for d in ("a", "b"))
    assert torch.equal(a.images, b.images) and resumed.result.accuracies == straight.result.accuracies


def test_an_ablation_states_its_knobs_and_stays_out_of_the_list(tmp_path):
    ledger = tmp_path / "ledger.jsonl"
    out = reproduce("dm_fashion_mnist_ipc1", scale="tiny", on="digits", workdir=str(tmp_path / "w"), ledger=ledger,
                    device="cpu", progress=False, overrides={"lr_img": 2.0})
    assert "lr_img=2.0" in out.row["departures"] and out.row["overrides"] == {"lr_img": 2.0}
    assert (tmp_path / "w" / "dm_fashion_mnist_ipc1-tiny-lr_img=2.0-on-digits" / "synthetic.safetensors").exists()
    assert load_synthetic(tmp_path / "w" / "dm_fashion_mnist_ipc1-tiny-lr_img=2.0-on-digits" /
                          "synthetic.safetensors").config["lr_img"] == 2.0
    row = {**out.row, "on": None, "scale": "cpu"}  # as if run on the setting's own data
    ledger.write_text(__import__("json").dumps(row) + "\n")
    assert "| dm_fashion_mnist_ipc1 | 70.7 (DANCE Table 1 = PTLM Table 3 (DM)) | 20000 | – | – |" in list_settings(ledger)


@pytest.mark.parametrize("text, seconds", [("90", 90.0), ("90s", 90.0), ("8m", 480.0), ("1.5h", 5400.0)])
def test_budgets(text, seconds):
    assert parse_budget(text) == seconds


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "mtt_imagenet_ipc1"}, "unknown published setting 'mtt_imagenet_ipc1': e.g. mtt_cifar10_ipc1"),
    ({"scale": "huge"}, "scale 'huge' is invalid: accepted paper, cpu, tiny"),
    ({"budget": "8x"}, "budget '8x' is invalid: expected a positive duration such as 90s, 8m or 1.5h"),
    ({"backend": "dask"}, "backend 'dask' is invalid: accepted local, ray"),
    ({"trajectories": 0}, "trajectories=0 is invalid: expected an integer >= 1 or None"),
    ({"pack": 0}, "pack=0 is invalid: expected an integer >= 1"),
    ({"overrides": {"bogus": 1}}, "unknown DMConfig knob 'bogus': accepted "),
])
def test_bad_input_before_any_work(tmp_path, kwargs, message):
    args = {"name": "dm_fashion_mnist_ipc1", "workdir": str(tmp_path / "w"), "ledger": "", "progress": False,
            **kwargs}
    with pytest.raises(ValueError, match=message):
        reproduce(args.pop("name"), **args)
    assert not (tmp_path / "w").exists()
