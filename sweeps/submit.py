#!/usr/bin/env python3
"""Run a raydd sweep on a Ray cluster's head node.

    ray submit cluster.yaml sweeps/submit.py -- sweeps/fashion_mnist.yaml --farm
    ray submit cluster.yaml sweeps/submit.py -- sweeps/cifar10.yaml --farm --data-root ~/data --resume

``ray submit`` copies only this script; the raydd package (and sweeps/) reach every node
through cluster.yaml's file_mounts (~/raydd) and setup_commands (pip install -e). A relative
spec path is looked up in the working directory, then in that checkout.

Steps: validate the spec (before touching Ray), join the running cluster
(``ray.init(address="auto")``), farm the spec's ``farm:`` recipes into the shared store
when ``--farm`` is given (what the store already holds is skipped), run the sweep with
Ray Tune, print the leaderboard. The store defaults to $RAYDD_STORE and the data root to
$RAYDD_DATA when they are set (cluster.yaml exports both); sweep results go to
$RAYDD_SWEEPS, else next to a URI store (s3://bucket/raydd-store -> s3://bucket/raydd-sweeps):
trials on several nodes need storage that every node reaches.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def find_spec(path: str) -> Path:
    candidate = Path(path).expanduser()
    if candidate.is_file():
        return candidate
    import raydd

    in_checkout = Path(raydd.__file__).resolve().parents[1] / path
    if in_checkout.is_file():
        return in_checkout
    raise ValueError(f"sweep spec {path} not found here ({Path.cwd()}) nor in the raydd checkout "
                     f"({in_checkout.parent})")


def default_storage(store: str) -> str | None:
    if os.environ.get("RAYDD_SWEEPS"):
        return os.environ["RAYDD_SWEEPS"]
    if "://" in store:
        return store.rstrip("/").rsplit("/", 1)[0] + "/raydd-sweeps"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", help="sweep spec YAML, e.g. sweeps/fashion_mnist.yaml")
    parser.add_argument("--farm", action="store_true", help="farm the spec's 'farm:' recipes into the store first")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted sweep of the same name")
    parser.add_argument("--store", default=os.environ.get("RAYDD_STORE"),
                        help="trajectory store (default $RAYDD_STORE)")
    parser.add_argument("--data-root", dest="data_root", default=os.environ.get("RAYDD_DATA"),
                        help="dataset folder on every node (default $RAYDD_DATA)")
    parser.add_argument("--storage", help="where Tune writes the sweep (default $RAYDD_SWEEPS, or next to a URI store)")
    parser.add_argument("--address", default="auto", help="Ray cluster address (default: the running cluster)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    from raydd.sweep.spec import SweepSpec

    try:
        overrides = {"store": args.store}
        if args.data_root:
            overrides["data_root"] = str(Path(args.data_root).expanduser())
        spec = SweepSpec.from_yaml(find_spec(args.spec), **overrides)  # validated before Ray starts
    except ValueError as err:
        print(f"submit: error: {err}", file=sys.stderr)
        return 2
    storage = args.storage or default_storage(spec.store)

    import ray

    from raydd.sweep.runner import farm_for_sweep, run_sweep

    ray.init(address=args.address)
    try:
        print(f"submit: {spec.name}: {spec.num_trials} trial(s) on a cluster with {ray.cluster_resources()}",
              file=sys.stderr)
        if args.farm:
            for report in farm_for_sweep(spec, backend="ray", progress=not args.quiet):
                print(report.table())
        result = run_sweep(spec, progress=not args.quiet, resume=args.resume, storage=storage)
    except ValueError as err:
        print(f"submit: error: {err}", file=sys.stderr)
        return 2
    finally:
        ray.shutdown()
    print(result.markdown())
    print(f"results: {result.experiment_path} ({len(result.trials)} trials, {result.num_errors} errored, "
          f"{result.wall_time_s:.0f} s)")
    return 0 if result.rows else 1


if __name__ == "__main__":
    sys.exit(main())
