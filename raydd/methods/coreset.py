"""Coreset baselines: class-balanced selections of IPC real training images per class.

- ``random``  uniform sample of each class without replacement (seeded from ``self.generator``).
- ``herding`` (Welling, ICML 2009; as used by iCaRL, Rebuffi et al. CVPR 2017, Sec. 2.2 / Alg. 4,
  and by the DC benchmark): in the embedding f of a trained expert, repeatedly add the sample
  whose inclusion brings the running mean of the selected features closest to the class mean μ:
  p_k = argmin_{x ∉ P} ‖ μ − (f(x) + Σ_{j<k} f(p_j)) / k ‖.
- ``kcenter`` (Sener & Savarese, ICLR 2018, Alg. 1 "k-Center-Greedy"): greedy farthest-point
  selection, u = argmax_{i ∉ s} min_{j ∈ s} ‖f(x_i) − f(x_j)‖. The paper starts from an existing
  labelled pool; a coreset has none, so the first center is the sample nearest the class mean
  feature (``start="mean"``, deterministic), or a seeded uniform sample (``start="random"``,
  the choice of DeepCore's implementation).

The embedding is that of a FARMED network: the final snapshot of an ``expert`` or ``pretrain``
trajectory from the store (``trajectory="auto"``: the first one, in store order, of kind
``expert``, else ``pretrain``; or an explicit trajectory id), in eval mode (BatchNorm models use
their stored running statistics). If the expert was trained on ZCA-whitened data, images are
whitened (the farm's fit) before embedding; the selected images are returned unwhitened, in the
dataset's normalised space, like every real image.

One-shot methods: the first ``step()`` (or ``synthetic_set()``) selects; later steps change
nothing and return the same metrics:
- ``loss``: mean over classes of ‖mean of the selected features − class mean feature‖₂
  (herding's objective; in the expert embedding for herding/kcenter, in pixel space for random,
  which loads no network);
- ``coverage_radius``: mean over classes of max_i min_j ‖f(x_i) − f(s_j)‖ (k-center's objective),
  in the same space;
- ``selected``: number of selected images; ``selection_time_s``: wall time of the selection.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .base import CondensationMethod, MethodConfig, PaperProtocol, register_method
from .initial import class_labels
from .inputs import TrajectoryNeed
from .synthetic import SyntheticSet

AUTO_KINDS = ("expert", "pretrain")  # store kinds searched by expert_kind="auto", in this order


# --------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class RandomConfig(MethodConfig):
    """Random selection has no knobs beyond dataset and ipc (the seed decides the sample)."""

    default_iterations: ClassVar[int] = 1
    published: ClassVar[tuple[tuple[str, int], ...]] = tuple((d, i) for d in ("fashion_mnist", "cifar10")
                                                             for i in (1, 10, 50))
    reported: ClassVar[dict[tuple[str, int], float]] = {  # DANCE Table 1 = PTLM Table 3
        ("fashion_mnist", 1): 51.4, ("fashion_mnist", 10): 73.8, ("fashion_mnist", 50): 82.5,
        ("cifar10", 1): 14.4, ("cifar10", 10): 26.0, ("cifar10", 50): 43.4}
    paper: ClassVar[PaperProtocol] = PaperProtocol(
        "DANCE Table 1 = PTLM Table 3", {"epochs": 300, "num_models": 10},
        notes="neither paper says how its coreset rows were measured (they match DC, ICLR 2021, Table 1: "
              "unconfirmed); raydd: the standard protocol, ConvNet-3 x 300 epochs, the 10 runs both papers state")


@dataclass(frozen=True)
class ExpertCoresetConfig(MethodConfig):
    """Knobs shared by the coresets that select in an expert's embedding."""

    trajectory: str = "auto"  # 'auto' or a trajectory id of the store
    expert_kind: str = "auto"  # 'auto' (expert, else pretrain) or a store kind
    model: str | None = None  # store model name filter, e.g. 'convnet3-w128-in'
    normalize: bool = False  # L2-normalise features first (iCaRL does; the DC benchmark does not)
    embed_batch: int | None = None  # images per forward when embedding the training set; None: 1024 on
    #                                 CUDA, on CPU a batch whose first activation fits in 16 MiB

    default_iterations: ClassVar[int] = 1
    published: ClassVar[tuple[tuple[str, int], ...]] = RandomConfig.published

    def needs(self) -> tuple[TrajectoryNeed, ...]:
        """One trained network (the first that fits, in store order; ``auto``: an expert, else a pretrain one)."""
        from ..farm.recipes import recipe_for_kind

        kinds = AUTO_KINDS if self.expert_kind == "auto" else (self.expert_kind,)
        recipe = recipe_for_kind(kinds[0])  # what is searched first is what to farm
        ids = None if self.trajectory == "auto" else (self.trajectory,)
        return (TrajectoryNeed(recipe, "trained networks", kinds=kinds, model=self.model, ids=ids, one_model=False),)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.trajectory.strip():
            raise ValueError(f"{type(self).__name__}.trajectory={self.trajectory!r} is invalid: "
                             f"expected 'auto' or a trajectory id")
        if not self.expert_kind.strip():
            raise ValueError(f"{type(self).__name__}.expert_kind={self.expert_kind!r} is invalid: "
                             f"expected 'auto' or a store kind such as expert, pretrain")
        self.check("embed_batch", low=1)


@dataclass(frozen=True)
class HerdingConfig(ExpertCoresetConfig):
    """Herding: no knobs of its own."""

    reported: ClassVar[dict[tuple[str, int], float]] = {  # DANCE Table 1 = PTLM Table 3
        ("fashion_mnist", 1): 67.0, ("fashion_mnist", 10): 71.1, ("fashion_mnist", 50): 71.9,
        ("cifar10", 1): 21.5, ("cifar10", 10): 31.6, ("cifar10", 50): 40.4}
    paper: ClassVar[PaperProtocol] = RandomConfig.paper


@dataclass(frozen=True)
class KCenterConfig(ExpertCoresetConfig):
    start: str = "mean"  # first center: 'mean' (nearest the class mean) or 'random' (seeded)

    reported: ClassVar[dict[tuple[str, int], float]] = {  # DANCE Table 1 = PTLM Table 3
        ("fashion_mnist", 1): 66.9, ("fashion_mnist", 10): 54.7, ("fashion_mnist", 50): 68.3,
        ("cifar10", 1): 21.5, ("cifar10", 10): 14.7, ("cifar10", 50): 27.0}
    paper: ClassVar[PaperProtocol] = RandomConfig.paper

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.start not in ("mean", "random"):
            raise ValueError(f"KCenterConfig.start={self.start!r} is invalid: accepted mean, random")


# --------------------------------------------------------------------------- selection rules
def herding(features: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (into ``features`` [n, d]) of k distinct samples chosen by herding, in order."""
    mu = features.mean(0)
    chosen = torch.zeros(features.shape[0], dtype=torch.bool, device=features.device)
    running = torch.zeros_like(mu)  # Σ of the selected features
    order = []
    for step in range(1, k + 1):
        # ‖μ − (running + f)/step‖ ∝ ‖step·μ − running − f‖
        dist = (step * mu - running - features).pow(2).sum(1)
        dist[chosen] = float("inf")
        p = int(dist.argmin())
        chosen[p] = True
        running += features[p]
        order.append(p)
    return torch.tensor(order, dtype=torch.long)


def k_center_greedy(features: torch.Tensor, k: int, first: int) -> torch.Tensor:
    """Indices of k distinct samples: ``first``, then repeatedly the farthest from its nearest center."""
    order = [first]
    chosen = torch.zeros(features.shape[0], dtype=torch.bool, device=features.device)
    chosen[first] = True
    nearest = (features - features[first]).pow(2).sum(1)  # squared distance to the nearest center
    for _ in range(k - 1):
        p = int(nearest.masked_fill(chosen, -float("inf")).argmax())  # duplicates of centers never re-picked
        order.append(p)
        chosen[p] = True
        nearest = torch.minimum(nearest, (features - features[p]).pow(2).sum(1))
    return torch.tensor(order, dtype=torch.long)


def selection_metrics(features: torch.Tensor, labels: torch.Tensor, selected: torch.Tensor,
                      num_classes: int) -> dict[str, float]:
    """Class-mean distance and coverage radius of ``selected`` (indices into features), class-averaged."""
    mean_dist, radius = [], []
    sel_labels = labels[selected]
    for c in range(num_classes):
        pool = features[labels == c]
        chosen = features[selected[sel_labels == c]]
        mean_dist.append(float((chosen.mean(0) - pool.mean(0)).norm()))
        radius.append(float(torch.cdist(pool.double(), chosen.double()).min(1).values.max()))
    return {"loss": sum(mean_dist) / num_classes, "coverage_radius": sum(radius) / num_classes}


# --------------------------------------------------------------------------- the expert embedding
@torch.no_grad()
def embed_images(net: torch.nn.Module, images: torch.Tensor, *, batch: int, device: torch.device) -> torch.Tensor:
    """Features ``net.embed`` of ``images`` [N, C, H, W], computed in batches (float32, on ``device``)."""
    return torch.cat([net.embed(images[i:i + batch].to(device)).float() for i in range(0, len(images), batch)])


# --------------------------------------------------------------------------- methods
class CoresetMethod(CondensationMethod):
    """One-shot selection of ``ipc`` training images per class (see the module doc)."""

    def __init__(self, config, train, store=None, *, device="auto", seed: int = 0) -> None:
        super().__init__(config, train, store, device=device, seed=seed)
        self.selected: torch.Tensor | None = None  # training-set indices, class by class, in selection order
        self._metrics: dict[str, float] | None = None

    def _space(self) -> torch.Tensor:
        """[N, d] vectors of the training set in which selection and metrics happen."""
        raise NotImplementedError

    def _select_class(self, features: torch.Tensor) -> torch.Tensor:
        """Positions (into one class's ``features``) of the ``ipc`` selected samples."""
        raise NotImplementedError

    def _ensure_selected(self) -> None:
        if self.selected is not None:
            return
        started = time.perf_counter()
        space = self._space()
        labels = self.train.labels.to(space.device)
        picks = []
        for c in range(self.train.info.num_classes):
            idx = self.train.class_indices(c)
            picks.append(idx[self._select_class(space[idx.to(space.device)]).cpu()])
        self.selected = torch.cat(picks)
        metrics = selection_metrics(space, labels, self.selected.to(space.device), self.train.info.num_classes)
        self._metrics = {**metrics, "selected": float(len(self.selected)),
                         "selection_time_s": time.perf_counter() - started}

    def step(self) -> dict[str, float]:
        self._ensure_selected()
        self._iteration += 1
        return dict(self._metrics)

    def synthetic_set(self) -> SyntheticSet:
        self._ensure_selected()
        ipc, k = self.config.ipc, self.train.info.num_classes
        return self._synthetic(self.train.images[self.selected].detach().cpu().clone(), class_labels(k, ipc),
                               {"indices": self.selected.tolist(), "seed": self.seed, **self._provenance()})

    def _provenance(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update({"selected": None if self.selected is None else self.selected.clone(),
                      "selection_metrics": None if self._metrics is None else dict(self._metrics)})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        selected = state.get("selected")
        self.selected = None if selected is None else selected.to(torch.long).clone()
        self._metrics = None if state.get("selection_metrics") is None else dict(state["selection_metrics"])


@register_method
class RandomCoreset(CoresetMethod):
    name = "random"
    label = "Random"
    config_cls = RandomConfig

    def _space(self) -> torch.Tensor:
        return self.train.images.flatten(1)  # pixels: random selection loads no network

    def _select_class(self, features: torch.Tensor) -> torch.Tensor:
        return torch.randperm(features.shape[0], generator=self.generator)[:self.config.ipc]


class ExpertCoreset(CoresetMethod):
    """Selection in the embedding of a farmed expert's final snapshot."""

    def __init__(self, config, train, store=None, *, device="auto", seed: int = 0) -> None:
        super().__init__(config, train, store, device=device, seed=seed)
        self.candidates = self.inputs.find(self.config.needs()[0])
        self.expert = self.candidates[0]
        self._features: torch.Tensor | None = None

    @property
    def features(self) -> torch.Tensor:
        """Expert features of every training image [N, d] (computed once; L2-normalised if configured)."""
        if self._features is None:
            nets = []
            for info in self.candidates:  # the first healthy one (a corrupt one is reported and skipped)
                nets = self.inputs.healthy([info], lambda i: self.inputs.network(i, self.device))
                if nets:
                    self.expert = info
                    break
            if not nets:
                raise self.inputs.missing(f"all {len(self.candidates)} candidate networks are corrupt")
            net = nets[0]
            images = self.inputs.training_view(self.expert.meta).model_space(self.train.images)  # the farm's ZCA
            batch = self.config.embed_batch or self._default_embed_batch(images)
            feats = embed_images(net, images, batch=batch, device=self.device)
            if self.config.normalize:
                feats = torch.nn.functional.normalize(feats, dim=1)
            self._features = feats
        return self._features

    def _default_embed_batch(self, images: torch.Tensor) -> int:
        """1024 on CUDA; on CPU as many images as keep the first activation under 16 MiB (larger
        buffers are mmap-allocated and page-faulted in on every batch: measured 2-3x slower)."""
        if self.device.type != "cpu":
            return 1024
        width = int(self.expert.meta["model"]["width"])
        per_image = width * (images.shape[-2] + 4) * (images.shape[-1] + 4) * 4
        return max(1, (16 * 2 ** 20) // per_image)

    def _space(self) -> torch.Tensor:
        return self.features

    def _provenance(self) -> dict[str, Any]:
        return {"expert": self.expert.trajectory_id, "expert_kind": self.expert.kind,
                "expert_epoch": max(self.expert.epochs), "expert_model": self.expert.meta["model"],
                "store": str(self.store.root)}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["expert"] = self.expert.trajectory_id
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("expert") != self.expert.trajectory_id:
            raise ValueError(f"checkpoint selected with expert {state.get('expert')!r}, but this method embeds "
                             f"with {self.expert.trajectory_id!r}: pass trajectory={state.get('expert')!r}")
        super().load_state_dict(state)


@register_method
class HerdingCoreset(ExpertCoreset):
    name = "herding"
    label = "Herding"
    config_cls = HerdingConfig

    def _select_class(self, features: torch.Tensor) -> torch.Tensor:
        return herding(features, self.config.ipc)


@register_method
class KCenterCoreset(ExpertCoreset):
    name = "kcenter"
    label = "K-Center"
    config_cls = KCenterConfig

    def _select_class(self, features: torch.Tensor) -> torch.Tensor:
        if self.config.start == "mean":
            first = int((features - features.mean(0)).pow(2).sum(1).argmin())
        else:
            first = int(torch.randint(features.shape[0], (1,), generator=self.generator))
        return k_center_greedy(features, self.config.ipc, first)
