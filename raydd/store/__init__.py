"""Arrow trajectory store: one immutable, self-describing IPC file per trajectory.

>>> store = TrajectoryStore("/data/trajectories")          # or "s3://bucket/prefix"
>>> with store.writer(trajectory_id=tid, kind="expert", ...) as w:
...     w.append(0, flat_params, metrics={"test_acc": 0.1})
>>> info = store.list(kind="expert")[0]
>>> store.open(info.trajectory_id).params(2)                 # zero-copy for local files
"""

from .reader import Trajectory, TrajectoryInfo
from .schema import (
    FORMAT_VERSION,
    CorruptTrajectoryError,
    CorruptTrajectoryWarning,
    TrajectoryNotFoundError,
    UnknownEpochError,
    lineage_id,
    trajectory_id,
)
from .store import TrajectoryStore, VerifyResult
from .writer import TrajectoryWriter

__all__ = [
    "FORMAT_VERSION",
    "CorruptTrajectoryError",
    "CorruptTrajectoryWarning",
    "Trajectory",
    "TrajectoryInfo",
    "TrajectoryNotFoundError",
    "TrajectoryStore",
    "TrajectoryWriter",
    "lineage_id",
    "UnknownEpochError",
    "VerifyResult",
    "trajectory_id",
]
