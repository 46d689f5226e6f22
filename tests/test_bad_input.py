"""Bad input on the command line: one clear line naming the value and what is accepted, exit code 2,
before any work — and before Ray starts (``ray.init`` is made to fail here: none of these may reach it)."""
from __future__ import annotations

import pytest
import torch
import yaml

from raydd.cli import main


@pytest.fixture
def no_ray(monkeypatch):
    """Ray counts as not started, and starting it fails the test."""
    ray = pytest.importorskip("ray")

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started before the bad input was reported")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def run_cli(argv, capsys) -> tuple[int, list[str]]:
    code = main(argv)
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


def write_spec(path, **fields):
    spec = {"name": "bad", "dataset": "digits", "methods": ["dm"], "ipcs": [1], "iterations": 2,
            "storage": str(path.parent / "sweeps"), **fields}
    path.write_text(yaml.safe_dump(spec))
    return str(path)


CASES = {
    "resolution 0": (lambda tmp: ["condense", "--method", "dm", "--dataset", "digits", "--ipc", "1", "--resolution",
                                  "0", "--iterations", "1", "--out", str(tmp / "o.safetensors")],
                     "resolution=0 is invalid: expected an image side in pixels >= 1"),
    "digits with a data root that does not exist": (
        lambda tmp: ["condense", "--method", "dm", "--dataset", "digits", "--ipc", "1", "--data-root",
                     str(tmp / "missing"), "--iterations", "1"],
        "does not exist (digits is built in and reads no data root: drop --data-root)"),
    "ipc larger than a class": (
        lambda tmp: ["condense", "--method", "dm", "--dataset", "digits", "--ipc", "500", "--iterations", "1"],
        "ipc=500 is larger than the smallest class of digits/train"),
    "mnist without its files": (
        lambda tmp: ["farm", "--store", str(tmp / "s"), "--dataset", "mnist", "--data-root", str(tmp / "none")],
        "or pass --download"),
    "farm on a GPU this machine lacks": (
        lambda tmp: ["farm", "--store", str(tmp / "s"), "--device", "cuda", "--trajectories", "1"],
        "device 'cuda' requested but CUDA is not available here: use 'cpu' or 'auto'"),
    "GPUs per worker this machine lacks": (
        lambda tmp: ["farm", "--store", str(tmp / "s"), "--gpus-per-worker", "1", "--trajectories", "1"],
        "gpus_per_worker=1 but this machine has 0 GPU(s) and no Ray cluster is joined"),
    "store that is a file": (
        lambda tmp: ["farm", "--store", str(tmp / "file.txt"), "--trajectories", "1"],
        "is a file, not a directory"),
    "store that cannot be written": (
        lambda tmp: ["farm", "--store", str(tmp / "file.txt" / "below"), "--trajectories", "1"],
        "cannot be written"),
    "verify a store that does not exist": (
        lambda tmp: ["store", "verify", str(tmp / "nowhere")], "does not exist: farm into it first"),
    "binary sweep file": (lambda tmp: ["sweep", str(tmp / "binary.yaml")], "binary.yaml is not a text (UTF-8) YAML"),
    "sweep IPC larger than a class": (
        lambda tmp: ["sweep", write_spec(tmp / "ipc.yaml", ipcs=[1, 500])],
        "method 'dm' at IPC 500: ipc=500 is larger than the smallest class of digits/train"),
    "sweep GPUs this machine lacks": (
        lambda tmp: ["sweep", write_spec(tmp / "gpu.yaml", resources={"cpu": 1, "gpu": 1})],
        "resources.gpu=1 but this machine has 0 GPU(s)"),
    "robustness scores under the EDC protocol": (
        lambda tmp: ["evaluate", str(tmp / "set.safetensors"), "--metrics", "lrs", "--protocol", "edc"],
        "--metrics runs on the standard protocol, not --protocol edc"),
    "EDC cutmix without teachers": (
        lambda tmp: ["evaluate", str(tmp / "set.safetensors"), "--protocol", "edc", "--set", "cutmix_alpha=1"],
        "cutmix_alpha=1.0 needs teachers=true"),
    "EDC weight decay target": (
        lambda tmp: ["evaluate", str(tmp / "set.safetensors"), "--protocol", "edc", "--set", "weight_decay_on=bias"],
        "weight_decay_on='bias' is invalid: accepted weights, all"),
    "an unknown robustness score": (
        lambda tmp: ["evaluate", str(tmp / "set.safetensors"), "--metrics", "hlr", "fid"],
        "metrics ['hlr', 'fid'] are invalid: accepted one or more of hlr, ior, lrs, ars"),
    "an unknown published setting": (
        lambda tmp: ["reproduce", "mtt_imagenet_ipc1", "--workdir", str(tmp / "w")],
        "unknown published setting 'mtt_imagenet_ipc1': e.g. mtt_cifar10_ipc1"),
    "reproduce without a setting": (lambda tmp: ["reproduce"], "name a published setting (raydd reproduce --list"),
    # issue 23: flags the CLI used to drop, checks that came after the work
    "farm --pack 0": (lambda tmp: ["farm", "--store", str(tmp / "s"), "--pack", "0"], "pack=0 is invalid"),
    "farm --pack with a recipe that trains one network": (
        lambda tmp: ["farm", "--store", str(tmp / "s"), "--recipe", "ssd_teacher", "--pack", "2"],
        "pack=2 is invalid for recipe 'ssd_teacher'"),
    "an evaluation network that does not fit the data": (
        lambda tmp: ["condense", "--method", "dm", "--dataset", "digits", "--ipc", "1", "--iterations", "2",
                     "--evaluate", "--eval-model", "resnet18", "--out", str(tmp / "o.safetensors")],
        "instance-normalises 1x1 feature maps"),
    "condense --out where nothing can be written": (
        lambda tmp: ["condense", "--method", "dm", "--dataset", "digits", "--ipc", "1", "--iterations", "2",
                     "--out", str(tmp / "file.txt" / "o.safetensors")],
        "--out " + "{tmp}/file.txt/o.safetensors cannot be written"),
    "condense --out that is a directory": (
        lambda tmp: ["condense", "--method", "dm", "--dataset", "digits", "--ipc", "1", "--iterations", "2",
                     "--out", str(tmp)], "is a directory: expected a file path"),
    "reproduce --ledger under a file": (
        lambda tmp: ["reproduce", "dm_fashion_mnist_ipc1", "--scale", "tiny", "--on", "digits", "--workdir",
                     str(tmp / "w"), "--ledger", str(tmp / "file.txt" / "ledger.jsonl")], "--ledger"),
    "reproduce --workdir under a file": (
        lambda tmp: ["reproduce", "dm_fashion_mnist_ipc1", "--scale", "tiny", "--on", "digits", "--workdir",
                     str(tmp / "file.txt" / "w")], "--workdir"),
    "sweep --storage that is a file": (
        lambda tmp: ["sweep", write_spec(tmp / "s.yaml"), "--storage", str(tmp / "file.txt")],
        "--storage " + "{tmp}/file.txt is a file: expected a folder"),
    "store tensorboard into a file": (
        lambda tmp: ["store", "tensorboard", str(tmp / "store"), str(tmp / "file.txt")], "is a file: expected a folder"),
    "a Ray address nobody answers": (
        lambda tmp: ["farm", "--store", str(tmp / "s"), "--address", "ray://127.0.0.1:1", "--trajectories", "1"],
        "no Ray cluster answers there"),
    "a sweep on a Ray address nobody answers": (
        lambda tmp: ["sweep", write_spec(tmp / "a.yaml"), "--address", "127.0.0.1:1"], "no Ray cluster answers"),
    "an engine that does not exist": (
        lambda tmp: ["farm", "--store", str(tmp / "s"), "--engine", "fast"], "engine='fast' is invalid"),
    "farm --set a bool that is not one": (
        lambda tmp: ["farm", "--store", str(tmp / "s"), "--set", "dsa=maybe"],
        "--set dsa=maybe is invalid: ExpertConfig.dsa expects bool (true or false)"),
    "farm --set an option the recipe lacks": (
        lambda tmp: ["farm", "--store", str(tmp / "s"), "--recipe", "pretrain", "--set", "keep_epochs=3"],
        "unknown PretrainConfig key 'keep_epochs': accepted epochs, lr,"),
    "condense --set the DSA grid to a non-bool": (
        lambda tmp: ["condense", "--method", "datm", "--dataset", "digits", "--ipc", "1", "--set",
                     "dsa_align_corners=maybe"],
        "--set dsa_align_corners=maybe is invalid: DATMConfig.dsa_align_corners expects bool"),
    "condense --set DANCE's per-class steps with the classes embedded together": (
        lambda tmp: ["condense", "--method", "dance", "--dataset", "digits", "--ipc", "1", "--set",
                     "step_per_class=true", "--set", "embed_classes_together=true"],
        "DANCEConfig.step_per_class=True with embed_classes_together=True is refused"),
    "condense --set an int knob given a fraction": (
        lambda tmp: ["condense", "--method", "mtt", "--dataset", "digits", "--ipc", "1", "--set", "syn_steps=2.5"],
        "--set syn_steps=2.5 is invalid: MTTConfig.syn_steps expects int"),
    "evaluate --set a float given a word": (
        lambda tmp: ["evaluate", str(tmp / "set.safetensors"), "--set", "momentum=high"],
        "--set momentum=high is invalid: EvalConfig.momentum expects float"),
    "reproduce --set without a value": (
        lambda tmp: ["reproduce", "ptlm_fashion_mnist_ipc10", "--scale", "cpu", "--set", "total_iterations"],
        "--set 'total_iterations' is invalid: expected KEY=VALUE"),
}


def save_a_set(path) -> None:
    from raydd.data.datasets import load_dataset
    from raydd.methods import SyntheticSet

    info = load_dataset("digits", "train").info
    SyntheticSet(torch.zeros(10, 1, 8, 8), torch.arange(10), {**info.to_dict(), "zca": False}, "random").save(path)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_before_any_work(case, tmp_path, capsys, no_ray):
    if torch.cuda.is_available() and "GPU" in case:
        pytest.skip("this machine has a GPU")
    (tmp_path / "file.txt").write_text("not a store")
    (tmp_path / "binary.yaml").write_bytes(bytes(range(128, 256)))
    save_a_set(tmp_path / "set.safetensors")
    (tmp_path / "store").mkdir()
    argv, expected = CASES[case]
    expected = expected.replace("{tmp}", str(tmp_path))
    code, lines = run_cli(argv(tmp_path), capsys)
    errors = [line for line in lines if ": error: " in line]
    assert code == 2 and len(errors) == 1 and expected in errors[0], lines
    assert not any("Traceback" in line for line in lines), lines
    if argv(tmp_path)[0] == "condense":  # no "dm on digits ... -> file" header for a run that never starts
        assert len(lines) == 1, lines
