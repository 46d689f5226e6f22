"""``raydd import`` and ``raydd export``: released distilled sets in, raydd sets out (raydd.interchange)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .interchange import FORMATS


def add_import_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "import", help="read anyone's distilled set (MTT/DATM tensors, HF parquet, image folder) as a raydd set",
        description="Read a released distilled set into a raydd synthetic set (.safetensors) with its provenance, "
                    "ready for raydd evaluate: MTT/DATM-style images_best.pt/labels_best.pt/lr_best.pt (loaded "
                    "with weights_only=True), a Hugging Face datasets parquet folder (image + label columns), or "
                    "an image folder ROOT/<class>/<image>.")
    p.add_argument("source", help="a folder (or an images_*.pt / .parquet file)")
    p.add_argument("--dataset", required=True, help="the dataset the set was distilled from (its shape and "
                                                    "normalisation), e.g. cifar10")
    p.add_argument("--format", dest="fmt", choices=FORMATS, help="default: detected from what SOURCE holds")
    p.add_argument("--zca", action="store_true", help="tensors whose images live in the dataset's ZCA space "
                                                      "(MTT/DATM --zca): fits that ZCA on the training split")
    p.add_argument("--data-root", dest="data_root", help="folder with the dataset files (--zca, digits-free sets)")
    p.add_argument("--out", required=True, help="the raydd set to write (.safetensors)")
    p.set_defaults(func=cmd_import)
    return p


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export", help="write a raydd set as a Hugging Face parquet folder with a dataset card",
        description="Write a raydd synthetic set as a parquet folder that datasets.load_dataset('parquet', "
                    "data_dir=OUT) reads, with a dataset card (README.md) naming its method, knobs, learned step "
                    "size, evaluation and the reproduce ledger row it came from.")
    p.add_argument("synthetic", help="a raydd synthetic set (.safetensors)")
    p.add_argument("out", help="the folder to create")
    p.add_argument("--ledger", help="a raydd reproduce ledger (.jsonl): the card cites the newest row of --setting")
    p.add_argument("--setting", help="the published setting whose ledger row to cite (with --ledger)")
    p.set_defaults(func=cmd_export)
    return p


def _ledger_row(path: str, setting: str) -> dict:
    rows = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"--ledger {path}: line {i} is not JSON (a reproduce ledger has one JSON row "
                                 f"per line)") from None
    matching = [r for r in rows if r.get("setting") == setting]
    if not matching:
        raise ValueError(f"--ledger {path} has no row of setting {setting!r}: it has "
                         f"{', '.join(sorted({str(r.get('setting')) for r in rows})) or 'no rows'}")
    return matching[-1]


def cmd_import(args) -> int:
    from .interchange import import_set

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {args.out}: expected a .safetensors path")
    if not out.parent.is_dir():
        raise ValueError(f"--out {args.out}: {out.parent} is not a folder")
    synthetic = import_set(args.source, args.dataset, fmt=args.fmt, zca=args.zca, data_root=args.data_root)
    synthetic.save(out)
    info = synthetic.meta["imported"]
    print(f"imported {len(synthetic)} images ({info['format']}, labels: {info['labels']}"
          f"{', learned step size %g' % synthetic.syn_lr if synthetic.syn_lr else ''}) -> {out}")
    return 0


def cmd_export(args) -> int:
    from .interchange import export_set
    from .methods.synthetic import load_synthetic

    if (args.ledger is None) != (args.setting is None):
        raise ValueError("--ledger and --setting go together: the card cites the newest ledger row of the setting")
    if args.ledger is not None and not Path(args.ledger).is_file():
        raise ValueError(f"--ledger {args.ledger}: no such file")
    row = _ledger_row(args.ledger, args.setting) if args.ledger else None
    evaluation = None if row is None else {"protocol": (row.get("eval") or {}).get("protocol", "standard"),
                                           "accuracy": row["acc_mean"], "std": row["acc_std"],
                                           "models": (row.get("eval") or {}).get("num_models")}
    if not Path(args.synthetic).is_file():
        raise ValueError(f"{args.synthetic}: no such file (a raydd synthetic set, .safetensors)")
    out = export_set(load_synthetic(args.synthetic), args.out, evaluation=evaluation, ledger_row=row)
    print(f"exported -> {out} (datasets.load_dataset('parquet', data_dir='{out}'))")
    return 0
