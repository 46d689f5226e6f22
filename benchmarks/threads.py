"""Benchmark: what thread setting ``raydd condense`` (and evaluate, reproduce) should default to on a CPU.

Not a test. Runs the same short condensation in fresh processes under each setting, on a quiet machine and
next to a competing job (a busy process on every core but one), and prints wall and CPU seconds:

    python benchmarks/threads.py [--iterations 30] [--repeats 2]

Settings: torch's own default (as many threads as cores, OpenMP's default active waiting), the same with
``OMP_WAIT_POLICY=PASSIVE`` (threads sleep instead of spinning between parallel regions), and one thread.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

SETTINGS = {
    "torch default (active wait)": {"OMP_WAIT_POLICY": "ACTIVE"},
    "passive wait": {"OMP_WAIT_POLICY": "PASSIVE"},
    "1 thread": {"OMP_NUM_THREADS": "1"},
}


def run(iterations: int, env: dict) -> tuple[float, float]:
    cmd = [sys.executable, "-m", "raydd.cli", "condense", "--method", "dm", "--dataset", "digits", "--ipc", "10",
           "--iterations", str(iterations), "--set", "width=64", "--quiet", "--out", "/tmp/raydd-threads.safetensors"]
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "RAYDD_THREADS")}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(cmd, check=True, env={**base, **env}, capture_output=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter() - started, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def busy() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    cores = len(os.sched_getaffinity(0))
    print(f"# raydd condense, DM on digits IPC 10, width 64, {args.iterations} iterations; {cores} CPU(s); "
          f"wall / CPU s, median of {args.repeats}")
    print("| machine | setting | wall s | CPU s |\n|---|---|---:|---:|")
    for load in ("quiet", f"{max(1, cores - 1)} busy process(es)"):
        jobs = [busy() for _ in range(max(1, cores - 1))] if load != "quiet" else []
        try:
            for name, env in SETTINGS.items():
                runs = [run(args.iterations, env) for _ in range(args.repeats)]
                print(f"| {load} | {name} | {statistics.median(r[0] for r in runs):.1f} | "
                      f"{statistics.median(r[1] for r in runs):.1f} |", flush=True)
        finally:
            for job in jobs:
                job.kill()


if __name__ == "__main__":
    main()
