"""The fuzz worker's client of ``edgesplit bench fuzz``: sends :mod:`edgesplit.wire.fuzz` cases
over three DEALER sockets and checks every answer against what docs/PROTOCOL.md says is due
(:class:`FuzzClient`), tallied in a :class:`FuzzReport`.

The one client that does not drive :class:`~edgesplit.wire.client_session.ClientSession`, on
purpose: the session refuses to send what the fuzzer must send (malformed frames, duplicate and
foreign ids, requests on no session, credits overrun) and would resend or reconnect where the fuzzer
must see the server's raw answer. It speaks the handshake itself and nothing else of the session's
logic (no credits, resends or heartbeats), and checks each answer against PROTOCOL.md."""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field

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
    answers: Counter = field(default_factory=Counter)  # outcome name -> count (matched channels)
    mismatches: int = 0
    examples: list = field(default_factory=list)  # the first mismatches, for the reader
    unexpected: int = 0  # answers matching no case sent
    unanswered: int = 0
    chaos_sent: int = 0
    chaos_answers: int = 0
    internal: int = 0  # INTERNAL answers on any channel
    bytes_sent: int = 0
    wall_s: float = 0.0

    def to_json(self) -> dict:
        return {
            "cases": self.cases,
            "cases_per_s": round(self.cases / self.wall_s, 1) if self.wall_s else None,
            "bytes_sent": self.bytes_sent,
            "by_class": dict(sorted(self.by_class.items())),
            "answers": dict(sorted(self.answers.items())),
            "mismatches": self.mismatches,
            "mismatch_examples": self.examples,
            "unexpected": self.unexpected,
            "unanswered": self.unanswered,
            "chaos_sent": self.chaos_sent,
            "chaos_answers": self.chaos_answers,
            "internal_errors": self.internal,
            "wall_s": round(self.wall_s, 2),
        }

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

    def __init__(
        self,
        endpoint: str,
        bundle: Bundle,
        *,
        seed: int = 0,
        window: int = 16,
        classes: list[str] | None = None,
        ctx: zmq.Context | None = None,
    ):
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
                ex.update(
                    {
                        "class": case.cls,
                        "variant": case.variant,
                        "reply_id": case.reply_id,
                        "expected": sorted(outcome_name(e) if isinstance(e, int) else e for e in case.expect),
                    }
                )
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
