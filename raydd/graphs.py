"""Training steps replayed as CUDA graphs (``engine="graph"``), and the pre-drawn randomness they replay.

A small network's training step on a GPU is a few hundred tiny kernels: launching them from Python costs more
than running them. ``GraphTrainer`` trains a ``NetworkStack`` (one network or a pack) epoch by epoch with the
numbers of ``raydd.training.train_epoch_together``, but

1. every random draw of an epoch — each network's batch order, DSA parameters and CutMix — is made up front from
   the network's own CPU generator, in exactly the order the eager loop draws them (``plan_epoch``), and moved to
   the device once;
2. the data lives on the device, and a step gathers its batch there;
3. DSA is applied in its fixed-shape table form (``DSA.apply_table``: every op computed, each image keeping its
   own op's output by selection), CutMix as a selection too, so a step's kernels never depend on the draws;
4. ``StepReplay`` runs the step eagerly a few times (on a side stream: cuDNN/cuBLAS set themselves up), then
   captures it as a CUDA graph and replays the graph for every later step of the same shape and learning rate,
   after copying that step's inputs into the graph's static tensors.

On a CPU (or with ``graphs=False``) the same steps run eagerly: the fallback, which gives the eager loop's numbers
bit for bit (tests/test_graphs.py). On CUDA the replayed kernels are the eager step's kernels; the tests that run
there compare the two.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch.nn import functional as F

from .data.augment.dsa import DSA, DSATable
from .training import EpochStats, NetworkStack, autocast, draw_cutmix

WARMUP_STEPS = 3  # eager steps of a shape before it is captured (PyTorch's advice for whole-step capture)


class StepReplay:
    """Runs ``step(inputs)`` (a dict of tensors; the step updates tensors that persist between steps in place)
    eagerly, or on CUDA as a CUDA graph: per ``key`` (what changes the kernels: shapes, a learning rate) the first
    ``warmup`` calls run eagerly on a side stream, the next one captures the step on static copies of its inputs,
    and from then on each call copies its inputs into those and replays the graph."""

    def __init__(self, step: Callable[[dict[str, torch.Tensor]], None], *, graphs: bool,
                 warmup: int = WARMUP_STEPS) -> None:
        self.step = step
        self.graphs = graphs
        self.warmup = warmup
        self._seen: dict[object, int] = {}
        self._captured: dict[object, tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor]]] = {}
        self.replays = 0  # steps that ran as a graph replay (the benchmarks and tests read it)

    def __call__(self, key: object, inputs: dict[str, torch.Tensor]) -> None:
        if not self.graphs:
            self.step(inputs)
            return
        captured = self._captured.get(key)
        if captured is None and self._seen.get(key, 0) < self.warmup:
            self._seen[key] = self._seen.get(key, 0) + 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.step(inputs)
            torch.cuda.current_stream().wait_stream(side)
            return
        if captured is None:
            static = {name: t.clone() for name, t in inputs.items()}
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.step(static)
            captured = self._captured[key] = (graph, static)
        graph, static = captured
        for name, t in inputs.items():
            static[name].copy_(t, non_blocking=True)
        graph.replay()
        self.replays += 1


@dataclass
class PlannedStep:
    """One step's draws for ``K`` networks on batches of ``b`` images, as tensors (CPU until moved)."""

    inputs: dict[str, torch.Tensor]
    size: int  # b


def plan_epoch(n: int, batch_size: int, generators: list[torch.Generator], *, dsa: DSA | None,
               image_size: tuple[int, int], cutmix_prob: float = 0.0, cutmix_beta: float = 1.0) -> list[PlannedStep]:
    """Every random draw of one epoch of ``train_epoch_together`` for the networks of ``generators``, drawn from
    each generator in the order that loop draws (batch order first; then per step its DSA parameters, the CutMix
    coin and CutMix's own draws), as per-step input tensors of ``GraphTrainer``'s step: ``idx`` [K, b] (each
    network's batch), the DSA table of the K·b images, and with CutMix each network's shuffle (``perm``, indices
    into the K·b batch), pasted box (``box`` [K, H, W]) and loss weights (``lam_a``, ``lam_b`` [K]: 1 and 0 where a
    network did not mix)."""
    k = len(generators)
    orders = [torch.randperm(n, generator=g) for g in generators]
    h, w = image_size
    steps = []
    for start in range(0, n, batch_size):
        idx = torch.stack([order[start:start + batch_size] for order in orders])
        b = idx.shape[1]
        inputs: dict[str, torch.Tensor] = {"idx": idx}
        draws, cuts = [], []
        for g in generators:
            draws.append(dsa.draw(g, b, image_size) if dsa is not None and dsa.ops else None)
            mixed = cutmix_prob > 0 and float(torch.rand(1, generator=g)) < cutmix_prob
            cuts.append(draw_cutmix(b, h, w, cutmix_beta, g) if mixed else None)
        if draws[0] is not None:
            table = dsa.table(draws, [b] * k)
            inputs.update(table_inputs(table))
        if cutmix_prob > 0:
            perm = torch.arange(k * b).view(k, b)
            box = torch.zeros(k, h, w, dtype=torch.bool)
            lam = torch.ones(k, dtype=torch.float64)
            for i, cut in enumerate(cuts):
                if cut is not None:
                    perm[i] = cut.perm + i * b
                    box[i, cut.y0:cut.y1, cut.x0:cut.x1] = True
                    lam[i] = cut.lam
            lam_a = lam.float()
            # the eager loop's own arithmetic of the weights: one network alone weighs by Python floats (1 - λ in
            # float64), networks together by a float32 tensor (1 - λ in float32)
            lam_b = (1 - lam).float() if k == 1 else 1 - lam_a
            inputs.update(perm=perm.view(-1), box=box, lam_a=lam_a, lam_b=lam_b)
        steps.append(PlannedStep(inputs, b))
    return steps


def table_inputs(table: DSATable, prefix: str = "") -> dict[str, torch.Tensor]:
    """A DSA table as named step inputs (``table_from`` reads them back)."""
    out = {} if table.op_index is None else {f"{prefix}dsa_op": table.op_index}
    for op, values in table.values.items():
        for j, v in enumerate(values):
            out[f"{prefix}dsa_{op}_{j}"] = v
    return out


def table_from(inputs: dict[str, torch.Tensor], dsa: DSA, prefix: str = "") -> DSATable:
    values = {}
    for op in dsa.ops:
        slots = [name for name in inputs if name.startswith(f"{prefix}dsa_{op}_")]
        values[op] = tuple(inputs[f"{prefix}dsa_{op}_{j}"] for j in range(len(slots)))
    return DSATable(inputs.get(f"{prefix}dsa_op"), values)


class GraphTrainer:
    """Trains the networks of ``stack`` epoch after epoch as ``train_epoch_together`` would (same draws, same
    arithmetic), from ``plan_epoch``'s pre-drawn randomness, on data copied to ``device`` once, each step through a
    ``StepReplay`` (CUDA graphs on CUDA when ``graphs``; the eager fallback otherwise). ``optimizer`` is the
    stack's; a changed learning rate (``param_groups[0]["lr"]``) is captured anew."""

    def __init__(self, stack: NetworkStack, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                 labels: torch.Tensor, *, batch_size: int, generators: list[torch.Generator], device: torch.device,
                 dsa: DSA | None = None, cutmix_prob: float = 0.0, cutmix_beta: float = 1.0,
                 precision: str = "fp32", graphs: bool | None = None) -> None:
        if len(generators) != len(stack):
            raise ValueError(f"{len(generators)} generators for {len(stack)} networks: pass one per network")
        self.stack, self.optimizer = stack, optimizer
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.batch_size, self.generators = batch_size, generators
        self.dsa, self.cutmix_prob, self.cutmix_beta = dsa, cutmix_prob, cutmix_beta
        self.precision = precision
        k = len(stack)
        self.total_loss = torch.zeros(k, dtype=torch.float64, device=self.device)
        self.correct = torch.zeros(k, dtype=torch.long, device=self.device)
        use_graphs = self.device.type == "cuda" if graphs is None else graphs
        if use_graphs and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {self.device}")
        self.replay = StepReplay(self._step, graphs=use_graphs)

    def epoch(self) -> list[EpochStats]:
        steps = plan_epoch(len(self.labels), self.batch_size, self.generators, dsa=self.dsa,
                           image_size=tuple(self.images.shape[-2:]), cutmix_prob=self.cutmix_prob,
                           cutmix_beta=self.cutmix_beta)
        if self.stack.single is not None:
            self.stack.single.train()
        full = [s for s in steps if s.size == steps[0].size]  # every step but a shorter last one
        # the epoch's draws moved to the device in one copy per input, not one per step
        on_device = {name: torch.stack([s.inputs[name] for s in full]).to(self.device) for name in full[0].inputs}
        self.total_loss.zero_()
        self.correct.zero_()
        seen = 0
        lr = self.optimizer.param_groups[0]["lr"]
        for i, step in enumerate(steps):
            if i < len(full):
                inputs = {name: t[i] for name, t in on_device.items()}
            else:
                inputs = {name: t.to(self.device) for name, t in step.inputs.items()}
            self.replay((step.size, lr), inputs)
            seen += step.size
        loss = (self.total_loss / max(seen, 1)).tolist()
        acc = (self.correct.double() / max(seen, 1)).tolist()
        return [EpochStats(l_, a) for l_, a in zip(loss, acc)]

    def _step(self, inputs: dict[str, torch.Tensor]) -> None:
        """One training step of every network on its planned batch (what the graph captures)."""
        k, idx = len(self.stack), inputs["idx"]
        b = idx.shape[1]
        flat = idx.reshape(-1)
        x, y = self.images[flat], self.labels[flat]
        if self.dsa is not None and self.dsa.ops:
            x = self.dsa.apply_table(x, table_from(inputs, self.dsa))
        mixing = "perm" in inputs
        if mixing:
            perm = inputs["perm"]
            box = inputs["box"][:, None, None].expand(k, b, 1, *x.shape[-2:]).reshape(k * b, 1, *x.shape[-2:])
            x = torch.where(box, x[perm], x)
            y_b = y[perm]
        with autocast(self.precision, self.device):
            if self.stack.single is not None:
                out = self.stack.single(x)
                losses = F.cross_entropy(out, y).view(1)
                if mixing:
                    losses = inputs["lam_a"] * losses + inputs["lam_b"] * F.cross_entropy(out, y_b).view(1)
                loss = losses[0]
                logits = out.unsqueeze(0)
            else:
                logits = self.stack.forward(x.view(k, b, *x.shape[1:]), train=True)
                flat_logits = logits.flatten(0, 1)
                losses = F.cross_entropy(flat_logits, y, reduction="none").view(k, -1).mean(1)
                if mixing:
                    losses_b = F.cross_entropy(flat_logits, y_b, reduction="none").view(k, -1).mean(1)
                    losses = inputs["lam_a"] * losses + inputs["lam_b"] * losses_b
                loss = losses.sum()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.total_loss.add_(losses.detach().double() * b)
        hard = y.view(k, b, -1).argmax(2) if y.dim() == 2 else y.view(k, b)
        self.correct.add_((logits.argmax(2) == hard).sum(1))


class GraphedIteration:
    """A condensation method's whole iteration through a ``StepReplay`` (CUDA graphs on CUDA): ``iteration(inputs,
    out)`` updates the method's tensors in place and writes its metrics into ``out`` (a device vector whose first
    entry is the loss). A non-finite loss leaves the synthetic tensors and their optimisers' momentum buffers as they
    were — the eager iterations raise before stepping — and ``run`` returns the metrics for the caller to raise."""

    def __init__(self, iteration: Callable[[dict[str, torch.Tensor], torch.Tensor], None], *, device: torch.device,
                 metrics: int, leaves: Callable[[], list[torch.Tensor]], optimisers: list[torch.optim.Optimizer],
                 graphs: bool | None = None) -> None:
        self.out = torch.zeros(metrics, dtype=torch.float32, device=device)
        self.replay = StepReplay(lambda inputs: iteration(inputs, self.out),
                                 graphs=device.type == "cuda" if graphs is None else graphs)
        self.leaves, self.optimisers = leaves, optimisers

    def _state(self) -> list[torch.Tensor]:
        tensors = list(self.leaves())
        for opt in self.optimisers:
            tensors += [s["momentum_buffer"] for s in opt.state.values() if s.get("momentum_buffer") is not None]
        return tensors

    def run(self, inputs: dict[str, torch.Tensor]) -> list[float]:
        before = [t.detach().clone() for t in self._state()]
        self.replay("iteration", inputs)
        values = self.out.tolist()
        if not math.isfinite(values[0]):
            with torch.no_grad():
                for t, saved in zip(self._state(), before):
                    t.copy_(saved)
            if len(before) == len(self.leaves()):  # momentum buffers this iteration created
                for opt in self.optimisers:
                    for state in opt.state.values():
                        state.pop("momentum_buffer", None)
        return values
