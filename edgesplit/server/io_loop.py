"""The daemon's I/O thread: the ROUTER socket, and nothing that runs a model.

It polls the ROUTER together with the read end of the compute thread's wake-up line, parses every
message (:func:`edgesplit.wire.protocol.parse`), hands it to the :class:`SessionTable` and sends
what the table answers; valid requests go from the table to the scheduler. On a wake-up it
forwards the finished replies the compute thread queued. A slow tail never delays ingress.

Hot path (tools/bench_hotpath.py measures it): messages are sent and received with one backend
call per frame (:func:`~edgesplit.wire.transport.send_parts`), requests are validated by
exact-type checks with the generic rules as fallback, results arrive packed from cached pieces.

Drain (``stop`` set): new hellos and requests get SHUTTING_DOWN, the scheduler closes (what it
holds becomes due at once), the compute thread answers everything queued, the replies go out,
every session gets ``bye``, sockets close.
"""

from __future__ import annotations

import logging
import socket as _socket
import threading
import time
from collections import deque
from typing import Any

import zmq

from ..wire import protocol as P
from ..wire.curve import HANDSHAKE_EVENTS, ServerCurve, handshake_failure, read_monitor
from ..wire.errors import ErrorCode, ProtocolError
from ..wire.messages import ErrorReply
from ..wire.ota import AGENT_KINDS as OTA_AGENT_KINDS
from ..wire.ota import FEATURE_BUNDLE_UPDATES
from ..wire.transport import bind_router, context, recv_parts, send_parts
from .batcher import Batcher
from .compute import ComputeWorker
from .ota import BundleDistributor
from .sessions import Header, SessionTable
from .stats import ServerStats

log = logging.getLogger("edgesplit.server")

# Plain ints: pyzmq's enum constants cost an enum construction per use on the hot path.
_POLLIN, _NOBLOCK = int(zmq.POLLIN), int(zmq.NOBLOCK)


class IoLoop:
    """Run by the daemon's I/O thread (:meth:`run`); it starts the compute thread once bound."""

    def __init__(
        self,
        bind: str,
        table: SessionTable,
        scheduler: Batcher,
        compute: ComputeWorker,
        stats: ServerStats,
        replies: deque,
        stop: threading.Event,
        *,
        curve: ServerCurve | None = None,
        ota: BundleDistributor | None = None,
    ):
        self.bind, self.table, self.scheduler, self.compute = bind, table, scheduler, compute
        self.ota = ota  # v1.3 bundle updates (PROTOCOL.md §14), None: not offered
        # what a message from a routing id without a session is parsed with: with updates on, a
        # bundle_get before hello is NOT_READY rather than an unknown kind
        self._no_session_features = frozenset((FEATURE_BUNDLE_UPDATES,)) if ota is not None else frozenset()
        self.stats, self.counters = stats, stats.io
        self.replies = replies  # the compute thread appends, this thread pops
        self.stop = stop
        self.curve = curve  # CURVE encryption + agent key allow-list (None: plaintext)
        self.endpoint: str | None = None
        self.ready = threading.Event()  # set once bound (or failed: startup_error)
        self.startup_error: BaseException | None = None
        self.failed = False  # a daemon thread died of a bug
        self.turned = time.monotonic()  # last turn of the housekeeping (liveness)
        self.compute_thread: threading.Thread | None = None
        self._handshake_logged: dict[str, float] = {}  # reason -> when last logged

    def run(self) -> None:
        # Under CURVE the daemon gets a ZeroMQ context of its own: the ZAP handler that checks agent
        # keys is per context, and it must run before the ROUTER binds (see edgesplit/wire/curve.py).
        ctx = zmq.Context() if self.curve is not None else context()
        auth = None
        self.turned = time.monotonic()  # liveness counts from here (tails may have loaded long)
        try:
            if self.curve is not None:
                auth = self.curve.start_authenticator(ctx)
            # Per-peer receive queue: credits bound what an agent may have outstanding, so an
            # obedient one never has more than that waiting; a peer that ignores them (or a burst
            # faster than the I/O thread) meets TCP back-pressure instead of piling messages up
            # in libzmq (docs/BENCHMARKS.md, overload: a queue of 100k per peer grew the daemon).
            router, self.endpoint = bind_router(
                self.bind, limits=self.table.limits, ctx=ctx, curve=self.curve, rcvhwm=2 * self.table.credits + 64
            )
            # Refused handshakes (a key not allowed, plaintext at a CURVE server, ...) never reach
            # the poll loop; libzmq reports them on a monitor socket that housekeeping reads.
            self._monitor = router.get_monitor_socket(HANDSHAKE_EVENTS)
            # Wake-up line compute thread -> I/O thread: a socket pair polled next to the ROUTER
            # (one byte per batch; draining it is one recv, cheaper than a zmq PULL socket).
            self._wake_r, wake_w = _socket.socketpair()
            self._wake_r.setblocking(False)
            wake_w.setblocking(False)
            self.compute.wake = wake_w
        except BaseException as e:  # reported by Server.start()
            self.startup_error = e
            self.ready.set()
            _release_context(ctx, auth)
            return
        self.compute_thread = threading.Thread(target=self.compute.run, name="edgesplit-compute", daemon=True)
        self.compute_thread.start()
        self.ready.set()
        try:
            self._loop(router)
        except BaseException:  # pragma: no cover - a bug; keep the traceback in the log
            log.exception("I/O thread failed")
            self.failed = True
            raise
        finally:
            self.scheduler.close()
            self.compute_thread.join(10)
            self._wake_r.close()
            wake_w.close()
            self._read_handshake_failures()
            router.disable_monitor()
            self._monitor.close(0)
            router.close(1000)
            _release_context(ctx, auth)
            summary = self.stats.as_dict()
            log.info("stopped: %s", summary, extra={"event": "stopped", "stats": summary})

    def _loop(self, router: zmq.Socket) -> None:
        # a zmq socket and a file descriptor: zmq_poll takes both (pyzmq's stub names sockets only)
        poll_items: list[tuple[Any, int]] = [(router, _POLLIN), (self._wake_r.fileno(), _POLLIN)]
        compute_thread = self.compute_thread
        assert compute_thread is not None, "run() starts the compute thread before the loop"
        zpoll, clock = zmq.zmq_poll, time.perf_counter_ns
        draining = False
        # sessions are checked several times per heartbeat interval (ping after 1, expire after 3)
        hb_ms = self.table.heartbeat_ms
        housekeeping_ns = int(min(0.5, hb_ms / 4000.0) * 1e9) if hb_ms > 0 else 500_000_000
        poll_ms = min(100, max(1, housekeeping_ns // 1_000_000))
        next_housekeeping = clock() + housekeeping_ns
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
            now = clock()
            if now >= next_housekeeping:
                self._housekeeping(router, now)
                next_housekeeping = now + housekeeping_ns
                if not draining and not compute_thread.is_alive():  # only a bug gets here
                    log.error("compute thread died; shutting down")
                    self.failed = True
                    self.stop.set()
            if self.stop.is_set() and not draining:
                draining = True
                log.info("draining: %d queued requests", len(self.scheduler))
                self.scheduler.close()
            if draining and not compute_thread.is_alive():
                self._forward_replies(router)
                for ident, bye in self.table.farewell():
                    self._send(router, ident, bye)
                return

    def _on_message(self, router: zmq.Socket, parts: list, draining: bool) -> None:
        t_recv = time.perf_counter_ns()
        self.counters.messages += 1
        if len(parts) < 2:  # ROUTER always prepends the identity; an empty message carries nothing
            return
        identity = parts[0]
        reply: Header | None
        session = self.table.sessions.get(identity)
        try:  # a session on an ED-ViT bundle takes part in "fused_requests" (its parse checks them)
            msg = P.parse(
                parts[1:],
                self.table.limits,
                session.parse_features if session is not None else self._no_session_features,
            )
        except ProtocolError as e:
            reply = self.table.refuse(identity, e)
        except Exception as e:  # a bug: answer INTERNAL and keep serving
            log.exception("failed to parse a message")
            reply = self.table.refuse(identity, ProtocolError(ErrorCode.INTERNAL, f"{type(e).__name__}: {e}"))
        else:
            if self.ota is not None and msg.kind in OTA_AGENT_KINDS:
                self._on_update(router, identity, session, msg, t_recv, draining)
                return
            # a request is [identity, header, tensor]; anything else is rare enough to sum
            nbytes = len(parts[1]) + len(parts[2]) if len(parts) == 3 else sum(map(len, parts[1:]))
            reply = self.table.receive(identity, msg, t_recv, nbytes, draining)
        if reply is not None:
            self._send(router, identity, reply)

    def _on_update(self, router: zmq.Socket, identity: bytes, session, msg, now_ns: int, draining: bool) -> None:
        """A bundle_query or bundle_get: answered here, after the results ready now (inference first)."""
        assert self.ota is not None
        if session is not None:
            session.last_seen = now_ns  # traffic, for the heartbeats (PROTOCOL.md §8)
        try:
            header, *frames = self.ota.handle(session, msg, draining)
        except ProtocolError as e:
            self.ota.figures.refused += 1  # not an inference error: counted apart from the request errors
            header, frames = ErrorReply(e.req_id, e.code, e.message).to_header(), []
        if self.replies:
            self._forward_replies(router)
        try:
            send_parts(router, [identity, P.pack_header(header), *frames], _NOBLOCK)
        except zmq.ZMQError as e:
            self._peer_unreachable(identity, e)

    def _send(self, router: zmq.Socket, identity: bytes, header: dict) -> None:
        try:
            send_parts(router, [identity, P.pack_header(header)], _NOBLOCK)
        except zmq.ZMQError as e:
            self._peer_unreachable(identity, e)

    def _peer_unreachable(self, identity: bytes, e: zmq.ZMQError) -> None:
        if e.errno == zmq.EHOSTUNREACH:
            self.table.drop(identity)
            self.counters.dropped_unreachable += 1
        else:  # EAGAIN: the peer's pipe is full (credits make this rare)
            self.counters.dropped_full += 1

    def _forward_replies(self, router: zmq.Socket) -> None:
        try:  # wake-up bytes, one per batch: read them all at once (more than 4096 wakes the poll again)
            self._wake_r.recv(4096)
        except (BlockingIOError, InterruptedError):
            pass
        replies, settle = self.replies, self.table.settle
        while replies:
            parts = replies.popleft()
            identity = parts[0]
            settle(identity, len(parts) == 2)  # [identity, header]: an error (a result also carries logits)
            try:
                send_parts(router, parts, _NOBLOCK)
            except zmq.ZMQError as e:
                self._peer_unreachable(identity, e)

    def _housekeeping(self, router: zmq.Socket, now_ns: int) -> None:
        self.turned = time.monotonic()
        self._read_handshake_failures()
        for ident, ping in self.table.tick(now_ns):
            self._send(router, ident, ping)

    def _read_handshake_failures(self) -> None:
        """Count and log the connections libzmq refused during the handshake since the last call."""
        auth_failed = self.counters.auth_failed
        for event, value in read_monitor(self._monitor):
            reason = handshake_failure(event, value)
            if reason is None:
                continue
            n = auth_failed[reason] = auth_failed.get(reason, 0) + 1
            # A refused peer retries every few seconds: log each reason at most every 10 s.
            now = time.monotonic()
            if now - self._handshake_logged.get(reason, -1e9) >= 10.0:
                self._handshake_logged[reason] = now
                log.warning(
                    "refused a connection in the security handshake: %s (%d so far)",
                    reason,
                    n,
                    extra={"event": "handshake_failed", "reason": reason, "total": n},
                )


def _release_context(ctx: zmq.Context, auth) -> None:
    if auth is not None:
        auth.stop()
    if ctx is not context():  # the daemon's own (CURVE) context: waits for the ROUTER's linger
        ctx.term()
