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
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.nn import functional as F

from ..data.datasets import ImageDataset
from ..data.semisup import SemiSupervisedSplit, semi_supervised_split
from ..models import ModelSpec, build_model, load_flat_params
from ..training import resolve_device
from .base import check_range, register_method
from .mtt import MTT, MTTConfig
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
        check_range(self, "pseudo_threshold", low=0, high=1)
        if self.pix_init == "noise" and self.syn_labels != "hard":
            raise ValueError(f"SSDConfig.syn_labels={self.syn_labels!r} is invalid with pix_init='noise': the "
                             f"teacher's predictions on noise do not give a class-balanced S (accepted: hard)")

    @classmethod
    def defaults(cls, dataset: str, ipc: int) -> "SSDConfig":
        return dataclasses.replace(super().defaults(dataset, ipc), syn_lr_init=None)


class _StudentStore:
    """The store as MTT sees it: ``list`` only returns the ssd_student trajectories of one teacher."""

    def __init__(self, store, teacher_id: str) -> None:
        self._store, self.teacher_id = store, teacher_id

    def list(self, **filters):
        filters["recipe"] = STUDENT_RECIPE
        return [i for i in self._store.list(**filters) if _teacher_of(i) == self.teacher_id]

    def __getattr__(self, name: str):
        return getattr(self._store, name)


def _teacher_of(info) -> str | None:
    return info.meta.get("recipe_config", {}).get("teacher")


def farm_commands(dataset: str, store_root, epochs: int, zca: bool | None = None) -> str:
    """The two farm commands that make what SSD matches: a FixMatch teacher, then its students."""
    z = " --zca" if zca else ""
    return (f"raydd farm --recipe {TEACHER_RECIPE} --arch resnet18 --dataset {dataset} --store {store_root} "
            f"--trajectories 1{z}, then raydd farm --recipe {STUDENT_RECIPE} --dataset {dataset} "
            f"--store {store_root} --epochs {epochs}{z}")


@register_method
class SSD(MTT):
    name = "ssd"
    config_cls = SSDConfig
    teacher_batch = 1024  # images per teacher forward pass when pseudo-labelling

    def __init__(self, config: SSDConfig, train, store=None, *, device="auto", seed: int = 0) -> None:
        if not isinstance(config, SSDConfig):
            raise ValueError(f"ssd needs an SSDConfig, got {type(config).__name__}; "
                             f"build one with make_config('ssd', dataset, ipc, ...)")
        if not isinstance(train, ImageDataset):
            raise ValueError(f"train must be an ImageDataset, got {type(train).__name__}")
        if config.dataset != train.info.name:
            raise ValueError(f"config is for dataset {config.dataset!r} but the training data is {train.info.name!r}")
        if store is None:
            raise ValueError("ssd reads student trajectories and their teacher: pass a TrajectoryStore (--store ROOT)")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed={seed!r} is invalid: expected an integer >= 0")
        # Everything MTT's __init__ needs from the teacher is prepared here, before it runs.
        self.config, self.trajectory_store, self._info = config, store, train.info
        self.teacher_id = self._find_teacher(store)
        self.store = _StudentStore(store, self.teacher_id)
        self._found = super()._find_experts()  # MTT's checks (zca, model, stored epochs) before any work
        student_meta = self._found[1]  # the students of one teacher share its data and split
        self.labelled_fraction = student_meta["recipe_config"]["labelled_fraction"]
        self.split_seed = student_meta["recipe_config"]["split_seed"]
        data_meta = student_meta["dataset"]
        per_class = data_meta.get("train_per_class")
        pool = train.per_class(per_class, seed=0) if per_class else train  # what the farm trained on
        if not data_meta.get("zca") and data_meta.get("fingerprint") and pool.fingerprint() != data_meta["fingerprint"]:
            warnings.warn(f"the training data differs from the data the students were trained on (fingerprint "
                          f"{data_meta['fingerprint']}): its labelled split may differ from theirs", stacklevel=2)
        self.split: SemiSupervisedSplit = semi_supervised_split(pool.labels, self.labelled_fraction, self.split_seed)
        self._pool_images = pool.images
        labelled_y = pool.labels[self.split.labelled].clone()  # the only labels this method reads
        self._zca = None
        if data_meta.get("zca"):
            from ..data.zca import ZCAWhitening

            self._zca = ZCAWhitening(eps=0.1).fit(pool.images)  # the farm's fit (raydd.farm.task.prepare_data)
        self._teacher_device = resolve_device(device)
        self._teacher_net, self.teacher_meta = self._load_teacher(store, student_meta)
        probs = self.teacher_probs(pool.images)  # [N, K]: the teacher on the unaugmented training pool
        self.teacher_conf, self.teacher_pred = probs.max(1)
        del probs
        visible = torch.empty_like(pool.labels)
        visible[self.split.labelled] = labelled_y
        visible[self.split.unlabelled] = self.teacher_pred[self.split.unlabelled]
        if config.pix_init == "real":
            self._check_ipc_semi(config.ipc, labelled_y, train.info.num_classes)
        seen = ImageDataset(pool.images, visible, pool.info, pool.split, pool.source)
        super().__init__(config, seen, self.store, device=device, seed=seed)
        del self._teacher_net  # only needed for the initial labels

    # ------------------------------------------------------------------ students and teacher
    def _farm_hint(self, zca: bool | None) -> str:
        cfg = self.config
        return farm_commands(cfg.dataset, self.trajectory_store.root, cfg.max_start_epoch + cfg.expert_epochs, zca)

    def _find_teacher(self, store) -> str:
        """The teacher whose ssd_student trajectories SSD matches; ValueError naming the farm commands."""
        cfg = self.config
        filters = {"dataset": cfg.dataset, "kind": STUDENT_KIND, "recipe": STUDENT_RECIPE, "model": cfg.model}
        shown = ", ".join(f"{k}={v}" for k, v in filters.items() if v is not None)
        infos = store.list(**filters)
        if not infos:
            raise ValueError(f"no student trajectories in store {store.root} match {shown}; SSD needs a teacher and "
                             f"its students: {self._farm_hint(cfg.zca)}")
        teachers = sorted({str(_teacher_of(i)) for i in infos})
        if cfg.teacher is not None:
            if cfg.teacher not in teachers:
                raise ValueError(f"teacher={cfg.teacher!r} has no students in store {store.root} matching {shown}: "
                                 f"the students there have teachers {teachers}")
            return cfg.teacher
        if len(teachers) > 1:
            raise ValueError(f"the students in store {store.root} matching {shown} have {len(teachers)} different "
                             f"teachers {teachers}: pick one with --set teacher=ID")
        return teachers[0]

    def _load_teacher(self, store, student_meta: dict):
        tid = self.teacher_id
        if not store.exists(tid):
            raise ValueError(f"teacher {tid} of the students is not in store {store.root}: farm it again "
                             f"({farm_commands(self.config.dataset, store.root, 1)})")
        with store.open(tid) as traj:
            meta = traj.meta
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
            last = traj.epochs[-1]  # the final (EMA) weights and BatchNorm buffers
            params = traj.params(last, dtype=torch.float32).clone()
            buffers = traj.buffers(last, dtype=torch.float32)
            buffers = buffers.clone() if buffers is not None else None
            spec = ModelSpec.from_dict(meta["model"])
        with torch.random.fork_rng(devices=[]):  # its random init is overwritten by the stored weights
            torch.manual_seed(0)
            net = build_model(spec)
        net = load_flat_params(net, params, buffers).to(self._teacher_device).eval().requires_grad_(False)
        return net, {"trajectory_id": tid, "model": spec.name, "epoch": last}

    @torch.no_grad()
    def teacher_probs(self, images: torch.Tensor, *, model_space: bool = False) -> torch.Tensor:
        """p_T(x) on CPU, eval mode; ``images`` in the dataset's normalisation (or already in model space)."""
        out = []
        for chunk in images.split(self.teacher_batch):
            if self._zca is not None and not model_space:
                chunk = self._zca.transform(chunk)
            out.append(F.softmax(self._teacher_net(chunk.to(self._teacher_device)).float(), dim=1).cpu())
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

    # ------------------------------------------------------------------ MTT hooks
    def _find_experts(self):
        return self._found  # found and checked before MTT's __init__ ran

    def _check_data(self, meta: dict) -> None:
        # MTT's shape check; its fingerprint check would hash the pseudo-labels: done on the real pool above.
        _check_fits(self._info, meta)

    def _fit_zca(self, meta: dict):
        return self._zca

    def _init_synthetic(self) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, k = self.config, self.train.info.num_classes
        classes = torch.arange(k).repeat_interleave(cfg.ipc)
        if cfg.pix_init == "noise":
            images, _ = super()._init_synthetic()
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

    def _inner_loss(self, logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """L_ce^s [SSD Sec. 3.2]: cross-entropy only (soft cross-entropy for syn_labels='soft')."""
        target = self.labels[idx]
        if target.dim() == 2:
            return -(target * F.log_softmax(logits, dim=1)).sum(1).mean()
        return F.cross_entropy(logits, target)

    # ------------------------------------------------------------------ results and state
    def synthetic_set(self) -> SyntheticSet:
        syn = super().synthetic_set()
        syn.meta.update({
            "store": str(self.trajectory_store.root), "students": len(self.experts), "student_recipe": STUDENT_RECIPE,
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


def _check_fits(info, meta: dict) -> None:
    """The students' model fits the data (channels, resolution, classes): one-line ValueError."""
    spec = meta["model"]
    if (spec["channels"], spec["num_classes"], tuple(spec["resolution"])) != \
            (info.channels, info.num_classes, tuple(info.resolution)):
        raise ValueError(f"students ({spec['name']}: {spec['channels']}ch, {tuple(spec['resolution'])}, "
                         f"{spec['num_classes']} classes) do not fit the training data {info.name} "
                         f"({info.channels}ch, {tuple(info.resolution)}, {info.num_classes} classes): "
                         f"load the dataset at the students' resolution")
