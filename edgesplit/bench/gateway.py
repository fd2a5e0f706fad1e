"""``edgesplit bench gateway``: what a remote tail costs. The same daemon process, the same load
(N agents, real frames through the bundle's head), with its tail in-process and behind it as a
gateway: on Triton (``--triton-url``, a server holding ``edgesplit triton-export``'s models) and on
Ray Serve (a local Ray cluster this bench starts, ``--ray-replicas`` tail replicas). Per backend
and agent count: frames/s, latency p50/p99, server time, batch sizes, and results checked against
the tail run here; then the added p50 latency and the throughput ratio against in-process.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_BUNDLE = Path(__file__).resolve().parents[2] / "models" / "cifar10-resnet20-bottlefit"


def add_arguments(p) -> None:
    p.add_argument("--bundle", default=str(DEFAULT_BUNDLE), help="bundle directory")
    p.add_argument("--agents", default="1,32", help="comma-separated agent (session) counts")
    p.add_argument("--window", type=int, default=2, help="requests each agent keeps outstanding")
    p.add_argument("--seconds", type=float, default=5.0, help="measured seconds per point (after --warmup-s)")
    p.add_argument("--warmup-s", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=1, help="tail engine threads (in-process and Ray replicas)")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-queue-delay-us", type=float, default=2000.0)
    p.add_argument("--images", type=int, default=64, help="distinct real frames cycled through")
    p.add_argument("--triton-url", default=None, help="a Triton server holding the bundle's exported tail")
    p.add_argument("--triton-model-prefix", default=None)
    p.add_argument("--ray-replicas", type=int, default=0, help="start a local Ray cluster with this many replicas")
    p.add_argument("--ray-cpus", type=int, default=2, help="CPUs of that local Ray cluster")
    p.add_argument("--inflight", default="1,2", help="gateway's --remote-inflight values to measure (comma-separated)")


def _measure(endpoint_args: list[str], bundle_path: str, bundle, workload, a) -> list[dict]:
    from .loadgen import LoadClient, LoadStats
    from .serverproc import ServerProcess, daemon_args

    counts = [int(v) for v in a.agents.split(",") if v.strip()]
    most = max(counts) * a.window
    args = daemon_args(
        max_batch=a.max_batch,
        queue_delay_us=a.max_queue_delay_us,
        credits=max(64, a.window),
        max_queue=max(1024, 2 * most),
        threads=a.threads,
    )
    server = ServerProcess([bundle_path], args + endpoint_args).start(wait_s=120)
    rows = []
    try:
        for n in counts:
            with LoadClient(server.endpoint, bundle, n, workload, name=f"gateway-{n}") as client:
                client.closed_loop(a.warmup_s, window=a.window)
                st: LoadStats = client.closed_loop(a.seconds, window=a.window)
            rows.append(st.row(n))
    finally:
        rows.append({"exit_code": server.stop()})
    return rows


def run(a) -> dict:
    import contextlib
    import sys

    # Ray's driver prints its components' messages on stdout, where the JSON result goes.
    with contextlib.redirect_stdout(sys.stderr):
        return _run(a)


def _run(a) -> dict:
    from ..bundle import Bundle
    from .loadgen import head_workload

    bundle = Bundle.load(a.bundle)
    workload = head_workload(bundle, a.images)
    backends: dict[str, list[str]] = {"in-process": []}
    if a.triton_url:
        backends["triton"] = ["--backend", "triton", "--triton-url", a.triton_url]
        if a.triton_model_prefix:
            backends["triton"] += ["--triton-model-prefix", a.triton_model_prefix]
    ray_started = False
    if a.ray_replicas:
        import ray
        from ray import serve

        from ..server.ray_app import build

        ray.init(num_cpus=a.ray_cpus, include_dashboard=False, log_to_driver=False)
        ray_started = True
        serve.start(proxy_location="Disabled")
        app = build(
            {
                "bundle": str(Path(a.bundle).resolve()),
                "threads": a.threads,
                "max_batch": a.max_batch,
                "num_replicas": a.ray_replicas,
                "num_cpus": a.ray_cpus / a.ray_replicas,
            }
        )
        serve.run(app, name="edgesplit-bench", route_prefix=None)
        gcs = ray.get_runtime_context().gcs_address
        backends["ray"] = ["--backend", "ray", "--ray-app", "edgesplit-bench", "--ray-address", gcs]
    for name in [n for n in backends if n != "in-process"]:
        extra = backends.pop(name)
        for k in (int(v) for v in a.inflight.split(",") if v.strip()):
            backends[f"{name}-inflight-{k}"] = [*extra, "--remote-inflight", str(k)]
    points: dict[str, list[dict]] = {}
    try:
        for name, extra in backends.items():
            points[name] = _measure(extra, a.bundle, bundle, workload, a)
    finally:
        if ray_started:
            serve.shutdown()
            ray.shutdown()
    base = {r["agents"]: r for r in points["in-process"] if "agents" in r}
    compare = {}
    for name, rows in points.items():
        if name == "in-process":
            continue
        compare[name] = [
            {
                "agents": r["agents"],
                "added_latency_ms_p50": round(r["latency_ms_p50"] - base[r["agents"]]["latency_ms_p50"], 3)
                if r["latency_ms_p50"] is not None and base[r["agents"]]["latency_ms_p50"] is not None
                else None,
                "throughput_ratio": round(r["frames_per_s"] / base[r["agents"]]["frames_per_s"], 3)
                if base[r["agents"]]["frames_per_s"]
                else None,
            }
            for r in rows
            if "agents" in r
        ]
    return {
        "bench": "gateway",
        "bundle": bundle.name,
        "threads": a.threads,
        "window": a.window,
        "seconds_per_point": a.seconds,
        "max_batch": a.max_batch,
        "max_queue_delay_us": a.max_queue_delay_us,
        "ray_replicas": a.ray_replicas,
        "points": points,
        "against_in_process": compare,
    }
