"""Benchmark: memory and time of one MTT (or DATM) iteration against N, unroll='full' vs 'checkpoint' vs 'tesla'.

Not a test. Fashion-MNIST shapes (1x28x28; --dataset cifar10: 3x32x32), IPC 10, ConvNet-3 width 128
experts (one expert of a few
epochs on a class-balanced subset: the numbers of an iteration do not depend on how good the expert is).
Every (mode, N) runs in a fresh process, so each peak is its own: the peak resident memory of the
iteration above the process's level before it (ru_maxrss), and the iteration's wall and CPU seconds.
``full`` keeps the N-step graph (memory linear in N); ``checkpoint`` keeps only the ⌈N/k⌉ segment starts
and re-runs one segment of k steps at a time in the backward pass (k = 1 by default; --segment K);
``tesla`` keeps θ̂_0 only and replays the steps in order (TESLA's first-order gradient for N > 1).
``--agreement N ...`` compares, for one matching problem per N (same expert, start, minibatches and
augmentations), the gradient in S and α of ``tesla`` and ``checkpoint`` with the ``full`` one (cosine,
relative error): how far TESLA's Eq. 6 is from the exact gradient at this setting.

    python benchmarks/unroll.py --data-root ../shared/datasets --store /tmp/bench/unroll-store \\
        --full 10 20 --checkpoint 10 20 40 80 --tesla 10 20 40 80 --agreement 1 5 10 20
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
from raydd.methods.matching import normalised_distance
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


AGREE = """
import json, sys
sys.path.insert(0, {repo!r})
import torch
torch.set_num_threads({threads})
from raydd.data.datasets import load_dataset
from raydd.methods import get_method, make_config
from raydd.methods.matching import normalised_distance
from raydd.store import TrajectoryStore
train = load_dataset({dataset!r}, "train", {data_root!r}).per_class({per_class}, seed=0)
window = dict(current_max_start_epoch=None, init_correct=False) if {method!r} == "datm" else dict()
grads = {{}}
for mode in ("full", "checkpoint", "tesla", "perturbed"):
    config = make_config({method!r}, {dataset!r}, {ipc}, syn_steps={n}, expert_epochs=2, max_start_epoch=1,
                         batch_syn=None, unroll="full" if mode == "perturbed" else mode, model="convnet3-w{width}-in",
                         **window)
    method = get_method({method!r})(config, train, TrajectoryStore({store!r}), device="cpu", seed=0)
    start, theta_start, theta_target = method.sample_segment()
    theta = theta_start
    if mode == "perturbed":  # full from a θ̂_0 moved by float32 rounding: how exact "exact" can be here
        noise = torch.randn(theta.shape, generator=torch.Generator().manual_seed(1))
        theta = theta * (1 + 1e-7 * noise)
    end = method.unroll(theta, torch.Generator().manual_seed(5), create_graph=True)[0]
    loss = normalised_distance(end, theta_start, theta_target)
    grads[mode] = [g.detach().flatten().double() for g in torch.autograd.grad(loss, method.leaves()[:2])]
out = {{}}
for mode in ("checkpoint", "tesla", "perturbed"):
    for name, g, f in zip(("S", "alpha"), grads[mode], grads["full"]):
        out[mode + "_" + name + "_cos"] = float(torch.nn.functional.cosine_similarity(g, f, dim=0))
        out[mode + "_" + name + "_rel"] = float((g - f).norm() / f.norm())
print(json.dumps(out))
"""


FLOOR = """
import json, statistics, sys, time
sys.path.insert(0, {repo!r})
import torch
torch.set_num_threads({threads})
from raydd.data.datasets import load_dataset
from raydd.methods import get_method, make_config
from raydd.methods.matching import normalised_distance
from raydd.store import TrajectoryStore
train = load_dataset({dataset!r}, "train", {data_root!r}).per_class({per_class}, seed=0)
methods = {{}}
for mode in ("full", "checkpoint", "tesla"):
    config = make_config({method!r}, {dataset!r}, {ipc}, syn_steps={n}, expert_epochs=2, max_start_epoch=1,
                         batch_syn=None, unroll=mode, model="convnet3-w{width}-in")
    methods[mode] = get_method({method!r})(config, train, TrajectoryStore({store!r}), device="cpu", seed=0)
full = methods["full"]
start, theta_start, theta_target = full.sample_segment()

def cpu(fn):
    t = time.process_time()
    fn()
    return time.process_time() - t

def forward(create_graph):  # the N student steps and eq. 2, no backward
    end = full.unroll(theta_start, torch.Generator().manual_seed(5), create_graph=create_graph)[0]
    return normalised_distance(end, theta_start, theta_target)

def iteration(mode):  # the whole gradient of an iteration in S and alpha (no optimiser step: the same problem)
    m = methods[mode]
    end = m.unroll(theta_start, torch.Generator().manual_seed(5), create_graph=True)[0]
    torch.autograd.grad(normalised_distance(end, theta_start, theta_target), m.leaves()[:2])

times = {{k: [] for k in ("forward_graph", "forward_plain", "full", "checkpoint", "tesla")}}
for _ in range({repeats}):
    times["forward_graph"].append(cpu(lambda: forward(True)))
    times["forward_plain"].append(cpu(lambda: forward(False)))
    for mode in ("full", "checkpoint", "tesla"):
        times[mode].append(cpu(lambda: iteration(mode)))
print(json.dumps({{k: statistics.median(v) for k, v in times.items()}}))
"""


def floor_table(args) -> None:
    """What checkpoint and TESLA must cost at least, from the parts of one iteration measured in one process:
    checkpoint re-runs every step's forward and first-order gradient with a graph in the backward pass
    (floor = (full + forward with graph) / full); TESLA runs the steps once without a graph, then replays each
    with a graph and backpropagates it (floor = (full + forward without graph) / full)."""
    print(f"\n# the floor of checkpoint and tesla ({args.method.upper()}, {args.dataset} shapes, IPC {args.ipc}, "
          f"w{args.width}, {args.threads} thread(s); CPU s, median of {args.repeats}, one process per N)")
    print("| N | forward, graph | forward, no graph | full | checkpoint | floor | tesla | floor |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.floor:
        code = FLOOR.format(repo=str(REPO), threads=args.threads, data_root=args.data_root, per_class=args.per_class,
                            ipc=args.ipc, n=n, width=args.width, store=args.store, method=args.method,
                            dataset=args.dataset, repeats=args.repeats)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if out.returncode != 0:
            print(f"| {n} | failed: {out.stderr.strip().splitlines()[-1]} | | | | | | |")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        f = r["full"]
        print(f"| {n} | {r['forward_graph']:.2f} | {r['forward_plain']:.2f} | {f:.2f} | {r['checkpoint'] / f:.2f}x | "
              f"{(f + r['forward_graph']) / f:.2f}x | {r['tesla'] / f:.2f}x | {(f + r['forward_plain']) / f:.2f}x |",
              flush=True)


def farm_expert(args) -> None:
    sys.path.insert(0, str(REPO))
    from raydd.farm import FarmSpec, farm
    from raydd.methods import make_config

    farm(FarmSpec(store=args.store, dataset=args.dataset, data_root=args.data_root,
                  train_per_class=args.per_class, recipe="expert", recipe_options={"epochs": 3},
                  model={"width": args.width}, trajectories=1, backend="local", device=args.device,
                  zca=make_config(args.method, args.dataset, args.ipc).zca), progress=False)


def run_one(args, mode: str, n: int, template: str = ONE) -> dict:
    code = template.format(repo=str(REPO), threads=args.threads, data_root=args.data_root, per_class=args.per_class,
                      ipc=args.ipc, n=n, mode=mode, width=args.width, store=args.store, segment=args.segment,
                       device=args.device, method=args.method, dataset=args.dataset)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default="../shared/datasets")
    p.add_argument("--store", default="/tmp/bench/unroll-store")
    p.add_argument("--full", type=int, nargs="*", default=[10, 20], help="N for unroll=full")
    p.add_argument("--checkpoint", type=int, nargs="*", default=[10, 20, 40, 80], help="N for unroll=checkpoint")
    p.add_argument("--tesla", type=int, nargs="*", default=[10, 20, 40, 80], help="N for unroll=tesla")
    p.add_argument("--agreement", type=int, nargs="*", default=[1, 5, 10, 20],
                   help="N at which tesla's and checkpoint's gradients are compared with full's (CPU)")
    p.add_argument("--method", choices=("mtt", "datm"), default="mtt", help="the unrolled method (its published "
                   "config for --dataset/--ipc, with the N, window and width given here)")
    p.add_argument("--dataset", default="fashion_mnist", help="fashion_mnist (1x28x28) or cifar10 (3x32x32)")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--per-class", type=int, default=100, help="training images per class (the expert and S init)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--segment", type=int, default=0, help="unroll_segment of the checkpoint runs (0: the default, 1)")
    p.add_argument("--floor", type=int, nargs="*", default=[], help="N: checkpoint's and tesla's CPU against their "
                                                                    "floors, from the parts of an iteration")
    p.add_argument("--repeats", type=int, default=3, help="--floor: alternating repeats per part")
    p.add_argument("--device", default="cpu", help="cpu or cuda (peak: the CUDA allocator's, above the level before "
                                                     "the iteration; time: wall, after one warm-up iteration)")
    args = p.parse_args()
    farm_expert(args)
    if args.floor:
        floor_table(args)
        if not (args.full or args.checkpoint or args.tesla or args.agreement):
            return
    rows = []
    for mode, ns in (("full", args.full), ("checkpoint", args.checkpoint), ("tesla", args.tesla)):
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
    for name in ("checkpoint", "tesla"):
        runs = {n: r for mode, n, r in rows if mode == name and "error" not in r}
        if full and runs:
            n_full, n_max = min(full), max(runs)
            print(f"\n{name} peak at N={n_max}: {runs[n_max]['peak_mb']:.0f} MiB vs full at N={n_full}: "
                  f"{full[n_full]['peak_mb']:.0f} MiB (target: <=)")
    if args.agreement:
        print(f"\n# gradient of tesla and checkpoint vs full, one matching problem per N ({args.method.upper()}, "
              f"{args.dataset} shapes, IPC {args.ipc}, w{args.width}): cosine / relative error ‖g − g_full‖ / ‖g_full‖")
        print("(float32 floor: full's own gradient from a θ̂_0 moved by 1e-7 relative noise, i.e. rounding)")
        print("| N | tesla: S cos | S rel. err. | α cos (sign) | α rel. err. | checkpoint: S rel. err. | α rel. err. "
              "| floor: S rel. change | α rel. change |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for n in args.agreement:
            r = run_one(args, "agreement", n, AGREE)
            if "error" in r:
                print(f"| {n} | failed: {r['error']} | | | | | | | |")
                continue
            print(f"| {n} | {r['tesla_S_cos']:.4f} | {r['tesla_S_rel']:.3g} | {r['tesla_alpha_cos']:+.0f} | "
                  f"{r['tesla_alpha_rel']:.3g} | {r['checkpoint_S_rel']:.2g} | {r['checkpoint_alpha_rel']:.2g} | "
                  f"{r['perturbed_S_rel']:.2g} | {r['perturbed_alpha_rel']:.2g} |")


if __name__ == "__main__":
    main()
