"""EDC post-evaluation protocol (Shao et al., "Elucidating the Design Space of Dataset Condensation",
NeurIPS 2024, Sec. 3.2 and App. A.1), offered for any method's SyntheticSet.

A fresh student learns the synthetic set's soft labels:

- loss: KL(softmax(t/τ) ‖ softmax(s/τ)) on logits at temperature τ (``loss='kl'``), or the
  reference code's ``mse_gt``: MSE on logits + ce_weight · CE on the hard labels (needs logits:
  ``syn.meta['logits']`` or ``teachers``). Soft labels stored as probabilities p give the
  teacher logits up to a constant, log p, which is all the temperature softmax needs.
- AdamW (lr 1e-3; weight decay 0.01 on the weight matrices and kernels only, the reference code's
  ``get_parameters``: the paper lists none; ``weight_decay_on='all'`` decays every parameter);
- small batches (CIFAR-10: 25, CIFAR-100: 50; Tables 9-10, Table 20);
- the smoothing LR schedule μ(i) = (1 + cos(iπ/(ζN)))/2, i the epoch, N the epochs, ζ = 2
  (ζ = 1 is plain cosine); or MultiStepLR ×0.5 at 800/900/950 of 1000 epochs (Table 10,
  CIFAR-10); or SSRS (App. G.3, eq. 33);
- EMA of the model weights (rate 0.99) is the network that is tested ("EMA-based evaluation");
- augmentation (Tables 7-10): RandAugment (``randaugment``; the CIFAR rows) before RandomResizedCrop
  (scale 0.08-1) and flip; the released code (train/direct_train.py, run by its run.sh) also CutMixes
  every batch (α 1) before its teachers relabel it (``cutmix_alpha``; needs ``teachers``: a mixed image
  has no stored label).

The reported number is mean ± std over ``num_models`` students of the FINAL EMA test
accuracy (never the best epoch). With ``teachers`` (e.g. ``EDC.observer_models()``) the
targets of every augmented batch are the teachers' mean logits on that very batch, as in
the reference code (FKD-style relabelling); without, the stored labels are used.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..data.augment import apply_affine, make_dsa, random_resized_crop_params
from ..data.datasets import DatasetInfo, ImageDataset
from ..models import ModelSpec
from ..models.ema import ModelEMA
from ..training import (autocast, check_precision, draw_cutmix, evaluate_model, minibatches, paste_cutmix,
                        resolve_device)
from ..validation import check_bool, check_choice, check_int, check_range
from .standard import EvalResult, check_eval_model, eval_model_spec, fresh_network

SCHEDULES = ("smoothing", "multistep", "ssrs")
LOSSES = ("kl", "mse_gt")
AUGMENTS = ("rrc", "dsa", "none")
DECAYED = ("weights", "all")  # which parameters AdamW's weight decay reaches


# --------------------------------------------------------------------------- LR schedules
def smoothing_lr_factor(i: float, total: int, zeta: float) -> float:
    """μ(i) = (1 + cos(iπ/(ζN)))/2 (EDC Sec. 3.2); 0 once i ≥ ζN. ζ = 1 is the plain cosine schedule."""
    check_int("total", total)
    check_range("zeta", zeta, low=0, low_open=True)
    if i >= zeta * total:
        return 0.0
    return 0.5 * (1.0 + math.cos(i * math.pi / (zeta * total)))


def ssrs_lr_factor(i: float, total: int, zeta: float) -> float:
    """Early-smoothing later-steep schedule (EDC App. G.3, eq. 33)."""
    if i <= 5 * total / 6:
        return smoothing_lr_factor(i, total, zeta)
    return 0.5 * (1.0 + math.cos(5 * math.pi / (6 * zeta))) * (6 * total - 6 * i) / (6 * total)


def multistep_lr_factor(i: int, total: int, milestones: Sequence[float], gamma: float) -> float:
    """γ^(number of milestones reached); milestones are fractions of ``total`` (0.8/0.9/0.95 of 1000)."""
    reached = sum(1 for m in milestones if i >= round(m * total))
    return gamma ** reached


# --------------------------------------------------------------------------- config
@dataclass(frozen=True)
class EDCEvalConfig:
    """EDC post-evaluation knobs; ``defaults(dataset)`` gives the paper's per-dataset rows.

    Defaults (paper App. A.1, Tables 6-10): ResNet-18 student, 1000 epochs, AdamW lr 1e-3,
    EMA rate 0.99, smoothing schedule ζ = 2, batch 25 (CIFAR-10's small batch). Weight
    decay 0.01, τ = 3 for the KL loss and ce_weight 0.025 for mse_gt are the reference
    code's (the paper lists none). ``model`` is an architecture name or a dict of ModelSpec
    fields; channels, resolution and class count come from the data.
    """

    model: str | dict = "resnet18-bn"  # the reference trains a torchvision ResNet-18 (BatchNorm) student
    num_models: int = 5
    epochs: int = 1000
    batch_size: int = 25
    lr: float = 1e-3
    weight_decay: float = 0.01
    weight_decay_on: str = "weights"  # 'weights': matrices and kernels only (the code's get_parameters); 'all'
    schedule: str = "smoothing"  # 'smoothing' (ζ), 'multistep' (milestones, gamma) or 'ssrs' (eq. 33)
    zeta: float = 2.0
    milestones: tuple[float, ...] = (0.8, 0.9, 0.95)  # fractions of epochs: 800/900/950 of 1000
    gamma: float = 0.5
    ema_decay: float = 0.99
    loss: str = "kl"  # 'kl' (temperature) or 'mse_gt' (MSE on logits + ce_weight · CE)
    temperature: float = 3.0
    ce_weight: float = 0.025
    augment: str = "rrc"  # 'rrc' (RandomResizedCrop + flip), 'dsa' or 'none'
    crop_scale_min: float = 0.08
    randaugment: bool = False  # torchvision's RandAugment before the crop (Tables 7-10; the CIFAR rows set it)
    randaugment_ops: int = 2  # its N (torchvision's default, as the code runs it)
    randaugment_magnitude: int = 9  # its M
    cutmix_alpha: float = 0.0  # > 0: CutMix every batch, λ ~ Beta(α, α) (the released code: 1.0); needs teachers
    teachers: bool = False  # relabel every augmented batch with the method's teacher models (EDC: its observers)
    device: str = "auto"
    seed: int = 0
    precision: str = "fp32"  # forward/loss arithmetic (raydd.training.PRECISIONS): fp32, or bf16 autocast

    def __post_init__(self) -> None:
        owner = "EDCEvalConfig"
        check_eval_model(owner, self.model)
        for key in ("num_models", "epochs", "batch_size"):
            check_int(f"{owner}.{key}", getattr(self, key))
        check_int(f"{owner}.seed", self.seed, low=0)
        check_range(f"{owner}.lr", self.lr, low=0, low_open=True)
        check_range(f"{owner}.weight_decay", self.weight_decay, low=0)
        check_range(f"{owner}.zeta", self.zeta, low=0, low_open=True)
        check_range(f"{owner}.gamma", self.gamma, low=0, high=1)
        check_range(f"{owner}.ema_decay", self.ema_decay, low=0, high=1, high_open=True)
        check_range(f"{owner}.temperature", self.temperature, low=0, low_open=True)
        check_range(f"{owner}.ce_weight", self.ce_weight, low=0)
        check_range(f"{owner}.crop_scale_min", self.crop_scale_min, low=0, high=1, low_open=True)
        check_bool(f"{owner}.randaugment", self.randaugment, "RandAugment before the crop")
        check_int(f"{owner}.randaugment_ops", self.randaugment_ops)
        check_int(f"{owner}.randaugment_magnitude", self.randaugment_magnitude, low=0, high=30)  # its 31 bins
        check_range(f"{owner}.cutmix_alpha", self.cutmix_alpha, low=0)
        if self.cutmix_alpha > 0 and not self.teachers:
            raise ValueError(f"{owner}.cutmix_alpha={self.cutmix_alpha!r} needs teachers=true: a CutMixed image "
                             f"has no stored label, the teachers relabel it (as the code's direct_train.py)")
        check_choice(f"{owner}.weight_decay_on", self.weight_decay_on, DECAYED)
        check_choice(f"{owner}.schedule", self.schedule, SCHEDULES)
        check_choice(f"{owner}.loss", self.loss, LOSSES)
        check_choice(f"{owner}.augment", self.augment, AUGMENTS)
        check_bool(f"{owner}.teachers", self.teachers, "relabel with the method's teacher models")
        check_precision(f"{owner}.precision", self.precision)
        milestones = tuple(self.milestones) if isinstance(self.milestones, (list, tuple)) else None
        if not milestones:
            raise ValueError(f"{owner}.milestones={self.milestones!r} is invalid: expected fractions in (0, 1]")
        for i, m in enumerate(milestones):
            check_range(f"{owner}.milestones[{i}]", m, low=0, high=1, low_open=True)
        object.__setattr__(self, "milestones", tuple(float(m) for m in milestones))

    @classmethod
    def defaults(cls, dataset: str, **overrides: Any) -> "EDCEvalConfig":
        """Paper rows: cifar10 (Table 10: batch 25, MultiStepLR ×0.5 at 800/900/950, RandAugment),
        cifar100 (Table 9: batch 50, smoothing ζ = 2, RandAugment); other datasets use the CIFAR-10
        batch with the smoothing schedule and no RandAugment (documented fallback)."""
        rows = {"cifar10": dict(batch_size=25, schedule="multistep", randaugment=True),
                "cifar100": dict(batch_size=50, randaugment=True)}
        return cls(**{**rows.get(dataset, {}), **overrides})

    @property
    def passes(self) -> int:
        """Passes over the set each network trains (EDC's loop: exactly ``epochs``)."""
        return self.epochs

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["milestones"] = list(self.milestones)
        return out

    def model_spec(self, info: DatasetInfo) -> ModelSpec:
        return eval_model_spec(self.model, info)

    def lr_factor(self, epoch: int) -> float:
        if self.schedule == "smoothing":
            return smoothing_lr_factor(epoch, self.epochs, self.zeta)
        if self.schedule == "ssrs":
            return ssrs_lr_factor(epoch, self.epochs, self.zeta)
        return multistep_lr_factor(epoch, self.epochs, self.milestones, self.gamma)


# --------------------------------------------------------------------------- protocol
def _stored_targets(syn, config: EDCEvalConfig, teachers) -> tuple[str, torch.Tensor]:
    """('logits', [N, K]) or ('probs', [N, K]) the student learns; validated before training."""
    n, k = len(syn), syn.info.num_classes
    if teachers is not None:
        return "teachers", torch.empty(0)
    logits = syn.meta.get("logits") if isinstance(syn.meta, dict) else None
    if isinstance(logits, torch.Tensor):
        if tuple(logits.shape) != (n, k):
            raise ValueError(f"synthetic set meta['logits'] has shape {tuple(logits.shape)}: expected ({n}, {k})")
        return "logits", logits.detach().float()
    if config.loss == "mse_gt":
        raise ValueError("loss='mse_gt' regresses teacher logits: the synthetic set stores none (meta['logits']); "
                         "pass teachers=[...] or use loss='kl'")
    if syn.soft:
        probs = syn.labels.detach().float()
        sums = probs.sum(1)
        if (probs < 0).any() or not torch.allclose(sums, torch.ones_like(sums), atol=1e-3):
            raise ValueError("soft labels must be probability rows (non-negative, summing to 1)")
        return "probs", probs
    return "probs", F.one_hot(syn.labels, k).float()


def _kl_at_temperature(student: torch.Tensor, teacher_log: torch.Tensor, tau: float) -> torch.Tensor:
    """KL(softmax(t/τ) ‖ softmax(s/τ)), batch mean; ``teacher_log`` are logits or log-probabilities."""
    target = F.softmax(teacher_log / tau, dim=1)
    return F.kl_div(F.log_softmax(student / tau, dim=1), target, reduction="batchmean")


def evaluate_edc(syn, test: ImageDataset, config: EDCEvalConfig | None = None, *,
                 teachers: Sequence[nn.Module] | None = None,
                 on_model: Callable[[int, float], None] | None = None,
                 on_epoch: Callable[[int, int], None] | None = None) -> EvalResult:
    """Train ``config.num_models`` fresh students on ``syn`` with the EDC protocol; test their EMA weights.

    Returns raydd.evaluation.EvalResult: ``accuracies`` are the final EMA-model test accuracies;
    ``extra['raw_accuracies']`` those of the raw (non-EMA) weights, for reference.
    """
    config = config or EDCEvalConfig()
    info = syn.info
    t = test.info
    if (t.channels, tuple(t.resolution), t.num_classes) != (info.channels, tuple(info.resolution), info.num_classes):
        raise ValueError(f"synthetic set ({info.name}: {info.channels}ch, {tuple(info.resolution)}, "
                         f"{info.num_classes} classes) does not match the test set ({t.name}: {t.channels}ch, "
                         f"{tuple(t.resolution)}, {t.num_classes} classes)")
    if config.teachers and teachers is None:
        raise ValueError("EDCEvalConfig.teachers=True relabels with teacher models, but none were given: pass "
                         "teachers=[...] (e.g. EDC.observer_models()), or evaluate through a method that has them")
    if teachers is not None:
        teachers = list(teachers)
        if not teachers or not all(isinstance(m, nn.Module) for m in teachers):
            raise ValueError("teachers must be a non-empty list of torch modules (e.g. EDC.observer_models())")
    source, targets = _stored_targets(syn, config, teachers)
    zca = syn.zca_whitening()
    if config.randaugment and zca is not None:
        raise ValueError("EDCEvalConfig.randaugment=True augments pixels: the synthetic set is ZCA-whitened; "
                         "set randaugment=false")
    device = resolve_device(config.device)
    spec = config.model_spec(info)
    if zca is not None:
        test = zca.whiten(test)
    images = syn.images.detach().float()
    hard = syn.hard_labels
    targets = targets.to(device)
    if teachers is not None:
        teachers = [m.to(device).eval() for m in teachers]
    augment = _augmenter(config, info)
    mixed = autocast(config.precision, device)
    started = time.perf_counter()
    accs, raw_accs, train_accs = [], [], []
    for m in range(config.num_models):
        net, gen = fresh_network(spec, config.seed + m, device)
        opt = torch.optim.AdamW(decay_groups(net, config.weight_decay_on), lr=config.lr,
                                weight_decay=config.weight_decay)
        ema = ModelEMA(net, config.ema_decay)
        correct = seen = 0
        for epoch in range(config.epochs):
            for group in opt.param_groups:  # per-epoch schedule (i = epoch, N = epochs)
                group["lr"] = config.lr * config.lr_factor(epoch)
            correct = seen = 0
            net.train()
            for idx in minibatches(len(images), config.batch_size, gen):
                x = images[idx].to(device)
                if augment is not None:
                    x = augment(x, gen)
                if config.cutmix_alpha > 0:  # the teachers relabel the mixed batch; CE keeps the base labels
                    x = paste_cutmix(x, draw_cutmix(len(x), *x.shape[-2:], config.cutmix_alpha, gen))
                y = hard[idx].to(device)
                with mixed:
                    if teachers is not None:
                        with torch.no_grad():
                            teacher = torch.stack([tm(x) for tm in teachers]).mean(0)
                    elif source == "probs":
                        teacher = targets[idx.to(device)].clamp_min(1e-30).log()
                    else:
                        teacher = targets[idx.to(device)]
                    out = net(x)
                    if config.loss == "kl":
                        loss = _kl_at_temperature(out, teacher, config.temperature)
                    else:
                        loss = F.mse_loss(out, teacher) + config.ce_weight * F.cross_entropy(out, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                ema.update(net)
                correct += int((out.argmax(1) == y).sum())
                seen += len(idx)
            if on_epoch is not None:
                on_epoch(m, epoch)
        acc = evaluate_model(ema.model(net), test.images, test.labels, device=device, precision=config.precision).acc
        raw_accs.append(evaluate_model(net, test.images, test.labels, device=device, precision=config.precision).acc)
        accs.append(acc)
        train_accs.append(correct / max(seen, 1))
        if on_model is not None:
            on_model(m, acc)
    std = statistics.pstdev(accs) if len(accs) > 1 else 0.0
    return EvalResult(accs, train_accs, statistics.fmean(accs), std, config.lr, spec.to_dict(), config.to_dict(),
                      time.perf_counter() - started,
                      extra={"protocol": "edc", "tested": "ema", "raw_accuracies": raw_accs, "label_source": source,
                             "method": syn.method, "iteration": syn.iteration,
                             "ipc": len(syn) // info.num_classes, "zca": zca is not None})


def decay_groups(net: nn.Module, decayed: str) -> list[dict]:
    """AdamW parameter groups: with 'weights', weight decay on parameters named ``weight`` with more than
    one dimension (convolution kernels, linear matrices), none on biases and normalisation scales (EDC's
    train/utils.py ``get_parameters``); with 'all', one group."""
    if decayed == "all":
        return [{"params": list(net.parameters())}]
    decay, rest = [], []
    for name, p in net.named_parameters():
        (decay if "weight" in name and p.dim() > 1 else rest).append(p)
    return [{"params": decay}, {"params": rest, "weight_decay": 0.0}]


def rand_augment(x: torch.Tensor, generator: torch.Generator, info: DatasetInfo, ops: int,
                 magnitude: int) -> torch.Tensor:
    """torchvision's RandAugment(ops, magnitude) on each normalised image of ``x``: undone to 8-bit pixels
    (as the code's PIL images), augmented, normalised again. Its draws (global RNG) are seeded from
    ``generator`` inside a forked RNG, so a run is a function of its seed."""
    from torchvision.transforms import RandAugment

    mean = torch.tensor(info.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(info.std, device=x.device).view(1, -1, 1, 1)
    pixels = ((x * std + mean).clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    op = RandAugment(num_ops=ops, magnitude=magnitude)
    seed = int(torch.randint(2 ** 62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = torch.stack([op(image) for image in pixels])
    return (out.to(x.device).float() / 255 - mean) / std


def _augmenter(config: EDCEvalConfig, info: DatasetInfo):
    """The batch augmentation (None: none): RandAugment (``randaugment``), then the crop/DSA of ``augment``."""
    if config.augment == "dsa":
        dsa = make_dsa(flip_ok=info.flip_ok)
        geometric = lambda x, g: dsa(x, generator=g)  # noqa: E731
    elif config.augment == "rrc":
        scale = (config.crop_scale_min, 1.0)
        geometric = lambda x, g: apply_affine(  # noqa: E731
            x, random_resized_crop_params(len(x), g, scale=scale, flip=info.flip_ok))
    else:
        geometric = None
    if not config.randaugment:
        return geometric

    def augment(x, g):
        x = rand_augment(x, g, info, config.randaugment_ops, config.randaugment_magnitude)
        return x if geometric is None else geometric(x, g)
    return augment
