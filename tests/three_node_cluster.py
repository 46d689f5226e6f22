"""A three-node Ray cluster on this machine (``ray.cluster_utils.Cluster``: a head and two worker nodes, one CPU
each), run in its own process so the test session's Ray is untouched. Prints the cluster's address, then obeys
lines on stdin: ``remove`` kills the first remaining worker node without grace (its raylet and every process on
it: a lost node) and prints ``removed``; ``add`` adds a worker node and prints ``added`` once it is up; ``quit``
(or the end of stdin) shuts the cluster down."""
from __future__ import annotations

import signal
import sys

from ray.cluster_utils import Cluster


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # shut the cluster down (finally) when terminated
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    print(cluster.address, flush=True)
    try:
        for line in sys.stdin:
            if line.strip() == "remove" and workers:
                cluster.remove_node(workers.pop(0), allow_graceful=False)
                print("removed", flush=True)
            elif line.strip() == "add":
                workers.append(cluster.add_node(num_cpus=1))
                cluster.wait_for_nodes()
                print("added", flush=True)
            elif line.strip() == "quit":
                break
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
