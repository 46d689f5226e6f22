"""Reading one trajectory file: footer/trailer validation, zero-copy snapshots, verify."""

from __future__ import annotations

import base64
import json
import math
import mmap
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.ipc as ipc
import torch

try:  # SIMD CRC-32 (zlib-ng): the same checksums as zlib's crc32, about 5x faster (benchmarks/farm.py)
    from zlib_ng.zlib_ng import crc32 as crc32_bytes
except ImportError:  # a box with only torch and pyarrow (no raydd dependencies): same checksums, slower
    from zlib import crc32 as crc32_bytes

from .schema import (
    BUFFERS_COLUMN,
    BUFFERS_CRC,
    EPOCH_COLUMN,
    EPOCHS,
    NUM_SNAPSHOTS,
    PARAMS_COLUMN,
    PARAMS_CRC,
    RESUME_STATE,
    RESUME_STATE_CRC,
    WALL_TIME_S,
    CorruptTrajectoryError,
    UnknownEpochError,
    layout_numel,
    lineage_id,
    meta_from_schema,
)

# numpy dtype used to view each store dtype's raw bytes (bf16 bits as int16)
_NUMPY_VIEW = {"float32": np.float32, "float16": np.float16, "bfloat16": np.int16}


@dataclass
class TrajectoryInfo:
    """What ``list`` knows about a trajectory (read from schema + last batch only)."""

    trajectory_id: str
    path: str
    kind: str
    recipe: str
    model_name: str
    dataset_name: str
    dtype: str
    num_snapshots: int
    epochs: list[int]
    seed: int
    wall_time_s: float
    num_params: int
    meta: dict
    size_bytes: int = 0
    final_metrics: dict[str, float] = field(default_factory=dict)
    resumable: bool = False  # the file holds the training state after its last epoch (it can be extended)

    @property
    def lineage(self) -> str:
        """The training run this trajectory is a part of, whatever its length (raydd.store.schema.lineage_id)."""
        return lineage_id(self.meta)


def make_info(path: str, meta: dict, trailer: dict, *, size_bytes: int, final_metrics: dict) -> TrajectoryInfo:
    return TrajectoryInfo(
        trajectory_id=meta["trajectory_id"],
        path=path,
        kind=meta["kind"],
        recipe=meta["recipe"],
        model_name=meta["model"]["name"],
        dataset_name=meta["dataset"]["name"],
        dtype=meta["dtype"],
        num_snapshots=trailer[NUM_SNAPSHOTS],
        epochs=list(trailer[EPOCHS]),
        seed=meta["seed"],
        wall_time_s=trailer[WALL_TIME_S],
        num_params=layout_numel(meta["param_layout"]),
        meta=meta,
        size_bytes=size_bytes,
        final_metrics=final_metrics,
        resumable=bool(trailer.get(RESUME_STATE)),
    )


def raw_bytes(values: pa.Array) -> pa.Buffer:
    """The data bytes of a flat primitive array, honouring its offset (zero-copy)."""
    width = values.type.bit_width // 8
    return values.buffers()[1].slice(values.offset * width, len(values) * width)


def crc32(values: pa.Array) -> int:
    return crc32_bytes(memoryview(raw_bytes(values)))


def _parse_trailer(md: dict | None, path: str) -> dict:
    md = {k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes) else v
          for k, v in (md or {}).items()}
    try:
        trailer = {
            NUM_SNAPSHOTS: int(md[NUM_SNAPSHOTS]),
            WALL_TIME_S: float(md[WALL_TIME_S]),
            EPOCHS: [int(e) for e in json.loads(md[EPOCHS])],
            RESUME_STATE: RESUME_STATE in md,
        }
    except (KeyError, ValueError, TypeError) as exc:
        raise CorruptTrajectoryError(path, f"last snapshot lacks the trailing info ({exc!r})") from None
    return trailer


class _OpenFile:
    """An open trajectory file: validated metadata and trailer plus Arrow readers.

    Local files are read through a read-only memory map; other filesystems
    through a random-access stream (each snapshot read is a ranged read).
    """

    def __init__(self, path: str, filesystem: pafs.FileSystem, local: bool):
        self.path = path
        self.local = local
        self._file = self._map = None
        try:
            if local:
                self._file = open(path, "rb")
                try:
                    self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
                except ValueError:  # mmap refuses empty files
                    raise CorruptTrajectoryError(path, "empty file") from None
                self._mapped = pa.py_buffer(self._map)
                self.size_bytes = self._mapped.size
                source = pa.BufferReader(self._mapped)
            else:
                source = filesystem.open_input_file(path)
                self.size_bytes = source.size()
            self._source = source
            self._load(source)
        except (CorruptTrajectoryError, FileNotFoundError):
            self.close()
            raise
        except (pa.ArrowException, OSError) as exc:
            self.close()
            raise CorruptTrajectoryError(path, f"cannot read ({exc})") from None

    def _load(self, source) -> None:
        try:
            self.reader = ipc.open_file(source)
        except pa.ArrowException as exc:  # truncated files lose their footer
            raise CorruptTrajectoryError(self.path, f"invalid Arrow IPC footer ({exc})") from None
        self.meta = meta_from_schema(self.reader.schema, self.path)
        names = self.reader.schema.names
        # a second reader that skips the big params/buffers columns
        light = [i for i, n in enumerate(names) if n not in (PARAMS_COLUMN, BUFFERS_COLUMN)]
        self.light_reader = ipc.open_file(source, options=ipc.IpcReadOptions(included_fields=light))
        count = self.reader.num_record_batches
        if count == 0:
            raise CorruptTrajectoryError(self.path, "no snapshots")
        last, md = self.light_reader.get_batch_with_custom_metadata(count - 1)
        self.trailer = _parse_trailer(md, self.path)
        if self.trailer[NUM_SNAPSHOTS] != count or len(self.trailer[EPOCHS]) != count:
            raise CorruptTrajectoryError(
                self.path, f"trailer says {self.trailer[NUM_SNAPSHOTS]} snapshots, file holds {count} batches")
        self.final_metrics = {n: last.column(n)[0].as_py() for n in self.meta["metric_names"]}

    def info(self) -> TrajectoryInfo:
        return make_info(self.path, self.meta, self.trailer,
                         size_bytes=self.size_bytes, final_metrics=self.final_metrics)

    def close(self) -> None:
        for name in ("reader", "light_reader", "_source", "_mapped"):
            self.__dict__.pop(name, None)
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # an Arrow object still holds a view; GC unmaps it
                pass
            self._map = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def cow_view(self, values: pa.Array, np_dtype) -> np.ndarray | None:
        """A writable zero-copy numpy view of ``values`` through a private
        copy-on-write map of just that region of the file, or None if the
        bytes are not in the file mapping (remote file, realigned copy)."""
        if self._map is None:
            return None
        data = raw_bytes(values)
        offset = data.address - self._mapped.address
        if offset < 0 or offset + data.size > self._mapped.size or data.size == 0:
            return None
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        region = mmap.mmap(self._file.fileno(), offset + data.size - start,
                           offset=start, access=mmap.ACCESS_COPY)
        return np.frombuffer(region, dtype=np_dtype, count=len(values), offset=offset - start)


def read_info(path: str, filesystem: pafs.FileSystem, local: bool) -> TrajectoryInfo:
    """Footer + schema + last-batch read of one file; raises CorruptTrajectoryError."""
    handle = _OpenFile(path, filesystem, local)
    try:
        return handle.info()
    finally:
        handle.close()


class Trajectory:
    """Read access to one trajectory file; use as a context manager or ``close()``.

    ``params``/``buffers`` of a local file are zero-copy: the tensor is a view
    of a private copy-on-write memory map of that snapshot's bytes. It is
    writable, writes never reach the file nor other tensors, and it stays
    valid after ``close()``.

    Every snapshot handed out has had its crc32 checked: the first read of a
    snapshot of this open file checks it (CorruptTrajectoryError naming the file
    and the epoch on a mismatch), later reads of the same snapshot do not repeat
    the check (``benchmarks/farm.py store`` measures the cost).
    """

    def __init__(self, path: str, *, filesystem: pafs.FileSystem, local: bool):
        self._file = _OpenFile(path, filesystem, local)
        self.info = self._file.info()
        self.meta = self.info.meta
        self.epochs = self.info.epochs
        self._batch_of_epoch = {epoch: i for i, epoch in enumerate(self.epochs)}
        self._verified: set[tuple[int, str]] = set()  # (epoch, column) whose crc32 matched
        self._closed = False

    # --- snapshots ---------------------------------------------------------
    def _batch(self, epoch: int) -> tuple[pa.RecordBatch, dict]:
        if self._closed:
            raise ValueError(f"trajectory {self.info.trajectory_id} is closed")
        try:
            index = self._batch_of_epoch[int(epoch)]
        except KeyError:
            raise UnknownEpochError(f"epoch {epoch} is not stored in trajectory {self.info.trajectory_id}; "
                           f"stored epochs: {self.epochs}") from None
        batch, md = self._file.reader.get_batch_with_custom_metadata(index)
        if batch.num_rows != 1 or batch.column(EPOCH_COLUMN)[0].as_py() != epoch:
            raise CorruptTrajectoryError(self.info.path, f"batch {index} does not hold epoch {epoch}")
        md = {k.decode(): v.decode() for k, v in (md or {}).items()}
        return batch, md

    def _tensor(self, batch, md, column: str, crc_key: str, store_dtype: str,
                dtype: torch.dtype | None, verify: bool) -> torch.Tensor:
        values = batch.column(column).flatten()  # .values would ignore the slice offset
        epoch = batch.column(EPOCH_COLUMN)[0].as_py()
        if verify and (epoch, column) not in self._verified:
            if str(crc32(values)) != md.get(crc_key):
                raise CorruptTrajectoryError(self.info.path, f"epoch {epoch}: {column} crc32 mismatch")
            self._verified.add((epoch, column))
        np_dtype = _NUMPY_VIEW[store_dtype]
        array = self._file.cow_view(values, np_dtype)
        if array is None:
            array = values.to_numpy(zero_copy_only=False, writable=True).view(np_dtype)
        tensor = torch.from_numpy(array)
        if store_dtype == "bfloat16":
            tensor = tensor.view(torch.bfloat16)
        if dtype is not None and dtype != tensor.dtype:
            tensor = tensor.to(dtype)
        return tensor

    def params(self, epoch: int, dtype: torch.dtype | None = None, *, verify: bool = True) -> torch.Tensor:
        """Flat parameters at stored ``epoch`` (zero-copy when ``dtype`` is None or the store dtype), crc32
        checked on first read (``verify=False`` skips the check: measurements only)."""
        batch, md = self._batch(epoch)
        return self._tensor(batch, md, PARAMS_COLUMN, PARAMS_CRC, self.info.dtype, dtype, verify)

    def buffers(self, epoch: int, dtype: torch.dtype | None = None, *, verify: bool = True) -> torch.Tensor | None:
        """Flat float32 buffers (BatchNorm running stats) at ``epoch``, or None if the model has none."""
        batch, md = self._batch(epoch)
        if BUFFERS_COLUMN not in batch.schema.names:
            return None
        return self._tensor(batch, md, BUFFERS_COLUMN, BUFFERS_CRC, "float32", dtype, verify)

    def state_dict(self, epoch: int, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """name -> tensor views of the snapshot, shaped by the param and buffer layouts."""
        out: dict[str, torch.Tensor] = {}
        flats = [(self.meta["param_layout"], self.params(epoch, dtype))]
        if self.meta["buffer_layout"]:
            flats.append((self.meta["buffer_layout"], self.buffers(epoch, dtype)))
        for layout, flat in flats:
            offset = 0
            for name, shape in layout:
                n = math.prod(shape)
                out[name] = flat[offset:offset + n].view(shape)
                offset += n
        return out

    def resume_state(self) -> dict[str, torch.Tensor] | None:
        """The training state the file holds after its last epoch (generator, optimiser state, exact parameters
        where the store dtype rounds them), crc32-checked; None for a file written without one."""
        _, md = self._batch(self.epochs[-1])
        blob = md.get(RESUME_STATE)
        if blob is None:
            return None
        data = base64.b64decode(blob)
        if str(crc32_bytes(data)) != md.get(RESUME_STATE_CRC):
            raise CorruptTrajectoryError(self.info.path, "resume state crc32 mismatch")
        from safetensors.torch import load

        return load(data)

    def metrics(self) -> list[dict[str, Any]]:
        """Per snapshot: ``{"epoch": e, <metric>: value, ...}`` (reads no params)."""
        if self._closed:
            raise ValueError(f"trajectory {self.info.trajectory_id} is closed")
        reader, names = self._file.light_reader, self.meta["metric_names"]
        rows = []
        for i in range(reader.num_record_batches):
            batch = reader.get_batch(i)
            row = {"epoch": batch.column(EPOCH_COLUMN)[0].as_py()}
            row.update({n: batch.column(n)[0].as_py() for n in names})
            rows.append(row)
        return rows

    # --- integrity ---------------------------------------------------------
    def check(self) -> None:
        """Read every snapshot and check epochs and crc32s; raise CorruptTrajectoryError."""
        reader, path = self._file.reader, self.info.path
        for i, epoch in enumerate(self.epochs):
            batch, md = reader.get_batch_with_custom_metadata(i)
            md = {k.decode(): v.decode() for k, v in (md or {}).items()}
            if batch.num_rows != 1 or batch.column(EPOCH_COLUMN)[0].as_py() != epoch:
                raise CorruptTrajectoryError(path, f"snapshot {i}: epoch column does not match trailer ({epoch})")
            for column, key in ((PARAMS_COLUMN, PARAMS_CRC), (BUFFERS_COLUMN, BUFFERS_CRC)):
                if column not in batch.schema.names:
                    continue
                col = batch.column(column)
                if col.null_count:
                    raise CorruptTrajectoryError(path, f"epoch {epoch}: null {column} (snapshot {i})")
                if str(crc32(col.flatten())) != md.get(key):
                    raise CorruptTrajectoryError(path, f"epoch {epoch}: {column} crc32 mismatch (snapshot {i})")

    # --- lifetime ----------------------------------------------------------
    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._file.close()

    def __enter__(self) -> "Trajectory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        i = self.info
        return f"Trajectory({i.trajectory_id}, {i.dataset_name}/{i.model_name}/{i.kind}, epochs={i.epochs})"

