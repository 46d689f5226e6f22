"""cluster.yaml is a real Ray cluster-launcher config: checked with Ray's own validator."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture(scope="module")
def config():
    return yaml.safe_load(CLUSTER.read_text())


def _validate(cfg):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cfg)))


def test_cluster_yaml_passes_rays_validator(config):
    _validate(config)


def test_cluster_has_cpu_head_gpu_workers_and_installs_raydd(config):
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert "GPU" not in head["resources"]
    assert any(t["resources"].get("GPU", 0) >= 1 and t["max_workers"] > 0 for t in types.values())
    assert any(src == "." for src in config["file_mounts"].values())  # this checkout reaches every node
    setup = "\n".join(config["setup_commands"])
    assert "pip install -e ~/raydd" in setup and "RAYDD_STORE=s3://" in setup


def test_validator_rejects_a_broken_variant(config):
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5  # must be an integer
    with pytest.raises(Exception, match="integer"):
        _validate(broken)
