"""A local Ray cluster and the bundle's tail deployed on it, for ``bench gateway`` and ``bench
gateway-kill``: one Ray node on this machine (``cpus`` CPUs), Serve without its HTTP proxy, and
tail applications (:func:`~edgesplit.server.ray_app.build`) that a gateway daemon reaches with
``serve --backend ray --ray-app NAME --ray-address GCS`` (:func:`gateway_args`)."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def local_cluster(cpus: float) -> Iterator[str]:
    """Start Ray and Serve here; yields the cluster's GCS address; shuts both down on exit."""
    import ray
    from ray import serve

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(proxy_location="Disabled")
        yield ray.get_runtime_context().gcs_address
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


def deploy_tail(bundle: str | Path, app: str, replicas: int, *, cpus: float, threads: int, max_batch: int) -> str:
    """Deploy the bundle's tail as application ``app`` with ``replicas`` replicas sharing ``cpus``
    CPUs; returns once every replica runs (Serve's ``run`` waits for them)."""
    from ray import serve

    from ..server.ray_app import build

    spec = {
        "bundle": str(Path(bundle).resolve()),
        "threads": threads,
        "max_batch": max_batch,
        "num_replicas": replicas,
        "num_cpus": cpus / replicas,
    }
    serve.run(build(spec), name=app, route_prefix=None)
    return app


def remove_app(app: str) -> None:
    """Delete an application (its replicas stop, so the next one does not share the CPUs with them)."""
    from ray import serve

    serve.delete(app)


def gateway_args(app: str, gcs: str) -> list[str]:
    """``edgesplit serve`` options that make the daemon a gateway to ``app`` on cluster ``gcs``."""
    return ["--backend", "ray", "--ray-app", app, "--ray-address", gcs]


def running_replicas(app: str) -> int:
    """How many of the tail deployment's replicas Serve reports RUNNING (0: no such application)."""
    from ray import serve

    from ..server.ray_app import DEPLOYMENT

    st = serve.status().applications.get(app)
    d = None if st is None else st.deployments.get(DEPLOYMENT)
    return 0 if d is None else int(d.replica_states.get("RUNNING", 0))


def replica_pids(app: str, replicas: int, timeout_s: float = 60.0) -> list[int]:
    """The process ids of the application's replicas, learnt by asking them (Serve's router
    spreads the calls) until ``replicas`` distinct ones answered."""
    from ray import serve

    from ..server.ray_app import DEPLOYMENT

    handle = serve.get_deployment_handle(DEPLOYMENT, app_name=app)
    pids: set[int] = set()
    end = time.monotonic() + timeout_s
    while len(pids) < replicas:
        if time.monotonic() > end:
            raise TimeoutError(f"only {len(pids)} of {replicas} replicas of '{app}' answered in {timeout_s:.0f} s")
        pids.add(int(handle.describe.remote().result(timeout_s=timeout_s)["pid"]))
    return sorted(pids)
