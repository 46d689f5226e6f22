"""TensorBoard curves of stored trajectories: one run per trajectory, one scalar per metric.

The farm calls ``write_curves`` for the trajectories it just trained (``FarmSpec.tensorboard``,
``raydd farm --tensorboard DIR``); ``raydd store tensorboard ROOT DIR`` does it for a whole
store. The curves are read from the store itself (the per-epoch metrics every snapshot
carries), so they are the numbers a method will see, and work for a store on S3 too::

    DIR/<kind>/<dataset>/<model>/<trajectory_id>/events.out.tfevents...
        <metric>   (train_loss, train_acc, test_acc, ...) at every stored epoch
        text "trajectory": recipe, seed, recipe config, wall time
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

from .store import TrajectoryStore


def run_dir(logdir: str | Path, info) -> Path:
    return Path(logdir) / info.kind / info.dataset_name / info.model_name / info.trajectory_id


def write_curves(store: TrajectoryStore, logdir: str | Path, trajectory_ids: Iterable[str] | None = None,
                 **filters) -> list[Path]:
    """Write each trajectory's per-epoch metrics as TensorBoard scalars; return the run directories.

    ``trajectory_ids`` None: every valid trajectory of the store matching ``filters``. A run
    directory that already has event files is skipped (the trajectory is immutable).
    """
    from torch.utils.tensorboard import SummaryWriter

    if "://" in str(logdir):
        raise ValueError(f"tensorboard logdir={logdir!r} is invalid: expected a local directory")
    wanted = None if trajectory_ids is None else set(trajectory_ids)
    written = []
    for info in store.list(**filters):
        if wanted is not None and info.trajectory_id not in wanted:
            continue
        path = run_dir(logdir, info)
        if path.is_dir() and any(path.glob("events.out.tfevents.*")):
            continue
        with store.open(info.trajectory_id) as traj:
            rows = traj.metrics()
        writer = SummaryWriter(log_dir=str(path))
        try:
            for row in rows:
                epoch = int(row["epoch"])
                for name, value in row.items():
                    if name != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                        writer.add_scalar(name, value, epoch)
            summary = {"recipe": info.recipe, "seed": info.seed, "model": info.model_name,
                       "dataset": info.dataset_name, "wall_time_s": round(info.wall_time_s, 1),
                       "recipe_config": info.meta.get("recipe_config", {})}
            writer.add_text("trajectory", "```\n" + json.dumps(summary, indent=2, default=str) + "\n```", 0)
        finally:
            writer.close()
        written.append(path)
    return written
