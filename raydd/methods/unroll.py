"""Unrolled student steps whose memory does not grow with N: segment checkpointing.

Trajectory matching backpropagates a loss on θ̂_N through N student steps
θ̂_{n+1} = step(θ̂_n; S, α, ...). Kept whole (``unroll="full"``), autograd holds every step's
saved tensors until the backward pass: memory O(N · (P + activations)). ``checkpointed_unroll``
(``unroll="checkpoint"``) gives the same gradient (to float rounding) holding only the segment
boundaries: the forward pass runs the N steps without a graph and keeps θ̂ at the start of every
segment of k steps, with the random-generator state and the minibatch queue there; the backward
pass re-runs one segment at a time with a graph, from its saved start, replaying the same
minibatches and augmentation draws, and backpropagates the incoming gradient through it (to the
segment's start θ̂ and to the leaves S, α, ...). Memory ⌈N/k⌉ · P + k · G (P: one parameter vector,
G: one step's graph); the work is the same for every k — one more forward pass of the student than
``full`` — so the default k = 1 keeps the least: a step's graph is hundreds of parameter vectors
(ConvNet-3 w128, 100 images of 28x28: P = 1.2 MiB, G ≈ 280 MiB), and N of them stay far below it.

The step function has the signature ``step(params, leaves, generator, pending, *, create_graph)``
and must draw all its randomness from ``generator`` and take its minibatches from the ``pending``
queue (refilled from the generator), so that a replay is exact.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

UNROLL_MODES = ("full", "checkpoint")

StepFn = Callable[..., torch.Tensor]


def segment_length(steps: int, segment: int = 0) -> int:
    """k: the given segment length (at most N), or 1 (0: the default)."""
    return min(segment, steps) if segment > 0 else 1


def _alias(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach()


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


class _CheckpointedUnroll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, theta, plan, *leaves):
        step, steps, k, generator = plan
        constants = [leaf.detach() for leaf in leaves]
        params = theta.detach().clone().requires_grad_(True)
        pending: list[torch.Tensor] = []
        starts, replays = [], []
        # every step differentiates its inner loss in θ (no graph is kept); an innermost pair of saved-tensor
        # hooks keeps these short-lived tensors out of any meter of what is held for the backward pass
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_alias, _same):
            for first in range(0, steps, k):
                starts.append(params.detach())
                replays.append((generator.get_state(), list(pending), min(k, steps - first)))
                for _ in range(replays[-1][2]):
                    params = step(params, constants, generator, pending, create_graph=False)
        ctx.step, ctx.replays, ctx.generator_device = step, replays, generator.device
        ctx.save_for_backward(*leaves, *starts)  # the boundaries: O(N/k) parameter vectors
        ctx.num_leaves = len(leaves)
        return params.detach()

    @staticmethod
    def backward(ctx, grad_end):
        saved = ctx.saved_tensors
        leaves, starts = saved[:ctx.num_leaves], saved[ctx.num_leaves:]
        needs = ctx.needs_input_grad[2:]
        grads: list[torch.Tensor | None] = [None] * len(leaves)
        grad = grad_end
        for start, (state, queue, count) in zip(reversed(starts), reversed(ctx.replays)):
            generator = torch.Generator(device=ctx.generator_device)
            generator.set_state(state)
            pending = list(queue)
            with torch.enable_grad():
                inputs = [leaf.detach().requires_grad_(need) for leaf, need in zip(leaves, needs)]
                begin = start.detach().clone().requires_grad_(True)
                params = begin
                for _ in range(count):
                    params = ctx.step(params, inputs, generator, pending, create_graph=True)
                wanted = [begin] + [x for x, need in zip(inputs, needs) if need]
                found = torch.autograd.grad(params, wanted, grad, allow_unused=True)
            grad = found[0]
            it = iter(found[1:])
            for i, need in enumerate(needs):
                if need:
                    g = next(it)
                    if g is not None:
                        grads[i] = g if grads[i] is None else grads[i] + g
        return (None, None, *grads)


def checkpointed_unroll(step: StepFn, theta: torch.Tensor, leaves: Sequence[torch.Tensor], steps: int,
                        generator: torch.Generator, segment: int = 0) -> torch.Tensor:
    """θ̂_N after ``steps`` calls of ``step`` from ``theta``, differentiable in ``leaves`` (the module doc):
    only ⌈N/k⌉ segment starts are kept between the forward and the backward pass."""
    plan = (step, steps, segment_length(steps, segment), generator)
    return _CheckpointedUnroll.apply(theta, plan, *leaves)
