"""The Ray edge of the farm: worker actors, resource checks, retries."""
from __future__ import annotations

import logging
import os
import queue as queue_lib
import time
import warnings
from typing import Callable

import ray
from ray.util.queue import Empty, Queue
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ..store import TrajectoryStore
from .claims import WorkQueue, take_pack
from .progress import FarmProgress
from .spec import FarmSpec
from .task import FarmData, TrajectoryResult, TrajectoryTask, run_trajectories

WAIT_S = 2.0  # how often the pool looks again at trajectories another live farm holds

log = logging.getLogger(__name__)


class FarmResourceError(ValueError):
    """The cluster cannot run the requested workers (e.g. GPUs asked on a CPU-only cluster)."""


@ray.remote
class FarmWorker:
    """Trains one trajectory (or one pack of them) at a time; holds the farm's data (mapped from the object store)."""

    def __init__(self, data: FarmData, num_threads: int, device: str, progress: Queue):
        import torch

        torch.set_num_threads(max(1, num_threads))
        self.data = data
        self.device = device
        self.progress = progress

    def pid(self) -> int:
        return os.getpid()

    def run(self, tasks: list[TrajectoryTask]) -> list[TrajectoryResult]:
        """Train ``tasks`` (one, or a pack trained together) and publish each."""
        pid = os.getpid()

        def on_epoch(trajectory_id: str, epoch: int, total: int, metrics: dict) -> None:
            self.progress.put_nowait({"type": "epoch", "trajectory_id": trajectory_id, "epoch": epoch,
                                      "total": total, "metrics": metrics, "pid": pid})

        return run_trajectories(tasks, self.data, device=self.device, on_epoch=on_epoch)


def connect(address: str | None) -> bool:
    """Join ``address`` (or RAY_ADDRESS) or start a local cluster; True if this call started Ray."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs = dict(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=True)
    # no address: a Ray of its own ("local"), never the one a stale /tmp/ray/ray_current_cluster names
    ray.init(address=address or "local", **kwargs)
    return True


def check_resources(spec: FarmSpec) -> int:
    """Fail fast on requests the cluster can never satisfy; return how many workers fit at once."""
    total = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    gpus = total.get("GPU", 0.0)
    if spec.gpus_per_worker > 0 and gpus < spec.gpus_per_worker:
        raise FarmResourceError(
            f"gpus_per_worker={spec.gpus_per_worker} but the Ray cluster has {gpus:g} GPU(s): "
            f"use gpus_per_worker=0 on a CPU-only cluster, or join a cluster with GPUs")
    node_cpus = max((n["Resources"].get("CPU", 0.0) for n in nodes), default=0.0)
    if spec.cpus_per_worker > node_cpus:
        raise FarmResourceError(
            f"cpus_per_worker={spec.cpus_per_worker} but the largest node has {node_cpus:g} CPU(s)")
    fit = int(total.get("CPU", 0.0) // spec.cpus_per_worker)
    if spec.gpus_per_worker > 0:
        fit = min(fit, int(gpus // spec.gpus_per_worker + 1e-9))
    return max(1, fit)


def run_on_ray(spec: FarmSpec, work: WorkQueue, data: FarmData, bar: FarmProgress,
               on_event: Callable[[dict], None] | None) -> list[TrajectoryResult]:
    started = connect(spec.address)
    try:
        fit = check_resources(spec)
        n_workers = min(spec.workers, len(work.pending), fit)
        if n_workers < min(spec.workers, len(work.pending)):
            warnings.warn(f"only {fit} worker(s) of {spec.cpus_per_worker} CPU / {spec.gpus_per_worker} GPU fit "
                          f"in this cluster: running {n_workers} instead of {spec.workers}")
        return _Pool(spec, data, n_workers, bar, on_event).run(work)
    finally:
        if started:
            ray.shutdown()


class _Pool:
    def __init__(self, spec: FarmSpec, data: FarmData, n_workers: int, bar: FarmProgress, on_event):
        self.spec = spec
        self.bar = bar
        self.on_event = on_event
        self.data_ref = ray.put(data)  # once; each node maps it once for all its workers
        # the progress queue lives on the driver's node: losing any other node loses no event channel
        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        self.progress = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
        self.n_workers = n_workers
        self.options = dict(num_cpus=spec.cpus_per_worker, num_gpus=spec.gpus_per_worker, max_restarts=0)

    def _new_worker(self):
        return FarmWorker.options(**self.options).remote(
            self.data_ref, int(self.spec.cpus_per_worker), self.spec.device, self.progress)

    def run(self, work: WorkQueue) -> list[TrajectoryResult]:
        """Train what ``work`` hands out (claimed tasks) on idle workers; a dead worker's task (its process or
        its whole node lost) is retried from scratch under the same claim by the next idle worker, and a
        replacement worker is started — it takes work once Ray has placed it, so with a node gone for good the
        farm goes on with the workers that remain; tasks other farms hold are waited for."""
        retries: list[TrajectoryTask] = []
        attempts: dict[str, int] = {}
        idle = [self._new_worker() for _ in range(self.n_workers)]
        running: dict = {}  # ObjectRef -> (worker, pack of tasks)
        starting: dict = {}  # ObjectRef of a replacement's pid() -> the replacement, until Ray has placed it
        results: list[TrajectoryResult] = []
        try:
            while not work.empty or retries or running:
                while idle:
                    pack = take_pack(work, self.spec.pack, retries)
                    if not pack:
                        break
                    for task in pack:
                        attempts[task.trajectory_id] = attempts.get(task.trajectory_id, 0) + 1
                    worker = idle.pop()
                    running[worker.run.remote(pack)] = (worker, pack)
                if not running and not starting:  # everything left is held by other live farms
                    self.bar.waiting(work.held_elsewhere)
                    time.sleep(WAIT_S)
                    self.bar.finished_elsewhere(work.by_others)
                    continue
                ready, _ = ray.wait([*running, *starting], num_returns=1, timeout=0.2)
                self._drain_progress()
                for ref in ready:
                    if ref in starting:  # a replacement is placed (or died before it ran anything)
                        worker = starting.pop(ref)
                        try:
                            ray.get(ref)
                            idle.append(worker)
                        except ray.exceptions.RayActorError:
                            ray.kill(worker, no_restart=True)
                            replacement = self._new_worker()
                            starting[replacement.pid.remote()] = replacement
                        continue
                    worker, pack = running.pop(ref)
                    try:
                        done = ray.get(ref)
                    except ray.exceptions.RayActorError as err:
                        for task in pack:
                            self._retry(task, attempts, err)
                            retries.append(task)
                        ray.kill(worker, no_restart=True)
                        replacement = self._new_worker()
                        starting[replacement.pid.remote()] = replacement
                        if not idle and not running:
                            log.warning("no farm worker is left: the retried trajectories wait for Ray to place "
                                        "a new one (%g CPU, %g GPU)", self.spec.cpus_per_worker,
                                        self.spec.gpus_per_worker)
                        continue
                    for task, result in zip(pack, done):
                        work.release(task)
                        result.attempts = attempts[task.trajectory_id]
                        results.append(result)
                        self.bar.finished(task.trajectory_id)
                        self._emit({"type": "done", "trajectory_id": task.trajectory_id, "seed": task.seed})
                    idle.append(worker)
            self._drain_progress()
            self.bar.finished_elsewhere(work.by_others)
        finally:
            for worker in [*(w for w, _ in running.values()), *starting.values(), *idle]:
                ray.kill(worker, no_restart=True)
            ray.kill(self.progress.actor, no_restart=True)
        return results

    def _retry(self, task: TrajectoryTask, attempts: dict, err: Exception) -> None:
        n = attempts[task.trajectory_id]
        if n > self.spec.max_retries:
            raise RuntimeError(f"trajectory {task.trajectory_id} (seed {task.seed}) failed {n} time(s): "
                               f"its worker died ({type(err).__name__}); giving up") from err
        log.warning("worker died on trajectory %s (attempt %d); retrying from scratch", task.trajectory_id, n)
        TrajectoryStore(task.store).discard_partials(task.trajectory_id)  # its dead writer's temp file
        self.bar.restarted(task.trajectory_id)
        self._emit({"type": "retry", "trajectory_id": task.trajectory_id, "attempt": n})

    def _drain_progress(self) -> None:
        while True:
            try:
                event = self.progress.get_nowait()
            except (Empty, queue_lib.Empty):
                return
            if event["type"] == "epoch":
                self.bar.epoch(event["trajectory_id"], event["epoch"], event["total"])
            self._emit(event)

    def _emit(self, event: dict) -> None:
        if self.on_event is not None:
            self.on_event(event)
