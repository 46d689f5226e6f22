"""EDC: Elucidate Dataset Condensation (Shao, Zhou, Chen, Shen, NeurIPS 2024), data synthesis.

Observers: BatchNorm networks trained briefly on the real data, read from the store
(kind 'observer': final weights + BN running statistics; ``raydd farm --recipe observer``).
Per iteration one observer φ (round robin; 'all' uses every observer) sees an augmented copy
of each chunk of S (RandomResizedCrop with the paper's weak scale (0.5, 1) + flip, Sec. 3.2 ④),
forward hooks capture the input of every BN layer, and the loss is

  L = ce_weight · CE(φ(A(S)), y)                          (generalized data synthesis; Sec. 3.2 ①)
    + stat_weight · Σ_l m_l · L'_syn,l                    (m_0 = first_bn_multiplier, else 1)
    + flatness_weight · L'_FR

  L'_syn,l = α (‖μ_l(S) − μ_l^BN‖₂ + ‖σ²_l(S) − σ²_l^BN‖₂)                      (eq. 5, Form (1))
           + (1 − α) Σ_c p(c) (‖μ_l(S,c) − μ_l(T,c)‖₂ + ‖σ²_l(S,c) − σ²_l(T,c)‖₂)    (eq. 5, Form (2))
  L'_FR    = KL(softmax(φ(A(S))/τ) ‖ softmax(φ(A(S_EMA))/τ)),  S_EMA ← β S_EMA + (1 − β) S  (eq. 7)

μ^BN, σ²^BN are the observer's running statistics; μ(T, c), σ²(T, c) the per-class channel mean
and variance of the real training set at that BN input (computed once per observer, cached and
checkpointed); p(c) the class frequency of the real data (the GMM weights of Def. 3.1),
renormalised over the classes of the chunk. Images: Adam(lr 0.05, betas (0.5, 0.9)) with a
cosine lr over ``total_iterations`` (reference code), clipped to the valid pixel range. Real-image
initialisation (Sec. 3.2 ③). Soft labels (eq. 4): the observers' mean logits on S, stored
as softmax probabilities, the logits themselves in ``meta['logits']``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from ..data.augment import apply_affine, random_resized_crop_params
from .base import CondensationMethod, MethodConfig, PaperProtocol, StepMeter, clone_tree, register_method
from .inputs import TrajectoryNeed
from .initial import class_labels, random_real_indices
from .synthetic import SyntheticSet

TURNS = ("round_robin", "all")
CLASS_TERMS = ("paper", "code")
LR_SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class EDCConfig(MethodConfig):
    """EDC synthesis knobs (paper App. A.1 Tables 6-10 unless marked 'reference code').

    ``defaults(dataset, ipc)``: cifar10 (Table 10): 75 iterations, all of S per batch;
    cifar100 (Table 9): 2000 iterations, batch 100; any other dataset: the CIFAR-10 row
    (the closest small-scale setting; documented fallback).
    """

    alpha: float = 0.5  # α of eq. 5: weight of global (Form 1) vs per-class (Form 2) statistics
    tau: float = 4.0  # τ of eq. 7: temperature of the flatness KL
    ema_beta: float = 0.99  # β of eqs. 6-7: EMA rate of S_EMA
    flatness_weight: float = 0.25  # loss weight of L'_FR (Table 4, best row)
    stat_weight: float = 0.01  # weight of the statistics loss (reference code: r_loss)
    first_bn_multiplier: float = 10.0  # extra weight of the first BN layer (reference code)
    ce_weight: float = 1.0  # weight of CE(φ(A(S)), y) (reference code; the paper's "cross-entropy on logits")
    # 'paper': eq. 5's Form (2), each class's batch statistics against that class's real ones weighted by p(c);
    # 'code': the released code's (recover/utils.py BNFeatureHook, category_aware 'global'): the whole batch's
    # statistics against the batch's mean of its images' class statistics (means of per-image statistics)
    class_term: str = "paper"
    # the released code's training_momentum (recover.sh 0.8): the batch statistics in both terms are a running
    # average, m·previous + (1 − m)·current from 0, with the current statistics' gradient; 0: eq. 5's own
    stat_momentum: float = 0.0
    lr: float = 0.05  # Adam lr on the pixels
    adam_beta1: float = 0.5
    adam_beta2: float = 0.9
    lr_schedule: str = "cosine"  # 'cosine' over ``total_iterations`` (reference code) or 'constant'
    total_iterations: int = 2000  # planned synthesis iterations (horizon of the cosine lr)
    batch_syn: int | None = None  # images of S per chunk (None: all of S at once; CIFAR-10 "All")
    augment: bool = True  # RandomResizedCrop (+ flip where the dataset allows) on S and S_EMA alike
    crop_scale_min: float = 0.5  # weak augmentation: crop area in [crop_scale_min, 1] (Table 5, ④)
    clip_pixels: bool = True  # clamp S to the valid pixel range after each step (reference code)
    observer_turns: str = "round_robin"  # 'round_robin': one observer per iteration; 'all': mean over all
    observers: str | None = None  # comma-separated trajectory ids; None: every matching observer in the store
    observer_kind: str = "observer"  # store kind of the observers
    model: str | None = None  # store model-name filter, e.g. 'resnet18-bn'; None: every model

    aliases: ClassVar[dict[str, str]] = {"alpha": "alpha", "tau": "tau"}
    default_iterations: ClassVar[int] = 2000
    horizon: ClassVar[str] = "total_iterations"  # the cosine lr runs over the run's own length
    published: ClassVar[tuple[tuple[str, int], ...]] = tuple((d, i) for d in ("cifar10", "cifar100") for i in (1, 10, 50))
    reported: ClassVar[dict[tuple[str, int], float]] = {  # EDC Table 1, ResNet-18
        ("cifar10", 1): 32.6, ("cifar10", 10): 79.1, ("cifar10", 50): 87.0,
        ("cifar100", 1): 39.7, ("cifar100", 10): 63.7, ("cifar100", 50): 68.6}
    paper: ClassVar[PaperProtocol] = PaperProtocol(
        "EDC Table 1 (ResNet-18)", {"protocol": "edc", "model": "resnet18-bn", "epochs": 1000, "teachers": True},
        notes="EDC's observers are 8 architectures (ResNet-18, ConvNet-W128, MobileNet-V2, WRN-16-2, "
              "ShuffleNet-V2, ConvNet-D1/D2/W32); raydd farms BatchNorm ResNet-18 observers; the number of "
              "evaluation runs is not stated (raydd: 5); the released code (train/direct_train.py, run by run.sh) "
              "relabels each CutMixed batch on the fly (MSE on the observers' logits + 0.025 CE; raydd: "
              "loss=mse_gt, cutmix_alpha=1.0, bit-identical to it in benchmarks/reference_equivalence.py "
              "--protocols edc) and keeps the best of its late checks, raydd the final; raydd's default loss is "
              "the KL at τ of Sec. 3.2, without CutMix (the paper names neither). "
              "Synthesis (Branch_CIFAR_10/recover, compared in benchmarks/reference_equivalence.py --methods edc): "
              "the code's class term compares the whole batch's statistics with the batch's mean of per-class "
              "statistics (themselves means of per-image statistics), raydd's is eq. 5's Form (2) (each class's "
              "batch statistics against that class's, weighted by p(c)); the code averages the batch statistics "
              "over iterations (training_momentum 0.8, starting from 0): class_term=code with stat_momentum=0.8 "
              "is the code's BatchNorm term (equal to its BNFeatureHook to 2e-7; its whole iteration, with its crops "
              "replayed, to 1.2e-5 on the images after 5 steps: --edc-loop); the code also adds "
              "G-VBSM's statistics of every convolution's input (ConvFeatureHook), weights its first hooked "
              "layer (a convolution) x10, crops with scale (0.08, 1) (one box for the whole batch, torchvision's "
              "resized crop; raydd: a box per image through an affine grid) and, in its CIFAR-10 recover.sh, runs "
              "without the flatness term (crop_scale_min=0.08, flatness_weight=0); raydd's defaults follow "
              "eq. 5, Table 5's weak crop and eq. 7")

    def needs(self) -> tuple[TrajectoryNeed, ...]:
        """BatchNorm observers (their final weights and running statistics): every matching one, or the
        ``observers`` ids; any models (the paper mixes ResNet-18, ConvNet and others)."""
        return (TrajectoryNeed("observer", "observers", kinds=(self.observer_kind,), model=self.model, zca=False,
                               norm="batch", ids=self.observer_ids and tuple(self.observer_ids), one_model=False,
                               farm_model=(("arch", "resnet18"),)),)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check("alpha", low=0, high=1)
        self.check("tau", low=0, low_open=True)
        self.check("ema_beta", low=0, high=1, high_open=True)
        for key in ("flatness_weight", "stat_weight", "first_bn_multiplier", "ce_weight"):
            self.check(key, low=0)
        self.check("lr", low=0, low_open=True)
        for key in ("adam_beta1", "adam_beta2"):
            self.check(key, low=0, high=1, high_open=True)
        self.check("total_iterations", low=1)
        self.check("batch_syn", low=1)
        self.check("crop_scale_min", low=0, high=1, low_open=True)
        self.check("stat_momentum", low=0, high=1, high_open=True)
        if self.class_term not in CLASS_TERMS:
            raise ValueError(f"EDCConfig.class_term={self.class_term!r} is invalid: accepted {', '.join(CLASS_TERMS)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"EDCConfig.lr_schedule={self.lr_schedule!r} is invalid: "
                             f"accepted {', '.join(LR_SCHEDULES)}")
        if self.observer_turns not in TURNS:
            raise ValueError(f"EDCConfig.observer_turns={self.observer_turns!r} is invalid: "
                             f"accepted {', '.join(TURNS)}")
        if self.observers is not None and not all(s.strip() for s in self.observers.split(",")):
            raise ValueError(f"EDCConfig.observers={self.observers!r} is invalid: expected comma-separated "
                             f"trajectory ids (see raydd store ls --kind observer)")

    @classmethod
    def defaults(cls, dataset: str, ipc: int) -> "EDCConfig":
        if dataset == "cifar100":
            return cls(dataset=dataset, ipc=ipc, total_iterations=2000, batch_syn=100)
        return cls(dataset=dataset, ipc=ipc, total_iterations=75, batch_syn=None)

    @property
    def observer_ids(self) -> list[str] | None:
        return None if self.observers is None else [s.strip() for s in self.observers.split(",")]


@dataclass
class _Observer:
    trajectory_id: str
    model_name: str
    net: nn.Module
    bn: list[nn.BatchNorm2d]


class BNInputs:
    """Forward hooks that record the input of each BN layer; removed on exit, also on errors."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.layers = layers
        self.inputs: list[torch.Tensor | None] = [None] * len(layers)
        self._handles: list[Any] = []

    def _hook(self, i: int):
        def record(module, args, output):
            self.inputs[i] = args[0]
        return record

    def __enter__(self) -> "BNInputs":
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.layers)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _channel_stats(feat: torch.Tensor, y: torch.Tensor, num_classes: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global (μ [C], σ² [C]) and per-class (μ [K, C], σ² [K, C]) channel statistics of ``feat`` [B, C, H, W]."""
    b, ch = feat.shape[:2]
    hw = feat[0, 0].numel()
    mean = feat.mean((0, 2, 3))
    var = (feat - mean.view(1, -1, 1, 1)).pow(2).mean((0, 2, 3))
    onehot = F.one_hot(y, num_classes).to(feat.dtype).t()  # [K, B]: class sums as a matmul
    count = onehot.sum(1).clamp_min(1) * hw  # [K]
    cmean = onehot @ feat.sum((2, 3)) / count[:, None]
    centred = (feat - cmean[y].view(b, ch, 1, 1)).pow(2).sum((2, 3))
    cvar = onehot @ centred / count[:, None]
    return mean, var, cmean, cvar


@register_method
class EDC(CondensationMethod):
    name = "edc"
    label = "EDC"
    config_cls = EDCConfig
    stats_batch_size = 512  # real images per forward pass when computing the class statistics

    def __init__(self, config: EDCConfig, train, store=None, *, device="auto", seed: int = 0) -> None:
        super().__init__(config, train, store, device=device, seed=seed)
        cfg, info = self.config, train.info
        infos = self.inputs.find(config.needs()[0])  # validation first: raises before any work
        self.observers = self.inputs.healthy(infos, self._load_observer)  # corrupt ones reported and skipped
        if not self.observers:
            raise self.inputs.missing(f"all {len(infos)} observers are corrupt")
        counts = torch.bincount(train.labels, minlength=info.num_classes).double()
        self.class_prior = (counts / counts.sum()).float().to(self.device)  # p(c): GMM weights (Def. 3.1)
        self.class_stats: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # observer id -> per BN layer
        # stat_momentum > 0: observer id -> per BN layer the running (mean, variance) of the batch statistics
        self.stat_running: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.class_stat_computations = 0
        mean = torch.tensor(info.mean).view(1, -1, 1, 1)
        std = torch.tensor(info.std).view(1, -1, 1, 1)
        self._pixel_low = (-mean / std).to(self.device)
        self._pixel_high = ((1 - mean) / std).to(self.device)
        self.images, self.labels = self._init_synthetic()
        self.images.requires_grad_(True)
        self.ema_images = self.images.detach().clone()  # S_EMA starts at S (eq. 6)
        self.opt = torch.optim.Adam([self.images], lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2))
        self.chunks = self._chunks()

    # ------------------------------------------------------------------ setup
    def _load_observer(self, info) -> _Observer:
        net = self.inputs.network(info, self.device)  # final weights and BN running statistics, frozen
        bn = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
        if not bn or self.inputs.open(info.trajectory_id).buffers(max(info.epochs)) is None:
            raise self.inputs.missing(f"observer {info.trajectory_id} ({info.model_name}) stores no BatchNorm "
                                      f"running statistics: EDC needs BatchNorm observers")
        return _Observer(info.trajectory_id, info.model_name, net, bn)

    def _init_synthetic(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Real-image initialisation (Sec. 3.2 ③): ``ipc`` random training images per class."""
        cfg, info = self.config, self.train.info
        labels = class_labels(info.num_classes, cfg.ipc)
        picks = random_real_indices([self.train.class_indices(c) for c in range(info.num_classes)], cfg.ipc,
                                    self.generator)
        images = self.train.images[picks].clone().float()
        return images.to(self.device), labels.to(self.device)

    def _chunks(self) -> list[torch.Tensor]:
        """Fixed partition of S, image j of every class before image j+1 (each chunk spans the classes).

        Chunks are independent problems; their gradients touch disjoint rows, so one Adam step on
        the summed gradient equals the reference code's separate optimisation of each batch.
        """
        k, ipc = self.train.info.num_classes, self.config.ipc
        order = torch.arange(k * ipc).view(k, ipc).t().reshape(-1)
        size = self.config.batch_syn or len(order)
        return [c.to(self.device) for c in order.split(size)]

    def observer_models(self) -> list[nn.Module]:
        """The observer networks (eval mode, frozen), e.g. as ``teachers`` of ``evaluate_edc``."""
        return [o.net for o in self.observers]

    def teacher_models(self) -> list[nn.Module]:
        """The observers relabel batches under the EDC evaluation protocol (``teachers: true``)."""
        return self.observer_models()

    # ------------------------------------------------------------------ statistics
    @torch.no_grad()
    def _compute_class_stats(self, obs: _Observer) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-class channel mean and variance of the real training set at every BN input of ``obs``: over all
        of the class's pixels (``class_term='paper'``), or the mean over the class's images of each image's
        channel mean and variance (``'code'``, as the released code's statistics pass)."""
        self.class_stat_computations += 1
        k = self.train.info.num_classes
        sums = [None] * len(obs.bn)
        sq = [None] * len(obs.bn)
        counts = torch.zeros(k, dtype=torch.float64, device=self.device)
        images, labels = self.train.images, self.train.labels
        hw = [0] * len(obs.bn)
        with BNInputs(obs.bn) as cap:
            for start in range(0, len(labels), self.stats_batch_size):
                x = images[start:start + self.stats_batch_size].to(self.device)
                y = labels[start:start + self.stats_batch_size].to(self.device)
                obs.net(x)
                onehot = F.one_hot(y, k).double().t()  # [K, B]
                counts += onehot.sum(1)
                for li, feat in enumerate(cap.inputs):
                    if self.config.class_term == "code":  # per-image statistics, summed per class
                        hw[li] = 1
                        s1 = onehot @ feat.mean((2, 3)).double()
                        s2 = onehot @ feat.var((2, 3), unbiased=False).double()
                        sums[li] = s1 if sums[li] is None else sums[li] + s1
                        sq[li] = s2 if sq[li] is None else sq[li] + s2
                        continue
                    hw[li] = feat[0, 0].numel()
                    s1 = onehot @ feat.sum((2, 3)).double()  # per-image sums in float32, totals in float64
                    s2 = onehot @ feat.pow(2).sum((2, 3)).double()
                    sums[li] = s1 if sums[li] is None else sums[li] + s1
                    sq[li] = s2 if sq[li] is None else sq[li] + s2
        out = []
        for li in range(len(obs.bn)):
            n = (counts * hw[li]).clamp_min(1)[:, None]
            mean = sums[li] / n
            var = sq[li] / n if self.config.class_term == "code" else (sq[li] / n - mean.pow(2)).clamp_min(0)
            out.append((mean.float(), var.float()))
        return out

    def _stats(self, obs: _Observer) -> list[tuple[torch.Tensor, torch.Tensor]]:
        stats = self.class_stats.get(obs.trajectory_id)
        if stats is None:
            stats = self.class_stats[obs.trajectory_id] = self._compute_class_stats(obs)
        return stats

    # ------------------------------------------------------------------ the loss
    def _augment_pair(self, x: torch.Tensor, x_ema: torch.Tensor, generator: torch.Generator):
        if not self.config.augment:
            return x, x_ema
        theta = random_resized_crop_params(len(x), generator, scale=(self.config.crop_scale_min, 1.0),
                                           flip=self.train.info.flip_ok)
        return apply_affine(x, theta), apply_affine(x_ema, theta)  # same crop for S and S_EMA

    def _batch_stats(self, obs: _Observer, li: int, mean: torch.Tensor, var: torch.Tensor, update: bool
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch statistics the loss compares: the current ones, or with ``stat_momentum`` m their running
        average m·previous + (1 − m)·current (from 0) carrying the current ones' gradient (the code's)."""
        m = self.config.stat_momentum
        if m == 0:
            return mean, var
        layers = self.stat_running.get(obs.trajectory_id) or [(torch.zeros_like(b.running_mean),
                                                               torch.zeros_like(b.running_var)) for b in obs.bn]
        run_mean = m * layers[li][0] + (1 - m) * mean.detach()
        run_var = m * layers[li][1] + (1 - m) * var.detach()
        if update:
            layers[li] = (run_mean, run_var)
            self.stat_running[obs.trajectory_id] = layers
        return run_mean + mean - mean.detach(), run_var + var - var.detach()

    def _chunk_loss(self, obs: _Observer, x: torch.Tensor, x_ema: torch.Tensor, y: torch.Tensor, *,
                    update_running: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one chunk; ``update_running``: advance the running batch statistics (stat_momentum)."""
        cfg, k = self.config, self.train.info.num_classes
        class_stats = self._stats(obs)
        with BNInputs(obs.bn) as cap:
            logits = obs.net(x)
        present = torch.bincount(y, minlength=k) > 0
        prior = torch.where(present, self.class_prior, torch.zeros_like(self.class_prior))
        prior = prior / prior.sum()
        glob = logits.new_zeros(())
        per_class = logits.new_zeros(())
        stat = logits.new_zeros(())
        for li, (bn, feat) in enumerate(zip(obs.bn, cap.inputs)):
            mean, var, cmean, cvar = _channel_stats(feat, y, k)
            mean, var = self._batch_stats(obs, li, mean, var, update_running)
            g = torch.norm(mean - bn.running_mean) + torch.norm(var - bn.running_var)  # Form (1)
            tmean, tvar = class_stats[li]
            if cfg.class_term == "code":  # the batch against its images' mean class statistics
                c = torch.norm(tmean[y].mean(0) - mean) + torch.norm(tvar[y].mean(0) - var)
            else:
                dist = torch.norm(cmean - tmean, dim=1) + torch.norm(cvar - tvar, dim=1)  # [K], Form (2)
                c = (prior * torch.where(present, dist, torch.zeros_like(dist))).sum()
            mult = cfg.first_bn_multiplier if li == 0 else 1.0
            stat = stat + mult * (cfg.alpha * g + (1 - cfg.alpha) * c)  # eq. 5
            glob, per_class = glob + mult * g.detach(), per_class + mult * c.detach()
        ce = F.cross_entropy(logits, y)
        flat = logits.new_zeros(())
        if cfg.flatness_weight > 0:
            with torch.no_grad():
                ema_logits = obs.net(x_ema)
            log_p = F.log_softmax(logits / cfg.tau, dim=1)  # eq. 7: KL(softmax(φ(S)/τ) ‖ softmax(φ(S_EMA)/τ))
            flat = (log_p.exp() * (log_p - F.log_softmax(ema_logits / cfg.tau, dim=1))).sum(1).mean()
        loss = cfg.ce_weight * ce + cfg.stat_weight * stat + cfg.flatness_weight * flat
        parts = {"loss_stat": float(stat.detach()), "loss_global": float(glob), "loss_class": float(per_class),
                 "loss_ce": float(ce.detach()), "loss_flat": float(flat.detach())}
        return loss, parts

    def _turn(self) -> list[_Observer]:
        if self.config.observer_turns == "all":
            return self.observers
        return [self.observers[self._iteration % len(self.observers)]]

    def lr_at(self, iteration: int) -> float:
        cfg = self.config
        if cfg.lr_schedule == "constant":
            return cfg.lr
        t = min(iteration, cfg.total_iterations)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * t / cfg.total_iterations))

    def _objective(self, observers: list[_Observer], generator: torch.Generator, *, backward: bool
                   ) -> dict[str, float]:
        """Mean loss over observers and chunks; with ``backward`` accumulates its gradient into S."""
        totals: dict[str, float] = {}
        n = len(observers) * len(self.chunks)
        for obs in observers:
            for idx in self.chunks:
                x = self.images[idx] if backward else self.images.detach()[idx]
                x, x_ema = self._augment_pair(x, self.ema_images[idx], generator)
                loss, parts = self._chunk_loss(obs, x, x_ema, self.labels[idx], update_running=backward)
                if backward:
                    (loss / n).backward(inputs=[self.images])
                parts["loss"] = float(loss.detach())
                for key, value in parts.items():
                    totals[key] = totals.get(key, 0.0) + value / n
        return totals

    def step(self) -> dict[str, float]:
        step_meter = StepMeter(self.device)
        observers = self._turn()
        lr = self.lr_at(self._iteration)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        metrics = self._objective(observers, self.generator, backward=True)
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(f"EDC loss is {metrics['loss']} at iteration {self._iteration}: lower lr "
                                     f"({self.config.lr}) or stat_weight ({self.config.stat_weight})")
        grad_norm = float(self.images.grad.norm())
        self.opt.step()
        with torch.no_grad():
            if self.config.clip_pixels:
                self.images.copy_(torch.maximum(torch.minimum(self.images, self._pixel_high), self._pixel_low))
            self.ema_images.mul_(self.config.ema_beta).add_(self.images.detach(), alpha=1 - self.config.ema_beta)
        self._iteration += 1
        metrics.update(lr=lr, grad_norm_img=grad_norm,
                       observer=float(self._iteration - 1) % len(self.observers) if len(observers) == 1 else -1.0)
        return step_meter.finish(metrics)

    def matching_loss(self, seed: int = 0) -> dict[str, float]:
        """The objective on the current S for every observer with a fixed augmentation seed, without
        updating anything (the method's own generators are untouched)."""
        return self._objective(self.observers, torch.Generator().manual_seed(seed), backward=False)

    # ------------------------------------------------------------------ results and state
    @torch.no_grad()
    def soft_label_logits(self) -> torch.Tensor:
        """Eq. 4: the observers' mean logits on the (un-augmented) synthetic images."""
        x = self.images.detach()
        batches = [torch.stack([o.net(b) for o in self.observers]).mean(0)
                   for b in x.split(self.stats_batch_size)]
        return torch.cat(batches)

    def synthetic_set(self) -> SyntheticSet:
        logits = self.soft_label_logits().float().cpu()
        return self._synthetic(self.images.detach().cpu().clone(), F.softmax(logits, dim=1), {
            "logits": logits, "hard_labels": self.labels.detach().cpu().clone(),
            "observers": [o.trajectory_id for o in self.observers],
            "observer_models": [o.model_name for o in self.observers], "store": str(self.store.root),
            "seed": self.seed})

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update({
            "images": self.images.detach().clone(), "ema_images": self.ema_images.clone(),
            "labels": self.labels.detach().clone(), "opt": clone_tree(self.opt.state_dict()),
            "observers": [o.trajectory_id for o in self.observers],
            "class_stats": {tid: [[m.clone(), v.clone()] for m, v in stats] for tid, stats in self.class_stats.items()},
            "stat_running": {tid: [[m.clone(), v.clone()] for m, v in layers]
                             for tid, layers in self.stat_running.items()},
        })
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = list(state["observers"])
        by_id = {o.trajectory_id: o for o in self.observers}
        if sorted(saved) != sorted(by_id):
            missing = [t for t in saved if t not in by_id]
            raise ValueError(f"checkpoint used observers {saved}, this method has {sorted(by_id)}"
                             + (f" ({missing[0]} is not usable here)" if missing else "")
                             + ": resume needs the same observers")
        super().load_state_dict(state)
        self.observers = [by_id[t] for t in saved]  # same order => same turns
        with torch.no_grad():
            self.images.copy_(state["images"].to(self.device))
        self.ema_images = state["ema_images"].to(self.device).clone()
        self.labels = state["labels"].to(self.device).clone()
        self.opt.load_state_dict(state["opt"])
        self.class_stats = {tid: [(m.to(self.device).clone(), v.to(self.device).clone()) for m, v in stats]
                            for tid, stats in state["class_stats"].items()}
        self.stat_running = {tid: [(m.to(self.device).clone(), v.to(self.device).clone()) for m, v in layers]
                             for tid, layers in state.get("stat_running", {}).items()}
