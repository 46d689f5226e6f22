"""Expert trajectories in the reference codes' replay-buffer layout, both ways.

MTT's buffer.py (and DATM's and TESLA's, which reuse it) saves ``replay_buffer_<n>.pt``: a list of experts,
each a list of epochs, each the list of the network's parameter tensors in ``module.parameters()`` order.
raydd stores an epoch as one flat vector in the model's ``named_parameters()`` order (``ParamLayout``). For
the ConvNets these codes build the two orders are the same tensors in the same order: checked against
mtt-distillation's networks.py (ConvNet-3 w128 with instance, batch and no normalisation, 14/14/8 tensors of
equal shapes; its forward with raydd's parameters copied in by position equals raydd's exactly in float64).

``raydd store export-buffer`` writes raydd's experts this way, so the reference distillation scripts can read
a store raydd farmed; ``load_reference_buffer`` reads such a file back with ``torch.load(weights_only=True)``
(tensors and lists only, never an arbitrary pickle) and ``flat_epochs`` turns one expert into raydd's flat
vectors, checked against a layout.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from ..files import atomic_write_with
from ..models.flat import ParamLayout


def expert_epochs(trajectory, epochs: Sequence[int] | None = None) -> list[list[torch.Tensor]]:
    """One stored trajectory as a reference expert: per epoch (default: every stored one, in order), its
    parameter tensors in layout order (float32, CPU)."""
    layout = ParamLayout.from_list(trajectory.meta["param_layout"])
    stored = set(trajectory.epochs)
    wanted = sorted(stored) if epochs is None else list(epochs)
    missing = [e for e in wanted if e not in stored]
    if missing:
        raise ValueError(f"trajectory {trajectory.info.trajectory_id} stores no epoch {missing[0]}: it stores "
                         f"{min(trajectory.epochs)}..{max(trajectory.epochs)}")
    return [[t.detach().clone() for t in layout.unflatten(trajectory.params(e, torch.float32)).values()]
            for e in wanted]


def flat_epochs(expert: Sequence[Sequence[torch.Tensor]], layout: ParamLayout) -> list[torch.Tensor]:
    """A reference expert as raydd's flat vectors, one per epoch; a tensor count or shape that is not the
    layout's is a one-line ValueError naming the epoch and the tensor."""
    out = []
    for e, tensors in enumerate(expert):
        if len(tensors) != len(layout.names):
            raise ValueError(f"epoch {e} holds {len(tensors)} parameter tensors, the model has {len(layout.names)} "
                             f"({', '.join(layout.names[:3])}, ...)")
        for i, (tensor, name, shape) in enumerate(zip(tensors, layout.names, layout.shapes)):
            if tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"epoch {e}, tensor {i} ({name}) has shape {tuple(tensor.shape)}, the model's is "
                                 f"{tuple(shape)}")
        out.append(torch.cat([t.detach().reshape(-1).float() for t in tensors]))
    return out


def save_reference_buffer(experts: list[list[list[torch.Tensor]]], path: str | os.PathLike) -> Path:
    """Write ``experts`` as a reference ``replay_buffer_<n>.pt`` (``atomic_write_with``: never half written)."""
    return atomic_write_with(path, lambda fh: torch.save(experts, fh))


def load_reference_buffer(path: str | os.PathLike) -> list[list[list[torch.Tensor]]]:
    """Read a reference replay buffer: tensors in nested lists only (``weights_only``); anything else is a
    one-line ValueError naming the file and what was expected."""
    expected = "a list of experts, each a list of epochs, each a list of parameter tensors"
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - torch raises several kinds for a file that is not a buffer
        raise ValueError(f"{path}: not a replay buffer torch.load can read safely ({type(err).__name__}): "
                         f"expected {expected}") from None
    ok = isinstance(data, list) and data and all(
        isinstance(expert, list) and expert and all(
            isinstance(epoch, list) and epoch and all(isinstance(t, torch.Tensor) for t in epoch) for epoch in expert)
        for expert in data)
    if not ok:
        raise ValueError(f"{path}: holds {type(data).__name__}, expected {expected}")
    return data
