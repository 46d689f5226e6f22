"""Writing one trajectory file, published atomically on commit."""

from __future__ import annotations

import base64
import json
import math
import operator
import os
import time
import uuid
from typing import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.ipc as ipc
import torch

from .reader import TrajectoryInfo, crc32_bytes, make_info
from .schema import (
    BUFFERS_CRC,
    DTYPES,
    EPOCHS,
    NUM_SNAPSHOTS,
    PARAMS_CRC,
    RESUME_STATE,
    RESUME_STATE_CRC,
    TEMP_SUFFIX,
    WALL_TIME_S,
    build_schema,
    layout_numel,
)

# filesystems where an object appears whole on close and has no directories
_OBJECT_STORES = {"s3", "gcs"}


def temp_name(trajectory_id: str) -> str:
    """Name of a writer's temp file, next to the final file; list() ignores it."""
    return f".{trajectory_id}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}"


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class TrajectoryWriter:
    """Appends snapshots of one training run; ``commit`` publishes the file.

    Local filesystems: snapshots stream into a temp file in the destination
    directory, which ``commit`` fsyncs and renames (atomic). Object stores:
    the file is built in memory and ``commit`` writes it with one PUT. Either
    way nothing exists at the final path until the commit succeeds. As a
    context manager it commits on success and aborts on an exception.
    """

    def __init__(self, *, path: str, meta: dict, filesystem: pafs.FileSystem, local: bool):
        self.path = path
        self.meta = meta
        self.trajectory_id = meta["trajectory_id"]
        self._fs, self._local = filesystem, local
        self._num_params = layout_numel(meta["param_layout"])
        self._num_buffers = layout_numel(meta["buffer_layout"])
        self._value_type, self._torch_dtype = DTYPES[meta["dtype"]]
        self._schema = build_schema(meta)
        self._epochs: list[int] = []
        self._pending: tuple[pa.RecordBatch, dict] | None = None  # last batch waits for the trailer
        self._resume_state: bytes | None = None
        self._state = "open"
        self._started = time.monotonic()
        if local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self._temp_path = os.path.join(os.path.dirname(path), temp_name(self.trajectory_id))
            self._sink = pa.OSFile(self._temp_path, "wb")
        else:
            self._temp_path = None
            self._sink = pa.BufferOutputStream()
        self._ipc = ipc.new_file(self._sink, self._schema)

    @property
    def num_snapshots(self) -> int:
        return len(self._epochs)

    # --- appending ---------------------------------------------------------
    def _flat(self, tensor, numel: int, dtype: torch.dtype, what: str) -> np.ndarray:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 1 or tensor.numel() != numel:
            raise ValueError(f"{what} must be 1-D with {numel} elements (the layout), got shape {tuple(tensor.shape)}")
        # always a private copy: the caller may keep training the same tensor
        flat = tensor.detach().to(device="cpu", dtype=dtype, copy=True).contiguous()
        if dtype == torch.bfloat16:
            return flat.view(torch.int16).numpy().view(np.uint16)
        return flat.numpy()

    def append(self, epoch: int, params: torch.Tensor, *, buffers: torch.Tensor | None = None,
               metrics: Mapping[str, float] | None = None) -> None:
        """Add one snapshot; epochs must increase. Params are cast to the store dtype."""
        self._check_open()
        epoch = operator.index(epoch)
        if self._epochs and epoch <= self._epochs[-1]:
            raise ValueError(f"epochs must increase: got {epoch} after {self._epochs[-1]}")
        if not 0 <= epoch < 2**31:
            raise ValueError(f"epoch {epoch} out of int32 range")
        metrics = dict(metrics or {})
        unknown = set(metrics) - set(self.meta["metric_names"])
        if unknown:
            raise ValueError(f"unknown metrics {sorted(unknown)}; declared: {self.meta['metric_names']}")

        param_values = self._flat(params, self._num_params, self._torch_dtype, "params")
        columns = [
            pa.array([epoch], pa.int32()),
            pa.FixedSizeListArray.from_arrays(pa.array(param_values, self._value_type), self._num_params),
        ]
        custom = {PARAMS_CRC: str(crc32_bytes(param_values))}
        if self._num_buffers:
            if buffers is None:
                raise ValueError(f"this model has {self._num_buffers} buffer values: pass buffers=")
            buffer_values = self._flat(buffers, self._num_buffers, torch.float32, "buffers")
            columns.append(pa.FixedSizeListArray.from_arrays(pa.array(buffer_values, pa.float32()), self._num_buffers))
            custom[BUFFERS_CRC] = str(crc32_bytes(buffer_values))
        elif buffers is not None and buffers.numel():
            raise ValueError("buffers given but buffer_layout is empty")
        columns += [pa.array([float(metrics.get(n, math.nan))], pa.float64()) for n in self.meta["metric_names"]]

        batch = pa.record_batch(columns, schema=self._schema)
        if self._pending is not None:
            self._ipc.write_batch(self._pending[0], custom_metadata=self._pending[1])
        self._pending = (batch, custom)
        self._epochs.append(epoch)

    def keep_resume_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """The training state after the last snapshot (generator, optimiser state, the exact float32 ``params``),
        stored with the last snapshot's metadata at commit and crc32-checked on read: what extending the
        trajectory resumes from. ``params`` are kept only where the store dtype rounds the snapshots (a float32
        snapshot already holds them exactly)."""
        self._check_open()
        from safetensors.torch import save

        keep = {k: v.detach().cpu().contiguous() for k, v in tensors.items()
                if not (k == "params" and self.meta["dtype"] == "float32")}
        self._resume_state = save(keep)

    # --- finishing ---------------------------------------------------------
    def commit(self, *, wall_time_s: float | None = None) -> TrajectoryInfo:
        """Write the trailer, close and publish atomically; returns the info.

        ``wall_time_s`` defaults to the time since the writer was created.
        """
        self._check_open()
        if not self._epochs:
            self.abort()
            raise ValueError(f"trajectory {self.trajectory_id}: no snapshots appended, nothing committed")
        wall = time.monotonic() - self._started if wall_time_s is None else float(wall_time_s)
        trailer = {NUM_SNAPSHOTS: len(self._epochs), WALL_TIME_S: wall, EPOCHS: list(self._epochs),
                   RESUME_STATE: self._resume_state is not None}
        batch, custom = self._pending
        try:
            custom = {**custom, NUM_SNAPSHOTS: str(len(self._epochs)), WALL_TIME_S: repr(wall),
                      EPOCHS: json.dumps(self._epochs)}
            if self._resume_state is not None:
                custom.update({RESUME_STATE: base64.b64encode(self._resume_state).decode("ascii"),
                               RESUME_STATE_CRC: str(crc32_bytes(self._resume_state))})
            self._ipc.write_batch(batch, custom_metadata=custom)
            self._ipc.close()
            size = self._publish()
        except BaseException:
            self.abort()
            raise
        self._state = "committed"
        final = {n: batch.column(n)[0].as_py() for n in self.meta["metric_names"]}
        return make_info(self.path, self.meta, trailer, size_bytes=size, final_metrics=final)

    def _publish(self) -> int:
        if self._local:
            self._sink.close()
            size = os.path.getsize(self._temp_path)
            _fsync_path(self._temp_path)
            os.replace(self._temp_path, self.path)  # atomic: readers see old or new, never half
            _fsync_path(os.path.dirname(self.path))
            return size
        data = self._sink.getvalue()
        if self._fs.type_name not in _OBJECT_STORES:
            self._fs.create_dir(self.path.rsplit("/", 1)[0], recursive=True)
        with self._fs.open_output_stream(self.path) as out:  # one PUT
            out.write(data)
        return data.size

    def abort(self) -> None:
        """Drop everything written so far; nothing is published. Idempotent."""
        if self._state != "open":
            return
        self._state = "aborted"
        self._pending = None
        for closable in (self._ipc, self._sink):
            try:
                closable.close()
            except Exception:
                pass
        if self._temp_path is not None:
            try:
                os.remove(self._temp_path)
            except FileNotFoundError:
                pass

    def _check_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"trajectory writer {self.trajectory_id} is already {self._state}")

    def __enter__(self) -> "TrajectoryWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif self._state == "open":
            self.commit()
