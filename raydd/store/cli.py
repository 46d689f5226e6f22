"""Text for `raydd store ls|info|verify <root>`: each function returns what to print."""

from __future__ import annotations

import json
import math
import warnings
from typing import Any, Sequence

from .schema import CorruptTrajectoryWarning
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


def format_ls(store: TrajectoryStore, *, check: bool = True, **filters) -> str:
    """One row per trajectory file: id, dataset, model, kind, recipe, snapshots, dtype, size (MiB), final
    test accuracy (%), wall time (s) and its status: ``ok``, or ``CORRUPT`` with the reason. With ``check``
    every snapshot's crc32 is read (the whole file); without, only footers (files too damaged to list are
    still shown)."""
    with warnings.catch_warnings(record=True) as skipped:  # damaged footers: shown as rows, not warnings
        warnings.simplefilter("always", CorruptTrajectoryWarning)
        infos = store.list(**filters)
    status = {}
    if check:
        for result in store.verify(include_temps=False):
            status[result.path] = "ok" if result.ok else f"CORRUPT: {result.reason}"
    header = ["id", "dataset", "model", "kind", "recipe", "snapshots", "dtype", "size_MiB", "test_acc_%", "wall_s",
              "status"]
    rows = [
        [i.trajectory_id, i.dataset_name, i.model_name, i.kind, i.recipe, str(i.num_snapshots), i.dtype,
         f"{i.size_bytes / 2**20:.2f}", _percent(i.final_metrics.get("test_acc")), f"{i.wall_time_s:.1f}",
         status.get(i.path, "ok" if check else "unchecked")]
        for i in infos
    ]
    for w in skipped:
        if issubclass(w.category, CorruptTrajectoryWarning):
            rows.append(["-"] * (len(header) - 1) + [f"CORRUPT: {w.message}"])
    if not rows:
        return f"no trajectories in {store.root}" + (f" matching {filters}" if filters else "")
    bad = sum(r[-1].startswith("CORRUPT") for r in rows)
    return table(header, rows) + f"\n{len(infos)} trajectories" + (f", {bad} corrupt" if bad else "")


def _percent(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def format_info(store: TrajectoryStore, trajectory_id: str) -> str:
    """The trajectory's metadata as indented JSON, then its per-epoch metrics (``trajectory_id``: an id or a
    unique prefix of one)."""
    with store.open(store.resolve_id(trajectory_id)) as traj:
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
    """One line per file (OK / WARN / FAIL with the reason) and a summary; exit code 1 iff a published
    trajectory is damaged (a dead writer's leftovers are warnings: ``raydd store gc`` removes them)."""
    results = store.verify()
    lines = [f"{'FAIL' if not r.ok else 'WARN' if r.warning else 'OK  '}  {r.path}"
             + ("" if r.reason == "ok" else f": {r.reason}") for r in results]
    bad = sum(not r.ok for r in results)
    warned = sum(r.ok and r.warning for r in results)
    lines.append(f"{len(results)} files checked, {bad} problem{'s' if bad != 1 else ''}"
                 + (f", {warned} warning{'s' if warned != 1 else ''} (raydd store gc {store.root})" if warned else "")
                 + f" in {store.root}")
    return "\n".join(lines), (1 if bad else 0)


def format_gc(store: TrajectoryStore) -> str:
    removed = store.gc()
    return "\n".join([*(f"removed {p}" for p in removed),
                      f"{len(removed)} leftover file{'s' if len(removed) != 1 else ''} of dead writers removed "
                      f"from {store.root}"])
