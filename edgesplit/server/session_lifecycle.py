"""The session lifecycle that every server of the protocol shares, without sockets: hello
bookkeeping and welcome, ping/pong, heartbeats, expiry after silence, bye, and the refusal of any
message (PROTOCOL.md §6-§8).

:class:`SessionTableBase` takes parsed messages and the clock (``now_ns``, the caller's monotonic
clock in ns) as arguments and returns the header to answer with. It is the whole lifecycle but
knows no bundle: a subclass says which hellos it accepts (:meth:`~SessionTableBase._accept`), what
its welcome carries, what its work messages are, what keeps a silent session alive and what to
forget when a session ends. The daemon's :class:`~edgesplit.server.sessions.SessionTable` (head-tail,
scatter-fused bundles, requests queued for a batcher) and the SFPrompt body server's
:class:`~edgesplit.server.body_sessions.BodySessionTable` (training steps computed in place) are the
two subclasses.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable

from ..wire import protocol as P
from ..wire.errors import ErrorCode, ProtocolError
from ..wire.messages import ErrorReply, Welcome
from ..wire.ota import FEATURE_BUNDLE_UPDATES
from ..wire.protocol import Kind, Limits, Message
from ..wire.quantize import PACKED_BITS
from .stats import IoCounters

log = logging.getLogger("edgesplit.server")

Header = dict[str, Any]
# Silence longer than this many heartbeat intervals ends a session (with nothing in flight).
EXPIRY_INTERVALS = 3
# The kinds of the session lifecycle; every other kind is the server's work (SessionTableBase._work).
LIFECYCLE_KINDS = frozenset({Kind.HELLO, Kind.PING, Kind.PONG, Kind.BYE, Kind.ERROR})


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


@dataclass(frozen=True)
class HelloTerms:
    """What a server grants a hello it accepts: the bundle (or package) the session is on and the
    features its welcome offers (``parse_features``: those its messages are parsed with)."""

    bundle_hash: str
    bundle_name: str
    features: tuple[str, ...]
    parse_features: frozenset[str]


class SessionTableBase:
    """Every client session of one server, keyed by ROUTER identity: the session lifecycle
    (hello, ping/pong, bye, expiry, refusals) shared by every kind of server. Single-threaded:
    the I/O thread calls every method; other threads only read :attr:`sessions` (the metrics).

    A subclass decides which hellos it accepts (:meth:`_accept`), what its welcome carries
    (:meth:`_welcome`), the work kinds (:meth:`_work`), what keeps an idle session alive
    (:meth:`_busy`) and what to forget when a session ends (:meth:`_ended`)."""

    def __init__(
        self,
        counters: IoCounters,
        *,
        server_name: str,
        credits: int,
        heartbeat_ms: int,
        limits: Limits,
        codecs: Iterable[str],
        bits: Iterable[int] = PACKED_BITS,
        features: Iterable[str] = P.SERVER_FEATURES,
        wall_clock_ns: Callable[[], int] = time.time_ns,
    ):
        self.counters = counters
        self.server_name = server_name
        self.credits = int(credits)  # the most any agent gets; a hello may ask for fewer
        self.heartbeat_ns = int(heartbeat_ms) * 1_000_000
        self.heartbeat_ms = int(heartbeat_ms)
        self.limits = limits
        self.codecs = tuple(codecs)
        self.bits = tuple(int(b) for b in bits)
        self.features = tuple(features)
        # the optional kinds a session's messages are parsed with (v1.3: bundle updates, when offered)
        self.parse_features = frozenset(f for f in self.features if f == FEATURE_BUNDLE_UPDATES)
        self.wall_clock_ns = wall_clock_ns  # the t_ns of pings and pongs (informative only)
        self.sessions: dict[bytes, Session] = {}  # never rebound: ServerStats holds this very dict

    # -- incoming messages -------------------------------------------------------------------------
    def seen(self, identity: bytes, now_ns: int, nbytes: int = 0) -> Session | None:
        """A valid message from ``identity`` arrived: its session (if any) was heard from now."""
        session = self.sessions.get(identity)
        if session is not None:
            session.last_seen = now_ns
            session.bytes_in += nbytes
        return session

    def receive(
        self, identity: bytes, msg: Message, now_ns: int, nbytes: int = 0, draining: bool = False
    ) -> Header | None:
        """Handle one parsed message from ``identity`` (``nbytes``: its size on the wire); return
        the header to answer with, if any. Never raises for anything a peer sends."""
        session = self.seen(identity, now_ns, nbytes)
        try:
            kind = msg.kind
            if kind not in LIFECYCLE_KINDS:
                return self._work(identity, session, msg, now_ns, draining)
            if kind == Kind.HELLO:
                return self._hello(identity, msg, now_ns, draining)
            if kind == Kind.PING:
                return P.pong(msg.header["nonce"], self.wall_clock_ns())
            if kind == Kind.PONG:
                if session is not None and msg.header["nonce"] == session.ping_nonce:
                    session.rtt_us = now_ns / 1e3 - session.ping_nonce  # the nonce is when the ping left, in us
                return None
            if kind == Kind.BYE:
                self._end(identity)
                return None
            log.info("agent %r reported error %s: %s", identity, msg.header.get("name"), msg.header.get("message"))
            return None
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

    def require_session(self, session: Session | None, rid: int, draining: bool) -> Session:
        """The first checks of any work message: a session (NOT_READY), not draining (SHUTTING_DOWN)."""
        if session is None:
            raise ProtocolError(ErrorCode.NOT_READY, "no session: send hello first (or again, after a reconnect)", rid)
        if draining:
            raise ProtocolError(ErrorCode.SHUTTING_DOWN, "server is shutting down", rid)
        return session

    @staticmethod
    def check_credit(session: Session, rid: int) -> None:
        """OVERLOADED when ``session`` has as many messages in flight as it has credits (the caller
        counts an accepted one in ``inflight``; :meth:`settle` gives the credit back)."""
        if session.inflight >= session.credits:
            raise ProtocolError(
                ErrorCode.OVERLOADED,
                f"credits exceeded: {session.inflight} requests in flight, {session.credits} allowed",
                rid,
            )

    # -- what a subclass decides -------------------------------------------------------------------
    def _accept(self, h: Header) -> HelloTerms:
        """The terms of a valid ``hello``, or a ProtocolError (UNKNOWN_BUNDLE, UNSUPPORTED, ...)."""
        raise NotImplementedError

    def _welcome(self, terms: HelloTerms, credits: int) -> Header:
        return Welcome(
            terms.bundle_hash,
            self.server_name,
            credits=credits,
            limits=self.limits,
            heartbeat_ms=self.heartbeat_ms,
            codecs=self.codecs,
            bits=self.bits,
            features=terms.features,
        ).to_header()

    def _work(
        self, identity: bytes, session: Session | None, msg: Message, now_ns: int, draining: bool
    ) -> Header | None:
        """A message that is not part of the session lifecycle: none here."""
        raise ProtocolError(ErrorCode.MALFORMED, f"'{msg.kind}' is not a message an agent sends to a server", msg.id)

    def _busy(self, identity: bytes, session: Session) -> bool:
        """Whether a silent session is kept: it has work in flight."""
        return session.inflight > 0

    def _ended(self, identity: bytes) -> None:
        """A session ended (bye, expiry, or the peer is gone): nothing more to forget here."""

    # -- the lifecycle -----------------------------------------------------------------------------
    def _hello(self, identity: bytes, msg: Message, now_ns: int, draining: bool) -> Header:
        h = msg.header
        if draining:
            raise ProtocolError(ErrorCode.SHUTTING_DOWN, "server is shutting down")
        terms = self._accept(h)
        credits = max(1, min(self.credits, h["caps"]["max_inflight"]))
        old = self.sessions.get(identity)
        if old is not None:  # a re-handshake on the same connection keeps in-flight work and figures
            s = replace(
                old,
                bundle=terms.bundle_hash,
                agent=h["agent"],
                credits=credits,
                last_seen=now_ns,
                last_ping=now_ns,
                parse_features=terms.parse_features,
            )
        else:
            s = Session(
                identity,
                terms.bundle_hash,
                h["agent"],
                credits,
                last_seen=now_ns,
                last_ping=now_ns,
                parse_features=terms.parse_features,
            )
        self.sessions[identity] = s
        self.counters.sessions_opened += 1
        log.info(
            "hello from %s (%s): bundle %s, %d credits",
            h["agent"],
            identity.hex(),
            terms.bundle_name,
            credits,
            extra={
                "event": "hello",
                "agent": h["agent"],
                "identity": identity.hex(),
                "bundle": terms.bundle_name,
                "credits": credits,
            },
        )
        return self._welcome(terms, credits)

    def _end(self, identity: bytes) -> None:
        self.sessions.pop(identity, None)
        self._ended(identity)

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
        self._end(identity)

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
            if idle > EXPIRY_INTERVALS * hb and not self._busy(ident, s):
                log.info(
                    "session %s (%s) timed out after %.1f s of silence",
                    s.agent,
                    ident.hex(),
                    idle / 1e9,
                    extra={"event": "session_expired", "agent": s.agent, "identity": ident.hex()},
                )
                self._end(ident)
                self.counters.sessions_expired += 1
            elif now_ns - s.last_ping > hb:
                s.last_ping = now_ns
                s.ping_nonce = now_ns // 1000
                pings.append((ident, P.ping(s.ping_nonce, self.wall_clock_ns())))
        return pings

    def farewell(self, reason: str = "server shutting down") -> list[tuple[bytes, Header]]:
        """A ``bye`` for every session (the end of a drain)."""
        return [(ident, P.bye(reason)) for ident in list(self.sessions)]
