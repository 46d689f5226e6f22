"""Unrolled student steps whose memory does not grow with N: segment checkpointing, and TESLA's
first-order gradient.

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

``first_order_unroll`` (``unroll="tesla"``) is the procedure of TESLA (Cui et al., ICML 2023, Sec. 4.1,
Eq. 5-6): after a graph-free forward pass, the N steps are replayed in order from θ̂_0, each with its own
graph, and each step's update −α g_n(θ̂_n; b_n) is backpropagated with the incoming gradient of θ̂_N
itself: dL/dS ≈ Σ_n −α (∂g_n/∂S)ᵀ ∂L/∂θ̂_N, dL/dα ≈ −Σ_n g_nᵀ ∂L/∂θ̂_N. Memory: one step's graph and
three parameter vectors, for any N. The exact gradient (``full``, ``checkpoint``) carries ∂L/∂θ̂_{n+1}
back through every later step, ∂L/∂θ̂_n = (I − α H_n) ∂L/∂θ̂_{n+1} (H_n the inner loss's Hessian);
Eq. 6 treats ∂g_m/∂S (m > n) as zero, i.e. drops these terms, although θ̂_m depends on the images of
every earlier minibatch (the published critique of Eq. 6 is right: tests/test_unroll.py shows the
difference). The gradient is therefore exact for N = 1 only; for N > 1 it is a first-order
approximation, for hard and soft labels alike; momentum students (DATM-CLR) are not covered at all.
Its work equals ``checkpoint`` with k = 1, which is exact and holds N more parameter vectors.
Against justincui03/tesla's distill.py on identical draws (benchmarks/reference_equivalence.py --methods tesla):
equal to 1e-7, except that the released code applies half of this image gradient (``2 * torch.autograd.grad``
multiplies the returned tuple, not the tensor): halve lr_img to reproduce its runs.

The step function has the signature ``step(params, leaves, generator, pending, *, create_graph)``
and must draw all its randomness from ``generator`` and take its minibatches from the ``pending``
queue (refilled from the generator), so that a replay is exact. It returns the next state, or the next
state and a scalar side loss of the step (DATM-CLR's contrastive term): ``checkpointed_unroll(...,
side=True)`` then also returns the sum of the side losses, differentiable like the state. The state is
one flat tensor (a momentum student concatenates its parameters and its velocity).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

UNROLL_MODES = ("full", "checkpoint", "tesla")

StepFn = Callable[..., torch.Tensor]


def segment_length(steps: int, segment: int = 0) -> int:
    """k: the given segment length (at most N), or 1 (0: the default)."""
    return min(segment, steps) if segment > 0 else 1


def _alias(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach()


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _replay(ctx, index: int) -> tuple[torch.Generator, list[torch.Tensor], int]:
    """The generator, minibatch queue and step count at the start of saved segment ``index``."""
    state, queue, count = ctx.replays[index]
    generator = torch.Generator(device=ctx.generator_device)
    generator.set_state(state)
    return generator, list(queue), count


def _state_and_side(out) -> tuple[torch.Tensor, torch.Tensor | None]:
    return out if isinstance(out, tuple) else (out, None)


def _add(total: torch.Tensor | None, value: torch.Tensor | None) -> torch.Tensor | None:
    return total if value is None else value if total is None else total + value


def _accumulate(grads: list, needs, found) -> None:
    """Add the gradients ``found`` (one per leaf that needs one, in order) into ``grads``."""
    it = iter(found)
    for i, need in enumerate(needs):
        if need:
            g = next(it)
            if g is not None:
                grads[i] = g if grads[i] is None else grads[i] + g


class _CheckpointedUnroll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, theta, plan, *leaves):
        step, steps, k, generator = plan
        constants = [leaf.detach() for leaf in leaves]
        params = theta.detach().clone().requires_grad_(True)
        pending: list[torch.Tensor] = []
        starts, replays, side_total = [], [], None
        # every step differentiates its inner loss in θ (no graph is kept); an innermost pair of saved-tensor
        # hooks keeps these short-lived tensors out of any meter of what is held for the backward pass
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_alias, _same):
            for first in range(0, steps, k):
                starts.append(params.detach())
                replays.append((generator.get_state(), list(pending), min(k, steps - first)))
                for _ in range(replays[-1][2]):
                    params, side = _state_and_side(step(params, constants, generator, pending, create_graph=False))
                    side_total = _add(side_total, None if side is None else side.detach())
        ctx.step, ctx.replays, ctx.generator_device = step, replays, generator.device
        ctx.save_for_backward(*leaves, *starts)  # the boundaries: O(N/k) parameter vectors
        ctx.num_leaves = len(leaves)
        ctx.set_materialize_grads(False)  # an unused side loss sends no gradient
        return params.detach(), (params.new_zeros(()) if side_total is None else side_total)

    @staticmethod
    def backward(ctx, grad_end, grad_side):
        saved = ctx.saved_tensors
        leaves, starts = saved[:ctx.num_leaves], saved[ctx.num_leaves:]
        needs = ctx.needs_input_grad[2:]
        grads: list[torch.Tensor | None] = [None] * len(leaves)
        grad = grad_end
        for index in reversed(range(len(starts))):
            generator, pending, count = _replay(ctx, index)
            with torch.enable_grad():
                inputs = [leaf.detach().requires_grad_(need) for leaf, need in zip(leaves, needs)]
                begin = starts[index].detach().clone().requires_grad_(True)
                params, side_sum = begin, None
                for _ in range(count):
                    params, side = _state_and_side(ctx.step(params, inputs, generator, pending, create_graph=True))
                    side_sum = _add(side_sum, side)
                wanted = [begin] + [x for x, need in zip(inputs, needs) if need]
                outputs, incoming = [params], [torch.zeros_like(params) if grad is None else grad]
                if side_sum is not None and grad_side is not None:  # d(Σ side)/d(segment) with the side's gradient
                    outputs.append(side_sum)
                    incoming.append(grad_side)
                found = torch.autograd.grad(outputs, wanted, incoming, allow_unused=True)
            grad = found[0]
            _accumulate(grads, needs, found[1:])
        return (None, None, *grads)


def checkpointed_unroll(step: StepFn, theta: torch.Tensor, leaves: Sequence[torch.Tensor], steps: int,
                        generator: torch.Generator, segment: int = 0, *, side: bool = False):
    """θ̂_N after ``steps`` calls of ``step`` from ``theta``, differentiable in ``leaves`` (the module doc):
    only ⌈N/k⌉ segment starts are kept between the forward and the backward pass. ``side``: returns
    (θ̂_N, the sum of the steps' side losses) for a step that returns (state, side loss)."""
    plan = (step, steps, segment_length(steps, segment), generator)
    end, side_total = _CheckpointedUnroll.apply(theta, plan, *leaves)
    return (end, side_total) if side else end


class _FirstOrderUnroll(_CheckpointedUnroll):
    """TESLA's procedure (module doc): the forward pass of one segment of N steps (only θ̂_0 is kept), a
    backward pass replaying the steps in order, each backpropagating ∂L/∂θ̂_N through its own update."""

    @staticmethod
    def backward(ctx, grad_end, grad_side):
        saved = ctx.saved_tensors
        leaves, (params,) = saved[:ctx.num_leaves], saved[ctx.num_leaves:]
        needs = ctx.needs_input_grad[2:]
        grads: list[torch.Tensor | None] = [None] * len(leaves)
        generator, pending, count = _replay(ctx, 0)
        inputs = [leaf.detach().requires_grad_(need) for leaf, need in zip(leaves, needs)]
        wanted = [x for x, need in zip(inputs, needs) if need]
        for _ in range(count):
            with torch.enable_grad():
                begin = params.detach().requires_grad_(True)  # θ̂_n: no path to earlier steps (Eq. 6)
                end, _ = _state_and_side(ctx.step(begin, inputs, generator, pending, create_graph=True))
                if wanted:
                    _accumulate(grads, needs, torch.autograd.grad(end, wanted, grad_end, allow_unused=True))
            params = end.detach()
        return (grad_end if ctx.needs_input_grad[0] else None, None, *grads)


def first_order_unroll(step: StepFn, theta: torch.Tensor, leaves: Sequence[torch.Tensor], steps: int,
                       generator: torch.Generator) -> torch.Tensor:
    """θ̂_N after ``steps`` calls of ``step`` from ``theta``; its backward pass gives TESLA's first-order
    gradient in ``leaves`` (exact for one step only: the module doc), holding one step's graph for any N."""
    return _FirstOrderUnroll.apply(theta, (step, steps, steps, generator), *leaves)[0]
