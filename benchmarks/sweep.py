"""Benchmark: the same sweep grid with ASHA and without (FIFO), in one run on one machine.

Not a test. Prints a markdown table. Run from the repository root:

    python benchmarks/sweep.py                          # digits, DM and MTT, IPC 10, 16 configs each
    python benchmarks/sweep.py --methods dm --max-t dm=400 --out sweep.md

Both runs use one Ray instance, one trajectory store (farmed first, skipped when stored),
the same trials (method x IPC x grid point, the same seed) and the same final evaluation:

- ``fifo``: every trial runs all ``max_t`` iterations and is evaluated once, at the end —
  the cheapest honest way to sweep without early stopping;
- ``asha``: raydd's per-(method, IPC) ASHA, rungs at grace · rf^k with grace = max_t / rf^2
  (so three rungs: grace, grace · rf, max_t); trials are evaluated at every rung.
  ``--variant promotion`` (default, the ASHA paper's rule, raydd/asha.py) or ``stopping``
  (Ray's ASHAScheduler).

Compute = the trials' own seconds (Tune's ``time_total_s``: condensation plus evaluations,
summed over trials), plus condensation iterations and evaluations counted separately. The
best configuration of each run is its leaderboard's best trial (highest final accuracy among
trials that ran all iterations); the table also gives the FIFO rank and accuracy of the
configuration ASHA picked. Target (issue 5): ASHA finds the same best configuration with
at most a third of FIFO's compute.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raydd.sweep.spec import ASHA_VARIANTS, SweepSpec  # noqa: E402

# 16-point grids over knobs that matter (a first version swept DM's lr_img x momentum and MTT's
# lr_img x lr_lr: on digits those landscapes were flat to within the evaluation noise, so "the
# same best configuration" was a coin toss for any scheduler).
GRIDS: dict[str, dict[str, list]] = {
    "dm": {"lr_img": [0.03, 0.3, 3.0, 30.0], "init": ["real", "noise"], "momentum": [0.0, 0.9]},
    "mtt": {"lr_img": [1.0, 10.0, 100.0, 1000.0], "syn_steps": [2, 5, 10, 20]},
}
# Fixed knobs that fit the benchmark's small experts and data.
FIXED: dict[str, dict[str, Any]] = {
    "dm": {"width": 32, "batch_real": 64},
    "mtt": {"expert_epochs": 1, "max_start_epoch": 3},
}
DEFAULT_MAX_T = {"dm": 320, "mtt": 160}


def parse_max_t(items: list[str], methods: list[str]) -> dict[str, int]:
    out = {m: DEFAULT_MAX_T.get(m, 160) for m in methods}
    for item in items:
        method, _, value = item.partition("=")
        if method not in methods or not value.isdigit() or int(value) < 1:
            raise SystemExit(f"--max-t {item!r} is invalid: expected METHOD=ITERATIONS with METHOD in {methods}")
        out[method] = int(value)
    return out


def build_spec(name: str, args, method: str, max_t: int, scheduler: str, storage: str) -> SweepSpec:
    """One method's sweep (each method gets its own ASHA grace period = max_t / rf^2)."""
    grace = max(1, max_t // args.reduction_factor ** 2)
    if grace * args.reduction_factor ** 2 != max_t:
        raise SystemExit(f"--max-t {method}={max_t} is invalid: expected a multiple of reduction_factor^2 "
                         f"({args.reduction_factor ** 2}) so that the top rung is the last iteration")
    knobs = {method: {**{k: {"grid": v} for k, v in GRIDS[method].items()}, **FIXED[method]}}
    data: dict[str, Any] = {
        "name": name, "dataset": args.dataset, "data_root": args.data_root, "store": args.store,
        "storage": storage, "methods": [method], "ipcs": args.ipcs, "seeds": [args.seed],
        "iterations": {method: max_t}, "knobs": knobs, "samples": 1, "max_failures": 0,
        "eval": {"model": {"arch": "convnet", "width": args.width}, "num_models": args.num_models,
                 "epochs": args.eval_epochs},
        "resources": {"cpu": 1, "gpu": 0},
        "farm": {"expert": {"trajectories": 4, "recipe_options": {"epochs": 5, "batch_size": 128},
                            "model": {"width": args.width}, "backend": "local"}} if method == "mtt" else {},
    }
    if scheduler == "asha":
        data["eval_every"] = "rungs"  # evaluations exactly at the rungs grace, grace*rf, max_t
        data["scheduler"] = {"type": "asha", "reduction_factor": args.reduction_factor, "grace_period": grace,
                             "variant": args.variant}
    else:
        data["eval_every"] = 0  # evaluated once, at the end
        data["scheduler"] = {"type": "fifo"}
    return SweepSpec.from_dict(data)


def trial_rows(result) -> list[dict[str, Any]]:
    """Per trial: knobs (grid ones only), iterations, evaluations, seconds, final accuracy."""
    rows = []
    for res in result.result_grid:
        metrics = res.metrics or {}
        config = res.config or {}
        arm = config.get("arm") or {}
        method = arm.get("method", config.get("method"))
        knobs = {**(config.get("knobs") or {}), **(arm.get("knobs") or {})}
        grid = {k: knobs[k] for k in GRIDS.get(method, {}) if k in knobs}
        evals = metrics.get("training_iteration", 0)  # one Tune report per evaluation
        rows.append({"method": method, "ipc": arm.get("ipc", config.get("ipc")), "grid": grid,
                     "iterations": int(metrics.get("iterations", 0) or 0),
                     "evaluations": int(evals or 0), "seconds": float(metrics.get("time_total_s", 0.0) or 0.0),
                     "acc": metrics.get("eval_acc"), "error": res.error is not None})
    return rows


def key(grid: dict[str, Any]) -> tuple:
    return tuple(sorted(grid.items()))


def fmt_grid(grid: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(grid.items()))


def run(args) -> str:
    import ray

    from raydd.sweep.runner import farm_for_sweep, run_sweep

    methods = args.methods
    max_t = parse_max_t(args.max_t, methods)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="raydd-sweep-bench-"))
    args.store = args.store or str(work / "store")
    specs = {(m, mode): build_spec(f"bench-{m}-{mode}", args, m, max_t[m], mode, str(work / "sweeps"))
             for m in methods for mode in ("fifo", "asha")}
    for (m, mode) in specs:
        shutil.rmtree(work / "sweeps" / f"bench-{m}-{mode}", ignore_errors=True)

    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level=logging.ERROR)
    rows: dict[str, list] = {"fifo": [], "asha": []}
    walls: dict[tuple[str, str], float] = {}
    try:
        for m in methods:
            if specs[(m, "fifo")].farm:
                t0 = time.perf_counter()
                farm_for_sweep(specs[(m, "fifo")], backend="local", progress=False)
                print(f"farmed experts into {args.store} in {time.perf_counter() - t0:.0f} s", flush=True)
            for mode in args.order:
                spec = specs[(m, mode)]
                print(f"running the {m} {mode} sweep ({spec.num_trials} trials) ...", flush=True)
                t0 = time.perf_counter()
                rows[mode] += trial_rows(run_sweep(spec, progress=False))
                walls[(m, mode)] = time.perf_counter() - t0
                print(f"  {m} {mode}: {walls[(m, mode)]:.0f} s wall", flush=True)
    finally:
        ray.shutdown()

    lines = [f"## Sweep benchmark — ASHA vs no early stopping (FIFO), {args.dataset}, IPC {args.ipcs}",
             "",
             f"- machine: {os.cpu_count()} CPU cores, Ray with {args.cpus} CPUs, 1 CPU per trial; seed {args.seed}; "
             f"load average at the end {os.getloadavg()[0]:.1f}",
             "- grid per (method, IPC): " + "; ".join(
                 f"{m}: " + " x ".join(f"{k} {v}" for k, v in GRIDS[m].items()) + f" (fixed {FIXED[m]})"
                 for m in methods),
             f"- iterations per trial (max_t): {max_t}; ASHA ({args.variant} variant): reduction factor "
             f"{args.reduction_factor}, rungs at "
             + "; ".join(f"{m} {[max_t[m] // args.reduction_factor ** (2 - i) for i in range(3)]}" for m in methods)
             + " (an evaluation at each, eval_every: rungs); FIFO: one evaluation at the end",
             f"- evaluation: ConvNet-3 width {args.width}, {args.num_models} networks x {args.eval_epochs} epochs, "
             f"final test accuracy",
             "- compute: sum over trials of Tune's time_total_s (condensation + evaluations); wall: the whole sweep",
             "",
             "| method | IPC | run | trials | iterations | evaluations | trial-seconds | wall s | "
             "best config | best acc (%) |",
             "|---|---:|---|---:|---:|---:|---:|---:|---|---:|"]
    verdicts = []
    for m in methods:
        for ipc in args.ipcs:
            group = {mode: [r for r in rows[mode] if r["method"] == m and r["ipc"] == ipc] for mode in rows}
            best = {}
            for mode, g in group.items():
                done = [r for r in g if r["iterations"] >= max_t[m] and r["acc"] is not None]
                best[mode] = max(done, key=lambda r: r["acc"]) if done else None
            for mode in ("fifo", "asha"):
                g, b = group.get(mode, []), best.get(mode)
                pick = f"{fmt_grid(b['grid'])} | {100 * b['acc']:.2f}" if b else "— | —"
                lines.append(f"| {m} | {ipc} | {mode} | {len(g)} | {sum(r['iterations'] for r in g)} | "
                             f"{sum(r['evaluations'] for r in g)} | {sum(r['seconds'] for r in g):.0f} | "
                             f"{walls.get((m, mode), 0):.0f} | {pick} |")
            if best.get("fifo") and best.get("asha"):
                fifo_sorted = sorted(group["fifo"], key=lambda r: -(r["acc"] or 0))
                rank = next(i + 1 for i, r in enumerate(fifo_sorted) if key(r["grid"]) == key(best["asha"]["grid"]))
                fifo_acc_of_pick = fifo_sorted[rank - 1]["acc"]
                share = sum(r["seconds"] for r in group["asha"]) / max(1e-9, sum(r["seconds"] for r in group["fifo"]))
                it_share = sum(r["iterations"] for r in group["asha"]) / max(1, sum(r["iterations"] for r in group["fifo"]))
                same = key(best["fifo"]["grid"]) == key(best["asha"]["grid"])
                verdicts.append(
                    f"- {m} IPC {ipc}: ASHA used {100 * share:.0f}% of FIFO's trial-seconds ({100 * it_share:.0f}% of "
                    f"its iterations); its pick is FIFO's #{rank} of {len(fifo_sorted)} (FIFO accuracy of that config "
                    f"{100 * fifo_acc_of_pick:.2f}% vs FIFO best {100 * best['fifo']['acc']:.2f}%); "
                    f"same best configuration: {'yes' if same else 'NO'}; target (same config, <= 1/3 compute): "
                    f"{'met' if same and share <= 1 / 3 else 'NOT met'}")
    lines += ["", *verdicts, ""]
    if args.keep:
        lines.append(f"- results kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-root")
    p.add_argument("--methods", nargs="+", default=["dm", "mtt"], choices=sorted(GRIDS))
    p.add_argument("--ipcs", nargs="+", type=int, default=[10])
    p.add_argument("--max-t", nargs="*", default=[], metavar="METHOD=N",
                   help=f"iterations per trial (default {DEFAULT_MAX_T}); a multiple of reduction_factor^2")
    p.add_argument("--reduction-factor", type=int, default=4)
    p.add_argument("--variant", choices=ASHA_VARIANTS, default=ASHA_VARIANTS[0],
                   help="ASHA variant (default promotion: the ASHA paper's rule; stopping: Ray's ASHAScheduler)")
    p.add_argument("--width", type=int, default=32, help="ConvNet width of experts, embedders and evaluation")
    p.add_argument("--eval-epochs", type=int, default=150)
    p.add_argument("--num-models", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="CPUs Ray may use (one per trial)")
    p.add_argument("--order", nargs=2, default=["fifo", "asha"], choices=["fifo", "asha"],
                   help="which sweep runs first (default fifo asha)")
    p.add_argument("--store", help="trajectory store (default: a temporary one, farmed here)")
    p.add_argument("--workdir", help="where sweeps are written (default: a temporary directory, removed)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--out", help="also write the table to this file")
    args = p.parse_args(argv)
    if sorted(args.order) != ["asha", "fifo"]:
        raise SystemExit(f"--order {args.order} is invalid: expected fifo and asha, once each")
    if any(i < 1 for i in args.ipcs):
        raise SystemExit(f"--ipcs {args.ipcs} is invalid: expected integers >= 1")
    report = run(args)
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n")


if __name__ == "__main__":
    main()
