"""Shared fixtures. Ray is started once per test session (2 CPUs) and shut down at the end."""
from __future__ import annotations

import contextlib
import json
import os

import pytest
import torch

os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_session():
    ray = pytest.importorskip("ray")
    started = False
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, logging_level="ERROR",
                 log_to_driver=False)  # its own Ray, never a cluster another test started
        started = True
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def digits():
    from raydd.data.datasets import load_train_test

    return load_train_test("digits")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never write into the user's cache directory from tests."""
    monkeypatch.setenv("RAYDD_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@contextlib.contextmanager
def one_torch_thread():
    """Tiny convolutions run several times slower with 2 intra-op threads on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a whole module (``pytestmark = pytest.mark.usefixtures("single_thread")``)."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def one_thread():
    """``with one_thread():`` one intra-op thread for a block (the ``one_torch_thread`` context manager)."""
    return one_torch_thread


@pytest.fixture(scope="session")
def farm_digits_experts():
    """``farm_digits_experts(root, zca=False, trajectories=2, epochs=6)`` farms depth-2 width-16 expert
    ConvNets on digits into ``root`` with one thread (ids already stored are skipped) -> TrajectoryStore.

    Depth 2: a depth-3 ConvNet instance-normalises 2x2 maps on 8x8 digits and matching turns erratic.
    """
    from raydd.farm import FarmSpec, farm
    from raydd.store import TrajectoryStore

    def run(root, *, zca: bool = False, trajectories: int = 2, epochs: int = 6):
        with one_torch_thread():
            farm(FarmSpec(store=str(root), dataset="digits", backend="local", trajectories=trajectories, zca=zca,
                          recipe="expert", recipe_options={"epochs": epochs, "batch_size": 64},
                          model={"width": 16, "depth": 2}), progress=False)
        return TrajectoryStore(root)

    return run


@pytest.fixture(scope="session")
def digits_experts(tmp_path_factory, farm_digits_experts):
    """Epochs 0..6 of two expert ConvNets on digits (test_mtt, test_datm, test_datm_clr, test_evaluate)."""
    return farm_digits_experts(tmp_path_factory.getbasetemp() / "digits_experts")


@pytest.fixture(scope="session")
def pretrain_experts(tmp_path_factory):
    """Two DANCE/PTLM pre-trained experts on digits (test_dance, test_ptlm).

    Depth 2 and lr 0.05: 3 epochs reach ~90% test accuracy (depth 3 instance-normalises 2x2 maps on
    8x8 digits and stays near chance), so calibration and pseudo-labels see meaningful experts.
    """
    from raydd.farm import FarmSpec, farm
    from raydd.store import TrajectoryStore

    root = tmp_path_factory.getbasetemp() / "pretrain_experts"
    with one_torch_thread():
        farm(FarmSpec(store=str(root), dataset="digits", recipe="pretrain", backend="local", trajectories=2,
                      recipe_options={"epochs": 3, "batch_size": 64, "lr": 0.05}, model={"width": 16, "depth": 2}),
             progress=False)
    return TrajectoryStore(root)


@pytest.fixture(scope="session")
def ssd_store(tmp_path_factory):
    """(store, teacher id): a FixMatch teacher and 2 dual-consistency students on digits with 2 % labels
    (3 labelled images per class), depth-2 ConvNets (test_ssd, test_paper_equations)."""
    from raydd.farm import FarmSpec, farm, prepare_data
    from raydd.store import TrajectoryStore

    root = str(tmp_path_factory.mktemp("ssd_method") / "store")
    common = dict(dataset="digits", model={"width": 16, "depth": 2}, backend="local")
    teacher = FarmSpec(store=root, recipe="ssd_teacher", trajectories=1, **common, recipe_options={
        "epochs": 3, "batch_size": 16, "mu": 4, "steps_per_epoch": 8, "ema_decay": 0.9, "eval_every": 3,
        "labelled_fraction": 0.02})
    data = prepare_data(teacher)
    tid = farm(teacher, progress=False, data=data).trajectory_ids[0]
    students = FarmSpec(store=root, recipe="ssd_student", trajectories=2, **common,
                        recipe_options={"epochs": 3, "batch_size": 64, "labelled_fraction": 0.02})
    farm(students, progress=False, data=data)
    return TrajectoryStore(root), tid


S3_CREDENTIALS = {  # a moto server's; never look for real ones
    "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
}


@contextlib.contextmanager
def moto_s3(monkeypatch, bucket: str):
    """A fresh moto S3 server on 127.0.0.1 with one bucket and its credentials in the environment:
    yields (endpoint "127.0.0.1:PORT", boto3 client)."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed")
    boto3 = pytest.importorskip("boto3", reason="boto3 is not installed")
    for key, value in S3_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        client = boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1")
        client.create_bucket(Bucket=bucket)
        yield f"{host}:{port}", client
    finally:
        server.stop()


def checkpointed(trial) -> int:
    """The iteration of a trial's newest checkpoint in its directory (written by the trial as it reports,
    unlike result.json, which Tune's driver copies there every few seconds), 0 if none."""
    found = [0]
    for state in trial.glob("checkpoint_*/trial.json"):
        try:
            found.append(int(json.loads(state.read_text())["last"]["iterations"]))
        except (OSError, ValueError, KeyError):
            pass  # a checkpoint cut short by the kill
    return max(found)
