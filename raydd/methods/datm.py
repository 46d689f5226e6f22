"""DATM: Towards Lossless Dataset Distillation via Difficulty-Aligned Trajectory Matching
(Guo et al., ICLR 2024). Reference: NUS-HPC-AI-Lab/DATM, distill/DATM.py and configs/.

DATM is MTT (``raydd.methods.mtt``) with three changes:

(a) soft labels (paper Sec. 3.2 / reference ``pix_init: samples_predicted_correctly``):
    S starts from real images that an expert classifies correctly — the experts' *last*
    stored snapshot (reference ``Label_Model_Timestamp: -1``), the first expert first and
    the next ones only when a class runs short. The labels are learnable logits
    initialised to the mean, over all experts, of the logits of the experts that classify
    the image correctly. The inner student steps use soft cross-entropy
    ``-Σ softmax(y) · log_softmax(f(x))``; the logits y get the gradient of the matching
    loss and are updated by SGD(lr_y, momentum 0.9).
(b) difficulty alignment (Sec. 3.3, "sequential generation"): the start epoch is drawn
    uniformly from [min_start_epoch, upper) where
    upper(it) = min(T+, T0 + floor((T+ − T0) · it / expansion_end_epoch))
    grows from T0 = current_max_start_epoch to T+ = max_start_epoch.
(c) an iteration whose matching loss exceeds ``threshold`` updates nothing (reference:
    ``if grand_loss <= threshold: step the optimisers``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.nn import functional as F

from ..store import CorruptTrajectoryError
from .base import PaperProtocol, StepMeter, clone_tree, register_method
from .mtt import MTT, MTTConfig, _SavedTensorMeter, cap_syn_steps
from .initial import class_labels
from .synthetic import SyntheticSet

# Reference configs/CIFAR-10/ConvIN/IPC{1,10,50}.yaml and configs/CIFAR-100/ConvIN/IPC{1,10,50}.yaml
# (lr_teacher 0.01 = α0; batch_syn there is >= |S| except CIFAR-100 IPC50; rows without
# current_max_start_epoch run with Sequential_Generation off: upper = max_start_epoch).
_PUBLISHED: dict[tuple[str, int], dict[str, Any]] = {
    ("cifar10", 1): dict(syn_steps=80, expert_epochs=2, min_start_epoch=0, max_start_epoch=4, lr_img=100.0,
                         lr_lr=1e-7, lr_y=5.0, threshold=1.1, syn_lr_init=0.01, zca=True),
    ("cifar10", 10): dict(syn_steps=80, expert_epochs=2, min_start_epoch=0, current_max_start_epoch=10,
                          max_start_epoch=20, expansion_end_epoch=1000, lr_img=100.0, lr_lr=1e-5, lr_y=2.0,
                          threshold=1.0, syn_lr_init=0.01, zca=True),
    ("cifar10", 50): dict(syn_steps=80, expert_epochs=2, min_start_epoch=0, current_max_start_epoch=20,
                          max_start_epoch=40, expansion_end_epoch=2000, lr_img=1000.0, lr_lr=1e-5, lr_y=2.0,
                          threshold=1.0, syn_lr_init=0.01, zca=True),
    ("cifar100", 1): dict(syn_steps=40, expert_epochs=3, min_start_epoch=0, max_start_epoch=30, lr_img=1000.0,
                          lr_lr=1e-5, lr_y=2.0, threshold=1.0, syn_lr_init=0.01, zca=True),
    ("cifar100", 10): dict(syn_steps=80, expert_epochs=2, min_start_epoch=0, current_max_start_epoch=30,
                           max_start_epoch=50, expansion_end_epoch=2000, lr_img=1000.0, lr_lr=1e-5, lr_y=10.0,
                           threshold=1.0, syn_lr_init=0.01, zca=True),
    ("cifar100", 50): dict(syn_steps=80, expert_epochs=2, min_start_epoch=20, max_start_epoch=70, lr_img=1000.0,
                           lr_lr=1e-5, lr_y=10.0, threshold=1.0, syn_lr_init=0.01, zca=True, batch_syn=1000,
                           init_correct=False),
}


def published_row(dataset: str, ipc: int) -> dict[str, Any]:
    """The reference settings for (dataset, ipc), or the documented fallback (see DATMConfig)."""
    if (dataset, ipc) in _PUBLISHED:
        return dict(_PUBLISHED[(dataset, ipc)])
    bucket = 1 if ipc <= 1 else 10 if ipc <= 10 else 50
    if dataset == "cifar100":
        return dict(_PUBLISHED[("cifar100", bucket)])
    row = dict(_PUBLISHED[("cifar10", bucket)])
    if dataset != "cifar10":
        row.update(zca=False, syn_lr_init=None)
    row["syn_steps"] = cap_syn_steps(dataset, row["syn_steps"])
    return row


@dataclass(frozen=True)
class DATMConfig(MTTConfig):
    """DATM knobs (MTT's plus soft labels, the start-epoch window and the skip threshold).

    ``defaults(dataset, ipc)``:
    - cifar10 IPC 1/10/50 and cifar100 IPC 1/10/50: the reference configs (table above);
    - other IPCs of cifar10/cifar100: the row of the nearest IPC bucket (<=1, <=10, else 50);
    - any other dataset: the CIFAR-10 row of the nearest bucket, without ZCA and with α0 =
      the experts' lr (``syn_lr_init=None``); digits also with syn_steps=10 (its epochs are
      ~6 expert steps, see ``mtt.FEW_STEPS_PER_EPOCH``). The DATM paper reports no MNIST-like
      settings, and the window (max_start_epoch etc.) must fit the experts in the store.
    """

    min_start_epoch: int = 0  # start epochs are drawn from [min_start_epoch, upper)
    current_max_start_epoch: int | None = None  # T0: upper at iteration 0; None: upper = max_start_epoch always
    expansion_end_epoch: int = 1000  # iterations over which upper grows linearly from T0 to max_start_epoch
    lr_y: float = 2.0  # SGD lr of the label logits (reference cfg default; 5 for CIFAR-10 IPC1)
    label_momentum: float = 0.9  # reference Momentum_y
    threshold: float | None = 1.0  # skip the update when the matching loss exceeds it; None: never skip
    init_correct: bool = True  # only images the experts classify correctly (reference samples_predicted_correctly)
    label_epoch: int | None = None  # expert snapshot for selection and label logits; None: each expert's last

    default_iterations: ClassVar[int] = 10000
    engines: ClassVar[tuple[str, ...]] = ("eager",)  # engine="graph" is built for MTT's iteration only
    published: ClassVar[tuple[tuple[str, int], ...]] = tuple(_PUBLISHED)
    reported: ClassVar[dict[tuple[str, int], float]] = {  # DATM Table 1 (METHODS.md)
        ("cifar10", 1): 46.9, ("cifar10", 10): 66.8, ("cifar10", 50): 76.1}
    paper: ClassVar[PaperProtocol] = PaperProtocol(
        "DATM Table 1", {"epochs": 1000, "num_models": 5}, {"expert": (100, 100)},
        notes="DATM trains its experts with GSAM (FTD's optimizer, buffer_FTD.py); raydd's expert recipe is MTT's "
              "plain SGD (lr 0.01): a departure; DATM's configs evaluate num_eval=1 network per checkpoint at the "
              "learned lr with soft labels (the paper's run count is not in the repo; raydd: 5, final accuracy)")

    def for_run(self, iterations: int) -> "DATMConfig":
        """The window grows over the same fraction of a run of ``iterations`` as in the published row
        (``expansion_end_epoch`` of ``default_iterations``: CIFAR-10 IPC 10, 1000 of 10000); rows without a
        growing window (``current_max_start_epoch`` None) are unchanged."""
        super().for_run(iterations)  # validates
        if self.current_max_start_epoch is None:  # no growing window (the IPC 1 rows): nothing to plan
            return self
        fraction = iterations / type(self).default_iterations
        return dataclasses.replace(self, expansion_end_epoch=max(1, round(self.expansion_end_epoch * fraction)))

    def _window_for(self, epochs: int) -> dict[str, Any]:
        """MTT's window, with [min_start_epoch, T0) kept inside it and T0/T+ keeping its ratio."""
        out = super()._window_for(epochs)
        top = out["max_start_epoch"]
        low = min(self.min_start_epoch, top - 1)
        out["min_start_epoch"] = low
        if self.current_max_start_epoch is not None:
            cur = round(self.current_max_start_epoch * top / self.max_start_epoch)
            out["current_max_start_epoch"] = min(top, max(low + 1, cur))
        return out

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pix_init != "real":
            raise ValueError(f"{type(self).__name__}.pix_init={self.pix_init!r} is invalid: DATM initialises S "
                             f"from real images and the experts' logits on them (accepted: real)")
        self.check("min_start_epoch", low=0)
        upper0 = self.max_start_epoch if self.current_max_start_epoch is None else self.current_max_start_epoch
        if self.current_max_start_epoch is not None and not (
                self.min_start_epoch < self.current_max_start_epoch <= self.max_start_epoch):
            raise ValueError(f"{type(self).__name__}.current_max_start_epoch={self.current_max_start_epoch} is "
                             f"invalid: expected min_start_epoch ({self.min_start_epoch}) < current_max_start_epoch "
                             f"<= max_start_epoch ({self.max_start_epoch}), or None")
        if self.min_start_epoch >= upper0:
            raise ValueError(f"{type(self).__name__}.min_start_epoch={self.min_start_epoch} is invalid: expected "
                             f"< max_start_epoch ({self.max_start_epoch})")
        self.check("expansion_end_epoch", low=1)
        self.check("lr_y", low=0)
        self.check("label_momentum", low=0, high=1, high_open=True)
        self.check("threshold", low=0, low_open=True)
        self.check("label_epoch", low=0)

    @classmethod
    def defaults(cls, dataset: str, ipc: int) -> "DATMConfig":
        return cls(dataset=dataset, ipc=ipc, **published_row(dataset, ipc))


def start_epoch_upper(config: DATMConfig, iteration: int) -> int:
    """Exclusive upper bound of the start-epoch window at ``iteration`` (0-based), as in (b)."""
    top = config.max_start_epoch
    if config.current_max_start_epoch is None:
        return top
    low = config.current_max_start_epoch
    return min(top, low + (top - low) * iteration // config.expansion_end_epoch)


def soft_cross_entropy(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """-Σ softmax(target) · log_softmax(logits), averaged over the batch (reference SoftCrossEntropy)."""
    return -(F.softmax(target_logits, dim=1) * F.log_softmax(logits, dim=1)).sum(1).mean()


@register_method
class DATM(MTT):
    name = "datm"
    label = "DATM"
    config_cls = DATMConfig
    label_batch = 1024  # images per forward pass when the experts label the real data

    def __init__(self, config: DATMConfig, train, store=None, *, device="auto", seed: int = 0) -> None:
        super().__init__(config, train, store, device=device, seed=seed)  # calls our _init_synthetic
        self.labels.requires_grad_(True)  # learnable logits [N, K]
        self.opt_y = torch.optim.SGD([self.labels], lr=config.lr_y, momentum=config.label_momentum)

    # ------------------------------------------------------------------ experts and the start-epoch window
    def _find_experts(self):
        experts, meta = super()._find_experts()
        cfg = self.config
        upper = start_epoch_upper(cfg, 0)
        if not any(cfg.min_start_epoch <= s < upper for e in experts for s in e.starts):
            raise ValueError(f"no expert stores epochs t and t+{cfg.expert_epochs} for some t in the initial window "
                             f"[{cfg.min_start_epoch}, {upper}): lower min_start_epoch or farm longer experts: "
                             f"{self.inputs.farm_command()}")
        if cfg.label_epoch is not None:
            lacking = [e.trajectory_id for e in experts
                       if cfg.label_epoch not in self.inputs.open(e.trajectory_id).epochs]
            if lacking:
                raise ValueError(f"label_epoch={cfg.label_epoch} is not stored in {len(lacking)} of the {len(experts)} "
                                 f"experts (e.g. {lacking[0]}): use --set label_epoch=null (each expert's last epoch)")
        return experts, meta

    def start_upper(self, iteration: int | None = None) -> int:
        """Exclusive upper bound of the start-epoch window at ``iteration`` (default: the next one)."""
        return start_epoch_upper(self.config, self._iteration if iteration is None else iteration)

    def sample_expert(self) -> tuple[str, int]:
        """A uniform expert with a stored start in the window, then a uniform start in [min_start, upper)."""
        return self.sample_in_window(self.config.min_start_epoch, self.start_upper())

    # ------------------------------------------------------------------ soft-label initialisation (a)
    def _label_epoch(self, trajectory_id: str) -> int:
        traj = self.inputs.open(trajectory_id)
        return max(traj.epochs) if self.config.label_epoch is None else self.config.label_epoch

    @torch.no_grad()
    def expert_logits(self, trajectory_id: str, images: torch.Tensor) -> torch.Tensor:
        """Logits of one expert's label snapshot (eval mode, its stored buffers) on ``images`` (model space)."""
        if self._label_net is None:  # one module, reloaded with each expert's snapshot
            self._label_net = self.inputs.network(self.inputs.open(trajectory_id).info, self.device, epoch=0)
        self.inputs.load_network(self._label_net, trajectory_id, self._label_epoch(trajectory_id))
        out = [self._label_net(chunk.to(self.device)) for chunk in images.split(self.label_batch)]
        return torch.cat(out).float() if out else images.new_zeros(0, self.train.info.num_classes)

    def _model_space(self, images: torch.Tensor) -> torch.Tensor:
        return self.zca_whitening.transform(images) if self.zca_whitening is not None else images

    def _init_synthetic(self) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, info = self.config, self.train.info
        self._label_net = None
        self.classes = class_labels(info.num_classes, cfg.ipc).to(self.device)
        if not cfg.init_correct:  # reference pix_init 'real': random real images, the first expert's logits
            images, _ = super()._init_synthetic()
            logits = self.expert_logits(self.experts[0].trajectory_id, images)
        else:
            images = torch.cat([self._correct_images(c) for c in range(info.num_classes)])
            logits = self._mean_correct_logits(images)
        return images.float().to(self.device), logits.to(self.device)

    def _correct_images(self, c: int) -> torch.Tensor:
        """``ipc`` images of class c (model space) classified as c: random order, first expert first."""
        cfg = self.config
        idx = self.train.class_indices(c)
        candidates = self._model_space(self.train.images[idx[torch.randperm(len(idx), generator=self.generator)]])
        taken = torch.zeros(len(candidates), dtype=torch.bool)
        for expert in list(self.experts):
            if int(taken.sum()) >= cfg.ipc:
                break
            try:
                correct = self.expert_logits(expert.trajectory_id, candidates).argmax(1).cpu() == c
            except CorruptTrajectoryError as err:  # reported once, the other experts go on
                self._drop_expert(expert.trajectory_id, err)
                continue
            fresh = torch.nonzero(correct & ~taken).flatten()[:cfg.ipc - int(taken.sum())]
            taken[fresh] = True
        if int(taken.sum()) < cfg.ipc:
            raise ValueError(f"only {int(taken.sum())} images of class {c} are classified correctly by the "
                             f"{len(self.experts)} experts' label snapshots, ipc={cfg.ipc} needs more: lower ipc, "
                             f"use --set init_correct=false, or farm better experts")
        return candidates[taken]  # in the random order, as the reference takes them

    def _mean_correct_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Per image: the mean logits of the experts whose prediction is its class (reference 'only sum correct')."""
        total = torch.zeros(len(images), self.train.info.num_classes, device=self.device)
        count = torch.zeros(len(images), 1, device=self.device)
        for expert in self.experts:
            logits = self.expert_logits(expert.trajectory_id, images)
            correct = (logits.argmax(1) == self.classes).float().unsqueeze(1)
            total += logits * correct
            count += correct
        return total / count  # count >= 1: the expert that selected the image classifies it correctly

    # ------------------------------------------------------------------ the objective
    def _inner_loss(self, logits: torch.Tensor, idx: torch.Tensor, leaves: list[torch.Tensor]) -> torch.Tensor:
        return soft_cross_entropy(logits, leaves[2][idx])  # the learnable soft labels (a leaf of the unroll)

    def _objective(self, theta_start: torch.Tensor, theta_target: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(loss to backpropagate, named terms); DATM: the matching loss L_tm (MTT eq. 2)."""
        theta_end = self._unroll(theta_start, self.generator, create_graph=True)
        loss = self._matching_loss(theta_end, theta_start, theta_target)
        return loss, {"loss_tm": loss}

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.opt_img, self.opt_lr, self.opt_y]

    def _leaves(self) -> list[torch.Tensor]:
        return [self.images, self.syn_lr, self.labels]

    def step(self) -> dict[str, float]:
        cfg = self.config
        step_meter = StepMeter(self.device)
        upper = self.start_upper()
        start, theta_start, theta_target = self.sample_segment()
        with _SavedTensorMeter() as meter:
            loss, terms = self._objective(theta_start, theta_target)
        loss_tm, total = float(terms["loss_tm"].detach()), float(loss.detach())
        if math.isnan(loss_tm) or math.isnan(total) or (cfg.threshold is None and math.isinf(total)):
            raise FloatingPointError(f"{self.name} loss is {total} (matching loss {loss_tm}) at iteration "
                                     f"{self._iteration}: lower lr_img ({cfg.lr_img}), lr_lr ({cfg.lr_lr}) "
                                     f"or lr_y ({cfg.lr_y})")
        skipped = cfg.threshold is not None and not loss_tm <= cfg.threshold  # (c); inf is skipped too
        grad_img = grad_lr = grad_y = 0.0
        if not skipped:
            for opt in self._optimizers():
                opt.zero_grad(set_to_none=True)
            loss.backward(inputs=self._leaves())
            grad_img, grad_lr = float(self.images.grad.norm()), float(self.syn_lr.grad.abs())
            grad_y = float(self.labels.grad.norm())
            for opt in self._optimizers():
                opt.step()
        self._iteration += 1
        metrics = {
            "loss": total, **{k: float(v.detach()) for k, v in terms.items()},
            "skipped": float(skipped), "syn_lr": float(self.syn_lr.detach()), "start_epoch": float(start),
            "start_upper": float(upper), "grad_norm_img": grad_img, "grad_norm_lr": grad_lr, "grad_norm_y": grad_y,
            "param_dist": float((theta_start - theta_target).pow(2).sum()), "graph_mem_mb": meter.megabytes,
        }
        return step_meter.finish(metrics, graph_mb=meter.megabytes)

    # ------------------------------------------------------------------ results and state
    def synthetic_set(self) -> SyntheticSet:
        syn = super().synthetic_set()
        logits = self.labels.detach().cpu().float().clone()
        meta = {**syn.meta, "label_logits": logits, "classes": self.classes.cpu().clone()}
        return dataclasses.replace(syn, labels=F.softmax(logits, dim=1), meta=meta)  # probability rows

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["opt_y"] = clone_tree(self.opt_y.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        leaf = self.labels  # MTT replaces self.labels; keep the optimised leaf instead
        super().load_state_dict(state)
        with torch.no_grad():
            leaf.copy_(state["labels"].to(self.device))
        self.labels = leaf
        self.opt_y.load_state_dict(state["opt_y"])
