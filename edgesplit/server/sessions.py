"""The server side of protocol sessions, without sockets: hello/welcome, credits, heartbeats,
expiry after silence, bye, and every refusal a message can earn.

:class:`SessionTable` takes parsed messages (:func:`edgesplit.wire.protocol.parse` output) and the
clock as arguments and returns the header to answer with; a valid request becomes an
:class:`~edgesplit.server.batcher.Item` that it hands to the scheduler's
:meth:`~edgesplit.server.batcher.Batcher.admit`. The daemon's I/O thread owns the ROUTER socket,
parses, sends what the table returns, and is the table's only caller; a test drives the table
with a fake clock. ``now_ns`` is ``time.perf_counter_ns()`` in the daemon: the clock the
scheduler's deadlines and estimates use too.

Checks on a request, in order (docs/PROTOCOL.md): a session (NOT_READY), not draining
(SHUTTING_DOWN), the tensor against the session's bundle and mode (MALFORMED, UNKNOWN_MODE,
UNSUPPORTED codec, TOO_LARGE rows), credits (OVERLOADED), then the scheduler's admission
(DEADLINE_EXCEEDED, OVERLOADED). A session on an ED-ViT bundle is offered ``"fused_requests"``
(and nothing else): its messages are parsed with that feature (:attr:`Session.parse_features`,
read by the I/O thread) and its requests checked as fused requests (§13.5,
:class:`~edgesplit.server.fusion_runner.FusionCheck`) in place of the tensor checks.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Mapping

from ..wire import protocol as P
from ..wire.errors import ErrorCode, ProtocolError
from ..wire.messages import ErrorReply, Welcome
from ..wire.ota import FEATURE_BUNDLE_UPDATES
from ..wire.protocol import Kind, Limits, Message
from .batcher import Batcher, Item
from .fusion_runner import FUSED_FEATURES, FusionCheck
from .stats import IoCounters
from .tail_runner import RequestCheck

log = logging.getLogger("edgesplit.server")

Header = dict[str, Any]
# Silence longer than this many heartbeat intervals ends a session (with nothing in flight).
EXPIRY_INTERVALS = 3


@dataclass
class Session:
    identity: bytes
    bundle: str  # bundle hash
    agent: str
    credits: int
    inflight: int = 0
    last_seen: int = 0  # now_ns of the last message received
    last_ping: int = 0  # now_ns of the last ping sent
    ping_nonce: int = -1  # nonce of the server's last ping: its now_ns in us (its pong gives rtt_us)
    # per-agent figures for the metrics (edgesplit.server.stats.SessionFigures)
    requests: int = 0  # requests accepted
    bytes_in: int = 0  # message bytes received since the session started
    errors: int = 0  # error replies sent
    rtt_us: float | None = None  # last server ping -> pong round trip
    parse_features: frozenset[str] = frozenset()  # v1.2 features its messages are parsed with


class SessionTable:
    """Every agent session of one daemon, keyed by ROUTER identity. Single-threaded: the I/O
    thread calls every method; other threads only read :attr:`sessions` (the metrics)."""

    def __init__(
        self,
        checks: Mapping[str, RequestCheck | FusionCheck],
        scheduler: Batcher,
        counters: IoCounters,
        *,
        server_name: str,
        credits: int,
        heartbeat_ms: int,
        limits: Limits,
        codecs: Iterable[str],
        features: Iterable[str] = P.SERVER_FEATURES,
        wall_clock_ns: Callable[[], int] = time.time_ns,
    ):
        self.checks = checks  # bundle hash -> its request checks: the bundles served
        self.scheduler = scheduler
        self.counters = counters
        self.server_name = server_name
        self.credits = int(credits)  # the most any agent gets; a hello may ask for fewer
        self.heartbeat_ns = int(heartbeat_ms) * 1_000_000
        self.heartbeat_ms = int(heartbeat_ms)
        self.limits = limits
        self.codecs = tuple(codecs)
        self.features = tuple(features)
        # the optional kinds a session's messages are parsed with (v1.3: bundle updates, when offered)
        self.parse_features = frozenset(f for f in self.features if f == FEATURE_BUNDLE_UPDATES)
        self.wall_clock_ns = wall_clock_ns  # the t_ns of pings and pongs (informative only)
        self.sessions: dict[bytes, Session] = {}  # never rebound: ServerStats holds this very dict

    # -- incoming messages -------------------------------------------------------------------------
    def receive(
        self, identity: bytes, msg: Message, now_ns: int, nbytes: int = 0, draining: bool = False
    ) -> Header | None:
        """Handle one parsed message from ``identity`` (``nbytes``: its size on the wire); return
        the header to answer with, if any. A valid request is queued with the scheduler (its
        answer comes from the compute thread). Never raises for anything a peer sends."""
        session = self.sessions.get(identity)
        if session is not None:
            session.last_seen = now_ns
            session.bytes_in += nbytes
        try:
            kind = msg.kind
            if kind == Kind.REQUEST:
                self._request(identity, session, msg, now_ns, draining)
                return None
            if kind == Kind.HELLO:
                return self._hello(identity, msg, now_ns, draining)
            if kind == Kind.PING:
                return P.pong(msg.header["nonce"], self.wall_clock_ns())
            if kind == Kind.PONG:
                if session is not None and msg.header["nonce"] == session.ping_nonce:
                    session.rtt_us = now_ns / 1e3 - session.ping_nonce  # the nonce is when the ping left, in us
                return None
            if kind == Kind.BYE:
                self.sessions.pop(identity, None)
                return None
            if kind == Kind.ERROR:
                log.info("agent %r reported error %s: %s", identity, msg.header.get("name"), msg.header.get("message"))
                return None
            raise ProtocolError(ErrorCode.MALFORMED, f"'{kind}' is not a message an agent sends to a server", msg.id)
        except ProtocolError as e:
            return self.refuse(identity, e)
        except Exception as e:  # a bug: answer INTERNAL and keep serving
            log.exception("failed to handle a message")
            return self.refuse(identity, ProtocolError(ErrorCode.INTERNAL, f"{type(e).__name__}: {e}"))

    def refuse(self, identity: bytes, e: ProtocolError) -> Header:
        """The error reply to a message from ``identity`` (also for messages that did not parse),
        counted for the metrics."""
        s = self.sessions.get(identity)
        if s is not None:
            s.errors += 1
        # only requests carry an id: an inference request failed
        self.counters.error(e.code, s.bundle if s is not None else None, e.req_id is not None)
        return ErrorReply(e.req_id, e.code, e.message).to_header()

    def _hello(self, identity: bytes, msg: Message, now_ns: int, draining: bool) -> Header:
        h = msg.header
        if draining:
            raise ProtocolError(ErrorCode.SHUTTING_DOWN, "server is shutting down")
        check = self.checks.get(h["bundle"])
        if check is None:
            raise ProtocolError(
                ErrorCode.UNKNOWN_BUNDLE,
                f"bundle {h['bundle'][:16]}... is not loaded here (loaded: "
                f"{', '.join(f'{c.bundle.name}={k[:16]}...' for k, c in self.checks.items())})",
            )
        bundle = check.bundle
        credits = max(1, min(self.credits, h["caps"]["max_inflight"]))
        features = FUSED_FEATURES if check.fused else self.features
        parse_features = frozenset(FUSED_FEATURES) if check.fused else self.parse_features
        old = self.sessions.get(identity)
        if old is not None:  # a re-handshake on the same connection keeps in-flight work and figures
            s = replace(
                old,
                bundle=bundle.hash,
                agent=h["agent"],
                credits=credits,
                last_seen=now_ns,
                last_ping=now_ns,
                parse_features=parse_features,
            )
        else:
            s = Session(
                identity,
                bundle.hash,
                h["agent"],
                credits,
                last_seen=now_ns,
                last_ping=now_ns,
                parse_features=parse_features,
            )
        self.sessions[identity] = s
        self.counters.sessions_opened += 1
        log.info(
            "hello from %s (%s): bundle %s, %d credits",
            h["agent"],
            identity.hex(),
            bundle.name,
            credits,
            extra={
                "event": "hello",
                "agent": h["agent"],
                "identity": identity.hex(),
                "bundle": bundle.name,
                "credits": credits,
            },
        )
        return Welcome(
            bundle.hash,
            self.server_name,
            credits=credits,
            limits=self.limits,
            heartbeat_ms=self.heartbeat_ms,
            codecs=self.codecs,
            features=features,
        ).to_header()

    def _request(self, identity: bytes, session: Session | None, msg: Message, now_ns: int, draining: bool) -> None:
        h = msg.header
        rid = h["id"]
        if session is None:
            raise ProtocolError(ErrorCode.NOT_READY, "no session: send hello first (or again, after a reconnect)", rid)
        if draining:
            raise ProtocolError(ErrorCode.SHUTTING_DOWN, "server is shutting down", rid)
        check = self.checks[session.bundle]
        tensors = h.get("tensors")
        payload = msg.frames[0]
        if isinstance(check, FusionCheck):  # §13.5: steps 6-7 become the fused request's checks; one row each
            d = check.check_fused(h, rid)
            rows, single, payload = 1, True, msg.frames
        elif tensors is None:  # v1.1 compact request: parse() saw exactly one frame; one row, raw
            d = check.check_compact(h["mode"], msg.frames[0], rid)
            rows, single = 1, True
        else:
            if len(msg.frames) != 1:
                raise ProtocolError(
                    ErrorCode.MALFORMED, f"a v1 request carries exactly one tensor, got {len(msg.frames)}", rid
                )
            d = tensors[0]
            if d["codec"] not in self.codecs:
                raise ProtocolError(ErrorCode.UNSUPPORTED, f"codec '{d['codec']}' is not available on this server", rid)
            rows, single = check.check(h["mode"], d, rid)
            if rows > self.scheduler.max_batch:
                raise ProtocolError(
                    ErrorCode.TOO_LARGE, f"{rows} rows in one request, over max batch {self.scheduler.max_batch}", rid
                )
        if session.inflight >= session.credits:
            raise ProtocolError(
                ErrorCode.OVERLOADED,
                f"credits exceeded: {session.inflight} requests in flight, {session.credits} allowed",
                rid,
            )
        deadline = h.get("deadline_ms")
        item = Item(
            key=(session.bundle, h["mode"]),
            identity=identity,
            req_id=rid,
            desc=d,
            payload=payload,
            rows=rows,
            single=single,
            t_recv_ns=now_ns,
            deadline_ns=None if deadline is None else now_ns + int(deadline * 1e6),
            t_send_ns=h.get("t_send_ns"),
            deadline_ms=deadline,
        )
        refusal = self.scheduler.admit(item, now_ns)
        if refusal is not None:
            raise ProtocolError(refusal.code, refusal.message, rid)
        session.inflight += 1
        session.requests += 1
        self.counters.requests += 1

    # -- replies, time, departures -----------------------------------------------------------------
    def settle(self, identity: bytes, error: bool) -> None:
        """A queued request of ``identity`` has been answered (``error``: with an error): one
        credit back."""
        s = self.sessions.get(identity)
        if s is not None:
            if s.inflight > 0:
                s.inflight -= 1
            if error:
                s.errors += 1

    def drop(self, identity: bytes) -> None:
        """The peer is gone (its replies cannot be delivered): forget its session."""
        self.sessions.pop(identity, None)

    def tick(self, now_ns: int) -> list[tuple[bytes, Header]]:
        """Heartbeats: expire sessions silent for :data:`EXPIRY_INTERVALS` intervals with nothing
        in flight, and ping each session once per interval, busy or not (a silent one to see
        whether it is still there; each pong measures the agent's round trip). Returns the pings
        to send. Call several times per interval."""
        if self.heartbeat_ns <= 0:
            return []
        hb = self.heartbeat_ns
        pings = []
        for ident, s in list(self.sessions.items()):
            idle = now_ns - s.last_seen
            if idle > EXPIRY_INTERVALS * hb and s.inflight == 0:
                log.info(
                    "session %s (%s) timed out after %.1f s of silence",
                    s.agent,
                    ident.hex(),
                    idle / 1e9,
                    extra={"event": "session_expired", "agent": s.agent, "identity": ident.hex()},
                )
                del self.sessions[ident]
                self.counters.sessions_expired += 1
            elif now_ns - s.last_ping > hb:
                s.last_ping = now_ns
                s.ping_nonce = now_ns // 1000
                pings.append((ident, P.ping(s.ping_nonce, self.wall_clock_ns())))
        return pings

    def farewell(self, reason: str = "server shutting down") -> list[tuple[bytes, Header]]:
        """A ``bye`` for every session (the end of a drain)."""
        return [(ident, P.bye(reason)) for ident in list(self.sessions)]
