"""Evaluation protocols: train fresh networks on a (synthetic) set, test on real data.

Standard protocol (DC/DSA/DM/MTT papers; their code's ``evaluate_synset``): N fresh networks (seeds
seed..seed+N-1), SGD (momentum 0.9, weight decay 5e-4), batch 256, DSA on, E + 1 passes over the set for
E epochs (``for ep in range(Epoch+1)``), and after pass E//2 + 1 the lr ×0.1 with a fresh optimiser (momentum
restarts); lr is the synthetic set's learned step size when it has one (trajectory matching), else 0.01.
The same schedule, batch orders, augmentation draws and initialisation give the same network as
mtt-distillation's evaluate_synset (benchmarks/reference_equivalence.py --protocols standard).
Soft labels (probability rows) are learned with soft cross-entropy. The reported number
is the mean ± std over networks of the FINAL test accuracy (never the best checkpoint).
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..data.augment import DSA_STRATEGY, DSAConfig, make_dsa
from ..data.datasets import DatasetInfo, ImageDataset
from ..models import ARCHITECTURES, ModelSpec, build_model
from ..models.spec import fields_from_name
from ..graphs import GraphTrainer
from ..training import (ENGINES, NetworkStack, check_precision, evaluate_together, resolve_device,
                        train_epoch_together)
from ..validation import check_bool, check_choice, check_int, check_range

DEFAULT_LR = 0.01


@dataclass(frozen=True)
class EvalConfig:
    """How to evaluate. ``model`` is an architecture name ('convnet', 'resnet10', 'resnet18')
    or a dict of ModelSpec fields (e.g. ``{"arch": "convnet", "width": 32, "depth": 2}``);
    channels, resolution and class count always come from the data."""

    model: str | dict = "convnet"
    num_models: int = 5
    epochs: int = 300
    batch_size: int = 256
    lr: float | None = None  # None: the synthetic set's syn_lr if it has one, else 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    dsa: bool = True
    dsa_strategy: str = DSA_STRATEGY  # flip dropped where the dataset forbids it
    dsa_single_per_call: bool = True  # reference aug_mode 'S' (one op per batch, the standard); False: 'M', every op
    # scale/rotate sampling grid: DSA's code (DC/DSA/DM's evaluate_synset) False; MTT's and DATM's utils.py True (one
    # map on square images up to rounding; with True raydd's networks equal MTT's evaluate_synset bit for bit)
    dsa_align_corners: bool = False
    # lr ×0.1 after pass ⌊epochs·lr_decay_at⌋ + 1 (0-based; the references' lr_schedule = [Epoch//2 + 1] at 0.5);
    # None: constant lr
    lr_decay_at: float | None = 0.5
    decay_resets_momentum: bool = True  # the references build a fresh SGD optimiser at the decay; False: keep it
    extra_pass: bool = True  # the references train epochs + 1 passes (range(Epoch + 1)); False: exactly epochs
    device: str = "auto"
    seed: int = 0
    # Train the num_models networks as one vmapped computation (same seeds, batch orders, augmentation
    # draws and results, to float tolerance, as one by one). None: on CUDA for sets of at most one image
    # per class only — where it was measured to pay (H200: 1.75x at Fashion-MNIST IPC 1, 0.83-0.93x at
    # IPC 10/50; CPU: slower beyond digits IPC 1, the grouped convolutions underneath cost more than
    # separate ones; benchmarks/eval_together.py).
    together: bool | None = None
    # Forward/loss arithmetic of the networks' training and test (raydd.training.PRECISIONS): fp32, or bf16
    # autocast (parameters and optimizer state stay float32).
    precision: str = "fp32"
    # How the networks' training steps run (raydd.training.ENGINES): eager, or graph (pre-drawn randomness, the
    # set on the device, CUDA graphs on CUDA: raydd.graphs; the same networks).
    engine: str = "eager"

    def __post_init__(self) -> None:
        check_eval_model("EvalConfig", self.model)
        for key in ("num_models", "epochs", "batch_size"):
            check_int(f"EvalConfig.{key}", getattr(self, key))
        check_range("EvalConfig.lr", self.lr, low=0, low_open=True, none_ok=True)
        check_range("EvalConfig.momentum", self.momentum, low=0, high=1, high_open=True)
        check_range("EvalConfig.weight_decay", self.weight_decay, low=0)
        check_range("EvalConfig.lr_decay_at", self.lr_decay_at, low=0, high=1, low_open=True, none_ok=True)
        check_bool("EvalConfig.decay_resets_momentum", self.decay_resets_momentum,
                   "True: a fresh optimiser at the decay (the references), False: momentum kept")
        check_bool("EvalConfig.extra_pass", self.extra_pass,
                   "True: epochs + 1 passes (the references' range(Epoch + 1)), False: exactly epochs")
        check_bool("EvalConfig.dsa_single_per_call", self.dsa_single_per_call,
                   "True: one DSA op per batch, False: every op")
        DSAConfig(strategy=self.dsa_strategy, single_per_call=self.dsa_single_per_call,
                  align_corners=self.dsa_align_corners)
        check_int("EvalConfig.seed", self.seed, low=0)
        if self.together is not None:
            check_bool("EvalConfig.together", self.together, "True: networks trained as one computation, "
                       "False: one by one; or null: together on CUDA at IPC 1 only")
        check_precision("EvalConfig.precision", self.precision)
        check_choice("EvalConfig.engine", self.engine, ENGINES)

    @classmethod
    def defaults(cls, dataset: str, **overrides: Any) -> "EvalConfig":
        """The standard protocol is the same for every dataset: the fields' defaults with ``overrides``."""
        return cls(**overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def passes(self) -> int:
        """Passes over the set each network trains: ``epochs``, plus the references' extra one."""
        return self.epochs + (1 if self.extra_pass else 0)

    @property
    def decay_after(self) -> int | None:
        """The pass (0-based) after which the lr drops ×0.1; None: never."""
        return None if self.lr_decay_at is None else int(self.epochs * self.lr_decay_at) + 1

    def model_spec(self, info: DatasetInfo) -> ModelSpec:
        """The network for data described by ``info`` (cross-architecture: any arch, same data shape)."""
        return eval_model_spec(self.model, info)


def check_eval_model(owner: str, model: str | dict) -> None:
    """An evaluation config's ``model``: an architecture name or a dict of ModelSpec fields (one-line errors)."""
    if isinstance(model, str):
        try:
            named_model_fields(model)
        except ValueError:
            raise ValueError(f"unknown evaluation model {model!r}: accepted {', '.join(ARCHITECTURES)}, a model "
                             f"name such as resnet18-bn or convnet3-w128-in, or a dict of ModelSpec fields") from None
    elif isinstance(model, dict):
        _model_overrides(model)
    else:
        raise ValueError(f"{owner}.model={model!r} is invalid: expected an architecture name or a dict")


def eval_model_spec(model: str | dict, info: DatasetInfo) -> ModelSpec:
    """The evaluation network ``model`` (name or ModelSpec fields) for data described by ``info``."""
    fields = named_model_fields(model) if isinstance(model, str) else _model_overrides(model)
    return ModelSpec(**{**fields, "channels": info.channels, "resolution": tuple(info.resolution),
                        "num_classes": info.num_classes})


def named_model_fields(model: str) -> dict:
    """An architecture (its defaults) or a ModelSpec name (``resnet18-bn``: the fields the name fixes)."""
    return {"arch": model} if model in ARCHITECTURES else fields_from_name(model)


def _model_overrides(model: dict) -> dict:
    data_fields = {"channels", "resolution", "num_classes"}
    known = set(ModelSpec.__dataclass_fields__) - data_fields
    unknown = sorted(set(model) - known - {"name"})
    if unknown:
        raise ValueError(f"unknown evaluation model option(s) {unknown}: accepted {sorted(known)}")
    return {k: v for k, v in model.items() if k in known}


@dataclass
class EvalResult:
    """Per-network final test accuracies and their mean ± std (population std, as the references)."""

    accuracies: list[float]  # final test accuracy of each network
    train_accuracies: list[float]
    mean: float
    std: float
    lr: float
    model: dict
    config: dict
    wall_time_s: float
    extra: dict = field(default_factory=dict)

    @property
    def final_test_acc(self) -> list[float]:
        return self.accuracies

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return (f"{self.model.get('name', '?')}: {100 * self.mean:.2f} ± {100 * self.std:.2f} % "
                f"(final test accuracy, {len(self.accuracies)} networks, lr {self.lr:g})")


def fresh_network(spec: ModelSpec, seed: int, device: torch.device) -> tuple[nn.Module, torch.Generator]:
    """An evaluation network initialised from ``seed`` alone (the global RNG is restored) and its own
    generator for batch order and augmentation, seeded alike: network i of a protocol uses seed + i."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net: nn.Module = build_model(spec).to(device)
    return net, torch.Generator().manual_seed(seed)


def train_and_test(images: torch.Tensor, labels: torch.Tensor, test: ImageDataset, info: DatasetInfo,
                   config: EvalConfig, *, lr: float,
                   on_model: Callable[[int, float], None] | None = None,
                   on_epoch: Callable[[int, int], None] | None = None) -> EvalResult:
    """The protocol on any labelled tensor set (synthetic or real), tested on ``test``.

    ``on_model(i, acc)`` after each network, ``on_epoch(i, epoch)`` after each of its epochs (progress)."""
    device = resolve_device(config.device)
    spec = config.model_spec(info)
    dsa = None
    if config.dsa:
        dsa = make_dsa(config.dsa_strategy, flip_ok=info.flip_ok, single_per_call=config.dsa_single_per_call,
                       align_corners=config.dsa_align_corners)
    together = networks_together(config, device, len(labels), info.num_classes)
    seeds = [config.seed + i for i in range(config.num_models)]
    groups = [seeds] if together else [[seed] for seed in seeds]  # a group trains as one NetworkStack
    started = time.perf_counter()
    accs, train_accs = [], []
    for group in groups:
        group_accs, group_train = _train_group(group, images, labels, test, spec, config, lr=lr, device=device,
                                               dsa=dsa,
                                               on_epoch=on_epoch, first_index=len(accs))
        for acc in group_accs:
            if on_model is not None:
                on_model(len(accs), acc)
            accs.append(acc)
        train_accs.extend(group_train)
    std = statistics.pstdev(accs) if len(accs) > 1 else 0.0
    return EvalResult(accs, train_accs, statistics.fmean(accs), std, lr, spec.to_dict(), config.to_dict(),
                      time.perf_counter() - started, extra={"networks_together": len(groups[0]) > 1})


def networks_together(config: EvalConfig, device: torch.device, n_images: int, num_classes: int) -> bool:
    """Whether the protocol trains its networks together: ``config.together``, or where unset (None) on CUDA
    for a set of at most one image per class — the case measured to pay (see ``EvalConfig.together``)."""
    if config.together is not None:
        return config.together
    return device.type == "cuda" and n_images <= num_classes


def _train_group(seeds, images, labels, test, spec, config, *, lr, device, dsa, on_epoch, first_index):
    """The networks of ``seeds`` (network i of the protocol: seed + i) trained together, one alone trained as
    itself; their final test and train accuracies."""
    nets, gens = zip(*(fresh_network(spec, seed, device) for seed in seeds))
    stack = NetworkStack(list(nets))
    opt = torch.optim.SGD(stack.parameters(), lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.engine == "graph":  # the same epochs from pre-drawn randomness, CUDA graphs on CUDA (raydd.graphs)
        train_one_epoch = GraphTrainer(stack, opt, images, labels, batch_size=config.batch_size, generators=list(gens),
                                       device=device, dsa=dsa, precision=config.precision).epoch
    else:
        augment = (lambda x, g: dsa(x, generator=g)) if dsa is not None else None

        def train_one_epoch():
            return train_epoch_together(stack, opt, images, labels, batch_size=config.batch_size,
                                        generators=list(gens), device=device, augment=augment,
                                        precision=config.precision)
    stats = None
    for epoch in range(config.passes):
        stats = train_one_epoch()
        if on_epoch is not None:
            for i in range(len(stack)):
                on_epoch(first_index + i, epoch)
        if epoch == config.decay_after:
            _decay(opt, lr * 0.1, reset_momentum=config.decay_resets_momentum)
    accs = [s.acc for s in evaluate_together(stack, test.images, test.labels, device=device,
                                             precision=config.precision)]
    return accs, [s.acc for s in stats]


def _decay(opt: torch.optim.Optimizer, lr: float, *, reset_momentum: bool) -> None:
    """The lr drop: ``lr`` from now on; ``reset_momentum``: as the references' fresh SGD optimiser, whose first
    step's momentum buffer is the gradient itself (buffers zeroed in place: 0.9·0 + g = g, bit for bit, and a
    CUDA graph that captured them stays valid)."""
    for group in opt.param_groups:
        group["lr"] = lr
    if reset_momentum:
        for state in opt.state.values():
            if state.get("momentum_buffer") is not None:
                state["momentum_buffer"].zero_()


def _check_compatible(info: DatasetInfo, test: ImageDataset, what: str) -> None:
    t = test.info
    shape = tuple(test.images.shape[1:])
    if (t.num_classes, shape) != (info.num_classes, (info.channels, *info.resolution)):
        raise ValueError(f"{what} ({info.name}: {info.channels}ch, {tuple(info.resolution)}, {info.num_classes} "
                         f"classes) does not match the test set ({t.name}: images {shape}, {t.num_classes} classes)")


def evaluate_synthetic(syn, test: ImageDataset, config: EvalConfig | None = None, *,
                       on_model: Callable[[int, float], None] | None = None,
                       on_epoch: Callable[[int, int], None] | None = None) -> EvalResult:
    """Train ``config.num_models`` fresh networks on the synthetic set, report their final test accuracy.

    ``test`` is the real test split in the dataset's normalisation; when the synthetic set
    lives in ZCA space, the test images are whitened with the set's own ZCA first.
    """
    config = config or EvalConfig()
    info = syn.info
    _check_compatible(info, test, "synthetic set")
    if config.lr is not None:
        lr = float(config.lr)
    elif syn.syn_lr is not None:
        lr = float(syn.syn_lr)
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"the synthetic set's learned step size is {lr}: pass an explicit lr (--lr)")
    else:
        lr = DEFAULT_LR
    labels = syn.labels
    if syn.soft:
        sums = labels.sum(1)
        if (labels < 0).any() or not torch.allclose(sums, torch.ones_like(sums), atol=1e-3):
            raise ValueError("soft labels must be probability rows (non-negative, summing to 1); "
                             "store softmax(logits) in the SyntheticSet")
        labels = labels.float()
    zca = syn.zca_whitening()
    if zca is not None:
        test = zca.whiten(test)
    result = train_and_test(syn.images.detach().float(), labels, test, info, config, lr=lr, on_model=on_model,
                            on_epoch=on_epoch)
    result.extra.update({"method": syn.method, "iteration": syn.iteration, "ipc": len(syn) // info.num_classes,
                         "zca": zca is not None})
    return result


def full_data(train: ImageDataset, test: ImageDataset, config: EvalConfig | None = None, *,
              on_model: Callable[[int, float], None] | None = None,
              on_epoch: Callable[[int, int], None] | None = None) -> EvalResult:
    """The same protocol trained on a real training set ("vs full data"); lr defaults to 0.01."""
    config = config or EvalConfig()
    _check_compatible(train.info, test, "training set")
    lr = float(config.lr) if config.lr is not None else DEFAULT_LR
    result = train_and_test(train.images, train.labels, test, train.info, config, lr=lr, on_model=on_model,
                            on_epoch=on_epoch)
    result.extra.update({"method": "full_data", "num_train": len(train)})
    return result
