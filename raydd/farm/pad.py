"""PAD's experts: MTT experts trained on a difficulty curriculum (Li et al., "Prioritize Alignment in Dataset
Distillation"; reference NUS-HPC-AI-Lab/PAD, buffer/buffer_CL.py and utils/utils_cl_scheduler.py).

PAD's first filter ("information extraction") decides which real images each expert epoch trains on, so that
the early epochs (matched by small IPCs) see easy images and the late ones (matched by large IPCs) hard ones:

- difficulty: EL2N (Paul et al. 2021), score(x, y) = mean_k ‖softmax(f_k(x)) − onehot(y)‖₂ over ``score_models``
  networks after ``score_epoch`` epochs of training. raydd takes those networks from the store: plain ``expert``
  trajectories of the same data and model at their snapshot ``score_epoch`` (their first epochs are exactly
  networks trained that long), resolved before the trajectory id is hashed (``scorers`` names them);
- per class, the images are ranked easy (low score) to hard; the epoch ``e`` (0-based, as buffer_CL.py counts)
  trains on the slice of each class's ranking
      e <= add_end_epoch:                 the easiest p(e) = min(1, init_ratio + (1 − init_ratio)·e/add_end_epoch)
      add_end_epoch < e <= rm_epoch_first: all
      rm_epoch_first < e <= rm_epoch_second: all but the easiest rm_easy_ratio_first
      later:                              all but the easiest rm_easy_ratio_second
  (buffer_CL.py's train loop; its ``int(p · 5000)`` per class is ``int(p · n_c)`` here, n_c the class's size).

Each trajectory's metadata records the scorers, their epoch and digests of the scores and of the ranking
(``difficulty``); its recipe config the curriculum; its metric ``train_images`` each epoch's image count.
Everything else is the ``expert`` recipe (SGD lr 0.01, momentum 0, batch 256, DSA, a snapshot per epoch). The
reference trains these experts with GSAM (FTD's optimiser, rho 0.01, alpha 0.3 in its README command) and
ranks by precomputed DeepCore scores (its README command reads ``CIFAR10_GraNd.pt``; the paper names EL2N):
both are departures, listed in ``raydd methods pad``.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from ..models import ModelSpec, build_model, load_flat_params
from ..store import TrajectoryStore
from ..training import PRECISIONS
from ..validation import check_int, check_range
from .recipes import (METRIC_NAMES, ExpertConfig, Recipe, RecipeContext, SnapshotSink, _fit, _one_or_many, _sgd,
                      register_recipe)

KIND = "pad_expert"
SCORER_RECIPE = "expert"


@dataclass(frozen=True)
class PADExpertConfig(ExpertConfig):
    """The expert recipe plus PAD's curriculum. Defaults: the reference README's CIFAR-10 command
    (``--init_ratio=0.75 --add_end_epoch=20 --rm_epoch_first=40 --rm_epoch_second=60 --rm_easy_ratio_first=0.1
    --rm_easy_ratio_second=0.2``, 100 epochs); EL2N after 20 epochs averaged over 10 networks (Paul et al.)."""

    epochs: int = 100
    init_ratio: float = 0.75  # fraction of each class's easiest images the first epoch trains on
    add_end_epoch: int = 20  # the epoch (0-based) by which the hard images have all been added
    rm_epoch_first: int = 40  # after it, the easiest rm_easy_ratio_first are left out
    rm_epoch_second: int = 60  # after it, the easiest rm_easy_ratio_second
    rm_easy_ratio_first: float = 0.1
    rm_easy_ratio_second: float = 0.2
    score_models: int = 10  # networks whose EL2N is averaged
    score_epoch: int = 20  # their training epochs (the snapshot read)
    scorers: tuple[str, ...] | str = "auto"  # "auto": resolved to plain expert ids before hashing

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("init_ratio", self.init_ratio, low=0, high=1, low_open=True)
        check_int("add_end_epoch", self.add_end_epoch)
        check_int("rm_epoch_first", self.rm_epoch_first, low=0)
        check_int("rm_epoch_second", self.rm_epoch_second, low=0)
        if not self.add_end_epoch <= self.rm_epoch_first <= self.rm_epoch_second:
            raise ValueError(f"add_end_epoch={self.add_end_epoch}, rm_epoch_first={self.rm_epoch_first}, "
                             f"rm_epoch_second={self.rm_epoch_second} are invalid: expected add_end_epoch <= "
                             f"rm_epoch_first <= rm_epoch_second")
        for key in ("rm_easy_ratio_first", "rm_easy_ratio_second"):
            check_range(key, getattr(self, key), low=0, high=1, high_open=True)
        check_int("score_models", self.score_models)
        check_int("score_epoch", self.score_epoch)
        scorers = self.scorers
        if isinstance(scorers, list):
            object.__setattr__(self, "scorers", tuple(scorers))
        elif scorers != "auto" and not isinstance(scorers, tuple):
            raise ValueError(f"scorers={scorers!r} is invalid: expected 'auto' or a list of expert trajectory ids")
        if isinstance(self.scorers, tuple) and len(self.scorers) != self.score_models:
            raise ValueError(f"scorers names {len(self.scorers)} trajectories but score_models={self.score_models}")

    def kept_fractions(self, epoch: int) -> tuple[float, float]:
        """(from, to): the slice of each class's easy-to-hard ranking that epoch ``epoch`` (0-based) trains on."""
        if epoch <= self.add_end_epoch:
            return 0.0, min(1.0, self.init_ratio + (1.0 - self.init_ratio) * epoch / self.add_end_epoch)
        if epoch <= self.rm_epoch_first:
            return 0.0, 1.0
        if epoch <= self.rm_epoch_second:
            return self.rm_easy_ratio_first, 1.0
        return self.rm_easy_ratio_second, 1.0


def el2n_scores(networks: list[torch.nn.Module], images: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
                device: torch.device, batch: int = 1024) -> torch.Tensor:
    """EL2N per image: mean over ``networks`` (eval mode) of ‖softmax(f(x)) − onehot(y)‖₂."""
    total = torch.zeros(len(images), dtype=torch.float64)
    with torch.no_grad():
        for net in networks:
            net.eval()
            parts = []
            for x, y in zip(images.split(batch), labels.split(batch)):
                p = F.softmax(net(x.to(device)).double(), dim=1).cpu()
                parts.append((p - F.one_hot(y, num_classes).double()).norm(dim=1))
            total += torch.cat(parts)
    return (total / len(networks)).float()


def easy_to_hard(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[torch.Tensor]:
    """Per class, its image indices ranked by score, easiest first (ties: lower index first)."""
    order = []
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).flatten()
        order.append(idx[torch.sort(scores[idx], stable=True).indices])
    return order


def curriculum_indices(cfg: PADExpertConfig, ranking: list[torch.Tensor], epoch: int) -> torch.Tensor:
    """The training images of raydd epoch ``epoch`` (1-based; buffer_CL.py's e = epoch − 1), class by class."""
    low, high = cfg.kept_fractions(epoch - 1)
    return torch.cat([idx[int(low * len(idx)):int(high * len(idx))] for idx in ranking])


def resolve_scorers(cfg: PADExpertConfig, store_root: str, dataset: dict, model: dict) -> tuple[str, ...]:
    """``score_models`` plain expert ids of the same data and model storing epoch ``score_epoch`` (by seed)."""
    store = TrajectoryStore(store_root)
    fingerprint = dataset.get("fingerprint")
    if cfg.scorers != "auto":
        for tid in cfg.scorers:
            if not store.exists(tid):
                raise ValueError(f"scorer {tid!r} is not in store {store_root}: farm plain experts "
                                 f"(raydd farm --recipe {SCORER_RECIPE}) or pass --set scorers=auto")
        return tuple(cfg.scorers)
    found = []
    for info in store.list(dataset=dataset["name"], kind="expert", recipe=SCORER_RECIPE, model=model["name"]):
        meta = info.meta
        if meta["dataset"].get("fingerprint") != fingerprint or bool(meta["dataset"].get("zca")) != \
                bool(dataset.get("zca")):
            continue
        keep_to = meta["recipe_config"].get("keep_epochs")
        epochs = int(meta["recipe_config"]["epochs"])
        if epochs >= cfg.score_epoch and (keep_to is None or keep_to >= cfg.score_epoch):
            found.append((int(meta["seed"]), info.trajectory_id))
    found.sort()
    if len(found) < cfg.score_models:
        raise ValueError(f"PAD's difficulty scores need {cfg.score_models} plain experts of {dataset['name']} "
                         f"({model['name']}, zca={bool(dataset.get('zca'))}) storing epoch {cfg.score_epoch}; store "
                         f"{store_root} has {len(found)}: farm them first (raydd farm --recipe {SCORER_RECIPE} "
                         f"--trajectories {cfg.score_models} --epochs {cfg.score_epoch}, same data and model)")
    return tuple(tid for _, tid in found[:cfg.score_models])


def prepare_pad_expert(cfg: PADExpertConfig, store_root: str, dataset: dict, model: dict) -> PADExpertConfig:
    """Runs before the trajectory id is hashed: the id then names the concrete scorers."""
    return dataclasses.replace(cfg, scorers=resolve_scorers(cfg, store_root, dataset, model))


def difficulty_ranking(cfg: PADExpertConfig, ctx: RecipeContext) -> list[torch.Tensor]:
    """Each class's images ranked easy to hard by ``difficulty_scores``."""
    return easy_to_hard(difficulty_scores(cfg, ctx), ctx.train.labels, ctx.train.info.num_classes)


def derive_pad_expert(cfg: PADExpertConfig, ctx: RecipeContext) -> tuple[list[torch.Tensor], dict]:
    """The ranking the task's experts train on, and what every pad_expert trajectory stores of it: the score, its
    networks, digests of the scores and of the ranking (with the curriculum in its recipe config: what each epoch
    trained on)."""
    scores = difficulty_scores(cfg, ctx)
    ranking = easy_to_hard(scores, ctx.train.labels, ctx.train.info.num_classes)
    return ranking, {"difficulty": {
        "score": "el2n", "scorers": list(cfg.scorers), "score_epoch": cfg.score_epoch,
        "scores_sha256": hashlib.sha256(scores.numpy().tobytes()).hexdigest(),
        "ranking_sha256": ranking_digest(ranking),
        "class_mean_score": [round(float(scores[idx].mean()), 6) for idx in ranking]}}


def ranking_digest(ranking: list[torch.Tensor]) -> str:
    """sha256 of the per-class easy-to-hard image indices (int64, class by class)."""
    return hashlib.sha256(torch.cat(ranking).to(torch.int64).numpy().tobytes()).hexdigest()


def difficulty_scores(cfg: PADExpertConfig, ctx: RecipeContext) -> torch.Tensor:
    """EL2N of every training image: the scorers' snapshots ``score_epoch``, loaded from the store."""
    if cfg.scorers == "auto":
        raise ValueError("scorers='auto' was not resolved: the farm resolves it in Recipe.prepare before hashing "
                         "the trajectory id; when calling the recipe directly pass the scorer ids")
    if ctx.store_root is None:
        raise ValueError("the pad_expert recipe reads its scorers from the store: RecipeContext.store_root is None")
    store, fingerprint, networks = TrajectoryStore(ctx.store_root), ctx.train.fingerprint(), []
    for tid in cfg.scorers:
        with store.open(tid) as traj:
            if traj.meta["dataset"].get("fingerprint") != fingerprint:
                raise ValueError(f"scorer {tid} was trained on other data (fingerprint "
                                 f"{traj.meta['dataset'].get('fingerprint')}, this farm's {fingerprint})")
            if cfg.score_epoch not in traj.epochs:
                raise ValueError(f"scorer {tid} does not store epoch {cfg.score_epoch}")
            spec = ModelSpec.from_dict(traj.meta["model"])
            net = load_flat_params(build_model(spec), traj.params(cfg.score_epoch, dtype=torch.float32).clone(),
                                   traj.buffers(cfg.score_epoch, dtype=torch.float32))
        networks.append(net.to(ctx.device))
    return el2n_scores(networks, ctx.train.images, ctx.train.labels, ctx.train.info.num_classes, device=ctx.device)


class _CountingSink:
    """Adds the epoch's number of training images (``train_images``) to each snapshot's metrics."""

    def __init__(self, sink: SnapshotSink, counts: dict[int, int]) -> None:
        self.sink, self.counts = sink, counts

    def append(self, epoch, params, *, buffers=None, metrics=None) -> None:
        self.sink.append(epoch, params, buffers=buffers,
                         metrics={**(metrics or {}), "train_images": float(self.counts.get(epoch, float("nan")))})

    def __getattr__(self, name):  # keep_resume_state and friends, where the sink has them
        return getattr(self.sink, name)


def run_pad_expert(cfg: PADExpertConfig, ctx, sink):
    first = ctx[0] if isinstance(ctx, list) else ctx
    ranking = first.derived if first.derived is not None else difficulty_ranking(cfg, first)  # the farm derives it
    counts: dict[int, int] = {0: 0}

    def epoch_indices(epoch: int) -> torch.Tensor:
        idx = curriculum_indices(cfg, ranking, epoch)
        counts[epoch] = len(idx)
        return idx

    keep_to = cfg.epochs if cfg.keep_epochs is None else cfg.keep_epochs
    return _one_or_many(ctx, sink, lambda ctxs, sinks: _fit(
        cfg, ctxs, [_CountingSink(s, counts) for s in sinks], keep=lambda e: e <= keep_to, optimizer_for=_sgd(cfg),
        epoch_indices=epoch_indices))


register_recipe(Recipe("pad_expert", KIND, PADExpertConfig, run_pad_expert, trains_together=True,
                       metric_names=METRIC_NAMES + ("train_images",), prepare=prepare_pad_expert,
                       derive=derive_pad_expert,
                       precisions=PRECISIONS))
