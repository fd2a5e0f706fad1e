"""Load generation for the server benchmarks: many protocol sessions driven from one thread.

Why not N ``Agent`` objects (or N processes)? On the 2-core CI box every microsecond the client
spends is taken from the server it measures. A real agent runs its head, encodes, and keeps
per-frame records; a load generator needs none of that. So :class:`LoadClient` opens N DEALER
sockets (N sessions: N hellos, N credit windows, N routing ids, exactly what N agents are to the
server), sends **precomputed** wire payloads (real images through the bundle's head, encoded
once), and services all sockets from one ``zmq.Poller`` loop. Each socket's protocol is the same
:class:`~edgesplit.wire.client_session.ClientSession` the agent drives (hello/welcome, credits,
request ids and forms, pongs, late answers): per request it packs a 27-byte compact header and
makes two backend send calls; per reply the session validates the header with the protocol's own
parser. That costs a few tens of microseconds per frame, well under what the server spends, so
the server is the bottleneck being measured. (Unlike the agent, it counts NOT_READY refusals.)

Two drivers:

- :meth:`LoadClient.closed_loop`: each session keeps up to ``window`` requests outstanding and,
  optionally, paces itself to ``fps`` (a camera), sending the next frame when an answer arrives.
- :meth:`LoadClient.open_loop`: requests leave at a fixed total rate whatever the answers (an
  overload test offers more than the server can take, so the client must not slow down with it).

Every request is tracked until its one answer: :class:`LoadStats` counts results, errors by name,
answers that match no outstanding request (``unexpected``) and requests never answered
(``unanswered``), and checks each result's logits against the expected ones when given.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import zmq

from ..bundle import Bundle
from ..wire import codec
from ..wire import protocol as P
from ..wire.client_session import Answered, Backoff, BadMessage, ClientSession, LateAnswer, Lost, Ponged, Refused, Send
from ..wire.transport import connect_dealer, context, recv_parts, send_parts
from .load_stats import LoadStats

_NOBLOCK = int(zmq.NOBLOCK)


@dataclass
class Workload:
    """What the requests carry: wire payloads of one mode (raw, compact-sized) and, optionally,
    the logits each should come back with."""

    mode: int
    payloads: list[bytes]
    expected: np.ndarray | None = None  # [len(payloads), K]


def head_workload(
    bundle: Bundle, n: int = 64, mode: int | None = None, source: str | None = None, threads: int | None = 1
) -> Workload:
    """``n`` real images of the bundle's dataset through its head (ONNX Runtime), encoded in
    ``mode``; expected logits from the bundle's tail run locally on the decoded tensors (what the
    server must answer, up to batch-size rounding)."""
    from ..data.sources import open_source, take
    from ..data.transforms import preprocess
    from ..engine import create_engine
    from ..loopback import DEFAULT_SOURCES

    if source is None:
        source = next((v for k, v in DEFAULT_SOURCES.items() if bundle.name.startswith(k)), None)
        if source is None:
            raise ValueError(f"no default image source for bundle '{bundle.name}': pass one")
    m = bundle.default_mode if mode is None else bundle.mode(mode)
    samples = list(take(open_source(source, bundle.classes), n))
    x = np.stack([preprocess(s.data, bundle.input_spec) for s in samples])
    z = create_engine(bundle.file("head"), "ort", threads=threads).run1(x)
    C = int(bundle.wire_spec["shape"][0])
    payloads, decoded = [], []
    for zi in z:
        d, p = codec.encode(zi, m, name=bundle.wire_spec["name"])
        payloads.append(p)
        decoded.append(codec.decode(d, p, full_channels=C))
    tail = create_engine(bundle.file("tail"), "ort", threads=threads)
    expected = np.concatenate([tail.run1(np.stack(decoded[i : i + 32])) for i in range(0, len(decoded), 32)])
    return Workload(m.id, payloads, expected.astype(np.float32))


class _Session:  # one socket and the protocol session it carries
    __slots__ = ("sock", "proto", "next_send_ns")

    def __init__(self, sock: zmq.Socket, proto: ClientSession):
        self.sock = sock
        self.proto = proto
        self.next_send_ns = 0

    @property
    def welcomed(self) -> bool:
        return self.proto.welcome is not None


class LoadClient:
    """``sessions`` protocol sessions to one server, driven from the calling thread."""

    def __init__(
        self,
        endpoint: str,
        bundle: Bundle,
        sessions: int,
        workload: Workload,
        *,
        max_inflight: int = 1 << 20,
        tolerance: float = 1e-3,
        name: str = "load",
        send_hwm: int = 10_000,
        ctx: zmq.Context | None = None,
    ):
        """``send_hwm``: messages each socket queues before a send is refused (counted as
        ``send_refused``); an overload test keeps it small, so that a server pushing back (TCP)
        shows as refused sends rather than as requests aging in this client's own buffers."""
        self.endpoint = endpoint
        self.bundle = bundle
        self.workload = workload
        self.max_inflight = max_inflight
        self.tolerance = tolerance
        self.name = name
        self._ctx = ctx or context()
        self._desc = P.compact_descriptor(
            bundle.wire_spec["name"], bundle.wire_spec["shape"], bundle.mode(workload.mode)
        )
        # hellos retried about once a second while the server starts; pongs without a clock
        self._sessions = [
            _Session(
                connect_dealer(endpoint, ctx=self._ctx, hwm=send_hwm),
                ClientSession(
                    bundle.hash,
                    name,
                    max_inflight=max_inflight,
                    implicit={workload.mode: self._desc},
                    codecs=list(codec.CODECS),
                    backoff=Backoff(1.0, 1.0),
                    retry_not_ready=False,
                    wall_clock=None,
                    peer=endpoint,
                ),
            )
            for _ in range(int(sessions))
        ]
        self._by_sock = {s.sock: s for s in self._sessions}
        self._poller = zmq.Poller()
        for s in self._sessions:
            self._poller.register(s.sock, zmq.POLLIN)
        self._next_payload = 0
        self._pong = False
        self._stats = LoadStats()

    # -- session setup ------------------------------------------------------------------------
    def connect(self, timeout_s: float = 30.0) -> "LoadClient":
        """Say hello on every session and wait for every welcome (retrying the hellos while the
        server is still starting)."""
        end = time.monotonic() + timeout_s
        now_ns = time.perf_counter_ns()
        for s in self._sessions:
            send_parts(s.sock, s.proto.hello(now_ns))
        while not all(s.welcomed for s in self._sessions):
            if time.monotonic() > end:
                raise TimeoutError(f"no welcome from {self.endpoint} on every session within {timeout_s:.0f} s")
            now_ns = time.perf_counter_ns()
            for s in self._sessions:
                if not s.welcomed:
                    for ev in s.proto.tick(now_ns):  # hello retries
                        if type(ev) is Send:
                            send_parts(s.sock, ev.parts)
            self._pump(100, self._stats)
        return self

    def close(self) -> None:
        bye = P.pack(P.bye("load generator done"))
        for s in self._sessions:
            try:
                send_parts(s.sock, bye, _NOBLOCK)
            except zmq.ZMQError:
                pass
            s.sock.close(linger=100)
        self._sessions = []

    def __enter__(self) -> "LoadClient":
        return self.connect()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- sending and receiving ----------------------------------------------------------------
    def _send(self, s: _Session, stats: LoadStats, deadline_ms: float | None) -> bool:
        wl = self.workload
        idx = self._next_payload
        self._next_payload = (idx + 1) % len(wl.payloads)
        req, parts = s.proto.request(
            wl.mode, self._desc, wl.payloads[idx], time.perf_counter_ns(), deadline_ms=deadline_ms, tag=idx
        )
        if parts is None:  # no session (the server said bye): nothing to send it to
            s.proto.forget(req.rid)
            stats.no_session += 1
            return False
        try:
            send_parts(s.sock, parts, _NOBLOCK)
        except zmq.Again:  # this client's own send queue is full: not the server's doing
            s.proto.forget(req.rid)
            stats.send_refused += 1
            return False
        stats.sent += 1
        return True

    def _pump(self, timeout_ms: int, stats: LoadStats, window_end_ns: int | None = None) -> int:
        """Wait up to ``timeout_ms`` for replies and handle all that are there. Returns how many
        request answers arrived."""
        n = 0
        for sock, _ in self._poller.poll(timeout_ms):
            s = self._by_sock[sock]
            while True:
                try:
                    parts = recv_parts(sock, _NOBLOCK)
                except zmq.Again:
                    break
                n += self._on_reply(s, parts, stats, window_end_ns)
        return n

    def _on_reply(self, s: _Session, parts: list, stats: LoadStats, window_end_ns: int | None) -> int:
        t = time.perf_counter_ns()
        n = 0
        for ev in s.proto.receive(parts, t):
            kind = type(ev)
            if kind is Answered:
                n += 1
                stats.results += 1
                if window_end_ns is None or t <= window_end_ns:
                    stats.results_in_window += 1
                stats.rtt_ms.append((t - ev.request.t_send_ns) / 1e6)
                stats.server_ms.append(ev.timings.server_us / 1e3)
                stats.batch_sizes.append(ev.timings.batch_size)
                exp = self.workload.expected
                if exp is not None:
                    got = np.frombuffer(ev.frames[0], "<f4")
                    ref = exp[ev.request.tag]
                    err = float(np.max(np.abs(got - ref))) if got.shape == ref.shape else float("inf")
                    stats.max_abs_err = max(stats.max_abs_err, err)
                    if err > self.tolerance * max(1.0, float(np.max(np.abs(ref)))):
                        stats.wrong += 1
            elif kind is Refused:
                if ev.rid is not None:
                    n += 1
                    stats.errors[ev.code.name] += 1
                elif not s.welcomed:
                    raise RuntimeError(f"server refused the session: {ev.code.name}: {ev.message}")
                else:
                    stats.unexpected += 1
            elif kind is LateAnswer:
                stats.unexpected += 1
            elif kind is Send:  # a pong
                send_parts(s.sock, ev.parts, _NOBLOCK)
            elif kind is Ponged:
                self._pong = True
            elif kind is Lost:  # the server said bye: what it still owed will not come
                stats.server_bye = True
                stats.unanswered += len(ev.requests)
            elif kind is BadMessage:
                stats.errors[f"bad reply: {ev.code.name}"] += 1
        return n

    def _drain(self, stats: LoadStats, timeout_s: float) -> None:
        """Wait for the answers still due; what is left after ``timeout_s`` of silence is unanswered."""
        last = time.monotonic()
        while any(s.proto.outstanding for s in self._sessions):
            if self._pump(50, stats):
                last = time.monotonic()
            elif time.monotonic() - last > timeout_s:
                break
        for s in self._sessions:
            stats.unanswered += len(s.proto.outstanding)
            for rid in list(s.proto.outstanding):
                s.proto.abandon(rid)  # an answer after all counts as unexpected

    # -- drivers -------------------------------------------------------------------------------
    def closed_loop(
        self,
        seconds: float | None = None,
        *,
        requests: int | None = None,
        window: int = 1,
        fps: float | None = None,
        until: Callable[[], bool] | None = None,
        deadline_ms: float | None = None,
        drain_timeout_s: float = 10.0,
    ) -> LoadStats:
        """Each session keeps up to ``window`` requests outstanding (never more than the credits
        its welcome granted; paced to ``fps`` per session when given) until ``seconds`` pass,
        ``requests`` have been sent, or ``until()`` is true."""
        if seconds is None and requests is None and until is None:
            raise ValueError("closed_loop needs seconds, requests or until")
        stats = LoadStats(deadline_ms=deadline_ms)
        period_ns = int(1e9 / fps) if fps else 0
        t0 = time.perf_counter_ns()
        end_ns = None if seconds is None else t0 + int(seconds * 1e9)
        for i, s in enumerate(self._sessions):  # spread the sessions' first frames over one period
            s.next_send_ns = t0 + period_ns * i // len(self._sessions)
        while True:
            now = time.perf_counter_ns()
            if (
                (end_ns is not None and now >= end_ns)
                or (requests is not None and stats.sent >= requests)
                or (until is not None and until())
            ):
                break
            wake = now + 20_000_000
            for s in self._sessions:
                while len(s.proto.outstanding) < min(window, s.proto.credits) and now >= s.next_send_ns:
                    if requests is not None and stats.sent >= requests:
                        break
                    if not self._send(s, stats, deadline_ms):
                        break
                    if period_ns:
                        # next frame one period later; a session that fell behind does not burst
                        s.next_send_ns = max(s.next_send_ns + period_ns, now - period_ns)
                if period_ns and len(s.proto.outstanding) < min(window, s.proto.credits):
                    wake = min(wake, s.next_send_ns)
            timeout_ms = max(0, (wake - time.perf_counter_ns()) // 1_000_000)
            self._pump(int(timeout_ms), stats, end_ns)
        stats.window_s = (time.perf_counter_ns() - t0) / 1e9
        self._drain(stats, drain_timeout_s)
        return stats

    def open_loop(
        self, rate: float, seconds: float, *, deadline_ms: float | None = None, drain_timeout_s: float = 10.0
    ) -> LoadStats:
        """Send ``rate`` requests/s in total, round-robin over the sessions, for ``seconds``,
        whatever comes back; then wait for every answer."""
        stats = LoadStats(deadline_ms=deadline_ms)
        t0 = time.perf_counter_ns()
        end_ns = t0 + int(seconds * 1e9)
        sessions = self._sessions
        k = 0
        while True:
            now = time.perf_counter_ns()
            if now >= end_ns:
                break
            due = int((now - t0) * rate / 1e9) + 1
            burst = 0
            while stats.sent + stats.send_refused + stats.no_session < due and burst < 512:
                self._send(sessions[k], stats, deadline_ms)
                k = (k + 1) % len(sessions)
                burst += 1
            behind = stats.sent + stats.send_refused + stats.no_session < int(
                (time.perf_counter_ns() - t0) * rate / 1e9
            )
            self._pump(0 if behind else 1, stats, end_ns)
        stats.window_s = (time.perf_counter_ns() - t0) / 1e9
        self._drain(stats, drain_timeout_s)
        return stats

    def ping(self, timeout_s: float = 5.0) -> bool:
        """Whether the server answers a ping on the first session within ``timeout_s``."""
        self._pong = False
        s = self._sessions[0]
        send_parts(s.sock, s.proto.ping(time.perf_counter_ns(), nonce=12345))
        end = time.monotonic() + timeout_s
        while not self._pong and time.monotonic() < end:
            self._pump(50, self._stats)
        return self._pong
