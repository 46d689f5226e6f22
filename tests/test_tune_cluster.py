"""A sweep on a two-node Ray cluster (head + 1 worker, 1 CPU each) reading one shared store.

The cluster runs in a subprocess: it needs its own Ray instance, which must not clash with
the session's (tests/conftest.py ``ray_session``) in this process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from test_tune import EVAL, make_expert_store

SCRIPT = textwrap.dedent("""
    import json, sys
    import ray
    from ray.cluster_utils import Cluster
    from raydd.sweep.spec import SweepSpec
    from raydd.sweep.runner import run_sweep

    store, storage, eval_cfg = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    try:
        spec = SweepSpec.from_dict({
            "name": "two-nodes", "dataset": "digits", "store": store, "methods": ["mtt"], "ipcs": [1],
            "iterations": 2, "eval_every": 2, "eval": eval_cfg,
            "knobs": {"mtt": {"syn_steps": {"grid": [2, 3]}, "max_start_epoch": 1, "expert_epochs": 1}},
            "scheduler": {"type": "fifo"}, "resources": {"cpu": 1, "gpu": 0}, "storage": storage,
        })
        result = run_sweep(spec, progress=False)
        print("RESULT " + json.dumps({
            "nodes": len([n for n in ray.nodes() if n["Alive"]]),
            "trials": [{k: t[k] for k in ("iterations", "error", "node_id", "acc_mean")} for t in result.trials],
            "rows": len(result.rows), "csv": result.leaderboard_csv}))
    finally:
        ray.shutdown()
        cluster.shutdown()
""")


def test_two_node_cluster_sweep_reads_one_shared_store(tmp_path_factory, tmp_path):
    store = make_expert_store(tmp_path_factory.getbasetemp() / "tune_expert_store")
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-c", SCRIPT, store, str(tmp_path / "sweeps"), json.dumps(EVAL)],
                         capture_output=True, text=True, timeout=300, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and lines, (out.stdout[-3000:], out.stderr[-3000:])
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["nodes"] == 2 and result["rows"] == 1
    trials = result["trials"]
    assert len(trials) == 2 and all(t["iterations"] == 2 and not t["error"] for t in trials)
    assert len({t["node_id"] for t in trials}) == 2  # one trial per node (1 CPU each), same store
    assert os.path.exists(result["csv"])
