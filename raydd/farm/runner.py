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
from ..training import check_gpus_here, resolve_device
from .claims import WorkQueue, take_pack
from .progress import FarmProgress, summary_table
from .spec import FarmSpec
from .task import (FarmData, TrajectoryResult, data_fingerprint, link_prefixes, plan_tasks, prepare_data,
                   run_trajectories)

ProgressEvent = dict  # {"type": "epoch"|"done"|"retry", "trajectory_id", "epoch", "total", "pid", ...}


@dataclass
class FarmReport:
    trajectory_ids: list[str]  # every trajectory of the spec, in seed order (trained or already stored)
    trained: list[TrajectoryResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already in the store when the farm started
    # prefix-exact recipes: {asked id: stored id} of asked trajectories a longer stored one of the same lineage
    # serves (its first epochs are the asked trajectory), and the asked ids trained by extending a shorter one
    served: dict[str, str] = field(default_factory=dict)
    extended: list[str] = field(default_factory=list)
    by_others: list[str] = field(default_factory=list)  # claimed and published by another farm meanwhile
    cleaned: list[str] = field(default_factory=list)  # leftovers of dead writers removed at the start
    wall_time_s: float = 0.0

    def table(self) -> str:
        return summary_table(self.trained, self.skipped, self.by_others)


WAIT_S = 2.0  # how often a farm looks again at trajectories another live farm holds


def farm(spec: FarmSpec, *, progress: bool = True, on_event: Callable[[ProgressEvent], None] | None = None,
         data: FarmData | None = None) -> FarmReport:
    """Farm the trajectories of ``spec`` into its store and return their ids.

    Every trajectory is claimed in the store before it is trained (raydd.farm.claims), so farms running
    at the same time into one store train each trajectory once; leftovers of dead writers (dead
    claims, their temp files) are removed first. With ``spec.tensorboard`` set, every trajectory of
    the spec (trained now or before) gets its per-epoch curves written there, read back from the store.

    ``on_event`` receives every progress event (tests use it to inject faults).
    """
    start = time.perf_counter()
    check_devices_here(spec)
    store = TrajectoryStore(spec.store).require_writable()
    data = data if data is not None else prepare_data(spec)
    tasks, served = link_prefixes(plan_tasks(spec, data, data_fingerprint(data)), store)
    todo = [t for t in tasks if t.trajectory_id not in served and not store.exists(t.trajectory_id)]
    skipped = [t.trajectory_id for t in tasks if t not in todo]
    report = FarmReport([served.get(t.trajectory_id, t.trajectory_id) for t in tasks], skipped=skipped, served=served,
                        extended=[t.trajectory_id for t in todo if t.extend_from is not None])
    if todo:
        report.cleaned = store.gc()
        work = WorkQueue(store, todo, spec.lease_ttl_s)
        bar = FarmProgress(len(todo), len(skipped), enabled=progress)
        try:
            if spec.backend == "local":
                report.trained = _run_local(spec, work, data, store, bar, on_event)
            else:
                from .ray_pool import run_on_ray

                report.trained = run_on_ray(spec, work, data, bar, on_event)
        finally:
            for tid in work.held():  # interrupted: the temp files of what this farm was writing go too
                store.discard_partials(tid)
            work.close()
            bar.close()
        report.by_others = work.by_others
    if spec.tensorboard:
        from ..store.tensorboard import write_curves

        write_curves(store, spec.tensorboard, report.trajectory_ids)  # skips runs already written
    report.wall_time_s = time.perf_counter() - start
    return report


def check_devices_here(spec: FarmSpec) -> None:
    """Before any work (and before Ray starts): on this machine alone — the local backend, or a Ray cluster
    started here — the device and the GPUs per worker must exist here, as torch sees them."""
    import sys

    if spec.backend == "ray":  # an unreachable cluster is one line now, not Ray's retries and traceback later
        from ..validation import check_ray_address

        check_ray_address("address" if spec.address else "RAY_ADDRESS", spec.address or os.environ.get("RAY_ADDRESS"))
    ray = sys.modules.get("ray")
    if spec.backend == "ray" and (spec.address or os.environ.get("RAY_ADDRESS")
                                  or (ray is not None and ray.is_initialized())):
        return  # a cluster's workers may have what this machine lacks: checked against its resources
    if spec.device != "auto":
        resolve_device(spec.device)
    if spec.backend == "ray":
        check_gpus_here(spec.gpus_per_worker, "gpus_per_worker")


def _run_local(spec, work: WorkQueue, data: FarmData, store, bar: FarmProgress, on_event
               ) -> list[TrajectoryResult]:
    results = []
    while not work.empty:
        pack = take_pack(work, spec.pack)
        if not pack:  # the rest is held by other live farms: wait for them
            bar.waiting(work.held_elsewhere)
            time.sleep(WAIT_S)
            bar.finished_elsewhere(work.by_others)
            continue

        def on_epoch(tid, epoch, total, metrics):
            bar.epoch(tid, epoch, total)
            if on_event:
                on_event({"type": "epoch", "trajectory_id": tid, "epoch": epoch, "total": total,
                          "metrics": metrics, "pid": os.getpid()})

        for task, result in zip(pack, run_trajectories(pack, data, device=spec.device, on_epoch=on_epoch,
                                                       store=store)):
            work.release(task)
            bar.finished(task.trajectory_id)
            results.append(result)
    bar.finished_elsewhere(work.by_others)
    return results
