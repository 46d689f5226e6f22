"""Why does SSD sit near (or below) Random at the cpu scale? Its parts, one at a time, under one evaluation.

Not a test. Reads the store and the run directory a `raydd reproduce ssd_<dataset>_ipc<N> --scale cpu` run
left (teacher, students, the condensed set) and evaluates, under that run's protocol (the cpu scale's), with
the same seeds:

- Random: random real images per class with their true labels (the ledger's baseline);
- Random from D^l: random *labelled* images per class with their true labels (what SSD may know);
- SSD's initialisation (iteration 0) as configured (``syn_labels``), and with ``syn_labels=hard``;
- SSD after the run's iterations (the set the reproduce run saved);

and reports the test accuracy of the teacher and of each student trajectory's last snapshot, the teacher's
pseudo-label accuracy on the unlabelled pool, and how SSD's initial images were chosen (labelled vs
pseudo-labelled top-ups). The question each row answers is in its name.

    python benchmarks/ssd_diagnosis.py --setting ssd_mnist_ipc10 --data-root ../shared/datasets \
        --store /tmp/repro-cpu/store --workdir /tmp/repro-cpu/work
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from raydd.evaluation import evaluate, protocol_config  # noqa: E402
from raydd.methods import get_method, load_synthetic, make_config  # noqa: E402
from raydd.methods.synthetic import SyntheticSet  # noqa: E402
from raydd.data.datasets import data_root_for, load_dataset  # noqa: E402
from raydd.reproduce.run import run_directory  # noqa: E402
from raydd.reproduce.settings import get_scale, get_setting  # noqa: E402
from raydd.store import TrajectoryStore  # noqa: E402
from raydd.training import evaluate_model  # noqa: E402


def labelled_random(method, ipc: int, seed: int) -> SyntheticSet:
    """``ipc`` random labelled images per class with their true labels (the labels SSD is given)."""
    gen = torch.Generator().manual_seed(seed)
    pool_labels = method.train.labels  # labelled entries carry their true labels in SSD's view of the pool
    picks = []
    for c in range(method.train.info.num_classes):
        idx = method.split.labelled[pool_labels[method.split.labelled] == c]
        picks.append(idx[torch.randperm(len(idx), generator=gen)[:ipc]])
    picks = torch.cat(picks)
    return SyntheticSet(images=method.train.images[picks].clone(), labels=method.train.labels[picks].clone(),
                        dataset=method.train.info.to_dict(), method="random_labelled", config={}, meta={})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--setting", default="ssd_mnist_ipc10")
    p.add_argument("--scale", default="cpu")
    p.add_argument("--data-root", default=None)
    p.add_argument("--store", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    setting, scale = get_setting(args.setting), get_scale(args.scale)
    config, _ = setting.plan(scale)
    store = TrajectoryStore(args.store)
    dataset = setting.dataset
    root = data_root_for(dataset, args.data_root)
    train = load_dataset(dataset, "train", root)
    if scale.train_per_class:
        train = train.per_class(scale.train_per_class, seed=0)
    test = load_dataset(dataset, "test", root)
    eval_config = protocol_config(dataset, setting.eval_settings(scale))
    print(f"## {args.setting} at scale {args.scale}: SSD's parts under one evaluation ({eval_config})\n")
    rows = []

    def row(name: str, syn: SyntheticSet, answers: str) -> None:
        started = time.process_time()
        result = evaluate(syn, test, eval_config, progress=False)
        rows.append((name, f"{100 * result.mean:.2f} ± {100 * result.std:.2f}", answers,
                     f"{time.process_time() - started:.0f}"))

    with get_method("random")(make_config("random", dataset, config.ipc), train, None, device="cpu",
                              seed=args.seed) as rnd:
        rnd.step()
        row("Random (true labels)", rnd.synthetic_set(), "the ledger's baseline")
    with get_method("ssd")(config, train, store, device="cpu", seed=args.seed) as ssd:
        unl = ssd.split.unlabelled
        true_labels = ssd.inputs.training_view(ssd.expert_meta).pool.labels  # the students' pool, as farmed
        pseudo_acc = float((ssd.teacher_pred[unl] == true_labels[unl]).float().mean())
        init_counts = ssd.init_counts
        row(f"SSD initialisation, syn_labels={config.syn_labels}", ssd.synthetic_set(),
            "is the starting point already below Random?")
        row("Random from D^l (true labels)", labelled_random(ssd, config.ipc, args.seed),
            "what random labelled images give")
        student_accs = []
        for expert in ssd.experts:
            net = ssd.inputs.network(ssd.inputs.open(expert.trajectory_id).info, torch.device("cpu"))
            student_accs.append(float(evaluate_model(net, test.images, test.labels, device=torch.device("cpu")).acc))
        teacher_info = store.open(ssd.teacher_id).info
        teacher_net = ssd.inputs.network(teacher_info, torch.device("cpu"))
        teacher_acc = float(evaluate_model(teacher_net, test.images, test.labels, device=torch.device("cpu")).acc)
    hard = dataclasses.replace(config, syn_labels="hard")
    with get_method("ssd")(hard, train, store, device="cpu", seed=args.seed) as ssd_hard:
        row("SSD initialisation, syn_labels=hard", ssd_hard.synthetic_set(), "do the teacher's labels cost?")
    saved = run_directory(args.workdir, args.setting, args.scale) / "synthetic.safetensors"
    if saved.exists():
        syn = load_synthetic(saved)
        row(f"SSD after {syn.iteration} iterations (the reproduce run's set)", syn, "does the matching add?")
    else:
        rows.append((f"SSD after the run: {saved} not found", "–", "run raydd reproduce first", "–"))
    print("| set | accuracy % | question | CPU s |\n|---|---:|---|---:|")
    for name, acc, answers, cpu in rows:
        print(f"| {name} | {acc} | {answers} | {cpu} |")
    print(f"\nteacher ({teacher_info.model_name}) test accuracy {100 * teacher_acc:.2f} %; its pseudo-labels on the "
          f"{len(unl)} unlabelled training images {100 * pseudo_acc:.2f} % correct")
    print(f"students (matched trajectories, last snapshot) test accuracy: "
          f"{', '.join(f'{100 * a:.2f}' for a in student_accs)} %")
    print(f"SSD's initial images per class: labelled {init_counts['labelled']}, pseudo-labelled top-ups "
          f"{init_counts['unlabelled']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
