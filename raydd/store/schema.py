"""The on-disk format of one trajectory file: ids, dtypes, layouts, metadata, errors.

A trajectory file is an Arrow IPC file (random-access format) with one record
batch per snapshot: ``epoch`` int32, ``params`` fixed_size_list<T>[P],
``buffers`` fixed_size_list<float32>[B] (only when B > 0), then one float64
column per metric. The schema metadata key ``raydd`` holds the JSON metadata;
each batch's custom metadata holds crc32s of its params and buffers bytes, and
the last batch also holds the trailing info (snapshot count, epochs, wall time).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import platform
import re
import socket
from importlib import metadata as _importlib_metadata
from typing import Any, Iterable, Mapping

import pyarrow as pa
import torch

FORMAT_VERSION = 1
META_KEY = b"raydd"
FILE_SUFFIX = ".arrow"
TEMP_SUFFIX = ".arrow.partial"

# per-batch custom metadata keys
PARAMS_CRC = "params_crc32"
BUFFERS_CRC = "buffers_crc32"
# trailing info, in the last batch's custom metadata only
NUM_SNAPSHOTS = "num_snapshots"
WALL_TIME_S = "wall_time_s"
EPOCHS = "epochs"
# optional, last batch only: the training state after the final epoch (safetensors bytes, base64) and its crc32,
# which a prefix-exact recipe needs to extend the trajectory to more epochs (raydd.farm.recipes.Recipe.prefix_exact)
RESUME_STATE = "resume_state"
RESUME_STATE_CRC = "resume_state_crc32"

EPOCH_COLUMN, PARAMS_COLUMN, BUFFERS_COLUMN = "epoch", "params", "buffers"
RESERVED_COLUMNS = frozenset({EPOCH_COLUMN, PARAMS_COLUMN, BUFFERS_COLUMN})

# store dtype name -> (Arrow value type, torch dtype). Arrow has no bfloat16:
# its bits are stored as uint16 and reinterpreted on read.
DTYPES: dict[str, tuple[pa.DataType, torch.dtype]] = {
    "float32": (pa.float32(), torch.float32),
    "float16": (pa.float16(), torch.float16),
    "bfloat16": (pa.uint16(), torch.bfloat16),
}

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_UNSAFE_SEGMENT_CHARS = re.compile(r"[^A-Za-z0-9._+=-]")


class CorruptTrajectoryError(ValueError):
    """A trajectory file that is truncated, damaged or not a raydd trajectory."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"corrupt trajectory file {path}: {reason}")
        self.path = path
        self.reason = reason


class TrajectoryNotFoundError(KeyError):
    """No published trajectory with this id in the store."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else "trajectory not found"


class UnknownEpochError(KeyError):
    """The trajectory does not store this epoch (the message lists those it does)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "epoch not stored"


class CorruptTrajectoryWarning(UserWarning):
    """Emitted by ``TrajectoryStore.list`` for each corrupt file it skips."""


def trajectory_id(payload: Mapping[str, Any]) -> str:
    """First 20 hex chars of the sha256 of the canonical JSON of ``payload``.

    ``payload`` is ``{recipe, recipe_config, model, dataset, seed}``: the same
    config and seed always give the same id, so a rerun farm skips what exists.
    """
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:20]


# recipe options that only say how far a trajectory goes: a prefix-exact recipe's shorter trajectory is a prefix
# of a longer one that differs from it in these alone (same lineage)
LENGTH_OPTIONS = ("epochs", "keep_epochs")


def lineage_id(meta: Mapping[str, Any]) -> str:
    """The id of the training run a trajectory is a part of, whatever its length: ``trajectory_id`` of its
    payload (recipe, recipe config, model, dataset, seed, dtype, precision) with the LENGTH_OPTIONS left out.
    Computed from a stored file's metadata as well as from a farm task's payload."""
    payload = {"recipe": meta["recipe"], "model": meta["model"], "dataset": meta["dataset"], "seed": meta["seed"],
               "dtype": meta["dtype"],
               "recipe_config": {k: v for k, v in meta["recipe_config"].items() if k not in LENGTH_OPTIONS}}
    if meta.get("precision", "fp32") != "fp32":
        payload["precision"] = meta["precision"]
    return trajectory_id(payload)


def check_trajectory_id(tid: str) -> str:
    if not isinstance(tid, str) or not _SAFE_ID.match(tid):
        raise ValueError(f"invalid trajectory id {tid!r}: use letters, digits, '.', '_' or '-'")
    return tid


def path_segment(name: Any) -> str:
    """A directory name for a dataset/model/kind name (no separators, not hidden)."""
    seg = _UNSAFE_SEGMENT_CHARS.sub("_", str(name))
    if not seg or seg.startswith("."):
        seg = "_" + seg
    return seg


def dtype_name(dtype: str | torch.dtype) -> str:
    """Normalise a store dtype given as a name or a torch dtype."""
    if isinstance(dtype, torch.dtype):
        for name, (_, tdt) in DTYPES.items():
            if tdt == dtype:
                return name
    elif dtype in DTYPES:
        return dtype
    raise ValueError(f"unsupported store dtype {dtype!r}; use one of {sorted(DTYPES)}")


def normalize_layout(layout: Iterable) -> list[list]:
    """``[(name, shape), ...]`` -> JSON-ready ``[[name, [dims]], ...]``."""
    out, seen = [], set()
    for entry in layout:
        name, shape = entry
        if not isinstance(name, str) or name in seen:
            raise ValueError(f"layout names must be unique strings, got {name!r}")
        dims = [int(d) for d in shape]
        if any(d < 0 for d in dims):
            raise ValueError(f"negative dimension in layout entry {name!r}: {dims}")
        seen.add(name)
        out.append([name, dims])
    return out


def layout_numel(layout: Iterable) -> int:
    return sum(math.prod(shape) for _, shape in layout)


def _versions() -> dict[str, str]:
    try:
        raydd_version = _importlib_metadata.version("raydd")
    except _importlib_metadata.PackageNotFoundError:
        raydd_version = "unknown"
    return {
        "raydd": raydd_version,
        "torch": torch.__version__,
        "pyarrow": pa.__version__,
        "python": platform.python_version(),
    }


def build_meta(
    *,
    trajectory_id: str,
    kind: str,
    recipe: str,
    recipe_config: Mapping,
    seed: int,
    model: Mapping,
    param_layout: Iterable,
    buffer_layout: Iterable = (),
    dtype: str | torch.dtype = "float32",
    dataset: Mapping,
    metric_names: Iterable[str] = (),
    extra: Mapping | None = None,
) -> dict:
    """Validate writer arguments and assemble the file's ``raydd`` metadata."""
    check_trajectory_id(trajectory_id)
    for label, value in (("kind", kind), ("recipe", recipe)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{label} must be a non-empty string, got {value!r}")
    for label, spec in (("model", model), ("dataset", dataset)):
        if not isinstance(spec, Mapping) or not spec.get("name"):
            raise ValueError(f"{label} must be a dict with a 'name', got {spec!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    params = normalize_layout(param_layout)
    if layout_numel(params) == 0:
        raise ValueError("param_layout describes zero parameters")
    metric_names = list(metric_names)
    for name in metric_names:
        if not isinstance(name, str) or not name or name in RESERVED_COLUMNS:
            raise ValueError(f"invalid metric name {name!r} (reserved: {sorted(RESERVED_COLUMNS)})")
    if len(set(metric_names)) != len(metric_names):
        raise ValueError(f"duplicate metric names in {metric_names}")
    meta = {
        "format_version": FORMAT_VERSION,
        "trajectory_id": trajectory_id,
        "kind": kind,
        "recipe": recipe,
        "recipe_config": dict(recipe_config),
        "seed": seed,
        "model": dict(model),
        "param_layout": params,
        "buffer_layout": normalize_layout(buffer_layout),
        "dtype": dtype_name(dtype),
        "dataset": dict(dataset),
        "metric_names": metric_names,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "host": socket.gethostname(),
        "versions": _versions(),
    }
    clash = set(extra or {}) & set(meta)
    if clash:
        raise ValueError(f"extra metadata may not override {sorted(clash)}")
    meta.update(extra or {})
    json.dumps(meta)  # fail here, not at write time, on values JSON cannot hold
    return meta


def build_schema(meta: Mapping) -> pa.Schema:
    """The Arrow schema (with the JSON metadata attached) for ``meta``."""
    value_type, _ = DTYPES[meta["dtype"]]
    fields = [
        pa.field(EPOCH_COLUMN, pa.int32(), nullable=False),
        pa.field(PARAMS_COLUMN, pa.list_(value_type, layout_numel(meta["param_layout"])), nullable=False),
    ]
    num_buffers = layout_numel(meta["buffer_layout"])
    if num_buffers:
        fields.append(pa.field(BUFFERS_COLUMN, pa.list_(pa.float32(), num_buffers), nullable=False))
    fields += [pa.field(name, pa.float64()) for name in meta["metric_names"]]
    return pa.schema(fields, metadata={META_KEY: json.dumps(meta).encode("utf-8")})


def meta_from_schema(schema: pa.Schema, path: str) -> dict:
    """Parse and check a file's metadata against its schema; raise if inconsistent."""
    raw = (schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise CorruptTrajectoryError(path, "no 'raydd' schema metadata (not a raydd trajectory)")
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise CorruptTrajectoryError(path, f"unreadable metadata JSON ({exc})") from None
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CorruptTrajectoryError(path, f"unsupported format_version {version!r} (this raydd reads <= {FORMAT_VERSION})")
    try:
        expected = build_schema(meta)
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptTrajectoryError(path, f"incomplete metadata ({exc!r})") from None
    if not schema.remove_metadata().equals(expected.remove_metadata()):
        raise CorruptTrajectoryError(path, "columns do not match the metadata's layout/dtype/metrics")
    return meta
