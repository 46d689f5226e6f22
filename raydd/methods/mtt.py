"""MTT: Dataset Distillation by Matching Training Trajectories (Cazenavette et al., CVPR 2022).

Per iteration (paper Sec. 3, Algorithm 1):
  1. sample an expert trajectory θ* from the store and a start epoch t < T+ (max_start_epoch);
  2. θ̂_0 = θ*_t; N (syn_steps) SGD steps on minibatches b_n of the synthetic set S
     with the learnable step size α and DSA:  θ̂_{n+1} = θ̂_n − α ∇ℓ(A(b_n); θ̂_n)      (eq. 1)
  3. L = ‖θ̂_N − θ*_{t+M}‖² / ‖θ*_t − θ*_{t+M}‖²   (M = expert_epochs)                  (eq. 2)
  4. backpropagate L through all N unrolled steps into the pixels of S and into α;
     pixels: SGD(lr_img, momentum 0.5); α: SGD(lr_lr, momentum 0.5).

The iteration is the trajectory-matching family's (raydd/methods/matching.py: its memory, the unroll
modes, the graph engine); this module is MTT's config and its parts.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from ..data.augment import DSA_STRATEGY, DSAConfig
from ..training import ENGINES
from .unroll import UNROLL_MODES
from .base import MethodConfig, PaperProtocol, Scale, register_method
from .inputs import TrajectoryNeed
from .matching import FixedLabels, PlainSGD, StartWindow, TrajectoryMatching


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
    # 'tesla': TESLA's constant-memory gradient, first-order for N > 1 (raydd/methods/unroll.py); TESLA's released
    # distill.py steps the images by half of it (`2 * autograd.grad(...)` doubles a tuple): halve lr_img to match it
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
        "MTT Table 1", {"epochs": 1000, "num_models": 5, "dsa_align_corners": True}, {"expert": (100, 50)},
        notes="distill.py: 5 ConvNet-3 w128 IN x 1000 epochs at the learned lr, each network's final accuracy "
              "(its Max_Accuracy line is the best checkpoint; which one Table 1 quotes is not stated). Student "
              "minibatches: raydd takes a permutation's chunks from its head, distill.py from its end "
              "(indices_chunks.pop()): the same distribution; otherwise one iteration equals distill.py's to "
              "3e-7 in float32 on identical draws, and the evaluation (its evaluate_synset: 1001 passes, its DSA "
              "grid) trains the same networks bit for bit (benchmarks/results/reference_equivalence.md)")
    matched_recipe: ClassVar[str] = "expert"  # the farm recipe whose trajectories are matched
    engines: ClassVar[tuple[str, ...]] = ENGINES  # the engines this method's iteration is built for
    matched_role: ClassVar[str] = "experts"

    def matched_need(self) -> TrajectoryNeed:
        """The trajectories it matches: ``matched_recipe``'s, storing epochs 0..max_start_epoch + expert_epochs
        (the window it samples)."""
        return TrajectoryNeed(self.matched_recipe, self.matched_role, kinds=(self.expert_kind,),
                              epochs=self.max_start_epoch + self.expert_epochs, model=self.model, zca=self.zca,
                              zca_knob=True)

    def needs(self) -> tuple[TrajectoryNeed, ...]:
        return (self.matched_need(),)

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


@register_method
class MTT(TrajectoryMatching):
    """MTT: the family's iteration (raydd/methods/matching.py) with MTT's parts — the experts of
    ``matched_need()``, a window [0, T+), fixed class labels, a plain-SGD student, no skip."""

    name = "mtt"
    label = "MTT"
    config_cls = MTTConfig

    def __init__(self, config: MTTConfig, train, store=None, *, device="auto", seed: int = 0) -> None:
        super().__init__(config, train, store, device=device, seed=seed)
        need = config.matched_need()
        experts, meta = self.find_experts(need)  # validated before any work
        self.load_experts(need, experts, meta)
        images, classes = self.random_initial_set()
        self.assemble(images, FixedLabels(classes), window=StartWindow.fixed(0, config.max_start_epoch),
                      student_update=PlainSGD())
