"""The referee table: several distilled sets (anyone's, imported) under several protocols, one table.

Each set is evaluated under each protocol (and network) with the same settings, beside Random: a random real
subset with each set's images per class (seeded), evaluated the same way, so that a protocol's own effect (soft
labels, relabelling, longer training) is visible next to the set's. DD-Ranking's robustness scores (HLR, IOR,
LRS, ARS; accuracies as fractions) are added under the standard protocol where asked (a soft-label set: HLR
only, see ``check_scores``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from ..data.datasets import ImageDataset
from ..methods.synthetic import SyntheticSet
from . import evaluate
from .robustness import RobustnessConfig, RobustnessResult, random_subset, robustness_metrics
from .standard import EvalConfig, EvalResult


@dataclass
class RefereeRow:
    name: str  # the set's file (or "Random, N per class")
    protocol: str
    model: str
    result: EvalResult
    robustness: RobustnessResult | None = None


def random_like(syn: SyntheticSet, train: ImageDataset, seed: int) -> SyntheticSet:
    """Random: as many random real training images per class as ``syn`` has (hard labels), seeded."""
    per_class = torch.bincount(syn.hard_labels, minlength=syn.info.num_classes).tolist()
    images, labels = random_subset(train, per_class, seed)
    return SyntheticSet(images=images.clone(), labels=labels.clone(), dataset={**train.info.to_dict(), "zca": False},
                        method="random", meta={"seed": seed, "per_class": per_class})


def check_same_data(sets: list[tuple[str, SyntheticSet]]) -> None:
    """One line before any work when the sets were not distilled from the same data (shape, classes)."""
    first_name, first = sets[0]
    key = (first.dataset["name"], tuple(first.dataset["resolution"]), first.dataset["channels"])
    for name, syn in sets[1:]:
        other = (syn.dataset["name"], tuple(syn.dataset["resolution"]), syn.dataset["channels"])
        if other != key:
            raise ValueError(f"{name} holds {other[0]} {other[2]}x{other[1][0]}x{other[1][1]} images but {first_name} "
                             f"{key[0]} {key[2]}x{key[1][0]}x{key[1][1]}: the referee table compares sets of one dataset")


def referee(sets: list[tuple[str, SyntheticSet]], train: ImageDataset, test: ImageDataset,
            configs: list[tuple[str, str, object]], *, scores: RobustnessConfig | None = None, seed: int = 0,
            on_row: Callable[[RefereeRow], None] | None = None) -> list[RefereeRow]:
    """Every set and a Random per distinct images-per-class, under every ``(protocol, model name, config)``."""
    check_same_data(sets)
    entries = list(sets)
    seen = set()
    for _, syn in sets:
        per_class = tuple(torch.bincount(syn.hard_labels, minlength=syn.info.num_classes).tolist())
        if per_class not in seen:
            seen.add(per_class)
            counts = sorted(set(per_class))
            label = f"Random, {counts[0]} per class" if len(counts) == 1 else f"Random, {min(counts)}-{max(counts)} per class"
            entries.append((label, random_like(syn, train, seed)))
    rows = []
    for protocol, model, config in configs:
        config_scores = scores  # the full-data network: trained once per network and protocol, not per set
        for name, syn in entries:
            result = evaluate(syn, test, config)
            robustness = None
            if config_scores is not None and isinstance(config, EvalConfig):
                metrics = config_scores.metrics if not syn.soft else ("hlr",) if "hlr" in config_scores.metrics else ()
                if metrics:
                    robustness = robustness_metrics(syn, train, test, replace(config_scores, metrics=metrics), config)
                    if config_scores.full_acc is None and "hlr" in metrics:
                        config_scores = replace(config_scores, full_acc=robustness.full_acc)
            row = RefereeRow(name, protocol, model, result, robustness)
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows


def format_table(rows: list[RefereeRow], metrics: tuple[str, ...] = ()) -> str:
    """| set | protocol | network | accuracy % | per network | scores... | (markdown)."""
    head = ["set", "protocol", "network", "accuracy %", "per network"] + [m.upper() for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---|---:|---|" + "---:|" * len(metrics)]
    for row in rows:
        per = ", ".join(f"{100 * a:.2f}" for a in row.result.accuracies)
        cells = [row.name, row.protocol, row.model, f"{100 * row.result.mean:.2f} ± {100 * row.result.std:.2f}", per]
        for m in metrics:
            if row.robustness is not None and m in row.robustness.metrics:
                cells.append(f"{row.robustness.mean(m):.4f} ± {row.robustness.std(m):.4f}")
            else:
                cells.append("–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
