"""Plain-torch training helpers shared by the farm recipes and the evaluation protocols."""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap
from torch.nn import functional as F

from .validation import check_choice

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass
class EpochStats:
    loss: float
    acc: float


# Arithmetic of the forward passes and losses (``precision=`` of the training functions, FarmSpec, EvalConfig):
# fp32 runs as plain float32, no autocast context entered; bf16 runs them under torch.autocast(bfloat16).
# Either way parameters, gradients, optimizer state and stored snapshots are float32.
PRECISIONS = ("fp32", "bf16")

# How a network's training steps run (``engine=`` of FarmSpec and EvalConfig): ``eager``, the loop below; ``graph``,
# raydd.graphs: every random draw of an epoch made up front in the eager loop's order, the data on the device,
# and on CUDA each step replayed as a captured CUDA graph (elsewhere run as the same step eagerly: the numbers
# of the eager loop, tests/test_graphs.py).
ENGINES = ("eager", "graph")


def check_precision(where: str, value) -> str:
    """``value`` is one of PRECISIONS (one-line error naming ``where`` otherwise); returns it."""
    return check_choice(where, value, PRECISIONS)


def autocast(precision: str, device: torch.device):
    """The context forward passes and losses run in: none at all for fp32 (bit-identical to no context),
    ``torch.autocast(device.type, bfloat16)`` for bf16."""
    if precision == "fp32":
        return contextlib.nullcontext()
    check_precision("precision", precision)
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def minibatches(n: int, batch_size: int, generator: torch.Generator, shuffle: bool = True):
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


@dataclass(frozen=True)
class CutMixDraw:
    """One CutMix draw for a batch: the shuffle, the pasted box (rows y0:y1, columns x0:x1) and the label
    weight λ of the unshuffled labels."""

    perm: torch.Tensor
    y0: int
    y1: int
    x0: int
    x1: int
    lam: float


def draw_cutmix(batch: int, h: int, w: int, beta: float, generator: torch.Generator) -> CutMixDraw:
    """CutMix's random draws for a batch of ``batch`` images of ``h``×``w``, in the order ``cutmix`` draws them.

    λ ~ Beta(β, β) through a NumPy generator seeded from ``generator`` (torch's Beta sampler only reads the
    global RNG), so a trajectory is a function of its seed."""
    if beta > 0:
        seed = int(torch.randint(2 ** 62, (1,), generator=generator))
        lam = float(np.random.default_rng(seed).beta(beta, beta))
    else:
        lam = 1.0
    perm = torch.randperm(batch, generator=generator)
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(torch.randint(h, (1,), generator=generator)), int(torch.randint(w, (1,), generator=generator))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    return CutMixDraw(perm, y0, y1, x0, x1, 1.0 - (y1 - y0) * (x1 - x0) / float(h * w))


def cutmix(x: torch.Tensor, y: torch.Tensor, beta: float, generator: torch.Generator
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """CutMix (Yun et al. 2019): paste a box from a shuffled batch; returns (x, y_a, y_b, lam)."""
    d = draw_cutmix(x.shape[0], *x.shape[-2:], beta, generator)
    return paste_cutmix(x, d), y, y[d.perm.to(y.device)], d.lam


def paste_cutmix(x: torch.Tensor, d: CutMixDraw) -> torch.Tensor:
    """A copy of ``x`` with draw ``d``'s box pasted in from the shuffled batch."""
    x = x.clone()
    x[:, :, d.y0:d.y1, d.x0:d.x1] = x[d.perm.to(x.device), :, d.y0:d.y1, d.x0:d.x1]
    return x


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
                *, batch_size: int, generator: torch.Generator, device: torch.device,
                augment: Augment | None = None, cutmix_prob: float = 0.0, cutmix_beta: float = 1.0,
                precision: str = "fp32") -> EpochStats:
    """One pass over (images, labels) with cross-entropy; hard or soft (probability) labels. ``precision``:
    the arithmetic of the forward pass and loss (PRECISIONS); augmentation, backward and step are outside it."""
    model.train()
    mixed = autocast(precision, device)
    # Running sums stay on the device: one host synchronisation per epoch, not two per batch.
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = 0
    for idx in minibatches(len(labels), batch_size, generator):
        x = images[idx].to(device, non_blocking=True)
        y = labels[idx].to(device, non_blocking=True)
        if augment is not None:
            x = augment(x, generator)
        mix = None
        if cutmix_prob > 0 and float(torch.rand(1, generator=generator)) < cutmix_prob:
            x, ya, yb, lam = cutmix(x, y, cutmix_beta, generator)
            mix = (ya, yb, lam)
        with mixed:
            out = model(x)
            if mix is not None:
                ya, yb, lam = mix
                loss = lam * F.cross_entropy(out, ya) + (1 - lam) * F.cross_entropy(out, yb)
            else:
                loss = F.cross_entropy(out, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.detach().double() * len(idx)
        hard = y.argmax(1) if y.dim() == 2 else y
        correct += (out.argmax(1) == hard).sum()
        seen += len(idx)
    return EpochStats(float(total_loss) / max(seen, 1), int(correct) / max(seen, 1))


# Evaluation batch: on CPU a ConvNet's activations for 1024 images leave the cache and the pass costs
# 2.2x the CPU of batch 128 (benchmarks/expert_epoch.py); the result does not depend on it (eval mode).
EVAL_BATCH_SIZE = 128


@torch.no_grad()
def evaluate_model(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, device: torch.device,
                   batch_size: int = EVAL_BATCH_SIZE, precision: str = "fp32") -> EpochStats:
    """Loss and accuracy on a labelled set (model in eval mode); one host synchronisation at the end."""
    mixed = autocast(precision, device)
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    for start in range(0, len(labels), batch_size):
        x = images[start:start + batch_size].to(device, non_blocking=True)
        y = labels[start:start + batch_size].to(device, non_blocking=True)
        with mixed:
            out = model(x)
            total_loss += F.cross_entropy(out, y, reduction="sum")
        correct += (out.argmax(1) == y).sum()
    model.train(was_training)
    n = max(len(labels), 1)
    return EpochStats(float(total_loss) / n, int(correct) / n)


def check_gpus_here(gpus: float, what: str) -> None:
    """``gpus`` per worker on this machine alone (no cluster joined): torch must see at least that many."""
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus > 0 and have < gpus:
        raise ValueError(f"{what}={gpus:g} but this machine has {have} GPU(s) and no Ray cluster is joined "
                         f"(--address / RAY_ADDRESS): use {what}=0, or join a cluster with GPUs")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' (or None) picks CUDA when available, else CPU; an unavailable CUDA request is an error."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available here: use 'cpu' or 'auto'")
    return dev


class NetworkStack:
    """``N`` networks of one architecture as one computation (torch.func): their parameters and buffers
    stacked along a new leading dimension and the forward ``vmap``-ed over it, so network ``i`` computes
    with its own weights and statistics exactly what it computes alone (BatchNorm running statistics
    included). The convolutions run as grouped convolutions, so sums may round differently from the
    one-network kernels: equal to float tolerance, not bitwise. ``parameters()`` go to one optimizer:
    SGD with momentum and weight decay is elementwise, so each slice is updated as its own optimizer would.

    A stack of one network is that network itself (its own parameters, ``train_epoch``/``evaluate_model``):
    callers train one or several networks through the same calls, and one alone is the plain loop bit for bit.
    """

    def __init__(self, networks: list[nn.Module]):
        if not networks:
            raise ValueError("NetworkStack needs at least one network")
        self.networks = networks
        if len(networks) == 1:
            self.params, self.buffers = dict(networks[0].named_parameters()), dict(networks[0].named_buffers())
            self._base = None
        else:
            self.params, self.buffers = stack_module_state(networks)
            self._base = copy.deepcopy(networks[0]).to("meta")

    def __len__(self) -> int:
        return len(self.networks)

    def parameters(self) -> list[torch.Tensor]:
        return list(self.params.values())

    def forward(self, x: torch.Tensor, *, train: bool) -> torch.Tensor:
        """Logits ``[N, B, classes]`` of each network on its own batch ``x[i]`` (``[N, B, ...]``)."""
        if self.single is not None:
            self.single.train(train)
            return self.single(x[0]).unsqueeze(0)
        self._base.train(train)

        def one(params, buffers, inputs):
            return functional_call(self._base, (params, buffers), (inputs,))

        return vmap(one)(self.params, self.buffers, x)

    @property
    def single(self) -> nn.Module | None:
        """The network of a stack of one (trained as itself), else None."""
        return self.networks[0] if self._base is None else None

    @torch.no_grad()
    def write_back(self) -> list[nn.Module]:
        """Copy every slice back into its own module (parameters and buffers) and return the modules."""
        if self.single is not None:
            return self.networks
        for i, net in enumerate(self.networks):
            for name, tensor in net.named_parameters():
                tensor.copy_(self.params[name][i])
            for name, tensor in net.named_buffers():
                tensor.copy_(self.buffers[name][i])
        return self.networks


def train_epoch_together(stack: NetworkStack, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                         labels: torch.Tensor, *, batch_size: int, generators: list[torch.Generator],
                         device: torch.device, augment: Augment | None = None, cutmix_prob: float = 0.0,
                         cutmix_beta: float = 1.0, precision: str = "fp32") -> list[EpochStats]:
    """``train_epoch`` for every network of ``stack`` at once. Network ``i`` draws its batch order, its
    augmentation and its CutMix from ``generators[i]`` in the order ``train_epoch`` would, so it sees the
    batches it would see alone; the summed loss gives each network the gradient of its own mean loss."""
    if len(generators) != len(stack):
        raise ValueError(f"{len(generators)} generators for {len(stack)} networks: pass one per network")
    if stack.single is not None:
        return [train_epoch(stack.single, optimizer, images, labels, batch_size=batch_size, generator=generators[0],
                            device=device, augment=augment, cutmix_prob=cutmix_prob, cutmix_beta=cutmix_beta,
                            precision=precision)]
    mixed = autocast(precision, device)
    n_nets = len(stack)
    total_loss = torch.zeros(n_nets, dtype=torch.float64, device=device)
    correct = torch.zeros(n_nets, dtype=torch.long, device=device)
    seen = 0
    batches = [minibatches(len(labels), batch_size, g) for g in generators]
    for step in zip(*batches):
        xs, ys, ys_b, lams = [], [], [], []
        for idx, g in zip(step, generators):
            x = images[idx].to(device, non_blocking=True)
            y = labels[idx].to(device, non_blocking=True)
            if augment is not None:
                x = augment(x, g)
            y_b, lam = y, 1.0
            if cutmix_prob > 0 and float(torch.rand(1, generator=g)) < cutmix_prob:
                x, y, y_b, lam = cutmix(x, y, cutmix_beta, g)
            xs.append(x)
            ys.append(y)
            ys_b.append(y_b)
            lams.append(lam)
        x, y, y_b = torch.stack(xs), torch.stack(ys), torch.stack(ys_b)
        with mixed:
            out = stack.forward(x, train=True)
            flat = out.flatten(0, 1)
            losses = F.cross_entropy(flat, y.flatten(0, 1), reduction="none").view(n_nets, -1).mean(1)
            if any(lam != 1.0 for lam in lams):  # CutMix: lam * CE(y_a) + (1 - lam) * CE(y_b), per network
                lam = torch.tensor(lams, dtype=losses.dtype, device=device)
                losses_b = F.cross_entropy(flat, y_b.flatten(0, 1), reduction="none").view(n_nets, -1).mean(1)
                losses = lam * losses + (1 - lam) * losses_b
        optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        optimizer.step()
        total_loss += losses.detach().double() * y.shape[1]
        hard = y.argmax(2) if y.dim() == 3 else y
        correct += (out.argmax(2) == hard).sum(1)
        seen += y.shape[1]
    loss, acc = (total_loss / max(seen, 1)).tolist(), (correct.double() / max(seen, 1)).tolist()
    return [EpochStats(l_, a) for l_, a in zip(loss, acc)]


def evaluate_together(stack: NetworkStack, images: torch.Tensor, labels: torch.Tensor, *, device: torch.device,
                      batch_size: int = EVAL_BATCH_SIZE, precision: str = "fp32") -> list[EpochStats]:
    """``evaluate_model`` for every network of ``stack``, one network after another (each slice written back
    into its own module first): the test pass has no backward to share, and a vmapped forward runs grouped
    convolutions, slower than separate ones on CPU and on an H200 (benchmarks/eval_together.py)."""
    return [evaluate_model(net, images, labels, device=device, batch_size=batch_size, precision=precision)
            for net in stack.write_back()]
