"""``raydd reproduce [NAME] [--list] [--scale paper|cpu|tiny] [--budget 8m] [--resume]``."""
from __future__ import annotations

import sys


def add_reproduce_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "reproduce", help="run a published setting end to end against its paper's number",
        description="Farm what a published setting needs (what the store holds is skipped), condense with its "
                    "published config and checkpoints, evaluate under its paper's protocol with Random beside "
                    "it under the same protocol, print paper vs measured vs Random and append the row to the "
                    "results ledger. No Ray needed (the farm runs locally unless --backend ray).")
    p.add_argument("name", nargs="?", help="a published setting, e.g. mtt_cifar10_ipc1 (see --list)")
    p.add_argument("--list", action="store_true", help="every setting, its paper number and the best measured so far")
    p.add_argument("--scale", default="paper", help="paper (as published), cpu (CPU-sized: 300 images per class, "
                                                     "width 32, 200 iterations, ...) or tiny (a smoke run)")
    p.add_argument("--on", help="run the setting on another dataset (e.g. digits for a smoke run; kept apart in "
                                "the ledger)")
    p.add_argument("--data-root", dest="data_root", help="folder with the dataset files")
    p.add_argument("--store", default="raydd-store", help="trajectory store (default raydd-store)")
    p.add_argument("--workdir", default="raydd-reproduce", help="checkpoints and synthetic sets (default raydd-reproduce)")
    p.add_argument("--budget", help="stop condensing after this long (90s, 8m, 1.5h) at a checkpoint --resume continues "
                                    "(farming before and the evaluation after are not counted)")
    p.add_argument("--resume", action="store_true", help="continue the run's checkpoint")
    p.add_argument("--ledger", help="results ledger (default: benchmarks/results/reproduce_ledger.jsonl of the "
                                    "checkout; '' writes none)")
    p.add_argument("--backend", default="local", help="farm backend: local (default, no Ray) or ray")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--trajectories", type=int, help="farm at most this many trajectories per recipe (e.g. 8 of the "
                                                    "paper's 100 experts; a departure the table and ledger state)")
    p.add_argument("--trajectory-epochs", dest="trajectory_epochs", type=int,
                   help="farm them for at most this many epochs (never fewer than the config reads)")
    p.add_argument("--pack", type=int, default=1, help="experts trained together per farm worker (farm --pack)")
    p.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE",
                   help="set a method knob, e.g. --set inner_momentum=0 (an ablation: a departure the table, the "
                        "ledger and --list state; repeatable)")
    p.add_argument("--engine", default="eager", help="how training steps run: eager (default) or graph (the same "
                                                     "numbers from pre-drawn randomness; CUDA graphs on a GPU) for "
                                                     "the farm, the method where it has one, and the evaluation")
    p.add_argument("--plan", action="store_true", help="print what the setting would farm, condense and evaluate, "
                                                       "and exit")
    p.add_argument("--campaign", metavar="DIR",
                   help="one sitting of the paper-scale campaign kept in DIR: the next settings without a "
                        "paper-scale ledger row, in a fixed priority order, each to its end or to a checkpoint a "
                        "later sitting resumes (needs --time)")
    p.add_argument("--time", help="the campaign sitting's length (e.g. 8m)")
    p.add_argument("--smoke", action="store_true", help="the campaign at the test-sized scale on digits")
    p.add_argument("--only", nargs="+", metavar="NAME", help="the campaign's settings restricted to these")
    p.add_argument("--eval-reserve", dest="eval_reserve", default="90s",
                   help="campaign: stop condensing this long before the sitting ends, for the evaluation (90s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_reproduce)


def cmd_reproduce(args) -> int:
    from ..condense_cli import continuation, method_overrides
    from .settings import get_setting
    from .run import list_settings, plan_text, reproduce, run_directory

    if args.list:
        print(list_settings(args.ledger))
        return 0
    if args.campaign:
        from .campaign import run_campaign

        if args.name:
            raise ValueError(f"--campaign runs the settings in its own order: drop {args.name!r} (or use --only)")
        try:
            report = run_campaign(args.campaign, time_limit=args.time, smoke=args.smoke, only=args.only,
                                  data_root=args.data_root, store=args.store, device=args.device, engine=args.engine,
                                  pack=args.pack, budget=args.budget, eval_reserve=args.eval_reserve,
                                  ledger=args.ledger, progress=not args.quiet)
        except KeyboardInterrupt:
            print(f"raydd reproduce: campaign interrupted; {args.campaign} keeps the finished entries' rows and the "
                  f"checkpoint of the one that was running; continue with: {continuation(args)}", file=sys.stderr)
            return 130
        print(report.table() if report.rows else "campaign: nothing left to run in this sitting (every entry is "
                                                  "done, has a paper-scale ledger row, or the time is too short)")
        return 0
    if not args.name:
        raise ValueError("name a published setting (raydd reproduce --list shows them)")
    overrides = method_overrides(get_setting(args.name).method, args.options)
    if args.plan:
        print(plan_text(args.name, scale=args.scale, on=args.on, trajectories=args.trajectories,
                        trajectory_epochs=args.trajectory_epochs, overrides=overrides))
        return 0
    try:
        out = reproduce(args.name, scale=args.scale, on=args.on, data_root=args.data_root, store=args.store,
                        workdir=args.workdir, device=args.device, budget=args.budget, resume=args.resume,
                        ledger=args.ledger, backend=args.backend, seed=args.seed, progress=not args.quiet,
                        trajectories=args.trajectories, trajectory_epochs=args.trajectory_epochs, pack=args.pack,
                        overrides=overrides, engine=args.engine)
    except KeyboardInterrupt:
        run_dir = run_directory(args.workdir, args.name, args.scale, trajectories=args.trajectories,
                                trajectory_epochs=args.trajectory_epochs, overrides=overrides, on=args.on)
        checkpoint = run_dir / "method.safetensors"
        kept = (f"the condensation's state is in {checkpoint}" if checkpoint.exists() else
                f"the trajectories farmed so far stay in {args.store}")
        print(f"raydd reproduce: interrupted; {kept}; continue with: {continuation(args, '--resume')}",
              file=sys.stderr)
        return 130
    print(out.table())
    if out.row and args.ledger != "":
        print(f"ledger row appended ({out.row['setting']}, scale {out.row['scale']})", file=sys.stderr)
    return 0
