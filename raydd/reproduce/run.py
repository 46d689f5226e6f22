"""``raydd reproduce``: a published setting end to end — farm what is missing, condense with checkpoints,
evaluate under the paper's protocol with Random beside it under the same protocol, print paper vs
measured vs Random, and append the row to the results ledger. Plain torch (no Ray unless the farm is
asked to use it), so it runs on a GPU machine without Ray; ``budget`` stops the condensation cleanly at
a checkpoint that ``resume`` continues, on this machine or a fresh one (missing trajectories are farmed
again, deterministically: their ids are hashes of their settings and seeds).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..condense import TimeBudget, condense
from ..data.datasets import ImageDataset, data_root_for, load_dataset
from ..evaluation import EvalResult, evaluate, protocol_config
from ..methods import get_method, make_config
from ..training import ENGINES
from ..validation import check_choice, check_int, check_writable
from .settings import PublishedSetting, ReproScale, get_scale, get_setting, published_settings

DEFAULT_LEDGER = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "reproduce_ledger.jsonl"


def parse_budget(text: str | float | None) -> float | None:
    """Seconds of a budget written as 90, 90s, 8m or 1.5h; None stays None."""
    if text is None or text == "":
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text))
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"budget {text!r} is invalid: expected a positive duration such as 90s, 8m or 1.5h")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def default_ledger() -> Path:
    """The repository's ledger (benchmarks/results/) when raydd runs from a checkout, else ./ in the cwd."""
    return DEFAULT_LEDGER if DEFAULT_LEDGER.parent.is_dir() else Path("reproduce_ledger.jsonl")


def read_ledger(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{number} is not a JSON ledger row") from None
    return rows


def append_ledger(path: str | Path, row: dict) -> None:
    """One whole line per row, in one write to a file opened for appending."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")


@dataclass
class ReproResult:
    setting: PublishedSetting
    scale: ReproScale
    on: str | None
    iterations: int  # reached
    planned: int  # this run's target (the paper's count, or the scale's cap)
    result: EvalResult | None
    random: EvalResult | None
    trajectories: list[dict] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    eval_settings: dict = field(default_factory=dict)
    row: dict = field(default_factory=dict)
    resumed_from: int = 0  # the checkpoint's iteration this run continued (0: from the start)
    method_engine: str = "eager"  # how the method's iterations ran (its config's engine; eager where it has none)

    @property
    def finished(self) -> bool:
        return self.iterations >= self.planned

    def table(self) -> str:
        s, sc = self.setting, self.scale
        where = f" on {self.on}" if self.on else ""
        lines = [f"### {s.name} — {s.method} on {s.dataset} IPC {s.ipc}{where}, scale {sc.name}",
                 "", f"- departures from the paper: {s.departures(sc, self.on)}" + (
                     f"; data: {self.on} instead of {s.dataset}" if self.on else ""),
                 "- trajectories: " + (", ".join(f"{t['recipe']} {t['count']} x {t['epochs'] or 'default'} epochs"
                                                  for t in self.trajectories) or "none"),
                 f"- evaluation: {json.dumps(self.eval_settings, sort_keys=True)} (final accuracy)", "",
                 "| set | iterations (run / paper) | accuracy % (this run) | paper % |", "|---|---:|---:|---|"]

        def acc(r: EvalResult | None) -> str:
            return "not evaluated" if r is None else f"{100 * r.mean:.2f} ± {100 * r.std:.2f}"

        lines.append(f"| {s.method} | {self.iterations} / {s.iterations} | {acc(self.result)} | {s.paper_acc} "
                     f"({s.paper.source}) |")
        lines.append(f"| Random (same evaluation) | – | {acc(self.random)} | – |")
        if not self.finished:
            lines += ["", f"Stopped at iteration {self.iterations} of {self.planned} (budget): "
                          f"raydd reproduce {s.name} --scale {sc.name} --resume continues."]
        return "\n".join(lines) + "\n"


def _load(dataset: str, split: str, data_root: str | None, train_per_class: int | None) -> ImageDataset:
    data = load_dataset(dataset, split, data_root_for(dataset, data_root))
    return data.per_class(train_per_class, seed=0) if train_per_class and split == "train" else data


def _farm(setting: PublishedSetting, jobs, dataset: str, data_root: str | None, scale: ReproScale, store: str,
          train: ImageDataset, test: ImageDataset, device: str, backend: str, pack: int,
          progress: bool, engine: str = "eager") -> tuple[list[dict], str | None]:
    """Farm the jobs in order; returns what was farmed and the teacher trajectory farmed for this run, if any.
    A teacher is pinned: the later jobs that train against a teacher (SSD's students) name it, so the run
    reads its own teacher even where the store holds teachers of other settings on the same data."""
    from ..farm import FarmData, FarmSpec, farm
    from ..farm.recipes import get_recipe

    done, data, teacher = [], FarmData.from_datasets(train, test), None
    for need, count, epochs in jobs:
        fields = need.farm_fields(count=count, epochs=epochs)
        if scale.width is not None and fields["model"].get("arch", "convnet") == "convnet":
            fields["model"]["width"] = scale.width
        elif scale.teacher_width is not None and need.role == "teacher":
            fields["model"]["width"] = scale.teacher_width
        recipe = get_recipe(need.recipe)
        if teacher is not None and "teacher" in {f.name for f in dataclasses.fields(recipe.config_cls)}:
            fields["recipe_options"]["teacher"] = teacher
        spec = FarmSpec(store=store, dataset=dataset, data_root=data_root_for(dataset, data_root),
                        train_per_class=scale.train_per_class, backend=backend, device=device,
                        pack=pack if recipe.trains_together else 1,
                        engine=engine if engine in recipe.engines else "eager", **fields)
        started = time.perf_counter()
        report = farm(spec, progress=progress, data=data)
        if need.role == "teacher" and len(report.trajectory_ids) == 1:
            teacher = report.trajectory_ids[0]
        done.append({"recipe": need.recipe, "count": count, "epochs": epochs, "trained": len(report.trained),
                     "extended": len(report.extended), "served_by_longer": len(report.served),
                     "seconds": round(time.perf_counter() - started, 1)})
    return done, teacher


def reproduce(name: str, *, scale: str = "paper", on: str | None = None, data_root: str | None = None,
              store: str = "raydd-store", workdir: str = "raydd-reproduce", device: str = "auto",
              budget: str | float | None = None, resume: bool = False, ledger: str | Path | None = None,
              backend: str = "local", seed: int = 0, progress: bool = True, trajectories: int | None = None,
              trajectory_epochs: int | None = None, pack: int = 1,
              overrides: dict[str, Any] | None = None, engine: str = "eager",
              evaluate_unfinished: bool = True, condense_until: float | None = None) -> ReproResult:
    """Run the published setting ``name`` at ``scale`` (see the module doc); returns the result, after
    appending its row to ``ledger`` (default: ``default_ledger()`` for a run on the setting's own data at the
    paper or cpu scale, none for a smoke run — the tiny scale or ``on`` another dataset; ``ledger=""`` writes none).
    ``trajectories``/``trajectory_epochs`` cap what is farmed per recipe (never below what the config
    reads; reported as departures); ``pack`` trains that many experts per worker together (farm --pack);
    ``overrides`` sets method knobs (``--set``: an ablation of the setting, a departure like the others).
    ``engine`` (raydd.training.ENGINES) is how the farm's, the method's (where it has one) and the standard
    evaluation's training steps run: the same numbers, not a departure. ``evaluate_unfinished=False`` skips the
    evaluation (and the ledger row) of a run its budget stopped: its checkpoint is what it leaves.
    ``condense_until`` (a ``time.perf_counter()`` instant) stops the condensation then at the latest, whatever
    farming took before it."""
    setting = get_setting(name)
    check_int("pack", pack)
    sc, overrides = _scale_for(setting, scale, trajectories, trajectory_epochs, overrides)
    seconds_budget = parse_budget(budget)
    if backend not in ("local", "ray"):
        raise ValueError(f"backend {backend!r} is invalid: accepted local, ray")
    dataset = on or setting.dataset
    check_choice("engine", engine, ENGINES)
    config, jobs = setting.plan(sc, on)  # validated before any data is loaded
    config = with_engine(config, engine)
    eval_settings = setting.eval_settings(sc)
    eval_config = protocol_config(dataset, eval_settings)
    if engine != "eager" and "engine" in {f.name for f in dataclasses.fields(eval_config)}:
        eval_config = dataclasses.replace(eval_config, engine=engine)
    run_dir = run_directory(workdir, name, sc.name, trajectories=trajectories, trajectory_epochs=trajectory_epochs,
                            overrides=overrides, on=on)
    checkpoint = run_dir / "method.safetensors"
    if checkpoint.exists() and not resume:
        raise ValueError(f"{checkpoint} holds an earlier run of {name}: pass --resume to continue it, or remove it")
    ledger_path = ledger_for(ledger, sc, on)
    check_writable("--workdir", workdir, directory=True)  # what the run writes, checked before any work
    if ledger_path:
        check_writable("--ledger", ledger_path)
    say = (lambda text: print(text, file=sys.stderr, flush=True)) if progress else (lambda text: None)
    if resume and not checkpoint.exists():
        say(f"raydd reproduce: --resume: no earlier run of {name} in {run_dir}; starting from iteration 0")
    say(f"raydd reproduce: {name} ({setting.method} on {dataset} IPC {setting.ipc}), scale {sc.name}: "
        f"{setting.run_iterations(sc)} of the paper's {setting.iterations} iterations")
    started = time.perf_counter()
    train, test = _load(dataset, "train", data_root, sc.train_per_class), _load(dataset, "test", data_root, None)
    farmed, teacher = (_farm(setting, jobs, dataset, data_root, sc, store, train, test, device, backend, pack,
                             progress, engine) if jobs else ([], None))
    if teacher is not None and getattr(config, "teacher", "") is None:  # read the teacher this run farmed
        config = dataclasses.replace(config, teacher=teacher)
    farm_s = time.perf_counter() - started
    from ..store import TrajectoryStore

    trajectory_store = TrajectoryStore(store) if jobs else None
    run_dir.mkdir(parents=True, exist_ok=True)
    planned = setting.run_iterations(sc)
    t0 = time.perf_counter()
    with get_method(setting.method)(config, train, trajectory_store, device=device, seed=seed) as method:
        if condense_until is not None:  # what is left of the sitting once farming is done (at least one step)
            left = max(condense_until - time.perf_counter(), 1e-3)
            seconds_budget = left if seconds_budget is None else min(seconds_budget, left)
        sinks = [TimeBudget(seconds_budget)] if seconds_budget else []
        run = condense(method, planned, sinks=sinks, checkpoint_path=str(checkpoint), progress=progress)
        syn, teachers, reached = method.synthetic_set(), method.teacher_models(), method.iteration
        syn.save(run_dir / "synthetic.safetensors")
        condense_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        if reached < planned and not evaluate_unfinished:
            say(f"stopped at iteration {reached} of {planned} (budget): checkpoint {checkpoint}; not evaluated")
            return ReproResult(setting, sc, on, reached, planned, None, None, farmed,
                               {"farm": round(farm_s, 1), "condense": round(condense_s, 1), "evaluate": 0.0},
                               eval_settings, resumed_from=run.resumed_from,
                               method_engine=getattr(config, "engine", "eager"))
        if reached < planned:  # said now, not after the evaluation
            say(f"raydd reproduce: stopped at iteration {reached} of {planned} (budget); the checkpoint {checkpoint} "
                f"continues with --resume; evaluating the set so far")
        say(f"evaluating {setting.method} and Random: {eval_config}")
        result = evaluate(syn, test, eval_config, teachers=teachers, progress=progress)
        with get_method("random")(make_config("random", dataset, config.ipc), train, None, device=device,
                                  seed=seed) as rnd:
            rnd.step()
            random_result = evaluate(rnd.synthetic_set(), test, eval_config, teachers=teachers, progress=progress)
    out = ReproResult(setting, sc, on, reached, planned, result, random_result, farmed,
                      {"farm": round(farm_s, 1), "condense": round(condense_s, 1),
                       "evaluate": round(time.perf_counter() - t1, 1)}, eval_settings,
                      resumed_from=run.resumed_from, method_engine=getattr(config, "engine", "eager"))
    out.row = _ledger_row(out, device, run.resumed_from, seed, overrides)
    if train.info.image_format:  # e.g. CIFAR-10 read from its JPEG copy: close to, not the same as, the paper's data
        out.row["image_format"] = train.info.image_format
    if ledger_path:
        append_ledger(ledger_path, out.row)
    return out


def ledger_for(ledger: str | Path | None, scale: ReproScale, on: str | None) -> Path | str:
    """The ledger a run appends to: the one given (``""``: none); by default the repository's for a run on the
    setting's own data at the paper or cpu scale, and none for a smoke run (the tiny scale, or another dataset)."""
    if ledger is not None:
        return ledger
    if scale.name == "tiny" or (on is not None and on != "imagefolder"):
        return ""
    return default_ledger()


def run_directory(workdir: str | Path, name: str, scale: str, *, trajectories: int | None = None,
                  trajectory_epochs: int | None = None, overrides: dict[str, Any] | None = None,
                  on: str | None = None) -> Path:
    """Where a run keeps its checkpoint and synthetic set: one directory per setting, scale, caps and knobs."""
    caps = "".join(f"-{k}{v}" for k, v in (("t", trajectories), ("e", trajectory_epochs)) if v is not None)
    caps += "".join(f"-{k}={v}" for k, v in sorted((overrides or {}).items()))
    return Path(workdir) / (f"{name}-{scale}{caps}" + (f"-on-{on}" if on else ""))


def with_engine(config, engine: str):
    """``config`` with its ``engine`` field set to ``engine`` where the method's iteration is built for it
    (``engines``), else as it is: the engine changes how, not what, a method computes."""
    if engine != "eager" and engine in getattr(config, "engines", ()):
        return dataclasses.replace(config, engine=engine)
    return config


def _scale_for(setting: PublishedSetting, scale: str, trajectories: int | None, trajectory_epochs: int | None,
               overrides: dict[str, Any] | None) -> tuple[ReproScale, dict[str, Any] | None]:
    """The scale of a run with its caps and the ``--set`` knobs (aliases resolved, values validated: one line
    naming the accepted knobs, before any work); the knobs join the scale's, which ``plan`` applies."""
    sc = get_scale(scale).capped(trajectories, trajectory_epochs)
    if overrides:
        config_cls = get_method(setting.method).config_cls
        overrides = config_cls.resolve_knobs(overrides)
        config_cls.defaults(setting.dataset, setting.ipc).with_overrides(**overrides)  # values validated too
        sc = dataclasses.replace(sc, knobs=sc.knobs + tuple(sorted(overrides.items())))
    return sc, overrides


def plan_text(name: str, *, scale: str = "paper", on: str | None = None, trajectories: int | None = None,
              trajectory_epochs: int | None = None, overrides: dict[str, Any] | None = None) -> str:
    """What ``reproduce`` would run, without running it: iterations, the method's knobs that differ from the
    published row, the trajectories it farms (prefix-exact recipes only the epochs the method reads) and the
    evaluation."""
    setting = get_setting(name)
    sc, overrides = _scale_for(setting, scale, trajectories, trajectory_epochs, overrides)
    config, jobs = setting.plan(sc, on)
    from ..farm.recipes import get_recipe

    published = get_method(setting.method).config_cls.defaults(setting.dataset, setting.ipc).to_dict()
    changed = [f"{k}={v}" for k, v in config.to_dict().items() if published.get(k) != v]
    lines = [f"{name}: {setting.method} on {on or setting.dataset} IPC {config.ipc}, scale {sc.name}",
             f"- condensation: {setting.run_iterations(sc)} of the paper's {setting.iterations} iterations",
             f"- knobs that differ from the published row: {', '.join(changed) or 'none'}",
             f"- departures from the paper: {setting.departures(sc, on)}"]
    for need, count, epochs in jobs:
        paper_count, paper_epochs = setting.paper.trajectories.get(need.recipe, (None, None))
        note = ""
        if get_recipe(need.recipe).prefix_exact and paper_epochs and epochs is not None and epochs < paper_epochs:
            note = (f" (the first {epochs} of the paper's {paper_epochs}: the recipe is prefix-exact, so these are "
                    f"its trajectories' epochs 0..{epochs}, bit for bit)")
        lines.append(f"- farm: {need.recipe} {count} x {epochs or 'default'} epochs{note}")
    lines.append(f"- evaluation: {json.dumps(setting.eval_settings(sc), sort_keys=True)} (final accuracy), with "
                 f"Random under the same protocol")
    return "\n".join(lines) + "\n"


def _ledger_row(out: ReproResult, device: str, resumed_from: int, seed: int,
                overrides: dict[str, Any] | None) -> dict[str, Any]:
    from ..training import resolve_device

    dev = resolve_device(device)
    s = out.setting
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "setting": s.name,
        "method": s.method, "dataset": s.dataset, "on": out.on, "ipc": s.ipc, "scale": out.scale.name,
        "departures": s.departures(out.scale, out.on), "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__, "iterations": out.iterations, "planned_iterations": out.planned,
        "paper_iterations": s.iterations, "resumed_from": resumed_from, "trajectories": out.trajectories,
        "acc_mean": None if out.result is None else out.result.mean,
        "acc_std": None if out.result is None else out.result.std,
        "random_mean": None if out.random is None else out.random.mean,
        "random_std": None if out.random is None else out.random.std,
        "paper_acc": s.paper_acc, "source": s.paper.source, "eval": out.eval_settings, "seconds": out.seconds,
        "seed": seed,
        # an ablation of the setting (--set): kept apart from its measured results in --list
        **({"overrides": dict(sorted(overrides.items()))} if overrides else {}),
    }


def list_settings(ledger: str | Path | None = None) -> str:
    """Every registered setting with the paper's number and the best measured so far per scale (the ledger;
    rows run on another dataset than the paper's, and ablations with knobs set, are left out)."""
    rows = [] if ledger == "" else read_ledger(default_ledger() if ledger is None else ledger)
    best: dict[tuple[str, str], dict] = {}
    for r in rows:  # rows on another dataset are smoke runs, except an ImageFolder copy of the paper's data
        if (r.get("on") and r["on"] != "imagefolder") or r.get("acc_mean") is None or r.get("overrides"):
            continue
        key = (r["setting"], r["scale"])
        if key not in best or r["acc_mean"] > best[key]["acc_mean"]:
            best[key] = r

    def cell(name: str, scale: str) -> str:
        r = best.get((name, scale))
        if r is None:
            return "–"
        copy = ", ImageFolder copy" if r.get("on") else f", {r['image_format']} copy" if r.get("image_format") else ""
        capped = f", {r['departures']}" if scale == "paper" and not r["departures"].startswith("none") else ""
        used = "".join(f"{t['recipe']} {t['count']}x{t['epochs'] or ''}, " for t in r.get("trajectories", []))
        return (f"{100 * r['acc_mean']:.2f} (Random {100 * r['random_mean']:.2f}; {r['iterations']}/"
                f"{r['paper_iterations']} it, {r['device']}{copy}{capped}, {used}{r['date'][:10]})")

    settings = published_settings()
    lines = [f"{len(settings)} published settings (raydd reproduce NAME [--scale paper|cpu|tiny]):", "",
             "| setting | paper % (source) | paper iterations | measured, paper scale | measured, cpu scale |",
             "|---|---|---:|---|---|"]
    for name, s in settings.items():
        lines.append(f"| {name} | {s.paper_acc} ({s.paper.source}) | {s.iterations} | {cell(name, 'paper')} | "
                     f"{cell(name, 'cpu')} |")
    return "\n".join(lines) + "\n"
