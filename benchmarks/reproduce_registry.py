"""Every published setting of ``raydd reproduce`` end to end at a small scale (default: ``tiny`` on digits).

Runs ``raydd reproduce NAME --scale tiny --on digits`` for every registered setting (or those matching
``--only``), one after another in this process, sharing one trajectory store (settings that read the
same experts farm them once), and prints one table: iterations reached, the set's and Random's accuracy
under the same (shrunk) evaluation, seconds spent farming / condensing / evaluating, CPU seconds of the
whole run, and the error of any setting that failed. A smoke run: the accuracies of 2 iterations on digits
say nothing about the papers; the point is that every setting's farm, method, checkpoint and evaluation
protocol run through. Exits 1 if any setting failed.

    python benchmarks/reproduce_registry.py [--scale tiny] [--on digits] [--only mtt_ datm] [--out FILE]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from raydd.reproduce import SCALES, published_settings, reproduce


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", default="tiny", help="tiny (default) or cpu")
    p.add_argument("--on", default="digits", help="dataset to run every setting on (default digits; '' = its own)")
    p.add_argument("--only", nargs="*", default=[], help="run the settings whose name contains one of these")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: CPU time comparable)")
    p.add_argument("--out", help="also write the table to this markdown file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    names = [n for n in published_settings() if not args.only or any(part in n for part in args.only)]
    if not names:
        raise SystemExit(f"--only {' '.join(args.only)} matches no setting (raydd reproduce --list shows them)")
    rows, failed = [], 0
    with tempfile.TemporaryDirectory(prefix="raydd-registry-") as tmp:
        for i, name in enumerate(names, 1):
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                out = reproduce(name, scale=args.scale, on=args.on or None, store=f"{tmp}/store",
                                workdir=f"{tmp}/work", ledger="", device="cpu", progress=False)
                status = "ok" if out.finished else f"stopped at {out.iterations}/{out.planned}"
                acc = f"{100 * out.result.mean:.1f}" if out.result else "–"
                rnd = f"{100 * out.random.mean:.1f}" if out.random else "–"
                farmed = ", ".join(f"{t['recipe']} {t['count']}x{t['epochs'] or 'default'}"
                                   for t in out.trajectories) or "none"
                s = out.seconds
                row = (name, f"{out.iterations}/{out.planned}", farmed, acc, rnd,
                       f"{s['farm']:.0f} / {s['condense']:.0f} / {s['evaluate']:.0f}")
            except Exception as err:  # a smoke run reports every failure and goes on
                failed += 1
                traceback.print_exc(file=sys.stderr)
                status = f"FAILED: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
                row = (name, "–", "–", "–", "–", "–")
            cpu_s = time.process_time() - cpu
            rows.append((*row, f"{cpu_s:.0f}", f"{time.perf_counter() - wall:.0f}", status))
            print(f"[{i}/{len(names)}] {name}: {status} ({cpu_s:.0f} CPU s)", file=sys.stderr, flush=True)
    on = f" on {args.on}" if args.on else ""
    lines = [f"# raydd reproduce: {len(names)} published settings at scale {args.scale}{on}", "",
             f"torch {torch.__version__}, {args.threads} thread(s), CPU. {len(names) - failed} ran end to end, "
             f"{failed} failed. Accuracies of a smoke run (a few iterations, {args.on or 'own data'}, tiny "
             f"evaluation) say nothing about the papers' numbers.", "",
             f"Departures of scale {args.scale}: {SCALES[args.scale].departures()}.", "",
             "| setting | iterations | farmed | acc % | Random % | farm / condense / evaluate s | CPU s | wall s | status |",
             "|---|---:|---|---:|---:|---|---:|---:|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    total_cpu = sum(float(r[6]) for r in rows)
    lines += ["", f"Total: {total_cpu:.0f} CPU s."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
