"""``edgesplit bench gateway``: what a remote tail costs, and how it scales. The same daemon
process, the same load (N agents, real frames through the bundle's head), with its tail
in-process and behind it as a gateway: on Triton (``--triton-url``, a server holding
``edgesplit triton-export``'s models) and on Ray Serve (a local Ray cluster this bench starts).
Per backend and agent count: frames/s, latency p50/p99, server time, batch sizes, the gateway
process's CPU time per frame, and results checked against the tail run here; then the added p50
latency and the throughput ratio against in-process.

``--ray-replicas 1,2,4`` measures each replica count in turn, in the same run and under the same
load (the previous count's application is deleted first, so replicas never share the CPUs with
idle ones): the ``scaling`` rows (frames/s, per-replica frames/s, speedup over the smallest
count), one batch's trip through the cluster per count (``batch_trip``), and a ``projection`` of
what N GPU nodes would deliver (:mod:`.gateway_scaling`).
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_BUNDLE = Path(__file__).resolve().parents[2] / "models" / "cifar10-resnet20-bottlefit"

# ../shared/DESIGN.md, "Figures measured before the first line of code": the ResNet-18 tail on an
# H200 does 3.3k frames/s at batch 1, i.e. 0.30 ms per batch.
DEFAULT_PROJECT_TAIL_MS = 0.3
PROJECT_TAIL_SOURCE = (
    "DESIGN.md: the ResNet-18 tail on an H200 does 3.3k frames/s at batch 1 (0.30 ms per batch) and 138k "
    "frames/s at batch 256 (1.86 ms per batch; bf16, channels-last, CUDA graphs)"
)


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
    p.add_argument(
        "--ray-replicas",
        default="",
        help="comma-separated replica counts (e.g. 1,2,4): start a local Ray cluster and measure each in turn",
    )
    p.add_argument("--ray-cpus", type=float, default=2, help="CPUs of that local Ray cluster (shared by the replicas)")
    p.add_argument(
        "--inflight",
        default="1,2",
        help="gateway's --remote-inflight values to measure (comma-separated); 'replicas' = as many as Ray replicas",
    )
    p.add_argument(
        "--hop-repeats", type=int, default=50, help="batches timed one at a time per replica count (batch_trip)"
    )
    p.add_argument(
        "--project-tail-ms",
        type=float,
        default=DEFAULT_PROJECT_TAIL_MS,
        help=(
            "GPU tail time per batch (of the mean batch the gateway formed) for the N-node projection "
            f"(default {DEFAULT_PROJECT_TAIL_MS}, from {PROJECT_TAIL_SOURCE})"
        ),
    )


def _ints(spec: str) -> list[int]:
    return [int(v) for v in spec.split(",") if v.strip() and int(v) > 0]


def inflight_settings(spec: str, replicas: int | None) -> list[tuple[str, int]]:
    """``--inflight`` as (setting as given, value): 'replicas' is ``replicas`` (skipped without
    one, as for Triton); a value two settings share is measured once."""
    out: list[tuple[str, int]] = []
    for token in (v.strip() for v in spec.split(",") if v.strip()):
        if token == "replicas":
            if replicas is None:
                continue
            k = replicas
        else:
            k = int(token)
        if k not in [v for _, v in out]:
            out.append((token, k))
    return out


def _measure(endpoint_args: list[str], bundle_path: str, bundle, workload, a) -> list[dict]:
    import psutil

    from .loadgen import LoadClient, LoadStats
    from .serverproc import ServerProcess, daemon_args

    counts = _ints(a.agents)
    most = max(counts) * a.window
    args = daemon_args(
        max_batch=a.max_batch,
        queue_delay_us=a.max_queue_delay_us,
        credits=max(64, a.window),
        max_queue=max(1024, 2 * most),
        threads=a.threads,
    )
    server = ServerProcess([bundle_path], args + endpoint_args).start(wait_s=120)
    gateway = psutil.Process(server.pid)
    rows = []
    try:
        for n in counts:
            with LoadClient(server.endpoint, bundle, n, workload, name=f"gateway-{n}") as client:
                client.closed_loop(a.warmup_s, window=a.window)
                cpu0 = sum(gateway.cpu_times()[:2])
                st: LoadStats = client.closed_loop(a.seconds, window=a.window)
                cpu_s = sum(gateway.cpu_times()[:2]) - cpu0
            row = st.row(n)
            # all of the daemon's threads (with --backend ray, Ray's own in it too); in-process it includes the tail
            row["gateway_cpu_ms_per_frame"] = round(cpu_s * 1e3 / st.results, 4) if st.results else None
            rows.append(row)
    finally:
        rows.append({"exit_code": server.stop()})
    return rows


def run(a) -> dict:
    import contextlib
    import sys

    # Ray's driver prints its components' messages on stdout, where the JSON result goes.
    with contextlib.redirect_stdout(sys.stderr):
        return _run(a)


def _ray_points(a, bundle, workload, points: dict[str, list[dict]]) -> dict:
    """Each replica count in turn on one local Ray cluster: its load points, then one batch's trip."""
    from .gateway_scaling import best_row, projection, scaling_rows, time_batch_hop
    from .ray_local import deploy_tail, gateway_args, local_cluster, remove_app

    configs: list[tuple[str, int, str]] = []
    trips: dict[int, dict] = {}
    with local_cluster(a.ray_cpus) as gcs:
        for replicas in _ints(a.ray_replicas):
            app = deploy_tail(
                a.bundle,
                f"edgesplit-bench-r{replicas}",
                replicas,
                cpus=a.ray_cpus,
                threads=a.threads,
                max_batch=a.max_batch,
            )
            for token, k in inflight_settings(a.inflight, replicas):
                name = f"ray-r{replicas}-inflight-{k}"
                extra = [*gateway_args(app, gcs), "--remote-inflight", str(k)]
                points[name] = _measure(extra, a.bundle, bundle, workload, a)
                configs.append((name, replicas, token))
            top = best_row(scaling_rows(points, configs), replicas)
            batch = max(1, min(a.max_batch, round(top["batch_size_mean"]))) if top and top["batch_size_mean"] else 1
            trips[replicas] = {
                "replicas": replicas,
                **time_batch_hop(
                    bundle, workload, app, batch, threads=a.threads, max_batch=a.max_batch, repeats=a.hop_repeats
                ),
            }
            remove_app(app)
    scaling = scaling_rows(points, configs)
    return {
        "scaling": scaling,
        "batch_trip": list(trips.values()),
        "projection": projection(scaling, trips, a.project_tail_ms, PROJECT_TAIL_SOURCE, bundle.name),
    }


def _run(a) -> dict:
    from ..bundle import Bundle
    from .loadgen import head_workload

    bundle = Bundle.load(a.bundle)
    workload = head_workload(bundle, a.images)
    points: dict[str, list[dict]] = {"in-process": _measure([], a.bundle, bundle, workload, a)}
    if a.triton_url:
        triton = ["--backend", "triton", "--triton-url", a.triton_url]
        if a.triton_model_prefix:
            triton += ["--triton-model-prefix", a.triton_model_prefix]
        for _, k in inflight_settings(a.inflight, None):
            points[f"triton-inflight-{k}"] = _measure(
                [*triton, "--remote-inflight", str(k)], a.bundle, bundle, workload, a
            )
    ray = _ray_points(a, bundle, workload, points) if _ints(a.ray_replicas) else {}
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
                if base[r["agents"]]["frames_per_s"] and r["frames_per_s"] is not None
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
        "ray_replicas": _ints(a.ray_replicas),
        "ray_cpus": a.ray_cpus,
        "points": points,
        "against_in_process": compare,
        **ray,
    }
