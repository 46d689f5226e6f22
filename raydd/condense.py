"""Run a condensation method: progress bar, periodic evaluation, TensorBoard, checkpoints.

>>> result = condense(method, 1000, eval_every=200, test=test, logdir="runs/mtt", checkpoint_path="mtt.ckpt")
>>> result.synthetic.save("digits_ipc2.safetensors")

TensorBoard (``logdir``): every metric a step returns under ``train/<name>``, evaluation
accuracy under ``eval/acc_mean`` and ``eval/acc_std``, and ``synthetic/images``: a grid
of the synthetic set (ZCA-inverted and unnormalised, one row per class).
With ``checkpoint_path`` the method's full state is written (atomically, no pickles) at
every evaluation and at the end; if the file exists when ``condense`` starts, the run
resumes from it and continues up to ``iterations`` in total.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data.datasets import ImageDataset
from .evaluate import EvalConfig, EvalResult, evaluate_synthetic
from .methods.base import CondensationMethod, load_checkpoint, save_checkpoint
from .methods.synthetic import SyntheticSet


@dataclass
class CondenseResult:
    synthetic: SyntheticSet
    history: list[dict[str, float]]  # one metrics dict per iteration run here (with "iteration")
    evals: list[tuple[int, EvalResult]] = field(default_factory=list)
    wall_time_s: float = 0.0
    seconds_per_iteration: float = float("nan")
    resumed_from: int = 0

    @property
    def final_eval(self) -> EvalResult | None:
        return self.evals[-1][1] if self.evals else None


def image_grid(syn: SyntheticSet, max_per_class: int = 10) -> torch.Tensor:
    """[3|1, H, W] grid in [0, 1]: one row per class, at most ``max_per_class`` images each."""
    from torchvision.utils import make_grid

    pixels = syn.pixels().clamp(0, 1)
    labels = syn.hard_labels
    k = syn.info.num_classes
    per_class = min(max_per_class, max(1, len(syn) // k))
    rows = []
    for c in range(k):
        idx = torch.nonzero(labels == c).flatten()[:per_class]
        row = pixels[idx]
        if len(row) < per_class:  # pad short classes so the grid stays aligned
            row = torch.cat([row, torch.zeros(per_class - len(row), *pixels.shape[1:])])
        rows.append(row)
    scale = max(1, 64 // max(syn.info.resolution))  # tiny images are upsampled to stay visible
    grid_in = torch.cat(rows)
    if scale > 1:
        grid_in = grid_in.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    return make_grid(grid_in, nrow=per_class, padding=2, pad_value=1.0)


class StepSizeWatch:
    """Warns once (RuntimeWarning, naming the value and the iteration) when a method's learned step
    size α (``metrics["syn_lr"]``) stops being > 0: from then on the unrolled student walks away
    from the expert, and evaluation refuses the set unless it is given an explicit lr. Every loop
    that steps a method (``condense``, the Tune trainable, benchmarks/paper_protocol.py) uses it."""

    def __init__(self) -> None:
        self.warned = False

    def check(self, metrics: dict, iteration: int) -> bool:
        """True when this call warned."""
        value = metrics.get("syn_lr")
        if self.warned or value is None or value > 0:  # NaN is not > 0 either
            return False
        self.warned = True
        warnings.warn(f"the learned step size α became {value:.3g} at iteration {iteration}: the unrolled "
                      f"student now moves away from the expert and the set cannot be evaluated with its own α; "
                      f"lower lr_lr or pass an explicit evaluation lr", RuntimeWarning, stacklevel=3)
        return True


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="it", dynamic_ncols=True,
                desc="condense")


def condense(method: CondensationMethod, iterations: int, *, eval_every: int = 0,
             eval_config: EvalConfig | None = None, test: ImageDataset | None = None, logdir: str | None = None,
             progress: bool = True, checkpoint_path: str | None = None) -> CondenseResult:
    """Run ``method`` until it has completed ``iterations`` iterations in total.

    ``eval_every=k`` evaluates the synthetic set every k iterations and at the end (needs
    ``test``); ``eval_config`` defaults to EvalConfig() (5 ConvNets × 300 epochs).
    """
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"iterations={iterations!r} is invalid: expected an integer >= 0")
    if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 0:
        raise ValueError(f"eval_every={eval_every!r} is invalid: expected an integer >= 0 (0: no evaluation)")
    if eval_every and test is None:
        raise ValueError("eval_every > 0 needs the real test split: pass test=")
    eval_config = eval_config or EvalConfig()
    resumed_from = 0
    if checkpoint_path is not None and Path(checkpoint_path).exists():
        load_checkpoint(method, checkpoint_path)
        resumed_from = method.iteration
    writer = None
    if logdir is not None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(logdir))
    history: list[dict[str, float]] = []
    evals: list[tuple[int, EvalResult]] = []
    started = time.perf_counter()
    step_time = 0.0
    step_size = StepSizeWatch()

    def run_eval() -> None:
        syn = method.synthetic_set()
        result = evaluate_synthetic(syn, test, eval_config)
        evals.append((method.iteration, result))
        if writer is not None:
            writer.add_scalar("eval/acc_mean", result.mean, method.iteration)
            writer.add_scalar("eval/acc_std", result.std, method.iteration)
            writer.add_image("synthetic/images", image_grid(syn), method.iteration)
        if checkpoint_path is not None:
            save_checkpoint(method, checkpoint_path)

    bar = _progress(iterations, min(method.iteration, iterations), progress)
    try:
        if writer is not None and method.iteration == 0:
            writer.add_image("synthetic/images", image_grid(method.synthetic_set()), 0)
        while method.iteration < iterations:
            t0 = time.perf_counter()
            metrics = method.step()
            step_time += time.perf_counter() - t0
            history.append({"iteration": method.iteration, **metrics})
            step_size.check(metrics, method.iteration)
            if writer is not None:
                for key, value in metrics.items():
                    if isinstance(value, (int, float)) and math.isfinite(value):
                        writer.add_scalar(f"train/{key}", value, method.iteration)
            bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}", refresh=False)
            bar.update(1)
            if eval_every and method.iteration % eval_every == 0:
                run_eval()
                bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}",
                                acc=f"{100 * evals[-1][1].mean:.2f}")
        if eval_every and (not evals or evals[-1][0] != method.iteration):
            run_eval()
        elif checkpoint_path is not None:
            save_checkpoint(method, checkpoint_path)
    except KeyboardInterrupt:
        if checkpoint_path is not None:
            save_checkpoint(method, checkpoint_path)
        raise
    finally:
        bar.close()
        if writer is not None:
            if not eval_every:
                writer.add_image("synthetic/images", image_grid(method.synthetic_set()), method.iteration)
            writer.close()
    ran = len(history)
    return CondenseResult(method.synthetic_set(), history, evals, time.perf_counter() - started,
                          step_time / ran if ran else float("nan"), resumed_from)
