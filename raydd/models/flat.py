"""One flat parameter vector per network, with a stable layout.

Trajectory matching differentiates through unrolled SGD steps taken on a flat
vector of all parameters; the store keeps every snapshot in the same layout.
The layout is the order of ``module.named_parameters()`` (deterministic for a
given ModelSpec), recorded as ``[(name, shape), ...]``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call


@dataclass(frozen=True)
class ParamLayout:
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of_parameters(cls, module: nn.Module) -> "ParamLayout":
        items = list(module.named_parameters())
        return cls(tuple(n for n, _ in items), tuple(tuple(p.shape) for _, p in items))

    @classmethod
    def of_buffers(cls, module: nn.Module) -> "ParamLayout":
        """Floating-point buffers (BatchNorm running mean/var); integer counters are left out."""
        items = [(n, b) for n, b in module.named_buffers() if b.is_floating_point()]
        return cls(tuple(n for n, _ in items), tuple(tuple(b.shape) for _, b in items))

    @classmethod
    def from_list(cls, pairs) -> "ParamLayout":
        return cls(tuple(str(n) for n, _ in pairs), tuple(tuple(int(d) for d in s) for _, s in pairs))

    def to_list(self) -> list[list]:
        return [[n, list(s)] for n, s in zip(self.names, self.shapes)]

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate named tensors into one 1-D vector in layout order (keeps autograd)."""
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise ValueError(f"cannot flatten: missing tensors {missing[:5]}")
        if not self.names:
            return torch.zeros(0)
        return torch.cat([tensors[n].reshape(-1) for n in self.names])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat vector into named views with their shapes (keeps autograd)."""
        if flat.dim() != 1 or flat.numel() != self.numel:
            raise ValueError(f"flat vector has shape {tuple(flat.shape)}: expected ({self.numel},) for this layout")
        return {n: chunk.view(s) for n, s, chunk in zip(self.names, self.shapes, flat.split(self.sizes))}


def flatten_params(module: nn.Module) -> torch.Tensor:
    """A detached copy of all parameters as one float32 vector."""
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()]).float().clone()


def flatten_buffers(module: nn.Module) -> torch.Tensor:
    layout = ParamLayout.of_buffers(module)
    named = dict(module.named_buffers())
    return layout.flatten({n: named[n].detach() for n in layout.names}).float().clone()


def load_flat_params(module: nn.Module, flat: torch.Tensor, buffers: torch.Tensor | None = None) -> nn.Module:
    """Copy a flat vector (and optionally flat buffers) into the module in place."""
    params = ParamLayout.of_parameters(module).unflatten(flat)
    named = dict(module.named_parameters())
    with torch.no_grad():
        for name, value in params.items():
            named[name].copy_(value)
        if buffers is not None:
            buf_layout = ParamLayout.of_buffers(module)
            named_buf = dict(module.named_buffers())
            for name, value in buf_layout.unflatten(buffers).items():
                named_buf[name].copy_(value)
    return module


class FlatModel:
    """A module evaluated at an arbitrary flat parameter vector.

    ``FlatModel(net)(flat, x)`` runs ``net`` with its parameters replaced by the
    views of ``flat`` (torch.func.functional_call), so gradients flow into
    ``flat`` and, through it, into whatever produced it.
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self.layout = ParamLayout.of_parameters(module)

    def __call__(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.module, self.layout.unflatten(flat), (x,))

    def embed(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Features before the classifier, at parameters ``flat``."""
        params = {"net." + n: v for n, v in self.layout.unflatten(flat).items()}
        return functional_call(_Embedder(self.module), params, (x,))


class _Embedder(nn.Module):
    """Routes forward() to the wrapped network's embed() so functional_call can reach it."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.embed(x)
