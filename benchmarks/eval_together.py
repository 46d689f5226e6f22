"""Benchmark: the evaluation protocol's N networks trained one by one vs together (one vmapped computation).

Not a test. Prints one table. Run from the repository root:

    python benchmarks/eval_together.py                         # digits and Fashion-MNIST, IPC 1/10/50
    python benchmarks/eval_together.py --datasets digits --epochs 50

For each dataset and IPC the "synthetic" set is a class-balanced random real subset (the timing does
not depend on what the images are); ``evaluate_synthetic``'s standard protocol trains ``--networks``
ConvNets (the protocol's width 128, DSA, SGD momentum 0.9) for ``--epochs`` epochs, first one by one
(``EvalConfig(together=False)``), then together (``together=True``), in the same process and with the
same seeds. CPU seconds (``time.process_time``, all threads) and wall seconds are reported (on
``--device cuda`` the wall seconds, synchronised: CPU time there measures the launching thread), and the
largest difference between the two runs' per-network accuracies (the same networks, batch orders and
augmentation draws: it should be 0 or a float-rounding flip).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raydd.data.datasets import load_train_test  # noqa: E402
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
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    where = torch.cuda.get_device_name(args.device) if cuda else "CPU"
    unit = "wall" if cuda else "CPU"
    print(f"# evaluate_synthetic: {args.networks} ConvNet-w{args.width} networks x {args.epochs} epochs, "
          f"one by one vs together; {args.threads} thread(s), {where}\n")
    print(f"{'dataset':<14}{'IPC':>4}{f'one-by-one {unit} s':>19}{f'together {unit} s':>17}{'CPU speed-up':>14}"
          f"{'wall speed-up':>15}{'max |acc diff|':>16}")
    for name in args.datasets:
        train, test = load_train_test(name, None if name == "digits" else args.data_root)
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
