"""Pickle-free persistence: nested state -> safetensors file (tensors + one JSON string).

``pack`` walks dicts, lists and tuples; every tensor goes into a flat tensor table under a
path-like key and is replaced in the JSON tree by ``{"__tensor__": key}``. Dicts whose keys
are not all strings (optimiser states use int keys) become ``{"__items__": [[k, v], ...]}``,
so ``unpack(pack(x))`` restores them exactly. Files are written atomically (temp file in the
same directory, fsync, ``os.replace``); a reader never sees half a file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..files import atomic_write

META_KEY = "raydd"


def _safetensors():
    try:
        from safetensors import torch as st
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("raydd needs the 'safetensors' package to save synthetic sets and checkpoints: "
                          "pip install 'safetensors>=0.4,<1'") from exc
    return st


def pack(obj: Any, tensors: dict[str, torch.Tensor] | None = None, prefix: str = "") -> tuple[Any, dict]:
    """(JSON-able tree, tensor table) for a nested structure of tensors and plain values."""
    if tensors is None:
        tensors = {}
    if isinstance(obj, torch.Tensor):
        key = prefix or "tensor"
        while key in tensors:
            key += "_"
        tensors[key] = obj.detach().cpu().clone().contiguous()  # own storage: safetensors refuses shared memory
        return {"__tensor__": key}, tensors
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: pack(v, tensors, f"{prefix}.{k}" if prefix else k)[0] for k, v in obj.items()}, tensors
        items = [[k, pack(v, tensors, f"{prefix}.{k}" if prefix else str(k))[0]] for k, v in obj.items()]
        return {"__items__": items}, tensors
    if isinstance(obj, (list, tuple)):
        return [pack(v, tensors, f"{prefix}.{i}" if prefix else str(i))[0] for i, v in enumerate(obj)], tensors
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj, tensors
    raise TypeError(f"cannot serialise {type(obj).__name__} at {prefix or '<root>'}: only tensors, dicts, "
                    f"lists, tuples, str, int, float, bool and None are stored")


def unpack(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of ``pack`` (tuples come back as lists)."""
    if isinstance(tree, dict):
        if set(tree) == {"__tensor__"}:
            return tensors[tree["__tensor__"]]
        if set(tree) == {"__items__"}:
            return {k: unpack(v, tensors) for k, v in tree["__items__"]}
        return {k: unpack(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [unpack(v, tensors) for v in tree]
    return tree


def save_tree(path: str | os.PathLike, obj: Any, *, kind: str) -> Path:
    """Write a nested structure to ``path`` (safetensors, atomic); ``kind`` is checked on load."""
    tree, tensors = pack(obj)
    header = json.dumps({"kind": kind, "tree": tree})
    return atomic_write(path, _safetensors().save(tensors, metadata={META_KEY: header}))


def load_tree(path: str | os.PathLike, *, kind: str) -> Any:
    """Read what ``save_tree`` wrote; a file of another kind or not from raydd is a ValueError."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist or is not a file")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file ({exc})") from None
    if META_KEY not in meta:
        raise ValueError(f"{path} is a safetensors file without raydd metadata (not written by raydd)")
    header = json.loads(meta[META_KEY])
    if header.get("kind") != kind:
        raise ValueError(f"{path} holds a raydd {header.get('kind')!r}, not a {kind!r}")
    return unpack(header["tree"], tensors)
