"""SSD recipes: the semi-supervised teacher and the dual-consistency students.

SSD = "Semi-Supervised Dataset Condensation with Dual Consistency Trajectory Matching"
(shared/papers/000_...; cited below as [SSD]). The training set T = D^l ∪ D^u: a
class-balanced ``labelled_fraction`` of each class keeps its labels (D^l), the rest
is unlabelled (D^u) [SSD Sec. 4.1: "10% of the samples from each category"]. The
split is ``raydd.data.semisup.semi_supervised_split(labels, labelled_fraction,
split_seed)``; teacher and students must use the same one.

- ``ssd_teacher`` (kind "teacher") [SSD Sec. 3.2 "Teacher Model Training", Alg. 1
  line 1]: FixMatch (Sohn et al. 2020) on D^l ∪ D^u,
  L_pre = L_ce^s + λ_fix · L_fix^u with
  L_fix^u = mean_j 1[max p(α(x_j)) ≥ γ] · H(argmax p(α(x_j)), p(A(x_j))).
  The paper's teacher is a ResNet-18 [SSD Sec. 4.1]: farm it with ``--arch resnet18``
  (the farm's default arch is the ConvNet; this recipe's ``default_norm`` "batch"
  applies to whatever arch the spec chooses). Only the initial and the final weights
  (plus BatchNorm buffers) are stored.
- ``ssd_student`` (kind "student") [SSD Sec. 3.2 "Dual Consistency Training
  Trajectory", Alg. 1 line 2]: ConvNet students on all of T with
  L_ref = L_ce^s + λ_intra · L_intra^u + λ_inter · L_inter, snapshots after every
  epoch like the MTT experts; these are the trajectories SSD's MTT stage matches.

Where the paper is silent the FixMatch paper's values are used and marked as such.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from ..data.augment import DSA, StrongAugment, make_dsa
from ..data.semisup import SemiSupervisedSplit, semi_supervised_split
from ..models import ModelSpec, build_model, load_flat_params
from ..models.ema import ModelEMA
from ..store import TrajectoryStore
from ..training import evaluate_model, minibatches
from ..validation import check_bool, check_choice, check_int, check_range
from .recipes import (
    Recipe,
    RecipeContext,
    SnapshotSink,
    TrainingConfig,
    _build,
    _dsa,
    _snapshot,
    register_recipe,
)

TEACHER_RECIPE = "ssd_teacher"
STUDENT_RECIPE = "ssd_student"
TEACHER_METRICS = ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "mask_rate")
STUDENT_METRICS = ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "ce", "intra", "inter")
LR_SCHEDULES = ("cosine", "constant")

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


# ----------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class SSDTeacherConfig(TrainingConfig):
    """FixMatch teacher. [SSD] gives no teacher hyper-parameters beyond "ResNet18 ... trained
    on the entire dataset with FixMatch" (Sec. 4.1), so FixMatch's own values are the defaults."""

    # Not in [SSD] nor practical from FixMatch (2^20 steps); raydd's choice. One epoch = one pass
    # over D^u by default (steps_per_epoch=None); FixMatch's full budget is
    # --set steps_per_epoch=1024 --set epochs=1024.
    epochs: int = 300
    lr: float = 0.03  # FixMatch Sec. 4 / App. B.1: η = 0.03
    momentum: float = 0.9  # FixMatch: β = 0.9
    weight_decay: float = 5e-4  # FixMatch: 5e-4 on CIFAR-10 (applied to every parameter here)
    nesterov: bool = True  # FixMatch: SGD with Nesterov momentum
    batch_size: int = 64  # FixMatch: B = 64 labelled images per step
    # Weak augmentation α(·) [SSD Eq. L_fix^u; FixMatch Sec. 2.3]: flip (p=0.5, only where the
    # dataset allows it) + translation by up to 12.5% of the side, both applied (DSA ops, zero fill
    # instead of FixMatch's reflect padding). dsa=False turns the weak augmentation off.
    dsa: bool = True
    dsa_strategy: str = "crop_flip"
    eval_every: int = 10  # test-set evaluation every k epochs (and after the last): metrics only
    labelled_fraction: float = 0.1  # [SSD Sec. 4.1] 10% of each class labelled
    split_seed: int = 0
    threshold: float = 0.95  # γ [SSD Eq. L_fix^u]; value from FixMatch (τ = 0.95), [SSD] gives none
    lambda_u: float = 1.0  # λ_fix^u [SSD Eq. L_pre]; value from FixMatch (λ_u = 1)
    mu: int = 7  # FixMatch: μ = 7 unlabelled images per labelled one in a step
    ema_decay: float = 0.999  # FixMatch evaluates an EMA of the weights (0.999, warmed up); 0: no EMA
    lr_schedule: str = "cosine"  # FixMatch: η·cos(7πk / 16K) over all K steps; or "constant"
    steps_per_epoch: int | None = None  # None: ceil(|D^u| / (μ·B)), one pass over the unlabelled set
    strong_ops: int = 2  # RandAugment N (FixMatch's RA variant: N = 2, random magnitude per op)
    cutout: float = 0.5  # strong aug ends with Cutout of side U(0, cutout)·size (FixMatch: up to 0.5)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_split(self)
        check_range("threshold", self.threshold, low=0, high=1)
        check_range("lambda_u", self.lambda_u, low=0)
        check_int("mu", self.mu)
        check_range("ema_decay", self.ema_decay, low=0, high=1, high_open=True)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_int("steps_per_epoch", self.steps_per_epoch, none_ok=True)
        check_bool("nesterov", self.nesterov)
        if self.nesterov and self.momentum <= 0:
            raise ValueError("nesterov=True needs momentum > 0: pass --set nesterov=false with momentum=0")
        check_int("strong_ops", self.strong_ops, low=0)
        check_range("cutout", self.cutout, low=0, high=1)


@dataclass(frozen=True)
class SSDStudentConfig(TrainingConfig):
    """Dual-consistency students [SSD Sec. 3.2, Sec. 4.1]."""

    # [SSD Sec. 4.1]: SGD, η = 0.01, batch 256; momentum, weight decay, epochs and DSA follow MTT
    # ("we follow the settings in previous work (Cazenavette et al., 2022)"; "the same differentiable
    # augmentation strategy"): momentum 0, wd 0, DSA on, 50 epochs (TrainingConfig defaults).
    epochs: int = 50
    lr: float = 0.01
    batch_size: int = 256
    keep_epochs: int | None = None  # store snapshots 0..keep_epochs (plus the final one); None keeps all
    teacher: str = "auto"  # "auto": the unique matching ssd_teacher in the store; or a trajectory id
    labelled_fraction: float = 0.1  # [SSD Sec. 4.1]; must equal the teacher's
    split_seed: int = 0  # must equal the teacher's
    # λ_intra^u, λ_inter^u [SSD Eq. L_ref]: the paper gives no values; 1.0 (plain sum) is raydd's choice.
    lambda_intra: float = 1.0
    lambda_inter: float = 1.0
    # No temperature: [SSD Eq. L_inter^u] uses the plain probabilities p_T, p_S.

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("keep_epochs", self.keep_epochs, low=0, none_ok=True)
        if not isinstance(self.teacher, str) or not self.teacher.strip():
            raise ValueError(f"teacher={self.teacher!r} is invalid: expected 'auto' or an ssd_teacher trajectory id")
        _check_split(self)
        check_range("lambda_intra", self.lambda_intra, low=0)
        check_range("lambda_inter", self.lambda_inter, low=0)


def _check_split(cfg) -> None:
    check_range("labelled_fraction", cfg.labelled_fraction, low=0, high=1, low_open=True)
    check_int("split_seed", cfg.split_seed, low=0)


def _split(labels: torch.Tensor, cfg) -> SemiSupervisedSplit:
    return semi_supervised_split(labels, cfg.labelled_fraction, cfg.split_seed)


def _fingerprint(dataset) -> str:
    return dataset.fingerprint()


# ----------------------------------------------------------------------------- augmentation
def weak_augment(cfg: TrainingConfig, flip_ok: bool) -> DSA | None:
    """α(·): every op of ``dsa_strategy`` on each call (not one at random), flip dropped where not ok."""
    return make_dsa(cfg.dsa_strategy, flip_ok=flip_ok, single_per_call=False) if cfg.dsa else None


# ----------------------------------------------------------------------------- losses
@dataclass
class FixMatchParts:
    ce: torch.Tensor  # mean CE on the labelled batch
    unsup: torch.Tensor  # mean over the unlabelled batch of mask · CE(pseudo-label, strong view)
    mask: torch.Tensor  # [n_u] float, 1 where max p(weak) >= threshold
    pseudo: torch.Tensor  # [n_u] pseudo-labels argmax p(weak)
    logits_l: torch.Tensor


def fixmatch_loss(net: nn.Module, x_l: torch.Tensor, y_l: torch.Tensor, x_u_weak: torch.Tensor | None,
                  x_u_strong: torch.Tensor | None, *, threshold: float, lambda_u: float
                  ) -> tuple[torch.Tensor, FixMatchParts]:
    """FixMatch's L = l_s + λ_u·l_u (Sohn et al. 2020, Eq. 2-4; [SSD] Eq. L_pre, L_fix^u).

    One forward pass over [labelled weak, unlabelled weak, unlabelled strong] (as FixMatch's
    reference code, so BatchNorm sees all three); pseudo-labels come from the detached weak
    logits. The paper writes L_fix^u as a sum over D^u; per step it is FixMatch's mean over the
    μB unlabelled images (masked-out images count in the denominator).
    """
    n_l = x_l.shape[0]
    if x_u_weak is None or x_u_weak.shape[0] == 0:
        logits_l = net(x_l)
        ce = F.cross_entropy(logits_l, y_l)
        empty = torch.zeros(0, device=x_l.device)
        return ce, FixMatchParts(ce.detach(), torch.zeros((), device=x_l.device), empty, empty.long(),
                                 logits_l.detach())
    n_u = x_u_weak.shape[0]
    logits = net(torch.cat([x_l, x_u_weak, x_u_strong]))
    logits_l, logits_uw, logits_us = logits[:n_l], logits[n_l:n_l + n_u], logits[n_l + n_u:]
    ce = F.cross_entropy(logits_l, y_l)
    probs = torch.softmax(logits_uw.detach(), dim=1)
    confidence, pseudo = probs.max(dim=1)
    mask = (confidence >= threshold).to(logits.dtype)
    unsup = (F.cross_entropy(logits_us, pseudo, reduction="none") * mask).mean()
    loss = ce + lambda_u * unsup
    return loss, FixMatchParts(ce.detach(), unsup.detach(), mask, pseudo, logits_l.detach())


@dataclass
class DualConsistencyParts:
    ce: torch.Tensor
    intra: torch.Tensor
    inter: torch.Tensor
    logits: torch.Tensor  # student logits on the first view, whole batch


def dual_consistency_loss(student: nn.Module, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor,
                          labelled: torch.Tensor, *, augment: Augment | None, generator: torch.Generator,
                          lambda_intra: float, lambda_inter: float
                          ) -> tuple[torch.Tensor, DualConsistencyParts]:
    """L_ref = L_ce^s + λ_intra·L_intra^u + λ_inter·L_inter ([SSD] Sec. 3.2).

    ``labelled`` is a bool mask over the batch; ``y`` is read only where it is True.
    - L_ce^s: CE on the labelled samples of the batch, first view α₁(x).
    - L_intra^u: ‖p_S(α₁(x)) − p_S(α₂(x))‖² (sum over classes) on the unlabelled samples, two
      independent draws of the same augmentation α.
    - L_inter: KL(p_T(α₁(x)) ‖ p_S(α₁(x))) on every sample, the frozen teacher seeing the same view.
    The paper's terms are sums over D^l, D^u and D; each is estimated per batch as its sum over
    the batch divided by the batch size, which keeps the paper's relative weighting (e.g. the CE
    term weighs ~labelled_fraction of the consistency terms at λ = 1).
    """
    n = x.shape[0]
    labelled = labelled.to(device=x.device, dtype=torch.bool)
    view1 = augment(x, generator) if augment is not None else x
    logits = student(view1)
    log_p1 = torch.log_softmax(logits, dim=1)
    zero = logits.sum() * 0.0
    if labelled.any():
        ce = F.cross_entropy(logits[labelled], y.to(x.device)[labelled], reduction="sum") / n
    else:
        ce = zero
    unlabelled = ~labelled
    if unlabelled.any():
        x_u = x[unlabelled]
        view2 = augment(x_u, generator) if augment is not None else x_u
        p2 = torch.softmax(student(view2), dim=1)
        intra = ((log_p1[unlabelled].exp() - p2) ** 2).sum() / n
    else:
        intra = zero
    with torch.no_grad():
        log_pt = torch.log_softmax(teacher(view1), dim=1)
    inter = F.kl_div(log_p1, log_pt, reduction="sum", log_target=True) / n
    loss = ce + lambda_intra * intra + lambda_inter * inter
    return loss, DualConsistencyParts(ce.detach(), intra.detach(), inter.detach(), logits.detach())


# ----------------------------------------------------------------------------- teacher recipe
class _IndexStream:
    """Endless shuffled indices 0..n-1 (a fresh permutation each pass), drawn from ``generator``."""

    def __init__(self, n: int, generator: torch.Generator):
        self.n, self.gen = n, generator
        self.buf = torch.empty(0, dtype=torch.long)

    def take(self, k: int) -> torch.Tensor:
        while self.buf.numel() < k:
            self.buf = torch.cat([self.buf, torch.randperm(self.n, generator=self.gen)])
        out, self.buf = self.buf[:k], self.buf[k:]
        return out


def run_ssd_teacher(cfg: SSDTeacherConfig, ctx: RecipeContext, sink: SnapshotSink) -> dict[str, float]:
    train = ctx.train
    split = _split(train.labels, cfg)
    lab_idx, unl_idx = split.labelled, split.unlabelled
    y_lab = train.labels[lab_idx].clone()  # the only labels this recipe ever reads
    images = train.images
    net = _build(ctx)
    gen = torch.Generator().manual_seed(ctx.seed)
    weak = weak_augment(cfg, train.info.flip_ok)
    strong = StrongAugment(weak, images.amin(dim=(0, 2, 3)), cfg.strong_ops, cfg.cutout)
    optimizer = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    n_u, batch_u = int(unl_idx.numel()), cfg.mu * cfg.batch_size
    if cfg.steps_per_epoch is not None:
        steps = cfg.steps_per_epoch
    elif n_u:  # one pass over D^u
        steps = math.ceil(n_u / batch_u)
    else:  # labelled_fraction=1: nothing unlabelled, one pass over D^l
        steps = math.ceil(int(lab_idx.numel()) / cfg.batch_size)
    total_steps = steps * cfg.epochs
    if cfg.lr_schedule == "cosine":  # FixMatch: η cos(7πk / 16K)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda k: math.cos(7 * math.pi * k / (16 * total_steps)))
    else:
        schedule = None
    ema = ModelEMA(net, cfg.ema_decay, warmup=True) if cfg.ema_decay > 0 else None
    labelled_stream = _IndexStream(int(lab_idx.numel()), gen)
    unlabelled_stream = _IndexStream(n_u, gen) if n_u else None

    def weak_view(x):
        return weak(x, generator=gen) if weak is not None else x

    nan = float("nan")
    metrics = {"train_loss": nan, "train_acc": nan, "test_loss": nan, "test_acc": nan, "lr": cfg.lr,
               "mask_rate": nan}
    _snapshot(sink, net, 0, metrics)
    net.train()
    for epoch in range(1, cfg.epochs + 1):
        lr = optimizer.param_groups[0]["lr"]
        loss_sum, correct, seen, mask_sum, mask_seen = 0.0, 0, 0, 0.0, 0
        for _ in range(steps):
            li = labelled_stream.take(cfg.batch_size)
            x_l = weak_view(images[lab_idx[li]].to(ctx.device))
            y_l = y_lab[li].to(ctx.device)
            if unlabelled_stream is not None:
                x_u = images[unl_idx[unlabelled_stream.take(batch_u)]].to(ctx.device)
                with torch.no_grad():
                    x_uw, x_us = weak_view(x_u), strong(x_u, gen)
            else:
                x_uw = x_us = None
            loss, parts = fixmatch_loss(net, x_l, y_l, x_uw, x_us, threshold=cfg.threshold,
                                        lambda_u=cfg.lambda_u)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
            if ema is not None:
                ema.update(net)
            loss_sum += float(loss.detach()) * len(li)
            correct += int((parts.logits_l.argmax(1) == y_l).sum())
            seen += len(li)
            mask_sum += float(parts.mask.sum())
            mask_seen += int(parts.mask.numel())
        metrics = {"train_loss": loss_sum / seen, "train_acc": correct / seen, "test_loss": nan, "test_acc": nan,
                   "lr": lr, "mask_rate": mask_sum / mask_seen if mask_seen else nan}
        eval_net = ema.model(net) if ema is not None else net
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            test = evaluate_model(eval_net, ctx.test.images, ctx.test.labels, device=ctx.device)
            metrics.update(test_loss=test.loss, test_acc=test.acc)
        if epoch == cfg.epochs:  # initial and final weights only; the final ones are the EMA's (FixMatch)
            _snapshot(sink, eval_net, epoch, metrics)
        if ctx.on_epoch is not None:
            ctx.on_epoch(epoch, cfg.epochs, metrics)
    return metrics


# ----------------------------------------------------------------------------- teacher lookup
def _split_of(meta: dict) -> tuple[float, int]:
    rc = meta.get("recipe_config", {})
    return rc.get("labelled_fraction"), rc.get("split_seed")


def _check_teacher_meta(meta: dict, cfg: SSDStudentConfig, fingerprint: str | None, store_root: str) -> None:
    tid = meta["trajectory_id"]
    if meta.get("recipe") != TEACHER_RECIPE:
        raise ValueError(f"teacher={tid!r} in store {store_root} is a {meta.get('recipe')!r} trajectory, "
                         f"not {TEACHER_RECIPE}: farm one with --recipe {TEACHER_RECIPE} or pass teacher=auto")
    if fingerprint is not None and meta["dataset"].get("fingerprint") != fingerprint:
        raise ValueError(f"teacher {tid} was trained on other data ({meta['dataset'].get('name')}, fingerprint "
                         f"{meta['dataset'].get('fingerprint')}) than this student ({fingerprint}): "
                         f"farm a teacher with the same dataset options (zca, resolution, train_per_class)")
    fraction, seed = _split_of(meta)
    if (fraction, seed) != (cfg.labelled_fraction, cfg.split_seed):
        raise ValueError(f"split mismatch: teacher {tid} used labelled_fraction={fraction}, split_seed={seed} "
                         f"but this student has labelled_fraction={cfg.labelled_fraction}, "
                         f"split_seed={cfg.split_seed}; they must label the same samples: "
                         f"pass --set labelled_fraction={fraction} --set split_seed={seed}")


def resolve_teacher(cfg: SSDStudentConfig, store_root: str, dataset: dict) -> str:
    """The teacher trajectory id for ``cfg`` (teacher="auto": the unique match in the store)."""
    store = TrajectoryStore(store_root)
    fingerprint = dataset.get("fingerprint")
    if cfg.teacher != "auto":
        if not store.exists(cfg.teacher):
            raise ValueError(f"teacher={cfg.teacher!r} is not in store {store_root}: farm it with "
                             f"--recipe {TEACHER_RECIPE} or pass --set teacher=auto")
        with store.open(cfg.teacher) as traj:
            _check_teacher_meta(traj.meta, cfg, fingerprint, store_root)
        return cfg.teacher
    same_data = [i for i in store.list(dataset=dataset["name"], kind="teacher", recipe=TEACHER_RECIPE)
                 if i.meta["dataset"].get("fingerprint") == fingerprint]
    matches = [i for i in same_data if _split_of(i.meta) == (cfg.labelled_fraction, cfg.split_seed)]
    if len(matches) == 1:
        return matches[0].trajectory_id
    if not matches:
        if same_data:
            splits = sorted({_split_of(i.meta) for i in same_data}, key=str)
            raise ValueError(f"split mismatch: the {TEACHER_RECIPE} trajectories for {dataset['name']} in store "
                             f"{store_root} use (labelled_fraction, split_seed) in {splits}, this student has "
                             f"({cfg.labelled_fraction}, {cfg.split_seed}): set the student's labelled_fraction/"
                             f"split_seed to a teacher's, or farm a teacher with this split")
        raise ValueError(f"no {TEACHER_RECIPE} trajectory for dataset {dataset['name']} (fingerprint {fingerprint}, "
                         f"labelled_fraction={cfg.labelled_fraction}, split_seed={cfg.split_seed}) in store "
                         f"{store_root}: farm one first (raydd farm --recipe {TEACHER_RECIPE} --arch resnet18 "
                         f"--trajectories 1, same dataset options and split) or pass --set teacher=<id>")
    ids = ", ".join(i.trajectory_id for i in matches)
    raise ValueError(f"{len(matches)} {TEACHER_RECIPE} trajectories match dataset {dataset['name']} "
                     f"(labelled_fraction={cfg.labelled_fraction}, split_seed={cfg.split_seed}) in store "
                     f"{store_root}: {ids}; pick one with --set teacher=<id>")


def prepare_student(cfg: SSDStudentConfig, store_root: str, dataset: dict, model: dict) -> SSDStudentConfig:
    """Runs before the trajectory id is hashed: the id then names the concrete teacher."""
    return dataclasses.replace(cfg, teacher=resolve_teacher(cfg, store_root, dataset))


def load_teacher(cfg: SSDStudentConfig, ctx: RecipeContext) -> nn.Module:
    """The teacher's final weights (and BN buffers), frozen, in eval mode, on ctx.device."""
    if cfg.teacher == "auto":
        raise ValueError("teacher='auto' was not resolved: the farm resolves it in Recipe.prepare before "
                         "hashing the trajectory id; when calling the recipe directly pass a teacher id")
    if ctx.store_root is None:
        raise ValueError("the ssd_student recipe reads its teacher from the store: RecipeContext.store_root is None")
    store = TrajectoryStore(ctx.store_root)
    if not store.exists(cfg.teacher):
        raise ValueError(f"teacher={cfg.teacher!r} is not in store {ctx.store_root}")
    with store.open(cfg.teacher) as traj:
        _check_teacher_meta(traj.meta, cfg, _fingerprint(ctx.train), ctx.store_root)
        last = traj.epochs[-1]
        params = traj.params(last, dtype=torch.float32).clone()
        buffers = traj.buffers(last, dtype=torch.float32)
        buffers = buffers.clone() if buffers is not None else None
        spec = ModelSpec.from_dict(traj.meta["model"])
    teacher = load_flat_params(build_model(spec), params, buffers).to(ctx.device)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


# ----------------------------------------------------------------------------- student recipe
def run_ssd_student(cfg: SSDStudentConfig, ctx: RecipeContext, sink: SnapshotSink) -> dict[str, float]:
    teacher = load_teacher(cfg, ctx)
    train = ctx.train
    split = _split(train.labels, cfg)
    labelled = split.labelled_mask()
    visible = torch.full_like(train.labels, -1)  # unlabelled samples' labels are never read
    visible[split.labelled] = train.labels[split.labelled]
    net = _build(ctx)
    gen = torch.Generator().manual_seed(ctx.seed)
    dsa = _dsa(cfg, ctx)
    augment = (lambda x, g: dsa(x, generator=g)) if dsa is not None else None
    optimizer = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    keep_to = cfg.epochs if cfg.keep_epochs is None else cfg.keep_epochs
    nan = float("nan")
    metrics = {k: nan for k in STUDENT_METRICS} | {"lr": cfg.lr}
    _snapshot(sink, net, 0, metrics)
    for epoch in range(1, cfg.epochs + 1):
        net.train()
        lr = optimizer.param_groups[0]["lr"]
        sums = {"loss": 0.0, "ce": 0.0, "intra": 0.0, "inter": 0.0}
        correct, seen_l, seen = 0, 0, 0
        for idx in minibatches(len(visible), cfg.batch_size, gen):
            x = train.images[idx].to(ctx.device)
            y = visible[idx].to(ctx.device)
            m = labelled[idx].to(ctx.device)
            loss, parts = dual_consistency_loss(net, teacher, x, y, m, augment=augment, generator=gen,
                                                lambda_intra=cfg.lambda_intra, lambda_inter=cfg.lambda_inter)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            b = len(idx)
            sums["loss"] += float(loss.detach()) * b
            for key in ("ce", "intra", "inter"):
                sums[key] += float(getattr(parts, key)) * b
            correct += int((parts.logits.argmax(1)[m] == y[m]).sum())
            seen_l += int(m.sum())
            seen += b
        metrics = {"train_loss": sums["loss"] / seen, "train_acc": correct / seen_l if seen_l else nan,
                   "test_loss": nan, "test_acc": nan, "lr": lr,
                   "ce": sums["ce"] / seen, "intra": sums["intra"] / seen, "inter": sums["inter"] / seen}
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            test = evaluate_model(net, ctx.test.images, ctx.test.labels, device=ctx.device)
            metrics.update(test_loss=test.loss, test_acc=test.acc)
        if epoch <= keep_to or epoch == cfg.epochs:
            _snapshot(sink, net, epoch, metrics)
        if ctx.on_epoch is not None:
            ctx.on_epoch(epoch, cfg.epochs, metrics)
    return metrics


# BatchNorm for the teacher: the paper's ResNet-18 (He et al. 2016) is a BN network, as is FixMatch's
# WRN; the students are instance-norm ConvNets [SSD Sec. 4.1].
register_recipe(Recipe(TEACHER_RECIPE, "teacher", SSDTeacherConfig, run_ssd_teacher, default_norm="batch",
                       metric_names=TEACHER_METRICS))
register_recipe(Recipe(STUDENT_RECIPE, "student", SSDStudentConfig, run_ssd_student, default_norm="instance",
                       metric_names=STUDENT_METRICS, prepare=prepare_student))
