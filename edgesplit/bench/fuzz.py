"""``edgesplit bench fuzz``: malformed frames at a live server while valid agents stream.

The server runs as its own process. Fuzz workers (processes, so their Python does not share a
GIL with the valid agents being timed) each open three DEALER sockets: one with a session, one
that never says hello, one with a session for bit-flipped requests; they send
:mod:`edgesplit.wire.fuzz` cases, keeping at most ``--fuzz-window`` answers outstanding, and
check every answer against what docs/PROTOCOL.md says is due (matched by request id, and in
order for answers without one, which the server sends at once and in order on one connection).
Meanwhile ``--agents`` valid sessions stream real CIFAR-10/Imagenette frames (precomputed head
tensors) at ``--agent-fps`` each and check every result's logits. The valid agents run alone
first (the baseline), then under fuzz; the report puts their p50/p99 side by side.

"0 crashes" is checked from the outside: the server process is alive at the end, still answers
a ping and valid requests, exits 0 on SIGTERM, and its log holds no traceback; no answer was
INTERNAL (the daemon's code for its own bugs).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ..bundle import Bundle
from .fuzz_client import FuzzClient, FuzzReport


def _start_worker(
    endpoint: str, bundle: Path, cases: int, seed: int, window: int, rate: float | None
) -> subprocess.Popen:
    cfg = {"endpoint": endpoint, "bundle": str(bundle), "cases": cases, "seed": seed, "window": window, "rate": rate}
    return subprocess.Popen(
        [sys.executable, "-m", "edgesplit.bench.fuzz", "--worker", json.dumps(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def worker_main(argv: list[str]) -> int:
    """``python -m edgesplit.bench.fuzz --worker JSON``: one fuzz worker; prints its report."""
    cfg = json.loads(argv[argv.index("--worker") + 1])
    client = FuzzClient(cfg["endpoint"], Bundle.load(cfg["bundle"]), seed=cfg["seed"], window=cfg["window"]).connect()
    print("ready", flush=True)  # the bench starts timing the valid agents under fuzz from here
    try:
        report = client.run(cfg["cases"], rate=cfg["rate"])
    finally:
        client.close()
    print(json.dumps(report.to_json()))
    return 0


def bench_fuzz(
    bundle_path: Path,
    frames: int,
    agents: int,
    *,
    fuzzers: int = 1,
    window: int = 16,
    rate: float | None = None,
    agent_fps: float = 50.0,
    baseline_s: float = 10.0,
    seed: int = 0,
    threads: int = 1,
    images: int = 64,
) -> dict:
    from .loadgen import LoadClient, head_workload
    from .serverproc import ServerProcess

    bundle = Bundle.load(bundle_path)
    workload = head_workload(bundle, images)
    server = ServerProcess([str(bundle_path)], ["--threads", str(threads)]).start()
    try:
        valid = LoadClient(server.endpoint, bundle, agents, workload, max_inflight=8, name="valid").connect()
        valid.closed_loop(2.0, fps=agent_fps)  # warm-up: sockets, ORT arenas
        rss_before = server.rss_mb()
        baseline = valid.closed_loop(baseline_s, fps=agent_fps)
        workers = [
            _start_worker(
                server.endpoint, bundle_path, frames // fuzzers + (i < frames % fuzzers), seed + i, window, rate
            )
            for i in range(fuzzers)
        ]
        for w in workers:
            if w.stdout.readline().strip() != "ready":
                raise RuntimeError(f"fuzz worker failed to start: {w.communicate()[1][-2000:]}")
        fuzzed = valid.closed_loop(until=lambda: all(w.poll() is not None for w in workers), fps=agent_fps)
        report = FuzzReport()
        worker_failures = []
        for w in workers:
            out, err = w.communicate()
            if w.returncode != 0:
                worker_failures.append(err[-2000:])
                continue
            report.merge(json.loads(out.strip().splitlines()[-1]))
        rss_after = server.rss_mb()
        alive = server.alive()
        answers_ping = alive and valid.ping()
        after = valid.closed_loop(requests=50 * agents, window=1) if alive else None
        valid.close()
    finally:
        exit_code = server.stop()
    log = server.log_text()
    b, f = baseline.summary(), fuzzed.summary()
    return {
        "bench": "fuzz",
        "bundle": bundle.name,
        "agents": agents,
        "agent_fps": agent_fps,
        "fuzzers": fuzzers,
        "fuzz_window": window,
        "fuzz_rate": rate,
        "seed": seed,
        "server_threads": threads,
        "fuzzed_frames": report.cases,
        "fuzz": report.to_json(),
        "crashes": int(not alive) + int(exit_code != 0) + int("Traceback" in log),
        "server_alive_at_end": alive,
        "server_answers_ping": answers_ping,
        "valid_after_fuzz_ok": None if after is None else after.results == after.sent and after.wrong == 0,
        "server_exit_code_on_sigterm": exit_code,
        "server_log_tracebacks": log.count("Traceback"),
        "server_rss_mb_before": round(rss_before, 1),
        "server_rss_mb_after": round(rss_after, 1),
        "valid_baseline": b,
        "valid_under_fuzz": f,
        "valid_p50_ratio": _ratio(f["latency_ms_p50"], b["latency_ms_p50"]),
        "valid_p99_ratio": _ratio(f["latency_ms_p99"], b["latency_ms_p99"]),
        "worker_failures": worker_failures,
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 3)


def add_arguments(p) -> None:
    p.add_argument("--bundle", default=None, help="bundle (default: the shipped CIFAR-10 bundle)")
    p.add_argument("--frames", type=int, default=100_000, help="fuzzed messages to send in total")
    p.add_argument("--agents", type=int, default=2, help="valid agent sessions streaming meanwhile")
    p.add_argument("--agent-fps", type=float, default=50.0, help="frames per second each valid agent sends")
    p.add_argument("--fuzzers", type=int, default=1, help="fuzz worker processes")
    p.add_argument("--fuzz-window", type=int, default=16, help="answers each fuzz worker keeps outstanding")
    p.add_argument("--fuzz-rate", type=float, default=None, help="cap on each fuzz worker's messages/s (unset: none)")
    p.add_argument("--baseline-s", type=float, default=10.0, help="seconds the valid agents run alone first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="server tail threads")
    p.add_argument("--images", type=int, default=64, help="distinct real frames the valid agents cycle through")


def run(a) -> dict:
    from ..loopback import DEFAULT_BUNDLE

    return bench_fuzz(
        Path(a.bundle or DEFAULT_BUNDLE),
        a.frames,
        a.agents,
        fuzzers=a.fuzzers,
        window=a.fuzz_window,
        rate=a.fuzz_rate,
        agent_fps=a.agent_fps,
        baseline_s=a.baseline_s,
        seed=a.seed,
        threads=a.threads,
        images=a.images,
    )


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
