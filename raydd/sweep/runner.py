"""Running a sweep: checks before Ray starts, farming what the methods need, the Tune run, the results.

``run_sweep(spec)`` checks what can be checked without Ray (the store holds what every method's
config says it reads — ``MethodConfig.needs()`` —, one model per method where the spec farmed one),
joins or starts Ray, fails fast on resources the cluster cannot give, runs every trial of the spec
with Tune (``condensation_trainable``; grouped ASHA), and writes the leaderboard
(``raydd.sweep.leaderboard``). ``farm_for_sweep`` farms the spec's ``farm:`` section, and for every
method whose needs that section does not cover, what its needs declare.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pyarrow.fs as pafs
import ray
from ray import tune

from ..data.datasets import ImageDataset, load_dataset
from ..methods import StoreInputs, get_method, make_config
from ..plan import plan_run
from ..validation import check_ray_address, check_writable
from .leaderboard import SweepResult, load_finished, summarize, write_text
from .progress import ScalarTBXLogger, SweepProgress, tune_console
from .scheduler import DECISIONS_FILE, grouped_asha
from .space import param_space
from .spec import Knob, SweepSpec
from .trial import METRIC, MODE, condensation_trainable


class SweepResourceError(ValueError):
    """The cluster can never run the requested trials (e.g. GPUs asked on a GPU-less cluster)."""


# --------------------------------------------------------------------------- before Ray
def _absolute(location: str) -> str:
    return location if "://" in location else str(Path(location).expanduser().resolve())


def _constant_knobs(arm: dict[str, Any]) -> dict[str, Any]:
    """An arm's method knobs with sampled ones at their first candidate (what the store checks assume)."""
    return {k: v.first if isinstance(v, Knob) else v for k, v in arm["method_knobs"].items()}


def farmed_models(spec: SweepSpec, train: ImageDataset) -> dict[str, str]:
    """{recipe: model name} for every recipe the spec's farm section farms with exactly one model."""
    from ..farm.task import model_spec_for

    names: dict[str, set[str]] = {}
    for farm_spec in spec.farm_specs():
        names.setdefault(farm_spec.recipe, set()).add(model_spec_for(farm_spec, train.info.to_dict()).name)
    return {recipe: next(iter(n)) for recipe, n in names.items() if len(n) == 1}


def pinned_models(spec: SweepSpec, train: ImageDataset) -> dict[str, dict[str, Any]]:
    """{method: {"model": name}}: a method that does not choose its model reads the one the spec farms for it
    (a store that also holds other models then stays unambiguous)."""
    models = farmed_models(spec, train)
    pinned: dict[str, dict[str, Any]] = {}
    for method in spec.methods:
        config_cls = get_method(method).config_cls
        chosen = any(target == ("method", "model") for target in getattr(spec, "targets", {}).get(method, {}).values())
        if "model" not in config_cls.knobs() or chosen:
            continue
        probe = make_config(method, spec.dataset, spec.ipcs[0]).with_overrides(model="?")  # which needs it filters
        recipes = {n.recipe for n in probe.needs() if n.model == "?"}
        found = {models[r] for r in recipes if r in models}
        if len(found) == 1:
            pinned[method] = {"model": found.pop()}
    return pinned


def check_data(spec: SweepSpec, train: ImageDataset) -> None:
    """Every trial's method accepts the training data at its IPC (``check_data``: IPC against the smallest
    class, ...); a one-line ValueError names the method, the IPC and the limit."""
    for arm in spec.arms():
        for ipc in spec.ipcs:
            config = make_config(arm["method"], spec.dataset, ipc, **_constant_knobs(arm))
            try:
                get_method(arm["method"]).check_data(config, train)
            except ValueError as err:
                raise ValueError(f"method {arm['method']!r} at IPC {ipc}: {err}") from None


def check_store(spec: SweepSpec, store_root: str, train: ImageDataset,
                pinned: dict[str, dict[str, Any]] | None = None) -> None:
    """Every trial finds what its method reads in the store (``needs()``, with the checks methods make:
    kinds, model, ZCA space, one model, fit to the data); a one-line ValueError names the farm command."""
    from ..store import TrajectoryStore

    store = TrajectoryStore(store_root)
    checked = set()
    for arm in spec.arms(pinned):
        method = arm["method"]
        for ipc in spec.ipcs:
            config = make_config(method, spec.dataset, ipc, **_constant_knobs(arm))
            inputs = StoreInputs(store, train, spec.dataset, config.needs())
            for need in config.needs():
                if need in checked:
                    continue
                checked.add(need)
                if not inputs.list(need):
                    kinds = " or ".join(repr(k) for k in need.store_kinds())
                    raise ValueError(f"method {method!r} needs {kinds} trajectories of {spec.dataset} but store "
                                     f"{store.root} has none: farm them first ({inputs.farm_command(need)}), or add "
                                     f"'farm: {{{need.recipe}: {{...}}}}' to the spec and run with --farm (or "
                                     f"sweeps/submit.py)")
                try:
                    inputs.find(need)
                except ValueError as err:
                    raise ValueError(f"method {method!r} (IPC {ipc}): {err}") from None


def farm_for_sweep(spec: SweepSpec, *, backend: str = "ray", progress: bool = True,
                   tensorboard: str | None = None) -> list:
    """Farm the spec's ``farm:`` section into the sweep's store, then whatever else its methods' needs
    declare and the store lacks (what exists is skipped); return the farm reports.

    ``tensorboard``: a local directory for the farmed trajectories' curves (unless an entry sets its own).
    """
    from ..farm import farm

    reports = []
    extra = {"backend": backend} if tensorboard is None else {"backend": backend, "tensorboard": tensorboard}
    for farm_spec in spec.farm_specs(**extra) + needs_farm_specs(spec, **extra):
        if progress:
            print(f"raydd sweep: farming {farm_spec.trajectories} x {farm_spec.recipe} on {spec.dataset} into "
                  f"{spec.store}", file=sys.stderr)
        reports.append(farm(farm_spec, progress=progress))
    return reports


def needs_farm_specs(spec: SweepSpec, **extra: Any) -> list:
    """FarmSpecs for the needs of the spec's methods that its farm section does not cover and the store
    lacks: the recipe, epochs, count and model their configs declare."""
    from ..farm.spec import FarmSpec
    from ..store import TrajectoryStore

    if spec.store is None:
        return []
    covered = set(spec.farm)
    train = load_dataset(spec.dataset, "train", spec.data_root, resolution=spec.resolution)
    store = TrajectoryStore(spec.store)
    specs, seen = [], set()
    for arm in spec.arms():
        plan = plan_run(arm["method"], spec.dataset, spec.ipcs[0], knobs=_constant_knobs(arm),
                        data_root=spec.data_root)
        inputs = StoreInputs(store, train, spec.dataset, plan.needs)
        for need in plan.needs:
            if need.recipe in covered or need in seen or inputs.list(need):
                continue
            seen.add(need)
            # a need of one trajectory leaves the count to the farm's default (farm_fields without a count)
            fields = {"store": spec.store, "dataset": spec.dataset, "data_root": plan.data_root,
                      "resolution": spec.resolution, **need.farm_fields()}
            specs.append(FarmSpec.from_dict({**fields, **extra}))
    return specs


def check_devices_here(spec: SweepSpec) -> None:
    """A sweep on a Ray cluster started here: its device and GPUs per trial must exist on this machine."""
    from ..training import check_gpus_here, resolve_device

    try:
        if spec.device != "auto":
            resolve_device(spec.device)
        check_gpus_here(spec.gpu, "resources.gpu")
    except ValueError as err:
        raise SweepResourceError(str(err)) from None


# --------------------------------------------------------------------------- Ray
def _connect(address: str | None) -> bool:
    if ray.is_initialized():
        return False
    # "local": a Ray of its own, never the one a stale /tmp/ray/ray_current_cluster names (a killed cluster's)
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    # workers log warnings and errors only (not Tune's per-checkpoint INFO lines)
    ray.init(address=address, include_dashboard=False, logging_level=logging.ERROR,
             logging_config=ray.LoggingConfig(log_level="WARNING"))
    return True


def check_cluster(spec: SweepSpec) -> int:
    """Fail fast on per-trial resources the Ray cluster cannot satisfy; return how many trials fit at once."""
    total = ray.cluster_resources()
    gpus = total.get("GPU", 0.0)
    if spec.gpu > 0 and gpus < spec.gpu:
        raise SweepResourceError(f"resources.gpu={spec.gpu:g} per trial but the Ray cluster has {gpus:g} GPU(s): "
                                 f"use gpu: 0 on a CPU-only cluster, or join a cluster with GPUs")
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    node_cpus = max((n["Resources"].get("CPU", 0.0) for n in nodes), default=0.0)
    if spec.cpu > node_cpus:
        raise SweepResourceError(f"resources.cpu={spec.cpu:g} per trial but the largest node has {node_cpus:g} CPU(s)")
    fit = int(total.get("CPU", 0.0) // spec.cpu)
    if spec.gpu > 0:
        fit = min(fit, int(gpus // spec.gpu + 1e-9))
    return max(1, fit)


def _warn_local_storage(storage: str, progress: bool) -> None:
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1 and "://" not in storage and progress:
        print(f"raydd sweep: {len(nodes)} nodes but storage {storage} is a local path: every node must mount it "
              f"(NFS), else use a URI such as s3://bucket/raydd-sweeps (--storage)", file=sys.stderr)


def _trial_dirname(trial) -> str:
    cfg = trial.config
    method = (cfg.get("arm") or {}).get("method", cfg.get("method", "trial"))
    return f"{method}_ipc{cfg.get('ipc')}_{trial.trial_id}"


def _new_tuner(spec: SweepSpec, trainable, storage: str, store, data_root, progress: bool, verbose: bool, pinned):
    space = param_space(spec, store=store, data_root=data_root, pinned=pinned)
    scheduler = None
    if spec.scheduler["type"] == "asha":
        scheduler = grouped_asha(spec.scheduler.get("grace_period"), spec.scheduler.get("reduction_factor", 3),
                                 spec.scheduler.get("max_t"), spec.scheduler.get("variant", "promotion"))
    return tune.Tuner(
        trainable, param_space=space,
        tune_config=tune.TuneConfig(metric=METRIC, mode=MODE, scheduler=scheduler, num_samples=spec.samples,
                                    max_concurrent_trials=spec.max_concurrent, trial_dirname_creator=_trial_dirname,
                                    reuse_actors=True),
        run_config=tune.RunConfig(
            name=spec.name, storage_path=storage, verbose=1 if verbose else 0,
            callbacks=([] if verbose else [SweepProgress(show=progress)]) + [ScalarTBXLogger()],
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            sync_config=tune.SyncConfig(sync_artifacts=True)))


def _fs(location: str):
    if "://" in location:
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), location


def _save_spec(spec: SweepSpec, experiment: str) -> None:
    fs, path = _fs(experiment)
    fs.create_dir(path, recursive=True)
    write_text(fs, f"{path}/sweep_spec.json", json.dumps(spec.to_dict(), indent=2, sort_keys=True))


def _forget_decisions(experiment: str) -> None:
    """A sweep interrupted before Tune saved its state starts anew under new trial ids: ASHA decisions saved for
    the old ids would count as results of trials that no longer exist."""
    fs, path = _fs(experiment)
    if fs.get_file_info(f"{path}/{DECISIONS_FILE}").type == pafs.FileType.File:
        fs.delete_file(f"{path}/{DECISIONS_FILE}")


def _check_same_spec(spec: SweepSpec, experiment: str) -> None:
    fs, path = _fs(experiment)
    target = f"{path}/sweep_spec.json"
    if fs.get_file_info(target).type != pafs.FileType.File:
        return
    with fs.open_input_stream(target) as f:
        saved = json.loads(f.read().decode())
    mine = spec.to_dict()
    ignore = {"storage"}  # everything else is fixed when the sweep starts (Tune restores its own copy)
    diff = sorted(k for k in set(saved) | set(mine) if k not in ignore and saved.get(k) != mine.get(k))
    if diff:
        raise ValueError(f"cannot resume {experiment}: the spec differs from the one it was started with in {diff}")


def check_destination(spec: SweepSpec, storage: str | None, address: str | None) -> None:
    """Before Ray starts: a local storage the sweep can write, and a cluster address that answers."""
    storage = storage or spec.storage
    if "://" not in storage:
        check_writable("--storage", storage, directory=True)
    if not ray.is_initialized():
        check_ray_address("--address" if address else "RAY_ADDRESS", address or os.environ.get("RAY_ADDRESS"))


@contextlib.contextmanager
def graceful_interrupt():
    """Ctrl-C during ``Tuner.fit`` as a stop the sweep knows of: the first one sets the yielded event and asks
    Tune to stop cleanly (its SIGUSR1: trials checkpoint, the experiment's state is saved), a second one
    raises KeyboardInterrupt. Tune's own SIGINT handler is left out (it hides the interrupt from the caller) and
    so is its "Tuner.restore" advice (raydd resumes with --resume)."""
    import signal
    import threading

    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event
        return

    def on_sigint(signum, frame):
        if event.is_set():
            raise KeyboardInterrupt
        event.set()
        os.kill(os.getpid(), signal.SIGUSR1)

    class _NoRestoreAdvice(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "Tuner.restore" not in record.getMessage()

    before_env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    previous = signal.signal(signal.SIGINT, on_sigint)
    quiet = _NoRestoreAdvice()
    tune_logger = logging.getLogger("ray.tune.tune")
    tune_logger.addFilter(quiet)
    try:
        yield event
    finally:
        tune_logger.removeFilter(quiet)
        signal.signal(signal.SIGINT, previous)
        if before_env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = before_env


def run_sweep(spec: SweepSpec, *, progress: bool = True, verbose: bool = False, resume: bool = False,
              storage: str | None = None, address: str | None = None,
              trainable: Callable[[dict], None] | None = None) -> SweepResult:
    """Run ``spec`` with Ray Tune and write the leaderboard into ``<storage>/<name>``.

    Everything checkable runs before Ray starts: the data at every trial's IPC (``check_data``), the
    store's contents per method (``check_store``). Uses the running Ray instance, else joins
    ``address`` / RAY_ADDRESS, else starts a local one (shut down again at the end). ``progress``:
    raydd's progress line (``SweepProgress``); ``verbose``: Ray Tune's status tables instead
    (both fixed when the sweep starts: a resume keeps them).

    With ``resume=True`` an interrupted sweep in the same directory continues: finished trials are
    kept (a trial whose newest checkpoint is its last reports it again, running nothing), ASHA's
    saved decisions hold (``GroupedASHA``), unfinished trials restart from their last checkpoint.
    Resuming a finished sweep runs nothing and returns its saved result. ``trainable`` replaces
    ``condensation_trainable`` (e.g. a test's wrapper that adds a fault-injecting sink).
    """
    started_at = time.perf_counter()
    storage = _absolute(storage or spec.storage)
    store = _absolute(spec.store) if spec.store else None
    data_root = _absolute(spec.data_root) if spec.data_root else None
    experiment = f"{storage.rstrip('/')}/{spec.name}"
    finished = load_finished(*_fs(experiment))
    if finished is not None:
        if not resume:
            raise ValueError(f"sweep {experiment} has finished already (leaderboard: {finished.leaderboard_md}): "
                             f"pass --resume to print it again, or choose another name/--storage")
        _check_same_spec(spec, experiment)
        if progress:
            print(f"raydd sweep: {experiment} has finished already, nothing to run; leaderboard: "
                  f"{finished.leaderboard_md}", file=sys.stderr)
        return finished
    check_destination(spec, storage, address)
    if not (address or os.environ.get("RAY_ADDRESS") or ray.is_initialized()):  # Ray will start here
        check_devices_here(spec)
    train = load_dataset(spec.dataset, "train", data_root, resolution=spec.resolution)
    check_data(spec, train)
    needy = [m for m in spec.methods for ipc in spec.ipcs if make_config(m, spec.dataset, ipc).needs()]
    pinned: dict[str, dict[str, Any]] = {}
    if needy:
        if store is None:
            raise ValueError(f"methods {sorted(set(needy))} read a trajectory store but the spec has store: null")
        pinned = pinned_models(spec, train)
        check_store(spec, store, train, pinned)
    can_restore = tune.Tuner.can_restore(experiment)
    if can_restore and not resume:
        raise ValueError(f"sweep {experiment} already exists: pass --resume to continue it, or choose another "
                         f"name/--storage")
    started = _connect(address)
    try:
        check_cluster(spec)
        _warn_local_storage(storage, progress)
        trainable = tune.with_resources(trainable or condensation_trainable, {"cpu": spec.cpu, "gpu": spec.gpu})
        if can_restore:
            _check_same_spec(spec, experiment)
            if progress:
                print(f"raydd sweep: resuming {experiment}", file=sys.stderr)
            tuner = tune.Tuner.restore(experiment, trainable, resume_errored=True)
        else:
            if resume and progress:
                print(f"raydd sweep: new sweep {experiment} (nothing to resume there)", file=sys.stderr)
            _forget_decisions(experiment)
            tuner = _new_tuner(spec, trainable, storage, store, data_root, progress, verbose, pinned)
            _save_spec(spec, experiment)
        with tune_console(verbose), graceful_interrupt() as interrupted:
            grid = tuner.fit()
        return summarize(grid, spec, wall_time_s=time.perf_counter() - started_at, interrupted=interrupted.is_set())
    finally:
        if started:
            ray.shutdown()
