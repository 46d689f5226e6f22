"""Benchmark: condensation methods — cost per iteration, and a CPU-scaled accuracy table.

Not a test. Two sub-commands, each prints a markdown table with a baseline measured in the
same run. Run from the repository root:

    python benchmarks/condense.py speed --dataset digits --ipc 10 --iterations 5
    python benchmarks/condense.py accuracy --data-root ../shared/datasets --ipcs 1 10 --out results.md
    python benchmarks/condense.py accuracy --quick          # digits, IPC 1, a few minutes on a laptop

``speed``: seconds per iteration (median of ``--iterations`` steps after one warm-up step)
and peak memory per method at one fixed setting: ConvNet-3 width ``--width`` for every
network read from the store (and DM's embedder), the method's published defaults
otherwise (its main knobs are listed in the table). Every method runs in a fresh
subprocess so that its peak memory is its own: on CUDA torch.cuda.max_memory_allocated
above the allocation before the first step; on CPU the peak resident set above the
resident set before the first step (the process high-water mark getrusage(ru_maxrss) when
the steps raised it, else a 1 ms RSS sampler), next to the method's own ``peak_mem_mb``
metric when it reports one. Baseline: one SGD step of the same ConvNet on a batch of 256
real images.

``accuracy``: a CPU-SCALED version of the papers' Fashion-MNIST table. The trajectories every
method's config declares it reads (``MethodConfig.needs()``) are farmed, short, with the ``local``
farm backend (no Ray) into a temporary store (or ``--store``); each method condenses for
min(``--iterations``, its published count) iterations at its published defaults planned for that
length and shrunk by its own ``MethodConfig.scaled`` (``scaled_config`` below); every synthetic set
is then evaluated in the same ``condense()`` run with the SAME standard protocol (ConvNet-3 width
``--width``, ``--num-models`` networks, ``--eval-epochs`` epochs), methods with teacher models (EDC)
additionally with EDC's soft-label protocol. Baselines: Random (Δ column) and full-data training
with the same protocol. The papers' numbers (each config's ``reported``) are printed next to it,
marked as a different protocol. Every registered method takes part; a method that fails is reported
in its row with the error, the others still run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raydd.data.datasets import ImageDataset, data_root_for, load_dataset  # noqa: E402
from raydd.methods import METHODS, get_method, make_config  # noqa: E402
from raydd.methods.base import MethodConfig, process_peak_rss_mb  # noqa: E402
from raydd.plan import Shrink, plan_config  # noqa: E402
from raydd.training import resolve_device  # noqa: E402

METHOD_ORDER = tuple(METHODS)  # the registry's order: baselines, trajectory matching, distribution matching
# Config fields shown in the tables when a method has them (the knobs that set its cost).
NOTE_FIELDS = ("syn_steps", "expert_epochs", "max_start_epoch", "current_max_start_epoch", "expansion_end_epoch",
               "batch_syn", "batch_real", "width", "factor", "num_experts", "batch_syn_max", "total_iterations",
               "observer_turns", "strategy", "multi_aug")
PAPER_IPCS = (1, 10, 50)
# What the CLI's farm flags set for each farm recipe: (count flag, epochs flag); the SSD teacher is one network.
RECIPE_FLAGS = {"expert": ("experts", "expert_epochs"), "pretrain": ("pretrain_experts", "pretrain_epochs"),
                "observer": ("observers", "observer_epochs"), "ssd_teacher": (None, "ssd_teacher_epochs"),
                "ssd_student": ("ssd_students", "ssd_student_epochs")}


def label(method: str) -> str:
    return get_method(method).label


def shrink_of(args) -> Shrink:
    """The CPU-scaling flags as the planner reads them: --width, --syn-steps and each recipe's count and epochs
    flags (what the accuracy table farms: the most a method may read)."""
    recipes = {r: (getattr(args, c, None) if c else None, getattr(args, e, None)) for r, (c, e) in RECIPE_FLAGS.items()}
    return Shrink(width=args.width, syn_steps=getattr(args, "syn_steps", None),
                  recipes={r: caps for r, caps in recipes.items() if caps != (None, None)})


def scaled_config(method: str, ipc: int, iterations: int, args, sets: dict[str, Any]) -> MethodConfig:
    """The ONE place where the accuracy table departs from each method's published defaults, by raydd's planner
    (``raydd.plan``, the same order as every entry point): the published row, --set METHOD.KNOB=VALUE, the run
    planned for ``iterations`` (``for_run``: EDC's cosine horizon, PTLM's |T|, DATM's window growth), then
    ``MethodConfig.scaled`` (each method's own file says how it shrinks: N capped at --syn-steps, the
    start-epoch window fitted to the short experts, at most --pretrain-experts experts, DM's embedder at
    --width); an explicit --set wins over both. Learning rates, momenta, augmentation and label handling stay
    the papers' values."""
    return plan_config(method, args.dataset, ipc, iterations=iterations, knobs=sets.get(method, {}),
                       shrink=shrink_of(args))[0]


def iterations_for(config: MethodConfig, cap: int) -> int:
    """min(cap, the setting's published iteration count)."""
    return max(1, min(cap, config.planned_iterations))


def notes(config: MethodConfig) -> str:
    return ", ".join(f"{k}={getattr(config, k)}" for k in NOTE_FIELDS if hasattr(config, k))


def parse_sets(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["mtt.lr_img=1000", ...]`` -> {"mtt": {"lr_img": 1000.0}}: each value read by the method config's
    annotation (raydd's one --set parser, ``method_overrides``)."""
    from raydd.condense_cli import method_overrides

    grouped: dict[str, list[str]] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        method, dot, knob = key.strip().partition(".")
        if not sep or not dot or method not in METHOD_ORDER or not knob:
            raise ValueError(f"--set {item!r} is invalid: expected METHOD.KNOB=VALUE with METHOD one of "
                             f"{', '.join(METHOD_ORDER)}")
        grouped.setdefault(method, []).append(f"{knob}={value}")
    return {method: method_overrides(method, knobs) for method, knobs in grouped.items()}


# --------------------------------------------------------------------------- data and farm
def load_data(dataset: str, data_root: str | None, train_per_class: int | None
              ) -> tuple[ImageDataset, ImageDataset]:
    root = data_root_for(dataset, data_root)
    if not root and data_root_for(dataset, "?"):  # a dataset read from files, no --data-root given
        raise ValueError(f"--dataset {dataset} needs --data-root (e.g. ../shared/datasets)")
    train = load_dataset(dataset, "train", root)
    test = load_dataset(dataset, "test", root)
    if train_per_class is not None:
        train = train.per_class(train_per_class, seed=0)  # the farm's subset (raydd.farm.task.prepare_data)
    return train, test


@dataclass
class FarmJob:
    recipe: str
    trajectories: int
    options: dict[str, Any]
    model: dict[str, Any]

    def describe(self) -> str:
        from raydd.farm import get_recipe

        arch = self.model.get("arch", "convnet")
        width = f" w{self.model['width']}" if "width" in self.model and arch == "convnet" else ""
        norm = self.model.get("norm", get_recipe(self.recipe).default_norm)
        return f"{self.recipe} {self.trajectories}×{self.options.get('epochs', '?')} ep ({arch}{width}, {norm} norm)"


def farm_all(jobs: list[FarmJob], store: str, dataset: str, data_root: str | None, train_per_class: int | None,
             train: ImageDataset, test: ImageDataset, device: str, progress: bool) -> list[tuple[FarmJob, float]]:
    """Farm every job into ``store`` with the local backend (no Ray); returns (job, seconds)."""
    from raydd.farm import FarmData, FarmSpec, farm

    data = FarmData.from_datasets(train, test)
    done = []
    for job in jobs:
        spec = FarmSpec(store=store, dataset=dataset, data_root=data_root_for(dataset, data_root),
                        train_per_class=train_per_class, recipe=job.recipe, recipe_options=job.options,
                        model=job.model, trajectories=job.trajectories, backend="local", device=device)
        started = time.perf_counter()
        report = farm(spec, progress=progress, data=data)
        seconds = time.perf_counter() - started
        print(f"  farmed {job.describe()}: {len(report.trained)} trained, {len(report.skipped)} already stored, "
              f"{seconds:.0f} s", flush=True)
        done.append((job, seconds))
    return done


def _ssd_teacher_model(arch: str, width: int) -> dict[str, Any]:
    return {"arch": arch, "width": width, "norm": "batch"} if arch == "convnet" else {"arch": arch, "norm": "batch"}


def farm_jobs(configs: list[MethodConfig], args, *, least: bool) -> list[FarmJob]:
    """The farm jobs the configs' declared needs (``MethodConfig.needs()``) call for, one per farm recipe.

    Every network is a ConvNet at --width (the SSD teacher: --ssd-teacher-arch), with the normalisation a
    need asks for (EDC's observers: BatchNorm). ``least`` (the speed table): as many trajectories and
    epochs as the configs need, at least one of each; otherwise the accuracy table's --<recipe> counts and
    epochs.
    """
    jobs: dict[str, FarmJob] = {}

    def add(need) -> None:
        count_flag, epochs_flag = RECIPE_FLAGS[need.recipe]
        if need.recipe == "ssd_teacher":
            model, count, epochs = _ssd_teacher_model(args.ssd_teacher_arch, args.width), 1, args.ssd_teacher_epochs
        elif least:
            model, count, epochs = {"width": args.width}, need.count, need.epochs or 1
        else:
            model, count, epochs = {"width": args.width}, getattr(args, count_flag), getattr(args, epochs_flag)
        if need.norm is not None and need.recipe != "ssd_teacher":
            model["norm"] = need.norm
        options = {"epochs": epochs}
        if need.recipe.startswith("ssd_") and getattr(args, "labelled_fraction", None) is not None:
            options["labelled_fraction"] = args.labelled_fraction
        old = jobs.get(need.recipe)
        if old is not None:  # the largest of what several methods need
            count = max(count, old.trajectories)
            options["epochs"] = max(options["epochs"], old.options["epochs"])
        jobs[need.recipe] = FarmJob(need.recipe, count, options, model)

    for config in configs:
        for need in config.needs():
            add(need)
    out = list(jobs.values())
    if not least and "observer" in jobs and args.observer_resnet18:
        out.append(FarmJob("observer", args.observer_resnet18, {"epochs": args.observer_epochs},
                           {"arch": "resnet18", "norm": "batch"}))
    return out


# --------------------------------------------------------------------------- speed
def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator, or resident set on CPU (see the module doc)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mb = float("nan")
        self.source = ""

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device) / 2 ** 20
            return self
        self._base = _rss_mb()
        self._maxrss0 = process_peak_rss_mb()
        self._sampled = self._base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._sampled = max(self._sampled, _rss_mb())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2 ** 20 - self._base
            self.source = "cuda max_memory_allocated"
            return
        self._stop.set()
        self._thread.join()
        maxrss = process_peak_rss_mb()
        if maxrss > self._maxrss0 + 1:  # the steps raised the process high-water mark: it is the exact peak
            self.peak_mb, self.source = maxrss - self._base, "ru_maxrss"
        else:
            self.peak_mb, self.source = max(self._sampled, _rss_mb()) - self._base, "RSS sampler"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """Wall and process CPU seconds of every step (synchronised on CUDA) and the method's own peak_mem_mb;
    a ``condense()`` sink (the baseline's plain SGD step calls ``time`` directly)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times, self.cpu_times, self.reported = device, [], [], []

    def start(self) -> None:
        _sync(self.device)
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def stop(self, metrics: dict[str, float]) -> None:
        _sync(self.device)
        self.times.append(time.perf_counter() - self.t0)
        self.cpu_times.append(time.process_time() - self.c0)
        if "peak_mem_mb" in metrics:
            self.reported.append(float(metrics["peak_mem_mb"]))
        self.start()

    def on_start(self, run) -> None:
        self.start()

    def on_step(self, run, metrics) -> None:
        self.stop(metrics)

    def on_eval(self, run, record) -> None:
        pass

    def on_end(self, run, status) -> None:
        pass


def speed_worker(payload: dict[str, Any]) -> dict[str, Any]:
    """Runs in a fresh process: build one method (or the baseline), time its steps, measure peak memory.

    A method runs through ``condense()`` for one warm-up step (lazy setup, allocator growth, first-call
    overheads; not timed) plus ``iterations`` timed steps; a one-shot coreset for its one selection step."""
    from raydd.condense import condense

    device = resolve_device(payload["device"])
    train, _ = load_data(payload["dataset"], payload["data_root"], payload["train_per_class"])
    steps = payload["iterations"]
    clock = StepClock(device)
    if payload["method"] == "_baseline":
        from raydd.models import ModelSpec, build_model

        info = train.info
        spec = ModelSpec(arch="convnet", channels=info.channels, num_classes=info.num_classes,
                         resolution=tuple(info.resolution), width=payload["width"])
        torch.manual_seed(0)
        net = build_model(spec).to(device)
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        gen = torch.Generator().manual_seed(0)

        def step() -> dict[str, float]:
            idx = torch.randint(len(train), (256,), generator=gen)
            x, y = train.images[idx].to(device), train.labels[idx].to(device)
            loss = torch.nn.functional.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return {"loss": float(loss)}

        one_shot, config_notes = False, f"ConvNet-3 w{payload['width']}, batch 256 real"
        with PeakMemory(device) as mem:
            step()  # warm-up
            for _ in range(steps):
                clock.start()
                clock.stop(step())
    else:
        from raydd.store import TrajectoryStore

        config = plan_config(payload["method"], payload["dataset"], payload["ipc"], knobs=payload["overrides"],
                             shrink=Shrink(width=payload["width"]))[0]
        one_shot = type(config).default_iterations == 1
        config_notes = notes(config)
        with get_method(payload["method"])(config, train, TrajectoryStore(payload["store"]), device=device,
                                           seed=0) as method, PeakMemory(device) as mem:
            condense(method, 1 if one_shot else steps + 1, sinks=[clock], progress=False)
        if not one_shot:
            del clock.times[0], clock.cpu_times[0], clock.reported[:1]  # the warm-up step
    return {"seconds": statistics.median(clock.times), "cpu_seconds": statistics.median(clock.cpu_times),
            "timed": len(clock.times), "one_shot": one_shot, "peak_mb": mem.peak_mb, "peak_source": mem.source,
            "reported_peak_mb": max(clock.reported) if clock.reported else None, "notes": config_notes}


def run_speed_worker(payload: dict[str, Any], timeout: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="raydd-speed-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "_speed-worker", json.dumps(payload), str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()
            return {"error": "failed: " + (tail[-1] if tail else f"exit status {proc.returncode}")}
        return json.loads(out.read_text())


def cmd_speed(args) -> str:
    tpc = args.train_per_class if args.train_per_class is not None else (None if args.dataset == "digits" else 500)
    wanted = [m for m in METHOD_ORDER if m in (args.methods or METHOD_ORDER)]
    sets = parse_sets(args.set)
    configs, failed = {}, {}
    for m in wanted:  # published defaults, networks at --width (DM's embedder; the farmed ones below)
        try:
            configs[m] = plan_config(m, args.dataset, args.ipc, knobs=sets.get(m, {}),
                                     shrink=Shrink(width=args.width))[0]
        except ValueError as exc:
            failed[m] = f"config: {exc}"
    train, test = load_data(args.dataset, args.data_root, tpc)
    device = str(resolve_device(args.device))
    store, own_store = (args.store, False) if args.store else (tempfile.mkdtemp(prefix="raydd-speed-store-"), True)
    lines = []
    try:
        print(f"farming the trajectories the defaults need into {store} ...", flush=True)
        jobs = farm_jobs(list(configs.values()), args, least=True)
        farmed = farm_all(jobs, store, args.dataset, args.data_root, tpc, train, test, device, args.progress)
        rows = []
        base = run_speed_worker({"method": "_baseline", "dataset": args.dataset, "data_root": args.data_root,
                                 "train_per_class": tpc, "device": device, "iterations": args.iterations,
                                 "width": args.width}, args.timeout)
        rows.append(("baseline: SGD step", base))
        for m in wanted:
            if m in failed:
                rows.append((label(m), {"error": f"failed: {failed[m]}"}))
                continue
            cfg = configs[m]
            payload = {"method": m, "dataset": args.dataset, "data_root": args.data_root, "train_per_class": tpc,
                       "device": device, "iterations": args.iterations, "ipc": args.ipc, "store": store,
                       "overrides": sets.get(m, {}), "width": args.width}
            print(f"  timing {m} ({notes(cfg)}) ...", flush=True)
            try:
                rows.append((label(m), run_speed_worker(payload, args.timeout)))
            except subprocess.TimeoutExpired:
                rows.append((label(m), {"error": f"failed: timed out after {args.timeout} s"}))
        cores, load = os.cpu_count(), os.getloadavg()[0]
        lines.append(f"## Condensation speed — {args.dataset}, IPC {args.ipc}, device {device}"
                     + (f" ({torch.cuda.get_device_name(0)})" if device.startswith("cuda") else
                        f" ({cores} CPU cores, load average {load:.1f} at the end)"))
        lines.append("")
        lines.append(f"- setting: ConvNet-3 width {args.width} for every stored network and DM's embedder; "
                     f"each method's published defaults for ({args.dataset}, IPC {args.ipc}) otherwise"
                     + (f"; --set {' '.join(args.set)}" if args.set else ""))
        n_train = len(train)
        lines.append(f"- data: {args.dataset} train {n_train} images"
                     + (f" ({tpc}/class subset)" if tpc else "") + "; store farmed for this run: "
                     + "; ".join(f"{j.describe()} {s:.0f} s" for j, s in farmed))
        lines.append(f"- s/it: wall seconds, median of {args.iterations} steps after 1 warm-up step (one-shot "
                     f"coresets: the selection step); each method in a fresh process; CPU s/it: process CPU time "
                     f"(all threads) of the same steps, less sensitive to other load on the machine")
        lines.append("- peak MiB: " + ("torch.cuda.max_memory_allocated above the allocation before the first step"
                                       if device.startswith("cuda") else
                                       "peak resident set above the resident set before the first step "
                                       "(ru_maxrss when the steps raised it, else a 1 ms sampler)")
                     + "; 'reported': the method's own peak_mem_mb metric (CPU: autograd's saved tensors)")
        lines.append("")
        lines.append("| method | s/it | CPU s/it | × baseline | peak MiB | reported MiB | settings |")
        lines.append("|---|---:|---:|---:|---:|---:|---|")
        b = base.get("seconds")
        for name, r in rows:
            if "error" in r:
                lines.append(f"| {name} | — | — | — | — | — | {r['error']} |")
                continue
            ratio = f"{r['seconds'] / b:.1f}" if b else "—"
            rep = f"{r['reported_peak_mb']:.1f}" if r.get("reported_peak_mb") is not None else "—"
            note = "; ".join(x for x in (r["notes"], "one-shot selection" if r.get("one_shot") else "") if x)
            lines.append(f"| {name} | {r['seconds']:.3f} | {r['cpu_seconds']:.3f} | {ratio} | {r['peak_mb']:.1f} | "
                         f"{rep} | {note} |")
    finally:
        if own_store:
            shutil.rmtree(store, ignore_errors=True)
    return "\n".join(lines)


# --------------------------------------------------------------------------- accuracy
@dataclass
class Outcome:
    acc: float = float("nan")
    std: float = float("nan")
    seconds: float = float("nan")
    iterations: int = 0
    edc_acc: float | None = None
    edc_std: float | None = None
    notes: str = ""
    eval_note: str = ""
    error: str | None = None
    synthetic: Any = None  # the SyntheticSet (kept for the EDC-protocol baselines)
    edc_baselines: dict = dataclasses.field(default_factory=dict)  # method -> (acc, std) under EDC's protocol
    along_the_way: list = dataclasses.field(default_factory=list)  # (iteration, acc, std, eval lr) at --eval-at


QUICK = {"dataset": "digits", "ipcs": [1], "iterations": 20, "eval_epochs": 20, "num_models": 1,
         "train_per_class": None,
         "experts": 2, "expert_epochs": 4, "pretrain_experts": 2, "pretrain_epochs": 2, "observers": 1,
         "observer_epochs": 2, "ssd_teacher_epochs": 5, "ssd_students": 2, "ssd_student_epochs": 4, "full_epochs": 5}
ACCURACY_DEFAULTS = {"dataset": "fashion_mnist", "ipcs": [1, 10], "iterations": 300, "eval_epochs": 300,
                     "num_models": 3, "train_per_class": 500, "experts": 5, "expert_epochs": 10,
                     "pretrain_experts": 5, "pretrain_epochs": 10, "observers": 2, "observer_epochs": 10,
                     "ssd_teacher_epochs": 20, "ssd_students": 5, "ssd_student_epochs": 10, "full_epochs": 30}


class EvalClock:
    """A condense() sink: the seconds the run spent evaluating (kept out of the 's' column)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def on_start(self, run) -> None:
        pass

    def on_step(self, run, metrics) -> None:
        pass

    def on_eval(self, run, record) -> None:
        self.seconds += record.seconds

    def on_end(self, run, status) -> None:
        pass


def edc_eval_config(args):
    """EDC's protocol at the table's scale: ConvNet at --width, --eval-epochs, --num-models, the observers
    relabelling every batch."""
    from raydd.evaluation import protocol_config

    return protocol_config(args.dataset, {"protocol": "edc", "model": {"arch": "convnet", "width": args.width},
                                          "num_models": args.num_models, "epochs": args.eval_epochs,
                                          "device": args.device, "seed": args.seed, "teachers": True})


def run_one(method: str, ipc: int, args, train, test, store, sets, eval_cfg, earlier: dict | None = None) -> Outcome:
    """Condense and evaluate one (method, IPC) in one condense() run: evaluated at each --eval-at point and
    at the end with the standard protocol; a method with teacher models (EDC) also under EDC's protocol.
    For EDC, ``earlier`` (method -> SyntheticSet of this IPC, e.g. Random's) are evaluated under the EDC
    protocol too, with the same observers as teachers: the same-run baseline of the EDC-protocol column."""
    from raydd.condense import condense
    from raydd.evaluation import evaluate

    # --set METHOD.total_iterations=K (EDC's, PTLM's planned count) raises the published count the cap applies to
    planned = make_config(method, args.dataset, ipc, **{k: v for k, v in sets.get(method, {}).items()
                                                       if k == get_method(method).config_cls.horizon})
    n = iterations_for(planned, args.iterations)
    config = scaled_config(method, ipc, n, args, sets)
    started = time.perf_counter()
    clock = EvalClock()
    with get_method(method)(config, train, store, device=args.device, seed=args.seed) as m:
        edc_cfg = edc_eval_config(args) if m.teacher_models() is not None else None
        points = sorted({i for i in set(args.eval_at or []) if i < n} | {n})
        result = condense(m, n, eval_every=points, eval_config=eval_cfg, final_eval_config=edc_cfg, test=test,
                          sinks=[clock], progress=args.progress)
        seconds = time.perf_counter() - started - clock.seconds
        out = Outcome(seconds=seconds, iterations=n, notes=notes(config))
        for k, ev in result.evals[:-1]:  # the same run, evaluated on the way
            out.along_the_way.append((k, 100 * ev.mean, 100 * ev.std, ev.lr))
            print(f"    at {k} it: {_fmt(100 * ev.mean, 100 * ev.std)} % (eval lr {ev.lr:.3g})", flush=True)
        syn = result.synthetic
        out.synthetic = syn
        if args.save_dir:
            syn.save(Path(args.save_dir) / f"{method}_ipc{ipc}.safetensors")
        ev = result.last_eval[1]
        out.acc, out.std = 100 * ev.mean, 100 * ev.std
        out.eval_note = f"eval lr {ev.lr:.3g}" + ("" if syn.syn_lr is None else " (learned α)") \
            + f", {'soft' if syn.soft else 'hard'} labels, {len(syn)} images"
        final = result.history[-1] if result.history else {}
        if "loss" in final:
            out.eval_note += f", final loss {final['loss']:.4g}"
        if result.final is not None:
            out.edc_acc, out.edc_std = 100 * result.final.mean, 100 * result.final.std
            for name, other in (earlier or {}).items():
                ev = evaluate(other, test, edc_cfg, teachers=m.teacher_models())
                out.edc_baselines[name] = (100 * ev.mean, 100 * ev.std)
    return out


def _fmt(mean: float, std: float) -> str:
    return "—" if mean != mean else f"{mean:.2f} ± {std:.2f}"


def accuracy_report(args, methods, outcomes, full, farmed, n_train, store_note, sets) -> str:
    dev = str(resolve_device(args.device))
    lines = [f"## {args.dataset} condensation accuracy — CPU-SCALED (not the papers' protocol)", ""]
    lines.append(f"- data: {args.dataset} train "
                 + (f"subset {args.train_per_class}/class ({n_train} images)" if args.train_per_class
                    else f"{n_train} images (all)")
                 + f"; test split for every accuracy; device {dev}; seed {args.seed}")
    lines.append(f"- networks: ConvNet-3 width {args.width} everywhere (experts, embedders, observers, evaluation)")
    lines.append("- farm (local backend, no Ray; " + store_note + "): "
                 + "; ".join(f"{j.describe()} {s:.0f} s" for j, s in farmed)
                 + f"; SSD labelled fraction {args.labelled_fraction}")
    lines.append(f"- condensation: min(--iterations {args.iterations}, the method's published count) iterations; "
                 f"unrolled steps capped at --syn-steps {args.syn_steps}; departures from the published defaults: "
                 f"each method's MethodConfig.for_run + scaled (scaled_config in benchmarks/condense.py)" + (f"; --set {' '.join(args.set)}" if args.set else ""))
    lines.append(f"- evaluation (every row, standard protocol): EvalConfig(model={{'arch': 'convnet', 'width': "
                 f"{args.width}}}, num_models={args.num_models}, epochs={args.eval_epochs}) — SGD mom 0.9, wd 5e-4, "
                 f"batch 256, DSA, E + 1 passes, lr ×0.1 after pass E//2 + 1, lr = learned α (TM) else 0.01; final "
                 f"accuracy mean ± std (%)")
    if args.full_epochs > 0:
        lines.append(f"- full data: same protocol on the whole training {'subset' if args.train_per_class else 'split'}"
                     f" with --full-epochs {args.full_epochs} epochs ({args.num_models} networks)")
    if "edc" in methods:
        lines.append("- EDC protocol column: raydd.evaluation.edc (EDCEvalConfig.defaults, same ConvNet-W"
                     f"{args.width} student, {args.eval_epochs} epochs, {args.num_models} networks, the observers "
                     f"relabel every augmented batch); rows other than EDC: their synthetic set under the same "
                     f"protocol and observers (--edc-baselines)")
    lines.append("- s: condensation wall seconds (method construction + iterations; evaluations and farm time "
                 "not included)")
    lines.append("")
    paper_cols = [i for i in args.ipcs if i in PAPER_IPCS] if args.dataset == "fashion_mnist" else []
    head = ["method"]
    for ipc in args.ipcs:
        head += [f"IPC {ipc} acc", "Δ vs Random", "s"] + (["EDC protocol"] if "edc" in methods else []) \
            + (["paper†"] if ipc in paper_cols else [])
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
    rand = {ipc: outcomes.get(("random", ipc)) for ipc in args.ipcs}

    def delta(acc: float, ipc: int) -> str:
        r = rand[ipc]
        if r is None or r.error or acc != acc or r.acc != r.acc:
            return "—"
        return f"{acc - r.acc:+.2f}"

    for m in methods:
        row = [label(m)]
        for ipc in args.ipcs:
            o = outcomes.get((m, ipc))
            if o is None or o.error:
                row += [f"failed: {o.error if o else 'not run'}", "—", "—"]
            else:
                row += [_fmt(o.acc, o.std), delta(o.acc, ipc), f"{o.seconds:.0f}"]
            if "edc" in methods:
                row.append(_fmt(o.edc_acc, o.edc_std) if o is not None and o.edc_acc is not None else "—")
            if ipc in paper_cols:
                ref = get_method(m).config_cls.reported.get((args.dataset, ipc))
                row.append(f"{ref:.1f}" if ref is not None else "—")
        lines.append("| " + " | ".join(row) + " |")
    if full is not None:
        row = [f"Full data ({args.full_epochs} ep)"]
        for ipc in args.ipcs:
            row += [_fmt(full.acc, full.std) if not full.error else f"failed: {full.error}", delta(full.acc, ipc),
                    f"{full.seconds:.0f}"]
            if "edc" in methods:
                row.append("—")
            if ipc in paper_cols:
                row.append("—")
        lines.append("| " + " | ".join(row) + " |")
    if paper_cols:
        lines.append("")
        lines.append("† Papers' numbers (../shared/METHODS.md; SSD with 10% labels): paper protocol — full 60k "
                     "training set, ConvNet-3 width 128, thousands of iterations, 300-1000 evaluation epochs. NOT "
                     "comparable with the CPU-scaled columns.")
        refs = ", ".join(f"{label(k)} {'/'.join(str(c.reported[(args.dataset, i)]) for i in PAPER_IPCS)}"
                         for k, c in ((k, get_method(k).config_cls) for k in METHOD_ORDER)
                         if all((args.dataset, i) in c.reported for i in PAPER_IPCS))
        lines.append(f"Paper Fashion-MNIST IPC 1/10/50: {refs}.")
    trend = [(m, ipc, o) for (m, ipc), o in outcomes.items() if o.along_the_way and not o.error]
    if trend:
        lines.append("")
        lines.append("Accuracy along the way (--eval-at; same run, same evaluation; the last column is the table's):")
        lines.append("")
        for m, ipc, o in trend:
            cells = [f"{k} it: {_fmt(a, sd)} (lr {lr:.3g})" for k, a, sd, lr in o.along_the_way]
            cells.append(f"{o.iterations} it: {_fmt(o.acc, o.std)}")
            lines.append(f"- {label(m)} IPC {ipc}: " + "; ".join(cells))
    lines.append("")
    lines.append("Settings actually run (after for_run, scaled and --set):")
    lines.append("")
    for m in methods:
        for ipc in args.ipcs:
            o = outcomes.get((m, ipc))
            if o is not None and not o.error:
                lines.append(f"- {label(m)} IPC {ipc}: {o.iterations} iterations; {o.notes or 'no knobs'}; "
                             f"{o.eval_note}")
    return "\n".join(lines)


def cmd_accuracy(args) -> str:
    base = QUICK if args.quick else ACCURACY_DEFAULTS
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.train_per_class == 0:  # 0: the whole training split
        args.train_per_class = None
    methods = [m for m in METHOD_ORDER if m in (args.methods or METHOD_ORDER)]
    sets = parse_sets(args.set)
    configs = [scaled_config(m, ipc, args.iterations, args, sets) for m in methods for ipc in args.ipcs]  # checks
    train, test = load_data(args.dataset, args.data_root, args.train_per_class)
    from raydd.evaluation import EvalConfig, full_data
    from raydd.store import TrajectoryStore

    eval_cfg = EvalConfig(model={"arch": "convnet", "width": args.width}, num_models=args.num_models,
                          epochs=args.eval_epochs, device=args.device, seed=args.seed)
    store_root, own = (args.store, False) if args.store else (tempfile.mkdtemp(prefix="raydd-acc-store-"), True)
    store_note = f"store {args.store}" if args.store else "temporary store, removed afterwards"
    try:
        print(f"farming into {store_root} ...", flush=True)
        farmed = farm_all(farm_jobs(configs, args, least=False), store_root, args.dataset, args.data_root,
                          args.train_per_class, train, test, args.device, args.progress)
        store = TrajectoryStore(store_root)
        outcomes: dict[tuple[str, int], Outcome] = {}
        for ipc in args.ipcs:
            for m in methods:
                print(f"  {m} IPC {ipc} ...", flush=True)
                try:
                    earlier = {k: outcomes[(k, ipc)].synthetic for k in args.edc_baselines
                               if (k, ipc) in outcomes and outcomes[(k, ipc)].synthetic is not None}
                    o = run_one(m, ipc, args, train, test, store, sets, eval_cfg, earlier)
                    for k, (acc, std) in o.edc_baselines.items():
                        outcomes[(k, ipc)].edc_acc, outcomes[(k, ipc)].edc_std = acc, std
                        print(f"    {k} under the EDC protocol (same observers): {_fmt(acc, std)} %", flush=True)
                    print(f"    {_fmt(o.acc, o.std)} % in {o.seconds:.0f} s ({o.iterations} it; {o.notes}; "
                          f"{o.eval_note})"
                          + (f"; EDC protocol {_fmt(o.edc_acc, o.edc_std)}" if o.edc_acc is not None else ""),
                          flush=True)
                except Exception as exc:  # report in the row, keep going
                    traceback.print_exc()
                    o = Outcome(error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                outcomes[(m, ipc)] = o
        full = None
        if args.full_epochs > 0:
            print(f"  full data ({args.full_epochs} epochs) ...", flush=True)
            cfg = dataclasses.replace(eval_cfg, epochs=args.full_epochs)
            full = Outcome()
            started = time.perf_counter()
            try:
                ev = full_data(train, test, cfg)
                full.acc, full.std = 100 * ev.mean, 100 * ev.std
            except Exception as exc:
                traceback.print_exc()
                full.error = f"{type(exc).__name__}: {exc}"
            full.seconds = time.perf_counter() - started
        return accuracy_report(args, methods, outcomes, full, farmed, len(train), store_note, sets)
    finally:
        if own:
            shutil.rmtree(store_root, ignore_errors=True)


# --------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_speed-worker":  # internal: one method's speed run in a fresh process
        result = speed_worker(json.loads(argv[1]))
        Path(argv[2]).write_text(json.dumps(result))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--data-root", default=os.environ.get("RAYDD_DATA"),
                       help="dataset folder (e.g. ../shared/datasets); not needed for digits")
        q.add_argument("--methods", nargs="+", choices=METHOD_ORDER, help="default: all")
        q.add_argument("--width", type=int, default=32, help="ConvNet width of every network (default 32)")
        q.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (no Ray either way)")
        q.add_argument("--store", help="trajectory store to farm into / reuse (default: a temporary one)")
        q.add_argument("--ssd-teacher-arch", default="convnet", choices=("convnet", "resnet18"),
                       help="SSD teacher network (paper: resnet18; default convnet at --width, BatchNorm)")
        q.add_argument("--set", action="append", default=[], metavar="METHOD.KNOB=VALUE",
                       help="extra config override, e.g. --set mtt.lr_img=1000 (repeatable)")
        q.add_argument("--progress", action="store_true", help="show the farm/condense progress bars")

    s = sub.add_parser("speed", help="seconds per iteration and peak memory per method")
    common(s)
    s.add_argument("--dataset", default="digits", choices=("digits", "fashion_mnist"))
    s.add_argument("--ipc", type=int, default=10)
    s.add_argument("--iterations", type=int, default=5, help="timed steps after one warm-up step (default 5)")
    s.add_argument("--train-per-class", type=int, help="training subset (default: all for digits, 500 otherwise)")
    s.add_argument("--timeout", type=int, default=1800, help="seconds per method before giving up (default 1800)")
    s.add_argument("--ssd-teacher-epochs", type=int, default=10,
                   help="epochs of the SSD teacher farmed for the timing (default 10)")

    a = sub.add_parser("accuracy", help="CPU-scaled accuracy table vs Random, full data and the papers")
    common(a)
    a.add_argument("--quick", action="store_true",
                   help="tiny check: digits, IPC 1, 20 iterations, 20 eval epochs, 1 model, tiny farm")
    a.add_argument("--dataset", choices=("digits", "fashion_mnist"), help="default fashion_mnist")
    a.add_argument("--ipcs", type=int, nargs="+", help="default 1 10")
    a.add_argument("--train-per-class", type=int, help="class-balanced training subset (default 500; 0: all)")
    a.add_argument("--iterations", type=int, help="condensation iterations cap (default 300)")
    a.add_argument("--syn-steps", type=int, default=20, help="cap on unrolled student steps, TM methods (default 20)")
    a.add_argument("--eval-epochs", type=int, help="evaluation epochs per network (default 300)")
    a.add_argument("--num-models", type=int, help="evaluation networks (default 3)")
    a.add_argument("--full-epochs", type=int, help="full-data training epochs (default 30; 0: skip)")
    a.add_argument("--experts", type=int, help="'expert' trajectories (MTT/DATM/coresets; default 5)")
    a.add_argument("--expert-epochs", type=int, help="epochs per expert (default 10)")
    a.add_argument("--pretrain-experts", type=int, help="'pretrain' experts (DANCE/PTLM; default 5)")
    a.add_argument("--pretrain-epochs", type=int, help="epochs per pretrain expert (default 10)")
    a.add_argument("--observers", type=int, help="EDC ConvNet-BN observers (default 2)")
    a.add_argument("--observer-epochs", type=int, help="epochs per observer (default 10)")
    a.add_argument("--observer-resnet18", type=int, default=0, help="extra ResNet-18-BN observers (default 0)")
    a.add_argument("--edc-baselines", nargs="*", default=["random"], metavar="METHOD",
                   help="methods run before EDC whose sets are also evaluated under the EDC protocol with EDC's "
                        "observers (default: random)")
    a.add_argument("--ssd-teacher-epochs", type=int, help="SSD FixMatch teacher epochs (default 20)")
    a.add_argument("--ssd-students", type=int, help="SSD student trajectories (default 5)")
    a.add_argument("--ssd-student-epochs", type=int, help="epochs per SSD student (default 10)")
    a.add_argument("--labelled-fraction", type=float, default=0.1, help="SSD labelled fraction (default 0.1)")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--out", help="also write the markdown report to this file")
    a.add_argument("--eval-at", type=int, nargs="*", default=[], metavar="K",
                   help="also evaluate each method's set after K iterations of the same run (K below its "
                        "iteration count), e.g. --eval-at 200 400 with --iterations 600")
    a.add_argument("--save-dir", help="also save each synthetic set here (METHOD_ipcK.safetensors; "
                   "re-evaluate with `raydd evaluate`)")
    args = p.parse_args(argv)
    bad = [k for k in getattr(args, "eval_at", None) or [] if k < 1]
    if bad:
        p.error(f"--eval-at {bad[0]} is invalid: expected iteration counts >= 1")
    if args.command == "speed":
        report = cmd_speed(args)
    else:
        report = cmd_accuracy(args)
        if args.out:
            Path(args.out).write_text(report + "\n")
    print()
    print(report)


if __name__ == "__main__":
    main()
