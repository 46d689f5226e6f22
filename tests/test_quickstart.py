"""The embedded quickstart spec is valid and is the same sweep as sweeps/quick.yaml."""
from __future__ import annotations

from pathlib import Path

from raydd.cli import build_parser
from raydd.quickstart import quickstart_spec
from raydd.sweep.spec import SweepSpec

QUICK = Path(__file__).resolve().parents[1] / "sweeps" / "quick.yaml"


def test_embedded_spec_matches_sweeps_quick_yaml():
    embedded = quickstart_spec().to_dict()
    editable = SweepSpec.from_yaml(QUICK).to_dict()
    assert embedded.pop("name") == "quickstart"
    editable.pop("name")
    assert embedded == editable


def test_quickstart_overrides_and_cli_wiring(tmp_path):
    spec = quickstart_spec(store=str(tmp_path / "s"), storage=str(tmp_path / "w"))
    assert spec.store == str(tmp_path / "s") and spec.dataset == "digits" and len(spec.methods) >= 3
    args = build_parser().parse_args(["quickstart", "--store", "x", "--quiet"])
    assert args.func.__name__ == "cmd_quickstart" and args.store == "x"
