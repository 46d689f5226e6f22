"""Ctrl-C in every command: one line saying what was kept and the command that continues, exit 130, and the
continuation works (issue 23). The sweep's case is in tests/test_sweep_resume.py, the farm's in test_faults.py."""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from raydd.cli import main

pytestmark = pytest.mark.slow


def interrupt(argv: list[str], after_s: float, cwd, marker: str | None = None) -> tuple[int, str]:
    """Run ``raydd ARGV``, wait for a stderr line containing ``marker`` (the work has begun), ``after_s`` more
    seconds, then Ctrl-C; (exit code, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "raydd.cli", *argv], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seen = []
    if marker is not None:
        for line in proc.stderr:
            seen.append(line)
            if marker in line:
                break
    time.sleep(after_s)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, "".join(seen) + err


def test_condense_keeps_its_state_and_names_the_command_that_continues(tmp_path):
    out = tmp_path / "dm.safetensors"
    argv = ["condense", "--method", "dm", "--dataset", "digits", "--ipc", "1", "--iterations", "3000",
            "--set", "width=16", "--out", str(out), "--quiet"]
    code, err = interrupt(argv, 3, tmp_path, marker="raydd condense: dm on digits")
    lines = [line for line in err.splitlines() if "interrupted" in line]
    assert code == 130 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    checkpoint = tmp_path / "dm.checkpoint.safetensors"
    assert checkpoint.exists() and f"its state is in {checkpoint}" in lines[0]
    command = lines[0].split("continue with: ", 1)[1]
    assert command.endswith(f"--checkpoint {checkpoint}") and command.startswith("raydd condense --method dm")
    continued = shlex.split(command)[1:]
    at = continued.index("--iterations")
    continued[at + 1] = "1"  # the checkpoint is past iteration 1: the continuation saves the set and runs nothing
    assert main(continued) == 0
    assert out.exists()


def test_evaluate_says_nothing_was_kept(tmp_path):
    from raydd.data.datasets import load_dataset
    from raydd.methods import SyntheticSet

    info = load_dataset("digits", "train").info
    path = tmp_path / "set.safetensors"
    import torch

    SyntheticSet(torch.zeros(10, 1, 8, 8), torch.arange(10), {**info.to_dict(), "zca": False}, "random").save(path)
    code, err = interrupt(["evaluate", str(path), "--epochs", "100000", "--num-models", "1"], 3, tmp_path,
                          marker="raydd evaluate: ")
    assert code == 130 and "Traceback" not in err, err[-2000:]
    assert [line for line in err.splitlines() if line.strip()][-1] == \
        "raydd evaluate: interrupted; nothing of it was kept: run the same command again"


def test_an_interrupt_inside_a_lazy_import_still_exits_130(tmp_path):
    """CPython kills a ``python -m`` process with SIGINT at exit when a KeyboardInterrupt ended a string exec (a
    dataclass defined by a lazy import), even one the command caught: main() must still exit with its 130."""
    (tmp_path / "interrupted_in_exec.py").write_text(
        "import sys\n"
        "from raydd import cli\n"
        "def stopped(args):\n"
        "    try:\n"
        "        exec('raise KeyboardInterrupt')  # what a Ctrl-C during a dataclass's exec looks like\n"
        "    except KeyboardInterrupt:\n"
        "        print('kept', file=sys.stderr)\n"
        "        return 130\n"
        "cli.cmd_store = stopped\n"
        "sys.exit(cli.main(['store', 'ls', 'nowhere']))\n")
    proc = subprocess.run([sys.executable, "-m", "interrupted_in_exec"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert (proc.returncode, proc.stderr.strip().splitlines()[-1:]) == (130, ["kept"]), proc.stderr[-2000:]


def test_reproduce_names_its_checkpoint_and_resume(tmp_path, monkeypatch, capsys):
    import raydd.reproduce.run as run

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "reproduce", stopped)
    argv = ["reproduce", "dm_fashion_mnist_ipc1", "--scale", "tiny", "--on", "digits", "--workdir", str(tmp_path)]
    checkpoint = tmp_path / "dm_fashion_mnist_ipc1-tiny-on-digits" / "method.safetensors"
    assert main(argv) == 130
    assert "trajectories farmed so far stay" in capsys.readouterr().err
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"")
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert f"the condensation's state is in {checkpoint}" in err and err.strip().endswith(
        f"continue with: raydd {' '.join(argv)} --resume")
