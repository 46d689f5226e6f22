"""The trajectory-matching family's one iteration (MTT, DATM, DATM-CLR, SSD), built from explicit parts.

A member is a ``TrajectoryMatching`` whose constructor reads top to bottom: it names the trajectories it
matches (a ``TrajectoryNeed``) and finds them (``find_experts``), loads them (``load_experts``: the data
fingerprint check, their ZCA space, the student they describe), prepares its initial synthetic images and
labels, and hands them to ``assemble`` with the parts that make it the method it is:

- ``window`` (``StartWindow``): the start epochs t an iteration may draw — MTT's [0, T+), DATM's growing
  [T-, upper(iteration));
- ``labels``: the label parameterisation and the student's loss on it — ``FixedLabels`` (class indices,
  cross-entropy; or fixed probability rows, soft cross-entropy: SSD's soft labels) or ``LearnedLabels``
  (DATM's logits y, −Σ softmax(y)·log_softmax(f(x)), learned by their own optimiser);
- ``student_update`` (``PlainSGD`` or ``MomentumSGD``): how the unrolled student moves — MTT's eq. 1
  θ̂_{n+1} = θ̂_n − α g_n, or DATM-CLR's (θ̂, v) with v ← μ v + g_n;
- ``side`` (optional, a ``SideLoss``): a loss computed at every student step from the augmented views it
  makes (DATM-CLR's contrastive term), entering the student's loss or the outer objective, with its own
  learned parameters;
- ``skip_above``: DATM's threshold — an iteration whose matching loss exceeds it updates nothing.

One iteration (``step``), the same for every member:
  1. an expert and a start epoch t in the window (a corrupt snapshot drops its expert, the draw repeats);
  2. θ̂_0 = θ*_t; N student steps, each on the next minibatch of S (a fresh permutation when the last is
     used up), augmented by DSA (or by the side loss's views), the labels' loss (+ the side loss), the
     student's update — kept whole, checkpointed or first-order (``unroll``, raydd/methods/unroll.py);
  3. L_tm = ‖θ̂_N − θ*_{t+M}‖² / ‖θ*_t − θ*_{t+M}‖² (MTT eq. 2); the objective is L_tm, or the side loss's
     combination of L_tm and the steps' mean side loss;
  4. unless skipped, the objective is backpropagated into the leaves — S, α, the learned labels, the side
     loss's parameters — and their optimisers step: S and α by SGD (lr_img / lr_lr, img_momentum /
     lr_momentum, 0.5 by default), the labels and side parameters by theirs.

Memory of the unrolled loop: only the current state is referenced from Python; what stays alive is what
autograd saved to differentiate the student's update twice — O(N · (P + activations)). ``backward(inputs=
leaves)`` accumulates into the leaves only (not into θ̂_0).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from torch.nn import functional as F

from ..data.augment import make_dsa
from ..graphs import GraphedIteration, table_from, table_inputs
from ..models import FlatModel, ModelSpec, build_model
from ..store import CorruptTrajectoryError
from .base import CondensationMethod, StepMeter, clone_tree
from .initial import class_labels, random_real_indices
from .inputs import TrajectoryNeed
from .synthetic import SyntheticSet
from .unroll import checkpointed_unroll, first_order_unroll


@dataclass
class Expert:
    """A matched trajectory: its id, store path, usable start epochs and training lr."""

    trajectory_id: str
    path: str
    starts: list[int]  # stored epochs s < max_start_epoch with s + M stored too
    lr: float | None  # the expert's training lr (recipe config)


class SavedTensorMeter:
    """Bytes held by autograd for backward (distinct storages of saved tensors).

    On CPU this is the measure of the unrolled graph's memory: every saved tensor stays
    alive until ``backward``, so the total at the end of the unroll is the step's peak
    apart from short-lived temporaries.
    """

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        try:
            storage = tensor.untyped_storage()
            self.storages[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        # A detached alias, not ``tensor`` itself: packing the tensor as-is makes a graph built
        # with create_graph=True (the unrolled student) a reference cycle that is never freed
        # unless backward runs, so each skipped step (DATM's threshold) leaked its whole graph.
        return tensor.detach()

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def megabytes(self) -> float:
        return sum(self.storages.values()) / 2 ** 20


def normalised_distance(end: torch.Tensor, start: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MTT eq. 2: ‖θ̂_N − θ*_{t+M}‖² / ‖θ*_t − θ*_{t+M}‖²."""
    return (end - target).pow(2).sum() / (start - target).pow(2).sum()


def soft_cross_entropy(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """-Σ softmax(target) · log_softmax(logits), averaged over the batch (DATM's SoftCrossEntropy)."""
    return -(F.softmax(target_logits, dim=1) * F.log_softmax(logits, dim=1)).sum(1).mean()


# --------------------------------------------------------------------------- parts
@dataclass(frozen=True)
class StartWindow:
    """Start epochs are drawn uniformly among the stored ones in [low, upper(iteration))."""

    low: int
    upper: Callable[[int], int]

    @classmethod
    def fixed(cls, low: int, high: int) -> "StartWindow":
        return cls(low, lambda iteration: high)


class FixedLabels:
    """Labels that are not learned: class indices [N] (cross-entropy) or probability rows [N, K] (soft
    cross-entropy −Σ p · log_softmax(f(x)))."""

    learned = False

    def __init__(self, targets: torch.Tensor) -> None:
        self.targets = targets

    def leaves(self) -> list[torch.Tensor]:
        return []

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return []

    def loss(self, logits: torch.Tensor, idx: torch.Tensor, leaves: list[torch.Tensor]) -> torch.Tensor:
        target = self.targets[idx]
        if target.dim() == 2:
            return -(target * F.log_softmax(logits, dim=1)).sum(1).mean()
        return F.cross_entropy(logits, target)

    def hard_classes(self, idx: torch.Tensor, leaves: list[torch.Tensor]) -> torch.Tensor:
        target = self.targets[idx]
        return target.argmax(1) if target.dim() == 2 else target

    def for_set(self) -> tuple[torch.Tensor, dict[str, Any]]:
        """(the synthetic set's labels, what its metadata records about them)."""
        return self.targets.detach().cpu().clone(), {}

    def state_dict(self) -> dict[str, Any]:
        return {"labels": self.targets.detach().clone()}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.targets = state["labels"].to(device).clone()


class LearnedLabels:
    """DATM's soft labels (DATM Sec. 3.2): learnable logits y [N, K] of classes ``classes``, the student's loss
    −Σ softmax(y) · log_softmax(f(x)), y learned on the matching loss by SGD(lr, momentum)."""

    learned = True

    def __init__(self, logits: torch.Tensor, classes: torch.Tensor, lr: float, momentum: float) -> None:
        self.logits = logits.requires_grad_(True)
        self.classes = classes
        self.optimizer = torch.optim.SGD([self.logits], lr=lr, momentum=momentum)

    def leaves(self) -> list[torch.Tensor]:
        return [self.logits]

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer]

    def loss(self, logits: torch.Tensor, idx: torch.Tensor, leaves: list[torch.Tensor]) -> torch.Tensor:
        return soft_cross_entropy(logits, leaves[0][idx])  # the logits as the unroll sees them (a leaf)

    def hard_classes(self, idx: torch.Tensor, leaves: list[torch.Tensor]) -> torch.Tensor:
        return leaves[0][idx].detach().argmax(1)

    def for_set(self) -> tuple[torch.Tensor, dict[str, Any]]:
        logits = self.logits.detach().cpu().float().clone()
        return F.softmax(logits, dim=1), {"label_logits": logits, "classes": self.classes.cpu().clone()}

    def state_dict(self) -> dict[str, Any]:
        return {"labels": self.logits.detach().clone(), "opt_y": clone_tree(self.optimizer.state_dict())}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        with torch.no_grad():
            self.logits.copy_(state["labels"].to(device))
        self.optimizer.load_state_dict(state["opt_y"])


class PlainSGD:
    """MTT eq. 1: θ̂_{n+1} = θ̂_n − α g_n; the state is θ̂."""

    def start(self, theta: torch.Tensor) -> torch.Tensor:
        return theta.detach().clone()

    def params(self, state: torch.Tensor) -> torch.Tensor:
        return state

    def update(self, state: torch.Tensor, params: torch.Tensor, grad: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """The next state from ``state``, its ``params(state)`` (the tensor the gradient was taken in) and ``grad``."""
        return params - alpha * grad


class MomentumSGD:
    """θ̂_{n+1} = θ̂_n − α v_{n+1}, v_{n+1} = μ v_n + g_n, v_0 = 0; the state is (θ̂, v) flat."""

    def __init__(self, momentum: float) -> None:
        self.momentum = momentum

    def start(self, theta: torch.Tensor) -> torch.Tensor:
        return torch.cat([theta.detach(), torch.zeros_like(theta)])

    def params(self, state: torch.Tensor) -> torch.Tensor:
        return state[:state.numel() // 2]

    def update(self, state: torch.Tensor, params: torch.Tensor, grad: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        velocity = self.momentum * state[params.numel():] + grad
        return torch.cat([params - alpha * velocity, velocity])


class SideLoss(Protocol):
    """A loss at every student step from views of the step's minibatch (DATM-CLR's contrastive term)."""

    in_objective: bool  # the steps' mean side loss enters the outer objective (else only the student's loss)

    def leaves(self) -> list[torch.Tensor]: ...

    def optimizers(self) -> list[torch.optim.Optimizer]: ...

    def logits_and_loss(self, flat_model: FlatModel, params: torch.Tensor, x: torch.Tensor, classes: torch.Tensor,
                        leaves: list[torch.Tensor], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(the student's logits for its loss, the side loss) on the minibatch ``x`` of classes ``classes``."""

    def student_loss(self, loss: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        """The student's loss (``loss``: the labels') with the side loss in it, unless it is in the objective."""

    def objective(self, loss_tm: torch.Tensor, side_mean: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(the outer objective, its named terms)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None: ...


# --------------------------------------------------------------------------- the family
class TrajectoryMatching(CondensationMethod):
    """What MTT, DATM, DATM-CLR and SSD share: the matched trajectories, the student, S, α and one iteration
    (the module doc). A member's constructor calls ``find_experts``, ``load_experts`` and ``assemble``."""

    def __init__(self, config, train, store=None, *, device="auto", seed: int = 0) -> None:
        super().__init__(config, train, store, device=device, seed=seed)
        self._graphed: GraphedIteration | None = None  # engine="graph": built at the first step

    # ------------------------------------------------------------------ setup
    def find_experts(self, need: TrajectoryNeed) -> tuple[list[Expert], dict]:
        """The trajectories of ``need`` storing epochs t and t+M for some t < T+ (ValueError naming the farm
        command if none), and the first one's metadata."""
        cfg = self.config
        infos = self.inputs.find(need)
        M, T = cfg.expert_epochs, cfg.max_start_epoch
        experts = []
        for info in infos:
            stored = set(info.epochs)
            starts = [s for s in sorted(stored) if s < T and s + M in stored]
            if starts:
                experts.append(Expert(info.trajectory_id, info.path, starts, info.meta["recipe_config"].get("lr")))
        if experts and max(max(e.starts) for e in experts) + 1 < T:  # said, not silently narrowed
            widest = max(max(e.starts) for e in experts)
            warnings.warn(f"max_start_epoch={T} but the {need.role} store start epochs with a target "
                          f"{M} epochs later only up to {widest}: start epochs are drawn from 0..{widest} (farm "
                          f"longer {need.role} for the whole window)", stacklevel=3)
        if not experts:
            longest = max(max(i.epochs) for i in infos)
            raise self.inputs.missing(
                f"none of the {len(infos)} {need.role} matching {need.filters(cfg.dataset)} in {self.store.root} "
                f"stores epochs t and t+{M} for some t < {T} (longest stores up to epoch {longest}): lower "
                f"max_start_epoch/expert_epochs with --set, or farm longer {need.role}")
        return experts, infos[0].meta

    def load_experts(self, need: TrajectoryNeed, experts: list[Expert], meta: dict, *,
                     fingerprint_note: str = "matching still runs") -> None:
        """Keep the matched trajectories (of ``need``, described by ``meta``): check that they were trained on
        this data (``fingerprint_note``: what a mismatch means), take the ZCA whitening they were trained in
        (the farm's fit: ``StoreInputs.training_view``, built once per run) and build the student they describe,
        its flat view and the augmentation."""
        cfg = self.config
        self.inputs.check_fingerprint(meta, need.role, fingerprint_note)
        zca = self.inputs.training_view(meta).zca if meta["dataset"].get("zca", False) else None
        self.need, self.experts, self.expert_meta, self.zca_whitening = need, experts, meta, zca
        self.model_spec = ModelSpec.from_dict(meta["model"])
        with torch.random.fork_rng(devices=[]):  # the student's own init is never used: θ̂_0 = θ*_t
            torch.manual_seed(self.seed)
            self.student = build_model(self.model_spec).to(self.device).train()
        self.flat_model = FlatModel(self.student)
        stored = sum(math.prod(s) for _, s in meta["param_layout"])
        if self.flat_model.layout.numel != stored:
            raise ValueError(f"experts store {stored} parameters but {self.model_spec.name} has "
                             f"{self.flat_model.layout.numel}: the store metadata and the model code disagree")
        self.dsa = make_dsa(cfg.dsa_strategy, flip_ok=self.train.info.flip_ok,
                            align_corners=cfg.dsa_align_corners) if cfg.dsa else None

    def assemble(self, images: torch.Tensor, labels: FixedLabels | LearnedLabels, *, window: StartWindow,
                 student_update: PlainSGD | MomentumSGD, side: SideLoss | None = None,
                 skip_above: float | None = None) -> None:
        """The synthetic images (learned), the parts (module doc), α0 (``syn_lr_init`` or the experts' lr) and
        the optimisers of S and α."""
        cfg = self.config
        self.images = images.requires_grad_(True)
        self.labels, self.window, self.student_update, self.side, self.skip_above = \
            labels, window, student_update, side, skip_above
        if cfg.engine == "graph" and (side is not None or labels.learned or not isinstance(student_update, PlainSGD)):
            raise ValueError(f"{self.name}: engine='graph' is built for a plain-SGD student with fixed labels and no "
                             f"side loss (accepted: engine='eager')")
        alpha0 = cfg.syn_lr_init if cfg.syn_lr_init is not None else self._expert_lr()
        self.syn_lr = torch.tensor(float(alpha0), device=self.device, requires_grad=True)
        self.opt_img = torch.optim.SGD([self.images], lr=cfg.lr_img, momentum=cfg.img_momentum)
        self.opt_lr = torch.optim.SGD([self.syn_lr], lr=cfg.lr_lr, momentum=cfg.lr_momentum)

    def random_initial_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, its classes): ``ipc`` random real images of each class in the experts' space (``pix_init`` 'real',
        MTT's default) or standard normal noise ('noise'), drawn from the method's generator."""
        cfg, info = self.config, self.train.info
        labels = class_labels(info.num_classes, cfg.ipc)
        if cfg.pix_init == "noise":
            shape = (len(labels), info.channels, *info.resolution)
            images = torch.randn(shape, generator=self.generator)
        else:
            picks = random_real_indices([self.train.class_indices(c) for c in range(info.num_classes)], cfg.ipc,
                                        self.generator)
            images = self.train.images[picks].clone()
            if self.zca_whitening is not None:
                images = self.zca_whitening.transform(images)
        return images.float().to(self.device), labels.to(self.device)

    @property
    def uses_zca(self) -> bool:
        return bool(self.expert_meta["dataset"].get("zca", False))

    def _expert_lr(self) -> float:
        lrs = {e.lr for e in self.experts}
        if len(lrs) != 1 or None in lrs:
            raise ValueError(f"experts were trained with learning rates {sorted(map(str, lrs))}: "
                             f"set the initial step size explicitly with --set syn_lr_init=VALUE")
        return float(lrs.pop())

    def leaves(self) -> list[torch.Tensor]:
        """What the objective is differentiated in: S, α, the learned labels, the side loss's parameters."""
        return [self.images, self.syn_lr, *self.labels.leaves(), *(self.side.leaves() if self.side else [])]

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.opt_img, self.opt_lr, *self.labels.optimizers(), *(self.side.optimizers() if self.side else [])]

    # ------------------------------------------------------------------ trajectories
    def expert_params(self, trajectory_id: str, epoch: int) -> torch.Tensor:
        """θ* of a matched trajectory at ``epoch`` (flat, on the method's device)."""
        return self.inputs.params(trajectory_id, epoch, self.device)

    def start_upper(self, iteration: int | None = None) -> int:
        """Exclusive upper bound of the start-epoch window at ``iteration`` (default: the next one)."""
        return self.window.upper(self._iteration if iteration is None else iteration)

    def sample_expert(self) -> tuple[str, int]:
        """(trajectory id, start epoch t): a uniform expert among those storing a start in the window, then
        a uniform such start."""
        lo, hi = self.window.low, self.start_upper()
        choices = [(e.trajectory_id, [s for s in e.starts if lo <= s < hi]) for e in self.experts]
        choices = [(tid, starts) for tid, starts in choices if starts]
        if not choices:  # the experts storing this window were dropped as corrupt
            raise self.inputs.missing(f"no healthy expert stores a start epoch in [{lo}, {hi})")
        tid, starts = choices[self.rng.randrange(len(choices))]
        return tid, starts[self.rng.randrange(len(starts))]

    def sample_segment(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(start epoch t, θ*_t, θ*_{t+M}) of an expert and start epoch drawn by ``sample_expert``; a
        corrupt snapshot drops its expert (reported once) and the draw is repeated among the others."""
        while True:
            tid, start = self.sample_expert()
            try:
                return start, self.expert_params(tid, start), self.expert_params(tid, start + self.config.expert_epochs)
            except CorruptTrajectoryError as err:
                self.drop_expert(tid, err)

    def drop_expert(self, trajectory_id: str, error: CorruptTrajectoryError) -> None:
        self.inputs.skip(trajectory_id, error)
        self.experts = [e for e in self.experts if e.trajectory_id != trajectory_id]
        if not self.experts:
            raise self.inputs.missing(f"every one of the {self.need.role} this run used is corrupt (last: {error})")

    # ------------------------------------------------------------------ the unrolled student
    def _next_minibatch(self, n_syn: int, generator: torch.Generator, pending: list[torch.Tensor]) -> torch.Tensor:
        """Indices of the next student minibatch: the head of ``pending``, refilled when empty with a fresh
        permutation of the n_syn synthetic images from ``generator``, split into batch_syn-sized pieces."""
        if not pending:
            pending.extend(torch.randperm(n_syn, generator=generator).split(min(self.config.batch_syn or n_syn, n_syn)))
        return pending.pop(0).to(self.device)

    def _split(self, leaves: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, list, list]:
        """(S, α, the label leaves, the side loss's leaves) of ``leaves`` as ``leaves()`` orders them."""
        count = len(self.labels.leaves())
        return leaves[0], leaves[1], leaves[2:2 + count], leaves[2 + count:]

    def _student_step(self, state: torch.Tensor, leaves: list[torch.Tensor], generator: torch.Generator,
                      pending: list[torch.Tensor], *, create_graph: bool):
        """One student step on the next minibatch of ``pending`` (refilled with a fresh permutation of S from
        ``generator``), its augmentation drawn from ``generator``; returns the next state, and the step's side
        loss when there is one (the step function of raydd/methods/unroll.py)."""
        images, alpha, label_leaves, side_leaves = self._split(leaves)
        params = self.student_update.params(state)
        idx = self._next_minibatch(images.shape[0], generator, pending)
        x = images[idx]
        if self.side is None:
            if self.dsa is not None:
                x = self.dsa(x, generator=generator)  # per-sample DSA parameters
            loss = self.labels.loss(self.flat_model(params, x), idx, label_leaves)
            side = None
        else:
            logits, side = self.side.logits_and_loss(self.flat_model, params, x,
                                                     self.labels.hard_classes(idx, label_leaves), side_leaves,
                                                     generator)
            loss = self.side.student_loss(self.labels.loss(logits, idx, label_leaves), side)
        (grad,) = torch.autograd.grad(loss, params, create_graph=create_graph)
        state = self.student_update.update(state, params, grad, alpha)
        if not create_graph:
            state, side = state.detach().requires_grad_(True), None if side is None else side.detach()
        return state if side is None else (state, side)

    def unroll(self, theta: torch.Tensor, generator: torch.Generator, *,
               create_graph: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(θ̂_N, the steps' mean side loss or None) from θ̂_0 = theta by N student steps; differentiable in the
        leaves if create_graph, holding the whole graph (unroll='full'), segment starts only ('checkpoint') or
        θ̂_0 only ('tesla': a first-order gradient for N > 1)."""
        cfg, has_side = self.config, self.side is not None
        leaves = self.leaves() if create_graph else [leaf.detach() for leaf in self.leaves()]
        state = self.student_update.start(theta)
        side_total = None
        if create_graph and cfg.unroll == "checkpoint":
            out = checkpointed_unroll(self._student_step, state, leaves, cfg.syn_steps, generator,
                                      cfg.unroll_segment, side=has_side)
            state, side_total = out if has_side else (out, None)
        elif create_graph and cfg.unroll == "tesla":
            state = first_order_unroll(self._student_step, state, leaves, cfg.syn_steps, generator)
        else:
            state = state.requires_grad_(True)
            side_total = theta.new_zeros(()) if has_side else None
            pending: list[torch.Tensor] = []
            for _ in range(cfg.syn_steps):
                out = self._student_step(state, leaves, generator, pending, create_graph=create_graph)
                if has_side:
                    state, side = out
                    side_total = side_total + (side if create_graph and self.side.in_objective else side.detach())
                else:
                    state = out
        side_mean = None if side_total is None else side_total / cfg.syn_steps
        return self.student_update.params(state), side_mean

    def objective(self, theta_start: torch.Tensor, theta_target: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(the loss to backpropagate, its named terms): L_tm (eq. 2), or the side loss's combination."""
        theta_end, side_mean = self.unroll(theta_start, self.generator, create_graph=True)
        loss_tm = normalised_distance(theta_end, theta_start, theta_target)
        if self.side is None:
            return loss_tm, {"loss_tm": loss_tm}
        return self.side.objective(loss_tm, side_mean)

    def _diverged(self, total: float, loss_tm: float) -> FloatingPointError:
        cfg = self.config
        knobs = [f"lr_img ({cfg.lr_img})", f"lr_lr ({cfg.lr_lr})"] + ([f"lr_y ({cfg.lr_y})"] if self.labels.learned
                                                                      else [])
        terms = f"loss is {total} (matching loss {loss_tm})" if self.side is not None else f"matching loss is {total}"
        return FloatingPointError(f"{self.label} {terms} at iteration {self._iteration}: lower "
                                  f"{', '.join(knobs[:-1])} or {knobs[-1]}")

    def step(self) -> dict[str, float]:
        if self.config.engine == "graph":
            return self._graph_step()
        step_meter = StepMeter(self.device)
        upper = self.start_upper()
        start, theta_start, theta_target = self.sample_segment()
        with SavedTensorMeter() as meter:
            loss, terms = self.objective(theta_start, theta_target)
        loss_tm, total = float(terms["loss_tm"].detach()), float(loss.detach())
        if math.isnan(loss_tm) or math.isnan(total) or (self.skip_above is None and math.isinf(total)):
            raise self._diverged(total, loss_tm)
        skipped = self.skip_above is not None and not loss_tm <= self.skip_above  # inf is skipped too
        grads: dict[str, float] = {"grad_norm_img": 0.0, "grad_norm_lr": 0.0}
        if self.labels.learned:
            grads["grad_norm_y"] = 0.0
        if not skipped:
            for opt in self.optimizers():
                opt.zero_grad(set_to_none=True)
            loss.backward(inputs=self.leaves())
            grads["grad_norm_img"], grads["grad_norm_lr"] = float(self.images.grad.norm()), float(self.syn_lr.grad.abs())
            if self.labels.learned:
                grads["grad_norm_y"] = float(self.labels.logits.grad.norm())
            for opt in self.optimizers():
                opt.step()
        self._iteration += 1
        metrics = {
            "loss": total, **{k: float(v.detach()) for k, v in terms.items()}, "skipped": float(skipped),
            "syn_lr": float(self.syn_lr.detach()), "start_epoch": float(start), "start_upper": float(upper),
            **grads, "param_dist": float((theta_start - theta_target).pow(2).sum()), "graph_mem_mb": meter.megabytes,
        }
        return step_meter.finish(metrics, graph_mb=meter.megabytes)

    # ------------------------------------------------------------------ engine="graph" (MTT's configs allow it)
    def _plan_unroll(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The unroll's random draws made up front, in the order ``unroll`` draws them (each step's minibatch
        — a fresh permutation when the last is used up — then its DSA parameters), as named inputs."""
        inputs: dict[str, torch.Tensor] = {}
        pending: list[torch.Tensor] = []
        size = tuple(self.images.shape[-2:])
        for n in range(self.config.syn_steps):
            idx = self._next_minibatch(self.images.shape[0], generator, pending)
            inputs[f"idx{n}"] = idx
            if self.dsa is not None and self.dsa.ops:
                table = self.dsa.table([self.dsa.draw(generator, len(idx), size)], [len(idx)])
                inputs.update({k: v.to(self.device) for k, v in table_inputs(table, f"s{n}_").items()})
        return inputs

    def _graph_iteration(self, inputs: dict[str, torch.Tensor], out: torch.Tensor) -> None:
        """One whole iteration on planned draws (what the CUDA graph captures): the student's N steps (eq. 1),
        eq. 2, the backward pass into S and α, their optimiser steps; the metrics left in ``out``."""
        leaves = self.leaves()
        images, alpha, label_leaves, _ = self._split(leaves)
        theta_start, theta_target = inputs["theta_start"], inputs["theta_target"]
        with SavedTensorMeter() as meter:
            params = theta_start.detach().clone().requires_grad_(True)
            for n in range(self.config.syn_steps):
                idx = inputs[f"idx{n}"]
                x = images[idx]
                if self.dsa is not None and self.dsa.ops:
                    x = self.dsa.apply_table(x, table_from(inputs, self.dsa, f"s{n}_"))
                loss = self.labels.loss(self.flat_model(params, x), idx, label_leaves)
                (grad,) = torch.autograd.grad(loss, params, create_graph=True)
                params = self.student_update.update(params, params, grad, alpha)  # eq. 1
            loss = normalised_distance(params, theta_start, theta_target)
        self._graph_mem_mb = meter.megabytes  # measured where the step runs in Python (eagerly, or at capture)
        self.opt_img.zero_grad(set_to_none=True)
        self.opt_lr.zero_grad(set_to_none=True)
        loss.backward(inputs=leaves)
        out[0].copy_(loss.detach())
        out[1].copy_(self.images.grad.norm())
        out[2].copy_(self.syn_lr.grad.abs().reshape(()))
        out[3].copy_((theta_start - theta_target).pow(2).sum())
        self.opt_img.step()
        self.opt_lr.step()

    def _graph_step(self) -> dict[str, float]:
        if self._graphed is None:
            self._graphed = GraphedIteration(self._graph_iteration, device=self.device, metrics=4,
                                             leaves=lambda: [self.images, self.syn_lr],
                                             optimisers=[self.opt_img, self.opt_lr])
        step_meter = StepMeter(self.device)
        upper = self.start_upper()
        start, theta_start, theta_target = self.sample_segment()
        inputs = {"theta_start": theta_start, "theta_target": theta_target, **self._plan_unroll(self.generator)}
        loss, grad_img, grad_lr, param_dist = self._graphed.run(inputs)
        if not math.isfinite(loss):  # as the eager step: nothing was updated
            raise self._diverged(loss, loss)
        self._iteration += 1
        metrics = {"loss": loss, "loss_tm": loss, "skipped": 0.0, "syn_lr": float(self.syn_lr.detach()),
                   "start_epoch": float(start), "start_upper": float(upper), "grad_norm_img": grad_img,
                   "grad_norm_lr": grad_lr, "param_dist": param_dist, "graph_mem_mb": self._graph_mem_mb}
        return step_meter.finish(metrics, graph_mb=self._graph_mem_mb)

    def matching_loss(self, trajectory_id: str, start_epoch: int, seed: int = 0) -> float:
        """Eq. 2 for a fixed (expert, start epoch) and a fixed augmentation/batch seed, without updating S.

        Does not touch the method's own generators: use it to compare the same matching
        problem before and after some iterations.
        """
        generator = torch.Generator().manual_seed(seed)
        theta_start = self.expert_params(trajectory_id, start_epoch)
        theta_target = self.expert_params(trajectory_id, start_epoch + self.config.expert_epochs)
        theta_end, _ = self.unroll(theta_start, generator, create_graph=False)
        return float(normalised_distance(theta_end.detach(), theta_start, theta_target))

    # ------------------------------------------------------------------ results and state
    def synthetic_set(self) -> SyntheticSet:
        labels, label_meta = self.labels.for_set()
        return self._synthetic(
            self.images.detach().cpu().clone(), labels,
            {"expert_model": self.model_spec.to_dict(), "store": str(self.inputs.store.root),
             "experts": len(self.experts), "seed": self.seed, **label_meta},
            whitened=self.uses_zca, syn_lr=float(self.syn_lr.detach()),
            zca=self.zca_whitening.state_dict() if self.zca_whitening is not None else None)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update({
            "images": self.images.detach().clone(), "syn_lr": self.syn_lr.detach().clone(),
            "opt_img": clone_tree(self.opt_img.state_dict()), "opt_lr": clone_tree(self.opt_lr.state_dict()),
            "experts": [e.trajectory_id for e in self.experts], **self.labels.state_dict(),
            **(self.side.state_dict() if self.side else {}),
        })
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = list(state["experts"])
        by_id = {e.trajectory_id: e for e in self.experts}
        missing = [t for t in saved if t not in by_id]
        if missing:
            raise ValueError(f"checkpoint sampled from {len(saved)} experts, {len(missing)} of them are not usable "
                             f"in store {self.store.root} (e.g. {missing[0]}): resume needs the same experts")
        super().load_state_dict(state)
        self.experts = [by_id[t] for t in saved]  # same order => same sampling sequence
        with torch.no_grad():
            self.images.copy_(state["images"].to(self.device))
            self.syn_lr.copy_(state["syn_lr"].to(self.device))
        self.opt_img.load_state_dict(state["opt_img"])
        self.opt_lr.load_state_dict(state["opt_lr"])
        self.labels.load_state_dict(state, self.device)
        if self.side is not None:
            self.side.load_state_dict(state, self.device)
