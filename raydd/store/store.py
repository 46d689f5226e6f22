"""The trajectory store: a tree of trajectory files on any pyarrow filesystem.

Layout: ``<root>/<dataset>/<model>/<kind>/<trajectory_id>.arrow``. Files are
immutable once published; ids are unique across the tree.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import tempfile
import uuid
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Mapping
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from .lease import DEFAULT_TTL_S, LEASE_SUFFIX, Claim, Lease, lease_name, read_claim, try_claim
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
    """One file's verdict: ``ok`` with reason "ok", or the problem found. ``warning``: not a problem with
    the published trajectories (a dead writer's leftovers, which ``gc`` removes)."""

    path: str
    ok: bool
    reason: str
    trajectory_id: str | None = None
    warning: bool = False


def _temp_id(base_name: str) -> str:
    """The trajectory id of a writer's temp file ``.<id>.<token>.arrow.partial``."""
    return base_name[1:-len(TEMP_SUFFIX)].rsplit(".", 1)[0]


def _age_s(entry: pafs.FileInfo, now: _dt.datetime) -> float:
    mtime = entry.mtime
    if mtime is None:
        return float("inf")
    if mtime.tzinfo is None:
        mtime = mtime.replace(tzinfo=_dt.timezone.utc)
    return (now - mtime).total_seconds()


def _name(spec: Any) -> str:
    return spec["name"] if isinstance(spec, Mapping) else str(spec)


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
        if self._local and os.path.exists(self._base) and not os.path.isdir(self._base):
            raise ValueError(f"store {self.root} is a file, not a directory: point --store at a directory (or a URI "
                             f"such as s3://bucket/prefix)")

    def require_existing(self) -> "TrajectoryStore":
        """For commands that only read: a local root that does not exist is a one-line ValueError (instead
        of an empty listing that looks like a healthy store)."""
        if self._local and not os.path.isdir(self._base):
            raise ValueError(f"store {self.root} does not exist: farm into it first (raydd farm --store "
                             f"{self.root}) or check the path")
        return self

    def require_writable(self) -> "TrajectoryStore":
        """For commands that write: a one-line ValueError before any work when the store cannot be written
        (not an OSError deep in a worker). Locally the probe is a directory of its own, with a file in it,
        made in the store (or in its nearest existing parent, when the store does not exist yet) and removed
        again: no trace, and no race with another farm probing the same store."""
        try:
            if self._local:
                parent = self._base
                while not os.path.exists(parent) and os.path.dirname(parent) != parent:
                    parent = os.path.dirname(parent)
                probe = tempfile.mkdtemp(prefix=".raydd-write-probe-", dir=parent)
                try:
                    with open(os.path.join(probe, "probe"), "wb") as f:
                        f.write(b"ok")
                finally:
                    shutil.rmtree(probe, ignore_errors=True)  # this call's own directory, nothing else
            else:
                probe = f"{self._base}/.raydd-write-probe-{uuid.uuid4().hex}"
                self.filesystem.create_dir(self._base, recursive=True)
                with self.filesystem.open_output_stream(probe) as f:
                    f.write(b"ok")
                self.filesystem.delete_file(probe)
        except OSError as err:
            raise ValueError(f"store {self.root} cannot be written ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else err!r}): choose a writable --store") from None
        return self

    def resolve_id(self, prefix: str) -> str:
        """The stored trajectory id that ``prefix`` starts (the whole id works too); one-line errors when no id
        or several ids start with it."""
        self._scan()
        if prefix in self._index:
            return prefix
        matches = sorted(t for t in self._index if t.startswith(prefix))
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise TrajectoryNotFoundError(f"no trajectory in store {self.root} has an id starting with {prefix!r}")
        raise ValueError(f"{len(matches)} trajectories in store {self.root} have ids starting with {prefix!r} "
                         f"({', '.join(matches[:4])}{', ...' if len(matches) > 4 else ''}): give more characters")

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
        files, temps, _ = self._scan_all()
        return files, temps

    def _scan_all(self) -> tuple[list[pafs.FileInfo], list[pafs.FileInfo], list[pafs.FileInfo]]:
        """(trajectory files, writer temp files, claim files) under the root, sorted by path."""
        selector = pafs.FileSelector(self._base, recursive=True, allow_not_found=True)
        files, temps, claims = [], [], []
        for entry in self.filesystem.get_file_info(selector):
            if entry.type != pafs.FileType.File:
                continue
            if entry.base_name.endswith(TEMP_SUFFIX):
                temps.append(entry)
            elif entry.base_name.endswith(LEASE_SUFFIX) and entry.base_name.startswith("."):
                claims.append(entry)
            elif entry.base_name.endswith(FILE_SUFFIX) and not entry.base_name.startswith("."):
                files.append(entry)
        files.sort(key=lambda e: e.path)
        temps.sort(key=lambda e: e.path)
        claims.sort(key=lambda e: e.path)
        self._index = {}
        for entry in files:
            self._index.setdefault(entry.base_name[: -len(FILE_SUFFIX)], entry.path)
        return files, temps, claims

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

    # --- claims ------------------------------------------------------------
    def claim_path(self, meta: Mapping) -> str:
        """Where the claim on the trajectory described by ``meta`` (dataset, model, kind, id) lives."""
        final = self.path_for(meta)
        return final.rsplit("/", 1)[0] + "/" + lease_name(check_trajectory_id(meta["trajectory_id"]))

    def claim(self, meta: Mapping, *, ttl_s: float = DEFAULT_TTL_S) -> Lease | Claim:
        """Claim the trajectory described by ``meta`` before training it (raydd.store.lease): a Lease when
        this process now holds it, else the live Claim of the farm that does."""
        return try_claim(self.claim_path(meta), meta["trajectory_id"], self.filesystem, self._local, ttl_s)

    def claims(self) -> dict[str, Claim]:
        """{trajectory id: claim} of every claim file in the store (live or dead)."""
        out = {}
        for entry in self._scan_all()[2]:
            claim = read_claim(entry.path, self.filesystem)
            if claim is not None:
                out[entry.base_name[1:-len(LEASE_SUFFIX)]] = claim
        return out

    def gc(self, *, stale_after_s: float = 3600.0) -> list[str]:
        """Remove what dead writers left: claims whose owner is dead or expired, temp files of trajectories
        whose claim is dead, and unclaimed temp files untouched for ``stale_after_s``. Live claims and the
        temp files of their writers are kept. Returns the removed paths."""
        _, temps, claim_files = self._scan_all()
        now = _dt.datetime.now(_dt.timezone.utc)
        claims = {e.base_name[1:-len(LEASE_SUFFIX)]: (e, read_claim(e.path, self.filesystem)) for e in claim_files}
        removed = []
        for entry in temps:
            claim = claims.get(_temp_id(entry.base_name), (None, None))[1]
            if claim is not None and not claim.dead():
                continue  # a live farm is writing it
            if claim is None and _age_s(entry, now) < stale_after_s:
                continue  # an unclaimed write (a direct TrajectoryWriter) that may still be running
            removed += self._delete(entry.path)
        for entry, claim in claims.values():
            if claim is None or claim.dead():
                removed += self._delete(entry.path)
        return removed

    def _delete(self, path: str) -> list[str]:
        try:
            self.filesystem.delete_file(path)
        except (FileNotFoundError, OSError):
            return []
        return [path]

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
    def verify(self, *, stale_after_s: float = 3600.0, include_temps: bool = True) -> list[VerifyResult]:
        """Check every file fully (footer, trailer, epochs, crc32s). Temp files
        untouched for ``stale_after_s`` are reported as left by crashed writers;
        younger ones as writes in progress (ok)."""
        files, temps = self._scan()
        if not include_temps:
            temps = []
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
        claims = self.claims() if include_temps else {}
        for entry in temps:
            age = _age_s(entry, now)
            claim = claims.get(_temp_id(entry.base_name))
            if claim is not None and not claim.dead():
                results.append(VerifyResult(entry.path, True, f"temp file of a write in progress (claimed by "
                                                              f"{claim.owner}, age {age:.0f} s)"))
            elif claim is not None or age >= stale_after_s:
                results.append(VerifyResult(entry.path, True, f"stale temp file left by a dead writer (age {age:.0f} "
                                                              f"s): raydd store gc removes it", warning=True))
            else:
                results.append(VerifyResult(entry.path, True, f"temp file of a write in progress (age {age:.0f} s)"))
        for tid, claim in claims.items():
            if claim.dead():
                results.append(VerifyResult(tid, True, f"dead claim of {claim.owner} on {tid}: raydd store gc "
                                                       f"removes it", tid, warning=True))
        return results
