"""Issue 25 where the user types it: --engine (farm, evaluate), --pack, reproduce --plan and --campaign."""
from __future__ import annotations

import json

import pytest

from raydd.cli import build_parser, farm_spec_from_args, main


def test_farm_flags_reach_the_spec():
    spec = farm_spec_from_args(build_parser().parse_args(["farm", "--pack", "4", "--engine", "graph"]))
    assert spec.pack == 4 and spec.engine == "graph"


@pytest.mark.parametrize("argv, message", [
    (["farm", "--engine", "fast"], "engine='fast' is invalid"),
    (["farm", "--pack", "0"], "pack=0"),
    (["farm", "--recipe", "ssd_teacher", "--pack", "2"], "pack=2 is invalid for recipe 'ssd_teacher'"),
    (["farm", "--recipe", "ssd_teacher", "--engine", "graph"], "engine='graph' is invalid for recipe 'ssd_teacher'"),
    (["reproduce", "mtt_cifar10_ipc1", "--engine", "fast", "--plan"], None),
])
def test_bad_engine_and_pack_are_one_line(capsys, argv, message):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    if message is None:  # --plan does not run anything, so it does not look at the engine
        assert code == 0
        return
    assert code == 2 and message in err and "\n" not in err


def test_reproduce_plan_farms_only_what_the_method_reads(capsys):
    assert main(["reproduce", "mtt_cifar10_ipc1", "--plan"]) == 0
    out = capsys.readouterr().out
    assert "farm: expert 100 x 4 epochs (the first 4 of the paper's 50" in out
    assert "5000 of the paper's 5000 iterations" in out
    assert main(["reproduce", "dance_fashion_mnist_ipc10", "--plan"]) == 0
    assert "farm: pretrain 5 x 60 epochs" in capsys.readouterr().out  # a decaying schedule farms whole


@pytest.mark.slow
def test_a_campaign_resumes_where_the_last_sitting_stopped(tmp_path, capsys):
    """Two sittings of the smoke campaign: the first stops every entry at a checkpoint after one iteration (a
    budget shorter than a step), the second resumes them to the end and writes their rows; a third runs nothing."""
    camp, store = tmp_path / "campaign", tmp_path / "store"
    common = ["reproduce", "--campaign", str(camp), "--smoke", "--time", "10m", "--store", str(store), "--quiet",
              "--only", "dm_fashion_mnist_ipc10", "mtt_cifar10_ipc1", "--eval-reserve", "1s", "--engine", "graph"]
    assert main(common + ["--budget", "0.001s"]) == 0
    first = capsys.readouterr().out
    assert first.count("| checkpoint |") == 2 and not (camp / "ledger.jsonl").exists()
    state = json.loads((camp / "campaign.json").read_text())
    assert {k: v["iterations"] for k, v in state["entries"].items()} == {"dm_fashion_mnist_ipc10": 1,
                                                                         "mtt_cifar10_ipc1": 1}
    assert main(common) == 0
    assert capsys.readouterr().out.count("| done |") == 2
    rows = [json.loads(line) for line in (camp / "ledger.jsonl").read_text().splitlines()]
    assert [r["setting"] for r in rows] == ["dm_fashion_mnist_ipc10", "mtt_cifar10_ipc1"]
    for r in rows:
        assert r["resumed_from"] == 1 and r["iterations"] == 2 and r["acc_mean"] is not None
        assert r["campaign"]["resumed"] and len(r["campaign"]["sittings"]) == 2
        assert "same seeds" in r["campaign"]["how"]
    assert main(common) == 0
    assert "nothing left" in capsys.readouterr().out


def test_campaign_needs_its_time_and_a_writable_folder(tmp_path, capsys):
    assert main(["reproduce", "--campaign", str(tmp_path / "c"), "--smoke"]) == 2
    assert "a campaign needs --time" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["reproduce", "--campaign", str(blocker / "c"), "--time", "1m"]) == 2
    assert "cannot be written" in capsys.readouterr().err
