"""Benchmark: memory and time of one MTT (or DATM) iteration against N, unroll='full' vs unroll='checkpoint'.

Not a test. Fashion-MNIST shapes (1x28x28; --dataset cifar10: 3x32x32), IPC 10, ConvNet-3 width 128
experts (one expert of a few
epochs on a class-balanced subset: the numbers of an iteration do not depend on how good the expert is).
Every (mode, N) runs in a fresh process, so each peak is its own: the peak resident memory of the
iteration above the process's level before it (ru_maxrss), and the iteration's wall and CPU seconds.
``full`` keeps the N-step graph (memory linear in N); ``checkpoint`` keeps only the ⌈N/k⌉ segment starts
and re-runs one segment of k steps at a time in the backward pass (k = 1 by default; --segment K).

    python benchmarks/unroll.py --data-root /work/shared/datasets --store /tmp/bench/unroll-store \\
        --full 10 20 --checkpoint 10 20 40 80
    # DATM's published CIFAR-10 IPC 50 (N=80, all 500 images per step) on a GPU:
    python benchmarks/unroll.py --device cuda --method datm --dataset cifar10 --ipc 50 --per-class 500 \
        --full 10 80 --checkpoint 80 --store /tmp/bench/unroll-cifar
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

ONE = """
import json, sys, time
sys.path.insert(0, {repo!r})
sys.path.insert(0, {repo!r} + "/benchmarks")
import torch
torch.set_num_threads({threads})
from condense import PeakMemory
from raydd.data.datasets import load_dataset
from raydd.methods import get_method, make_config
from raydd.store import TrajectoryStore
train = load_dataset({dataset!r}, "train", {data_root!r}).per_class({per_class}, seed=0)
window = dict(current_max_start_epoch=None, init_correct=False) if {method!r} == "datm" else dict()  # cost only
config = make_config({method!r}, {dataset!r}, {ipc}, syn_steps={n}, expert_epochs=2, max_start_epoch=1,
                     batch_syn=None, unroll={mode!r}, unroll_segment={segment}, model="convnet3-w{width}-in",
                     **window)
device = torch.device({device!r})
method = get_method({method!r})(config, train, TrajectoryStore({store!r}), device=str(device), seed=0)
if device.type == "cuda":  # CUDA context, cuDNN autotuning: one iteration before the measured one
    method.step()
    torch.cuda.synchronize()
wall0, cpu0 = time.perf_counter(), time.process_time()
with PeakMemory(device) as peak:
    metrics = method.step()
wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
print(json.dumps({{"wall": wall, "cpu": cpu, "peak_mb": peak.peak_mb, "source": peak.source,
                  "loss": metrics["loss"], "held_mb": metrics.get("graph_mem_mb")}}))
"""


def farm_expert(args) -> None:
    sys.path.insert(0, str(REPO))
    from raydd.farm import FarmSpec, farm
    from raydd.methods import make_config

    farm(FarmSpec(store=args.store, dataset=args.dataset, data_root=args.data_root,
                  train_per_class=args.per_class, recipe="expert", recipe_options={"epochs": 3},
                  model={"width": args.width}, trajectories=1, backend="local", device=args.device,
                  zca=make_config(args.method, args.dataset, args.ipc).zca), progress=False)


def run_one(args, mode: str, n: int) -> dict:
    code = ONE.format(repo=str(REPO), threads=args.threads, data_root=args.data_root, per_class=args.per_class,
                      ipc=args.ipc, n=n, mode=mode, width=args.width, store=args.store, segment=args.segment,
                       device=args.device, method=args.method, dataset=args.dataset)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default="/work/shared/datasets")
    p.add_argument("--store", default="/tmp/bench/unroll-store")
    p.add_argument("--full", type=int, nargs="*", default=[10, 20], help="N for unroll=full")
    p.add_argument("--checkpoint", type=int, nargs="*", default=[10, 20, 40, 80], help="N for unroll=checkpoint")
    p.add_argument("--method", choices=("mtt", "datm"), default="mtt", help="the unrolled method (its published "
                   "config for --dataset/--ipc, with the N, window and width given here)")
    p.add_argument("--dataset", default="fashion_mnist", help="fashion_mnist (1x28x28) or cifar10 (3x32x32)")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--per-class", type=int, default=100, help="training images per class (the expert and S init)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--segment", type=int, default=0, help="unroll_segment of the checkpoint runs (0: the default, 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (peak: the CUDA allocator's, above the level before "
                                                     "the iteration; time: wall, after one warm-up iteration)")
    args = p.parse_args()
    farm_expert(args)
    rows = []
    for mode, ns in (("full", args.full), ("checkpoint", args.checkpoint)):
        for n in ns:
            started = time.perf_counter()
            r = run_one(args, mode, n)
            rows.append((mode, n, r))
            print(f"  {mode} N={n}: {r} ({time.perf_counter() - started:.0f} s with start-up)", flush=True)
    full = {n: r for mode, n, r in rows if mode == "full" and "error" not in r}
    cuda = args.device.startswith("cuda")
    unit = "wall" if cuda else "CPU"
    print(f"\n# one {args.method.upper()} iteration, {args.dataset} shapes, IPC {args.ipc}, ConvNet-3 w{args.width}, {args.threads} "
          f"thread(s), {args.device}; peak = " + ("CUDA allocated memory" if cuda else "resident memory")
          + " above the level before the iteration")
    print(f"| unroll | N | peak MiB | held between passes MiB | wall s | CPU s | {unit} vs full at same N | loss |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for mode, n, r in rows:
        if "error" in r:
            print(f"| {mode} | {n} | failed: {r['error']} | | | | | |")
            continue
        key = "wall" if cuda else "cpu"
        ratio = f"{r[key] / full[n][key]:.2f}x" if n in full else "-"
        print(f"| {mode} | {n} | {r['peak_mb']:.0f} | {r['held_mb']:.0f} | {r['wall']:.2f} | {r['cpu']:.2f} | "
              f"{ratio} | {r['loss']:.5f} |")
    ck = {n: r for mode, n, r in rows if mode == "checkpoint" and "error" not in r}
    if full and ck:
        n_full, n_ck = min(full), max(ck)
        print(f"\ncheckpoint peak at N={n_ck}: {ck[n_ck]['peak_mb']:.0f} MiB vs full at N={n_full}: "
              f"{full[n_full]['peak_mb']:.0f} MiB (target: <=)")


if __name__ == "__main__":
    main()
