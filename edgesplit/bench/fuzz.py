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
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from ..bundle import Bundle
from ..wire import protocol as P
from ..wire.codec import ErrorCode
from ..wire.fuzz import CHAOS, NO_SESSION, PONG, RESULT, SESSION, FuzzCase, FuzzGenerator, FuzzTarget
from ..wire.messages import Welcome
from ..wire.protocol import Kind, ProtocolError
from ..wire.transport import connect_dealer, context, recv_parts, send_parts

_NOBLOCK = int(zmq.NOBLOCK)


def outcome_name(outcome: int | str) -> str:
    return ErrorCode(outcome).name if isinstance(outcome, int) else outcome


@dataclass
class FuzzReport:
    cases: int = 0
    by_class: Counter = field(default_factory=Counter)
    answers: Counter = field(default_factory=Counter)        # outcome name -> count (matched channels)
    mismatches: int = 0
    examples: list = field(default_factory=list)             # the first mismatches, for the reader
    unexpected: int = 0                                       # answers matching no case sent
    unanswered: int = 0
    chaos_sent: int = 0
    chaos_answers: int = 0
    internal: int = 0                                         # INTERNAL answers on any channel
    bytes_sent: int = 0
    wall_s: float = 0.0

    def to_json(self) -> dict:
        return {"cases": self.cases, "cases_per_s": round(self.cases / self.wall_s, 1) if self.wall_s else None,
                "bytes_sent": self.bytes_sent, "by_class": dict(sorted(self.by_class.items())),
                "answers": dict(sorted(self.answers.items())), "mismatches": self.mismatches,
                "mismatch_examples": self.examples, "unexpected": self.unexpected, "unanswered": self.unanswered,
                "chaos_sent": self.chaos_sent, "chaos_answers": self.chaos_answers, "internal_errors": self.internal,
                "wall_s": round(self.wall_s, 2)}

    def merge(self, other: dict) -> None:
        """Add a worker's :meth:`to_json` into this report."""
        self.cases += other["cases"]
        self.by_class.update(other["by_class"])
        self.answers.update(other["answers"])
        self.mismatches += other["mismatches"]
        self.examples += other["mismatch_examples"][: max(0, 20 - len(self.examples))]
        self.unexpected += other["unexpected"]
        self.unanswered += other["unanswered"]
        self.chaos_sent += other["chaos_sent"]
        self.chaos_answers += other["chaos_answers"]
        self.internal += other["internal_errors"]
        self.bytes_sent += other["bytes_sent"]
        self.wall_s = max(self.wall_s, other["wall_s"])


class _Channel:
    """One DEALER socket and the answers it is owed."""

    def __init__(self, sock: zmq.Socket, name: str):
        self.sock = sock
        self.name = name
        self.by_id: dict[int, deque[FuzzCase]] = {}
        self.in_order: deque[FuzzCase] = deque()  # cases answered without an id, in sending order
        self.outstanding = 0
        self.welcome: dict | None = None


class FuzzClient:
    """Sends fuzz cases to one server and checks each answer. One thread; three sockets."""

    def __init__(self, endpoint: str, bundle: Bundle, *, seed: int = 0, window: int = 16,
                 classes: list[str] | None = None, ctx: zmq.Context | None = None):
        self.endpoint = endpoint
        self.bundle = bundle
        self.seed = seed
        self.window = max(1, int(window))
        self.classes = classes
        ctx = ctx or context()
        self._ch = {name: _Channel(connect_dealer(endpoint, ctx=ctx), name) for name in (SESSION, NO_SESSION, CHAOS)}
        self._by_sock = {c.sock: c for c in self._ch.values()}
        self._poller = zmq.Poller()
        for c in self._ch.values():
            self._poller.register(c.sock, zmq.POLLIN)
        self.generator: FuzzGenerator | None = None
        self.report = FuzzReport()

    def connect(self, timeout_s: float = 30.0) -> "FuzzClient":
        hello = P.pack(P.hello(self.bundle.hash, "fuzz", max_inflight=1 << 20))
        need = [self._ch[SESSION], self._ch[CHAOS]]
        end = time.monotonic() + timeout_s
        next_hello = 0.0
        while not all(c.welcome for c in need):
            if time.monotonic() > end:
                raise TimeoutError(f"no welcome from {self.endpoint}")
            if time.monotonic() >= next_hello:
                for c in need:
                    if c.welcome is None:
                        send_parts(c.sock, hello)
                next_hello = time.monotonic() + 1.0
            self._pump(100)
        limits = Welcome.from_header(self._ch[SESSION].welcome).limits
        self.generator = FuzzGenerator(FuzzTarget.from_bundle(self.bundle, limits), self.seed, classes=self.classes)
        return self

    def close(self) -> None:
        for c in self._ch.values():
            c.sock.close(linger=0)

    # -- answers -----------------------------------------------------------------------------
    def _pump(self, timeout_ms: int) -> int:
        n = 0
        for sock, _ in self._poller.poll(timeout_ms):
            c = self._by_sock[sock]
            while True:
                try:
                    parts = recv_parts(sock, _NOBLOCK)
                except zmq.Again:
                    break
                n += self._on_answer(c, parts)
        return n

    def _on_answer(self, c: _Channel, parts: list) -> int:
        r = self.report
        try:
            msg = P.parse(parts)
        except ProtocolError as e:  # the server sent something that is not protocol: a finding
            self._mismatch(None, c.name, f"unparsable answer: {e.message}")
            return 0
        h, kind = msg.header, msg.kind
        if kind == Kind.PING:  # the server's heartbeat: answer, it is not a fuzz answer
            send_parts(c.sock, P.pack(P.pong(h["nonce"])), _NOBLOCK)
            return 0
        if kind == Kind.WELCOME:
            c.welcome = h
            return 0
        if kind not in (Kind.ERROR, Kind.RESULT, Kind.PONG):
            self._mismatch(None, c.name, f"unexpected '{kind}' message")
            return 0
        outcome: int | str = h["code"] if kind == Kind.ERROR else (RESULT if kind == Kind.RESULT else PONG)
        if outcome == ErrorCode.INTERNAL:
            r.internal += 1
        c.outstanding -= 1
        if c.name == CHAOS:
            r.chaos_answers += 1
            return 1
        rid = h.get("id") if kind != Kind.PONG else None
        if rid is not None:
            q = c.by_id.get(rid)
            if not q:
                r.unexpected += 1
                self._mismatch(None, c.name, f"answer {outcome_name(outcome)} for id {rid}, which no case is owed")
                return 1
            case = q.popleft()
            if not q:
                del c.by_id[rid]
        elif c.in_order:
            case = c.in_order.popleft()
        else:
            r.unexpected += 1
            self._mismatch(None, c.name, f"answer {outcome_name(outcome)} without an id, none owed")
            return 1
        r.answers[outcome_name(outcome)] += 1
        if not case.accepts(outcome):
            self._mismatch(case, c.name, f"got {outcome_name(outcome)} ({h.get('message', '')[:160]})")
        return 1

    def _mismatch(self, case: FuzzCase | None, channel: str, what: str) -> None:
        r = self.report
        r.mismatches += 1
        if len(r.examples) < 20:
            ex = {"channel": channel, "what": what}
            if case is not None:
                ex.update({"class": case.cls, "variant": case.variant, "reply_id": case.reply_id,
                           "expected": sorted(outcome_name(e) if isinstance(e, int) else e for e in case.expect)})
            r.examples.append(ex)

    # -- sending -------------------------------------------------------------------------------
    def _send(self, case: FuzzCase) -> None:
        c = self._ch[case.channel]
        send_parts(c.sock, case.parts)
        c.outstanding += 1
        r = self.report
        r.cases += 1
        r.by_class[case.cls] += 1
        r.bytes_sent += sum(len(p) for p in case.parts)
        if case.channel == CHAOS:
            r.chaos_sent += 1
        elif case.reply_id is not None:
            c.by_id.setdefault(case.reply_id, deque()).append(case)
        else:
            c.in_order.append(case)

    def _outstanding(self) -> int:
        return sum(c.outstanding for c in self._ch.values())

    def run(self, cases: int, *, rate: float | None = None, stall_timeout_s: float = 15.0) -> FuzzReport:
        """Send ``cases`` fuzz messages (at most ``rate`` per second when given), keeping at most
        ``window`` answers outstanding; then wait for the rest. Cases nobody answers within
        ``stall_timeout_s`` of silence are counted unanswered."""
        if self.generator is None:
            raise RuntimeError("connect() first")
        t0 = time.perf_counter()
        sent = 0
        last_answer = time.monotonic()
        while sent < cases or self._outstanding():
            while sent < cases and self._outstanding() < self.window:
                if rate and sent >= (time.perf_counter() - t0) * rate:
                    break
                self._send(self.generator.next())
                sent += 1
            if self._pump(1 if sent < cases else 50):
                last_answer = time.monotonic()
            elif time.monotonic() - last_answer > stall_timeout_s:
                break
        for c in self._ch.values():
            self.report.unanswered += c.outstanding
        self.report.wall_s = time.perf_counter() - t0
        return self.report


# ---------------------------------------------------------------------------------------------
# the scenario


def _start_worker(endpoint: str, bundle: Path, cases: int, seed: int, window: int, rate: float | None) -> subprocess.Popen:
    cfg = {"endpoint": endpoint, "bundle": str(bundle), "cases": cases, "seed": seed, "window": window, "rate": rate}
    return subprocess.Popen([sys.executable, "-m", "edgesplit.bench.fuzz", "--worker", json.dumps(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


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


def bench_fuzz(bundle_path: Path, frames: int, agents: int, *, fuzzers: int = 1, window: int = 16,
               rate: float | None = None, agent_fps: float = 50.0, baseline_s: float = 10.0, seed: int = 0,
               threads: int = 1, images: int = 64) -> dict:
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
        workers = [_start_worker(server.endpoint, bundle_path, frames // fuzzers + (i < frames % fuzzers), seed + i, window, rate)
                   for i in range(fuzzers)]
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
        "bench": "fuzz", "bundle": bundle.name, "agents": agents, "agent_fps": agent_fps, "fuzzers": fuzzers,
        "fuzz_window": window, "fuzz_rate": rate, "seed": seed, "server_threads": threads,
        "fuzzed_frames": report.cases, "fuzz": report.to_json(),
        "crashes": int(not alive) + int(exit_code != 0) + int("Traceback" in log),
        "server_alive_at_end": alive, "server_answers_ping": answers_ping,
        "valid_after_fuzz_ok": None if after is None else after.results == after.sent and after.wrong == 0,
        "server_exit_code_on_sigterm": exit_code, "server_log_tracebacks": log.count("Traceback"),
        "server_rss_mb_before": round(rss_before, 1), "server_rss_mb_after": round(rss_after, 1),
        "valid_baseline": b, "valid_under_fuzz": f,
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

    return bench_fuzz(Path(a.bundle or DEFAULT_BUNDLE), a.frames, a.agents, fuzzers=a.fuzzers, window=a.fuzz_window,
                      rate=a.fuzz_rate, agent_fps=a.agent_fps, baseline_s=a.baseline_s, seed=a.seed, threads=a.threads,
                      images=a.images)


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
