"""Training recipes: plain torch functions that train one network and emit snapshots.

A recipe never touches Ray or the store directly: it receives the data, the model
spec, a seed, and a ``sink`` with ``append(epoch, params, buffers=, metrics=)``
(the store's TrajectoryWriter in production, a list in tests).

Registered recipes (later issues add more with ``register_recipe``):
- ``expert``   MTT/DATM experts: SGD lr 0.01, momentum 0, no weight decay, batch
  256, DSA on, no LR decay; a snapshot before training and after every epoch.
- ``pretrain`` DANCE/PTLM experts: SGD lr 0.01, momentum 0.9, wd 5e-4, batch 64,
  MultiStep x0.2 at 2E/3 and 5E/6, DSA (no cutout) + CutMix p=0.5; keeps the
  initial and final weights only.
- ``observer`` EDC observers: BatchNorm models, SGD momentum 0.9, wd 5e-4, cosine
  LR; keeps the final weights and BN running statistics only.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from torch import nn

from ..data.datasets import ImageDataset
from ..data.augment import DSA_STRATEGY, DSAConfig, make_dsa
from ..models import ModelSpec, build_model, flatten_buffers, flatten_params, load_flat_params
from ..graphs import GraphTrainer
from ..training import ENGINES, PRECISIONS, NetworkStack, evaluate_together, train_epoch_together
from ..overrides import check_annotations
from ..validation import check_int, check_range

METRIC_NAMES = ("train_loss", "train_acc", "test_loss", "test_acc", "lr")


class SnapshotSink(Protocol):
    def append(self, epoch: int, params: torch.Tensor, *, buffers: torch.Tensor | None = None,
               metrics: dict[str, float] | None = None) -> None: ...


@dataclass
class RecipeContext:
    """What a recipe trains on. ``on_epoch(epoch, total_epochs, metrics)`` reports progress."""

    train: ImageDataset
    test: ImageDataset
    model: ModelSpec
    seed: int
    device: torch.device = torch.device("cpu")
    on_epoch: Callable[[int, int, dict], None] | None = None
    store_root: str | None = None  # the farm's store, for recipes that read other trajectories (SSD students)
    precision: str = "fp32"  # forward/loss arithmetic (raydd.training.PRECISIONS): FarmSpec.precision
    engine: str = "eager"  # how training steps run (raydd.training.ENGINES): FarmSpec.engine
    # Extending a stored trajectory (prefix-exact recipes): its last epoch and the training state after it
    # (``ResumePoint``); training continues from there. None: from the start.
    resume_from: "ResumePoint | None" = None
    derived: Any = None  # Recipe.derive's value for this task (None: nothing derived, or run called directly)


@dataclass(frozen=True)
class ResumePoint:
    """Where a network's training stopped: the epoch and what the next epoch needs — its float32 parameters and
    buffers, its generator state, its optimiser's momentum buffers (flat, parameter layout order; None: none)."""

    epoch: int
    params: torch.Tensor
    buffers: torch.Tensor | None
    generator: torch.Tensor
    momentum: torch.Tensor | None = None


@dataclass(frozen=True)
class TrainingConfig:
    """Fields shared by the recipes. Subclasses set the paper defaults."""

    epochs: int = 50
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 256
    dsa: bool = True
    dsa_strategy: str = DSA_STRATEGY
    eval_every: int = 1  # test-set evaluation every k epochs (and always after the last)

    def __post_init__(self) -> None:
        check_annotations(self)  # a bool is a bool (dsa=False), an int is accepted for a float
        for key in ("epochs", "batch_size", "eval_every"):
            check_int(key, getattr(self, key))
        check_range("lr", self.lr, low=0, low_open=True)
        check_range("momentum", self.momentum, low=0, high=1, high_open=True)
        check_range("weight_decay", self.weight_decay, low=0)
        DSAConfig(strategy=self.dsa_strategy)  # validates the strategy string

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ExpertConfig(TrainingConfig):
    """MTT buffer.py defaults (lr_teacher 0.01, mom 0, l2 0, batch_train 256, DSA, E epochs)."""

    epochs: int = 50
    keep_epochs: int | None = None  # store snapshots 0..keep_epochs (plus the final one); None keeps all

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("keep_epochs", self.keep_epochs, low=0, none_ok=True)


@dataclass(frozen=True)
class PretrainConfig(TrainingConfig):
    """DANCE pretrain.py defaults."""

    epochs: int = 60
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    dsa_strategy: str = "color_crop_flip_scale_rotate"  # cutout is replaced by CutMix
    milestones: tuple[float, ...] = (2 / 3, 5 / 6)  # fractions of epochs
    gamma: float = 0.2
    cutmix_prob: float = 0.5
    cutmix_beta: float = 1.0
    eval_every: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        for i, m in enumerate(self.milestones):
            check_range(f"milestones[{i}]", m, low=0, high=1, low_open=True)
        check_range("cutmix_prob", self.cutmix_prob, low=0, high=1)


@dataclass(frozen=True)
class ObserverConfig(TrainingConfig):
    """EDC observers: briefly trained BatchNorm networks (cosine LR)."""

    epochs: int = 30
    momentum: float = 0.9
    weight_decay: float = 5e-4
    eval_every: int = 5


def _build(ctx: RecipeContext) -> nn.Module:
    """The network for this seed: initialisation depends on the seed only (local RNG fork)."""
    if ctx.model.channels != ctx.train.info.channels or ctx.model.num_classes != ctx.train.info.num_classes \
            or tuple(ctx.model.resolution) != tuple(ctx.train.info.resolution):
        raise ValueError(f"model spec {ctx.model.name} ({ctx.model.channels}ch, {ctx.model.resolution}, "
                         f"{ctx.model.num_classes} classes) does not fit dataset {ctx.train.info.name} "
                         f"({ctx.train.info.channels}ch, {ctx.train.info.resolution}, "
                         f"{ctx.train.info.num_classes} classes)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.seed)
        return build_model(ctx.model).to(ctx.device)


def _dsa(cfg: TrainingConfig, ctx: RecipeContext):
    return make_dsa(cfg.dsa_strategy, flip_ok=ctx.train.info.flip_ok) if cfg.dsa else None


def _snapshot(sink: SnapshotSink, net: nn.Module, epoch: int, metrics: dict[str, float]) -> None:
    buffers = flatten_buffers(net)
    sink.append(epoch, flatten_params(net).cpu(), buffers=buffers.cpu() if buffers.numel() else None,
                metrics=metrics)


def _fit(cfg: TrainingConfig, ctxs: list[RecipeContext], sinks: list[SnapshotSink], *, keep: Callable[[int], bool],
         optimizer_for: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
         scheduler_for: Callable[[torch.optim.Optimizer], Any] | None = None,
         cutmix_prob: float = 0.0, cutmix_beta: float = 1.0, resumable: bool = False,
         epoch_indices: Callable[[int], torch.Tensor] | None = None) -> list[dict[str, float]]:
    """Train one network per context (each from its own seed), snapshots to its own sink. Several contexts
    are trained as one computation (a ``NetworkStack``: the farm's ``pack``), each network keeping the
    initialisation, batch order and augmentation it has when trained alone. Contexts with a ``resume_from``
    (all or none; at one epoch) continue a stored trajectory; ``resumable`` hands each sink the training state
    after the last epoch (``keep_resume_state``), from which it can be extended later. ``epoch_indices(epoch)``
    (eager engine only) names the training images epoch ``epoch`` (1-based) trains on: a curriculum (PAD)."""
    nets = [_build(ctx) for ctx in ctxs]
    gens = [torch.Generator().manual_seed(ctx.seed) for ctx in ctxs]
    ctx0 = ctxs[0]
    resumes = [ctx.resume_from for ctx in ctxs]
    start_epoch = _resume_networks(nets, gens, resumes)
    dsa = _dsa(cfg, ctx0)
    stack = NetworkStack(nets)  # one network alone is trained as itself
    optimizer = optimizer_for(stack.parameters())
    if start_epoch:
        _load_momentum(stack, optimizer, [r.momentum for r in resumes])
    scheduler = scheduler_for(optimizer) if scheduler_for else None
    nan = float("nan")
    metrics = [{"train_loss": nan, "train_acc": nan, "test_loss": nan, "test_acc": nan, "lr": cfg.lr} for _ in nets]
    if keep(0) and not start_epoch:
        for sink, net, m in zip(sinks, nets, metrics):
            _snapshot(sink, net, 0, m)
    images, labels = ctx0.train.images, ctx0.train.labels
    if epoch_indices is not None and ctx0.engine == "graph":
        raise ValueError("a per-epoch training subset (a curriculum) runs on engine='eager' only")
    if ctx0.engine == "graph":  # the same epochs from pre-drawn randomness, as CUDA graphs on CUDA (raydd.graphs)
        trainer = GraphTrainer(stack, optimizer, images, labels, batch_size=cfg.batch_size, generators=gens,
                               device=ctx0.device, dsa=dsa, cutmix_prob=cutmix_prob, cutmix_beta=cutmix_beta,
                               precision=ctx0.precision)
        train_one_epoch = trainer.epoch
    else:
        augment = (lambda x, g: dsa(x, generator=g)) if dsa is not None else None

        def train_one_epoch():
            x, y = (images, labels) if epoch_indices is None else (images[subset], labels[subset])
            return train_epoch_together(stack, optimizer, x, y, batch_size=cfg.batch_size,
                                        generators=gens, device=ctx0.device, augment=augment,
                                        cutmix_prob=cutmix_prob, cutmix_beta=cutmix_beta, precision=ctx0.precision)
    subset = None
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        lr = optimizer.param_groups[0]["lr"]
        if epoch_indices is not None:
            subset = epoch_indices(epoch)
        train_stats = train_one_epoch()
        if scheduler is not None:
            scheduler.step()
        metrics = [{"train_loss": st.loss, "train_acc": st.acc, "test_loss": nan, "test_acc": nan, "lr": lr}
                   for st in train_stats]
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            tests = evaluate_together(stack, ctx0.test.images, ctx0.test.labels, device=ctx0.device,
                                      precision=ctx0.precision)
            for m, test in zip(metrics, tests):
                m.update(test_loss=test.loss, test_acc=test.acc)
        if keep(epoch) or epoch == cfg.epochs:
            stack.write_back()
            for sink, net, m in zip(sinks, nets, metrics):
                _snapshot(sink, net, epoch, m)
        for ctx, m in zip(ctxs, metrics):
            if ctx.on_epoch is not None:
                ctx.on_epoch(epoch, cfg.epochs, m)
    if resumable:
        stack.write_back()
        for sink, net, gen, momentum in zip(sinks, nets, gens, _momentum(stack, optimizer)):
            keep_state = getattr(sink, "keep_resume_state", None)  # the store's writers (lists in tests: none)
            if keep_state is not None:
                state = {"generator": gen.get_state(), "params": flatten_params(net)}
                if momentum is not None:
                    state["momentum"] = momentum
                keep_state(state)
    return metrics


def _resume_networks(nets: list[nn.Module], gens: list[torch.Generator], resumes: list) -> int:
    """Load each network's resume point (parameters, buffers, generator); the epoch they continue after (0:
    none, trained from the start)."""
    if all(r is None for r in resumes):
        return 0
    epochs = {None if r is None else r.epoch for r in resumes}
    if len(epochs) != 1:
        raise ValueError(f"networks trained together continue from one epoch: got {sorted(map(str, epochs))}")
    for net, gen, r in zip(nets, gens, resumes):
        load_flat_params(net, r.params.to(next(net.parameters()).device),
                         None if r.buffers is None else r.buffers.to(next(net.parameters()).device))
        gen.set_state(r.generator)
    return epochs.pop()


def _stacked_parameters(stack: NetworkStack) -> list[tuple[torch.Tensor, int | None]]:
    """(optimised tensor, slice of network i or None) per parameter of each network, in layout order."""
    if stack.single is not None:
        return [[(p, None) for p in stack.single.parameters()]]
    return [[(stack.params[name], i) for name, _ in net.named_parameters()] for i, net in enumerate(stack.networks)]


def _momentum(stack: NetworkStack, optimizer: torch.optim.Optimizer) -> list[torch.Tensor | None]:
    """Each network's momentum buffers, flat in parameter layout order (None where the optimiser keeps none)."""
    out = []
    for params in _stacked_parameters(stack):
        bufs = [optimizer.state.get(p, {}).get("momentum_buffer") for p, _ in params]
        if any(b is None for b in bufs):
            out.append(None)
            continue
        out.append(torch.cat([(b if i is None else b[i]).detach().reshape(-1) for b, (_, i) in zip(bufs, params)]))
    return out


def _load_momentum(stack: NetworkStack, optimizer: torch.optim.Optimizer, momenta: list[torch.Tensor | None]) -> None:
    """Set the optimiser's momentum buffers from each network's flat ones (``_momentum``'s inverse)."""
    if all(m is None for m in momenta):
        return
    if any(m is None for m in momenta):
        raise ValueError("networks trained together continue with momentum buffers for all of them or none")
    per_network = _stacked_parameters(stack)
    for net_params, flat in zip(per_network, momenta):
        offset = 0
        for p, i in net_params:
            size = p[0].numel() if i is not None else p.numel()
            shape = p.shape[1:] if i is not None else p.shape
            chunk = flat[offset:offset + size].view(shape).to(p.device)
            offset += size
            state = optimizer.state[p]
            if i is None:
                state["momentum_buffer"] = chunk.clone()
            else:
                state.setdefault("momentum_buffer", torch.zeros_like(p))[i].copy_(chunk)


def _sgd(cfg: TrainingConfig) -> Callable[[list[torch.Tensor]], torch.optim.Optimizer]:
    return lambda params: torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def run_expert(cfg: ExpertConfig, ctx: RecipeContext | list[RecipeContext], sink: SnapshotSink | list[SnapshotSink]):
    """One expert (``ctx``, ``sink``) -> its final metrics; a list of contexts and sinks -> a list of metrics
    (the experts trained together). So do ``run_pretrain`` and ``run_observer``."""
    keep_to = cfg.epochs if cfg.keep_epochs is None else cfg.keep_epochs
    return _one_or_many(ctx, sink, lambda ctxs, sinks: _fit(cfg, ctxs, sinks, keep=lambda e: e <= keep_to,
                                                            optimizer_for=_sgd(cfg), resumable=True))


def run_pretrain(cfg: PretrainConfig, ctx, sink):
    milestones = sorted({max(1, math.floor(m * cfg.epochs)) for m in cfg.milestones})
    return _one_or_many(ctx, sink, lambda ctxs, sinks: _fit(
        cfg, ctxs, sinks, keep=lambda e: e == 0, optimizer_for=_sgd(cfg),
        scheduler_for=lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=cfg.gamma),
        cutmix_prob=cfg.cutmix_prob, cutmix_beta=cfg.cutmix_beta))


def run_observer(cfg: ObserverConfig, ctx, sink):
    first = ctx[0] if isinstance(ctx, list) else ctx
    if first.model.norm != "batch":
        raise ValueError(f"observer recipe needs a BatchNorm model (EDC matches BN statistics): "
                         f"got norm={first.model.norm!r}; use --norm batch")
    return _one_or_many(ctx, sink, lambda ctxs, sinks: _fit(
        cfg, ctxs, sinks, keep=lambda e: False, optimizer_for=_sgd(cfg),
        scheduler_for=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)))


def _one_or_many(ctx, sink, fit):
    if isinstance(ctx, list):
        if not isinstance(sink, list) or len(sink) != len(ctx) or not ctx:
            raise ValueError("training together takes one sink per context")
        return fit(ctx, sink)
    return fit([ctx], [sink])[0]


@dataclass(frozen=True)
class Recipe:
    name: str
    kind: str  # the store's trajectory kind
    config_cls: type
    run: Callable[[Any, RecipeContext, SnapshotSink], dict[str, float]]
    default_norm: str = "instance"
    metric_names: tuple[str, ...] = METRIC_NAMES
    # Whether ``run`` also takes lists of contexts and sinks and trains those networks as one computation
    # (the farm's ``pack``): the recipes built on ``_fit``.
    trains_together: bool = False
    # Whether a trajectory of E epochs is exactly the first E epochs of a longer one of the same seed (no schedule
    # that depends on the epoch count; the generator continues across epochs): a need for epochs 0..k is then
    # served by any longer trajectory of the same lineage, and a stored one is extended instead of re-trained
    # (its files hold the training state after their last epoch). Recipes with a decaying schedule farm whole.
    prefix_exact: bool = False
    # Optional: resolve store-dependent config values (e.g. an SSD student's teacher="auto" -> a concrete
    # trajectory id, PAD's scorers="auto" -> expert ids) before the trajectory id is hashed:
    # prepare(config, store_root, dataset, model) -> config.
    prepare: Callable[[Any, str, dict], Any] | None = None
    # Optional: what the recipe computes from the data once per task, before training (PAD's difficulty ranking):
    # derive(config, RecipeContext) -> (value, metadata); the value reaches ``run`` as RecipeContext.derived, the
    # metadata (JSON values) is stored with each trajectory.
    derive: Callable[[Any, RecipeContext], tuple[Any, dict]] | None = None
    # The FarmSpec.precision values ``run`` honours (RecipeContext.precision): all of them for the recipes
    # built on ``_fit``; fp32 alone for a recipe with its own loops until those take it.
    precisions: tuple[str, ...] = ("fp32",)
    # The FarmSpec.engine values ``run`` honours (RecipeContext.engine): both for the recipes built on ``_fit``.
    engines: tuple[str, ...] = ("eager",)

    def make_config(self, overrides: dict[str, Any] | None = None):
        """The recipe's config with paper defaults, overridden by ``overrides`` (unknown keys are an error)."""
        overrides = dict(overrides or {})
        known = {f.name for f in dataclasses.fields(self.config_cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown {self.name} recipe option(s) {unknown}: accepted {sorted(known)}")
        return self.config_cls(**overrides)  # annotations enforced (a JSON list is read as a tuple)


RECIPES: dict[str, Recipe] = {}


def register_recipe(recipe: Recipe) -> Recipe:
    if recipe.name in RECIPES and RECIPES[recipe.name] != recipe:
        raise ValueError(f"recipe {recipe.name!r} is already registered")
    RECIPES[recipe.name] = recipe
    return recipe


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}: accepted {', '.join(sorted(RECIPES))}")
    return RECIPES[name]


def recipe_for_kind(kind: str) -> str:
    """The registered recipe that writes store kind ``kind``."""
    for name, recipe in RECIPES.items():
        if recipe.kind == kind:
            return name
    raise ValueError(f"no farm recipe writes store kind {kind!r}: known kinds "
                     f"{', '.join(sorted({r.kind for r in RECIPES.values()}))}")


register_recipe(Recipe("expert", "expert", ExpertConfig, run_expert, trains_together=True, precisions=PRECISIONS,
                       engines=ENGINES, prefix_exact=True))
register_recipe(Recipe("pretrain", "pretrain", PretrainConfig, run_pretrain, trains_together=True,
                       precisions=PRECISIONS, engines=ENGINES))
register_recipe(Recipe("observer", "observer", ObserverConfig, run_observer, default_norm="batch",
                       trains_together=True, precisions=PRECISIONS, engines=ENGINES))
