"""DD-Ranking's robustness scores of a distilled set (Li et al. 2025; NUS-HPC-AI-Lab/DD-Ranking).

    HLR = acc(full training set) - acc(set, hard labels)          hard-label recovery (lower is better)
    IOR = acc(set) - acc(random real subset, same size)           improvement over random (higher is better)
    LRS = (e^a - e^-1) / (e - e^-1),  a = λ·IOR - (1-λ)·HLR      label-robust score, in [0, 1]
    ARS = (e^b - e^-1) / (e - e^-1),  b = γ·G_aug + (1-γ)·G_none  augmentation-robust score, in [0, 1]

where G_aug / G_none are the set-minus-random gaps trained with / without augmentation (DSA).

What raydd does differently from DD-Ranking v0.2.0, on purpose:
- accuracies are fractions, so a, b lie in [-1, 1] and the scores in [0, 1] (v0.2.0 feeds percentages
  into the exponentials: e^(±tens), an unbounded score that mostly measures the sign of a);
- run i is seeded with ``seed + i`` (network initialisation, batch order, augmentation draws and the
  random subset), so a score is reproducible (v0.2.0 seeds from the clock); each LRS counted once;
- each accuracy is one network's FINAL test accuracy under raydd's standard protocol (v0.2.0 keeps the
  best of the checks every 10 epochs over the last 20 %): raydd never reports a best epoch.

Kept from DD-Ranking: λ = γ = 0.5; a learning rate searched over (0.001, 0.005, 0.01, 0.05, 0.1),
keeping the one with the best test accuracy, for the random subset always and for the set when it
carries no learned step size (and no lr is given); the full-data accuracy measured once (or given);
random subsets drawn class by class from the whole training split.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch

from ..data.datasets import ImageDataset
from ..validation import check_int, check_range
from .standard import DEFAULT_LR, EvalConfig, train_and_test

METRICS = ("hlr", "ior", "lrs", "ars")
LR_GRID = (0.001, 0.005, 0.01, 0.05, 0.1)  # DD-Ranking's search grid


def _normalised_exp(x: float) -> float:
    """(e^x - e^-1) / (e - e^-1): maps [-1, 1] onto [0, 1], increasing."""
    return (math.exp(x) - math.exp(-1.0)) / (math.exp(1.0) - math.exp(-1.0))


def _check_fraction(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and -1.0 <= value <= 1.0):
        raise ValueError(f"{name}={value!r} is not an accuracy difference in [-1, 1]: pass accuracies as "
                         f"fractions (0.85, not 85)")


def label_robust_score(ior: float, hlr: float, lam: float = 0.5) -> float:
    """LRS = (e^a - e^-1)/(e - e^-1) with a = λ·IOR - (1-λ)·HLR; IOR and HLR as fractions."""
    _check_fraction("ior", ior)
    _check_fraction("hlr", hlr)
    check_range("lrs_lambda", lam, low=0, high=1)
    return _normalised_exp(lam * ior - (1.0 - lam) * hlr)


def augmentation_robust_score(gap_with_aug: float, gap_without_aug: float, gamma: float = 0.5) -> float:
    """ARS = (e^b - e^-1)/(e - e^-1) with b = γ·(set - random, with aug) + (1-γ)·(set - random, without)."""
    _check_fraction("gap_with_aug", gap_with_aug)
    _check_fraction("gap_without_aug", gap_without_aug)
    check_range("ars_gamma", gamma, low=0, high=1)
    return _normalised_exp(gamma * gap_with_aug + (1.0 - gamma) * gap_without_aug)


@dataclass(frozen=True)
class RobustnessConfig:
    """Which scores, how many seeded runs, the weights λ (LRS) and γ (ARS), the lr grid, and the
    full-data accuracy (a known fraction, or None: one network trained on the training split for
    ``full_epochs`` epochs, default the protocol's, at lr 0.01)."""

    metrics: tuple[str, ...] = METRICS
    runs: int = 5  # DD-Ranking's num_eval
    lrs_lambda: float = 0.5
    ars_gamma: float = 0.5
    lr_grid: tuple[float, ...] = LR_GRID
    full_acc: float | None = None
    full_epochs: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        metrics = (self.metrics,) if isinstance(self.metrics, str) else tuple(self.metrics or ())
        unknown = [m for m in metrics if m not in METRICS]
        if not metrics or unknown:
            raise ValueError(f"metrics {list(metrics)!r} are invalid: accepted one or more of {', '.join(METRICS)}")
        object.__setattr__(self, "metrics", tuple(m for m in METRICS if m in metrics))
        check_int("RobustnessConfig.runs", self.runs)
        check_int("RobustnessConfig.seed", self.seed, low=0)
        check_int("RobustnessConfig.full_epochs", self.full_epochs, none_ok=True)
        check_range("RobustnessConfig.lrs_lambda", self.lrs_lambda, low=0, high=1)
        check_range("RobustnessConfig.ars_gamma", self.ars_gamma, low=0, high=1)
        check_range("RobustnessConfig.full_acc", self.full_acc, low=0, high=1, none_ok=True)
        grid = tuple(self.lr_grid) if isinstance(self.lr_grid, (list, tuple)) else ()
        if not grid:
            raise ValueError(f"RobustnessConfig.lr_grid={self.lr_grid!r} is invalid: expected positive lrs")
        for i, lr in enumerate(grid):
            check_range(f"RobustnessConfig.lr_grid[{i}]", lr, low=0, low_open=True)
        object.__setattr__(self, "lr_grid", tuple(float(lr) for lr in grid))

    def to_dict(self) -> dict:
        return {**asdict(self), "metrics": list(self.metrics), "lr_grid": list(self.lr_grid)}


@dataclass
class RobustnessResult:
    """Per-run accuracies (fractions), learning rates and scores, and their mean ± std (population)."""

    metrics: tuple[str, ...]
    full_acc: float
    runs: list[dict[str, float]] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    def values(self, name: str) -> list[float]:
        return [run[name] for run in self.runs]

    def mean(self, name: str) -> float:
        return statistics.fmean(self.values(name))

    def std(self, name: str) -> float:
        values = self.values(name)
        return statistics.pstdev(values) if len(values) > 1 else 0.0

    def summary(self) -> dict[str, float]:
        """{metric: mean, metric_std: std} for the asked metrics."""
        out: dict[str, float] = {}
        for name in self.metrics:
            out[name], out[f"{name}_std"] = self.mean(name), self.std(name)
        return out

    def to_dict(self) -> dict:
        return {**asdict(self), "metrics": list(self.metrics), "summary": self.summary()}

    def __str__(self) -> str:
        lines = [f"robustness over {len(self.runs)} seeded run(s) (DD-Ranking's scores, accuracies as fractions; "
                 f"full data {100 * self.full_acc:.2f} %)", "| score | mean ± std | per run |", "|---|---:|---|"]
        for name in self.metrics:
            per_run = ", ".join(f"{v:.4f}" for v in self.values(name))
            lines.append(f"| {name.upper()} | {self.mean(name):.4f} ± {self.std(name):.4f} | {per_run} |")
        return "\n".join(lines)


def random_subset(train: ImageDataset, per_class: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class[c]`` training images of each class c, drawn without replacement with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    picked = []
    for c, n in enumerate(per_class):
        idx = torch.nonzero(train.labels == c).flatten()
        if n > len(idx):
            raise ValueError(f"a random subset needs {n} images of class {c} but the training split has {len(idx)}")
        picked.append(idx[torch.randperm(len(idx), generator=gen)[:n]])
    chosen = torch.cat(picked)
    return train.images[chosen], train.labels[chosen]


def check_scores(eval_config, syn=None, metrics=METRICS) -> None:
    """One-line errors before any work: the scores run on the standard protocol, and a soft-label set
    (``syn``, when known) gets HLR only."""
    if not isinstance(eval_config, EvalConfig):
        raise ValueError(f"robustness scores run on the standard protocol: the evaluation config is "
                         f"{type(eval_config).__name__}")
    if syn is not None and syn.soft and set(metrics) & {"ior", "lrs", "ars"}:
        raise ValueError("ior, lrs and ars of a soft-label set compare it with a random subset relabelled by the "
                         "teacher models that made its labels, which a saved set does not carry: ask for hlr only")


def robustness_metrics(syn, train: ImageDataset, test: ImageDataset, config: RobustnessConfig | None = None,
                       eval_config: EvalConfig | None = None, *,
                       on_network: Callable[[str], None] | None = None) -> RobustnessResult:
    """DD-Ranking's scores of the synthetic set ``syn`` (see the module docstring), each network trained
    with ``eval_config``'s standard protocol (its model, epochs, batch, DSA; one network per accuracy).

    ``train`` is the real training split the set was distilled from (random subsets, full data), ``test``
    the real test split, both in the dataset's normalisation (ZCA sets: whitened here with the set's ZCA).
    ``on_network(what)`` is called after every network trained (progress)."""
    config = config or RobustnessConfig()
    eval_config = eval_config or EvalConfig()
    check_scores(eval_config, syn, config.metrics)
    info = syn.info
    wants = set(config.metrics)
    hard = syn.hard_labels
    per_class = torch.bincount(hard, minlength=info.num_classes).tolist()
    zca = syn.zca_whitening()
    if zca is not None:
        train, test = zca.whiten(train), zca.whiten(test)
    syn_lr = eval_config.lr if eval_config.lr is not None else syn.syn_lr
    syn_lr = None if syn_lr is None else float(syn_lr)
    images, labels = syn.images.detach().float(), (syn.labels.float() if syn.soft else syn.labels)

    def accuracy(x: torch.Tensor, y: torch.Tensor, lr: float, seed: int, dsa: bool, what: str) -> float:
        cfg = replace(eval_config, num_models=1, seed=seed, dsa=dsa, lr=lr)
        acc = train_and_test(x, y, test, info, cfg, lr=lr).accuracies[0]
        if on_network is not None:
            on_network(what)
        return acc

    def best_over_grid(x, y, seed: int, dsa: bool, what: str) -> tuple[float, float]:
        """(best test accuracy, its lr) over the grid; the first lr wins a tie, as DD-Ranking's strict >."""
        best_acc, best_lr = -1.0, config.lr_grid[0]
        for lr in config.lr_grid:
            acc = accuracy(x, y, lr, seed, dsa, what)
            if acc > best_acc:
                best_acc, best_lr = acc, lr
        return best_acc, best_lr

    def set_accuracy(x, y, seed: int, dsa: bool, what: str, lr: float | None) -> tuple[float, float]:
        return (accuracy(x, y, lr, seed, dsa, what), lr) if lr is not None else best_over_grid(x, y, seed, dsa, what)

    full_acc = config.full_acc
    if full_acc is None and wants & {"hlr", "lrs"}:  # once per call (DD-Ranking: a cached number, or per run)
        full_cfg = replace(eval_config, num_models=1, seed=config.seed, lr=DEFAULT_LR,
                           epochs=config.full_epochs or eval_config.epochs)
        full_acc = train_and_test(train.images, train.labels, test, info, full_cfg, lr=DEFAULT_LR).accuracies[0]
        if on_network is not None:
            on_network("full data")
    result = RobustnessResult(config.metrics, float("nan") if full_acc is None else full_acc,
                              config=config.to_dict())
    for i in range(config.runs):
        seed = config.seed + i
        run: dict[str, float] = {"seed": seed}
        run["set"], run["set_lr"] = set_accuracy(images, labels, seed, True, "set", syn_lr)
        if wants & {"hlr", "lrs"}:
            if syn.soft:  # the set's images with hard labels: DD-Ranking searches the lr for them
                run["set_hard"], run["set_hard_lr"] = best_over_grid(images, hard, seed, True, "set, hard labels")
            else:
                run["set_hard"] = run["set"]
            run["hlr"] = full_acc - run["set_hard"]
        if wants & {"ior", "lrs", "ars"}:
            rx, ry = random_subset(train, per_class, seed)
            run["random"], run["random_lr"] = best_over_grid(rx, ry, seed, True, "random subset")
            run["ior"] = run["set"] - run["random"]
            if "ars" in wants:
                run["set_no_aug"], _ = set_accuracy(images, labels, seed, False, "set, no augmentation", syn_lr)
                run["random_no_aug"], _ = best_over_grid(rx, ry, seed, False, "random subset, no augmentation")
                run["ars"] = augmentation_robust_score(run["ior"], run["set_no_aug"] - run["random_no_aug"],
                                                       config.ars_gamma)
        if "lrs" in wants:
            run["lrs"] = label_robust_score(run["ior"], run["hlr"], config.lrs_lambda)
        result.runs.append(run)
    return result


def networks_per_call(syn, config: RobustnessConfig, eval_config: EvalConfig | None = None) -> int:
    """How many networks ``robustness_metrics`` trains (for a progress bar)."""
    eval_config = eval_config or EvalConfig()
    wants = set(config.metrics)
    grid = len(config.lr_grid)
    set_nets = 1 if (eval_config.lr is not None or syn.syn_lr is not None) else grid
    per_run = set_nets
    if wants & {"hlr", "lrs"} and syn.soft:
        per_run += grid
    if wants & {"ior", "lrs", "ars"}:
        per_run += grid
        if "ars" in wants:
            per_run += set_nets + grid
    full = 1 if config.full_acc is None and wants & {"hlr", "lrs"} else 0
    return full + config.runs * per_run
