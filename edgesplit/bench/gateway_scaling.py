"""``bench gateway --ray-replicas 1,2,4``: the scaling table, the cost of one batch's trip through
the cluster, and the projection to N GPU nodes built from them.

- :func:`scaling_rows`: frames/s, per-replica frames/s and latency per replica count, inflight
  setting and agent count, each next to the smallest replica count measured with the same
  inflight setting and agents (``speedup``).
- :func:`time_batch_hop`: one formed batch (real frames through the head) timed through the
  Ray Serve deployment and through the tail engine here, one at a time with no other load; the
  difference is what the cluster adds per batch (decoding, packing, Ray's transport both ways).
- :func:`projection`: what N GPU nodes would deliver, from those measurements and a per-batch GPU
  tail time the user gives; a model, labelled ``"kind": "projection"`` with its formula.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

PROJECTED_NODES = (1, 2, 4, 8)

PROJECTION_MODEL = (
    "frames_per_s(N nodes, G gateways) = min(N * per_node, G * per_gateway); "
    "per_node = 1000 * batch / (tail_ms_per_batch + overhead_ms_per_batch); "
    "per_gateway = 1000 / gateway_cpu_ms_per_frame. "
    "batch: the mean batch the gateway formed in the measured row (the best frames/s at the most agents); "
    "overhead_ms_per_batch: a batch of that size through the Ray Serve deployment minus the tail engine's own "
    "time on it, measured here (decoding, packing, Ray's transport both ways); "
    "gateway_cpu_ms_per_frame: the gateway process's CPU time per answered frame in that row, measured here; "
    "tail_ms_per_batch: given (--project-tail-ms), not measured here. "
    "The overhead and the gateway's cost are those of the measured bundle (its wire tensor and logits sizes): "
    "pair a GPU figure with the bundle it was measured for. "
    "Assumes one replica per GPU node running one batch at a time, each batch holding it for tail + overhead "
    "(no overlap of the hop with compute: a lower bound per node), the gateway keeping at least N batches in "
    "flight (--remote-inflight >= N), one gateway process using at most one core (its Python threads share one "
    "interpreter lock), gateways scaling linearly (they share nothing), and the agents' links not being the bound."
)


def scaling_rows(points: dict[str, list[dict]], configs: list[tuple[str, int, str]]) -> list[dict]:
    """``configs``: (backend name in ``points``, replicas, inflight setting as given). One row per
    configuration and agent count."""
    base: dict[tuple[str, int], float] = {}
    for name, _, inflight in sorted(configs, key=lambda c: -c[1]):  # the smallest count wins
        for r in points[name]:
            if "agents" in r and r["frames_per_s"]:
                base[(inflight, r["agents"])] = r["frames_per_s"]
    rows = []
    for name, replicas, inflight in configs:
        for r in points[name]:
            if "agents" not in r:
                continue
            fps = r["frames_per_s"]
            ref = base.get((inflight, r["agents"]))
            rows.append(
                {
                    "replicas": replicas,
                    "inflight": inflight,
                    "backend": name,
                    "agents": r["agents"],
                    "frames_per_s": fps,
                    "per_replica_frames_per_s": None if fps is None else round(fps / replicas, 1),
                    "speedup": None if fps is None or not ref else round(fps / ref, 3),
                    "latency_ms_p50": r["latency_ms_p50"],
                    "latency_ms_p99": r["latency_ms_p99"],
                    "batch_size_mean": r["batch_size_mean"],
                    "gateway_cpu_ms_per_frame": r.get("gateway_cpu_ms_per_frame"),
                    "unanswered": r["unanswered"],
                    "errors": r["errors"],
                }
            )
    return rows


def best_row(rows: list[dict], replicas: int | None = None) -> dict | None:
    """The row with the most frames/s at the largest agent count (of ``replicas``, if given)."""
    rows = [r for r in rows if r["frames_per_s"] and (replicas is None or r["replicas"] == replicas)]
    if not rows:
        return None
    most = max(r["agents"] for r in rows)
    return max((r for r in rows if r["agents"] == most), key=lambda r: r["frames_per_s"])


def batch_items(bundle, workload, batch: int) -> list:
    """``batch`` queued requests as the gateway's I/O thread makes them from the workload's frames."""
    from ..server.batcher import Item
    from ..server.tail_runner import RequestCheck

    check = RequestCheck(bundle)
    items = []
    for i in range(batch):
        payload = workload.payloads[i % len(workload.payloads)]
        desc = check.check_compact(workload.mode, payload, i)
        items.append(Item((bundle.hash, workload.mode), b"", i, desc, payload, 1, True, 0))
    return items


def _ms(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def time_batch_hop(bundle, workload, app: str, batch: int, *, threads: int, max_batch: int, repeats: int) -> dict:
    """One batch of ``batch`` frames, ``repeats`` times: through the Ray Serve application ``app``
    (this process is the cluster's driver) and through the same tail engine here, alternately, so
    that whatever else runs on the machine weighs on both alike."""
    from ..engine import EngineOptions
    from ..server.ray_tail import RayTail
    from ..server.tail_runner import TailRunner

    items = batch_items(bundle, workload, batch)
    local = TailRunner(bundle, "ort", threads, EngineOptions(max_batch=max_batch))
    remote = RayTail(bundle, app, max_batch=max_batch)
    try:
        x, _, _ = local.prepare(items)
        feed = {local.input_name: x}
        local.engine.run(feed)
        remote.run(items)
        engine_ms, ray_ms = [], []
        for _ in range(repeats):
            engine_ms.append(_ms(lambda: local.engine.run(feed)))
            ray_ms.append(_ms(lambda: remote.run(items)))
    finally:
        local.close()
    ray_p50, engine_p50 = statistics.median(ray_ms), statistics.median(engine_ms)
    return {
        "batch": batch,
        "repeats": repeats,
        "ray_batch_ms_p50": round(ray_p50, 3),
        "engine_batch_ms_p50": round(engine_p50, 3),
        "overhead_ms_per_batch": round(max(0.0, ray_p50 - engine_p50), 3),
    }


def projection(
    scaling: list[dict], hops: dict[int, dict], tail_ms: float, tail_ms_source: str, bundle: str
) -> dict[str, Any]:
    """What N GPU nodes would deliver (:data:`PROJECTION_MODEL`), from the best measured row and
    the batch trip measured at the same replica count."""
    out: dict[str, Any] = {"kind": "projection", "model": PROJECTION_MODEL}
    row = best_row(scaling)
    hop = None if row is None else hops.get(row["replicas"])
    if row is None or hop is None or not row["batch_size_mean"]:
        return {**out, "rows": [], "why_empty": "no Ray row with answered frames and a timed batch trip"}
    batch = float(row["batch_size_mean"])
    per_node = 1000.0 * batch / (tail_ms + hop["overhead_ms_per_batch"])
    cpu = row.get("gateway_cpu_ms_per_frame")
    per_gateway = 1000.0 / cpu if cpu else math.inf
    rows = []
    for n in PROJECTED_NODES:
        one = min(n * per_node, per_gateway)
        rows.append(
            {
                "nodes": n,
                "frames_per_s_one_gateway": round(one, 1),
                "bound_one_gateway": "gateway" if per_gateway < n * per_node else "nodes",
                "frames_per_s_one_gateway_per_node": round(n * min(per_node, per_gateway), 1),
                "gateways_needed": math.ceil(n * per_node / per_gateway) if cpu else None,
            }
        )
    return {
        **out,
        "inputs": {
            "bundle": bundle,
            "batch": batch,
            "tail_ms_per_batch": tail_ms,
            "tail_ms_source": tail_ms_source,
            "overhead_ms_per_batch": hop["overhead_ms_per_batch"],
            "gateway_cpu_ms_per_frame": cpu,
            "measured_at": {k: row[k] for k in ("replicas", "inflight", "agents", "frames_per_s")},
        },
        "per_node_frames_per_s": round(per_node, 1),
        "per_gateway_frames_per_s": None if not cpu else round(per_gateway, 1),
        "rows": rows,
    }
