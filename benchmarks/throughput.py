"""Benchmark: raydd's three units of GPU work against the reference code's own loops, with achieved TFLOP/s.

Not a test. Prints one table (and writes JSON with --out). Run from the repository root:

    python benchmarks/throughput.py --reference-root REFS --data-root ../shared/datasets --device cuda
    python benchmarks/throughput.py --reference-root REFS --smoke          # toy sizes on the CPU (a dry run)

REFS holds an unmodified clone of GeorgeCazenavette/mtt-distillation (``REFS/mtt-distillation`` or
``REFS/GeorgeCazenavette+mtt-distillation``): its ``utils.py`` (``get_network``, ``epoch``, ``evaluate_synset``,
``DiffAugment``, ``ParamDiffAug``, ``TensorDataset``) and ``reparam_module.py`` are imported at run time; nothing
of it is copied here. (``kornia``, which utils.py imports for its ZCA only, is stubbed when absent.)

Units, each timed in the same run for the reference and for raydd, on CIFAR-10 (32x32, ConvNet-3 w128 with
instance norm, the papers' network):

* ``expert``: expert-epochs per hour. Reference: buffer.py's loop — one expert per process, ``utils.epoch`` over a
  ``DataLoader`` of a CPU ``TensorDataset`` (batch 256, shuffle) with ``DiffAugment``, then the test pass (batch
  128, 2 loader workers). raydd: the ``expert`` recipe through ``run_trajectories`` (snapshots written to a store),
  ``engine`` eager/graph, ``pack`` K networks trained together.
* ``mtt``: one MTT iteration at CIFAR-10 IPC 1 (N = 50 student steps, the published setting; ZCA off: the same
  cost). Reference: distill.py's iteration as written there (``ReparamModule`` student, a flat parameter list,
  ``DiffAugment`` per step, MSE sums, both SGD steps), on expert snapshots kept as per-parameter CPU tensors as its
  buffers are. raydd: ``MTT.step()`` with engine eager and graph.
* ``eval``: 5 networks x E epochs (1000: the protocol) on a 10-images-per-class set. Reference: five sequential
  ``utils.evaluate_synset`` runs. raydd: the standard protocol (``train_and_test``) one by one and together, eager
  and graph.

FLOPs are counted once per unit with ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix
products, forward and backward) and divided by the measured time; the peak is measured in the same run (an
8192^3 matrix product in fp32 and in TF32 — cuDNN's convolutions use TF32 by default, as PyTorch leaves them).
Times are wall seconds after ``torch.cuda.synchronize()``; on a CPU, process CPU seconds too.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raydd.data.datasets import ImageDataset, load_dataset  # noqa: E402
from raydd.evaluation import EvalConfig, train_and_test  # noqa: E402
from raydd.farm import FarmData, FarmSpec  # noqa: E402
from raydd.farm.task import data_fingerprint, plan_tasks, run_trajectories  # noqa: E402
from raydd.methods import MTT, make_config  # noqa: E402
from raydd.models import ModelSpec, build_model  # noqa: E402
from raydd.store import TrajectoryStore  # noqa: E402


# --------------------------------------------------------------------------- clocks and the reference
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        sync(self.device)
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def import_reference(root: Path):
    """mtt-distillation's utils and reparam_module, imported from the clone as they are."""
    for name in ("mtt-distillation", "GeorgeCazenavette+mtt-distillation", "."):
        repo = root / name
        if (repo / "utils.py").exists() and (repo / "reparam_module.py").exists():
            break
    else:
        raise SystemExit(f"no mtt-distillation clone under {root} (utils.py, reparam_module.py)")
    sys.path.insert(0, str(repo))
    try:
        import kornia  # noqa: F401
    except ImportError:  # utils.py imports it for its ZCA only, which these units do not use
        sys.modules["kornia"] = types.ModuleType("kornia")
    import reparam_module
    import utils

    commit = "unknown"
    head = repo / ".commit"
    if head.exists():
        commit = head.read_text().strip()
    return utils, reparam_module.ReparamModule, commit


def peak_tflops(device: torch.device, n: int) -> dict[str, float]:
    """The measured matrix-product ceilings: fp32 and TF32 (mean of 10 after 3 warm-ups, random data)."""
    out = {}
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        for name, tf32 in (("fp32", False), ("tf32", True)):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            for _ in range(3):
                a @ b
            with Clock(device) as c:
                for _ in range(10):
                    a @ b
            out[name] = 2 * n ** 3 * 10 / c.wall / 1e12
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    return out


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "–"


# --------------------------------------------------------------------------- data
def load(args, device):
    if args.smoke:
        train = load_dataset("digits", "train")
        test = load_dataset("digits", "test")
        return train.per_class(60, seed=0), test
    train = load_dataset("cifar10", "train", args.data_root)
    test = load_dataset("cifar10", "test", args.data_root)
    if args.train_per_class:
        train = train.per_class(args.train_per_class, seed=0)
    return train, test


def model_fields(args) -> dict:
    return {"width": 16 if args.smoke else 128, "depth": 3, "norm": "instance"}


# --------------------------------------------------------------------------- expert epochs
def reference_expert_epochs(utils, train: ImageDataset, test: ImageDataset, device, epochs: int, args) -> float:
    """Seconds per epoch (the last ``epochs - 1`` of ``epochs``) of buffer.py's loop for one expert."""
    ref_args = types.SimpleNamespace(device=str(device), dsa=True, dsa_param=utils.ParamDiffAug(), dataset="CIFAR10",
                                     dsa_strategy="color_crop_cutout_flip_scale_rotate", batch_train=256)
    channel, hw = train.info.channels, tuple(train.info.resolution)
    net = utils.get_network("ConvNet", channel, train.info.num_classes, hw)
    if args.smoke:  # the toy width of the raydd side
        net = utils.ConvNet(channel, train.info.num_classes, 16, 3, "relu", "instancenorm", "avgpooling", hw)
    net = net.to(device)
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0, weight_decay=0)
    criterion = torch.nn.CrossEntropyLoss().to(device)
    trainloader = torch.utils.data.DataLoader(utils.TensorDataset(train.images, train.labels), batch_size=256,
                                              shuffle=True, num_workers=0)
    testloader = torch.utils.data.DataLoader(utils.TensorDataset(test.images, test.labels), batch_size=128,
                                             shuffle=False, num_workers=2)
    times = []
    for e in range(epochs):
        with Clock(device) as c:
            utils.epoch("train", dataloader=trainloader, net=net, optimizer=opt, criterion=criterion, args=ref_args,
                        aug=True)
            utils.epoch("test", dataloader=testloader, net=net, optimizer=None, criterion=criterion, args=ref_args,
                        aug=False)
        if e:
            times.append(c.wall)
    return statistics.fmean(times)


def raydd_expert_epochs(train, test, device, *, engine: str, pack: int, epochs: int, args) -> float:
    """Seconds per epoch of ``pack`` experts trained together (epochs after the first), through the farm's
    ``run_trajectories`` into a temporary store."""
    data = FarmData.from_datasets(train, test)
    with tempfile.TemporaryDirectory() as root:
        spec = FarmSpec(store=root, dataset="digits" if args.smoke else "cifar10", backend="local",
                        trajectories=pack, recipe_options={"epochs": epochs}, model=model_fields(args),
                        engine=engine, pack=pack, device=str(device))
        tasks = plan_tasks(spec, data, data_fingerprint(data))
        stamps: dict[int, float] = {}

        def on_epoch(tid, epoch, total, metrics):  # after the epoch's test pass (which reads results back)
            stamps.setdefault(epoch, time.perf_counter())

        start = time.perf_counter()
        run_trajectories(tasks, data, device=str(device), on_epoch=on_epoch, store=TrajectoryStore(root))
        del start
        return (stamps[epochs] - stamps[1]) / (epochs - 1)


def expert_flops(train, test, device, args) -> int:
    """FLOPs of one expert epoch: the training steps (forward + backward) and the test pass."""
    spec = ModelSpec(arch="convnet", channels=train.info.channels, resolution=tuple(train.info.resolution),
                     num_classes=train.info.num_classes, **model_fields(args))
    net = build_model(spec).to(device)
    x = train.images[:256].to(device)
    y = train.labels[:256].to(device)
    step = count_flops(lambda: torch.nn.functional.cross_entropy(net(x), y).backward())
    forward = count_flops(lambda: net(x))
    return step * math.ceil(len(train) / 256) + forward * len(test) / 256


def part_expert(utils, train, test, device, args, peak) -> list[dict]:
    epochs = 2 if args.smoke else 3
    flops = expert_flops(train, test, device, args)
    rows = []
    ref_s = reference_expert_epochs(utils, train, test, device, epochs, args)
    rows.append({"unit": "expert epoch", "variant": "reference (buffer.py loop, 1 expert)", "networks": 1,
                 "seconds": ref_s, "per_hour": 3600 / ref_s, "tflops": flops / ref_s / 1e12})
    variants = [("eager", 1), ("graph", 1)] + [("graph", k) for k in args.packs]
    for engine, pack in variants:
        s = raydd_expert_epochs(train, test, device, engine=engine, pack=pack, epochs=epochs, args=args)
        rows.append({"unit": "expert epoch", "variant": f"raydd {engine}, pack {pack}", "networks": pack,
                     "seconds": s, "per_hour": pack * 3600 / s, "tflops": pack * flops / s / 1e12})
    for r in rows:
        r["vs_reference"] = r["per_hour"] / rows[0]["per_hour"]
    return rows


# --------------------------------------------------------------------------- MTT iteration
def farm_one_expert(train, test, device, args, root: str, epochs: int) -> TrajectoryStore:
    data = FarmData.from_datasets(train, test)
    spec = FarmSpec(store=root, dataset="digits" if args.smoke else "cifar10", backend="local", trajectories=1,
                    recipe_options={"epochs": epochs}, model=model_fields(args),
                    engine="graph" if device.type == "cuda" else "eager", device=str(device))
    run_trajectories(plan_tasks(spec, data, data_fingerprint(data)), data, device=str(device),
                     store=TrajectoryStore(root))
    return TrajectoryStore(root)


def mtt_config(args, engine: str):
    knobs = dict(syn_steps=3 if args.smoke else 50, expert_epochs=2, max_start_epoch=2, lr_img=100.0, lr_lr=1e-7,
                 syn_lr_init=0.01, zca=False, engine=engine)
    return make_config("mtt", "digits" if args.smoke else "cifar10", 1, **knobs)


def reference_mtt_iterations(utils, ReparamModule, store, train, device, iterations: int, args) -> list[float]:
    """distill.py's iteration, step for step, on the stored expert (kept as per-parameter CPU tensors, as the
    reference's buffers hold them). Returns seconds per iteration."""
    info = store.list(kind="expert")[0]
    with store.open(info.trajectory_id) as traj:
        layout = [(name, shape) for name, shape in traj.meta["param_layout"]]
        expert = []
        for epoch in traj.epochs:
            flat = traj.params(epoch).clone()
            expert.append([chunk.view(shape) for chunk, (_, shape) in
                           zip(flat.split([math.prod(s) for _, s in layout]), layout)])
    channel, hw, k = train.info.channels, tuple(train.info.resolution), train.info.num_classes
    if args.smoke:
        net = utils.ConvNet(channel, k, 16, 3, "relu", "instancenorm", "avgpooling", hw)
    else:
        net = utils.get_network("ConvNet", channel, k, hw, dist=False)
    student_net = ReparamModule(net.to(device))
    student_net.train()
    num_params = sum(np.prod(p.size()) for p in student_net.parameters())
    criterion = torch.nn.CrossEntropyLoss().to(device)
    ipc, syn_steps, expert_epochs, max_start_epoch = 1, mtt_config(args, "eager").syn_steps, 2, 2
    idx = torch.cat([train.class_indices(c)[:ipc] for c in range(k)])
    image_syn = train.images[idx].clone().to(device).requires_grad_(True)
    label_syn = torch.arange(k).repeat_interleave(ipc).to(device)
    syn_lr = torch.tensor(0.01).to(device).requires_grad_(True)
    optimizer_img = torch.optim.SGD([image_syn], lr=100.0, momentum=0.5)
    optimizer_lr = torch.optim.SGD([syn_lr], lr=1e-7, momentum=0.5)
    dsa_param, batch_syn = utils.ParamDiffAug(), k * ipc
    times = []
    for _ in range(iterations):
        with Clock(device) as c:
            start_epoch = np.random.randint(0, max_start_epoch)
            starting_params = expert[start_epoch]
            target_params = torch.cat([p.data.to(device).reshape(-1) for p in expert[start_epoch + expert_epochs]], 0)
            student_params = [torch.cat([p.data.to(device).reshape(-1) for p in starting_params], 0).requires_grad_(True)]
            starting_params = torch.cat([p.data.to(device).reshape(-1) for p in starting_params], 0)
            indices_chunks = []
            for _step in range(syn_steps):
                if not indices_chunks:
                    indices_chunks = list(torch.split(torch.randperm(len(image_syn)), batch_syn))
                these = indices_chunks.pop()
                x = utils.DiffAugment(image_syn[these], "color_crop_cutout_flip_scale_rotate", param=dsa_param)
                ce_loss = criterion(student_net(x, flat_param=student_params[-1]), label_syn[these])
                grad = torch.autograd.grad(ce_loss, student_params[-1], create_graph=True)[0]
                student_params.append(student_params[-1] - syn_lr * grad)
            param_loss = torch.tensor(0.0).to(device)
            param_dist = torch.tensor(0.0).to(device)
            param_loss += torch.nn.functional.mse_loss(student_params[-1], target_params, reduction="sum")
            param_dist += torch.nn.functional.mse_loss(starting_params, target_params, reduction="sum")
            param_loss /= num_params
            param_dist /= num_params
            grand_loss = param_loss / param_dist
            optimizer_img.zero_grad()
            optimizer_lr.zero_grad()
            grand_loss.backward()
            optimizer_img.step()
            optimizer_lr.step()
            for _p in student_params:
                del _p
        times.append(c.wall)
    return times


def raydd_mtt_iterations(store, train, device, engine: str, iterations: int, args) -> list[float]:
    method = MTT(mtt_config(args, engine), train, store, device=str(device), seed=0)
    times = []
    for _ in range(iterations):
        with Clock(device) as c:
            method.step()
        times.append(c.wall)
    return times


def part_mtt(utils, ReparamModule, train, test, device, args, peak) -> list[dict]:
    warm, timed = (1, 2) if args.smoke else (5, 20)
    with tempfile.TemporaryDirectory() as root:
        store = farm_one_expert(train, test, device, args, root, epochs=4)
        probe = MTT(mtt_config(args, "eager"), train, store, device=str(device), seed=0)
        flops = count_flops(probe.step)
        probe.close()
        rows = []
        ref = reference_mtt_iterations(utils, ReparamModule, store, train, device, warm + timed, args)[warm:]
        rows.append({"unit": "MTT iteration", "variant": "reference (distill.py iteration)", "seconds":
                     statistics.median(ref), "tflops": flops / statistics.median(ref) / 1e12})
        for engine in ("eager", "graph"):
            t = raydd_mtt_iterations(store, train, device, engine, warm + timed, args)[warm:]
            rows.append({"unit": "MTT iteration", "variant": f"raydd {engine}", "seconds": statistics.median(t),
                         "tflops": flops / statistics.median(t) / 1e12})
    for r in rows:
        r["vs_reference"] = r["seconds"] / rows[0]["seconds"]
    return rows


# --------------------------------------------------------------------------- evaluation
def ipc_set(train: ImageDataset, ipc: int):
    idx = torch.cat([train.class_indices(c)[:ipc] for c in range(train.info.num_classes)])
    return train.images[idx].clone(), train.labels[idx].clone()


def reference_evaluation(utils, images, labels, test, device, nets: int, epochs: int, args) -> tuple[float, list]:
    ref_args = types.SimpleNamespace(device=str(device), dsa=True, dsa_param=utils.ParamDiffAug(), dataset="CIFAR10",
                                     dsa_strategy="color_crop_cutout_flip_scale_rotate", batch_train=256,
                                     lr_net=0.01, epoch_eval_train=epochs)
    testloader = torch.utils.data.DataLoader(utils.TensorDataset(test.images, test.labels), batch_size=128,
                                             shuffle=False, num_workers=2)
    channel, hw, k = images.shape[1], tuple(images.shape[-2:]), int(labels.max()) + 1
    accs = []
    with Clock(device) as c:
        for i in range(nets):
            if args.smoke:
                net = utils.ConvNet(channel, k, 16, 3, "relu", "instancenorm", "avgpooling", hw)
            else:
                net = utils.get_network("ConvNet", channel, k, hw)
            _, _, acc = utils.evaluate_synset(i, net, images, labels, testloader, ref_args)
            accs.append(acc)
    return c.wall, accs


def part_eval(utils, train, test, device, args, peak) -> list[dict]:
    nets, epochs = (2, 4) if args.smoke else (5, args.eval_epochs)
    images, labels = ipc_set(train, 10)
    spec = ModelSpec(arch="convnet", channels=images.shape[1], resolution=tuple(images.shape[-2:]),
                     num_classes=train.info.num_classes, **model_fields(args))
    net = build_model(spec).to(device)
    step = count_flops(lambda: torch.nn.functional.cross_entropy(net(images.to(device)), labels.to(device)).backward())
    test_pass = count_flops(lambda: net(test.images[:256].to(device))) * len(test) / 256
    flops = nets * (epochs * step + test_pass)
    rows = []
    ref_s, ref_accs = reference_evaluation(utils, images, labels, test, device, nets, epochs, args)
    rows.append({"unit": f"evaluation {nets} nets x {epochs} epochs", "variant": f"reference (evaluate_synset x{nets})",
                 "seconds": ref_s, "tflops": flops / ref_s / 1e12, "acc": statistics.fmean(ref_accs)})
    for engine, together in (("eager", False), ("graph", False), ("graph", True)):
        config = EvalConfig(model=model_fields(args) | {"arch": "convnet"}, num_models=nets, epochs=epochs,
                            engine=engine, together=together, device=str(device))
        with Clock(device) as c:
            result = train_and_test(images, labels, test, train.info, config, lr=0.01)
        rows.append({"unit": f"evaluation {nets} nets x {epochs} epochs",
                     "variant": f"raydd {engine}{', together' if together else ', one by one'}",
                     "seconds": c.wall, "tflops": flops / c.wall / 1e12, "acc": result.mean})
    for r in rows:
        r["vs_reference"] = r["seconds"] / rows[0]["seconds"]
    return rows


# --------------------------------------------------------------------------- main
def table(rows: list[dict], peak: dict) -> str:
    lines = [f"Measured peak (8192^3 matmul): fp32 {peak.get('fp32', float('nan')):.1f} TFLOP/s, "
             f"TF32 {peak.get('tf32', float('nan')):.1f} TFLOP/s", "",
             "| unit | variant | seconds | expert-epochs/h | vs reference | TFLOP/s | % of TF32 peak | accuracy |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        per_hour = f"{r['per_hour']:.0f}" if "per_hour" in r else "–"
        frac = f"{100 * r['tflops'] / peak['tf32']:.1f}" if peak.get("tf32") else "–"
        acc = f"{100 * r['acc']:.2f}" if "acc" in r else "–"
        lines.append(f"| {r['unit']} | {r['variant']} | {r['seconds']:.4f} | {per_hour} | {r['vs_reference']:.2f}x | "
                     f"{r['tflops']:.2f} | {frac} | {acc} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference-root", required=True, type=Path)
    p.add_argument("--data-root", default=None)
    p.add_argument("--device", default="cuda")
    p.add_argument("--parts", nargs="+", default=["expert", "mtt", "eval"], choices=["expert", "mtt", "eval"])
    p.add_argument("--packs", nargs="+", type=int, default=[8, 16], help="expert packs trained with the graph engine")
    p.add_argument("--eval-epochs", type=int, default=1000)
    p.add_argument("--train-per-class", type=int, default=None, help="a class-balanced subset (default: all)")
    p.add_argument("--smoke", action="store_true", help="toy sizes on digits (a CPU dry run of every part)")
    p.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = p.parse_args(argv)
    device = torch.device("cpu" if args.smoke and args.device == "cuda" and not torch.cuda.is_available()
                          else args.device)
    if args.smoke:
        args.packs = [2]
    utils, ReparamModule, commit = import_reference(args.reference_root)
    peak = peak_tflops(device, 512 if args.smoke else 8192)
    train, test = load(args, device)
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch "
          f"{torch.__version__}, reference mtt-distillation {commit}; train {len(train)}, test {len(test)}",
          flush=True)
    rows: list[dict] = []
    for part in args.parts:
        started = time.perf_counter()
        if part == "expert":
            rows += part_expert(utils, train, test, device, args, peak)
        elif part == "mtt":
            rows += part_mtt(utils, ReparamModule, train, test, device, args, peak)
        else:
            rows += part_eval(utils, train, test, device, args, peak)
        print(f"[{part}: {time.perf_counter() - started:.0f} s]", flush=True)
        if args.out:
            args.out.write_text(json.dumps({"peak": peak, "rows": rows, "reference_commit": commit,
                                            "torch": torch.__version__}, indent=1))
    print(table(rows, peak))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
