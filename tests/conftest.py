"""Shared fixtures. Ray is started once per test session (2 CPUs) and shut down at the end."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_session():
    ray = pytest.importorskip("ray")
    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
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
