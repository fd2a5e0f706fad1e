"""``edgesplit bench restart``: ``kill -9`` the server daemon in the middle of a stream, start it
again on the same port, and account for every frame.

One agent (in this process, local fallback on by default) streams N real frames to a server
daemon (its own process). When the agent has finished frame K, the server gets SIGKILL: no bye,
no drain, its connections simply vanish. A new daemon is started at once on the same port. The
result says how each frame ended (server result, local fallback, explicit error), how many ended
twice or never (``silently_lost``: must be 0), how long the server was away, and how long after
the new daemon was listening the agent had a server result again (``resume_ms``). ``verdict``
judges the run on the target (:func:`~edgesplit.bench.verdicts.restart_verdict`).
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from pathlib import Path

from ..bundle import Bundle
from ..loopback import DEFAULT_SOURCES, free_port
from .serverproc import ServerProcess
from .verdicts import restart_verdict


def account(results, frames: int) -> dict:
    """How ``frames`` frames (ids 1..frames) ended, from their results: each must end exactly once."""
    ids = Counter(r.id for r in results)
    return {
        "frames_sent": frames,
        "results_server": sum(r.source == "server" for r in results),
        "results_local": sum(r.source == "local" for r in results),
        "errors": sum(r.error is not None for r in results),
        "duplicates": sum(n - 1 for n in ids.values() if n > 1),
        "unknown_ids": sum(1 for i in ids if not 1 <= i <= frames),
        "silently_lost": sum(1 for i in range(1, frames + 1) if i not in ids),
    }


def bench_restart(
    bundle_path: Path,
    frames: int,
    kill_at: int,
    *,
    source: str | None = None,
    inflight: int = 8,
    threads: int = 1,
    fallback: str = "auto",
    reconnect_max_s: float = 0.5,
    timeout_s: float = 10.0,
) -> dict:
    from ..data.sources import open_source, take
    from ..edge.agent import Agent

    if not 0 < kill_at < frames:
        raise ValueError(f"--kill-at must be between 1 and frames-1, got {kill_at} of {frames}")
    bundle = Bundle.load(bundle_path)
    if source is None:
        source = next(v for k, v in DEFAULT_SOURCES.items() if bundle.name.startswith(k))
    samples = list(take(open_source(source, bundle.classes), frames))  # in memory: reading is not measured
    server = ServerProcess(
        [bundle_path], ["--threads", str(threads), "--max-queue-delay-us", "0"], port=free_port()
    ).start()
    agent = Agent(
        bundle,
        server.endpoint,
        inflight=inflight,
        threads=threads,
        timeout_s=timeout_s,
        fallback=fallback,
        reconnect_max_s=reconnect_max_s,
    )
    results = []
    restarter: threading.Thread | None = None
    t_kill = t_detect = t_resume = None
    last_id_before_kill = 0
    taken = 0

    def frames():  # the agent numbers frames 1, 2, ... in the order it takes them from here
        nonlocal taken
        for s in samples:
            taken += 1
            yield s

    try:
        agent.connect()
        t0 = time.perf_counter()
        for r in agent.run(frames()):
            results.append(r)
            if t_kill is None:
                if len(results) == kill_at:
                    last_id_before_kill = taken
                    server.kill9()
                    t_kill = time.monotonic()
                    # the restart, beside the stream (as a supervisor would do it): the moment the new
                    # daemon listens is recorded in server.ready_at
                    restarter = threading.Thread(target=server.start, kwargs={"wait_s": None})
                    restarter.start()
                continue
            if t_detect is None and r.source != "server":
                t_detect = time.monotonic()
            if t_resume is None and r.source == "server" and r.id > last_id_before_kill:
                t_resume = time.monotonic()
        wall = time.perf_counter() - t0
        agent.close()
    finally:
        if restarter is not None:
            restarter.join()
        server.stop()
    n = len(samples)
    out = {"bench": "restart", "bundle": bundle.name, "source": source, "kill_at": kill_at, **account(results, n)}
    served = [r for r in results if r.source == "server"]
    local = [r for r in results if r.source == "local"]

    def ms(a, b):
        return None if a is None or b is None else round((b - a) * 1e3, 1)

    out.update(
        {
            "fallback_reasons": dict(Counter(r.fallback_reason for r in local)),
            "error_names": dict(Counter(r.error for r in results if r.error is not None)),
            "late_answers_dropped": agent.late_answers,
            "link_losses": agent.link_losses,
            "reconnects": agent.reconnects,
            # kill -> the first frame the server did not answer (local, or an error with fallback off)
            "detect_ms": ms(t_kill, t_detect),
            "restart_ms": ms(t_kill, server.ready_at),  # kill -> the new daemon listens
            "resume_ms": ms(server.ready_at, t_resume),  # the new daemon listens -> first server result
            "outage_ms": ms(t_kill, t_resume),  # kill -> first server result again
            "accuracy_server": _accuracy(served),
            "accuracy_local": _accuracy(local),
            "local_ms_p50": _median([r.local_ms for r in local]),
            "frames_per_s": round(n / wall, 1),
            "inflight": inflight,
            "fallback": fallback,
            "reconnect_max_s": reconnect_max_s,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        }
    )
    out["verdict"] = restart_verdict(out)
    return out


def _accuracy(rs) -> float | None:
    rs = [r for r in rs if r.label is not None]
    return None if not rs else round(sum(r.pred == r.label for r in rs) / len(rs), 4)


def _median(v) -> float | None:
    v = sorted(x for x in v if x is not None)
    return None if not v else round(v[len(v) // 2], 3)


def add_arguments(p) -> None:
    p.add_argument("--bundle", default=None, help="bundle (default: the shipped CIFAR-10 bundle)")
    p.add_argument("--frames", type=int, default=10000)
    p.add_argument("--kill-at", type=int, default=3000, help="SIGKILL the server once this many frames have ended")
    p.add_argument("--source", default=None, help="frames (default: the bundle dataset's test split)")
    p.add_argument("--inflight", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads for head, tail and fallback")
    p.add_argument("--fallback", default="auto", choices=("auto", "off"))
    p.add_argument("--reconnect-max-s", type=float, default=0.5, help="the agent's reconnect backoff cap")
    p.add_argument("--timeout-s", type=float, default=10.0, help="the agent's per-request timeout")


def run(a) -> dict:
    from ..loopback import DEFAULT_BUNDLE

    return bench_restart(
        Path(a.bundle or DEFAULT_BUNDLE),
        a.frames,
        a.kill_at,
        source=a.source,
        inflight=a.inflight,
        threads=a.threads,
        fallback=a.fallback,
        reconnect_max_s=a.reconnect_max_s,
        timeout_s=a.timeout_s,
    )
