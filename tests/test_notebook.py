"""notebooks/quickstart.ipynb executes end to end on the tiny offline default."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("nbclient")
    # A separate process: the notebook starts and stops its own Ray instance.
    script = (
        "import nbformat, nbclient, sys;"
        f"nb = nbformat.read({str(NOTEBOOK)!r}, as_version=4);"
        "nbclient.NotebookClient(nb, timeout=600, kernel_name='python3').execute();"
        f"nbformat.write(nb, {str(tmp_path / 'executed.ipynb')!r})"
    )
    env = {**os.environ, "RAYDD_NOTEBOOK_SCALE": "tiny", "RAYDD_NOTEBOOK_DIR": str(tmp_path / "work")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    executed = nbformat.read(tmp_path / "executed.ipynb", as_version=4)
    outputs = "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.outputs)
    assert "Leaderboard" in outputs and "TensorBoard" in outputs
    assert (tmp_path / "work" / "accuracy_vs_ipc.png").stat().st_size > 1000
    images = [o for c in executed.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # the plot and the synthetic images
