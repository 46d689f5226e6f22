"""Resident memory after each step of one condensation method, to spot growth across iterations.

Not a test. Found DATM-CLR's memory growth: every step skipped by DATM's threshold leaked its
whole unrolled graph (~2.3 GB at IPC 10, N = 20), because the saved-tensor meter's pack hook
returned the tensor itself, which makes a create_graph=True graph a reference cycle that only
backward breaks (fixed in raydd/methods/matching.py, SavedTensorMeter; benchmarks/results/fashion_mnist_ipc10_experts20.md):

    python benchmarks/method_memory.py --method datm_clr --store STORE --steps 6
    python benchmarks/method_memory.py --method datm --store STORE --steps 6     # baseline
    python benchmarks/method_memory.py --method datm_clr --store STORE --set dsa_strategy=scale_rotate

The store must hold the CPU-scaled benchmark's experts (benchmarks/condense.py accuracy --store);
the method's config is the CPU-scaled one of condense.py (scaled_config), plus --set overrides. The
steps run through raydd.condense.condense with a sink that prints the resident memory after each.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from condense import _rss_mb, load_data, scaled_config  # noqa: E402

from raydd.condense import Sink, condense  # noqa: E402
from raydd.methods.base import get_method  # noqa: E402
from raydd.store import TrajectoryStore  # noqa: E402


class MemoryRows(Sink):
    """One table row per step: resident memory, seconds, loss, skipped."""

    def on_start(self, run) -> None:
        self.last = time.perf_counter()

    def on_step(self, run, metrics) -> None:
        now = time.perf_counter()
        print(f"| {run.method.iteration - 1} | {_rss_mb():.0f} | {now - self.last:.1f} | "
              f"{metrics.get('loss', float('nan')):.3f} | {int(metrics.get('skipped', 0))} |", flush=True)
        self.last = now


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True)
    p.add_argument("--store", required=True)
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--data-root", default="../shared/datasets")
    p.add_argument("--train-per-class", type=int, default=300)
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--syn-steps", type=int, default=20)
    p.add_argument("--expert-epochs", type=int, default=20)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="method knob (raydd's --set)")
    args = p.parse_args()
    from raydd.condense_cli import method_overrides

    train, _ = load_data(args.dataset, args.data_root, args.train_per_class)
    sets = {args.method: method_overrides(args.method, args.set)}
    scale = argparse.Namespace(dataset=args.dataset, width=32, syn_steps=args.syn_steps, expert_epochs=args.expert_epochs,
                               ssd_student_epochs=args.expert_epochs, pretrain_experts=4)
    config = scaled_config(args.method, args.ipc, 200, scale, sets)
    print(f"| step | RSS MB | s | loss | skipped |\n|---:|---:|---:|---:|---:|\n| before | {_rss_mb():.0f} | | | |")
    with get_method(args.method)(config, train, TrajectoryStore(args.store), device="cpu", seed=0) as m:
        print(f"| built | {_rss_mb():.0f} | | | |")
        condense(m, args.steps, sinks=[MemoryRows()], progress=False)


if __name__ == "__main__":
    main()
