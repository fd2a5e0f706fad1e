"""The server daemon: one ROUTER socket, many agents, dynamic batching, one tail engine per bundle.

Threads and sockets (a pyzmq socket never leaves the thread that made it):

- **I/O thread** owns the ROUTER socket and polls it together with the read end of a wake-up
  socket pair. It receives and validates every message, answers handshakes, heartbeats and
  errors itself, queues valid requests in the :class:`~edgesplit.server.batcher.Batcher`, and
  forwards finished replies to the ROUTER. It never runs a model, so a slow tail never delays
  ingress.
- **compute thread** takes due batches from the batcher (it blocks in C on the batcher's queue,
  GIL released; an idle server hands a lone request over as a batch of one without touching the
  per-key queues), dequantizes each request straight into a reusable batch buffer (one per
  channel count, zero beyond the channels sent), runs the tail once, appends one packed reply
  per request (``[identity, header, logits]``) to a deque and then writes one byte to the wake-up
  pair: one wake-up per batch, not one per reply (two threads trading the GIL on each frame cost
  more than the work itself). The socket pair is not a ZeroMQ socket, so no ZeroMQ socket is
  ever shared; draining it is one ``recv`` call.

Hot path, measured (tools/bench_hotpath.py): messages are sent and received with one backend
call per frame (:func:`~edgesplit.wire.transport.send_parts`), requests are validated by exact-
type checks with the generic rules as fallback, results are packed from cached pieces
(:class:`~edgesplit.wire.protocol.ResultPacker`), 2/4-bit payloads are decoded with a 256-entry
table.

Requests arrive full (with their tensor descriptor) or, from agents that saw
``"compact_requests"`` in this server's welcome (protocol v1.1), compact: no descriptor, one
frame whose descriptor the bundle mode implies; the I/O thread checks its length against that
descriptor (:meth:`TailRunner.check_compact`) before anything is decoded, and from then on both
kinds are the same queued item.

Every failure is answered with an error message carrying a code; nothing a peer sends can stop
the daemon. SIGINT/SIGTERM (or :meth:`Server.stop`) drain: new requests get SHUTTING_DOWN,
queued ones are computed and answered, every session gets ``bye``, sockets close, exit 0.

In-process use (tests, benchmarks, ``edgesplit demo``)::

    with Server([bundle], "tcp://127.0.0.1:0") as srv:   # port 0: any free port
        agent = Agent(bundle, srv.endpoint).connect()
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import socket as _socket
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import zmq

from ..bundle import Bundle, BundleError
from ..engine import ACCELERATIONS, BACKENDS, PRECISIONS, EngineOptions  # numpy only: backends load lazily
from ..logs import LOG_FORMATS, setup_logging
from ..wire import codec, protocol as P
from ..wire.codec import ErrorCode, WireError
from ..wire.protocol import Kind, Limits, ProtocolError
from ..wire.curve import HANDSHAKE_EVENTS, ServerCurve, handshake_failure, read_monitor
from ..wire.transport import bind_router, context, recv_parts, send_parts
from .batcher import Batcher, Item
from .cli import build_parser, serve  # build_parser: re-exported
from .tail_runner import TailRunner
from .metrics import AUTH_FAILED_PREFIX, FOLD_EVERY_BATCHES, ModelStats

log = logging.getLogger("edgesplit.server")

# Plain ints: pyzmq's enum constants cost an enum construction per use on the hot path.
_POLLIN, _NOBLOCK = int(zmq.POLLIN), int(zmq.NOBLOCK)
# /health/live fails when the I/O loop (which turns at least every 0.5 s) has not for this long.
IO_STALL_S = 10.0


@dataclass
class Session:
    identity: bytes
    bundle: str          # bundle hash
    agent: str
    credits: int
    inflight: int = 0
    last_seen: float = 0.0
    last_ping: float = 0.0
    ping_nonce: int = -1         # nonce of the server's last ping (its pong gives rtt_us)
    # per-agent figures for the metrics (I/O thread only)
    requests: int = 0            # requests accepted
    bytes_in: int = 0            # message bytes received since the session started
    errors: int = 0              # error replies sent
    rtt_us: float | None = None  # last server ping -> pong round trip


class Server:
    """The daemon, usable in-process: ``start()`` runs it in background threads, ``stop()`` drains."""

    def __init__(self, bundles: Iterable[Bundle | str | Path], bind: str = "tcp://127.0.0.1:5555", *,
                 backend: str = "ort", threads: int | None = None, max_batch: int = 32,
                 max_queue_delay_us: float = 2000.0, max_queue: int = 1024, credits: int = 64,
                 preferred_batch_sizes: Sequence[int] = (),
                 heartbeat_ms: int = 5000, limits: Limits | None = None, name: str | None = None,
                 curve: ServerCurve | None = None, http_port: int | None = None, http_host: str = "127.0.0.1",
                 engine_options: EngineOptions | None = None):
        self.bundles: dict[str, Bundle] = {}
        for b in bundles:
            b = b if isinstance(b, Bundle) else Bundle.load(b)
            self.bundles[b.hash] = b
        if not self.bundles:
            raise ValueError("the server needs at least one bundle")
        self.bind = bind
        self.backend = backend
        self.threads = threads
        # The tail engines are sized for the batches this server makes (TensorRT profile, CUDA graphs).
        self.engine_options = EngineOptions.make(engine_options, max_batch=int(max_batch))
        self.credits = int(credits)
        self.heartbeat_ms = int(heartbeat_ms)
        # The advertised per-request row limit is the server's batch size: a request never splits.
        self.limits = replace(limits or Limits(), max_batch=int(max_batch))
        self.name = name or f"{_socket.gethostname()}:{os.getpid()}"
        self.batcher = Batcher(max_batch, max_queue_delay_us, max_queue, preferred=preferred_batch_sizes)
        self.runners: dict[str, TailRunner] = {}
        self.endpoint: str | None = None
        self.sessions: dict[bytes, Session] = {}
        self.counters: Counter = Counter()   # written by the I/O thread only
        self._ccounters: Counter = Counter()  # written by the compute thread only
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self.failed = False  # set when a server thread died of a bug (serve_main then exits 1)
        self._io_thread: threading.Thread | None = None
        self._compute_thread: threading.Thread | None = None
        self._wake_r: _socket.socket | None = None  # compute -> I/O wake-up line (made by the I/O thread)
        self._wake_w: _socket.socket | None = None
        self._replies: deque[list] = deque()  # compute thread appends, I/O thread pops
        self._result_packer = P.ResultPacker()  # compute thread only
        self._codecs = codec.supported_codecs()
        self.curve = curve  # CURVE encryption + agent key allow-list (None: plaintext)
        self._monitor: zmq.Socket | None = None  # the ROUTER's handshake-failure events (I/O thread)
        self._handshake_logged: dict[str, float] = {}  # reason -> when last logged
        self._io_turned = time.monotonic()  # last turn of the I/O loop's housekeeping (liveness)
        # Metrics (edgesplit/server/metrics.py), read at scrape time: per (bundle, mode) stats
        # (compute thread), request failures by (bundle hash or None, error name) per thread.
        self.model_stats = {(h, m.id): ModelStats(b.name, h[:12], m.id, self.batcher.max_batch)
                            for h, b in self.bundles.items() for m in b.modes}
        self._io_failures: dict[tuple[str | None, str], int] = {}
        self._compute_failures: dict[tuple[str | None, str], int] = {}
        self.http_port, self.http_host = http_port, http_host  # None: no HTTP endpoints
        self.http = None  # HttpEndpoints once started
        self._registry = None  # prometheus_client registry, made at the first scrape

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> "Server":
        """Load the tail engines, bind, and start the I/O and compute threads. Returns self once
        the socket is bound (``self.endpoint`` is the actual endpoint, port resolved). With
        ``http_port`` set, the HTTP endpoints come up first, so that /health/ready answers 503
        while the tails load."""
        if self.http_port is not None and self.http is None:
            from .httpd import HttpEndpoints

            self.http = HttpEndpoints(self.http_host, self.http_port, metrics=self.metrics_text,
                                      live=self.live, ready=self.ready).start()
            log.info("metrics and health on %s", self.http.url, extra={"event": "http", "url": self.http.url})
        try:
            for h, b in self.bundles.items():
                if h not in self.runners:
                    r = TailRunner(b, self.backend, self.threads, self.engine_options)
                    r.warmup()
                    self.runners[h] = r
            self._io_thread = threading.Thread(target=self._io_main, name="edgesplit-io", daemon=True)
            self._io_thread.start()
            if not self._ready.wait(timeout):
                raise RuntimeError("server I/O thread did not start")
            if self._startup_error is not None:
                raise self._startup_error
        except BaseException:
            self._stop_http()
            raise
        log.info("serving %s on %s", ", ".join(f"{b.name}@{h[:12]}" for h, b in self.bundles.items()), self.endpoint)
        return self

    def request_stop(self) -> None:
        """Ask for a drain and exit; safe from a signal handler; returns at once."""
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the server threads to finish; True when they have."""
        if self._io_thread is None:
            return True
        self._io_thread.join(timeout)
        return not self._io_thread.is_alive()

    def stop(self, timeout: float = 30.0) -> None:
        """Drain (finish queued requests, answer them, say bye) and close the sockets."""
        self.request_stop()
        if not self.wait(timeout):
            log.error("server did not stop within %.0f s", timeout)
        for r in self.runners.values():
            r.engine.close()
        self._stop_http()

    def _stop_http(self) -> None:
        if self.http is not None:
            self.http.stop()
            self.http = None

    # -- health and metrics (called from the HTTP thread) -------------------------------------
    def live(self) -> tuple[bool, str]:
        """Liveness: no daemon thread has died, and the I/O loop keeps turning."""
        if self.failed:
            return False, "a daemon thread died (see the log)"
        io = self._io_thread
        stalled = time.monotonic() - self._io_turned
        if io is not None and io.is_alive() and stalled > IO_STALL_S:
            return False, f"the I/O loop has not turned for {stalled:.0f} s"
        return True, ""

    def ready(self) -> tuple[bool, str]:
        """Readiness: tails loaded, socket bound, not draining, and live."""
        if self._startup_error is not None:
            return False, f"startup failed: {self._startup_error}"
        if not self._ready.is_set():
            return False, "starting: loading tails and binding the socket"
        if self._stop.is_set():
            return False, "draining: finishing queued requests before exit"
        ok, why = self.live()
        return (True, "") if ok else (False, why)

    def failure_counts(self) -> dict[tuple[str | None, str], int]:
        """Requests answered with an error, by (bundle hash or None, error name), both threads."""
        out = dict(self._io_failures)  # dict() copies in one step: safe while the owner thread writes
        for k, n in dict(self._compute_failures).items():
            out[k] = out.get(k, 0) + n
        return out

    def metrics_text(self) -> bytes:
        """The Prometheus text exposition of this server (what GET /metrics returns)."""
        if self._registry is None:
            from prometheus_client import CollectorRegistry, ProcessCollector

            from .metrics import ServerCollector

            reg = CollectorRegistry(auto_describe=False)
            reg.register(ServerCollector(self))
            ProcessCollector(registry=reg)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
            self._registry = reg
        from prometheus_client import generate_latest

        return generate_latest(self._registry)

    def __enter__(self) -> "Server":
        return self.start() if self._io_thread is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stats(self) -> dict[str, Any]:
        c = self.counters + self._ccounters
        return {"sessions": len(self.sessions), "queued": len(self.batcher), **dict(c)}

    # -- I/O thread ----------------------------------------------------------------------------
    def _io_main(self) -> None:
        # Under CURVE the daemon gets a ZeroMQ context of its own: the ZAP handler that checks agent
        # keys is per context, and it must run before the ROUTER binds (see edgesplit/wire/curve.py).
        ctx = zmq.Context() if self.curve is not None else context()
        auth = None
        self._io_turned = time.monotonic()  # liveness counts from here (tails may have loaded long)
        try:
            if self.curve is not None:
                auth = self.curve.start_authenticator(ctx)
            # Per-peer receive queue: credits bound what an agent may have outstanding, so an
            # obedient one never has more than that waiting; a peer that ignores them (or a burst
            # faster than the I/O thread) meets TCP back-pressure instead of piling messages up
            # in libzmq (at the old 100k per peer, 10x overload grew the daemon by 300 MB).
            router, self.endpoint = bind_router(self.bind, limits=self.limits, ctx=ctx, curve=self.curve,
                                                rcvhwm=2 * self.credits + 64)
            # Refused handshakes (a key not allowed, plaintext at a CURVE server, ...) never reach
            # the poll loop; libzmq reports them on a monitor socket that housekeeping reads.
            self._monitor = router.get_monitor_socket(HANDSHAKE_EVENTS)
            # Wake-up line compute thread -> I/O thread: a socket pair polled next to the ROUTER
            # (one byte per batch; draining it is one recv, cheaper than a zmq PULL socket).
            self._wake_r, self._wake_w = _socket.socketpair()
            self._wake_r.setblocking(False)
            self._wake_w.setblocking(False)
        except BaseException as e:  # reported by start()
            self._startup_error = e
            self._ready.set()
            self._release_context(ctx, auth)
            return
        self._compute_thread = threading.Thread(target=self._compute_main, name="edgesplit-compute", daemon=True)
        self._compute_thread.start()
        self._ready.set()
        wake_fd = self._wake_r.fileno()
        poll_items = [(router, _POLLIN), (wake_fd, _POLLIN)]
        zpoll = zmq.zmq_poll
        draining = False
        # sessions are checked several times per heartbeat interval (ping after 1, expire after 3)
        housekeeping_s = min(0.5, self.heartbeat_ms / 4000.0) if self.heartbeat_ms > 0 else 0.5
        poll_ms = min(100, max(1, int(housekeeping_s * 1000)))
        next_housekeeping = time.monotonic() + housekeeping_s
        monotonic = time.monotonic
        try:
            while True:
                # One message per poll: zmq_poll returns at once while more are queued, releases
                # the GIL while it waits, and sees replies and requests in the same call.
                for sock, _ in zpoll(poll_items, 20 if draining else poll_ms):
                    if sock is router:
                        try:
                            parts = recv_parts(router, _NOBLOCK)
                        except zmq.Again:  # readiness without a message: nothing to do
                            continue
                        self._on_message(router, parts, draining)
                    else:
                        self._forward_replies(router)
                now = monotonic()
                if now >= next_housekeeping:
                    self._housekeeping(router, now)
                    next_housekeeping = now + housekeeping_s
                    if not draining and not self._compute_thread.is_alive():  # only a bug gets here
                        log.error("compute thread died; shutting down")
                        self.failed = True
                        self._stop.set()
                if self._stop.is_set() and not draining:
                    draining = True
                    log.info("draining: %d queued requests", len(self.batcher))
                    self.batcher.close()
                if draining and not self._compute_thread.is_alive():
                    self._forward_replies(router)
                    for ident in list(self.sessions):
                        self._send(router, ident, P.bye("server shutting down"))
                    break
        except BaseException:  # pragma: no cover - a bug; keep the traceback in the log
            log.exception("I/O thread failed")
            self.failed = True
            self.batcher.close()
            raise
        finally:
            self.batcher.close()
            if self._compute_thread is not None:
                self._compute_thread.join(10)
            self._wake_r.close()
            self._wake_w.close()
            self._read_handshake_failures()
            router.disable_monitor()
            self._monitor.close(0)
            router.close(1000)
            self._release_context(ctx, auth)
            log.info("stopped: %s", self.stats(), extra={"event": "stopped", "stats": self.stats()})

    @staticmethod
    def _release_context(ctx: zmq.Context, auth) -> None:
        if auth is not None:
            auth.stop()
        if ctx is not context():  # the daemon's own (CURVE) context: waits for the ROUTER's linger
            ctx.term()

    def _send(self, router: zmq.Socket, identity: bytes, header: dict, frames: Sequence = ()) -> bool:
        try:
            send_parts(router, [identity, P.pack_header(header), *frames], _NOBLOCK)
            return True
        except zmq.ZMQError as e:
            self._peer_unreachable(identity, e)
            return False

    def _peer_unreachable(self, identity: bytes, e: zmq.ZMQError) -> None:
        if e.errno == zmq.EHOSTUNREACH:
            self.sessions.pop(identity, None)
            self.counters["dropped_unreachable"] += 1
        else:  # EAGAIN: the peer's pipe is full (credits make this rare)
            self.counters["dropped_full"] += 1

    def _error(self, router: zmq.Socket, identity: bytes, req_id: int | None, code: ErrorCode, message: str) -> None:
        self.counters[f"error_{code.name}"] += 1
        s = self.sessions.get(identity)
        if s is not None:
            s.errors += 1
        if req_id is not None:  # only requests carry an id: an inference request failed (metrics)
            key = (s.bundle if s is not None else None, code.name)
            self._io_failures[key] = self._io_failures.get(key, 0) + 1
        self._send(router, identity, P.error(req_id, code, message))

    def _forward_replies(self, router: zmq.Socket) -> None:
        try:  # wake-up bytes, one per batch: read them all at once (more than 4096 wakes the poll again)
            self._wake_r.recv(4096)
        except (BlockingIOError, InterruptedError):
            pass
        replies = self._replies
        sessions = self.sessions
        while replies:
            parts = replies.popleft()
            identity = parts[0]
            s = sessions.get(identity)
            if s is not None:
                if s.inflight > 0:
                    s.inflight -= 1
                if len(parts) == 2:  # [identity, header]: an error (a result also carries logits)
                    s.errors += 1
            try:
                send_parts(router, parts, _NOBLOCK)
            except zmq.ZMQError as e:
                self._peer_unreachable(identity, e)

    def _on_message(self, router: zmq.Socket, parts: list[bytes], draining: bool) -> None:
        t_recv = time.perf_counter_ns()
        self.counters["messages"] += 1
        if len(parts) < 2:  # ROUTER always prepends the identity; an empty message carries nothing
            return
        identity = parts[0]
        try:
            msg = P.parse(parts[1:], self.limits)
            session = self.sessions.get(identity)
            if session is not None:
                session.last_seen = time.monotonic()
                # a request is [identity, header, tensor]; anything else is rare enough to sum
                session.bytes_in += len(parts[1]) + len(parts[2]) if len(parts) == 3 else sum(map(len, parts[1:]))
            kind = msg.kind
            if kind == Kind.REQUEST:
                self._on_request(router, identity, session, msg, t_recv, draining)
            elif kind == Kind.HELLO:
                self._on_hello(router, identity, msg, draining)
            elif kind == Kind.PING:
                self._send(router, identity, P.pong(msg.header["nonce"], time.time_ns()))
            elif kind == Kind.PONG:
                if session is not None and msg.header["nonce"] == session.ping_nonce:
                    # the nonce is the monotonic microsecond the ping left (see _housekeeping)
                    session.rtt_us = time.monotonic() * 1e6 - session.ping_nonce
            elif kind == Kind.BYE:
                self.sessions.pop(identity, None)
            elif kind == Kind.ERROR:
                log.info("agent %r reported error %s: %s", identity, msg.header.get("name"), msg.header.get("message"))
            else:
                raise ProtocolError(ErrorCode.MALFORMED, f"'{kind}' is not a message an agent sends to a server", msg.id)
        except ProtocolError as e:
            self._error(router, identity, e.req_id, e.code, e.message)
        except Exception as e:  # a bug: answer INTERNAL and keep serving
            log.exception("failed to handle a message")
            self._error(router, identity, None, ErrorCode.INTERNAL, f"{type(e).__name__}: {e}")

    def _on_hello(self, router: zmq.Socket, identity: bytes, msg: P.Message, draining: bool) -> None:
        h = msg.header
        if draining:
            raise ProtocolError(ErrorCode.SHUTTING_DOWN, "server is shutting down")
        bundle = self.bundles.get(h["bundle"])
        if bundle is None:
            raise ProtocolError(ErrorCode.UNKNOWN_BUNDLE,
                                f"bundle {h['bundle'][:16]}... is not loaded here (loaded: "
                                f"{', '.join(f'{b.name}={k[:16]}...' for k, b in self.bundles.items())})")
        credits = max(1, min(self.credits, h["caps"]["max_inflight"]))
        old = self.sessions.get(identity)
        now = time.monotonic()
        if old is not None:  # a re-handshake on the same connection keeps in-flight work and figures
            s = replace(old, bundle=bundle.hash, agent=h["agent"], credits=credits, last_seen=now, last_ping=now)
        else:
            s = Session(identity, bundle.hash, h["agent"], credits, last_seen=now, last_ping=now)
        self.sessions[identity] = s
        self.counters["sessions_opened"] += 1
        log.info("hello from %s (%s): bundle %s, %d credits", h["agent"], identity.hex(), bundle.name, credits,
                 extra={"event": "hello", "agent": h["agent"], "identity": identity.hex(), "bundle": bundle.name,
                        "credits": credits})
        self._send(router, identity, P.welcome(bundle.hash, self.name, credits=credits, limits=self.limits,
                                               heartbeat_ms=self.heartbeat_ms, codecs=self._codecs,
                                               features=P.SERVER_FEATURES))

    def _on_request(self, router: zmq.Socket, identity: bytes, session: Session | None, msg: P.Message,
                    t_recv: int, draining: bool) -> None:
        h = msg.header
        rid = h["id"]
        if session is None:
            raise ProtocolError(ErrorCode.NOT_READY, "no session: send hello first (or again, after a reconnect)", rid)
        if draining:
            raise ProtocolError(ErrorCode.SHUTTING_DOWN, "server is shutting down", rid)
        runner = self.runners[session.bundle]
        tensors = h.get("tensors")
        if tensors is None:  # v1.1 compact request: parse() saw exactly one frame; one row, raw
            d = runner.check_compact(h["mode"], msg.frames[0], rid)
            rows, single = 1, True
        else:
            if len(msg.frames) != 1:
                raise ProtocolError(ErrorCode.MALFORMED, f"a v1 request carries exactly one tensor, got {len(msg.frames)}", rid)
            d = tensors[0]
            if d["codec"] not in self._codecs:
                raise ProtocolError(ErrorCode.UNSUPPORTED, f"codec '{d['codec']}' is not available on this server", rid)
            rows, single = runner.check(h["mode"], d, rid)
            if rows > self.batcher.max_batch:
                raise ProtocolError(ErrorCode.TOO_LARGE, f"{rows} rows in one request, over max batch {self.batcher.max_batch}", rid)
        if session.inflight >= session.credits:
            raise ProtocolError(ErrorCode.OVERLOADED, f"credits exceeded: {session.inflight} requests in flight, {session.credits} allowed", rid)
        deadline = h.get("deadline_ms")
        key = (session.bundle, h["mode"])
        deadline_ns = None
        if deadline is not None:
            deadline_ns = t_recv + int(deadline * 1e6)
            # Refused now rather than answered late: the queue ahead plus its own batch would take
            # longer than the deadline allows. This keeps the queue as short as the deadlines
            # need under overload (a full 1024-request queue is seconds of work; without this
            # check it filled with requests that could only expire).
            wait = self.batcher.expected_wait_ns(key, rows)
            if t_recv + wait >= deadline_ns:
                raise ProtocolError(ErrorCode.DEADLINE_EXCEEDED,
                                    f"deadline {deadline} ms cannot be met: the {len(self.batcher)} requests queued and "
                                    f"its own batch need about {wait / 1e6:.1f} ms; not queued", rid)
        item = Item(key=key, identity=identity, req_id=rid, desc=d, payload=msg.frames[0],
                    rows=rows, single=single, t_recv_ns=t_recv, deadline_ns=deadline_ns,
                    t_send_ns=h.get("t_send_ns"))
        if not self.batcher.put(item):
            raise ProtocolError(ErrorCode.OVERLOADED, f"server queue full ({self.batcher.max_queue} requests waiting)", rid)
        session.inflight += 1
        session.requests += 1
        self.counters["requests"] += 1

    def _housekeeping(self, router: zmq.Socket, now: float) -> None:
        self._io_turned = now
        self._read_handshake_failures()
        if self.heartbeat_ms <= 0:
            return
        hb = self.heartbeat_ms / 1000.0
        for ident, s in list(self.sessions.items()):
            idle = now - s.last_seen
            if idle > 3 * hb and s.inflight == 0:
                log.info("session %s (%s) timed out after %.1f s of silence", s.agent, ident.hex(), idle,
                         extra={"event": "session_expired", "agent": s.agent, "identity": ident.hex()})
                del self.sessions[ident]
                self.counters["sessions_expired"] += 1
            elif now - s.last_ping > hb:
                # Every session is pinged once per interval, busy or not: a silent one to see
                # whether it is still there, and each pong measures the agent's round trip.
                s.last_ping = now
                s.ping_nonce = int(now * 1e6)
                self._send(router, ident, P.ping(s.ping_nonce, time.time_ns()))

    def _read_handshake_failures(self) -> None:
        """Count and log the connections libzmq refused during the handshake since the last call."""
        for event, value in read_monitor(self._monitor):
            reason = handshake_failure(event, value)
            if reason is None:
                continue
            key = AUTH_FAILED_PREFIX + reason
            self.counters[key] += 1
            # A refused peer retries every few seconds: log each reason at most every 10 s.
            now = time.monotonic()
            if now - self._handshake_logged.get(reason, -1e9) >= 10.0:
                self._handshake_logged[reason] = now
                log.warning("refused a connection in the security handshake: %s (%d so far)", reason, self.counters[key],
                            extra={"event": "handshake_failed", "reason": reason, "total": self.counters[key]})

    # -- compute thread ------------------------------------------------------------------------
    def _compute_main(self) -> None:
        wake = self._wake_w
        fold_in = FOLD_EVERY_BATCHES
        try:
            while True:
                batch = self.batcher.next_batch()  # None: closed and drained
                if batch is None:
                    return
                try:
                    self._run_batch(batch)
                except Exception as e:  # never let one batch kill the daemon
                    log.exception("batch failed")
                    for it in batch:
                        if not it.answered:
                            self._push_error(it, ErrorCode.INTERNAL, f"{type(e).__name__}: {e}")
                self._wake_io(wake)  # this batch's replies are in the deque
                fold_in -= 1
                if not fold_in:  # metrics: recorded figures -> histogram counts, off the reply path
                    fold_in = FOLD_EVERY_BATCHES
                    for stats in self.model_stats.values():
                        stats.fold()
        finally:
            self._wake_io(wake)  # so that the I/O thread sees at once that this thread ended

    @staticmethod
    def _wake_io(wake: _socket.socket) -> None:
        try:
            wake.send(b"\0")
        except (BlockingIOError, InterruptedError):  # the line is full: a wake-up is pending anyway
            pass
        except OSError:  # closed during shutdown
            pass

    def _push(self, identity: bytes, header: dict, frames: Sequence = ()) -> None:
        self._replies.append([identity, P.pack_header(header), *frames])

    def _push_error(self, it: Item, code: ErrorCode, message: str) -> None:
        self._ccounters[f"error_{code.name}"] += 1
        key = (it.key[0], code.name)
        self._compute_failures[key] = self._compute_failures.get(key, 0) + 1
        self._push(it.identity, P.error(it.req_id, code, message))
        it.answered = True

    def _run_batch(self, batch: list[Item]) -> None:
        t0 = time.perf_counter_ns()
        # A request whose deadline falls before this batch can finish (now + the expected time
        # of a batch this size, Batcher.expected_compute_ns) is not computed. Under overload the
        # queue's head holds the oldest requests: computing them answers them late and lets the
        # fresher ones behind them age (edgesplit bench overload, 10x capacity: 89% of the
        # results came back after their deadline when only "already passed" was refused).
        expected = self.batcher.expected_compute_ns(batch[0].key, sum(it.rows for it in batch))
        finish = t0 + expected
        live = batch
        for it in batch:
            if it.deadline_ns is not None and finish >= it.deadline_ns:
                live = []
                break
        if not live:  # some deadline cannot be met (rare unless overloaded): answer those, keep the rest
            for it in batch:
                if it.deadline_ns is not None and finish >= it.deadline_ns:
                    queued = (t0 - it.t_recv_ns) / 1e6
                    if t0 >= it.deadline_ns:
                        why = f"deadline passed {(t0 - it.deadline_ns) / 1e6:.3f} ms before compute could start"
                    else:
                        why = (f"deadline is {(it.deadline_ns - t0) / 1e6:.3f} ms away, less than the tail's recent "
                               f"batch time {expected / 1e6:.3f} ms")
                    self._push_error(it, ErrorCode.DEADLINE_EXCEEDED, f"{why} (queued {queued:.3f} ms); not computed")
                else:
                    live.append(it)
            if not live:
                return
        runner = self.runners[live[0].key[0]]
        try:
            logits, offsets, errors = runner.run(live)
        except Exception as e:
            log.exception("tail failed")
            for it in live:
                self._push_error(it, ErrorCode.INTERNAL, f"tail failed: {type(e).__name__}: {e}")
            return
        t1 = time.perf_counter_ns()
        rows = sum(it.rows for i, it in enumerate(live) if i not in errors) if errors else sum(it.rows for it in live)
        self.batcher.note_compute(live[0].key, (t1 - t0) / 1e9, rows)
        compute_us = (t1 - t0) / 1e3
        cc = self._ccounters
        cc["batches"] += 1
        cc["rows"] += rows
        replies = self._replies
        pack = self._result_packer.pack
        # Metrics are recorded before each reply is queued: once an agent holds a result, a scrape
        # counts it.
        stats = self.model_stats[live[0].key]
        stats.batches.append((rows, len(live) - len(errors), compute_us))
        record_queue, record_request = stats.queue_us.append, stats.request_us.append
        for i, it in enumerate(live):
            if errors and i in errors:
                self._push_error(it, errors[i].code, errors[i].message)
                continue
            r = offsets[i]
            out = logits[r] if it.single else logits[r: r + it.rows]
            t_reply = time.perf_counter_ns()
            queue_us, server_us = (t0 - it.t_recv_ns) / 1e3, (t_reply - it.t_recv_ns) / 1e3
            header = pack(it.req_id, runner.outputs_for(out.shape), queue_us=queue_us,
                          compute_us=compute_us, batch_size=rows, server_us=server_us,
                          t_send_ns=it.t_send_ns)
            record_queue(queue_us)
            record_request(server_us)
            replies.append([it.identity, header, out.tobytes()])
            it.answered = True
        cc["results"] += len(live) - len(errors)


# ---------------------------------------------------------------------------------------------
# CLI entry: `edgesplit serve ...` and `python -m edgesplit.server.daemon ...` (edgesplit/server/cli.py)


def serve_main(args_list: list[str] | None = None) -> int:
    """Run the daemon until SIGINT/SIGTERM. Returns the process exit code."""
    return serve(args_list, Server)


if __name__ == "__main__":
    sys.exit(serve_main(sys.argv[1:]))
