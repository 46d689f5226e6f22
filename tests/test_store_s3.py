"""The trajectory store on S3, against a local moto server (127.0.0.1 only)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("moto.server", reason="moto[server] is not installed")
pytest.importorskip("boto3", reason="boto3 is not installed")

import pyarrow.fs as pafs  # noqa: E402

from raydd.store import CorruptTrajectoryError, CorruptTrajectoryWarning, TrajectoryStore  # noqa: E402
from raydd.store.cli import format_ls  # noqa: E402
from conftest import moto_s3  # noqa: E402

BUCKET = "trajectories"
LAYOUT = [("fc.weight", [10, 8]), ("fc.bias", [10])]
NUM_PARAMS = 90


@pytest.fixture(scope="module")
def s3_endpoint():
    """(endpoint "127.0.0.1:PORT", boto3 client) of a fresh moto server with one bucket."""
    with pytest.MonkeyPatch.context() as mp, moto_s3(mp, BUCKET) as (endpoint, client):
        yield endpoint, client


def keys(client, prefix):
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", []))


def write(store, tid, *, seed, dtype="float16"):
    gen = torch.Generator().manual_seed(seed)
    written = {}
    with store.writer(trajectory_id=tid, kind="expert", recipe="mtt", recipe_config={"lr": 0.01}, seed=seed,
                      model={"name": "mlp"}, param_layout=LAYOUT, buffer_layout=[("bn.running_mean", [4])],
                      dtype=dtype, dataset={"name": "digits"}, metric_names=["test_acc"]) as w:
        for epoch in range(3):
            written[epoch] = torch.randn(NUM_PARAMS, generator=gen).to(getattr(torch, dtype))
            w.append(epoch, written[epoch], buffers=torch.full((4,), float(epoch)), metrics={"test_acc": epoch / 3})
    return written


def test_store_on_s3_with_explicit_filesystem(s3_endpoint):
    endpoint, client = s3_endpoint
    fs = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", access_key="testing",
                           secret_key="testing", region="us-east-1")
    store = TrajectoryStore(f"s3://{BUCKET}/explicit", filesystem=fs)
    written = write(store, "s3traj1", seed=1)

    # exactly one object, at the final key: no temp files, no directory markers
    assert keys(client, "explicit/") == ["explicit/digits/mlp/expert/s3traj1.arrow"]
    assert store.exists("s3traj1") and not store.exists("missing")
    (info,) = store.list(kind="expert")
    assert info.path == f"{BUCKET}/explicit/digits/mlp/expert/s3traj1.arrow" and info.epochs == [0, 1, 2]
    with store.open("s3traj1") as traj:
        for epoch, params in written.items():
            assert torch.equal(traj.params(epoch, verify=True).view(torch.int16), params.view(torch.int16))
        assert torch.equal(traj.buffers(2), torch.full((4,), 2.0))
        assert traj.state_dict(1)["fc.weight"].shape == (10, 8)
        assert [m["epoch"] for m in traj.metrics()] == [0, 1, 2]
        traj.params(0).add_(1)  # copies from S3 are writable, no warning
    assert [r.ok for r in store.verify()] == [True]
    assert "s3traj1" in format_ls(store)

    # an aborted write leaves nothing
    with pytest.raises(RuntimeError):
        with store.writer(trajectory_id="s3aborted", kind="expert", recipe="mtt", recipe_config={}, seed=0,
                          model={"name": "mlp"}, param_layout=LAYOUT, dataset={"name": "digits"}) as w:
            w.append(0, torch.zeros(NUM_PARAMS))
            raise RuntimeError("crash")
    assert keys(client, "explicit/") == ["explicit/digits/mlp/expert/s3traj1.arrow"]

    # a truncated object is rejected everywhere
    body = client.get_object(Bucket=BUCKET, Key="explicit/digits/mlp/expert/s3traj1.arrow")["Body"].read()
    client.put_object(Bucket=BUCKET, Key="explicit/digits/mlp/expert/s3bad.arrow", Body=body[: len(body) // 2])
    with pytest.raises(CorruptTrajectoryError):
        store.open("s3bad")
    with pytest.warns(CorruptTrajectoryWarning, match="s3bad"):
        assert [i.trajectory_id for i in store.list()] == ["s3traj1"]
    assert {r.trajectory_id: r.ok for r in store.verify()} == {"s3traj1": True, "s3bad": False}


def test_store_on_s3_from_uri_alone(s3_endpoint):
    endpoint, client = s3_endpoint
    store = TrajectoryStore(f"s3://{BUCKET}/byuri?endpoint_override={endpoint}&scheme=http&region=us-east-1")
    assert isinstance(store.filesystem, pafs.S3FileSystem)
    written = write(store, "s3traj2", seed=2, dtype="bfloat16")
    assert keys(client, "byuri/") == ["byuri/digits/mlp/expert/s3traj2.arrow"]
    assert [i.trajectory_id for i in store.list()] == ["s3traj2"]
    with store.open("s3traj2") as traj:
        assert torch.equal(traj.params(2).view(torch.int16), written[2].view(torch.int16))


def test_two_farms_into_one_s3_store_train_each_trajectory_once(s3_endpoint):
    """Claims on an object store (check, put, read back): two farms started together into the same S3
    prefix train every trajectory once, publish each as one object, and leave no claim behind."""
    import threading

    from raydd.farm import FarmSpec, farm

    endpoint, client = s3_endpoint
    uri = f"s3://{BUCKET}/farmed?endpoint_override={endpoint}&scheme=http&region=us-east-1"
    spec = FarmSpec(store=uri, dataset="digits", recipe="expert", recipe_options={"epochs": 2, "batch_size": 128},
                    model={"width": 8, "depth": 2}, train_per_class=20, trajectories=3, backend="local")
    reports: list = []
    threads = [threading.Thread(target=lambda: reports.append(farm(spec, progress=False))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    trained = sorted(r.trajectory_id for report in reports for r in report.trained)
    assert trained == sorted(reports[0].trajectory_ids)  # each once
    objects = [k.rsplit("/", 1)[1] for k in keys(client, "farmed/") if not k.endswith("/")]  # pyarrow's delete_file
    assert objects == sorted(f"{t}.arrow" for t in trained)  # leaves empty "directory" markers: not files
