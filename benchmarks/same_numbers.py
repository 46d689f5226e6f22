"""Does a change alter any number? Every method, at two revisions, on the same store: bit for bit.

Not a test (it builds a second checkout). A refactor must change no number: this script checks out
``--base`` (default HEAD) into a temporary git worktree, farms a tiny digits store with the BASE
code (expert, pretrain, observer, ssd_teacher, ssd_student trajectories), then runs every method
registered in both trees for a few iterations with a small evaluation through each tree's
``condense()``, in separate processes, and compares the synthetic sets (images, labels, learned
step size), the per-iteration losses and the evaluation accuracies bit for bit. The working tree
is the "new" side.

    python benchmarks/same_numbers.py                 # working tree vs HEAD
    python benchmarks/same_numbers.py --base fb22efa  # vs an older commit
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

FARM = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    import torch
    torch.set_num_threads(1)
    from raydd.farm import FarmSpec, farm
    common = dict(store=sys.argv[2], dataset="digits", backend="local", model={"width": 16, "depth": 2})
    jobs = [("expert", {"epochs": 4, "batch_size": 64}, 2), ("pretrain", {"epochs": 3, "batch_size": 64, "lr": 0.05}, 2),
            ("observer", {"epochs": 2, "batch_size": 64}, 1), ("ssd_teacher", {"epochs": 3}, 1),
            ("ssd_student", {"epochs": 4, "batch_size": 64}, 2)]
    for recipe, options, n in jobs:
        farm(FarmSpec(**common, recipe=recipe, recipe_options=options, trajectories=n), progress=False)
""")

RUN = textwrap.dedent("""
    import sys, json
    sys.path.insert(0, sys.argv[1])
    import torch
    from safetensors.torch import save_file
    torch.set_num_threads(1)
    from raydd.condense import condense
    from raydd.data.datasets import load_train_test
    from raydd.methods import METHODS, get_method, make_config
    from raydd.store import TrajectoryStore
    try:
        from raydd.evaluation import EvalConfig
    except ImportError:  # revisions before the evaluation package
        from raydd.evaluate import EvalConfig
    out, store, names = sys.argv[2], TrajectoryStore(sys.argv[3]), json.loads(sys.argv[4])
    train, test = load_train_test("digits")
    tm = dict(syn_steps=3, max_start_epoch=2, expert_epochs=2)
    knobs = {"mtt": tm, "datm": dict(tm, current_max_start_epoch=None), "datm_clr": dict(tm, current_max_start_epoch=None),
             "ssd": dict(tm, syn_labels="soft"), "dm": dict(width=16, batch_real=32),
             "dance": dict(num_experts=2, batch_real=32), "ptlm": dict(num_experts=2, batch_real=32)}
    evaluation = EvalConfig(model={"arch": "convnet", "width": 8, "depth": 2}, num_models=1, epochs=3)
    import inspect
    if "iterations" in inspect.signature(make_config).parameters:  # plans the run's horizon
        plan = {"iterations": 4}
    else:  # revisions before make_config(iterations=): EDC's and PTLM's horizons set by hand
        plan = {}
        knobs.update(edc={"iterations": 4}, ptlm=dict(knobs["ptlm"], total_iterations=4))
    result = {}
    for name in names:
        config = make_config(name, "digits", 2, **plan, **knobs.get(name, {}))
        with get_method(name)(config, train, store, device="cpu", seed=0) as method:
            run = condense(method, 4, eval_every=2, eval_config=evaluation, test=test, progress=False)
        syn = run.synthetic
        save_file({"images": syn.images.contiguous(), "labels": syn.labels.contiguous()}, f"{out}_{name}.safetensors")
        result[name] = {"syn_lr": syn.syn_lr, "losses": [h.get("loss") for h in run.history],
                        "evals": [e.accuracies for _, e in run.evals]}
    json.dump(result, open(out + ".json", "w"))
""")

NAMES = textwrap.dedent("""
    import sys, json
    sys.path.insert(0, sys.argv[1])
    from raydd.methods import METHODS
    print(json.dumps(list(METHODS)))
""")


def python(code: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    return proc.stdout


def main(argv: list[str] | None = None) -> None:
    import torch
    from safetensors.torch import load_file

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="HEAD", help="git revision to compare the working tree with (default HEAD)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="raydd-same-") as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(base), args.base],
                       check=True, capture_output=True)
        try:
            store = str(Path(tmp) / "store")
            python(FARM, str(base), store)
            names = [n for n in json.loads(python(NAMES, str(base))) if n in json.loads(python(NAMES, str(REPO)))]
            for side, tree in (("base", base), ("new", REPO)):
                python(RUN, str(tree), str(Path(tmp) / side), store, json.dumps(names))
            old, new = (json.load(open(Path(tmp) / f"{side}.json")) for side in ("base", "new"))
            print(f"## Same numbers? working tree vs {args.base} (digits, IPC 2, 4 iterations, store farmed by the base)")
            print("\n| method | synthetic set | losses | evaluations | learned α |\n|---|---|---|---|---|")
            identical = True
            for name in names:
                a, b = (load_file(Path(tmp) / f"{side}_{name}.safetensors") for side in ("base", "new"))
                cells = [torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"]),
                         old[name]["losses"] == new[name]["losses"], old[name]["evals"] == new[name]["evals"],
                         old[name]["syn_lr"] == new[name]["syn_lr"]]
                identical &= all(cells)
                print(f"| {name} | " + " | ".join("identical" if c else "DIFFERS" for c in cells) + " |")
            print(f"\n{'every number identical' if identical else 'some numbers differ'} ({len(names)} methods)")
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base)], capture_output=True)


if __name__ == "__main__":
    main()
