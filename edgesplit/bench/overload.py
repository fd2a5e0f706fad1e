"""``edgesplit bench overload``: offer ``--factor`` times the server's capacity, with deadlines.

1. **Capacity**: ``--sessions`` closed-loop sessions with ``--capacity-window`` requests each in
   flight (enough to keep the tail busy at its largest batch) for ``--capacity-s`` seconds:
   results per second is what this server sustains here.
2. **Overload**: the same sessions send open-loop at ``factor x capacity`` requests/s for
   ``--seconds``, each request with ``deadline_ms``; the client never slows down, so credits,
   the queue bound and deadlines are all that protect the server.

Reported: the server's RSS (psutil on its pid, sampled every 100 ms) before, at peak and after;
what fraction of requests got a result, OVERLOADED or DEADLINE_EXCEEDED; whether every request
got exactly one answer (none unanswered, none answered twice or unasked); and the admitted
(= answered with a result) requests' latency: ``server_ms`` (receipt to reply, the clock the
deadline is measured on) and the client's round trip, p50/p99 against the deadline. When the
daemon cannot even read requests as fast as they come (its one I/O thread on a small machine),
libzmq stops reading and TCP pushes back: the client's sockets queue at most ``--send-hwm``
messages each, beyond which a send is refused and counted (``client_send_refused``), so the
offered load is what left the client, and round trips include at most that queue. ``verdict``
judges the run on the target (:func:`~edgesplit.bench.verdicts.overload_verdict`).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from ..bundle import Bundle
from .verdicts import overload_verdict


class RssSampler:
    """Samples a process's resident set size every ``interval_s`` in a background thread."""

    def __init__(self, pid: int, interval_s: float = 0.1):
        import psutil

        self._proc = psutil.Process(pid)
        self.interval_s = interval_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self._proc.memory_info().rss / 2**20)
            except Exception:  # the process is gone: that is reported elsewhere
                return
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float | None:
        return max(self.samples) if self.samples else None


def bench_overload(
    bundle_path: Path,
    factor: float,
    *,
    seconds: float = 10.0,
    deadline_ms: float = 100.0,
    sessions: int = 32,
    capacity_s: float = 5.0,
    capacity_window: int = 4,
    threads: int | None = 2,
    max_batch: int = 32,
    max_queue: int = 1024,
    credits: int = 64,
    max_queue_delay_us: float = 2000.0,
    images: int = 64,
    send_hwm: int = 100,
) -> dict:
    from .loadgen import LoadClient, head_workload
    from .serverproc import ServerProcess, daemon_args

    bundle = Bundle.load(bundle_path)
    workload = head_workload(bundle, images)
    args = daemon_args(
        max_batch=max_batch, queue_delay_us=max_queue_delay_us, credits=credits, max_queue=max_queue, threads=threads
    )
    server = ServerProcess([str(bundle_path)], args).start()
    try:
        client = LoadClient(server.endpoint, bundle, sessions, workload, name="overload", send_hwm=send_hwm).connect()
        client.closed_loop(2.0, window=capacity_window)  # warm-up
        cap = client.closed_loop(capacity_s, window=capacity_window)
        capacity = cap.results_in_window / cap.window_s
        time.sleep(0.5)
        rss_before = server.rss_mb()
        with RssSampler(server.pid) as rss:
            over = client.open_loop(factor * capacity, seconds, deadline_ms=deadline_ms)
        rss_after = server.rss_mb()
        alive = server.alive()
        answers_ping = alive and client.ping()
        client.close()
    finally:
        exit_code = server.stop()
    s = over.summary()
    answered = over.answered
    peak = max(rss.peak_mb or rss_after, rss_after)
    out = {
        "bench": "overload",
        "bundle": bundle.name,
        "factor": factor,
        "sessions": sessions,
        "server": {
            "threads": threads,
            "max_batch": max_batch,
            "max_queue": max_queue,
            "credits": credits,
            "max_queue_delay_us": max_queue_delay_us,
        },
        "capacity_frames_per_s": round(capacity, 1),
        "capacity": cap.summary(),
        "offered_per_s": s["offered_per_s"],
        "offered_factor": round(s["offered_per_s"] / capacity, 2) if capacity else None,
        "served_frames_per_s": s["frames_per_s"],
        "requests": over.sent,
        "answered": answered,
        "unanswered": over.unanswered,
        "unexpected": over.unexpected,
        "exactly_one_answer_each": over.unanswered == 0 and over.unexpected == 0 and answered == over.sent,
        "fraction": {k: round(v / over.sent, 4) for k, v in [("result", over.results), *over.errors.items()]}
        if over.sent
        else {},
        "deadline_ms": deadline_ms,
        "admitted_server_ms_p50": s["server_ms_p50"],
        "admitted_server_ms_p99": s["server_ms_p99"],
        "admitted_server_ms_max": s["server_ms_max"],
        "admitted_late": s["late_results"],
        "admitted_rtt_ms_p50": s["latency_ms_p50"],
        "admitted_rtt_ms_p99": s["latency_ms_p99"],
        "p99_within_deadline": s["server_ms_p99"] is not None and s["server_ms_p99"] <= deadline_ms,
        "wrong_results": over.wrong,
        "batch_size_mean": s["batch_size_mean"],
        "server_rss_mb_before": round(rss_before, 1),
        "server_rss_mb_peak": round(peak, 1),
        "server_rss_mb_after": round(rss_after, 1),
        "server_rss_growth_mb": round(peak - rss_before, 1),
        "server_alive_at_end": alive,
        "server_answers_ping": answers_ping,
        "server_exit_code_on_sigterm": exit_code,
        "client_send_refused": over.send_refused,
        "client_send_hwm": send_hwm,
    }
    out["verdict"] = overload_verdict(out)
    return out


def add_arguments(p) -> None:
    p.add_argument("--bundle", default=None, help="bundle (default: the shipped Imagenette ResNet-18 bundle)")
    p.add_argument("--factor", type=float, default=10.0, help="offered load in multiples of the measured capacity")
    p.add_argument("--seconds", type=float, default=10.0, help="length of the overload phase")
    p.add_argument("--deadline-ms", type=float, default=100.0, help="deadline carried by every overload request")
    p.add_argument("--sessions", type=int, default=32, help="agent sessions the load is spread over")
    p.add_argument("--capacity-s", type=float, default=5.0, help="length of the capacity measurement")
    p.add_argument(
        "--capacity-window", type=int, default=4, help="requests in flight per session while measuring capacity"
    )
    p.add_argument("--threads", type=int, default=2, help="server tail threads")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-queue", type=int, default=1024)
    p.add_argument("--credits", type=int, default=64)
    p.add_argument("--max-queue-delay-us", type=float, default=2000.0)
    p.add_argument("--images", type=int, default=64, help="distinct real frames cycled through")
    p.add_argument(
        "--send-hwm", type=int, default=100, help="messages each client socket queues before a send is refused"
    )


def run(a) -> dict:
    from ..loopback import MODELS_DIR

    return bench_overload(
        Path(a.bundle or MODELS_DIR / "imagenette-resnet18-bottlefit"),
        a.factor,
        seconds=a.seconds,
        deadline_ms=a.deadline_ms,
        sessions=a.sessions,
        capacity_s=a.capacity_s,
        capacity_window=a.capacity_window,
        threads=a.threads,
        max_batch=a.max_batch,
        max_queue=a.max_queue,
        credits=a.credits,
        max_queue_delay_us=a.max_queue_delay_us,
        images=a.images,
        send_hwm=a.send_hwm,
    )
