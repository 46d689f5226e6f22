"""SSD: Semi-Supervised Dataset Condensation with Dual Consistency Trajectory Matching
(shared/papers/000_...; cited as [SSD]). The condensation stage (Alg. 1 lines 3-15) is MTT
(``raydd.methods.mtt``) on the *student* trajectories that the farm recipe ``ssd_student``
stored (dual-consistency students of an ``ssd_teacher``; see ``raydd.farm.ssd``), with:

- cross-entropy only in the unrolled inner steps ([SSD] Sec. 3.2, eq. L_ce^s: "we only employ
  cross-entropy L^S to update the reference model"), no consistency terms;
- the initial step size α0 = the students' training lr (Alg. 1 line 3: α = α_0);
- S initialised class-balanced from real images ([SSD] Sec. 3.1 step 2, Alg. 1 line 3). In
  the semi-supervised setting only D^l has labels: class c takes random labelled images of
  class c; where D^l has fewer than IPC of them, it is topped up with the unlabelled images
  the teacher assigns to c with the highest confidence (the teacher's pseudo-labels "provide
  category information of unlabeled samples for dataset condensation", Sec. 3.2);
- synthetic labels "with predictions from M^D" (Sec. 3.1 step 2), M^D = the teacher here, see
  ``SSDConfig.syn_labels``.

The labelled split is ``semi_supervised_split(labels, labelled_fraction, split_seed)`` of the
data the students were trained on, with the fraction and seed read from their recipe config;
the teacher is the students' ``recipe_config['teacher']`` (final weights + BatchNorm buffers).
Apart from drawing that split (the experimental protocol) and a data fingerprint check, the
method never reads the label of an unlabelled sample: ``self.train`` is the training pool as
SSD sees it — labelled samples with their labels, unlabelled ones with the teacher's
pseudo-labels.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.nn import functional as F

from ..data.datasets import ImageDataset
from ..data.semisup import SemiSupervisedSplit, semi_supervised_split
from .base import PaperProtocol, check_ipc, register_method
from .inputs import TrajectoryNeed
from .matching import FixedLabels, PlainSGD, StartWindow, TrajectoryMatching
from .mtt import MTTConfig
from .initial import class_labels
from .synthetic import SyntheticSet

STUDENT_KIND, STUDENT_RECIPE, TEACHER_RECIPE = "student", "ssd_student", "ssd_teacher"
SYN_LABELS = ("teacher", "hard", "soft")


@dataclass(frozen=True)
class SSDConfig(MTTConfig):
    """SSD knobs: MTT's (matching on the ssd_student trajectories) plus the teacher-related ones.

    ``defaults(dataset, ipc)``: [SSD] Sec. 4.1 follows MTT "for learning rate of synthetic images,
    the number of inner and outer loop iteration, and other hyperparameters", so these are
    ``MTTConfig.defaults(dataset, ipc)`` (the published CIFAR rows; MTT's documented fallback for
    MNIST-like data), except α0 = the students' lr (Alg. 1 line 3; 0.01 in Sec. 4.1).
    """

    syn_lr_init: float | None = None  # α0; None: the students' lr (Alg. 1 line 3: α = α_0)
    expert_kind: str = STUDENT_KIND  # the store kind of the ssd_student trajectories (fixed)
    teacher: str | None = None  # None: the one teacher of the students in the store; or an ssd_teacher id
    # Labels of S (Sec. 3.1 step 2 "assign labels to S with predictions from M^D"; the paper does not say
    # hard or soft): "teacher" = the teacher's argmax on each initial image (class c then only takes the
    # labelled images the teacher also assigns to c, so S stays class-balanced, Sec. 3.1);
    # "hard" = the known label for labelled images, the pseudo-label for unlabelled top-ups;
    # "soft" = the teacher's probabilities on each initial image (fixed), soft cross-entropy inside.
    syn_labels: str = "teacher"
    pseudo_threshold: float = 0.0  # top-ups need teacher confidence >= this (not in the paper: 0 = any)

    aliases: ClassVar[dict[str, str]] = {"alpha": "syn_lr_init"}
    published: ClassVar[tuple[tuple[str, int], ...]] = tuple(
        (d, i) for d in ("mnist", "fashion_mnist", "cifar10") for i in (1, 10, 50))  # [SSD] Table 1, 10% labels
    reported: ClassVar[dict[tuple[str, int], float]] = {
        ("mnist", 1): 91.18, ("mnist", 10): 97.35, ("mnist", 50): 99.08,
        ("fashion_mnist", 1): 77.41, ("fashion_mnist", 10): 87.59, ("fashion_mnist", 50): 90.56,
        ("cifar10", 1): 42.19, ("cifar10", 10): 58.67, ("cifar10", 50): 63.27}
    paper: ClassVar[PaperProtocol] = PaperProtocol(
        "SSD Table 1 (10 % labels)", {},
        notes="the paper states no evaluation protocol, teacher epochs or FixMatch settings, student count or "
              "epochs (students: ConvNet-3 w128, SGD 0.01, batch 256; synthesis 'follows MTT'): raydd's standard "
              "protocol (5 ConvNets x 300 epochs) and the method's own needs")
    matched_recipe: ClassVar[str] = STUDENT_RECIPE
    matched_role: ClassVar[str] = "student trajectories"
    engines: ClassVar[tuple[str, ...]] = ("eager",)  # engine="graph" is built for MTT's iteration only

    def needs(self) -> tuple[TrajectoryNeed, ...]:
        """A FixMatch teacher (ResNet-18 in the paper), then its dual-consistency students storing epochs
        0..max_start_epoch + expert_epochs."""
        teacher = TrajectoryNeed(TEACHER_RECIPE, "teacher", ids=(self.teacher,) if self.teacher else None,
                                 zca=self.zca, farm_model=(("arch", "resnet18"),))
        return (teacher, self.matched_need())

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.expert_kind != STUDENT_KIND:
            raise ValueError(f"SSDConfig.expert_kind={self.expert_kind!r} is invalid: SSD matches the "
                             f"{STUDENT_RECIPE} trajectories (accepted: {STUDENT_KIND})")
        if self.syn_labels not in SYN_LABELS:
            raise ValueError(f"SSDConfig.syn_labels={self.syn_labels!r} is invalid: accepted {', '.join(SYN_LABELS)}")
        if self.teacher is not None and not self.teacher.strip():
            raise ValueError(f"SSDConfig.teacher={self.teacher!r} is invalid: expected an {TEACHER_RECIPE} "
                             f"trajectory id or None (the students' teacher)")
        self.check("pseudo_threshold", low=0, high=1)
        if self.pix_init == "noise" and self.syn_labels != "hard":
            raise ValueError(f"SSDConfig.syn_labels={self.syn_labels!r} is invalid with pix_init='noise': the "
                             f"teacher's predictions on noise do not give a class-balanced S (accepted: hard)")

    @classmethod
    def defaults(cls, dataset: str, ipc: int) -> "SSDConfig":
        return dataclasses.replace(super().defaults(dataset, ipc), syn_lr_init=None)


def _teacher_of(info) -> str | None:
    return info.meta.get("recipe_config", {}).get("teacher")


@register_method
class SSD(TrajectoryMatching):
    """SSD's condensation stage: the family's iteration (raydd/methods/matching.py) on the students of one
    teacher, with fixed labels (``syn_labels``: the teacher's classes or probabilities, or the known labels
    with pseudo-labelled top-ups), a window [0, T+), a plain-SGD student."""

    name = "ssd"
    label = "SSD"
    config_cls = SSDConfig
    teacher_batch = 1024  # images per teacher forward pass when pseudo-labelling

    def __init__(self, config: SSDConfig, train, store=None, *, device="auto", seed: int = 0) -> None:
        super().__init__(config, train, store, device=device, seed=seed)  # the base checks, on the real data
        self.teacher_id = self._find_teacher()
        need = dataclasses.replace(config.matched_need(), recipe_config=(("teacher", self.teacher_id),))
        experts, student_meta = self.find_experts(need)  # checks (zca, model, stored epochs) before any work
        # the students of one teacher share its data and split
        self.labelled_fraction = student_meta["recipe_config"]["labelled_fraction"]
        self.split_seed = student_meta["recipe_config"]["split_seed"]
        view = self.inputs.training_view(student_meta)  # the farm's pool and ZCA fit
        pool = view.pool
        self.split: SemiSupervisedSplit = semi_supervised_split(pool.labels, self.labelled_fraction, self.split_seed)
        self._pool_images = pool.images
        labelled_y = pool.labels[self.split.labelled].clone()  # the only labels this method reads
        self._zca = view.zca
        self._teacher_net, self.teacher_meta = self._load_teacher(student_meta)
        probs = self.teacher_probs(pool.images)  # [N, K]: the teacher on the unaugmented training pool
        self.teacher_conf, self.teacher_pred = probs.max(1)
        del probs
        visible = torch.empty_like(pool.labels)
        visible[self.split.labelled] = labelled_y
        visible[self.split.unlabelled] = self.teacher_pred[self.split.unlabelled]
        seen = ImageDataset(pool.images, visible, pool.info, pool.split, pool.source)
        if config.pix_init == "real":
            self._check_ipc_semi(config.ipc, labelled_y, train.info.num_classes)
        else:
            check_ipc(config.ipc, seen)
        self.train = seen  # SSD's view of the pool: labelled samples with labels, the others pseudo-labelled
        self.load_experts(need, experts, student_meta, fingerprint_note="its labelled split may differ from theirs")
        images, labels = self._initial_set()
        self.assemble(images, FixedLabels(labels), window=StartWindow.fixed(0, config.max_start_epoch),
                      student_update=PlainSGD())
        del self._teacher_net  # only needed for the initial labels

    def _check_ipc(self) -> None:
        """IPC is checked against the semi-supervised pool once the teacher has labelled it (__init__)."""

    # ------------------------------------------------------------------ students and teacher
    def _find_teacher(self) -> str:
        """The teacher whose ssd_student trajectories SSD matches; ValueError naming the farm commands."""
        cfg, need = self.config, self.config.matched_need()
        infos = self.inputs.list(need)
        if not infos:
            raise self.inputs.missing(f"no student trajectories in store {self.store.root} match "
                                      f"{need.filters(cfg.dataset)}; SSD needs a teacher and its students")
        teachers = sorted({str(_teacher_of(i)) for i in infos})
        if cfg.teacher is not None:
            if cfg.teacher not in teachers:
                raise ValueError(f"teacher={cfg.teacher!r} has no students in store {self.store.root} matching "
                                 f"{need.filters(cfg.dataset)}: the students there have teachers {teachers}")
            return cfg.teacher
        if len(teachers) > 1:
            raise ValueError(f"the students in store {self.store.root} matching {need.filters(cfg.dataset)} have "
                             f"{len(teachers)} different teachers {teachers}: pick one with --set teacher=ID")
        return teachers[0]

    def _load_teacher(self, student_meta: dict):
        tid, store = self.teacher_id, self.store
        if not store.exists(tid):
            raise self.inputs.missing(f"teacher {tid} of the students is not in store {store.root}: farm it again",
                                      self.config.needs()[0])
        info = self.inputs.open(tid).info
        meta = info.meta
        if meta.get("recipe") != TEACHER_RECIPE:
            raise ValueError(f"teacher {tid} in store {store.root} is a {meta.get('recipe')!r} trajectory, "
                             f"not {TEACHER_RECIPE}")
        if meta["dataset"].get("fingerprint") != student_meta["dataset"].get("fingerprint"):
            raise ValueError(f"teacher {tid} was trained on other data (fingerprint "
                             f"{meta['dataset'].get('fingerprint')}) than its students "
                             f"({student_meta['dataset'].get('fingerprint')})")
        rc = meta.get("recipe_config", {})
        if (rc.get("labelled_fraction"), rc.get("split_seed")) != (self.labelled_fraction, self.split_seed):
            raise ValueError(f"teacher {tid} used labelled_fraction={rc.get('labelled_fraction')}, split_seed="
                             f"{rc.get('split_seed')} but its students {self.labelled_fraction}, {self.split_seed}")
        net = self.inputs.network(info, self.device)  # its final (EMA) weights and BatchNorm buffers
        return net, {"trajectory_id": tid, "model": info.model_name, "epoch": max(info.epochs)}

    @torch.no_grad()
    def teacher_probs(self, images: torch.Tensor, *, model_space: bool = False) -> torch.Tensor:
        """p_T(x) on CPU, eval mode; ``images`` in the dataset's normalisation (or already in model space)."""
        out = []
        for chunk in images.split(self.teacher_batch):
            if self._zca is not None and not model_space:
                chunk = self._zca.transform(chunk)
            out.append(F.softmax(self._teacher_net(chunk.to(self.device)).float(), dim=1).cpu())
        return torch.cat(out)

    # ------------------------------------------------------------------ the candidates of each class
    def _labelled_candidates(self, c: int, labelled_y: torch.Tensor) -> torch.Tensor:
        """Pool indices of labelled images of class c usable for S (sorted)."""
        idx = self.split.labelled[labelled_y == c]
        if self.config.syn_labels == "teacher":  # their label is the teacher's argmax: keep S class-balanced
            idx = idx[self.teacher_pred[idx] == c]
        return idx

    def _pseudo_candidates(self, c: int) -> torch.Tensor:
        """Pool indices of unlabelled images the teacher assigns to c, most confident first (ties: lower index)."""
        idx = self.split.unlabelled
        idx = idx[(self.teacher_pred[idx] == c) & (self.teacher_conf[idx] >= self.config.pseudo_threshold)]
        order = torch.sort(self.teacher_conf[idx], descending=True, stable=True).indices
        return idx[order]

    def _check_ipc_semi(self, ipc: int, labelled_y: torch.Tensor, pool_classes: int) -> None:
        """IPC against labelled + pseudo-labelled unlabelled images of each class (one-line ValueError)."""
        cfg = self.config
        counts = [(len(self._labelled_candidates(c, labelled_y)), len(self._pseudo_candidates(c)))
                  for c in range(pool_classes)]
        short = [c for c, (a, b) in enumerate(counts) if a + b < ipc]
        if short:
            c = min(short, key=lambda k: sum(counts[k]))
            a, b = counts[c]
            agree = " the teacher agrees with" if cfg.syn_labels == "teacher" else ""
            conf = f" with confidence >= {cfg.pseudo_threshold}" if cfg.pseudo_threshold > 0 else ""
            hint = " or --set syn_labels=hard (all labelled images count)" if agree else ""
            raise ValueError(f"ipc={ipc} is too large for the semi-supervised split (labelled_fraction="
                             f"{self.labelled_fraction}, split_seed={self.split_seed}): class {c} has {a} labelled "
                             f"images{agree} and {b} unlabelled images pseudo-labelled {c} by teacher "
                             f"{self.teacher_id}{conf}: use ipc <= {a + b}{hint}")

    # ------------------------------------------------------------------ the initial set
    def _initial_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, its labels): class-balanced real images (labelled, topped up with the teacher's most confident
        pseudo-labelled ones) or noise, labelled as ``syn_labels`` says (module doc)."""
        cfg, k = self.config, self.train.info.num_classes
        classes = class_labels(k, cfg.ipc)
        if cfg.pix_init == "noise":
            images, _ = self.random_initial_set()
            self.init_indices = torch.full((len(classes),), -1, dtype=torch.long)
            self.init_counts = {"labelled": [0] * k, "unlabelled": [0] * k, "noise": [cfg.ipc] * k}
            model_images = images.cpu()
        else:
            labelled_y = self.train.labels[self.split.labelled]  # known labels (self.train hides the others)
            picks, n_lab, n_unl = [], [], []
            for c in range(k):
                own = self._labelled_candidates(c, labelled_y)
                own = own[torch.randperm(len(own), generator=self.generator)[:cfg.ipc]]  # random, as MTT
                top_up = self._pseudo_candidates(c)[:cfg.ipc - len(own)]  # the teacher's most confident
                picks.append(torch.cat([own, top_up]))
                n_lab.append(len(own))
                n_unl.append(len(top_up))
            self.init_indices = torch.cat(picks)
            self.init_counts = {"labelled": n_lab, "unlabelled": n_unl, "noise": [0] * k}
            model_images = self._pool_images[self.init_indices].clone()
            if self._zca is not None:
                model_images = self._zca.transform(model_images)
            images = model_images
        if cfg.syn_labels == "hard":
            labels = classes  # class c: the known label of D^l picks, the teacher's pseudo-label of D^u picks
        else:
            probs = self.teacher_probs(model_images, model_space=True)
            labels = probs.argmax(1) if cfg.syn_labels == "teacher" else probs
        return images.float().to(self.device), labels.to(self.device)

    # ------------------------------------------------------------------ results and state
    def synthetic_set(self) -> SyntheticSet:
        syn = super().synthetic_set()
        syn.meta.update({
            "store": str(self.store.root), "students": len(self.experts), "student_recipe": STUDENT_RECIPE,
            "teacher": self.teacher_id, "teacher_model": self.teacher_meta["model"],
            "teacher_epoch": self.teacher_meta["epoch"], "labelled_fraction": self.labelled_fraction,
            "split_seed": self.split_seed, "num_labelled": self.split.num_labelled,
            "num_unlabelled": self.split.num_unlabelled, "syn_labels": self.config.syn_labels,
            "init_from_labelled": list(self.init_counts["labelled"]),
            "init_from_unlabelled": list(self.init_counts["unlabelled"]),
            "init_indices": self.init_indices.clone(),  # into the training pool; -1: noise
        })
        return syn

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["teacher"] = self.teacher_id
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("teacher") != self.teacher_id:
            raise ValueError(f"checkpoint was made with teacher {state.get('teacher')!r}, this run uses "
                             f"{self.teacher_id!r}: resume needs the same teacher and students")
        super().load_state_dict(state)
