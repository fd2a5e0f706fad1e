"""A Ray node removed under the gateway and added back (issue 13 item 3): a multi-node Ray
cluster on this machine (ray.cluster_utils.Cluster, as Ray's own tests build one: a head without
CPUs and two one-CPU worker nodes, each its own raylet), one tail replica per worker node, a real
agent streaming real frames through `serve --backend ray`."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from edgesplit.bundle import Bundle
from edgesplit.edge.agent import Agent
from edgesplit.server.daemon import Server

ray = pytest.importorskip("ray", reason="the 'ray' extra (ray[serve]) is not installed")
serve = pytest.importorskip("ray.serve")

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT / "models" / "cifar10-resnet20-bottlefit"


def replicas_on(app: str) -> int:
    from edgesplit.server.ray_app import DEPLOYMENT

    st = serve.status().applications.get(app)
    d = None if st is None else st.deployments.get(DEPLOYMENT)
    return 0 if d is None else int(d.replica_states.get("RUNNING", 0))


def test_node_removed_mid_stream_and_added_back(cifar_samples):
    from ray.cluster_utils import Cluster

    from edgesplit.server.ray_app import build

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        serve.start(proxy_location="Disabled")
        app = build({"bundle": str(CIFAR), "threads": 1, "num_replicas": 2, "num_cpus": 1})
        serve.run(app, name="tails", route_prefix=None)
        assert replicas_on("tails") == 2  # one per worker node: each has one CPU
        bundle = Bundle.load(CIFAR)
        samples = cifar_samples * 3
        results = []
        with Server([bundle], "tcp://127.0.0.1:0", backend="ray", ray_app="tails") as gw:
            with Agent(bundle, gw.endpoint, inflight=4, threads=1, timeout_s=60) as agent:
                for r in agent.run(samples):
                    results.append(r)
                    if len(results) == 8:
                        cluster.remove_node(nodes[0])  # its raylet and the replica on it are gone
                ids = [r.id for r in results]
                assert len(ids) == len(set(ids)) == len(samples)
                assert all(r.ok and r.source == "server" for r in results), [r.to_json() for r in results if not r.ok]
                # the lost replica cannot come back until a node with a free CPU does
                t_end = time.monotonic() + 60
                while replicas_on("tails") == 2 and time.monotonic() < t_end:
                    time.sleep(0.5)
                assert replicas_on("tails") == 1
                nodes[0] = cluster.add_node(num_cpus=1)
                t_end = time.monotonic() + 120
                while replicas_on("tails") < 2 and time.monotonic() < t_end:
                    time.sleep(0.5)
                assert replicas_on("tails") == 2
                again = list(agent.run(cifar_samples[:8]))
            assert all(r.ok and r.source == "server" for r in again)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()
