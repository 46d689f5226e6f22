"""Text for `raydd store ls|info|verify <root>`: each function returns what to print."""

from __future__ import annotations

import json
import math
from typing import Any, Sequence

from .store import TrajectoryStore


def _cell(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain aligned text table; columns whose cells all look numeric are right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    def numeric(i: int) -> bool:
        return bool(rows) and all(r[i] == "-" or r[i].replace(".", "", 1).replace("-", "", 1).isdigit() for r in rows)

    right = [numeric(i) for i in range(len(header))]
    lines = []
    for row in [list(header), *rows]:
        cells = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def format_ls(store: TrajectoryStore, **filters) -> str:
    """One row per valid trajectory: id, dataset, model, kind, recipe, snapshots,
    dtype, size (MiB), final test_acc, wall time (s)."""
    infos = store.list(**filters)
    if not infos:
        return f"no trajectories in {store.root}" + (f" matching {filters}" if filters else "")
    header = ["id", "dataset", "model", "kind", "recipe", "snapshots", "dtype", "size_MiB", "test_acc", "wall_s"]
    rows = [
        [i.trajectory_id, i.dataset_name, i.model_name, i.kind, i.recipe, str(i.num_snapshots), i.dtype,
         f"{i.size_bytes / 2**20:.2f}", _cell(i.final_metrics.get("test_acc")), f"{i.wall_time_s:.1f}"]
        for i in infos
    ]
    return table(header, rows) + f"\n{len(infos)} trajectories"


def format_info(store: TrajectoryStore, trajectory_id: str) -> str:
    """The trajectory's metadata as indented JSON, then its per-epoch metrics."""
    with store.open(trajectory_id) as traj:
        info, metrics = traj.info, traj.metrics()
    summary = [
        f"trajectory {info.trajectory_id}",
        f"path       {info.path}",
        f"size       {info.size_bytes / 2**20:.2f} MiB",
        f"snapshots  {info.num_snapshots} (epochs {info.epochs[0]}..{info.epochs[-1]})",
        f"params     {info.num_params} x {info.dtype}",
        f"wall time  {info.wall_time_s:.1f} s",
        "",
        "metadata:",
        json.dumps(info.meta, indent=2),
        "",
        "metrics:",
    ]
    names = info.meta["metric_names"]
    rows = [[str(m["epoch"]), *(_cell(m[n]) for n in names)] for m in metrics]
    return "\n".join(summary) + "\n" + table(["epoch", *names], rows)


def format_verify(store: TrajectoryStore) -> tuple[str, int]:
    """One line per file (OK / FAIL with the reason) and a summary; exit code 0 iff all ok."""
    results = store.verify()
    lines = [f"{'OK  ' if r.ok else 'FAIL'}  {r.path}" + ("" if r.reason == "ok" else f": {r.reason}")
             for r in results]
    bad = sum(not r.ok for r in results)
    lines.append(f"{len(results)} files checked, {bad} problem{'s' if bad != 1 else ''} in {store.root}")
    return "\n".join(lines), (1 if bad else 0)
