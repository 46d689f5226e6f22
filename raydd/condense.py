"""The condensation loop: the one place that steps a method, evaluates it and tells the world.

>>> result = condense(method, 1000, eval_every=200, test=test, logdir="runs/mtt", checkpoint_path="mtt.ckpt")
>>> result.synthetic.save("digits_ipc2.safetensors")

``raydd condense``, the Python API, every Tune trial (``raydd.sweep.trial``) and the benchmarks
run a method through ``condense()``; what differs between them is a list of *sinks*, objects that
receive the run's events (all hooks optional):

- ``on_start(run)``: before the first step (``run.method``, ``run.iterations``, ``run.resumed_from``);
- ``on_step(run, metrics)``: after every step; returning True stops the run cleanly after it;
- ``on_eval(run, record)``: after every evaluation (``EvalRecord``: iteration, synthetic set,
  result, the optional final evaluation);
- ``on_end(run, status)``: once at the end: ``status`` is "done", "stopped" (a sink stopped the run),
  "interrupted" (Ctrl-C) or "failed" (a step or an evaluation raised).

Built-in sinks: ``ProgressBar`` (iteration, loss, accuracy, ETA), ``TensorBoard`` (every step
metric under ``train/<name>``, ``eval/acc_mean``/``acc_std``/``final_acc``, ``synthetic/syn_lr``
and a grid of the synthetic images), ``Checkpoint`` (the method's full state, atomically, at
every evaluation and at the end; a run started on an existing checkpoint resumes from it),
``StepSizeWatch`` (warns once when a learned step size α stops being > 0) and ``TimeBudget``
(stops after so many seconds). Evaluation uses the protocol table (``raydd.evaluation``): any
protocol's config works, and ``final_eval_config`` adds one more evaluation at the last iteration.
"""
from __future__ import annotations

import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from .data.datasets import ImageDataset
from .evaluation import EvalConfig, EvalResult, evaluate
from .evaluation.robustness import RobustnessConfig, RobustnessResult, check_scores, robustness_metrics
from .methods.base import CondensationMethod, load_checkpoint, save_checkpoint
from .methods.synthetic import SyntheticSet


@dataclass
class EvalRecord:
    """One evaluation of the run: the set at ``iteration``, its result and the optional final evaluation."""

    iteration: int
    synthetic: SyntheticSet
    result: EvalResult
    final: EvalResult | None = None
    robustness: RobustnessResult | None = None  # DD-Ranking's scores of the last set, when asked for
    seconds: float = 0.0


@dataclass
class CondenseResult:
    synthetic: SyntheticSet
    history: list[dict[str, float]]  # one metrics dict per iteration run here (with "iteration")
    evals: list[tuple[int, EvalResult]] = field(default_factory=list)
    wall_time_s: float = 0.0
    seconds_per_iteration: float = float("nan")
    resumed_from: int = 0
    final: EvalResult | None = None  # the final_eval_config evaluation, when asked for
    stopped_early: bool = False  # a sink (e.g. TimeBudget) stopped the run before ``iterations``
    robustness: RobustnessResult | None = None  # DD-Ranking's scores of the last set (``robustness=``)

    @property
    def last_eval(self) -> tuple[int, EvalResult] | None:
        """(iteration, result) of the last periodic evaluation (not ``final``, the extra one asked for with
        ``final_eval_config``); None when nothing was evaluated."""
        return self.evals[-1] if self.evals else None


@dataclass
class Run:
    """What sinks see of the run in progress."""

    method: CondensationMethod
    iterations: int
    resumed_from: int
    started: float = field(default_factory=time.perf_counter)
    step_seconds: float = 0.0
    steps: int = 0

    @property
    def seconds_per_iteration(self) -> float:
        return self.step_seconds / self.steps if self.steps else float("nan")


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


# --------------------------------------------------------------------------- sinks
class Sink:
    """Base of the loop's sinks: every hook is optional (see the module doc)."""

    def on_start(self, run: Run) -> None:
        pass

    def on_step(self, run: Run, metrics: dict[str, float]) -> bool | None:
        return None

    def on_eval(self, run: Run, record: EvalRecord) -> None:
        pass

    def on_end(self, run: Run, status: str) -> None:
        pass


class StepSizeWatch(Sink):
    """Warns once (RuntimeWarning, naming the value and the iteration) when a method's learned step
    size α (``metrics["syn_lr"]``) stops being > 0: from then on the unrolled student walks away
    from the expert, and evaluation refuses the set unless it is given an explicit lr. Every run of
    ``condense`` has one (so the CLI, the Python API, sweep trials and the benchmarks all warn)."""

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
                      f"lower lr_lr or pass an explicit evaluation lr", RuntimeWarning, stacklevel=4)
        return True

    def on_step(self, run: Run, metrics: dict[str, float]) -> None:
        self.check(metrics, run.method.iteration)


class ProgressBar(Sink):
    """A tqdm bar: iterations done/total, the step loss, the last evaluation, rate and ETA; and once, after
    the first ``estimate_after`` steps, a line with the estimated duration of the whole run (kept in logs
    where the bar is not)."""

    def __init__(self, enabled: bool = True, desc: str = "condense", estimate_after: int = 3) -> None:
        self.enabled, self.desc, self.bar, self.acc = enabled, desc, None, None
        self.estimate_after = estimate_after

    def on_start(self, run: Run) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=run.iterations, initial=min(run.method.iteration, run.iterations),
                        disable=not self.enabled, unit="it", dynamic_ncols=True, desc=self.desc)

    def on_step(self, run: Run, metrics: dict[str, float]) -> None:
        shown = {"loss": f"{metrics.get('loss', float('nan')):.4f}"}
        if self.acc is not None:
            shown["acc"] = self.acc
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)
        if self.enabled and run.steps == self.estimate_after and run.iterations > run.method.iteration:
            per_step = run.step_seconds / run.steps
            left = run.iterations - run.method.iteration
            self.bar.write(f"{self.desc}: {per_step:.2f} s/iteration -> about {format_duration(per_step * left)} "
                           f"for the {left} iterations left (evaluations extra)", file=sys.stderr)

    def on_eval(self, run: Run, record: EvalRecord) -> None:
        self.acc = f"{100 * record.result.mean:.2f}"

    def on_end(self, run: Run, status: str) -> None:
        if self.bar is not None:
            self.bar.close()


def format_duration(seconds: float) -> str:
    """'45 s', '12 min', '3.4 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class TensorBoard(Sink):
    """Scalars and image grids of the run in ``logdir`` (a run resumed later writes a new event file
    that sorts after the earlier ones: see ``segment_writer``)."""

    def __init__(self, logdir: str | Path) -> None:
        self.logdir = Path(logdir)
        self.writer = None
        self.evaluated = False

    def on_start(self, run: Run) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = segment_writer(SummaryWriter, self.logdir)
        if run.method.iteration == 0:
            self.writer.add_image("synthetic/images", image_grid(run.method.synthetic_set()), 0)

    def on_step(self, run: Run, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(f"train/{key}", value, run.method.iteration)

    def on_eval(self, run: Run, record: EvalRecord) -> None:
        it = record.iteration
        self.evaluated = True
        self.writer.add_scalar("eval/acc_mean", record.result.mean, it)
        self.writer.add_scalar("eval/acc_std", record.result.std, it)
        if record.final is not None:
            self.writer.add_scalar("eval/final_acc", record.final.mean, it)
        if record.synthetic.syn_lr is not None:
            self.writer.add_scalar("synthetic/syn_lr", float(record.synthetic.syn_lr), it)
        self.writer.add_image("synthetic/images", image_grid(record.synthetic), it)
        self.writer.flush()

    def on_end(self, run: Run, status: str) -> None:
        if self.writer is None:
            return
        if not self.evaluated and status in ("done", "stopped"):
            self.writer.add_image("synthetic/images", image_grid(run.method.synthetic_set()), run.method.iteration)
        self.writer.close()


def segment_writer(writer_cls, logdir: Path):
    """A SummaryWriter for one run segment, whose event file sorts after the earlier segments'.

    A paused (ASHA), failed or interrupted run resumes in a new process that writes a new event file
    into the same directory. TensorBoard reads a run's files in name order, and the name starts with
    the creation second followed by host and pid, so a segment started within the same second as the
    previous one could sort before it and show its steps first. Waiting (at most one second) until
    the clock has passed every existing file's second keeps the order true.
    """
    seconds = (p.name.split(".")[3:4] for p in Path(logdir).glob("events.out.tfevents.*"))  # [] or [second]
    stamps = [int(s[0]) for s in seconds if s and s[0].isdigit()]
    if stamps:
        wait = max(stamps) + 1 - time.time()
        if wait > 0:
            time.sleep(wait)
    return writer_cls(log_dir=str(logdir))


class Checkpoint(Sink):
    """The method's full state at ``path`` (safetensors, atomic) at every evaluation, at the end and on
    Ctrl-C (not after a failed step, whose state may be half updated); ``condense`` resumes from it
    when it exists at the start."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_eval(self, run: Run, record: EvalRecord) -> None:
        save_checkpoint(run.method, self.path)

    def on_end(self, run: Run, status: str) -> None:
        if status != "failed":
            save_checkpoint(run.method, self.path)


class TimeBudget(Sink):
    """Stops the run cleanly once ``seconds`` of wall time have passed since its start."""

    def __init__(self, seconds: float) -> None:
        if not seconds > 0:
            raise ValueError(f"time budget {seconds!r} s is invalid: expected a number of seconds > 0")
        self.seconds = float(seconds)

    def on_step(self, run: Run, metrics: dict[str, float]) -> bool:
        return time.perf_counter() - run.started >= self.seconds


# --------------------------------------------------------------------------- the loop
def eval_points(iterations: int, eval_every: int | Iterable[int]) -> set[int]:
    """Iterations after which to evaluate: every k-th and the last (``eval_every=k``), or the given ones."""
    if isinstance(eval_every, bool):
        raise ValueError(f"eval_every={eval_every!r} is invalid: expected an integer >= 0 or a list of iterations")
    if isinstance(eval_every, int):
        if eval_every < 0:
            raise ValueError(f"eval_every={eval_every!r} is invalid: expected an integer >= 0 (0: no evaluation)")
        return set(range(eval_every, iterations + 1, eval_every)) | {iterations} if eval_every else set()
    points = {int(p) for p in eval_every}
    bad = sorted(p for p in points if p < 1)
    if bad:
        raise ValueError(f"evaluation point {bad[0]} is invalid: expected iterations >= 1")
    return points


def condense(method: CondensationMethod, iterations: int, *, eval_every: int | Iterable[int] = 0,
             eval_config: Any = None, final_eval_config: Any = None, test: ImageDataset | None = None,
             robustness: RobustnessConfig | None = None, sinks: Iterable[Sink] = (), logdir: str | None = None,
             checkpoint_path: str | None = None, progress: bool = True) -> CondenseResult:
    """Run ``method`` until it has completed ``iterations`` iterations in total.

    ``eval_every=k`` evaluates the synthetic set every k iterations and at the end (or a collection
    of iterations to evaluate at); evaluation needs ``test`` and uses ``eval_config`` (any protocol's
    config; default the standard ``EvalConfig()``: 5 ConvNets × 300 epochs). ``final_eval_config``
    adds one more evaluation of the last set; ``robustness`` adds DD-Ranking's scores of the last set
    (raydd.evaluation.robustness, on the standard protocol of the final or else the regular evaluation
    config, with the method's training split for the random subsets). ``logdir`` adds a TensorBoard sink,
    ``checkpoint_path`` a Checkpoint sink (resuming from it if it exists), ``progress`` a bar;
    ``sinks`` are added after those.
    """
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"iterations={iterations!r} is invalid: expected an integer >= 0")
    points = eval_points(iterations, eval_every)
    if (points or final_eval_config is not None or robustness is not None) and test is None:
        raise ValueError("evaluation needs the real test split: pass test=")
    eval_config = eval_config or EvalConfig()
    if robustness is not None:
        check_scores(final_eval_config or eval_config)
    if checkpoint_path is not None and Path(checkpoint_path).exists():
        load_checkpoint(method, checkpoint_path)
    run = Run(method, iterations, resumed_from=method.iteration)
    own = [StepSizeWatch(), ProgressBar(progress)]
    if logdir is not None:
        own.append(TensorBoard(logdir))
    if checkpoint_path is not None:
        own.append(Checkpoint(checkpoint_path))
    sinks = own + list(sinks)
    history: list[dict[str, float]] = []
    evals: list[tuple[int, EvalResult]] = []
    final: EvalResult | None = None
    scores: RobustnessResult | None = None
    stopped = False

    def evaluate_now(is_last: bool) -> None:
        nonlocal final, scores
        started = time.perf_counter()
        syn = method.synthetic_set()
        teachers = method.teacher_models()
        result = evaluate(syn, test, eval_config, teachers=teachers, progress=progress)
        record = EvalRecord(method.iteration, syn, result)
        if is_last and final_eval_config is not None:
            record.final = final = evaluate(syn, test, final_eval_config, teachers=teachers, progress=progress)
        if is_last and robustness is not None:
            record.robustness = scores = robustness_metrics(syn, method.train, test, robustness,
                                                            final_eval_config or eval_config)
        record.seconds = time.perf_counter() - started
        evals.append((method.iteration, result))
        for sink in sinks:
            sink.on_eval(run, record)

    for sink in sinks:
        sink.on_start(run)
    status = "failed"
    try:
        while method.iteration < iterations:
            t0 = time.perf_counter()
            metrics = method.step()
            run.step_seconds += time.perf_counter() - t0
            run.steps += 1
            history.append({"iteration": method.iteration, **metrics})
            stop = [sink.on_step(run, metrics) for sink in sinks]
            if method.iteration in points:
                evaluate_now(method.iteration == iterations)
            if any(stop) and method.iteration < iterations:
                stopped = True
                break
        wants_eval = points or final_eval_config is not None or robustness is not None
        if wants_eval and not stopped and (not evals or evals[-1][0] != method.iteration):
            evaluate_now(True)  # e.g. resumed at the end: the final set is still evaluated once
        status = "stopped" if stopped else "done"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        for sink in sinks:
            sink.on_end(run, status)
    return CondenseResult(method.synthetic_set(), history, evals, time.perf_counter() - run.started,
                          run.seconds_per_iteration, run.resumed_from, final, stopped, scores)
