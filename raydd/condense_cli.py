"""`raydd condense` and `raydd evaluate` sub-commands (wired into raydd.cli by the lead).

    raydd condense --method mtt --dataset digits --ipc 2 --store raydd-store --iterations 500 \
        --set syn_steps=10 --set max_start_epoch=4 --eval-every 100 --logdir runs/mtt --out digits.safetensors
    raydd evaluate digits.safetensors --model convnet --num-models 5 --epochs 300
"""
from __future__ import annotations

import argparse
import json
import sys

DEFAULT_STORE = "raydd-store"


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        lowered = text.strip().lower()
        if lowered in ("none", "null"):
            return None
        if lowered in ("true", "false"):
            return lowered == "true"
        return text


def parse_overrides(items: list[str]) -> dict:
    """``["KEY=VALUE", ...]`` -> dict (values parsed as JSON where they parse, else strings)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set {item!r} is invalid: expected KEY=VALUE")
        key, value = item.split("=", 1)
        out[key.strip()] = _parse_value(value.strip())
    return out


def _add_eval_flags(p: argparse.ArgumentParser, prefix: str = "") -> None:
    p.add_argument(f"--{prefix}model", dest="eval_model", default=None,
                   help="evaluation network: convnet (default; edc protocol: resnet18), resnet10, resnet18, "
                        "or a JSON dict of ModelSpec fields")
    p.add_argument(f"--{prefix}width", dest="eval_width", type=int, help="evaluation network width")
    p.add_argument(f"--{prefix}depth", dest="eval_depth", type=int, help="evaluation ConvNet depth")
    p.add_argument("--num-models", dest="num_models", type=int, default=5, help="networks trained (default 5)")
    p.add_argument(f"--{prefix}epochs", dest="eval_epochs", type=int, default=None,
                   help="epochs per evaluation network (default 300; edc protocol: 1000)")
    p.add_argument(f"--{prefix}lr", dest="eval_lr", type=float,
                   help="evaluation lr (default: the set's learned step size, else 0.01)")
    p.add_argument(f"--{prefix}batch-size", dest="eval_batch_size", type=int, default=256)
    p.add_argument(f"--{prefix}dsa-mode", dest="eval_dsa_mode", choices=("single", "all"), default="single",
                   help="DSA per training batch: one random op (single, the standard protocol) or every op (all)")


def _eval_config(args):
    from .evaluate import EvalConfig

    model = args.eval_model or "convnet"
    if isinstance(model, str) and model.strip().startswith("{"):
        model = json.loads(model)
    if args.eval_width is not None or args.eval_depth is not None:
        model = dict(model) if isinstance(model, dict) else {"arch": model}
        if args.eval_width is not None:
            model["width"] = args.eval_width
        if args.eval_depth is not None:
            model["depth"] = args.eval_depth
    return EvalConfig(model=model, num_models=args.num_models,
                      epochs=300 if args.eval_epochs is None else args.eval_epochs, lr=args.eval_lr,
                      batch_size=args.eval_batch_size, dsa_single_per_call=args.eval_dsa_mode == "single",
                      device=args.device, seed=args.seed)


def add_condense_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "condense", help="distill a dataset into a small synthetic set",
        description="Run one condensation method. Settings start from the method's published defaults for "
                    "(dataset, ipc); --set KEY=VALUE overrides any knob (unknown knobs are listed).")
    p.add_argument("--method", required=True, help="condensation method, e.g. mtt")
    p.add_argument("--dataset", required=True, help="digits, mnist, fashion_mnist, cifar10, cifar100, imagefolder")
    p.add_argument("--ipc", type=int, required=True, help="images per class")
    p.add_argument("--store", default=DEFAULT_STORE, help=f"trajectory store root (default {DEFAULT_STORE})")
    p.add_argument("--data-root", dest="data_root", help="folder with the dataset files (e.g. ../shared/datasets)")
    p.add_argument("--download", action="store_true", help="let torchvision download the dataset")
    p.add_argument("--resolution", type=int, help="resize images to this side length (as the farm did)")
    p.add_argument("--iterations", type=int, help="iterations in total (default: the method's published count)")
    p.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE",
                   help="override a method knob, e.g. --set syn_steps=20 --set lr_img=100 (repeatable)")
    p.add_argument("--eval-every", dest="eval_every", type=int, default=0,
                   help="evaluate every K iterations and at the end (0: only with --evaluate)")
    p.add_argument("--evaluate", action="store_true", help="evaluate the final set")
    _add_eval_flags(p, prefix="eval-")
    p.add_argument("--logdir", help="TensorBoard log directory")
    p.add_argument("--checkpoint", help="checkpoint file: written at evaluations and the end, resumed if present")
    p.add_argument("--out", default=None, help="where to save the synthetic set (.safetensors)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_condense)
    return p


def add_evaluate_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "evaluate", help="train fresh networks on a synthetic set and test them",
        description="Standard protocol: N fresh networks, SGD momentum 0.9, wd 5e-4, DSA, lr x0.1 at half; "
                    "reports mean ± std of the FINAL test accuracy.")
    p.add_argument("synthetic", help="a synthetic set written by raydd condense (.safetensors)")
    p.add_argument("--protocol", choices=("standard", "edc"), default="standard",
                   help="standard (SGD, DSA, hard or soft CE) or edc (EDC post-evaluation: AdamW, small batch, "
                        "smoothing LR schedule with --zeta, model EMA, soft labels at a temperature)")
    p.add_argument("--zeta", type=float, help="edc protocol: smoothing LR schedule zeta (1 = plain cosine)")
    p.add_argument("--data-root", dest="data_root", help="folder with the dataset files")
    p.add_argument("--download", action="store_true")
    _add_eval_flags(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_evaluate)
    return p


def cmd_condense(args) -> int:
    from .condense import condense
    from .data.datasets import load_dataset
    from .methods import get_method, make_config
    from .store import TrajectoryStore

    cls = get_method(args.method)
    config = make_config(args.method, args.dataset, args.ipc, **parse_overrides(args.options))
    eval_config = _eval_config(args)  # validated before any data is loaded
    planned = getattr(config, "iterations", None)  # methods whose schedules have a horizon (EDC, PTLM)
    if args.iterations is not None:
        iterations = args.iterations
    else:
        iterations = planned if isinstance(planned, int) else cls.config_cls.default_iterations
    if iterations < 0:
        raise ValueError(f"--iterations {iterations} is invalid: expected >= 0")
    train = load_dataset(args.dataset, "train", args.data_root, download=args.download, resolution=args.resolution)
    test = None
    if args.eval_every or args.evaluate:
        test = load_dataset(args.dataset, "test", args.data_root, download=args.download, resolution=args.resolution)
    store = TrajectoryStore(args.store)  # methods that read no trajectories ignore it
    out = args.out or f"{args.method}_{args.dataset}_ipc{args.ipc}.safetensors"
    print(f"raydd condense: {args.method} on {args.dataset}, ipc {args.ipc}, {iterations} iterations -> {out}",
          file=sys.stderr)
    with cls(config, train, store, device=args.device, seed=args.seed) as method:
        result = condense(method, iterations, eval_every=args.eval_every, eval_config=eval_config, test=test,
                          logdir=args.logdir, progress=not args.quiet, checkpoint_path=args.checkpoint)
        if args.evaluate and not args.eval_every:
            from .evaluate import evaluate_synthetic

            result.evals.append((method.iteration, evaluate_synthetic(result.synthetic, test, eval_config)))
    path = result.synthetic.save(out)
    print(f"saved {len(result.synthetic)} images to {path} ({result.seconds_per_iteration:.3f} s/iteration)")
    if result.final_eval is not None:
        print(f"final evaluation: {result.final_eval}")
    return 0


def cmd_evaluate(args) -> int:
    from .data.datasets import load_dataset
    from .evaluate import evaluate_synthetic
    from .methods import load_synthetic

    syn = load_synthetic(args.synthetic)
    if args.protocol == "edc":
        import dataclasses

        from .evaluate_edc import EDCEvalConfig, evaluate_edc

        changes = {"num_models": args.num_models, "device": args.device, "seed": args.seed}
        if args.zeta is not None:
            changes["zeta"] = args.zeta
        if args.eval_epochs is not None:
            changes["epochs"] = args.eval_epochs
        if args.eval_model is not None or args.eval_width or args.eval_depth:
            changes["model"] = _eval_config(args).model
        eval_config = dataclasses.replace(EDCEvalConfig.defaults(syn.dataset["name"]), **changes)
        run = evaluate_edc
    else:
        eval_config = _eval_config(args)
        run = evaluate_synthetic
    resolution = tuple(syn.dataset["resolution"])
    test = load_dataset(syn.dataset["name"], "test", args.data_root, download=args.download, resolution=resolution)
    result = run(syn, test, eval_config)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        per_model = ", ".join(f"{100 * a:.2f}" for a in result.accuracies)
        print(f"{args.synthetic}: {syn.method}, {len(syn)} images, iteration {syn.iteration}")
        print(f"{result}\nper network: {per_model}")
    return 0
