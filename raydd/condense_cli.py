"""`raydd condense`, `raydd evaluate` and `raydd methods`.

    raydd condense --method mtt --dataset digits --ipc 2 --store raydd-store --iterations 500 \
        --set syn_steps=10 --set max_start_epoch=4 --eval-every 100 --logdir runs/mtt --out digits.safetensors
    raydd condense --method edc --dataset digits --ipc 10 --store raydd-store --evaluate --eval-protocol edc
    raydd evaluate digits.safetensors --model convnet --num-models 5 --epochs 300
    raydd methods            # every registered method: what it reads, published settings, shared knobs
    raydd methods mtt --dataset cifar10 --ipc 10
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

DEFAULT_STORE = "raydd-store"


def method_overrides(method: str, items: list[str] | None) -> dict:
    """``--set KEY=VALUE`` items of ``raydd condense``/``reproduce`` read by the method config's annotations
    (``raydd.overrides``), the sweep symbols λ, τ, α, ζ replaced by the knobs they name."""
    from .methods import get_method
    from .overrides import typed_overrides

    config_cls = get_method(method).config_cls
    return typed_overrides(config_cls, items, aliases=config_cls.aliases, exclude=("dataset", "ipc"), noun="knob")


# --------------------------------------------------------------------------- evaluation flags
def _add_eval_flags(p: argparse.ArgumentParser, prefix: str = "") -> None:
    from .evaluation import PROTOCOLS

    p.add_argument(f"--{prefix}protocol", dest="eval_protocol", choices=tuple(PROTOCOLS), default="standard",
                   help="evaluation protocol: " + "; ".join(f"{n}: {p.summary}" for n, p in PROTOCOLS.items()))
    p.add_argument(f"--{prefix}model", dest="eval_model", default=None,
                   help="evaluation network: convnet (standard default), resnet10, resnet18 (edc default), a model name "
                        "such as resnet18-bn, or a "
                        "JSON dict of ModelSpec fields")
    p.add_argument(f"--{prefix}width", dest="eval_width", type=int, help="evaluation network width")
    p.add_argument(f"--{prefix}depth", dest="eval_depth", type=int, help="evaluation ConvNet depth")
    p.add_argument("--num-models", dest="num_models", type=int, help="networks trained (default 5)")
    p.add_argument(f"--{prefix}epochs", dest="eval_epochs", type=int,
                   help="epochs per evaluation network (default: standard 300, edc 1000)")
    p.add_argument(f"--{prefix}lr", dest="eval_lr", type=float,
                   help="evaluation lr (standard default: the set's learned step size, else 0.01; edc: 1e-3)")
    p.add_argument(f"--{prefix}batch-size", dest="eval_batch_size", type=int,
                   help="evaluation batch (default: standard 256, edc the dataset's row)")
    p.add_argument(f"--{prefix}dsa-mode", dest="eval_dsa_mode", choices=("single", "all"),
                   help="standard protocol: one random DSA op per batch (single, the default) or every op (all)")
    p.add_argument("--networks-together", dest="networks_together", choices=("auto", "yes", "no"),
                   help="standard protocol: train the networks as one vmapped computation (same results); "
                        "auto (default): on CUDA at IPC 1 only, where it was measured to pay")
    p.add_argument(f"--{prefix}precision", dest="eval_precision",
                   help="forward/loss arithmetic of the evaluation networks: fp32 (default) or bf16 (autocast)")
    p.add_argument(f"--{prefix}engine", dest="eval_engine",
                   help="standard protocol: how the networks' training steps run, eager (default) or graph (the same "
                        "networks from pre-drawn randomness; CUDA graphs on a GPU)")
    p.add_argument("--zeta", type=float, help="edc protocol: smoothing LR schedule zeta (1 = plain cosine)")
    p.add_argument("--teachers", action="store_true", default=None,
                   help="edc protocol: relabel every augmented batch with the method's observers (condense only)")


def eval_config_from_args(args, dataset: str):
    """The evaluation config the flags ask for: the protocol's rows for ``dataset`` with the given flags."""
    from .evaluation import protocol_config

    return protocol_config(dataset, eval_settings_from_args(args))


def eval_settings_from_args(args) -> dict:
    """The evaluation settings the flags ask for (``raydd.evaluation.protocol_config`` reads them)."""
    from .evaluation import get_protocol
    from .evaluation.standard import named_model_fields
    from .overrides import typed_overrides

    settings: dict = {"protocol": args.eval_protocol}
    model = args.eval_model
    if isinstance(model, str) and model.strip().startswith("{"):
        model = json.loads(model)
    if args.eval_width is not None or args.eval_depth is not None:
        default = "convnet" if args.eval_protocol == "standard" else "resnet18-bn"
        model = dict(model) if isinstance(model, dict) else named_model_fields(model or default)
        if args.eval_width is not None:
            model["width"] = args.eval_width
        if args.eval_depth is not None:
            model["depth"] = args.eval_depth
    flags = {"model": model, "num_models": args.num_models, "epochs": args.eval_epochs, "lr": args.eval_lr,
             "batch_size": args.eval_batch_size, "zeta": args.zeta, "teachers": args.teachers,
             "device": args.device, "seed": args.seed, "precision": getattr(args, "eval_precision", None),
             "engine": getattr(args, "eval_engine", None)}
    if args.eval_dsa_mode is not None:
        flags["dsa_single_per_call"] = args.eval_dsa_mode == "single"
    if args.networks_together in ("yes", "no"):
        flags["together"] = args.networks_together == "yes"
    settings.update({k: v for k, v in flags.items() if v is not None})
    if getattr(args, "eval_options", None):  # raydd evaluate --set: any field, read by its annotation
        settings.update(typed_overrides(get_protocol(args.eval_protocol).config_cls, args.eval_options))
    return settings


# --------------------------------------------------------------------------- parsers
def add_condense_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "condense", help="distill a dataset into a small synthetic set",
        description="Run one condensation method. Settings start from the method's published defaults for "
                    "(dataset, ipc); --set KEY=VALUE overrides any knob (unknown knobs are listed). "
                    "See `raydd methods` for what each method reads and its knobs.")
    p.add_argument("--method", required=True, help="condensation method, e.g. mtt (raydd methods lists them)")
    p.add_argument("--dataset", required=True, help="digits, mnist, fashion_mnist, cifar10, cifar100, imagefolder")
    p.add_argument("--ipc", type=int, required=True, help="images per class")
    p.add_argument("--store", default=DEFAULT_STORE, help=f"trajectory store root (default {DEFAULT_STORE})")
    p.add_argument("--data-root", dest="data_root", help="folder with the dataset files (e.g. ../shared/datasets)")
    p.add_argument("--download", action="store_true", help="let torchvision download the dataset")
    p.add_argument("--resolution", type=int, help="resize images to this side length (as the farm did)")
    p.add_argument("--iterations", type=int,
                   help="iterations in total (default: the method's published count); also the horizon of the "
                        "method's schedules (EDC's cosine lr, PTLM's |T|, DATM's window growth)")
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
    from .evaluation import PROTOCOLS

    p = subparsers.add_parser(
        "evaluate", help="train fresh networks on a synthetic set and test them",
        description="Train N fresh networks on a synthetic set under an evaluation protocol (standard: SGD "
                    "momentum 0.9, wd 5e-4, DSA, epochs + 1 passes, lr x0.1 after pass epochs//2 + 1 as DC/MTT's "
                    "evaluate_synset; edc: EDC's soft-label protocol) and report "
                    "mean ± std of the FINAL test accuracy.")
    p.add_argument("synthetic", nargs="+", help="a synthetic set written by raydd condense or raydd import "
                                                "(.safetensors); several: one referee table with Random beside them")
    p.add_argument("--data-root", dest="data_root", help="folder with the dataset files")
    p.add_argument("--download", action="store_true")
    _add_eval_flags(p)
    p.add_argument("--protocols", nargs="+", choices=tuple(PROTOCOLS), metavar="PROTOCOL",
                   help="the referee table: every set under each of these protocols (e.g. standard edc), with "
                        "Random (each set's images per class, random real ones) under each; replaces --protocol")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--set", dest="eval_options", action="append", default=[], metavar="KEY=VALUE",
                   help="set any field of the protocol's config, e.g. --set momentum=0.5 --set dsa=false "
                        "--set lr_decay_at=none (repeatable; typed by the field, after the flags above)")
    p.add_argument("--models", nargs="+", metavar="MODEL",
                   help="cross-architecture: evaluate under each of these networks (e.g. convnet resnet10 "
                        "resnet18-bn vgg11 alexnet) and print one table; the other flags apply to all")
    g = p.add_argument_group("robustness scores (DD-Ranking's HLR, IOR, LRS, ARS; standard protocol, one network "
                             "per accuracy, accuracies as fractions, run i seeded with --seed + i)")
    g.add_argument("--metrics", nargs="+", metavar="SCORE", help="any of hlr ior lrs ars")
    g.add_argument("--metric-runs", dest="metric_runs", type=int, default=5, help="seeded runs (default 5)")
    g.add_argument("--lrs-lambda", dest="lrs_lambda", type=float, default=0.5, help="LRS weight of IOR (default 0.5)")
    g.add_argument("--ars-gamma", dest="ars_gamma", type=float, default=0.5,
                   help="ARS weight of the with-augmentation gap (default 0.5)")
    g.add_argument("--full-acc", dest="full_acc", type=float,
                   help="known full-data accuracy (a fraction); default: one network trained on the training split")
    g.add_argument("--full-epochs", dest="full_epochs", type=int,
                   help="epochs of that full-data network (default: the protocol's)")
    p.set_defaults(func=cmd_evaluate)
    return p


def add_methods_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "methods", help="the registered condensation methods: what they read, published settings, knobs",
        description="Without a name: one line per registered method. With a name: what it reads from the store "
                    "(and the farm command that writes it), the datasets and IPCs with published settings, and "
                    "every knob with its default for --dataset/--ipc.")
    p.add_argument("name", nargs="?", help="a method, e.g. mtt")
    p.add_argument("--dataset", default="digits", help="show defaults and needs for this dataset (default digits)")
    p.add_argument("--ipc", type=int, default=10, help="show defaults and needs for this IPC (default 10)")
    p.add_argument("--store", default=DEFAULT_STORE, help="store root used in the farm command")
    p.set_defaults(func=cmd_methods)
    return p


# --------------------------------------------------------------------------- commands
def condense_plan(args):
    """The ``RunPlan`` of ``raydd condense`` (``raydd.plan.plan_run``, the planner every entry point uses): the
    published defaults, --set, --iterations, the evaluation the flags ask for (validated before any work)."""
    from .plan import plan_run

    if args.iterations is not None and args.iterations < 0:
        raise ValueError(f"--iterations {args.iterations} is invalid: expected an integer >= 0")
    plan = plan_run(args.method, args.dataset, args.ipc, iterations=args.iterations or None,
                    knobs=method_overrides(args.method, args.options), eval_settings=eval_settings_from_args(args),
                    data_root=args.data_root)
    return plan if args.iterations != 0 else dataclasses.replace(plan, iterations=0)


def cmd_condense(args) -> int:
    from .condense import condense
    from .data.datasets import load_dataset
    from .methods import get_method, save_checkpoint
    from .store import TrajectoryStore
    from .validation import check_writable

    cls = get_method(args.method)
    plan = condense_plan(args)  # validated before any data is loaded
    config, iterations, eval_config = plan.config, plan.iterations, plan.eval_config
    evaluating = bool(args.eval_every or args.evaluate)
    out = check_writable("--out", args.out or f"{args.method}_{args.dataset}_ipc{args.ipc}.safetensors")
    checkpoint = check_writable("--checkpoint", args.checkpoint or default_checkpoint(out))
    if args.logdir:
        check_writable("--logdir", args.logdir, directory=True)
    train = load_dataset(args.dataset, "train", args.data_root, download=args.download, resolution=args.resolution)
    test = None
    if evaluating:
        eval_config.model_spec(train.info)  # the evaluation network fits the data (before any condensing)
        test = load_dataset(args.dataset, "test", args.data_root, download=args.download, resolution=args.resolution)
    store = TrajectoryStore(args.store) if config.needs() else None
    with cls(config, train, store, device=args.device, seed=args.seed) as method:  # checks before any work
        print(f"raydd condense: {args.method} on {args.dataset}, ipc {args.ipc}, {iterations} iterations -> {out}",
              file=sys.stderr)
        try:
            result = condense(method, iterations, eval_every=args.eval_every or ([iterations] if args.evaluate else 0),
                              eval_config=eval_config, test=test, logdir=args.logdir, progress=not args.quiet,
                              checkpoint_path=args.checkpoint)
        except KeyboardInterrupt:
            if args.checkpoint is None:  # with --checkpoint the loop has saved it already
                save_checkpoint(method, checkpoint)
            print(f"raydd condense: interrupted at iteration {method.iteration} of {iterations}; its state is in "
                  f"{checkpoint}; continue with: {continuation(args, '--checkpoint', checkpoint)}", file=sys.stderr)
            return 130
    path = save_or_fall_back(result.synthetic, out)
    rate = (f"{result.seconds_per_iteration:.3f} s/iteration" if result.history
            else f"no iteration run: the checkpoint had reached {iterations}" if result.resumed_from else
            "no iteration run")
    print(f"saved {len(result.synthetic)} images to {path} ({rate})")
    if result.last_eval is not None:
        iteration, evaluation = result.last_eval
        print(f"evaluation at iteration {iteration}: {evaluation}")
    return 0


def default_checkpoint(out: str) -> str:
    """Where an interrupted ``raydd condense`` without --checkpoint keeps its state: next to its --out."""
    stem = out[:-len(".safetensors")] if out.endswith(".safetensors") else out
    return f"{stem}.checkpoint.safetensors"


def continuation(args, *flag: str) -> str:
    """The command the user typed, with ``flag`` (e.g. --checkpoint PATH or --resume) added if it is not there."""
    import shlex

    argv = list(getattr(args, "argv", None) or [])
    if flag and flag[0] not in argv:
        argv += list(flag)
    return "raydd " + " ".join(shlex.quote(a) for a in argv)


def save_or_fall_back(syn, out: str) -> str:
    """Save ``syn`` to ``out``; if that fails now (the disk filled, the folder went away), to a temporary file
    named on stderr: a long run never loses its product."""
    import tempfile

    try:
        return str(syn.save(out))
    except OSError as err:
        fd, fallback = tempfile.mkstemp(prefix="raydd-", suffix=".safetensors")
        os.close(fd)
        path = str(syn.save(fallback))
        print(f"raydd: could not write {out} ({type(err).__name__}: {err}); the set is in {path}", file=sys.stderr)
        return path


def cmd_evaluate(args) -> int:
    from .data.datasets import load_dataset
    from .evaluation import evaluate
    from .methods import load_synthetic

    if len(args.synthetic) > 1 or args.protocols:
        return evaluate_referee(args)
    args.synthetic = args.synthetic[0]
    syn = load_synthetic(args.synthetic)
    if args.models:
        return evaluate_across_models(args, syn)
    eval_config = eval_config_from_args(args, syn.dataset["name"])
    scores = robustness_config_from_args(args, eval_config, syn)  # checked before any data is loaded
    name, resolution = syn.dataset["name"], tuple(syn.dataset["resolution"])
    test = load_dataset(name, "test", args.data_root, download=args.download, resolution=resolution)
    progress = not (args.json or args.quiet)
    eval_config.model_spec(syn.info)  # the network fits the set's images (one line before any training)
    if progress:
        print(f"raydd evaluate: {args.synthetic} ({syn.method}, {len(syn)} images): {eval_config.num_models} "
              f"network(s) x {eval_config.epochs} epochs, {args.eval_protocol} protocol", file=sys.stderr)
    result = evaluate(syn, test, eval_config, progress=progress)
    robustness = None
    if scores is not None:
        from .evaluation.robustness import networks_per_call, robustness_metrics

        train = load_dataset(name, "train", args.data_root, download=args.download, resolution=resolution)
        with network_bar(networks_per_call(syn, scores, eval_config), "robustness", progress) as bar:
            robustness = robustness_metrics(syn, train, test, scores, eval_config, on_network=lambda _: bar.update())
    if args.json:
        out = result.to_dict()
        if robustness is not None:
            out["robustness"] = robustness.to_dict()
        print(json.dumps(out, indent=2))
    else:
        per_model = ", ".join(f"{100 * a:.2f}" for a in result.accuracies)
        print(f"{args.synthetic}: {syn.method}, {len(syn)} images, iteration {syn.iteration}")
        print(f"{result}\nper network: {per_model}")
        if robustness is not None:
            print(robustness)
    return 0


def evaluate_referee(args) -> int:
    """``raydd evaluate SET [SET ...] [--protocols P ...] [--models M ...] [--metrics ...]``: one table."""
    from pathlib import Path

    from .data.datasets import load_dataset
    from .evaluation.referee import check_same_data, format_table, referee
    from .methods import load_synthetic

    if args.protocols and args.eval_protocol != "standard":
        raise ValueError("--protocols names every protocol of the table: drop --protocol")
    protocols = list(dict.fromkeys(args.protocols or [args.eval_protocol]))
    models = args.models or [args.eval_model]
    if args.models and args.eval_model is not None:
        raise ValueError("--models evaluates under several networks: drop --model")
    for path in args.synthetic:
        if not Path(path).is_file():
            raise ValueError(f"{path}: no such file (a raydd synthetic set, .safetensors)")
    sets = [(path, load_synthetic(path)) for path in args.synthetic]
    check_same_data(sets)
    first = sets[0][1]
    configs = []
    for protocol in protocols:  # every protocol x network checked against the data before any training
        for model in models:
            config = eval_config_from_args(argparse.Namespace(**{**vars(args), "eval_protocol": protocol,
                                                                 "eval_model": model}), first.dataset["name"])
            spec = config.model_spec(first.info)
            configs.append((protocol, spec.name, config))
    scores = None
    if args.metrics:
        standard = next((c for p, _, c in configs if p == "standard"), None)
        if standard is None:
            raise ValueError("--metrics scores under the standard protocol: add standard to --protocols")
        scores = robustness_config_from_args(args, standard, None)
    name, resolution = first.dataset["name"], tuple(first.dataset["resolution"])
    test = load_dataset(name, "test", args.data_root, download=args.download, resolution=resolution)
    train = load_dataset(name, "train", args.data_root, download=args.download, resolution=resolution)
    quiet = args.json or args.quiet
    n_rows = len(configs) * (len(sets) + 1)
    if not quiet:
        print(f"raydd evaluate: {len(sets)} set(s) and Random under {', '.join(protocols)} "
              f"({len(models)} network(s)): about {n_rows} evaluations", file=sys.stderr)

    def report(row):
        if not quiet:
            print(f"  {row.name} | {row.protocol} | {row.model}: {100 * row.result.mean:.2f} ± "
                  f"{100 * row.result.std:.2f} %", file=sys.stderr)

    rows = referee(sets, train, test, configs, scores=scores, seed=args.seed, on_row=report)
    if args.json:
        print(json.dumps([{"set": r.name, "protocol": r.protocol, "model": r.model, "result": r.result.to_dict(),
                           "robustness": None if r.robustness is None else r.robustness.to_dict()} for r in rows],
                         indent=2))
        return 0
    print(format_table(rows, tuple(args.metrics or ())))
    return 0


def evaluate_across_models(args, syn) -> int:
    """``raydd evaluate SET --models A B ...``: the same protocol and flags under each network, one table."""
    import dataclasses

    from .data.datasets import load_dataset
    from .evaluation import evaluate
    from .models import ParamLayout, build_model

    if args.eval_model is not None or args.metrics:
        raise ValueError("--models evaluates under several networks: drop --model (and --metrics, which scores "
                         "under one)")
    configs = []
    for model in args.models:  # every network checked against the data before any training
        config = eval_config_from_args(argparse.Namespace(**{**vars(args), "eval_model": model}), syn.dataset["name"])
        config.model_spec(syn.info)
        configs.append(config)
    name, resolution = syn.dataset["name"], tuple(syn.dataset["resolution"])
    test = load_dataset(name, "test", args.data_root, download=args.download, resolution=resolution)
    results = [evaluate(syn, test, config, progress=not (args.json or args.quiet)) for config in configs]
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
        return 0
    first = dataclasses.asdict(configs[0])
    print(f"{args.synthetic}: {syn.method}, {len(syn)} images, iteration {syn.iteration}; cross-architecture, "
          f"{first['num_models']} networks x {first['epochs']} epochs each, {args.eval_protocol} protocol")
    print("| network | parameters | accuracy (%) | per network |\n|---|---:|---:|---|")
    for config, result in zip(configs, results):
        spec = config.model_spec(syn.info)
        per_model = ", ".join(f"{100 * a:.2f}" for a in result.accuracies)
        print(f"| {spec.name} | {ParamLayout.of_parameters(build_model(spec)).numel:,} | "
              f"{100 * result.mean:.2f} ± {100 * result.std:.2f} | {per_model} |")
    return 0


def robustness_config_from_args(args, eval_config, syn):
    """The RobustnessConfig --metrics asks for (None without it); one-line errors before any work."""
    from .evaluation import EvalConfig
    from .evaluation.robustness import RobustnessConfig, check_scores

    if not args.metrics:
        return None
    if not isinstance(eval_config, EvalConfig):
        raise ValueError(f"--metrics runs on the standard protocol, not --protocol {args.eval_protocol}")
    scores = RobustnessConfig(metrics=tuple(args.metrics), runs=args.metric_runs, lrs_lambda=args.lrs_lambda,
                              ars_gamma=args.ars_gamma, full_acc=args.full_acc, full_epochs=args.full_epochs,
                              seed=args.seed)
    check_scores(eval_config, syn, scores.metrics)
    return scores


def network_bar(total: int, what: str, enabled: bool):
    """A progress bar over networks trained (a no-op context when disabled)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=f"{what} ({total} networks)", unit="net", disable=not enabled, file=sys.stderr)


def cmd_methods(args) -> int:
    from .methods import METHODS, get_method

    if args.name is None:
        print(methods_table(args.dataset, args.ipc, args.store))
        print(f"\nDetails of one method: raydd methods NAME [--dataset D --ipc K] ({', '.join(METHODS)})")
        return 0
    print(method_card(get_method(args.name), args.dataset, args.ipc, args.store))
    return 0


def _published(config_cls) -> str:
    by_dataset: dict[str, list[int]] = {}
    for dataset, ipc in config_cls.published:
        by_dataset.setdefault(dataset, []).append(ipc)
    return "; ".join(f"{d} IPC {'/'.join(map(str, sorted(i)))}" for d, i in by_dataset.items()) or "none"


def methods_table(dataset: str, ipc: int, store: str) -> str:
    from .methods import METHODS, make_config

    lines = [f"Registered methods (what they read at {dataset} IPC {ipc}):", "",
             "| method | reads from the store | published settings | shared knobs |", "|---|---|---|---|"]
    for name, cls in METHODS.items():
        config = make_config(name, dataset, ipc)
        reads = "; ".join(n.describe() for n in config.needs()) or "nothing (no store)"
        shared = ", ".join(f"{a} = {t}" for a, t in cls.config_cls.aliases.items()) or "—"
        lines.append(f"| {name} ({cls.label}) | {reads} | {_published(cls.config_cls)} | {shared} |")
    return "\n".join(lines)


def method_card(cls, dataset: str, ipc: int, store: str) -> str:
    import dataclasses

    from .methods import farm_commands, make_config

    config = make_config(cls.name, dataset, ipc)
    doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
    lines = [f"{cls.name} — {doc[0]}" if doc else cls.name, ""]
    needs = config.needs()
    lines.append(f"reads ({dataset}, IPC {ipc}): " + ("; ".join(n.describe() for n in needs) or "nothing (no store)"))
    if needs:
        lines.append(f"farm it: {farm_commands(needs, dataset, store)}")
    lines.append(f"published settings: {_published(cls.config_cls)}")
    paper = cls.config_cls.paper
    if paper is not None:  # how its numbers were measured, and how raydd reads what the paper leaves open
        lines.append(f"paper protocol: {paper.source}" + (f"; {paper.notes}" if paper.notes else ""))
    lines.append(f"iterations: {config.planned_iterations} by default"
                 + (f"; --iterations N also sets {cls.config_cls.horizon}" if cls.config_cls.horizon else ""))
    shared = ", ".join(f"{a} = {t}" for a, t in cls.config_cls.aliases.items())
    lines.append(f"shared sweep knobs: {shared or 'none'}")
    lines.append("")
    lines.append(f"knobs (defaults for {dataset}, IPC {ipc}; --set KEY=VALUE):")
    for f in dataclasses.fields(config):
        if f.name not in ("dataset", "ipc"):
            lines.append(f"  {f.name} = {getattr(config, f.name)!r}")
    return "\n".join(lines)
