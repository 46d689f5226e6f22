"""`raydd quickstart`: the whole pipeline on the offline default, in a few minutes on 2 CPU cores.

farm (MTT experts on scikit-learn's digits, into the Arrow store) -> Ray Tune sweep with ASHA
over several methods and IPCs -> leaderboard -> where to point TensorBoard. The sweep is the
embedded spec raydd/specs/quickstart.yaml (the same as sweeps/quick.yaml).
"""
from __future__ import annotations

import argparse
import sys
from importlib import resources


def quickstart_spec(**overrides):
    from .sweep.spec import SweepSpec

    with resources.as_file(resources.files("raydd") / "specs" / "quickstart.yaml") as path:
        return SweepSpec.from_yaml(path, **overrides)


def add_quickstart_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "quickstart", help="farm -> ASHA sweep -> leaderboard on the offline digits default (a few minutes)",
        description="Runs the whole raydd pipeline on the embedded offline default: farms MTT experts on "
                    "scikit-learn's 8x8 digits into the store, sweeps random / DM / MTT at IPC 1 and 10 with "
                    "Ray Tune + ASHA, prints the leaderboard and where to point TensorBoard.")
    p.add_argument("--store", default="raydd-store", help="trajectory store root (default raydd-store)")
    p.add_argument("--storage", default="raydd-sweeps", help="sweep output directory (default raydd-sweeps)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--verbose", action="store_true", help="Ray Tune's status tables instead of raydd's progress line")
    p.set_defaults(func=cmd_quickstart)


def _farm_curves_dir(spec) -> str | None:
    """Where the farmed experts' TensorBoard curves go: next to the sweep, under its (local) storage."""
    from .sweep.runner import _absolute

    if "://" in spec.storage:
        return None  # TensorBoard curves need a local directory: `raydd store tensorboard` writes them later
    return f"{_absolute(spec.storage).rstrip('/')}/{spec.name}-farm"


def cmd_quickstart(args: argparse.Namespace) -> int:
    import ray

    from .sweep.cli import sweep_exit_code
    from .sweep.runner import _connect, farm_for_sweep, run_sweep

    spec = quickstart_spec(store=args.store, storage=args.storage)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    say(f"raydd quickstart 1/3: farm -> {spec.store} (what it holds already is reused)")
    started = _connect(None)
    try:
        farm_curves = _farm_curves_dir(spec)
        for report in farm_for_sweep(spec, progress=not args.quiet, tensorboard=farm_curves):
            say(report.table())
        say(f"raydd quickstart 2/3: sweep {', '.join(spec.methods)} x IPC {list(spec.ipcs)} "
            f"({spec.num_trials} trials, ASHA) -> {spec.storage}/{spec.name}")
        result = run_sweep(spec, progress=not args.quiet, verbose=args.verbose, resume=True)
    except KeyboardInterrupt:  # during the farm (the sweep's interrupt comes back as result.interrupted)
        print("raydd quickstart: interrupted; what was farmed stays in the store; continue with: raydd quickstart",
              file=sys.stderr)
        return 130
    finally:
        if started:
            ray.shutdown()
    if result.interrupted:
        print(f"raydd quickstart: interrupted; the unfinished trials keep their checkpoints in "
              f"{result.experiment_path}; continue with: raydd quickstart (it resumes)", file=sys.stderr)
        return 130
    say("raydd quickstart 3/3: leaderboard")
    print(result.markdown())
    print(f"\nleaderboard: {result.leaderboard_csv}\nbest synthetic sets: {result.experiment_path}/best/\n"
          f"TensorBoard (sweep trials and the farmed experts' curves): tensorboard --logdir {spec.storage}\n"
          f"  trials: {result.experiment_path}" + (f"   experts: {farm_curves}" if farm_curves else ""))
    return sweep_exit_code(result)
