"""`raydd` command line.

    raydd farm [--spec farm.yaml] [--dataset digits] [--recipe expert] [--trajectories 4] ...
    raydd store ls|info|verify <root>
    raydd condense --method mtt --dataset digits --ipc 10 [--store raydd-store] ...
    raydd evaluate <synthetic set>
    raydd methods [NAME]
    raydd sweep sweeps/quick.yaml [--farm] [--resume]
    raydd quickstart
"""
from __future__ import annotations

import argparse
import os
import sys

DEFAULT_STORE = "raydd-store"


def _farm_parser(sub) -> None:
    p = sub.add_parser("farm", help="train trajectories in parallel with Ray into the trajectory store",
                       description="Farm expert/pretrain/observer trajectories into an Arrow store. "
                                   "Flags override the YAML spec; with neither, the offline default "
                                   "(4 MTT experts on scikit-learn's digits) runs in a few minutes on 2 CPUs.")
    p.add_argument("--spec", help="YAML file of FarmSpec fields")
    p.add_argument("--store", help=f"store root: a directory or a URI such as s3://bucket/prefix (default {DEFAULT_STORE})")
    p.add_argument("--dataset", help="digits (offline default), mnist, fashion_mnist, cifar10, cifar100, imagefolder")
    p.add_argument("--data-root", dest="data_root", help="folder with the dataset files (e.g. ../shared/datasets)")
    p.add_argument("--download", action="store_true", default=None, help="let torchvision download (needs internet)")
    p.add_argument("--resolution", type=int, help="resize images to this side length")
    p.add_argument("--zca", action="store_true", default=None, help="train on ZCA-whitened images (MTT on CIFAR)")
    p.add_argument("--train-per-class", dest="train_per_class", type=int,
                   help="train on a class-balanced subset of this many images per class")
    p.add_argument("--recipe", help="expert (MTT/DATM), pretrain (DANCE/PTLM), observer (EDC), "
                                    "ssd_teacher and ssd_student (SSD)")
    p.add_argument("--epochs", type=int, help="training epochs (recipe default otherwise)")
    p.add_argument("--keep-epochs", dest="keep_epochs", type=int,
                   help="expert recipe: store snapshots 0..K only (plus the final one)")
    p.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE",
                   help="override any recipe option, e.g. --set lr=0.02 --set batch_size=128 (repeatable)")
    p.add_argument("--arch", help="convnet, resnet10, resnet18, vgg11, alexnet")
    p.add_argument("--width", type=int, help="ConvNet width / ResNet stem width")
    p.add_argument("--depth", type=int, help="ConvNet depth")
    p.add_argument("--norm", help="instance, batch or none")
    p.add_argument("--trajectories", "-n", type=int, help="how many trajectories (seeds seed..seed+n-1)")
    p.add_argument("--seed", type=int, help="first seed")
    p.add_argument("--dtype", help="stored parameter dtype: float32, float16, bfloat16")
    p.add_argument("--precision", help="forward/loss arithmetic: fp32 (default) or bf16 (autocast; parameters, "
                   "optimizer state and snapshots stay float32; a bf16 trajectory has its own id)")
    p.add_argument("--engine", help="how training steps run: eager (default) or graph (the same trajectories from "
                                    "pre-drawn randomness, the data on the device, CUDA graphs on a GPU)")
    p.add_argument("--backend", help="ray (default) or local (sequential, no Ray)")
    p.add_argument("--workers", type=int, help="number of worker actors")
    p.add_argument("--pack", type=int, help="trajectories each worker trains together as one computation "
                   "(expert, pretrain, observer; same trajectories, fills a GPU that one small network leaves idle)")
    p.add_argument("--cpus-per-worker", dest="cpus_per_worker", type=float)
    p.add_argument("--gpus-per-worker", dest="gpus_per_worker", type=float,
                   help="fractional GPUs per worker, e.g. 0.25 puts four experts on one GPU")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    p.add_argument("--device", help="auto, cpu, cuda")
    p.add_argument("--tensorboard", help="write every trajectory's per-epoch curves here (TensorBoard logdir)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


STORE_FILTERS = ("dataset", "model", "kind", "recipe")  # what raydd store ls/tensorboard/export-buffer filter on


def _store_parser(sub) -> None:
    p = sub.add_parser("store", help="inspect a trajectory store")
    ssub = p.add_subparsers(dest="store_cmd", required=True)
    ls = ssub.add_parser("ls", help="summary table of the stored trajectories (every snapshot's crc32 checked)")
    ls.add_argument("root", nargs="?", default=DEFAULT_STORE)
    for key in STORE_FILTERS:
        ls.add_argument(f"--{key}")
    ls.add_argument("--quick", action="store_true", help="read footers only (no crc32 check of the snapshots)")
    info = ssub.add_parser("info", help="one trajectory's metadata and per-epoch metrics")
    info.add_argument("root")
    info.add_argument("trajectory_id", help="a trajectory id, or a unique prefix of one")
    verify = ssub.add_parser("verify", help="integrity check of every file (exit 1 if a trajectory is damaged)")
    verify.add_argument("root", nargs="?", default=DEFAULT_STORE)
    gc = ssub.add_parser("gc", help="remove what dead writers left: dead claims and their temp files")
    gc.add_argument("root", nargs="?", default=DEFAULT_STORE)
    tb = ssub.add_parser("tensorboard", help="write the stored trajectories' per-epoch curves as TensorBoard runs")
    tb.add_argument("root")
    tb.add_argument("logdir", help="local directory; then: tensorboard --logdir LOGDIR")
    for key in STORE_FILTERS:
        tb.add_argument(f"--{key}")
    buf = ssub.add_parser("export-buffer", help="write stored trajectories as a reference replay_buffer_<n>.pt "
                                                "(MTT/DATM/TESLA's buffer.py layout)")
    buf.add_argument("root")
    buf.add_argument("out", help="the .pt file to write, e.g. buffers/CIFAR10/ConvNet/replay_buffer_0.pt")
    for key in STORE_FILTERS:
        buf.add_argument(f"--{key}")
    buf.add_argument("--epochs", type=int, help="epochs 0..EPOCHS of each trajectory (default: every stored epoch)")


def farm_spec_from_args(args):
    from .farm import FarmSpec
    from .farm.recipes import get_recipe
    from .overrides import typed_overrides

    base = FarmSpec.from_yaml(args.spec).to_dict() if args.spec else FarmSpec().to_dict()
    for key in ("store", "dataset", "data_root", "download", "resolution", "zca", "train_per_class", "recipe",
                "trajectories", "seed", "dtype", "precision", "engine", "backend", "workers", "pack",
                "cpus_per_worker", "gpus_per_worker", "address", "device", "tensorboard"):
        value = getattr(args, key)
        if value is not None:
            base[key] = value
    options = dict(base.get("recipe_options") or {})
    for key in ("epochs", "keep_epochs"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    if args.options:  # read by the recipe config's annotations: dsa=False is the bool False
        options.update(typed_overrides(get_recipe(base["recipe"]).config_cls, args.options))
    base["recipe_options"] = options
    model = dict(base.get("model") or {})
    for key in ("arch", "width", "depth", "norm"):
        if getattr(args, key) is not None:
            model[key] = getattr(args, key)
    base["model"] = model
    return FarmSpec.from_dict(base)


def cmd_farm(args) -> int:
    from .farm import farm

    spec = farm_spec_from_args(args)
    print(f"raydd farm: {spec.trajectories} x {spec.recipe} on {spec.dataset} -> {spec.store} "
          f"({spec.backend}, {spec.workers} worker(s))", file=sys.stderr)
    try:
        report = farm(spec, progress=not args.quiet)
    except KeyboardInterrupt:
        print("raydd farm: interrupted; what was published stays, the unfinished trajectories' temp files and "
              "claims were removed: run the same command again to continue", file=sys.stderr)
        return 130
    print(report.table())
    others = f", {len(report.by_others)} trained by another farm" if report.by_others else ""
    cleaned = f", {len(report.cleaned)} leftover file(s) of dead writers removed" if report.cleaned else ""
    prefix = ""
    if report.served:
        prefix += f", {len(report.served)} served by longer stored trajectories of the same runs"
    if report.extended:
        prefix += f", {len(report.extended)} of them extended from shorter stored ones"
    print(f"\n{len(report.trained)} trained{prefix}, {len(report.skipped)} already stored{others}{cleaned}, "
          f"{report.wall_time_s:.1f} s; inspect with: raydd store ls {spec.store}"
          + (f"; curves: tensorboard --logdir {spec.tensorboard}" if spec.tensorboard else ""))
    return 0


def _store_filters(args) -> dict[str, str]:
    """The --dataset/--model/--kind/--recipe filters a store subcommand was given."""
    return {k: getattr(args, k) for k in STORE_FILTERS if getattr(args, k)}


def cmd_store(args) -> int:
    from .store import TrajectoryStore
    from .store.cli import format_gc, format_info, format_ls, format_verify

    store = TrajectoryStore(args.root).require_existing()
    if args.store_cmd == "ls":
        filters = _store_filters(args)
        print(format_ls(store, check=not args.quick, **filters))
        return 0
    if args.store_cmd == "info":
        print(format_info(store, args.trajectory_id))
        return 0
    if args.store_cmd == "gc":
        print(format_gc(store))
        return 0
    if args.store_cmd == "tensorboard":
        from .store.tensorboard import write_curves
        from .validation import check_writable

        check_writable("logdir", args.logdir, directory=True)
        filters = _store_filters(args)
        written = write_curves(store, args.logdir, **filters)
        print(f"{len(written)} trajectory run(s) written to {args.logdir} (runs already there are kept); "
              f"view with: tensorboard --logdir {args.logdir}")
        return 0
    if args.store_cmd == "export-buffer":
        return _export_buffer(store, args)
    text, code = format_verify(store)
    print(text)
    return code


def _export_buffer(store, args) -> int:
    from .store.reference_buffer import expert_epochs, save_reference_buffer
    from .validation import check_int, check_writable

    check_int("--epochs", args.epochs, low=0, none_ok=True)
    out = check_writable("out", args.out)
    filters = _store_filters(args)
    infos = store.list(**filters)
    if not infos:
        raise ValueError(f"no trajectories in {store.root} match {filters or 'no filters'}: see raydd store ls")
    models = sorted({i.model_name for i in infos})
    if len(models) > 1:
        raise ValueError(f"the matching trajectories are of {len(models)} models {models}: a buffer holds one "
                         f"model's experts, pick one with --model")
    epochs = None if args.epochs is None else list(range(args.epochs + 1))
    experts = []
    for info in infos:
        with store.open(info.trajectory_id) as trajectory:
            experts.append(expert_epochs(trajectory, epochs))
    save_reference_buffer(experts, out)
    print(f"{len(experts)} trajectories ({models[0]}, {len(experts[0])} epochs each) written to {out} in the "
          f"reference replay-buffer layout")
    return 0


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("raydd")
    except metadata.PackageNotFoundError:  # running from a checkout that is not installed
        return "unknown (not installed)"


def _one_line_warnings(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line (``raydd: warning: ...``), without the source line Python prints by default."""
    print(f"raydd: warning: {message}", file=file or sys.stderr)


def _threads_for(command: str) -> None:
    """Commands that train in this process use at most the CPUs it may run on (its affinity, which a container
    or taskset narrows below the machine's cores); OMP_NUM_THREADS set by the user wins. The farm and sweep
    set their own per worker."""
    if command not in ("condense", "evaluate", "reproduce") or "OMP_NUM_THREADS" in os.environ:
        return
    import torch

    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, min(torch.get_num_threads(), allowed)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raydd", description="Dataset distillation at cluster scale.")
    parser.add_argument("--version", action="version", version=f"raydd {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    _farm_parser(sub)
    _store_parser(sub)
    from .condense_cli import add_condense_parser, add_evaluate_parser, add_methods_parser
    from .interchange_cli import add_export_parser, add_import_parser
    from .quickstart import add_quickstart_parser
    from .reproduce.cli import add_reproduce_parser
    from .sweep.cli import add_sweep_parser

    add_condense_parser(sub)
    add_evaluate_parser(sub)
    add_methods_parser(sub)
    add_sweep_parser(sub)
    add_quickstart_parser(sub)
    add_reproduce_parser(sub)
    add_import_parser(sub)
    add_export_parser(sub)
    return parser


# OpenMP threads sleep between parallel regions instead of spinning (benchmarks/threads.py, 2 cores: DM condense
# 24 s passive vs 35 s active on a quiet machine, 27 vs 44 s next to a busy process; one thread 26-27 s). Set
# before torch is imported (the parser imports it); an explicit OMP_WAIT_POLICY wins.
_WAIT_POLICY = "PASSIVE"


def _forget_handled_interrupt() -> None:
    """Keep the exit code a command returns after it handled Ctrl-C (130, its state saved).

    CPython marks a KeyboardInterrupt "unhandled" when it ends a string ``exec`` (a dataclass or namedtuple being
    defined by a lazy import, say), even if a caller catches it, and under ``python -m`` then kills the process with
    SIGINT at exit whatever code it returned. The mark is cleared when the next string ``exec`` starts: this one.
    """
    exec("")


def main(argv: list[str] | None = None) -> int:
    import warnings

    os.environ.setdefault("OMP_WAIT_POLICY", _WAIT_POLICY)
    args = build_parser().parse_args(argv)
    _threads_for(args.command)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # the command as typed (continuation commands)
    handlers = {"farm": cmd_farm, "store": cmd_store}
    with warnings.catch_warnings():  # restored on return (main() may run inside another program)
        warnings.showwarning = _one_line_warnings
        try:
            try:
                return handlers[args.command](args) if args.command in handlers else args.func(args)
            finally:
                _forget_handled_interrupt()
        except (ValueError, FileNotFoundError, KeyError) as err:
            message = err.args[0] if isinstance(err, KeyError) and err.args else err
            print(f"raydd {args.command}: error: {message}", file=sys.stderr)
            return 2
        except BrokenPipeError:  # e.g. `raydd store ls | head`: the reader left, nothing more to say
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        except KeyboardInterrupt:  # commands with state to keep say so themselves; the others keep nothing
            print(f"raydd {args.command}: interrupted; nothing of it was kept: run the same command again",
                  file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
