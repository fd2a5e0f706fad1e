"""``edgesplit bench gateway-kill``: ``kill -9`` one Ray Serve tail replica while agents stream N
frames through the gateway, and account for every frame.

A local Ray cluster runs the bundle's tail as ``--replicas`` replicas; a gateway daemon (``serve
--backend ray``, its own process) sits in front; ``--agents`` protocol sessions (the load
generator: real frames through the head, N hellos and credit windows, as N agents) keep
``--window`` requests each outstanding until ``--frames`` are sent. Once ``--kill-at`` frames are
answered one replica gets SIGKILL (after ``--freeze-ms`` of SIGSTOP, which makes sure batches
were routed to it and are caught in flight; 0: a plain kill under load).

The result says how each frame ended: answered by the server, answered with an error an agent
answers locally (``answered_by_fallback``: the agent's own fallback codes), another error, never
answered (``lost``) or answered twice (``duplicates``); the kill's recovery (:func:`recovery`):
from the SIGKILL to the first answer to a frame sent after it (only a living replica can have
computed it), and to a ``--recovery-window-s`` window back at >= 90 % of the frames/s before the
kill (before the freeze, with one); and when Ray Serve had replaced the replica. ``verdict``: the issue's target.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from .loadgen import LoadClient

DEFAULT_BUNDLE = Path(__file__).resolve().parents[2] / "models" / "cifar10-resnet20-bottlefit"
APP = "edgesplit-kill"


class KillingLoadClient(LoadClient):
    """The load generator, recording when each answer came, and killing ``victim`` (a pid) once
    ``kill_at`` requests are answered."""

    def __init__(self, *args: Any, victim: int, kill_at: int, freeze_ms: float = 0.0, **kw: Any):
        super().__init__(*args, **kw)
        self.victim, self.kill_at, self.freeze_s = victim, kill_at, freeze_ms / 1e3
        self.result_ns: list[int] = []  # when each server result came
        self.sent_ns: list[int] = []  # when its request was sent
        self.t_freeze_ns: int | None = None
        self.t_kill_ns: int | None = None
        self.killed = threading.Event()
        self._answered = 0

    def _on_reply(self, s, parts, stats, window_end_ns):
        before = stats.results
        n = super()._on_reply(s, parts, stats, window_end_ns)
        if n:
            t = time.perf_counter_ns()
            for rtt_ms in stats.rtt_ms[len(stats.rtt_ms) - (stats.results - before) :]:
                self.result_ns.append(t)
                self.sent_ns.append(t - int(rtt_ms * 1e6))
            self._answered += n
            if self.t_freeze_ns is None and self.t_kill_ns is None and self._answered >= self.kill_at:
                self._kill()
        return n

    def _kill(self) -> None:
        if self.freeze_s > 0:
            os.kill(self.victim, signal.SIGSTOP)
            self.t_freeze_ns = time.perf_counter_ns()
            threading.Timer(self.freeze_s, self._sigkill).start()
        else:
            self._sigkill()

    def _sigkill(self) -> None:
        os.kill(self.victim, signal.SIGKILL)
        self.t_kill_ns = time.perf_counter_ns()
        self.killed.set()


def recovery(
    result_ns: list[int],
    sent_ns: list[int],
    t_kill_ns: int,
    window_s: float,
    before_s: float = 1.0,
    before_end_ns: int | None = None,
) -> dict:
    """How the stream of server results came back after the kill at ``t_kill_ns``: the first
    result to a request sent after it; the frames/s over the ``before_s`` before it (before
    ``before_end_ns`` if given: the freeze; or since the first result, if less); the first
    ``window_s`` window (starting on a 10 ms grid from the kill) back at >= 90 % of that; the
    lowest frames/s of such a window after the kill; the longest silence after it."""
    res = np.asarray(result_ns, np.int64)
    sent = np.asarray(sent_ns, np.int64)
    ms = 1e6
    after = res[sent >= t_kill_ns]
    out: dict[str, Any] = {
        "first_result_sent_after_kill_ms": None if after.size == 0 else round((after.min() - t_kill_ns) / ms, 1)
    }
    end = t_kill_ns if before_end_ns is None else before_end_ns
    span = min(before_s * 1e9, end - res.min()) if res.size else 0
    before = ((res >= end - span) & (res < end)).sum() / (span / 1e9) if span > 0 else 0.0
    out["frames_per_s_before"] = round(float(before), 1)
    w = int(window_s * 1e9)
    last = int(res.max()) if res.size else t_kill_ns
    starts = np.arange(t_kill_ns, last - w + 1, 10_000_000, dtype=np.int64)
    rates = (np.searchsorted(res, starts + w) - np.searchsorted(res, starts)) / window_s if starts.size else starts
    back = np.nonzero(rates >= 0.9 * before)[0] if before > 0 else np.empty(0, np.int64)
    out["back_to_90pct_ms"] = None if back.size == 0 else round((starts[back[0]] - t_kill_ns) / ms, 1)
    out["min_window_frames_per_s_after"] = None if starts.size == 0 else round(float(rates.min()), 1)
    out["window_s"] = window_s
    tail = np.concatenate([[t_kill_ns], res[res >= t_kill_ns]])
    out["longest_silence_after_kill_ms"] = round(float(np.diff(tail).max()) / ms, 1) if tail.size > 1 else None
    out["stream_after_kill_ms"] = round((last - t_kill_ns) / ms, 1)
    return out


def _watch_replacement(app: str, replicas: int, client: KillingLoadClient, timeout_s: float, out: dict) -> None:
    """From the kill: when Serve first reports fewer RUNNING replicas, and when it has all again."""
    from .ray_local import running_replicas

    if not client.killed.wait(timeout_s):
        return
    t0 = client.t_kill_ns or time.perf_counter_ns()
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        n = running_replicas(app)
        now = time.perf_counter_ns()
        if n < replicas and "replica_down_seen_ms" not in out:
            out["replica_down_seen_ms"] = round((now - t0) / 1e6, 1)
        elif n >= replicas and "replica_down_seen_ms" in out:
            out["replica_replaced_ms"] = round((now - t0) / 1e6, 1)
            return
        time.sleep(0.1)


def gateway_kill_verdict(r: dict) -> dict[str, bool]:
    """The issue's target: a replica killed mid-stream of 10k frames, 0 lost, 0 duplicates,
    every frame sent and answered (by the server or by the agent's fallback), recovery reported."""
    checks = {
        "frames_ge_10k": r["frames_sent"] >= 10_000,
        "killed_mid_stream": r["killed_mid_stream"],
        "zero_lost": r["lost"] == 0 and r["not_sent"] == 0,
        "zero_duplicates": r["duplicates"] == 0,
        "no_other_errors": not r["errors"] and r["wrong_results"] == 0,
        "recovery_reported": r["recovery"].get("first_result_sent_after_kill_ms") is not None,
    }
    return {**checks, "met": all(checks.values())}


def add_arguments(p) -> None:
    p.add_argument("--bundle", default=str(DEFAULT_BUNDLE), help="bundle directory")
    p.add_argument("--frames", type=int, default=10_000, help="frames streamed in all")
    p.add_argument(
        "--kill-at", type=int, default=None, help="SIGKILL a replica once this many are answered (default: 30%%)"
    )
    p.add_argument("--freeze-ms", type=float, default=0.0, help="SIGSTOP the replica this long before the SIGKILL")
    p.add_argument("--agents", type=int, default=8, help="agent (session) count")
    p.add_argument("--window", type=int, default=2, help="requests each agent keeps outstanding")
    p.add_argument("--replicas", type=int, default=2, help="tail replicas (one is killed)")
    p.add_argument("--ray-cpus", type=float, default=2, help="CPUs of the local Ray cluster (shared by the replicas)")
    p.add_argument("--inflight", type=int, default=1, help="the gateway's --remote-inflight")
    p.add_argument("--threads", type=int, default=1, help="tail engine threads per replica")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-queue-delay-us", type=float, default=2000.0)
    p.add_argument("--deadline-ms", type=float, default=None, help="per-request deadline (none: no deadline)")
    p.add_argument("--images", type=int, default=64, help="distinct real frames cycled through")
    p.add_argument("--recovery-window-s", type=float, default=0.5, help="window of the >= 90%% frames/s recovery")
    p.add_argument("--replace-timeout-s", type=float, default=120.0, help="longest wait for Ray Serve's replacement")


def run(a) -> dict:
    import contextlib
    import sys

    # Ray's driver prints its components' messages on stdout, where the JSON result goes.
    with contextlib.redirect_stdout(sys.stderr):
        return _run(a)


def _run(a) -> dict:
    from ..bundle import Bundle
    from ..edge.fallback import FALLBACK_ERROR_CODES
    from .loadgen import head_workload
    from .ray_local import deploy_tail, gateway_args, local_cluster, replica_pids
    from .serverproc import ServerProcess, daemon_args

    if a.replicas < 1 or a.frames < 2:
        raise ValueError("need at least one replica and two frames")
    kill_at = a.kill_at if a.kill_at is not None else max(1, a.frames * 3 // 10)
    if not 0 < kill_at < a.frames:
        raise ValueError(f"--kill-at must be between 1 and frames-1, got {kill_at} of {a.frames}")
    bundle = Bundle.load(a.bundle)
    workload = head_workload(bundle, a.images)
    args = daemon_args(
        max_batch=a.max_batch,
        queue_delay_us=a.max_queue_delay_us,
        credits=max(64, a.window),
        max_queue=max(1024, 2 * a.agents * a.window),
        threads=a.threads,
    )
    replaced: dict[str, float] = {}
    with local_cluster(a.ray_cpus) as gcs:
        deploy_tail(a.bundle, APP, a.replicas, cpus=a.ray_cpus, threads=a.threads, max_batch=a.max_batch)
        victim = replica_pids(APP, a.replicas)[0]
        extra = [*gateway_args(APP, gcs), "--remote-inflight", str(a.inflight)]
        server = ServerProcess([a.bundle], args + extra).start(wait_s=120)
        try:
            client = KillingLoadClient(
                server.endpoint,
                bundle,
                a.agents,
                workload,
                name="gateway-kill",
                victim=victim,
                kill_at=kill_at,
                freeze_ms=a.freeze_ms,
            )
            watcher = threading.Thread(
                target=_watch_replacement, args=(APP, a.replicas, client, a.replace_timeout_s, replaced), daemon=True
            )
            watcher.start()
            with client:
                t0 = time.perf_counter()
                # a batch a replica died with may wait for Ray's own timeouts: drain patiently
                st = client.closed_loop(
                    requests=a.frames, window=a.window, deadline_ms=a.deadline_ms, drain_timeout_s=60.0
                )
                wall = time.perf_counter() - t0
            killed = client.t_kill_ns is not None
            if killed:
                watcher.join(a.replace_timeout_s + 5)
        finally:
            exit_code = server.stop()
    fallback_codes = {c.name for c in FALLBACK_ERROR_CODES}
    end_ns = max(client.result_ns) if client.result_ns else 0
    out: dict[str, Any] = {
        "bench": "gateway-kill",
        "bundle": bundle.name,
        "frames": a.frames,
        "agents": a.agents,
        "window": a.window,
        "replicas": a.replicas,
        "ray_cpus": a.ray_cpus,
        "inflight": a.inflight,
        "deadline_ms": a.deadline_ms,
        "kill_at": kill_at,
        "freeze_ms": a.freeze_ms,
        "killed_pid": victim,
        "killed_mid_stream": killed and client.t_kill_ns is not None and client.t_kill_ns < end_ns,
        "frames_sent": st.sent,
        "not_sent": a.frames - st.sent,
        "answered_by_server": st.results,
        "answered_by_fallback": sum(n for k, n in st.errors.items() if k in fallback_codes),
        "fallback_codes": {k: n for k, n in st.errors.items() if k in fallback_codes},
        "errors": {k: n for k, n in st.errors.items() if k not in fallback_codes},
        "lost": st.unanswered,
        "duplicates": st.unexpected,
        "wrong_results": st.wrong,
        "frames_per_s": round(st.results / wall, 1) if wall else None,
        "latency_ms_p50": st.summary()["latency_ms_p50"],
        "latency_ms_max": st.summary()["latency_ms_max"],
        "gateway_exit_code": exit_code,
    }
    if client.t_freeze_ns is not None and client.t_kill_ns is not None:
        out["frozen_ms"] = round((client.t_kill_ns - client.t_freeze_ns) / 1e6, 1)
    out["recovery"] = (
        {
            **recovery(
                client.result_ns,
                client.sent_ns,
                client.t_kill_ns,
                a.recovery_window_s,
                before_end_ns=client.t_freeze_ns,
            ),
            **replaced,
        }
        if client.t_kill_ns is not None
        else {}
    )
    out["verdict"] = gateway_kill_verdict(out)
    return out
