"""Benchmark: the trajectory farm vs a plain sequential loop, and the Arrow store vs torch.save.

Not a test. Prints two tables. Run from the repository root:

    python benchmarks/farm.py                      # Fashion-MNIST subset (needs --data-root) or digits
    python benchmarks/farm.py --dataset digits --trajectories 4 --epochs 20

(a) ``sequential``: K experts trained one after another in one process, the way
    the reference MTT buffer.py does it (build net, SGD + DSA, append
    [p.cpu() for p in net.parameters()] after every epoch, torch.save the
    nested list at the end).
(b) ``farm``: the same K experts with raydd's Ray farm, 1 worker (all cores)
    and 2 workers (one core each), writing to the Arrow store.
(c) store size and read time vs torch.save, and verified reads: a random epoch with its crc32
    checked (what every method reads) vs unchecked vs torch.load (``--part store``: only these).
(d) ``--part pack``: experts per hour of one worker training K experts together (``FarmSpec.pack``,
    one stacked computation) vs the same K experts one at a time, K in ``--pack-sizes``, at each
    ``--widths``; one thread, CPU seconds, no Ray (the worker's own work: ``run_trajectories``);
    ``--device cuda``: wall seconds on the GPU, and ``--processes`` adds K concurrent worker processes
    of one expert each (K CUDA contexts, what K fractional-GPU Ray actors are).
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raydd.data.augment import DSA, DSAConfig  # noqa: E402
from raydd.data.datasets import data_root_for  # noqa: E402
from raydd.farm import FarmSpec, farm, prepare_data  # noqa: E402
from raydd.farm.task import model_spec_for  # noqa: E402
from raydd.models import ModelSpec, ParamLayout, build_model  # noqa: E402
from raydd.store import TrajectoryStore  # noqa: E402
from raydd.training import evaluate_model, train_epoch  # noqa: E402


def sequential_loop(spec: FarmSpec, data, out_dir: Path) -> float:
    """The reference way: one expert after another, nested lists of tensors, one torch.save."""
    torch.set_num_threads(os.cpu_count() or 1)
    train, test = data.datasets()
    cfg = spec.recipe_config()
    model_spec = model_spec_for(spec, data.info)
    dsa_cfg = DSAConfig(strategy=cfg.dsa_strategy)
    dsa = DSA(dsa_cfg if train.info.flip_ok else dsa_cfg.without_flip())
    start = time.perf_counter()
    trajectories = []
    for seed in spec.seeds:
        torch.manual_seed(seed)
        net = build_model(model_spec)
        opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        gen = torch.Generator().manual_seed(seed)
        timestamps = [[p.detach().cpu().clone() for p in net.parameters()]]
        for _ in range(cfg.epochs):
            train_epoch(net, opt, train.images, train.labels, batch_size=cfg.batch_size, generator=gen,
                        device=torch.device("cpu"), augment=lambda x, g: dsa(x, generator=g))
            evaluate_model(net, test.images, test.labels, device=torch.device("cpu"))
            timestamps.append([p.detach().cpu().clone() for p in net.parameters()])
        trajectories.append(timestamps)
    torch.save(trajectories, out_dir / "replay_buffer_0.pt")
    return time.perf_counter() - start


def farm_run(spec: FarmSpec, data, workers: int, cpus: float, root: Path) -> float:
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        run_spec = FarmSpec.from_dict({**spec.to_dict(), "store": str(root), "workers": workers,
                                       "cpus_per_worker": cpus})
        start = time.perf_counter()
        report = farm(run_spec, progress=False, data=data)
        elapsed = time.perf_counter() - start
        assert len(report.trained) == spec.trajectories
        return elapsed
    finally:
        ray.shutdown()


def store_table(param_count_spec: FarmSpec, data, epochs: int, tmp: Path) -> list[tuple]:
    """Bytes per trajectory and random-epoch read time: Arrow (f32, f16) vs torch.save nested lists."""
    net = build_model(model_spec_for(param_count_spec, data.info))
    layout = ParamLayout.of_parameters(net)
    gen = torch.Generator().manual_seed(0)
    snaps = [torch.randn(layout.numel, generator=gen) * 0.05 for _ in range(epochs + 1)]
    rows = []
    # torch.save of a nested list of per-layer tensors (reference format)
    nested = [[t.clone() for t in layout.unflatten(s).values()] for s in snaps]
    pt = tmp / "expert.pt"
    torch.save([nested], pt)
    reads = []
    for _ in range(5):
        t0 = time.perf_counter()
        loaded = torch.load(pt, weights_only=True)
        _ = torch.cat([p.reshape(-1) for p in loaded[0][random.randrange(epochs + 1)]])
        reads.append(time.perf_counter() - t0)
    rows.append(("torch.save (nested list)", pt.stat().st_size, statistics.median(reads)))
    for dtype in ("float32", "float16"):
        store = TrajectoryStore(tmp / f"store-{dtype}")
        with store.writer(trajectory_id=f"bench{dtype}", kind="expert", recipe="expert", recipe_config={},
                          seed=0, model=model_spec_for(param_count_spec, data.info).to_dict(),
                          param_layout=layout.to_list(), dtype=dtype, dataset={"name": data.info["name"]}) as w:
            for e, s in enumerate(snaps):
                w.append(e, s)
        size = sum(p.stat().st_size for p in (tmp / f"store-{dtype}").rglob("*.arrow"))
        reads = []
        for _ in range(20):
            t0 = time.perf_counter()
            traj = store.open(f"bench{dtype}")
            _ = traj.params(random.randrange(epochs + 1))
            reads.append(time.perf_counter() - t0)
            traj.close()
        rows.append((f"Arrow store ({dtype}, open + 1 epoch)", size, statistics.median(reads)))
    return rows


def verified_read_table(spec: ModelSpec, epochs: int, tmp: Path, reads: int = 300) -> list[tuple]:
    """Open + read one random epoch + use it (sum), from a fresh open each time: the snapshot's crc32
    checked (every read a method makes) vs not checked (``verify=False``, measurements only) vs
    torch.load of the reference's whole nested-list file. Median wall and CPU ms."""
    net = build_model(spec)
    layout = ParamLayout.of_parameters(net)
    gen = torch.Generator().manual_seed(0)
    snaps = [torch.randn(layout.numel, generator=gen) * 0.05 for _ in range(epochs + 1)]
    store = TrajectoryStore(tmp / "store-verify")
    with store.writer(trajectory_id="verify", kind="expert", recipe="expert", recipe_config={}, seed=0,
                      model=spec.to_dict(), param_layout=layout.to_list(), dtype="float32",
                      dataset={"name": "cifar10"}) as w:
        for e, s in enumerate(snaps):
            w.append(e, s)
    pt = tmp / "verify.pt"
    torch.save([[[t.clone() for t in layout.unflatten(s).values()] for s in snaps]], pt)
    rng = random.Random(0)

    def arrow(verify: bool) -> None:
        traj = store.open("verify")
        float(traj.params(rng.randrange(epochs + 1), verify=verify).sum())
        traj.close()

    def pickle_load(_: bool) -> None:
        loaded = torch.load(pt, weights_only=True)
        float(torch.cat([p.reshape(-1) for p in loaded[0][rng.randrange(epochs + 1)]]).sum())

    cases = (("Arrow, crc32 checked (what methods read)", arrow, True),
             ("Arrow, not checked (verify=False)", arrow, False),
             ("torch.load of the whole file (reference)", pickle_load, False))
    times: dict[str, tuple[list, list]] = {name: ([], []) for name, _, _ in cases}
    for i in range(reads):  # interleaved, so that every case sees the same machine load
        for name, fn, verify in cases:
            if fn is pickle_load and i % (reads // 10) != 0:
                continue  # ~100 ms each: 10 of them
            t0, c0 = time.perf_counter(), time.process_time()
            fn(verify)
            times[name][0].append(time.perf_counter() - t0)
            times[name][1].append(time.process_time() - c0)
    return [(name, statistics.median(wall), statistics.median(cpu)) for name, (wall, cpu) in times.items()]


def print_verified_reads(epochs: int, tmp: Path) -> None:
    from raydd.store.reader import crc32_bytes

    spec = ModelSpec()  # ConvNet-3 width 128 on 32x32x3, 10 classes: a CIFAR-10 expert
    rows = verified_read_table(spec, epochs, tmp)
    params = ParamLayout.of_parameters(build_model(spec)).numel
    print(f"# verified reads: one ConvNet-3 width-128 CIFAR-10 expert ({params} params, {4 * params / 2**20:.2f} "
          f"MiB per epoch), {epochs + 1} snapshots; open + one random epoch + sum, median of fresh opens; "
          f"crc32 by {crc32_bytes.__module__}")
    print(f"{'read':<44}{'wall ms':>9}{'CPU ms':>9}{'vs unchecked':>14}")
    base = rows[1]
    for name, wall, cpu in rows:
        print(f"{name:<44}{1000 * wall:>9.3f}{1000 * cpu:>9.3f}{cpu / base[2]:>13.2f}x")
    checked = rows[0]
    print(f"\nchecked / unchecked CPU: {checked[2] / base[2]:.2f}x (target <= 1.2x); checked read "
          f"{1000 * checked[1]:.3f} ms wall (target < 1 ms); torch.load of the whole file "
          f"{rows[2][2] / checked[2]:.0f}x the CPU of a checked read\n")


def _pack_tasks(args, width: int, k: int):
    from raydd.farm.task import data_fingerprint, plan_tasks

    root = data_root_for(args.dataset, args.data_root)
    spec = FarmSpec(store="unused", dataset=args.dataset, data_root=root, train_per_class=args.train_per_class,
                    recipe_options={"epochs": args.epochs}, model={"width": width}, trajectories=k,
                    device=args.device)
    data = prepare_data(spec)
    return data, plan_tasks(spec, data, data_fingerprint(data))


def _clock(device: str):
    """CPU seconds on CPU (one thread: the worker's own work); synchronised wall seconds on CUDA."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def pack_child(args) -> None:
    """One of K concurrent worker processes (each its own CUDA context, like K fractional-GPU actors): warm
    up, say ready, wait for 'go' on stdin, train expert ``--pack-index``, print when it finished."""
    import dataclasses
    import json

    from raydd.farm.task import run_trajectories

    torch.set_num_threads(1)
    data, tasks = _pack_tasks(args, args.widths[0], args.pack_sizes[0])
    task = tasks[args.pack_index]
    tmp = Path(tempfile.mkdtemp(prefix="raydd-pack-child-"))
    try:
        warm = dataclasses.replace(task, recipe_config={**task.recipe_config, "epochs": 1})
        run_trajectories([warm], data, device=args.device, store=TrajectoryStore(tmp / "warm-up"))
        print("ready", flush=True)
        sys.stdin.readline()
        run_trajectories([task], data, device=args.device, store=TrajectoryStore(tmp / "run"))
        print(json.dumps({"end": time.time()}), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def concurrent_processes(args, width: int, k: int) -> float:
    """Seconds from 'go' until the last of K warmed-up worker processes has trained its one expert."""
    import json
    import subprocess

    cmd = [sys.executable, __file__, "--part", "pack-child", "--dataset", args.dataset, "--data-root",
           args.data_root, "--train-per-class", str(args.train_per_class or 0), "--epochs", str(args.epochs),
           "--widths", str(width), "--pack-sizes", str(k), "--device", args.device]
    children = [subprocess.Popen(cmd + ["--pack-index", str(i)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True) for i in range(k)]
    try:
        for child in children:
            if child.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a worker process failed before training (exit {child.wait()})")
        go = time.time()
        for child in children:
            child.stdin.write("go\n")
            child.stdin.flush()
        ends = [json.loads(child.stdout.readline())["end"] for child in children]
        for child in children:
            if child.wait() != 0:
                raise RuntimeError(f"a worker process failed (exit {child.returncode})")
        return max(ends) - go
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()


def pack_table(args) -> None:
    """Experts/hour of one worker: K experts as one computation vs one at a time (CPU seconds, one thread;
    on CUDA wall seconds), and with --processes K concurrent single-expert worker processes."""
    from raydd.farm.task import run_trajectories

    torch.set_num_threads(1)
    cuda = args.device.startswith("cuda")
    unit = "wall s" if cuda else "CPU s"
    where = torch.cuda.get_device_name(args.device) if cuda else "one thread, CPU s"
    print(f"# packed experts: {args.dataset} ({args.train_per_class or 'all'}/class), {args.epochs} epoch(s) each, "
          f"{where}; each expert's test-set evaluation included" + (
              "; K processes: K warmed-up worker processes, one expert each, started together (each its own "
              "CUDA context, like K fractional-GPU actors)" if args.processes else "") + "\n")
    head = f"{'width':>6}{'K':>4}{f'alone {unit}':>14}{f'packed {unit}':>15}"
    head += f"{'K procs wall s':>16}" if args.processes else ""
    head += f"{'experts/h alone':>17}{'experts/h packed':>18}{'packed speed-up':>17}"
    head += f"{'experts/h K procs':>19}{'procs speed-up':>16}" if args.processes else ""
    print(head)
    for width in args.widths:
        for k in args.pack_sizes:
            data, tasks = _pack_tasks(args, width, k)
            tmp = Path(tempfile.mkdtemp(prefix="raydd-pack-"))
            try:
                run_trajectories(tasks[:1], data, device=args.device, store=TrajectoryStore(tmp / "warm-up"))
                c0 = _clock(args.device)
                for task in tasks:
                    run_trajectories([task], data, device=args.device, store=TrajectoryStore(tmp / "alone"))
                alone = _clock(args.device) - c0
                c0 = _clock(args.device)
                run_trajectories(tasks, data, device=args.device, store=TrajectoryStore(tmp / "packed"))
                packed = _clock(args.device) - c0
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            procs = concurrent_processes(args, width, k) if args.processes else None
            line = f"{width:>6}{k:>4}{alone:>14.1f}{packed:>15.1f}"
            line += f"{procs:>16.1f}" if procs is not None else ""
            line += f"{3600 * k / alone:>17.0f}{3600 * k / packed:>18.0f}{alone / packed:>16.2f}x"
            line += f"{3600 * k / procs:>19.0f}{alone / procs:>15.2f}x" if procs is not None else ""
            print(line, flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--data-root", default=os.environ.get("RAYDD_DATA", "../shared/datasets"))
    p.add_argument("--train-per-class", type=int, default=300, help="images per class (0: the whole split)")
    p.add_argument("--trajectories", type=int, default=4)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--store-epochs", type=int, default=50, help="snapshots for the store-size table (MTT: 50)")
    p.add_argument("--part", choices=("all", "farm", "store", "pack", "pack-child"), default="all",
                   help="store: only the store tables (no farming; seconds); pack: only the packed-experts table")
    p.add_argument("--pack-sizes", dest="pack_sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--widths", type=int, nargs="+", default=[32, 128], help="--part pack: network widths")
    p.add_argument("--device", default="cpu", help="--part pack: cpu (CPU seconds, one thread) or cuda (wall s)")
    p.add_argument("--processes", action="store_true",
                   help="--part pack: also K concurrent worker processes of one expert each")
    p.add_argument("--pack-index", dest="pack_index", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.train_per_class == 0:
        args.train_per_class = None  # the whole training split
    if args.part == "pack":
        return pack_table(args)
    if args.part == "pack-child":
        return pack_child(args)
    if args.part == "store":
        tmp = Path(tempfile.mkdtemp(prefix="raydd-bench-"))
        try:
            print_verified_reads(args.store_epochs, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    root = data_root_for(args.dataset, args.data_root)
    spec = FarmSpec(store="unused", dataset=args.dataset, data_root=root, train_per_class=args.train_per_class,
                    recipe_options={"epochs": args.epochs}, model={"width": args.width},
                    trajectories=args.trajectories)
    data = prepare_data(spec)
    k = args.trajectories
    print(f"# farm benchmark: {k} experts, {args.dataset} ({len(data.train_labels)} train images), "
          f"ConvNet-3 width {args.width}, {args.epochs} epochs, {os.cpu_count()} CPU cores\n")
    tmp = Path(tempfile.mkdtemp(prefix="raydd-bench-"))
    try:
        seq = sequential_loop(spec, data, tmp)
        one = farm_run(spec, data, workers=1, cpus=float(os.cpu_count() or 1), root=tmp / "farm1")
        two = farm_run(spec, data, workers=2, cpus=max(1.0, (os.cpu_count() or 2) / 2), root=tmp / "farm2")
        print(f"{'runner':<34}{'wall s':>9}{'traj/h':>10}{'vs sequential':>15}")
        for name, t in (("sequential loop (MTT buffer.py)", seq), ("raydd farm, 1 worker", one),
                        ("raydd farm, 2 workers", two)):
            print(f"{name:<34}{t:>9.1f}{3600 * k / t:>10.1f}{seq / t:>14.2f}x")
        print(f"\nfarm overhead at 1 worker: {100 * (one / seq - 1):+.1f}% (target <= +5%); "
              f"2 workers vs sequential: {seq / two:.2f}x (target >= 1.0x)\n")
        full = FarmSpec(store="unused", dataset=args.dataset, data_root=root, model={"width": 128})
        rows = store_table(full, data, args.store_epochs, tmp)
        print(f"# store: one ConvNet-3 width-128 expert, {args.store_epochs + 1} snapshots")
        print(f"{'format':<40}{'MiB':>9}{'vs torch.save':>15}{'read ms':>10}")
        base_size, base_read = rows[0][1], rows[0][2]
        for name, size, read in rows:
            print(f"{name:<40}{size / 2**20:>9.1f}{size / base_size:>14.2f}x{1000 * read:>10.2f}")
        print(f"\nreading one random epoch: torch.load of the whole file {1000 * base_read:.1f} ms vs "
              f"Arrow memory map {1000 * rows[1][2]:.2f} ms ({base_read / rows[1][2]:.0f}x faster)\n")
        if args.part == "all":
            print_verified_reads(args.store_epochs, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
