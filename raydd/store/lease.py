"""Claims on trajectory ids: a farm claims an id before training it, so two farms never train it twice.

A claim is a small JSON file next to where the trajectory will be published,
``.<trajectory_id>.lease``: the owner (host, pid, a random token), when it expires. The farm that
holds it renews it while training (``LeaseKeeper``) and deletes it once the trajectory is published
or abandoned. Another farm that finds a live claim skips that id, trains the rest, and waits for the
id to be published (or for the claim to die, then takes it over).

What is guaranteed where:

- **Local and network file systems** (POSIX ``O_CREAT | O_EXCL``): exactly one farm creates a
  claim; a dead claim (its owner's process is gone on this host, or it expired without renewal) is
  taken over by renaming it away first — a rename only one farm can win — then creating a new one.
- **Object stores** (S3, GCS through pyarrow, which offers no conditional put): check, put, then
  read back after a short pause; the farm whose claim reads back owns it. Two farms that put within
  the same instant can both believe they own an id and both train it. Nothing is corrupted then:
  the trajectory is one PUT of a complete file either way, so the store still holds one whole file.

Expiry: ``ttl_s`` (default 60 s) after the last renewal; a keeper renews every ``ttl_s / 3``.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

import pyarrow.fs as pafs

from ..files import write_whole

LEASE_SUFFIX = ".lease"
DEFAULT_TTL_S = 60.0


def lease_name(trajectory_id: str) -> str:
    return f".{trajectory_id}{LEASE_SUFFIX}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


@dataclass
class Claim:
    """What a claim file says."""

    trajectory_id: str
    host: str
    pid: int
    token: str
    expires: float  # unix time

    @property
    def owner(self) -> str:
        return f"{self.host}:{self.pid}"

    def dead(self, now: float | None = None) -> bool:
        """Expired, or its owner was on this host and its process is gone."""
        now = time.time() if now is None else now
        if self.expires < now:
            return True
        return self.host == socket.gethostname() and not _pid_alive(self.pid)

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Claim":
        raw = json.loads(data.decode())
        return cls(str(raw["trajectory_id"]), str(raw["host"]), int(raw["pid"]), str(raw["token"]),
                   float(raw["expires"]))


class Lease:
    """A claim this process holds on one trajectory id; ``renew`` while working, ``release`` when done."""

    def __init__(self, path: str, claim: Claim, filesystem: pafs.FileSystem, local: bool, ttl_s: float) -> None:
        self.path, self.claim, self._fs, self._local, self.ttl_s = path, claim, filesystem, local, ttl_s
        self.lost = False

    @property
    def trajectory_id(self) -> str:
        return self.claim.trajectory_id

    def renew(self) -> bool:
        """Push the expiry forward; False (and ``lost``) when another farm has taken the claim over."""
        current = read_claim(self.path, self._fs)
        if current is None or current.token != self.claim.token:
            self.lost = True
            return False
        self.claim.expires = time.time() + self.ttl_s
        write_whole(self._fs, self.path, self.claim.to_json())
        return True

    def release(self) -> None:
        """Delete the claim if it is still ours (idempotent)."""
        current = read_claim(self.path, self._fs)
        if current is not None and current.token == self.claim.token:
            try:
                self._fs.delete_file(self.path)
            except (FileNotFoundError, OSError):
                pass


def read_claim(path: str, filesystem: pafs.FileSystem) -> Claim | None:
    """The claim at ``path``; None if there is none. A file that does not parse (its writer died while
    writing it) reads as a claim that expired at its modification time."""
    try:
        with filesystem.open_input_stream(path) as f:
            data = f.read()
    except (FileNotFoundError, OSError):
        return None
    try:
        return Claim.from_json(data)
    except (ValueError, KeyError, TypeError):
        info = filesystem.get_file_info(path)
        mtime = info.mtime.timestamp() if info.mtime is not None else 0.0
        return Claim(os.path.basename(path), "?", -1, "unreadable", mtime)


def try_claim(path: str, trajectory_id: str, filesystem: pafs.FileSystem, local: bool,
              ttl_s: float = DEFAULT_TTL_S) -> Lease | Claim:
    """Claim ``trajectory_id`` (claim file at ``path``): a Lease when this process now holds it, else the
    live Claim of the farm that does. A dead claim is taken over."""
    claim = Claim(trajectory_id, socket.gethostname(), os.getpid(), uuid.uuid4().hex, time.time() + ttl_s)
    for _ in range(3):  # a takeover races at most with the other farms that saw the same dead claim
        current = read_claim(path, filesystem)
        if current is not None:
            if not current.dead():
                return current
            if not _remove_dead(path, current, filesystem, local):
                continue
        if local:
            # written whole beside it, then linked into place (fails if the claim exists): a claim file is
            # never seen empty or half-written — such a file reads as dead, and another farm starting at
            # that moment (its gc, its own claim) would remove it and train the same trajectory
            os.makedirs(os.path.dirname(path), exist_ok=True)
            staged = f"{path}.{claim.token[:8]}.tmp"
            with open(staged, "wb") as f:
                f.write(claim.to_json())
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(staged, path)
            except FileExistsError:
                continue
            finally:
                os.remove(staged)
            return Lease(path, claim, filesystem, local, ttl_s)
        with filesystem.open_output_stream(path) as out:  # object store: put, then read back
            out.write(claim.to_json())
        time.sleep(0.2)
        back = read_claim(path, filesystem)
        if back is not None and back.token == claim.token:
            return Lease(path, claim, filesystem, local, ttl_s)
        if back is not None and not back.dead():
            return back
    current = read_claim(path, filesystem)
    return current if current is not None else claim  # lost every race: report the claim as held


def _remove_dead(path: str, dead: Claim, filesystem: pafs.FileSystem, local: bool) -> bool:
    """Remove a dead claim so it can be taken over; False when another farm got there first."""
    if local:
        doomed = f"{path}.{uuid.uuid4().hex[:8]}.dead"
        try:
            os.rename(path, doomed)  # only one farm's rename can succeed
        except FileNotFoundError:
            return False
        os.remove(doomed)
        return True
    current = read_claim(path, filesystem)
    if current is None or current.token != dead.token:
        return False
    try:
        filesystem.delete_file(path)
    except (FileNotFoundError, OSError):
        return False
    return True


class LeaseKeeper:
    """Renews the leases a farm holds, from a background thread, every ``ttl_s / 3``."""

    def __init__(self, ttl_s: float = DEFAULT_TTL_S) -> None:
        self.ttl_s = ttl_s
        self.leases: dict[str, Lease] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="raydd-lease-keeper", daemon=True)
        self._thread.start()

    def add(self, lease: Lease) -> None:
        with self._lock:
            self.leases[lease.trajectory_id] = lease

    def release(self, trajectory_id: str) -> None:
        with self._lock:
            lease = self.leases.pop(trajectory_id, None)
        if lease is not None:
            lease.release()

    def _run(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            with self._lock:
                leases = list(self.leases.values())
            for lease in leases:
                try:
                    lease.renew()
                except OSError:
                    pass  # a transient store error: the next round retries before the claim expires

    def close(self) -> None:
        """Stop renewing and release every lease still held."""
        self._stop.set()
        self._thread.join(timeout=5)
        with self._lock:
            leases, self.leases = list(self.leases.values()), {}
        for lease in leases:
            try:
                lease.release()
            except OSError:
                pass
