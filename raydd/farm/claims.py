"""The farm's remaining work, handed out only once this farm has claimed it in the store.

Before a trajectory is trained its id is claimed (``TrajectoryStore.claim``, raydd.store.lease); the
claim is renewed while it trains and released once it is published or abandoned. A trajectory another
live farm has claimed is left to it: this farm trains the rest first, then waits until the other farm
publishes it (counted as ``by_others``) or its claim dies (then this farm takes it over).
"""
from __future__ import annotations

from ..store import TrajectoryStore
from ..store.lease import Lease, LeaseKeeper
from .recipes import get_recipe
from .task import TrajectoryTask


def claim_meta(task: TrajectoryTask) -> dict:
    """What the store needs to place a task's claim: next to where its trajectory will be published."""
    return {"trajectory_id": task.trajectory_id, "dataset": task.dataset, "model": task.model,
            "kind": get_recipe(task.recipe).kind}


class WorkQueue:
    """The tasks left to train; ``take`` returns one this farm now holds, or None while the rest are held
    by other live farms."""

    def __init__(self, store: TrajectoryStore, tasks: list[TrajectoryTask], ttl_s: float) -> None:
        self.store = store
        self.pending = list(tasks)
        self.keeper = LeaseKeeper(ttl_s)
        self.ttl_s = ttl_s
        self.by_others: list[str] = []  # published by another farm while this one waited
        self.held_elsewhere: dict[str, str] = {}  # trajectory id -> owner of the live claim

    @property
    def empty(self) -> bool:
        return not self.pending

    def take(self, where=None) -> TrajectoryTask | None:
        """The next pending task (``where(task)`` true, when given) this farm now holds, or None."""
        for task in list(self.pending):
            if where is not None and not where(task):
                continue
            tid = task.trajectory_id
            if not self.store.exists(tid):
                got = self.store.claim(claim_meta(task), ttl_s=self.ttl_s)
                if not isinstance(got, Lease):
                    self.held_elsewhere[tid] = got.owner
                    continue
                self.keeper.add(got)
                # checked again under the claim: another farm may have published it and released its claim
                # between the check above and this claim (it publishes first, then releases)
                if not self.store.exists(tid):
                    self.pending.remove(task)
                    self.held_elsewhere.pop(tid, None)
                    return task
                self.keeper.release(tid)
            self.pending.remove(task)  # another farm published it
            self.by_others.append(tid)
            self.held_elsewhere.pop(tid, None)
        return None

    def release(self, task: TrajectoryTask) -> None:
        """The task is published (or abandoned): drop its claim."""
        self.keeper.release(task.trajectory_id)

    def held(self) -> list[str]:
        """Ids this farm holds claims on (training, or waiting for a retry)."""
        return list(self.keeper.leases)

    def close(self) -> None:
        self.keeper.close()


def take_pack(work: WorkQueue, size: int, retries: list | None = None) -> list:
    """Up to ``size`` claimed tasks to train together (retried ones first), all continuing from the same epoch
    (``extend_epoch``: trained from the start, or extending stored trajectories of one length); empty when none
    is free now."""
    pack: list = []

    def fits(task) -> bool:
        return not pack or task.extend_epoch == pack[0].extend_epoch

    while len(pack) < size:
        again = [t for t in retries or [] if fits(t)]
        if again:
            task = again[-1]
            retries.remove(task)
        else:
            task = work.take(where=fits)
        if task is None:
            break
        pack.append(task)
    return pack
