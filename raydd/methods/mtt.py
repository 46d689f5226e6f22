"""MTT: Dataset Distillation by Matching Training Trajectories (Cazenavette et al., CVPR 2022).

Per iteration (paper Sec. 3, Algorithm 1):
  1. sample an expert trajectory θ* from the store and a start epoch t < T+ (max_start_epoch);
  2. θ̂_0 = θ*_t; N (syn_steps) SGD steps on minibatches b_n of the synthetic set S
     with the learnable step size α and DSA:  θ̂_{n+1} = θ̂_n − α ∇ℓ(A(b_n); θ̂_n)      (eq. 1)
  3. L = ‖θ̂_N − θ*_{t+M}‖² / ‖θ*_t − θ*_{t+M}‖²   (M = expert_epochs)                  (eq. 2)
  4. backpropagate L through all N unrolled steps into the pixels of S and into α;
     pixels: SGD(lr_img, momentum 0.5); α: SGD(lr_lr, momentum 0.5).

Memory of the unrolled loop: only the current θ̂_n is referenced from Python; what stays
alive is exactly what autograd saved to differentiate eq. 1 twice (each step's parameter
vector, activations of the forward and of the create_graph backward, the augmented
minibatch the first convolution needs) — O(N · (P + activations)). No list of past
parameters, augmented copies or per-step losses is kept; ``backward(inputs=[S, α])``
accumulates into the two leaves only (not into θ̂_0).
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.nn import functional as F

from ..data.augment import DSA_STRATEGY, DSAConfig, make_dsa
from ..graphs import GraphedIteration, table_from, table_inputs
from ..models import FlatModel, ModelSpec, build_model
from ..store import CorruptTrajectoryError
from ..training import ENGINES
from .unroll import UNROLL_MODES, checkpointed_unroll, first_order_unroll
from .base import CondensationMethod, MethodConfig, PaperProtocol, Scale, StepMeter, clone_tree, register_method
from .inputs import TrajectoryNeed
from .initial import class_labels, random_real_indices
from .synthetic import SyntheticSet


# Published CIFAR settings (METHODS.md: the MTT author's commands; CIFAR-100 IPC1: the reference README).
_PUBLISHED: dict[tuple[str, int], dict[str, Any]] = {
    ("cifar10", 1): dict(syn_steps=50, expert_epochs=2, max_start_epoch=2, lr_img=100.0, lr_lr=1e-7,
                         syn_lr_init=0.01, zca=True),
    ("cifar10", 10): dict(syn_steps=30, expert_epochs=2, max_start_epoch=20, lr_img=100.0, lr_lr=1e-5,
                          syn_lr_init=0.001, zca=True),
    ("cifar10", 50): dict(syn_steps=30, expert_epochs=2, max_start_epoch=40, lr_img=1000.0, lr_lr=1e-5,
                          syn_lr_init=0.01, zca=False),
    ("cifar100", 1): dict(syn_steps=20, expert_epochs=3, max_start_epoch=20, lr_img=1000.0, lr_lr=1e-5,
                          syn_lr_init=0.01, zca=True),
}


@dataclass(frozen=True)
class MTTConfig(MethodConfig):
    """MTT knobs. ``defaults(dataset, ipc)``:

    - cifar10 IPC 1/10/50 and cifar100 IPC 1: the published settings (table above);
    - other IPCs of cifar10/cifar100: the published row of the nearest IPC bucket
      (<=1, <=10, else 50; cifar100 always uses its IPC-1 row);
    - any other dataset (digits, mnist, fashion_mnist, imagefolder): a documented fallback,
      the CIFAR-10 row of the nearest bucket without ZCA and with α0 = the experts' lr
      (``syn_lr_init=None``). The MTT paper reports no MNIST/Fashion-MNIST settings.
    """

    syn_steps: int = 20  # N: unrolled student steps per iteration
    expert_epochs: int = 3  # M: target is θ*_{t+M}
    max_start_epoch: int = 25  # T+: start epoch t drawn uniformly from [0, T+)
    lr_img: float = 1000.0
    lr_lr: float = 1e-5
    syn_lr_init: float | None = 0.01  # α0; None: the experts' training lr (from the store metadata)
    img_momentum: float = 0.5
    lr_momentum: float = 0.5
    batch_syn: int | None = None  # minibatch of S per student step; None: all of S
    zca: bool | None = None  # None: follow the experts; True/False: require experts in that space
    dsa: bool = True
    dsa_strategy: str = DSA_STRATEGY  # flip is dropped automatically where the dataset forbids it
    # Scale/rotate sampling grid: MTT's and DATM's utils.py call affine_grid/grid_sample with align_corners=True;
    # DSA's own code (followed by DM, raydd's farm and evaluation) uses torch's default False. On square images the
    # two are the same map up to float rounding, which the unrolled student amplifies: against mtt-distillation
    # 1e-7 with True, 1e-3 after 2 iterations with False (benchmarks/reference_equivalence.py).
    dsa_align_corners: bool = True
    pix_init: str = "real"  # 'real' (random real images per class) or 'noise'
    model: str | None = None  # store model name filter, e.g. 'convnet3-w128-in'; None: the only one stored
    unroll: str = "full"  # 'full': keep the N-step graph; 'checkpoint': the same gradient, one step's graph held;
    # 'tesla': TESLA's constant-memory gradient, first-order for N > 1 (raydd/methods/unroll.py)
    unroll_segment: int = 0  # steps re-run together in the backward pass (unroll='checkpoint'); 0: 1
    expert_kind: str = "expert"  # store kind of the trajectories to match
    # How an iteration runs (raydd.training.ENGINES): eager, or graph — its random draws made up front, and on
    # CUDA the whole iteration (N student steps, eq. 2, the backward pass, both optimiser steps) replayed as one
    # CUDA graph; elsewhere the same iteration runs eagerly. The same numbers (tests/test_graphs.py).
    engine: str = "eager"

    aliases: ClassVar[dict[str, str]] = {"alpha": "syn_lr_init"}
    default_iterations: ClassVar[int] = 5000
    published: ClassVar[tuple[tuple[str, int], ...]] = tuple(_PUBLISHED)
    reported: ClassVar[dict[tuple[str, int], float]] = {  # MTT Table 1
        ("cifar10", 1): 46.3, ("cifar10", 10): 65.3, ("cifar10", 50): 71.6, ("cifar100", 1): 24.3}
    paper: ClassVar[PaperProtocol] = PaperProtocol(
        "MTT Table 1", {"epochs": 1000, "num_models": 5}, {"expert": (100, 50)},
        notes="distill.py: 5 ConvNet-3 w128 IN x 1000 epochs at the learned lr, each network's final accuracy "
              "(its Max_Accuracy line is the best checkpoint; which one Table 1 quotes is not stated). Student "
              "minibatches: raydd takes a permutation's chunks from its head, distill.py from its end "
              "(indices_chunks.pop()): the same distribution; otherwise one iteration equals distill.py's to "
              "3e-7 in float32 on identical draws (benchmarks/results/reference_equivalence.md)")
    matched_recipe: ClassVar[str] = "expert"  # the farm recipe whose trajectories are matched
    engines: ClassVar[tuple[str, ...]] = ENGINES  # the engines this method's iteration is built for
    matched_role: ClassVar[str] = "experts"

    def needs(self) -> tuple[TrajectoryNeed, ...]:
        """Expert trajectories storing epochs 0..max_start_epoch + expert_epochs (the window it samples)."""
        return (TrajectoryNeed(self.matched_recipe, self.matched_role, kinds=(self.expert_kind,),
                               epochs=self.max_start_epoch + self.expert_epochs, model=self.model, zca=self.zca,
                               zca_knob=True),)

    def scaled(self, scale: Scale) -> "MTTConfig":
        """N capped at ``scale.syn_steps``; the start-epoch window shrunk to experts of
        ``scale.epochs[matched_recipe]`` epochs (θ*_t and θ*_{t+M} stored: t < T+ <= E − M + 1)."""
        changes: dict[str, Any] = {"syn_steps": min(self.syn_steps, scale.syn_steps)}
        epochs = scale.epochs.get(self.matched_recipe)
        if epochs is not None:
            changes.update(self._window_for(epochs))
        return dataclasses.replace(self, **changes)

    def _window_for(self, epochs: int) -> dict[str, Any]:
        m = min(self.expert_epochs, max(1, epochs - 1))
        return {"expert_epochs": m, "max_start_epoch": max(1, min(self.max_start_epoch, epochs - m + 1))}

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check("syn_steps", low=1)
        self.check("expert_epochs", low=1)
        self.check("max_start_epoch", low=1)
        for key in ("lr_img", "lr_lr"):
            self.check(key, low=0)
        self.check("syn_lr_init", low=0, low_open=True)
        for key in ("img_momentum", "lr_momentum"):
            self.check(key, low=0, high=1, high_open=True)
        self.check("batch_syn", low=1)
        self.check("unroll_segment", low=0)
        if self.engine not in self.engines:
            raise ValueError(f"{type(self).__name__}.engine={self.engine!r} is invalid: accepted "
                             f"{', '.join(self.engines)}")
        if self.engine == "graph" and self.unroll != "full":
            raise ValueError(f"{type(self).__name__}.engine='graph' replays the full unroll: use unroll='full' "
                             f"(got {self.unroll!r})")
        if self.unroll not in UNROLL_MODES:
            raise ValueError(f"{type(self).__name__}.unroll={self.unroll!r} is invalid: accepted {', '.join(UNROLL_MODES)}")
        if self.pix_init not in ("real", "noise"):
            raise ValueError(f"MTTConfig.pix_init={self.pix_init!r} is invalid: accepted real, noise")
        DSAConfig(strategy=self.dsa_strategy)  # validates the strategy string

    @classmethod
    def defaults(cls, dataset: str, ipc: int) -> "MTTConfig":
        if (dataset, ipc) in _PUBLISHED:
            return cls(dataset=dataset, ipc=ipc, **_PUBLISHED[(dataset, ipc)])
        bucket = 1 if ipc <= 1 else 10 if ipc <= 10 else 50
        if dataset == "cifar100":
            return cls(dataset=dataset, ipc=ipc, **_PUBLISHED[("cifar100", 1)])
        row = dict(_PUBLISHED[("cifar10", bucket)])
        if dataset != "cifar10":
            row.update(zca=False, syn_lr_init=None)
        row["syn_steps"] = cap_syn_steps(dataset, row["syn_steps"])
        return cls(dataset=dataset, ipc=ipc, **row)


# Datasets whose expert epochs are a handful of SGD steps, so the fallback rows' N would overshoot:
# digits has 1438 training images, ~6 steps per epoch at the expert recipe's batch 256, and
# M = 2 epochs ≈ 12 steps. Measured: MTT's N = 30 made SSD's matching loss NaN at iteration 3
# (benchmarks/results/speed_digits_ipc10.md); DATM's N = 80 (or 20) started above its loss
# threshold so every iteration was skipped (L_tm 2.1 at N=80, 1.16 at N=20, 0.6 at N=10 with
# ConvNet-3 w128 experts). MNIST/Fashion-MNIST have CIFAR-sized epochs.
FEW_STEPS_PER_EPOCH = {"digits": 10}


def cap_syn_steps(dataset: str, syn_steps: int) -> int:
    """The fallback N for ``dataset``: at most FEW_STEPS_PER_EPOCH[dataset] where it has one."""
    return min(syn_steps, FEW_STEPS_PER_EPOCH.get(dataset, syn_steps))


@dataclass
class _Expert:
    trajectory_id: str
    path: str
    starts: list[int]  # stored epochs s < max_start_epoch with s + M stored too
    lr: float | None  # the expert's training lr (recipe config)


class _SavedTensorMeter:
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


@register_method
class MTT(CondensationMethod):
    name = "mtt"
    label = "MTT"
    config_cls = MTTConfig

    def __init__(self, config: MTTConfig, train, store=None, *, device="auto", seed: int = 0) -> None:
        super().__init__(config, train, store, device=device, seed=seed)
        self._graphed: GraphedIteration | None = None  # engine="graph": built at the first step
        self._build()

    def _build(self) -> None:
        """Everything after the base checks: experts (validated before any work), student, S, α, optimisers."""
        cfg = self.config
        self.experts, meta = self._find_experts()
        self.expert_meta = meta
        self._check_trained_data(meta)
        self.zca_whitening = self._fit_zca(meta) if self.uses_zca else None
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
        self.images, self.labels = self._init_synthetic()
        self.images.requires_grad_(True)
        alpha0 = cfg.syn_lr_init if cfg.syn_lr_init is not None else self._expert_lr()
        self.syn_lr = torch.tensor(float(alpha0), device=self.device, requires_grad=True)
        self.opt_img = torch.optim.SGD([self.images], lr=cfg.lr_img, momentum=cfg.img_momentum)
        self.opt_lr = torch.optim.SGD([self.syn_lr], lr=cfg.lr_lr, momentum=cfg.lr_momentum)

    # ------------------------------------------------------------------ setup
    @property
    def uses_zca(self) -> bool:
        return bool(self.expert_meta["dataset"].get("zca", False))

    @property
    def matched_need(self) -> TrajectoryNeed:
        return self.config.needs()[-1]  # the trajectories it matches (SSD's come after their teacher)

    def _find_experts(self) -> tuple[list[_Expert], dict]:
        cfg, need = self.config, self.matched_need
        infos = self.inputs.find(need)
        M, T = cfg.expert_epochs, cfg.max_start_epoch
        experts = []
        for info in infos:
            stored = set(info.epochs)
            starts = [s for s in sorted(stored) if s < T and s + M in stored]
            if starts:
                experts.append(_Expert(info.trajectory_id, info.path, starts, info.meta["recipe_config"].get("lr")))
        if experts and max(max(e.starts) for e in experts) + 1 < T:  # said, not silently narrowed
            widest = max(max(e.starts) for e in experts)
            warnings.warn(f"max_start_epoch={T} but the {need.role} store start epochs with a target "
                          f"{M} epochs later only up to {widest}: start epochs are drawn from 0..{widest} (farm "
                          f"longer {need.role} for the whole window)", stacklevel=2)
        if not experts:
            longest = max(max(i.epochs) for i in infos)
            raise self.inputs.missing(
                f"none of the {len(infos)} {need.role} matching {need.filters(cfg.dataset)} in {self.store.root} "
                f"stores epochs t and t+{M} for some t < {T} (longest stores up to epoch {longest}): lower "
                f"max_start_epoch/expert_epochs with --set, or farm longer {need.role}")
        return experts, infos[0].meta

    def _check_trained_data(self, meta: dict) -> None:
        self.inputs.check_fingerprint(meta, self.matched_need.role)

    def _fit_zca(self, meta: dict):
        return self.inputs.training_view(meta).zca  # the farm's fit (raydd.farm.task.prepare_data)

    def _expert_lr(self) -> float:
        lrs = {e.lr for e in self.experts}
        if len(lrs) != 1 or None in lrs:
            raise ValueError(f"experts were trained with learning rates {sorted(map(str, lrs))}: "
                             f"set the initial step size explicitly with --set syn_lr_init=VALUE")
        return float(lrs.pop())

    def _init_synthetic(self) -> tuple[torch.Tensor, torch.Tensor]:
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

    # ------------------------------------------------------------------ trajectories
    def _params(self, trajectory_id: str, epoch: int) -> torch.Tensor:
        return self.inputs.params(trajectory_id, epoch, self.device)

    def sample_expert(self) -> tuple[str, int]:
        """(trajectory id, start epoch t): a uniform expert, then a uniform stored t < max_start_epoch."""
        return self.sample_in_window(0, self.config.max_start_epoch)

    def sample_in_window(self, lo: int, hi: int) -> tuple[str, int]:
        """A uniform expert among those storing a start in [lo, hi), then a uniform such start (the one way
        experts are drawn: MTT's window is [0, T+), DATM's its growing [T-, T))."""
        choices = [(e.trajectory_id, [s for s in e.starts if lo <= s < hi]) for e in self.experts]
        choices = [(tid, starts) for tid, starts in choices if starts]
        if not choices:  # the experts storing this window were dropped as corrupt
            raise self.inputs.missing(f"no healthy expert stores a start epoch in [{lo}, {hi})")
        tid, starts = choices[self.rng.randrange(len(choices))]
        return tid, starts[self.rng.randrange(len(starts))]

    # ------------------------------------------------------------------ the unrolled student
    def _inner_loss(self, logits: torch.Tensor, idx: torch.Tensor, leaves: list[torch.Tensor]) -> torch.Tensor:
        """Loss of one student step on the synthetic minibatch ``idx``; ``leaves`` are ``_leaves()`` as the
        unroll sees them (DATM overrides: its learnable soft labels are leaves[2])."""
        return F.cross_entropy(logits, self.labels[idx])

    def _leaves(self) -> list[torch.Tensor]:
        """What the matching loss is differentiated in: S and α (DATM adds its labels)."""
        return [self.images, self.syn_lr]

    def _next_minibatch(self, n_syn: int, generator: torch.Generator, pending: list[torch.Tensor]) -> torch.Tensor:
        """Indices of the next student minibatch: the head of ``pending``, refilled when empty with a fresh
        permutation of the n_syn synthetic images from ``generator``, split into batch_syn-sized pieces."""
        if not pending:
            pending.extend(torch.randperm(n_syn, generator=generator).split(min(self.config.batch_syn or n_syn, n_syn)))
        return pending.pop(0).to(self.device)

    def _student_step(self, params: torch.Tensor, leaves: list[torch.Tensor], generator: torch.Generator,
                      pending: list[torch.Tensor], *, create_graph: bool) -> torch.Tensor:
        """One student step of eq. 1 on the next minibatch of ``pending`` (refilled with a fresh permutation
        of S from ``generator``), DSA drawn from ``generator``."""
        images, alpha = leaves[0], leaves[1]
        idx = self._next_minibatch(images.shape[0], generator, pending)
        x = images[idx]
        if self.dsa is not None:
            x = self.dsa(x, generator=generator)  # per-sample DSA parameters
        loss = self._inner_loss(self.flat_model(params, x), idx, leaves)
        (grad,) = torch.autograd.grad(loss, params, create_graph=create_graph)
        params = params - alpha * grad  # eq. 1
        return params if create_graph else params.detach().requires_grad_(True)

    def _unroll(self, theta: torch.Tensor, generator: torch.Generator, *, create_graph: bool) -> torch.Tensor:
        """θ̂_N from θ̂_0 = theta by N student steps (eq. 1); differentiable in the leaves (S, α, ...) if
        create_graph, holding the whole graph (unroll='full'), segment starts only ('checkpoint') or θ̂_0 only
        ('tesla': a first-order gradient for N > 1)."""
        cfg = self.config
        leaves = self._leaves() if create_graph else [leaf.detach() for leaf in self._leaves()]
        if create_graph and cfg.unroll == "checkpoint":
            return checkpointed_unroll(self._student_step, theta, leaves, cfg.syn_steps, generator,
                                       cfg.unroll_segment)
        if create_graph and cfg.unroll == "tesla":
            return first_order_unroll(self._student_step, theta, leaves, cfg.syn_steps, generator)
        params = theta.detach().clone().requires_grad_(True)
        pending: list[torch.Tensor] = []
        for _ in range(cfg.syn_steps):
            params = self._student_step(params, leaves, generator, pending, create_graph=create_graph)
        return params

    @staticmethod
    def _matching_loss(end: torch.Tensor, start: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # eq. 2: ‖θ̂_N − θ*_{t+M}‖² / ‖θ*_t − θ*_{t+M}‖²
        return (end - target).pow(2).sum() / (start - target).pow(2).sum()

    def sample_segment(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(start epoch t, θ*_t, θ*_{t+M}) of an expert and start epoch drawn by ``sample_expert``; a
        corrupt snapshot drops its expert (reported once) and the draw is repeated among the others."""
        while True:
            tid, start = self.sample_expert()
            try:
                return start, self._params(tid, start), self._params(tid, start + self.config.expert_epochs)
            except CorruptTrajectoryError as err:
                self._drop_expert(tid, err)

    def _drop_expert(self, trajectory_id: str, error: CorruptTrajectoryError) -> None:
        self.inputs.skip(trajectory_id, error)
        self.experts = [e for e in self.experts if e.trajectory_id != trajectory_id]
        if not self.experts:
            raise self.inputs.missing(f"every {self.matched_need.role[:-1]} trajectory this run used is corrupt "
                                      f"(last: {error})")

    def step(self) -> dict[str, float]:
        if self.config.engine == "graph":
            return self._graph_step()
        cfg = self.config
        step_meter = StepMeter(self.device)
        start, theta_start, theta_target = self.sample_segment()
        with _SavedTensorMeter() as meter:
            theta_end = self._unroll(theta_start, self.generator, create_graph=True)
            loss = self._matching_loss(theta_end, theta_start, theta_target)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"MTT matching loss is {float(loss)} at iteration {self._iteration}: "
                                     f"lower lr_img ({cfg.lr_img}) or lr_lr ({cfg.lr_lr})")
        self.opt_img.zero_grad(set_to_none=True)
        self.opt_lr.zero_grad(set_to_none=True)
        loss.backward(inputs=self._leaves())
        grad_img = float(self.images.grad.norm())
        grad_lr = float(self.syn_lr.grad.abs())
        self.opt_img.step()
        self.opt_lr.step()
        self._iteration += 1
        metrics = {
            "loss": float(loss.detach()), "syn_lr": float(self.syn_lr.detach()), "start_epoch": float(start),
            "grad_norm_img": grad_img, "grad_norm_lr": grad_lr,
            "param_dist": float((theta_start - theta_target).pow(2).sum()),
            "graph_mem_mb": meter.megabytes,
        }
        return step_meter.finish(metrics, graph_mb=meter.megabytes)

    # ------------------------------------------------------------------ engine="graph"
    def _plan_unroll(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The unroll's random draws made up front, in the order ``_unroll`` draws them (each step's minibatch
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
        leaves = self._leaves()
        images, alpha = leaves[0], leaves[1]
        theta_start, theta_target = inputs["theta_start"], inputs["theta_target"]
        with _SavedTensorMeter() as meter:
            params = theta_start.detach().clone().requires_grad_(True)
            for n in range(self.config.syn_steps):
                idx = inputs[f"idx{n}"]
                x = images[idx]
                if self.dsa is not None and self.dsa.ops:
                    x = self.dsa.apply_table(x, table_from(inputs, self.dsa, f"s{n}_"))
                loss = self._inner_loss(self.flat_model(params, x), idx, leaves)
                (grad,) = torch.autograd.grad(loss, params, create_graph=True)
                params = params - alpha * grad  # eq. 1
            loss = self._matching_loss(params, theta_start, theta_target)
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
        start, theta_start, theta_target = self.sample_segment()
        inputs = {"theta_start": theta_start, "theta_target": theta_target, **self._plan_unroll(self.generator)}
        loss, grad_img, grad_lr, param_dist = self._graphed.run(inputs)
        if not math.isfinite(loss):  # as the eager step: nothing was updated
            raise FloatingPointError(f"MTT matching loss is {loss} at iteration {self._iteration}: "
                                     f"lower lr_img ({self.config.lr_img}) or lr_lr ({self.config.lr_lr})")
        self._iteration += 1
        metrics = {"loss": loss, "syn_lr": float(self.syn_lr.detach()), "start_epoch": float(start),
                   "grad_norm_img": grad_img, "grad_norm_lr": grad_lr, "param_dist": param_dist,
                   "graph_mem_mb": self._graph_mem_mb}
        return step_meter.finish(metrics, graph_mb=self._graph_mem_mb)

    def matching_loss(self, trajectory_id: str, start_epoch: int, seed: int = 0) -> float:
        """Eq. 2 for a fixed (expert, start epoch) and a fixed augmentation/batch seed, without updating S.

        Does not touch the method's own generators: use it to compare the same matching
        problem before and after some iterations.
        """
        generator = torch.Generator().manual_seed(seed)
        theta_start = self._params(trajectory_id, start_epoch)
        theta_target = self._params(trajectory_id, start_epoch + self.config.expert_epochs)
        theta_end = self._unroll(theta_start, generator, create_graph=False)
        return float(self._matching_loss(theta_end.detach(), theta_start, theta_target))

    # ------------------------------------------------------------------ results and state
    def synthetic_set(self) -> SyntheticSet:
        return self._synthetic(
            self.images.detach().cpu().clone(), self.labels.detach().cpu().clone(),
            {"expert_model": self.model_spec.to_dict(), "store": str(self.inputs.store.root),
             "experts": len(self.experts), "seed": self.seed},
            whitened=self.uses_zca, syn_lr=float(self.syn_lr.detach()),
            zca=self.zca_whitening.state_dict() if self.zca_whitening is not None else None)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update({
            "images": self.images.detach().clone(), "labels": self.labels.detach().clone(),
            "syn_lr": self.syn_lr.detach().clone(),
            "opt_img": clone_tree(self.opt_img.state_dict()), "opt_lr": clone_tree(self.opt_lr.state_dict()),
            "experts": [e.trajectory_id for e in self.experts],
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
        self.labels = state["labels"].to(self.device).clone()
        self.opt_img.load_state_dict(state["opt_img"])
        self.opt_lr.load_state_dict(state["opt_lr"])
