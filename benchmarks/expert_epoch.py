"""Benchmark: one farm epoch (raydd's recipes) vs a plain torch loop written the way the reference codes are.

Not a test. Prints one table. Run from the repository root:

    python benchmarks/expert_epoch.py                                  # Fashion-MNIST, 6000 images, w32 + w128
    python benchmarks/expert_epoch.py --widths 32 --recipes expert --repeats 3

Every measurement is one epoch (train pass + test-set evaluation) in a fresh child process with one
thread, the runners alternating (plain, raydd, plain, raydd, ...) so that load on the machine hits
both alike. CPU seconds (``time.process_time``) are reported, not wall time.

* ``plain``: owns its whole loop and borrows nothing of raydd's training code — its own minibatches
  (a randperm over the tensors), its own CutMix (the DANCE reference's box and ``np.random.beta``),
  ``loss.item()`` / ``.sum().item()`` per batch, and a test pass of batch 256 under ``no_grad``
  (MTT buffer.py's test loader uses ``batch_train`` = 256; buffer.py evaluates with grad enabled,
  which is slower, so this baseline is the stricter one). It uses raydd's model builder (the
  architecture, not the loop) and raydd's DSA; ``--part dsa`` times that DSA against an
  independent reference-style DiffAugment (per-sample parameters, the same op set) separately.
  Its batch order, DSA draws and CutMix decisions come from one generator seeded like raydd's, so
  both loops apply the same DSA operations (one op per batch, drawn at random: the ops' costs differ
  by 10x, and with different draws two runs of the same loop differ by several per cent).
* ``raydd``: the registered recipe (``run_expert`` / ``run_pretrain`` / ``run_observer``) for one
  epoch, with ``train_epoch`` and ``evaluate_model`` wrapped by timers so the table can split them.

Peak memory: the child resets its high-water mark (``/proc/self/clear_refs``) after loading the data
and reports ``VmHWM`` minus the resident size at that point (the epoch's own working memory) as well
as the whole-process peak.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raydd.data.augment import DSA, DSAConfig  # noqa: E402
from raydd.farm import FarmSpec, prepare_data  # noqa: E402
from raydd.farm import recipes  # noqa: E402
from raydd.farm.task import model_spec_for  # noqa: E402
from raydd.models import build_model  # noqa: E402
from proc_memory import reset_peak_kib, status_kib  # noqa: E402  (benchmarks/ is on sys.path)

RECIPES = ("expert", "pretrain", "observer")


class Timer:
    def __init__(self):
        self.cpu = {"train": 0.0, "test": 0.0}

    def wrap(self, part: str, fn):
        def timed(*args, **kwargs):
            t0 = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.cpu[part] += time.process_time() - t0
        return timed


# --------------------------------------------------------------------------- the plain loop
def plain_cutmix(x, y, beta):
    """CutMix as the DANCE/CutMix references write it: λ from np.random.beta, a box around a random centre."""
    lam = np.random.beta(beta, beta)
    perm = torch.randperm(x.size(0))
    h, w = x.shape[2], x.shape[3]
    cut = np.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = np.random.randint(h), np.random.randint(w)
    y0, y1 = np.clip(cy - ch // 2, 0, h), np.clip(cy + ch // 2, 0, h)
    x0, x1 = np.clip(cx - cw // 2, 0, w), np.clip(cx + cw // 2, 0, w)
    x[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
    lam = 1 - ((y1 - y0) * (x1 - x0) / (h * w))
    return x, y, y[perm], lam


def plain_epoch(recipe: str, cfg, net, train, test, dsa: DSA | None, timer: Timer) -> None:
    torch.manual_seed(0)
    np.random.seed(0)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = None
    if recipe == "pretrain":
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [max(1, math.floor(m * cfg.epochs)) for m in cfg.milestones],
                                                     gamma=cfg.gamma)
    elif recipe == "observer":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    gen = torch.Generator().manual_seed(0)
    t0 = time.process_time()
    net.train()
    loss_sum, correct, n = 0.0, 0, len(train.labels)
    order = torch.randperm(n, generator=gen)
    for start in range(0, n, cfg.batch_size):
        idx = order[start:start + cfg.batch_size]
        img, lab = train.images[idx], train.labels[idx]
        if dsa is not None:
            img = dsa(img, generator=gen)
        if recipe == "pretrain" and float(torch.rand(1, generator=gen)) < cfg.cutmix_prob:
            img, ya, yb, lam = plain_cutmix(img, lab, cfg.cutmix_beta)
            out = net(img)
            loss = F.cross_entropy(out, ya) * lam + F.cross_entropy(out, yb) * (1.0 - lam)
        else:
            out = net(img)
            loss = F.cross_entropy(out, lab)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_sum += loss.item() * len(idx)
        correct += (out.argmax(1) == lab).sum().item()
    if sched is not None:
        sched.step()
    timer.cpu["train"] += time.process_time() - t0
    t0 = time.process_time()
    net.eval()
    with torch.no_grad():
        for start in range(0, len(test.labels), 256):
            out = net(test.images[start:start + 256])
            lab = test.labels[start:start + 256]
            loss_sum += F.cross_entropy(out, lab, reduction="sum").item()
            correct += (out.argmax(1) == lab).sum().item()
    timer.cpu["test"] += time.process_time() - t0


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
    if args.runner == "plain":
        torch.manual_seed(0)
        net = build_model(model_spec_for(spec, data.info))
        dsa_cfg = DSAConfig(strategy=cfg.dsa_strategy)
        dsa = DSA(dsa_cfg if train.info.flip_ok else dsa_cfg.without_flip()) if cfg.dsa else None
        base = reset_peak_kib()
        plain_epoch(args.recipe, cfg, net, train, test, dsa, timer)
    else:
        base = reset_peak_kib()
        raydd_epoch(args.recipe, cfg, spec, data, train, test, timer)
    peak = status_kib("VmHWM")
    print(json.dumps({"train": timer.cpu["train"], "test": timer.cpu["test"],
                      "epoch_mib": (peak - base) / 1024, "peak_mib": peak / 1024}))


def farm_spec(args, recipe: str, width: int) -> FarmSpec:
    return FarmSpec(store="unused", dataset=args.dataset, data_root=None if args.dataset == "digits" else args.data_root,
                    train_per_class=args.train_per_class, recipe=recipe, model={"width": width})


def run_child(args, runner: str, recipe: str, width: int) -> dict:
    cmd = [sys.executable, __file__, "--child", runner, "--recipe", recipe, "--width", str(width),
           "--dataset", args.dataset, "--data-root", args.data_root, "--train-per-class", str(args.train_per_class)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- DSA vs a reference-style DiffAugment
def reference_style_diffaugment(x: torch.Tensor, op: str) -> torch.Tensor:
    """An independent per-sample implementation of the reference's ops (global RNG, as the reference draws)."""
    n = x.shape[0]
    if op == "color":
        x = x + (torch.rand(n, 1, 1, 1) - 0.5)
        m = x.mean(dim=1, keepdim=True)
        x = (x - m) * (torch.rand(n, 1, 1, 1) * 2.0) + m
        m = x.mean(dim=[1, 2, 3], keepdim=True)
        return (x - m) * (torch.rand(n, 1, 1, 1) + 0.5) + m
    if op == "flip":
        return torch.where(torch.rand(n, 1, 1, 1) < 0.5, x.flip(3), x)
    if op in ("scale", "rotate"):
        if op == "scale":
            sx, sy = torch.rand(n) * (1.2 - 1 / 1.2) + 1 / 1.2, torch.rand(n) * (1.2 - 1 / 1.2) + 1 / 1.2
            theta = torch.zeros(n, 2, 3)
            theta[:, 0, 0], theta[:, 1, 1] = sx, sy
        else:
            a = (torch.rand(n) - 0.5) * 2 * 15 / 180 * math.pi
            theta = torch.zeros(n, 2, 3)
            theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = a.cos(), -a.sin(), a.sin(), a.cos()
        grid = F.affine_grid(theta, list(x.shape), align_corners=True)
        return F.grid_sample(x, grid, align_corners=True)
    h, w = x.shape[2:]
    if op == "crop":  # translate by up to 1/8 of the side, zero padded, by index gather
        sh, sw = int(h * 0.125 + 0.5), int(w * 0.125 + 0.5)
        tx = torch.randint(-sh, sh + 1, (n, 1, 1))
        ty = torch.randint(-sw, sw + 1, (n, 1, 1))
        gb, gx, gy = torch.meshgrid(torch.arange(n), torch.arange(h), torch.arange(w), indexing="ij")
        gx = torch.clamp(gx + tx + 1, 0, h + 1)
        gy = torch.clamp(gy + ty + 1, 0, w + 1)
        pad = F.pad(x, [1, 1, 1, 1, 0, 0, 0, 0])
        return pad.permute(0, 2, 3, 1).contiguous()[gb, gx, gy].permute(0, 3, 1, 2)
    # cutout: a zeroed square of half the side at a random centre
    ch, cw = int(h * 0.5 + 0.5), int(w * 0.5 + 0.5)
    ox = torch.randint(0, h + (1 - ch % 2), (n, 1, 1))
    oy = torch.randint(0, w + (1 - cw % 2), (n, 1, 1))
    gb, gx, gy = torch.meshgrid(torch.arange(n), torch.arange(ch), torch.arange(cw), indexing="ij")
    gx = torch.clamp(gx + ox - ch // 2, 0, h - 1)
    gy = torch.clamp(gy + oy - cw // 2, 0, w - 1)
    mask = torch.ones(n, h, w)
    mask[gb, gx, gy] = 0
    return x * mask.unsqueeze(1)


def dsa_table(batch: int = 256, channels: int = 1, size: int = 28, calls: int = 60) -> None:
    torch.set_num_threads(1)
    x = torch.randn(batch, channels, size, size)
    ops = DSAConfig().ops
    print(f"\n# augmentation cost per batch of {batch} ({channels}x{size}x{size}), one thread, CPU ms "
          f"(median of {calls} calls per op)")
    print(f"{'op':<8}{'raydd DSA':>11}{'reference-style':>17}{'ratio':>8}")
    totals = [0.0, 0.0]
    for op in ops:
        dsa = DSA(DSAConfig(strategy=op))
        gen = torch.Generator().manual_seed(0)
        times = []
        for fn in (lambda: dsa(x, generator=gen), lambda: reference_style_diffaugment(x, op)):
            samples = []
            for _ in range(calls):
                t0 = time.process_time()
                fn()
                samples.append(time.process_time() - t0)
            times.append(1000 * statistics.median(samples))
        totals = [totals[0] + times[0], totals[1] + times[1]]
        print(f"{op:<8}{times[0]:>11.2f}{times[1]:>17.2f}{times[0] / times[1]:>7.2f}x")
    print(f"{'mean':<8}{totals[0] / len(ops):>11.2f}{totals[1] / len(ops):>17.2f}{totals[0] / totals[1]:>7.2f}x"
          "  (one op per call, drawn uniformly: the mean is the expected cost)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--data-root", default=os.environ.get("RAYDD_DATA", "../shared/datasets"))
    p.add_argument("--train-per-class", type=int, default=600, help="600/class = 6000 Fashion-MNIST images")
    p.add_argument("--widths", type=int, nargs="+", default=[32, 128])
    p.add_argument("--recipes", nargs="+", choices=RECIPES, default=list(RECIPES))
    p.add_argument("--repeats", type=int, default=2, help="alternating runs per runner")
    p.add_argument("--part", choices=("all", "epoch", "dsa"), default="all")
    p.add_argument("--child", choices=("plain", "raydd"), help=argparse.SUPPRESS)
    p.add_argument("--recipe", default="expert", help=argparse.SUPPRESS)
    p.add_argument("--width", type=int, default=32, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.runner = args.child
        return child(args)
    if args.part in ("all", "epoch"):
        print(f"# one farm epoch, {args.dataset} ({args.train_per_class}/class), one thread per run, "
              f"{args.repeats} alternating runs each; CPU s (median), peak MiB (max)\n")
        head = (f"{'recipe':<9}{'width':>6}{'runner':>7}{'train s':>9}{'test s':>8}{'epoch s':>9}"
                f"{'epoch MiB':>11}{'peak MiB':>10}{'CPU vs plain':>14}{'mem vs plain':>14}")
        print(head)
        for recipe in args.recipes:
            for width in args.widths:
                runs = {"plain": [], "raydd": []}
                for _ in range(args.repeats):
                    for runner in ("plain", "raydd"):
                        runs[runner].append(run_child(args, runner, recipe, width))
                summary = {}
                for runner, rs in runs.items():
                    summary[runner] = {"train": statistics.median(r["train"] for r in rs),
                                       "test": statistics.median(r["test"] for r in rs),
                                       "epoch": statistics.median(r["train"] + r["test"] for r in rs),
                                       "epoch_mib": max(r["epoch_mib"] for r in rs),
                                       "peak_mib": max(r["peak_mib"] for r in rs)}
                base = summary["plain"]
                for runner, s in summary.items():
                    print(f"{recipe:<9}{width:>6}{runner:>7}{s['train']:>9.2f}{s['test']:>8.2f}{s['epoch']:>9.2f}"
                          f"{s['epoch_mib']:>11.0f}{s['peak_mib']:>10.0f}{s['epoch'] / base['epoch']:>13.2f}x"
                          f"{s['epoch_mib'] / base['epoch_mib']:>13.2f}x")
                sys.stdout.flush()
        print("\ntarget: raydd <= 1.00x the plain loop's CPU and epoch memory at every width and recipe")
    if args.part in ("all", "dsa"):
        dsa_table()


if __name__ == "__main__":
    main()
