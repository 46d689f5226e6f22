"""The trajectory store: a tree of trajectory files on any pyarrow filesystem.

Layout: ``<root>/<dataset>/<model>/<kind>/<trajectory_id>.arrow``. Files are
immutable once published; ids are unique across the tree.
"""

from __future__ import annotations

import datetime as _dt
import os
import random
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Mapping
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from .reader import Trajectory, TrajectoryInfo, read_info
from .schema import (
    FILE_SUFFIX,
    TEMP_SUFFIX,
    CorruptTrajectoryError,
    CorruptTrajectoryWarning,
    TrajectoryNotFoundError,
    build_meta,
    check_trajectory_id,
    path_segment,
)
from .writer import TrajectoryWriter


@dataclass
class VerifyResult:
    """One file's verdict: ``ok`` with reason "ok", or the problem found."""

    path: str
    ok: bool
    reason: str
    trajectory_id: str | None = None


def _name(spec: Any) -> str:
    return spec["name"] if isinstance(spec, Mapping) else str(spec)


def _random_below(rng, n: int) -> int:
    if isinstance(rng, random.Random):
        return rng.randrange(n)
    if hasattr(rng, "integers"):  # numpy.random.Generator
        return int(rng.integers(n))
    raise TypeError(f"rng must be random.Random or numpy.random.Generator, got {type(rng).__name__}")


class TrajectoryStore:
    """A local directory or any pyarrow filesystem URI (file://, s3://, gs://...)."""

    def __init__(self, root: str | os.PathLike, *, filesystem: pafs.FileSystem | None = None):
        root = os.fspath(root)
        is_uri = "://" in root
        if filesystem is not None:
            parts = urlsplit(root)
            self._base = (parts.netloc + parts.path) if is_uri else root
        elif is_uri:
            filesystem, self._base = pafs.FileSystem.from_uri(root)
        else:
            filesystem, self._base = pafs.LocalFileSystem(), os.path.abspath(root)
            root = self._base
        self.root: str = root
        self.filesystem = filesystem
        self._local = isinstance(filesystem, pafs.LocalFileSystem)
        if self._local:
            self._base = os.path.abspath(self._base)
        self._base = self._base.rstrip("/") or "/"
        self._index: dict[str, str] = {}  # trajectory id -> path, refreshed by scans

    def __repr__(self) -> str:
        return f"TrajectoryStore({self.root!r})"

    # --- paths -------------------------------------------------------------
    def _join(self, *parts: str) -> str:
        return "/".join([self._base.rstrip("/"), *parts])

    def path_for(self, meta_or_id: Mapping | TrajectoryInfo | str) -> str:
        """Where a trajectory lives: from its metadata (dataset, model, kind,
        trajectory_id) or info, or, for a bare id, the published file's path."""
        if isinstance(meta_or_id, TrajectoryInfo):
            return meta_or_id.path
        if isinstance(meta_or_id, str):
            path = self._find(meta_or_id)
            if path is None:
                raise TrajectoryNotFoundError(f"no trajectory {meta_or_id!r} in store {self.root}")
            return path
        m = meta_or_id
        tid = check_trajectory_id(m["trajectory_id"])
        return self._join(path_segment(_name(m["dataset"])), path_segment(_name(m["model"])),
                          path_segment(m["kind"]), tid + FILE_SUFFIX)

    def _scan(self) -> tuple[list[pafs.FileInfo], list[pafs.FileInfo]]:
        """(trajectory files, writer temp files) under the root, sorted by path."""
        selector = pafs.FileSelector(self._base, recursive=True, allow_not_found=True)
        files, temps = [], []
        for entry in self.filesystem.get_file_info(selector):
            if entry.type != pafs.FileType.File:
                continue
            if entry.base_name.endswith(TEMP_SUFFIX):
                temps.append(entry)
            elif entry.base_name.endswith(FILE_SUFFIX) and not entry.base_name.startswith("."):
                files.append(entry)
        files.sort(key=lambda e: e.path)
        temps.sort(key=lambda e: e.path)
        self._index = {}
        for entry in files:
            self._index.setdefault(entry.base_name[: -len(FILE_SUFFIX)], entry.path)
        return files, temps

    def _find(self, tid: str) -> str | None:
        path = self._index.get(tid)
        if path is not None and self.filesystem.get_file_info(path).type == pafs.FileType.File:
            return path
        self._scan()
        return self._index.get(tid)

    def _relative_parts(self, path: str) -> list[str]:
        return path[len(self._base):].strip("/").split("/")

    # --- writing -----------------------------------------------------------
    def writer(self, *, trajectory_id: str, kind: str, recipe: str, recipe_config: Mapping, seed: int,
               model: Mapping, param_layout: Iterable, buffer_layout: Iterable = (),
               dtype="float32", dataset: Mapping, metric_names: Iterable[str] = (),
               extra: Mapping | None = None) -> TrajectoryWriter:
        """A writer for one new trajectory (commit publishes it; same id overwrites)."""
        meta = build_meta(trajectory_id=trajectory_id, kind=kind, recipe=recipe, recipe_config=recipe_config,
                          seed=seed, model=model, param_layout=param_layout, buffer_layout=buffer_layout,
                          dtype=dtype, dataset=dataset, metric_names=metric_names, extra=extra)
        return TrajectoryWriter(path=self.path_for(meta), meta=meta, filesystem=self.filesystem, local=self._local)

    # --- reading -----------------------------------------------------------
    def exists(self, trajectory_id: str) -> bool:
        """True if a published file with this id exists and its footer and trailer are valid."""
        path = self._find(trajectory_id)
        if path is None:
            return False
        try:
            read_info(path, self.filesystem, self._local)
        except (CorruptTrajectoryError, FileNotFoundError):
            return False
        return True

    def list(self, *, dataset: str | None = None, model: str | None = None, kind: str | None = None,
             recipe: str | None = None) -> list[TrajectoryInfo]:
        """Infos of valid trajectories matching all filters, sorted by path.

        Reads only footers, schemas and last snapshots' small columns. Corrupt
        files are skipped with a CorruptTrajectoryWarning naming path and reason.
        """
        wanted = {"dataset_name": dataset, "model_name": model, "kind": kind, "recipe": recipe}
        wanted = {k: v for k, v in wanted.items() if v is not None}
        by_path = [(0, dataset), (1, model), (2, kind)]
        infos = []
        for entry in self._scan()[0]:
            parts = self._relative_parts(entry.path)
            if len(parts) == 4 and any(v is not None and parts[i] != path_segment(v) for i, v in by_path):
                continue  # cheap pre-filter on the directory names
            try:
                info = read_info(entry.path, self.filesystem, self._local)
            except CorruptTrajectoryError as exc:
                warnings.warn(f"skipping corrupt trajectory {entry.path}: {exc.reason}",
                              CorruptTrajectoryWarning, stacklevel=2)
                continue
            except FileNotFoundError:  # replaced or removed since the scan
                continue
            if all(getattr(info, k) == v for k, v in wanted.items()):
                infos.append(info)
        return infos

    def open(self, trajectory_id: str) -> Trajectory:
        """Open a trajectory by id (CorruptTrajectoryError / TrajectoryNotFoundError)."""
        return Trajectory(self.path_for(trajectory_id), filesystem=self.filesystem, local=self._local)

    def sample(self, rng, *, max_start_epoch: int, span: int, **filters) -> tuple[Trajectory, int]:
        """Uniformly pick a trajectory among those (matching ``filters``) that
        store some start epoch s in [0, max_start_epoch) together with s + span,
        then uniformly pick such an s. Returns (opened trajectory, s)."""
        if max_start_epoch < 1 or span < 0:
            raise ValueError(f"need max_start_epoch >= 1 and span >= 0, got {max_start_epoch}, {span}")
        candidates = []
        infos = self.list(**filters)
        for info in infos:
            stored = set(info.epochs)
            starts = [s for s in sorted(stored) if s < max_start_epoch and s + span in stored]
            if starts:
                candidates.append((info, starts))
        if not candidates:
            raise ValueError(
                f"no trajectory in {self.root} matching {filters or 'no filters'} stores both epoch s and "
                f"s+{span} for some s in [0, {max_start_epoch}) ({len(infos)} trajectories matched the filters)")
        info, starts = candidates[_random_below(rng, len(candidates))]
        start = starts[_random_below(rng, len(starts))]
        return Trajectory(info.path, filesystem=self.filesystem, local=self._local), start

    def discard_partials(self, trajectory_id: str) -> int:
        """Delete temp files that writers of ``trajectory_id`` left behind (a worker killed
        mid-trajectory); call only when no writer of that id is still running. Returns the count."""
        tid = check_trajectory_id(trajectory_id)
        _, temps = self._scan()
        doomed = [e.path for e in temps if e.base_name.startswith(f".{tid}.")]
        for path in doomed:
            try:
                self.filesystem.delete_file(path)
            except FileNotFoundError:
                pass
        return len(doomed)

    # --- integrity ---------------------------------------------------------
    def verify(self, *, stale_after_s: float = 3600.0) -> list[VerifyResult]:
        """Check every file fully (footer, trailer, epochs, crc32s). Temp files
        untouched for ``stale_after_s`` are reported as left by crashed writers;
        younger ones as writes in progress (ok)."""
        files, temps = self._scan()
        results, first_path = [], {}
        for entry in files:
            tid = entry.base_name[: -len(FILE_SUFFIX)]
            try:
                with Trajectory(entry.path, filesystem=self.filesystem, local=self._local) as traj:
                    traj.check()
                    if traj.info.trajectory_id != tid:
                        raise CorruptTrajectoryError(entry.path, f"file name does not match id {traj.info.trajectory_id}")
            except CorruptTrajectoryError as exc:
                results.append(VerifyResult(entry.path, False, exc.reason, tid))
                continue
            except FileNotFoundError:
                continue
            if tid in first_path:
                results.append(VerifyResult(entry.path, False, f"duplicate id, also at {first_path[tid]}", tid))
            else:
                first_path[tid] = entry.path
                results.append(VerifyResult(entry.path, True, "ok", tid))
        now = _dt.datetime.now(_dt.timezone.utc)
        for entry in temps:
            mtime = entry.mtime
            if mtime is not None and mtime.tzinfo is None:
                mtime = mtime.replace(tzinfo=_dt.timezone.utc)
            age = (now - mtime).total_seconds() if mtime is not None else float("inf")
            if age >= stale_after_s:
                results.append(VerifyResult(entry.path, False, f"stale temp file left by a crashed writer (age {age:.0f} s)"))
            else:
                results.append(VerifyResult(entry.path, True, f"temp file of a write in progress (age {age:.0f} s)"))
        return results
