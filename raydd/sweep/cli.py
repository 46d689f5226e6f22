"""`raydd sweep SPEC [--farm] [--resume]`: a Tune sweep of condensation methods from a YAML spec."""
from __future__ import annotations

import sys


def add_sweep_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep", help="run a Ray Tune sweep of condensation methods from a YAML spec",
        description="Run every method x IPC x knob setting of a sweep spec as Tune trials (ASHA stops weak ones "
                    "early on the evaluation accuracy), then write a leaderboard, the best synthetic sets and "
                    "TensorBoard logs into <storage>/<name>.")
    p.add_argument("spec", help="sweep spec YAML (see sweeps/quick.yaml)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep with the same name")
    p.add_argument("--storage", help="where to write the experiment: a directory or a URI such as s3://bucket/sweeps "
                                     "(default: the spec's storage, raydd-sweeps)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    p.add_argument("--farm", action="store_true",
                   help="first farm what the methods read: the spec's 'farm:' recipes, then what their needs declare "
                        "(what the store holds is skipped)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--verbose", action="store_true",
                   help="Ray Tune's status tables instead of raydd's progress line (set when the sweep starts)")
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args) -> int:
    from .spec import SweepSpec

    spec = SweepSpec.from_yaml(args.spec)  # validated before Ray is imported
    from .runner import check_destination

    check_destination(spec, args.storage, args.address)  # before any farming or Ray
    print(f"raydd sweep: {spec.name}: {spec.num_trials} trial(s) of {', '.join(spec.methods)} on {spec.dataset} "
          f"IPC {list(spec.ipcs)}", file=sys.stderr)
    import ray

    from .runner import _connect, farm_for_sweep, run_sweep

    started = _connect(args.address) if args.farm else False
    try:
        if args.farm:
            try:
                farm_for_sweep(spec, progress=not args.quiet)
            except KeyboardInterrupt:
                from ..condense_cli import continuation

                print(f"raydd sweep: interrupted while farming; what was published stays in {spec.store}; "
                      f"continue with: {continuation(args)}", file=sys.stderr)
                return 130
        result = run_sweep(spec, progress=not args.quiet, verbose=args.verbose, resume=args.resume,
                           storage=args.storage, address=args.address)
    finally:
        if started:
            ray.shutdown()
    if result.interrupted:
        from ..condense_cli import continuation

        print(f"raydd sweep: interrupted; {result.unfinished} unfinished trial(s) keep their checkpoints in "
              f"{result.experiment_path}; continue with: {continuation(args, '--resume')}", file=sys.stderr)
        return 130
    print(result.markdown())
    print(f"{len(result.trials)} trial(s), {result.num_errors} errored, {result.unfinished} unfinished, "
          f"{result.wall_time_s:.0f} s; results in {result.experiment_path}; "
          f"TensorBoard: tensorboard --logdir {result.experiment_path}")
    return sweep_exit_code(result)


def sweep_exit_code(result) -> int:
    """0: every trial finished; 1: some errored (or nothing ranked); 3: interrupted (resume it)."""
    if not result.complete:
        return 3
    if result.num_errors:
        print(f"raydd sweep: {result.num_errors} trial(s) errored (listed above and in {result.leaderboard_md})",
              file=sys.stderr)
        return 1
    return 0 if result.rows else 1
