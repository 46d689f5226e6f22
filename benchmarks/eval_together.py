"""Benchmark: the evaluation protocol's N networks trained one by one vs together (one vmapped computation).

Not a test. Prints one table. Run from the repository root:

    python benchmarks/eval_together.py                         # digits and Fashion-MNIST, IPC 1/10/50
    python benchmarks/eval_together.py --datasets digits --epochs 50
    python benchmarks/eval_together.py --floor --datasets digits fashion_mnist --ipcs 1 10 --epochs 20

For each dataset and IPC the "synthetic" set is a class-balanced random real subset (the timing does
not depend on what the images are); ``evaluate_synthetic``'s standard protocol trains ``--networks``
ConvNets (the protocol's width 128, DSA, SGD momentum 0.9) for ``--epochs`` epochs, first one by one
(``EvalConfig(together=False)``), then together (``together=True``), in the same process and with the
same seeds. CPU seconds (``time.process_time``, all threads) and wall seconds are reported (on
``--device cuda`` the wall seconds, synchronised: CPU time there measures the launching thread), and the
largest difference between the two runs' per-network accuracies (the same networks, batch orders and
augmentation draws: it should be 0 or a float-rounding flip).

``--floor`` (CPU) instead measures what batching can gain at all: the CPU time of one network trained on the
set, and on the set repeated N times with an N times larger batch (the same steps, N times the images
each: the arithmetic of N networks in the calls of one, the best case for any grouping of N networks,
which adds the grouping's own cost). If N times the images cost r times the time, N networks trained
together cannot beat N / r times one by one on this machine (training; the per-network test pass on
the real test set, arithmetic-bound, comes on top and gains nothing).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raydd.data.datasets import data_root_for, load_train_test  # noqa: E402
from raydd.evaluation.standard import EvalConfig, train_and_test  # noqa: E402


def timed(subset, test, config: EvalConfig):
    cuda = config.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
    c0, w0 = time.process_time(), time.perf_counter()
    result = train_and_test(subset.images, subset.labels, test, subset.info, config, lr=0.01)
    if cuda:
        torch.cuda.synchronize()
    return result, time.process_time() - c0, time.perf_counter() - w0


def floor_ratio(subset, test, config: EvalConfig, n: int) -> tuple[float, float]:
    """CPU seconds of training one network on ``subset`` and on ``subset`` repeated n times with an n times
    larger batch (the same number of steps, n times the images per step); tests on one image per class."""
    from raydd.data.datasets import ImageDataset

    small_test = test.per_class(1, seed=0)
    big = ImageDataset(subset.images.repeat(n, 1, 1, 1), subset.labels.repeat(n), subset.info, subset.split,
                       subset.source)
    warm = EvalConfig(**{**config.to_dict(), "num_models": 1, "epochs": 1, "together": False})
    timed(subset, small_test, warm)  # first calls (allocator, oneDNN primitives) are not the protocol's cost
    times = []
    for data, batch in ((subset, config.batch_size), (big, n * config.batch_size)):
        one = EvalConfig(**{**config.to_dict(), "num_models": 1, "batch_size": batch, "together": False})
        times.append(timed(data, small_test, one)[1])
    return times[0], times[1]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["digits", "fashion_mnist"])
    p.add_argument("--data-root", default=os.environ.get("RAYDD_DATA", "../shared/datasets"))
    p.add_argument("--ipcs", type=int, nargs="+", default=[1, 10, 50])
    p.add_argument("--networks", type=int, default=5)
    p.add_argument("--epochs", type=int, default=20, help="per network (the protocol's 300 scale linearly)")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cpu", help="cpu or cuda (on cuda the wall time is the measure)")
    p.add_argument("--floor", action="store_true", help="the ceiling on a together speed-up on this machine (CPU)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.floor:
        print(f"# what batching {args.networks} networks can gain at most: one ConvNet-w{args.width} network x "
              f"{args.epochs} epochs on the set vs on the set x {args.networks} (batch x {args.networks}), "
              f"{args.threads} thread(s), CPU time\n")
        print(f"| dataset | IPC | 1x images CPU s | {args.networks}x images CPU s | ratio r | ceiling {args.networks} / r |")
        print("|---|---:|---:|---:|---:|---:|")
        for name in args.datasets:
            train, test = load_train_test(name, data_root_for(name, args.data_root))
            for ipc in args.ipcs:
                config = EvalConfig(model={"arch": "convnet", "width": args.width}, epochs=args.epochs)
                t1, tn = floor_ratio(train.per_class(ipc, seed=0), test, config, args.networks)
                print(f"| {name} | {ipc} | {t1:.1f} | {tn:.1f} | {tn / t1:.2f} | {args.networks * t1 / tn:.2f}x |",
                      flush=True)
        return
    cuda = args.device.startswith("cuda")
    where = torch.cuda.get_device_name(args.device) if cuda else "CPU"
    unit = "wall" if cuda else "CPU"
    print(f"# evaluate_synthetic: {args.networks} ConvNet-w{args.width} networks x {args.epochs} epochs, "
          f"one by one vs together; {args.threads} thread(s), {where}\n")
    print(f"{'dataset':<14}{'IPC':>4}{f'one-by-one {unit} s':>19}{f'together {unit} s':>17}{'CPU speed-up':>14}"
          f"{'wall speed-up':>15}{'max |acc diff|':>16}")
    for name in args.datasets:
        train, test = load_train_test(name, data_root_for(name, args.data_root))
        for ipc in args.ipcs:
            subset = train.per_class(ipc, seed=0)
            base = EvalConfig(model={"arch": "convnet", "width": args.width}, num_models=args.networks,
                              epochs=args.epochs, device=args.device)
            if ipc == args.ipcs[0] and cuda:  # CUDA context, cuDNN autotuning, kernel caches: not the protocol's cost
                timed(subset, test, EvalConfig(**{**base.to_dict(), "together": False, "num_models": 1, "epochs": 2}))
                timed(subset, test, EvalConfig(**{**base.to_dict(), "together": True, "num_models": 2, "epochs": 2}))
            one, one_cpu, one_wall = timed(subset, test, EvalConfig(**{**base.to_dict(), "together": False}))
            tog, tog_cpu, tog_wall = timed(subset, test, EvalConfig(**{**base.to_dict(), "together": True}))
            diff = max(abs(a - b) for a, b in zip(one.accuracies, tog.accuracies))
            one_s, tog_s = (one_wall, tog_wall) if cuda else (one_cpu, tog_cpu)
            print(f"{name:<14}{ipc:>4}{one_s:>19.1f}{tog_s:>17.1f}{one_cpu / tog_cpu:>13.2f}x"
                  f"{one_wall / tog_wall:>14.2f}x{diff:>16.4f}", flush=True)
    print(f"\ntarget: together >= 2x one by one at IPC 1 and 10 ({unit} time)")


if __name__ == "__main__":
    main()
