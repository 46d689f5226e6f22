"""Benchmark: one expert epoch of raydd's farm against MTT's reference code itself (buffer.py's loop).

Not a test. Prints one table. Run from the repository root:

    python benchmarks/expert_epoch.py --reference-root REFS                  # CIFAR-10, 6000 images, w32 + w128
    python benchmarks/expert_epoch.py --reference-root REFS --widths 32 --repeats 3

REFS holds an unmodified clone of GeorgeCazenavette/mtt-distillation (``REFS/mtt-distillation`` or
``REFS/GeorgeCazenavette+mtt-distillation``); its ``utils.py`` is imported at run time (``kornia``, which it
imports for ZCA only, is stubbed when absent). Every measurement is one epoch (train pass + test-set evaluation)
in a fresh child process with one thread, the runners alternating (reference, raydd, reference, ...) so that load
on the machine hits both alike. CPU seconds of the process and its children (the reference's test loader runs
2 worker processes) are reported, not wall time.

* ``reference``: buffer.py's way for one expert — the reference's own ``ConvNet`` (instance norm, in-place
  ReLU, average pooling) at the width asked, ``utils.epoch("train", ...)`` over a ``DataLoader`` of the reference's
  ``TensorDataset`` (batch 256, shuffled) with ``DiffAugment`` (``ParamDiffAug``: one op per batch), then
  ``utils.epoch("test", ...)`` over a ``DataLoader`` of batch 128 with 2 workers (its ``get_dataset``), as
  buffer.py does (no ``no_grad``), SGD lr 0.01, momentum 0, no weight decay.
* ``raydd``: the ``expert`` recipe (``run_expert``) for one epoch, with ``train_epoch_together`` and
  ``evaluate_together`` wrapped by timers so the table can split them.

The pretrain (DANCE) and observer (EDC) recipes have no reference loop that runs on a CPU as published: DANCE's
``train_epoch``/``validate`` move every batch with ``.cuda()`` and its class loader keeps the data on the GPU, and
EDC's observer training is the body of a script (``squeeze/train.py``) over PIL transforms. They are not measured
here (results/expert_epoch_fashion_mnist.md has their older rows against a plain loop built from raydd's parts,
which is not a reference baseline).

``--part dsa`` times raydd's DSA against the reference's own ``DiffAugment`` per op.

Peak memory: the child resets its high-water mark (``/proc/self/clear_refs``) after loading the data
and reports ``VmHWM`` minus the resident size at that point (the epoch's own working memory) as well
as the whole-process peak (the reference's loader workers are not counted).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raydd.data.augment import DSA, DSAConfig  # noqa: E402
from raydd.data.datasets import data_root_for  # noqa: E402
from raydd.farm import FarmSpec, prepare_data  # noqa: E402
from raydd.farm import recipes  # noqa: E402
from raydd.farm.task import model_spec_for  # noqa: E402
from proc_memory import reset_peak_kib, status_kib  # noqa: E402  (benchmarks/ is on sys.path)

RECIPES = ("expert", "pretrain", "observer")


class Timer:
    def __init__(self):
        self.cpu = {"train": 0.0, "test": 0.0}

    def wrap(self, part: str, fn):
        def timed(*args, **kwargs):
            t0 = cpu_seconds()
            try:
                return fn(*args, **kwargs)
            finally:
                self.cpu[part] += cpu_seconds() - t0
        return timed


# --------------------------------------------------------------------------- the reference
def import_reference(root: Path):
    """mtt-distillation's utils, imported from the clone as it is."""
    for name in ("mtt-distillation", "GeorgeCazenavette+mtt-distillation", "."):
        repo = root / name
        if (repo / "utils.py").exists():
            break
    else:
        raise SystemExit(f"no mtt-distillation clone under {root} (utils.py)")
    sys.path.insert(0, str(repo))
    try:
        import kornia  # noqa: F401
    except ImportError:  # utils.py imports it for its ZCA only
        sys.modules["kornia"] = types.ModuleType("kornia")
    import utils

    return utils


def reference_epoch(utils, width: int, train, test, timer: Timer) -> None:
    """One epoch of buffer.py's loop for one expert (see the module doc)."""
    torch.manual_seed(0)
    info = train.info
    net = utils.ConvNet(info.channels, info.num_classes, width, 3, "relu", "instancenorm", "avgpooling",
                        tuple(info.resolution))
    args = types.SimpleNamespace(device="cpu", dsa=True, dsa_param=utils.ParamDiffAug(), dataset="FashionMNIST",
                                 dsa_strategy="color_crop_cutout_flip_scale_rotate", batch_train=256)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0, weight_decay=0)
    criterion = torch.nn.CrossEntropyLoss()
    trainloader = torch.utils.data.DataLoader(utils.TensorDataset(train.images, train.labels), batch_size=256,
                                              shuffle=True, num_workers=0)
    testloader = torch.utils.data.DataLoader(utils.TensorDataset(test.images, test.labels), batch_size=128,
                                             shuffle=False, num_workers=2)
    t0 = cpu_seconds()
    utils.epoch("train", dataloader=trainloader, net=net, optimizer=opt, criterion=criterion, args=args, aug=True)
    timer.cpu["train"] += cpu_seconds() - t0
    t0 = cpu_seconds()
    utils.epoch("test", dataloader=testloader, net=net, optimizer=None, criterion=criterion, args=args, aug=False)
    timer.cpu["test"] += cpu_seconds() - t0


def cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children (the reference's loader workers)."""
    return time.process_time() + resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime + \
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_stime


def raydd_epoch(recipe: str, cfg, spec: FarmSpec, data, train, test, timer: Timer) -> None:
    # the recipes train one network as a NetworkStack of one: these calls are train_epoch / evaluate_model
    recipes.train_epoch_together = timer.wrap("train", recipes.train_epoch_together)
    recipes.evaluate_together = timer.wrap("test", recipes.evaluate_together)

    class Discard:
        def append(self, *args, **kwargs):
            pass

    ctx = recipes.RecipeContext(train=train, test=test, model=model_spec_for(spec, data.info), seed=0)
    recipes.get_recipe(recipe).run(cfg, ctx, Discard())


def child(args) -> None:
    torch.set_num_threads(1)
    spec = farm_spec(args, args.recipe, args.width)
    data = prepare_data(spec)
    train, test = data.datasets()
    cfg = recipes.get_recipe(args.recipe).make_config({"epochs": 1})
    timer = Timer()
    if args.runner == "reference":
        utils = import_reference(Path(args.reference_root))
        base = reset_peak_kib()
        reference_epoch(utils, args.width, train, test, timer)
    else:
        base = reset_peak_kib()
        raydd_epoch(args.recipe, cfg, spec, data, train, test, timer)
    peak = status_kib("VmHWM")
    print(json.dumps({"train": timer.cpu["train"], "test": timer.cpu["test"],
                      "epoch_mib": (peak - base) / 1024, "peak_mib": peak / 1024}))


def farm_spec(args, recipe: str, width: int) -> FarmSpec:
    return FarmSpec(store="unused", dataset=args.dataset, data_root=data_root_for(args.dataset, args.data_root),
                    train_per_class=args.train_per_class, recipe=recipe, model={"width": width})


def run_child(args, runner: str, recipe: str, width: int) -> dict:
    cmd = [sys.executable, __file__, "--child", runner, "--recipe", recipe, "--width", str(width),
           "--dataset", args.dataset, "--data-root", args.data_root, "--train-per-class", str(args.train_per_class),
           "--reference-root", str(args.reference_root)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- DSA vs the reference's DiffAugment
def dsa_table(utils, batch: int = 256, channels: int = 1, size: int = 28, calls: int = 60) -> None:
    torch.set_num_threads(1)
    x = torch.randn(batch, channels, size, size)
    ops = DSAConfig().ops
    param = utils.ParamDiffAug()
    print(f"\n# augmentation cost per batch of {batch} ({channels}x{size}x{size}), one thread, CPU ms "
          f"(median of {calls} calls per op): raydd's DSA vs the reference's DiffAugment")
    print(f"{'op':<8}{'raydd DSA':>11}{'reference':>11}{'ratio':>8}")
    totals = [0.0, 0.0]
    for op in ops:
        dsa = DSA(DSAConfig(strategy=op))
        gen = torch.Generator().manual_seed(0)
        times = []
        for fn in (lambda: dsa(x, generator=gen), lambda: utils.DiffAugment(x, op, param=param)):
            samples = []
            for _ in range(calls):
                t0 = time.process_time()
                fn()
                samples.append(time.process_time() - t0)
            times.append(1000 * statistics.median(samples))
        totals = [totals[0] + times[0], totals[1] + times[1]]
        print(f"{op:<8}{times[0]:>11.2f}{times[1]:>11.2f}{times[0] / times[1]:>7.2f}x")
    print(f"{'mean':<8}{totals[0] / len(ops):>11.2f}{totals[1] / len(ops):>11.2f}{totals[0] / totals[1]:>7.2f}x"
          "  (one op per call, drawn uniformly: the mean is the expected cost)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="cifar10", help="cifar10 (default); the reference ConvNet fails on one-channel "
                   "images on current PyTorch when its crop op is drawn (a channels-last batch: its .view() raises)")
    p.add_argument("--data-root", default=os.environ.get("RAYDD_DATA", "../shared/datasets"))
    p.add_argument("--train-per-class", type=int, default=600, help="600/class = 6000 images")
    p.add_argument("--widths", type=int, nargs="+", default=[32, 128])
    p.add_argument("--recipes", nargs="+", choices=RECIPES, default=["expert"],
                   help="expert (the only recipe with a reference loop that runs on a CPU: see the module doc)")
    p.add_argument("--reference-root", required=True, type=Path, help="holds a clone of mtt-distillation")
    p.add_argument("--repeats", type=int, default=2, help="alternating runs per runner")
    p.add_argument("--part", choices=("all", "epoch", "dsa"), default="all")
    p.add_argument("--child", choices=("reference", "raydd"), help=argparse.SUPPRESS)
    p.add_argument("--recipe", default="expert", help=argparse.SUPPRESS)
    p.add_argument("--width", type=int, default=32, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.runner = args.child
        return child(args)
    if args.part in ("all", "epoch"):
        print(f"# one farm epoch, {args.dataset} ({args.train_per_class}/class), one thread per run, "
              f"{args.repeats} alternating runs each; CPU s (median), peak MiB (max)\n")
        head = (f"{'recipe':<9}{'width':>6}{'runner':>10}{'train s':>9}{'test s':>8}{'epoch s':>9}"
                f"{'epoch MiB':>11}{'peak MiB':>10}{'CPU vs ref':>12}{'mem vs ref':>12}")
        print(head)
        for recipe in args.recipes:
            for width in args.widths:
                runs = {"reference": [], "raydd": []}
                for _ in range(args.repeats):
                    for runner in ("reference", "raydd"):
                        runs[runner].append(run_child(args, runner, recipe, width))
                summary = {}
                for runner, rs in runs.items():
                    summary[runner] = {"train": statistics.median(r["train"] for r in rs),
                                       "test": statistics.median(r["test"] for r in rs),
                                       "epoch": statistics.median(r["train"] + r["test"] for r in rs),
                                       "epoch_mib": max(r["epoch_mib"] for r in rs),
                                       "peak_mib": max(r["peak_mib"] for r in rs)}
                base = summary["reference"]
                for runner, s in summary.items():
                    print(f"{recipe:<9}{width:>6}{runner:>10}{s['train']:>9.2f}{s['test']:>8.2f}{s['epoch']:>9.2f}"
                          f"{s['epoch_mib']:>11.0f}{s['peak_mib']:>10.0f}{s['epoch'] / base['epoch']:>11.2f}x"
                          f"{s['epoch_mib'] / base['epoch_mib']:>11.2f}x")
                sys.stdout.flush()
        print("\ntarget: raydd <= 1.00x the reference loop's CPU at every width")
    if args.part in ("all", "dsa"):
        dsa_table(import_reference(args.reference_root))


if __name__ == "__main__":
    main()
