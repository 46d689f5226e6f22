"""Farm orchestration: plan tasks, skip what the store has, train the rest.

Backends:
- ``ray``: a pool of FarmWorker actors (num_cpus / fractional num_gpus each) on a
  local or existing cluster; the data is placed in the object store once and
  mapped by every worker on a node; tasks are handed out dynamically; a dead
  worker is replaced and its trajectory retried from scratch (the store only
  publishes complete files).
- ``local``: the same tasks one after another in this process, no Ray (GPU
  machines without Ray, debugging).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

from ..store import TrajectoryStore
from .progress import FarmProgress, summary_table
from .spec import FarmSpec
from .task import FarmData, TrajectoryResult, TrajectoryTask, data_fingerprint, plan_tasks, prepare_data, \
    run_trajectory

ProgressEvent = dict  # {"type": "epoch"|"done"|"retry", "trajectory_id", "epoch", "total", "pid", ...}


@dataclass
class FarmReport:
    trajectory_ids: list[str]  # every trajectory of the spec, in seed order (trained or already stored)
    trained: list[TrajectoryResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    wall_time_s: float = 0.0

    def table(self) -> str:
        return summary_table(self.trained, self.skipped)


def farm(spec: FarmSpec, *, progress: bool = True, on_event: Callable[[ProgressEvent], None] | None = None,
         data: FarmData | None = None) -> FarmReport:
    """Farm the trajectories of ``spec`` into its store and return their ids.

    With ``spec.tensorboard`` set, every trajectory of the spec (trained now or before) gets
    its per-epoch curves written there, read back from the store.

    ``on_event`` receives every progress event (tests use it to inject faults).
    """
    start = time.perf_counter()
    data = data if data is not None else prepare_data(spec)
    tasks = plan_tasks(spec, data, data_fingerprint(data))
    store = TrajectoryStore(spec.store)
    todo = [t for t in tasks if not store.exists(t.trajectory_id)]
    skipped = [t.trajectory_id for t in tasks if t not in todo]
    report = FarmReport([t.trajectory_id for t in tasks], skipped=skipped)
    if todo:
        bar = FarmProgress(len(todo), len(skipped), enabled=progress)
        try:
            if spec.backend == "local":
                report.trained = _run_local(spec, todo, data, store, bar, on_event)
            else:
                from .ray_pool import run_on_ray

                report.trained = run_on_ray(spec, todo, data, bar, on_event)
        finally:
            bar.close()
    if spec.tensorboard:
        from ..store.tensorboard import write_curves

        write_curves(store, spec.tensorboard, report.trajectory_ids)  # skips runs already written
    report.wall_time_s = time.perf_counter() - start
    return report


def _run_local(spec, todo: list[TrajectoryTask], data: FarmData, store, bar: FarmProgress, on_event
               ) -> list[TrajectoryResult]:
    results = []
    for task in todo:
        def on_epoch(epoch, total, metrics, _tid=task.trajectory_id):
            bar.epoch(_tid, epoch, total)
            if on_event:
                on_event({"type": "epoch", "trajectory_id": _tid, "epoch": epoch, "total": total,
                          "metrics": metrics, "pid": os.getpid()})

        result = run_trajectory(task, data, device=spec.device, on_epoch=on_epoch, store=store)
        bar.finished(task.trajectory_id)
        results.append(result)
    return results
