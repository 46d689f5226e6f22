"""Benchmark: bf16 autocast (``precision="bf16"``) against fp32 for the farm's expert epoch and the evaluation.

Not a test. Prints one markdown table. Run from the repository root (no Ray needed):

    python benchmarks/precision.py --device cuda --data-root ../shared/datasets   # full Fashion-MNIST, <= 60 s on an H200
    python benchmarks/precision.py --device cpu        # 300 images per class, 2 epochs: tens of minutes (bf16 is slow on CPU)
    python benchmarks/precision.py --device cpu --train-per-class 30 --test-per-class 30 --epochs 1 \
        --eval-epochs 3 --networks 2                   # a few minutes (benchmarks/results/precision_cpu.md)

Two parts, each run fp32 then bf16 with the same seeds, in the same process:

(a) expert epoch: the registered ``expert`` recipe's training (its config: SGD lr 0.01, batch 256, DSA) of a
    ConvNet-3 (instance norm, the recipe's default) of width 32 and 128 on Fashion-MNIST, through raydd's
    ``train_epoch`` + ``evaluate_model`` (one test pass per epoch, as ``eval_every=1``), for ``--epochs``
    epochs: seconds per epoch (mean over the epochs) and the test accuracy after the last one;
(b) evaluation: the standard protocol (``raydd.evaluation.train_and_test``) of a random IPC-10 set (a
    class-balanced random real subset) with ``--networks`` ConvNet-3 w128 networks for ``--eval-epochs``
    epochs: seconds and the networks' mean final test accuracy.

Time is wall-clock after ``torch.cuda.synchronize()`` on CUDA (with ``torch.cuda.max_memory_allocated``,
the peak of the setting), process CPU time (all threads) on CPU. On CUDA every setting is warmed up first
(CUDA context, cuDNN algorithm choice, bf16 kernels) on a few batches outside the measurement.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raydd.data.augment import make_dsa  # noqa: E402
from raydd.data.datasets import load_train_test  # noqa: E402
from raydd.evaluation.standard import EvalConfig, train_and_test  # noqa: E402
from raydd.farm.recipes import get_recipe  # noqa: E402
from raydd.models import ModelSpec, build_model  # noqa: E402
from raydd.training import PRECISIONS, evaluate_model, train_epoch  # noqa: E402


class Meter:
    """Seconds (wall + synchronise on CUDA, process CPU time on CPU) and the CUDA peak memory of a block."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.t0 = time.perf_counter() if self.cuda else time.process_time()

    def seconds(self) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return time.perf_counter() - self.t0
        return time.process_time() - self.t0

    def peak_mib(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / 2 ** 20 if self.cuda else None


def expert_run(train, test, width: int, precision: str, epochs: int, device: torch.device, meter: Meter,
               warmup: bool = False) -> dict:
    """The expert recipe's training of one network (seed 0) for ``epochs`` epochs."""
    cfg = get_recipe("expert").make_config({})
    recipe = get_recipe("expert")
    info = train.info
    spec = ModelSpec(arch="convnet", width=width, depth=3, norm=recipe.default_norm, channels=info.channels,
                     resolution=tuple(info.resolution), num_classes=info.num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = build_model(spec).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    dsa = make_dsa(cfg.dsa_strategy, flip_ok=info.flip_ok) if cfg.dsa else None
    augment = (lambda x, g: dsa(x, generator=g)) if dsa is not None else None
    gen = torch.Generator().manual_seed(0)
    if warmup:
        n = 4 * cfg.batch_size
        train_epoch(net, opt, train.images[:n], train.labels[:n], batch_size=cfg.batch_size, generator=gen,
                    device=device, augment=augment, precision=precision)
        evaluate_model(net, test.images[:n], test.labels[:n], device=device, precision=precision)
        return {}
    meter.start()
    seconds, acc = [], float("nan")
    for _ in range(epochs):
        t0 = meter.seconds()
        train_epoch(net, opt, train.images, train.labels, batch_size=cfg.batch_size, generator=gen, device=device,
                    augment=augment, precision=precision)
        acc = evaluate_model(net, test.images, test.labels, device=device, precision=precision).acc
        seconds.append(meter.seconds() - t0)
    assert all(p.dtype == torch.float32 for p in net.parameters())
    return {"s": statistics.fmean(seconds), "acc": acc, "mib": meter.peak_mib()}


def eval_run(subset, test, precision: str, args, device: torch.device, meter: Meter, warmup: bool = False) -> dict:
    config = EvalConfig(model={"arch": "convnet", "width": 128, "depth": 3}, num_models=args.networks,
                        epochs=2 if warmup else args.eval_epochs, device=str(device), precision=precision)
    meter.start()
    result = train_and_test(subset.images, subset.labels, test, subset.info, config, lr=0.01)
    return {"s": meter.seconds(), "acc": result.mean, "mib": meter.peak_mib(),
            "together": result.extra.get("networks_together")}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--data-root", default=os.environ.get("RAYDD_DATA", "../shared/datasets"))
    p.add_argument("--train-per-class", type=int, default=None,
                   help="expert part: class-balanced training subset (default: the full split on cuda, 300 on cpu)")
    p.add_argument("--test-per-class", type=int, default=None,
                   help="class-balanced test subset (default: the full 10000 on cuda, 300 per class on cpu)")
    p.add_argument("--epochs", type=int, default=None, help="expert epochs per setting (default: 3 on cuda, 2 on cpu)")
    p.add_argument("--widths", type=int, nargs="+", default=[32, 128])
    p.add_argument("--eval-epochs", type=int, default=None,
                   help="epochs per evaluation network (default: the protocol's 300 on cuda, 30 on cpu)")
    p.add_argument("--networks", type=int, default=5)
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    torch.set_num_threads(args.threads)
    per_class = args.train_per_class if args.train_per_class is not None else (None if cuda else 300)
    test_per_class = args.test_per_class if args.test_per_class is not None else (None if cuda else 300)
    args.epochs = args.epochs or (3 if cuda else 2)
    args.eval_epochs = args.eval_epochs or (300 if cuda else 30)
    started = time.perf_counter()
    train, test = load_train_test("fashion_mnist", args.data_root)
    subset = train.per_class(args.ipc, seed=0)
    if per_class is not None:
        train = train.per_class(per_class, seed=0)
    if test_per_class is not None:
        test = test.per_class(test_per_class, seed=0)
    meter = Meter(device)
    where = torch.cuda.get_device_name(device) if cuda else f"CPU, {args.threads} thread(s)"
    unit = "wall s" if cuda else "CPU s"
    print(f"# bf16 autocast vs fp32 on {where} (torch {torch.__version__})\n")
    print(f"Fashion-MNIST: expert part {len(train)} training images, test {len(test)} images; {args.epochs} expert "
          f"epoch(s) per setting; evaluation IPC {args.ipc}, {args.networks} ConvNet-3 w128 networks x "
          f"{args.eval_epochs} epochs. Time: {unit}" + (", peak = torch.cuda.max_memory_allocated" if cuda else "")
          + ".\n")
    rows = []
    for width in args.widths:
        if cuda:
            for precision in PRECISIONS:
                expert_run(train, test, width, precision, 1, device, meter, warmup=True)
        res = {prec: expert_run(train, test, width, prec, args.epochs, device, meter) for prec in PRECISIONS}
        rows.append((f"expert epoch, ConvNet-3 w{width}", f"{unit} / epoch", res))
        print(f"  expert w{width}: " + ", ".join(f"{k} {v['s']:.2f} s acc {v['acc']:.4f}" for k, v in res.items()),
              file=sys.stderr, flush=True)
    if cuda:
        for precision in PRECISIONS:
            eval_run(subset, test, precision, args, device, meter, warmup=True)
    res = {prec: eval_run(subset, test, prec, args, device, meter) for prec in PRECISIONS}
    together = "together" if res["fp32"]["together"] else "one by one"
    rows.append((f"evaluation, IPC {args.ipc}, {args.networks} nets ({together})", f"{unit} total", res))

    mem = " fp32 peak MiB | bf16 peak MiB | memory bf16/fp32 |" if cuda else ""
    print(f"| part | time unit | fp32 | bf16 | time bf16/fp32 | fp32 acc % | bf16 acc % | Δ acc (points) |{mem}")
    print("|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if cuda else ""))
    for name, what, r in rows:
        f, b = r["fp32"], r["bf16"]
        line = (f"| {name} | {what} | {f['s']:.2f} | {b['s']:.2f} | {b['s'] / f['s']:.2f}x | {100 * f['acc']:.2f} | "
                f"{100 * b['acc']:.2f} | {100 * (b['acc'] - f['acc']):+.2f} |")
        if cuda:
            line += f" {f['mib']:.0f} | {b['mib']:.0f} | {b['mib'] / f['mib']:.2f}x |"
        print(line)
    print(f"\nwhole script: {time.perf_counter() - started:.0f} s wall")


if __name__ == "__main__":
    main()
