"""Benchmark: DM, DANCE and PTLM embedding class by class vs every class together (``embed_classes_together``).

Not a test. Prints one markdown table. Run from the repository root:

    python benchmarks/embed_together.py --device cuda --data-root ../shared/datasets          # H200: < 90 s
    python benchmarks/embed_together.py --device cpu --train-per-class 200 --iterations 2      # 2-core CPU

Setting: Fashion-MNIST shapes (28x28, 10 classes; real data from --data-root, a class-balanced
--train-per-class subset), IPC 10, the paper's embedder ConvNet-3 width 128 with instance norm (DM builds
it; DANCE and PTLM read it from --experts short ``pretrain`` trajectories farmed with the local backend
into a temporary store, or from --store). Each method's published defaults otherwise (DM: 256 real
images per class; DANCE/PTLM: 128, factor 2, calibration / pseudo-label step every iteration).

``per-class``: ``embed_classes_together=False`` (one forward and backward per class; the CPU default).
``together``: ``True`` (every class's real batch in one no-grad forward, every class's synthetic batch in
one forward, one backward; the CUDA default for instance norm / no norm).

Time per iteration: CUDA wall time with ``torch.cuda.synchronize`` around the timed iterations; CPU
process time (``time.process_time``), one thread. Peak memory: CUDA ``torch.cuda.max_memory_allocated``
after a reset, minus what was allocated before the timed iterations; CPU ``VmHWM`` after resetting it via
``/proc/self/clear_refs``, minus the resident size at the reset; the reset (and the CUDA one) comes after
the method is built and before its --warmup untimed iterations, so the peak is the iterations' working
memory. On CPU every (method, mode) runs in a fresh child process; on CUDA one child per method measures
per-class, then together (``max_memory_allocated`` needs no fresh process; a CUDA start costs seconds).
No Ray needed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from proc_memory import reset_peak_kib, status_kib  # noqa: E402  (benchmarks/ is on sys.path)

METHODS = ("dm", "dance", "ptlm")
MODES = ("per-class", "together")


def load_train(args):
    from raydd.data.datasets import load_dataset

    train = load_dataset(args.dataset, "train", args.data_root)
    return train.per_class(args.train_per_class, seed=0)  # the farm's subset (raydd.farm.task.prepare_data)


def farm_store(args, root: str) -> None:
    """``--experts`` pretrain trajectories of --pretrain-epochs epochs, ConvNet-3 w128 instance norm."""
    from raydd.farm import FarmSpec, farm

    farm(FarmSpec(store=root, dataset=args.dataset, data_root=args.data_root, train_per_class=args.train_per_class,
                  recipe="pretrain", backend="local", trajectories=args.experts, device=args.device,
                  recipe_options={"epochs": args.pretrain_epochs}, model={"width": args.width, "depth": 3}),
         progress=False)


def child(args) -> None:
    import torch

    import raydd.methods.dance  # noqa: F401  (registers the methods)
    import raydd.methods.dm  # noqa: F401
    import raydd.methods.ptlm  # noqa: F401

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    train = load_train(args)
    print(json.dumps({mode: measure(args, train, device, mode == "together") for mode in args.mode.split(",")}))


def measure(args, train, device, together: bool) -> dict:
    import torch

    from raydd.methods import get_method, make_config
    from raydd.store import TrajectoryStore

    knobs = {"embed_classes_together": together}
    if args.method == "dm":
        knobs.update(width=args.width, depth=3, norm="instance")
        store = None
    else:
        knobs.update(num_experts=args.experts)
        store = TrajectoryStore(args.store)
    config = make_config(args.method, args.dataset, args.ipc, iterations=args.warmup + args.iterations, **knobs)
    method = get_method(args.method)(config, train, store, device=device, seed=0)
    assert method.embed_together is together and method.model_spec.norm == "instance", method.model_spec
    assert method.model_spec.width == args.width and method.model_spec.depth == 3, method.model_spec
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(args.warmup):
            method.step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        losses = [method.step()["loss"] for _ in range(args.iterations)]
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak_mib = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    else:
        base = reset_peak_kib()
        for _ in range(args.warmup):
            method.step()
        t0 = time.process_time()
        losses = [method.step()["loss"] for _ in range(args.iterations)]
        seconds = time.process_time() - t0
        peak_mib = (status_kib("VmHWM") - base) / 1024
    del method
    return {"s_per_it": seconds / args.iterations, "peak_mib": peak_mib, "loss": losses[-1]}


def run_child(args, method: str, mode: str, store: str | None) -> dict:
    """{mode: result} for the comma-separated ``mode``s, measured in one fresh process."""
    cmd = [sys.executable, __file__, "--child", "--method", method, "--mode", mode, "--device", args.device,
           "--dataset", args.dataset, "--data-root", args.data_root, "--train-per-class", str(args.train_per_class),
           "--ipc", str(args.ipc), "--width", str(args.width), "--experts", str(args.experts),
           "--iterations", str(args.iterations), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    if store:
        cmd += ["--store", store]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)} if args.device == "cpu" else dict(os.environ)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if out.returncode != 0:
        raise SystemExit(f"child {method} {mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--data-root", default="../shared/datasets")
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--train-per-class", type=int, default=None, help="default: 1000 on cuda, 200 on cpu")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--iterations", type=int, default=None, help="timed iterations; default 20 on cuda, 2 on cpu")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations first; default 3 on cuda, 1 on cpu")
    p.add_argument("--experts", type=int, default=None, help="pretrain trajectories farmed; default 2 cuda, 1 cpu")
    p.add_argument("--pretrain-epochs", type=int, default=1)
    p.add_argument("--store", default=None, help="a store holding the pretrain experts (default: farm a temporary one)")
    p.add_argument("--threads", type=int, default=1, help="CPU intra-op threads")
    p.add_argument("--out", default=None, help="also write the table to this file")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args()
    cuda = args.device == "cuda"
    for key, on_cuda, on_cpu in (("train_per_class", 1000, 200), ("iterations", 20, 2), ("warmup", 3, 1),
                                 ("experts", 2, 1)):
        if getattr(args, key) is None:
            setattr(args, key, on_cuda if cuda else on_cpu)
    if args.child:
        return child(args)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="raydd-embed-together-") as tmp:
        store, farm_s = args.store, 0.0
        if store is None and set(args.methods) & {"dance", "ptlm"}:
            store = str(Path(tmp) / "store")
            t0 = time.perf_counter()
            farm_store(args, store)
            farm_s = time.perf_counter() - t0
        rows = []
        for method in args.methods:
            if cuda:
                result = run_child(args, method, ",".join(MODES), store)
            else:
                result = {mode: run_child(args, method, mode, store)[mode] for mode in MODES}
            rows.append((method, result))
            print(f"{method}: {json.dumps(result)}", file=sys.stderr, flush=True)
    timing = "wall s/it (synchronized)" if cuda else f"CPU s/it ({args.threads} thread)"
    memory = "peak MiB (max_memory_allocated)" if cuda else "peak MiB (VmHWM)"
    lines = [f"# embed_classes_together: per class vs together ({args.device})", "",
             f"Command: `python benchmarks/embed_together.py {' '.join(sys.argv[1:])}`", "",
             f"{args.dataset}, {args.train_per_class} training images per class, IPC {args.ipc}, ConvNet-3 "
             f"w{args.width} instance norm, {args.warmup} warm-up + {args.iterations} timed iterations per "
             f"(method, mode), {'one process per method' if cuda else 'each in a fresh process'}; DANCE/PTLM experts: {args.experts} pretrain trajectories "
             f"({'given store' if args.store else f'farmed here in {farm_s:.0f} s'}).", "",
             f"| method | per-class {timing} | together {timing} | time together/per-class | "
             f"per-class {memory} | together {memory} | memory together/per-class |",
             "|---|---|---|---|---|---|---|"]
    for method, r in rows:
        a, b = r["per-class"], r["together"]
        lines.append(f"| {method} | {a['s_per_it']:.4f} | {b['s_per_it']:.4f} | {b['s_per_it'] / a['s_per_it']:.2f}x | "
                     f"{a['peak_mib']:.0f} | {b['peak_mib']:.0f} | "
                     f"{b['peak_mib'] / a['peak_mib'] if a['peak_mib'] > 0 else float('nan'):.2f}x |")
    lines += ["", f"Total {time.perf_counter() - started:.0f} s."]
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
