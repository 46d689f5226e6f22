"""The referee table: `raydd evaluate SET SET ... --protocols standard edc --metrics ...`, one table with
Random beside the sets under every protocol, through the command line."""
from __future__ import annotations

import json

import pytest
import torch

import raydd.evaluation.robustness as robustness
from raydd.cli import main
from raydd.evaluation.referee import random_like
from raydd.methods.synthetic import SyntheticSet

TINY = ["--models", "convnet", "--width", "16", "--depth", "2", "--num-models", "1", "--epochs", "2"]


def a_set(digits, first: int, per_class: int, name: str = "digits") -> SyntheticSet:
    train, _ = digits
    idx = torch.cat([train.class_indices(c)[first:first + per_class] for c in range(10)])
    return SyntheticSet(images=train.images[idx].clone(), labels=train.labels[idx].clone(),
                        dataset={**train.info.to_dict(), "name": name, "zca": False}, method="dm",
                        config={"ipc": per_class}, syn_lr=0.01)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_two_sets_under_two_protocols_with_random_beside_them(digits, tmp_path, capsys, monkeypatch):
    a_set(digits, 0, 2).save(tmp_path / "a.safetensors")
    a_set(digits, 5, 2).save(tmp_path / "b.safetensors")
    full_data_networks = []
    train_and_test = robustness.train_and_test

    def counting(images, *args, **kwargs):
        if len(images) == len(digits[0]):
            full_data_networks.append(1)
        return train_and_test(images, *args, **kwargs)

    monkeypatch.setattr(robustness, "train_and_test", counting)
    code, out, err = run(capsys, "evaluate", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"),
                         "--protocols", "standard", "edc", "--metrics", "hlr", "ior", "--metric-runs", "1",
                         "--json", *TINY)
    assert code == 0, err
    rows = json.loads(out)
    names = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    assert [(r["set"], r["protocol"]) for r in rows] == [
        (str(names[0]), "standard"), (str(names[1]), "standard"), ("Random, 2 per class", "standard"),
        (str(names[0]), "edc"), (str(names[1]), "edc"), ("Random, 2 per class", "edc")]
    for row in rows:
        assert len(row["result"]["accuracies"]) == 1 and 0.0 <= row["result"]["mean"] <= 1.0
        if row["protocol"] == "standard":  # the scores: under the standard protocol only
            assert set(row["robustness"]["summary"]) == {"hlr", "hlr_std", "ior", "ior_std"}
        else:
            assert row["robustness"] is None
    assert len(full_data_networks) == 1  # one full-data network for the whole table, not one per set
    fulls = {row["robustness"]["full_acc"] for row in rows if row["robustness"]}
    assert len(fulls) == 1


def test_the_markdown_table_and_a_random_per_images_per_class(digits, tmp_path, capsys):
    a_set(digits, 0, 2).save(tmp_path / "a.safetensors")
    a_set(digits, 0, 1).save(tmp_path / "one.safetensors")
    code, out, err = run(capsys, "evaluate", str(tmp_path / "a.safetensors"), str(tmp_path / "one.safetensors"),
                         *TINY)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0] == "| set | protocol | network | accuracy % | per network |"
    body = [line.split(" | ")[0].lstrip("| ") for line in lines[2:]]
    assert body == [str(tmp_path / "a.safetensors"), str(tmp_path / "one.safetensors"), "Random, 2 per class",
                    "Random, 1 per class"]
    assert "2 set(s) and Random under standard" in err


def test_random_is_real_training_images_with_each_sets_counts(digits):
    train, _ = digits
    syn = a_set(digits, 3, 2)
    rand = random_like(syn, train, seed=4)
    assert torch.equal(torch.bincount(rand.labels, minlength=10), torch.full((10,), 2))
    for image, label in zip(rand.images, rand.labels):
        matches = (train.images == image).flatten(1).all(1).nonzero().flatten()
        assert len(matches) and (train.labels[matches] == label).all()
    again = random_like(syn, train, seed=4)
    assert torch.equal(again.images, rand.images)
    assert not torch.equal(random_like(syn, train, seed=5).images, rand.images)


@pytest.mark.parametrize("extra, message", [
    (["--metrics", "hlr", "--protocols", "edc"], "--metrics scores under the standard protocol: add standard"),
    (["--protocols", "standard", "--protocol", "edc"], "--protocols names every protocol of the table"),
])
def test_bad_referee_flags_are_one_line(digits, tmp_path, capsys, extra, message):
    a_set(digits, 0, 2).save(tmp_path / "a.safetensors")
    a_set(digits, 2, 2).save(tmp_path / "b.safetensors")
    code, out, err = run(capsys, "evaluate", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"),
                         *extra)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and message in lines[0], err


def test_sets_of_different_data_are_refused_before_any_training(digits, tmp_path, capsys):
    a_set(digits, 0, 2).save(tmp_path / "a.safetensors")
    a_set(digits, 0, 2, name="mnist").save(tmp_path / "m.safetensors")
    code, out, err = run(capsys, "evaluate", str(tmp_path / "a.safetensors"), str(tmp_path / "m.safetensors"))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "the referee table compares sets of one dataset" in lines[0], err
