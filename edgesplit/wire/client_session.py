"""The client side of protocol v1 as a state machine: no sockets, no threads, no clock of its own.

Every endpoint that talks to a server as a client (the deploy agent, the load generator, the
benchmarks' clients) drives one :class:`ClientSession` per connection. The driver owns the socket:
it sends the parts the session hands it, feeds every message it receives to :meth:`receive`, calls
:meth:`tick` now and then, and reports what its link monitor sees (:meth:`on_connected`,
:meth:`on_disconnected`). Every call takes ``now_ns`` (a monotonic clock in ns, the driver's
choice); the session assumes that each part list it returns, or hands out in a :class:`Send`
event, is sent at that instant.

What the session decides (docs/PROTOCOL.md §3 and §5):

- the handshake: ``hello``, retried with exponential backoff and jitter while no ``welcome`` comes
  and the link is up; the ``welcome``'s terms (credits, limits, heartbeat, features);
- request ids, and the request's form: **compact** (v1.1, no ``tensors``) when the welcome listed
  ``compact_requests`` and the tensor is its mode's implied encoding, else full. A compact request
  refused MALFORMED means the peer does not take them after all: the session stops sending them
  until a welcome offers them again and resends that request once in full;
- requests made while there is no session are held and go out after the next welcome; a request
  refused NOT_READY (the server lost the session) is resent once after a new handshake;
- heartbeats (a ``ping`` after ``heartbeat_ms`` of quiet, a ``pong`` for every ``ping``);
- the silence deadline: nothing heard for ``min(3 heartbeats, timeout_s)`` with requests
  outstanding loses the session (as a dropped connection or a ``bye`` does), and each request
  unanswered after ``timeout_s`` times out;
- answers to requests no longer outstanding are counted (``late_answers``) and reported, not
  delivered as answers.

Which frames go to the server, what a refusal means for a frame (error, or a local answer) and
what a lost session means for the frames it held is the driver's business: the session reports
it as events (:mod:`edgesplit.wire.session_events`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from . import protocol as P
from .ans_codec import implied_ans
from .codec import supported_codecs
from .errors import ErrorCode, ProtocolError
from .messages import ErrorReply, ResultTimings, Welcome
from .protocol import Kind
from .session_events import (
    DISCONNECTED,
    TIMEOUT,
    Answered,
    Backoff,
    BadMessage,
    Event,
    LateAnswer,
    Lost,
    Outstanding,
    Ponged,
    Refused,
    Send,
    TimedOut,
    Welcomed,
)

__all__ = [
    "ClientSession",
    "Backoff",
    "Outstanding",
    "Event",
    "Send",
    "Welcomed",
    "Answered",
    "Refused",
    "TimedOut",
    "Lost",
    "LateAnswer",
    "BadMessage",
    "Ponged",
    "TIMEOUT",
    "DISCONNECTED",
]

_NO_EVENTS: list = []  # returned (never mutated) when a message needs nothing from the driver


class ClientSession:
    """One client session with one server, for one bundle."""

    def __init__(
        self,
        bundle_hash: str,
        agent_name: str,
        *,
        max_inflight: int = 8,
        timeout_s: float = 10.0,
        reconnect_max_s: float = 0.5,
        implicit: Mapping[int, dict] | None = None,
        codecs: list[str] | None = None,
        backoff: Backoff | None = None,
        link_up: bool = True,
        retry_not_ready: bool = True,
        wall_clock: Callable[[], int] | None = time.time_ns,
        peer: str = "the server",
    ):
        """``implicit``: per mode id, the descriptor a compact request of that mode implies
        (:func:`~edgesplit.wire.protocol.compact_descriptor`); a mode missing here always goes
        out in full. ``link_up``: the link's state until the driver reports otherwise (a driver
        without a link monitor leaves it True). ``retry_not_ready=False`` delivers NOT_READY
        refusals instead of re-handshaking and resending (a load generator counts them).
        ``wall_clock``: the ``t_ns`` that pings and pongs carry (None: they carry none).
        ``peer``: how messages about the server name it (its endpoint, say)."""
        if reconnect_max_s <= 0:
            raise ValueError(f"reconnect_max_s must be positive, got {reconnect_max_s}")
        self.bundle_hash = bundle_hash
        self.peer = peer
        self.agent_name = agent_name
        self.max_inflight = max(1, int(max_inflight))
        self.timeout_s = float(timeout_s)
        self._timeout_ns = int(self.timeout_s * 1e9)
        self._implicit = dict(implicit or {})
        self.codecs = supported_codecs() if codecs is None else list(codecs)
        self.backoff = backoff or Backoff(min(0.05, reconnect_max_s), reconnect_max_s)
        self.retry_not_ready = retry_not_ready
        self._wall_clock = wall_clock
        self.link_up = link_up
        self.limits = P.DEFAULT_LIMITS  # what this side accepts from the server (parse)
        self.welcome: Welcome | None = None
        self.credits = 0
        self.heartbeat_ms = 0
        self.compact_requests = self.compact_ans = False  # the latest welcome listed "compact_requests"
        self.handshaking = False
        self.server_bye: str | None = None
        self.outstanding: dict[int, Outstanding] = {}  # by id, oldest first
        self._resend_after_welcome: list[int] = []
        self._hello_in_pipe = False  # a hello sent while the link was down: the socket sends it on connect
        self._next_hello_ns = 0
        self._lost = False  # the session was lost and no welcome has come since
        self._next_id = 1
        self._ping_nonce = 0
        self.last_send_ns = 0
        self.last_recv_ns = 0
        self.link_losses = 0  # sessions lost: connection dropped, server silent, or bye
        self.reconnects = 0  # sessions re-established after a loss
        self.late_answers = 0  # results/errors for requests no longer outstanding

    # -- state ---------------------------------------------------------------------------------
    @property
    def window(self) -> int:
        """Requests allowed outstanding: the client's own limit bounded by the server's credits."""
        return max(1, min(self.max_inflight, self.credits or self.max_inflight))

    @property
    def next_id(self) -> int:
        """The id the next request (or :meth:`take_id`) gets."""
        return self._next_id

    def take_id(self) -> int:
        """An id from the request id sequence for a frame that will not be sent (answered locally)."""
        rid = self._next_id
        self._next_id += 1
        return rid

    def silence_limit(self) -> tuple[int, str]:
        """Nothing heard for this long (ns) with requests outstanding means the session is lost,
        for the returned reason: three heartbeats (a live server answers pings even while its
        tail is busy) -> DISCONNECTED, or timeout_s when that comes first -> TIMEOUT."""
        if self.heartbeat_ms and 3 * self.heartbeat_ms < 1000 * self.timeout_s:
            return 3 * self.heartbeat_ms * 1_000_000, DISCONNECTED
        return self._timeout_ns, TIMEOUT

    # -- what to send --------------------------------------------------------------------------
    def hello(self, now_ns: int) -> list:
        """Start (or restart) the handshake: the ``hello`` to send now. Retries follow the backoff."""
        if not self.handshaking:
            self.backoff.reset()
        self.handshaking = True
        self._hello_in_pipe = not self.link_up
        self._next_hello_ns = now_ns + int(self.backoff.next_delay() * 1e9)
        self.last_send_ns = now_ns
        return P.pack(P.hello(self.bundle_hash, self.agent_name, codecs=self.codecs, max_inflight=self.max_inflight))

    def request(
        self, mode: int, desc: dict, payload: Any, now_ns: int, *, deadline_ms: float | None = None, tag: Any = None
    ) -> tuple[Outstanding, list | None]:
        """A new request carrying ``payload`` (encoded as ``desc`` says). Returns its record and
        the parts to send now, or None while there is no session: then it is held and goes out
        after the next welcome (or times out). ``tag``: the driver's own data for this request,
        given back with every event about it. The window is the driver's to respect."""
        rid = self._next_id
        self._next_id += 1
        deadline = P.wire_number(deadline_ms)
        imp = self._implicit.get(mode)
        compact = self.compact_requests and (desc == imp or (self.compact_ans and implied_ans(imp, desc)))
        parts = [P.pack_header(P.request(rid, mode, None if compact else [desc], deadline_ms=deadline)), payload]
        req = Outstanding(rid, mode, parts, now_ns, compact, desc, deadline, tag=tag)
        self.outstanding[rid] = req
        if self.handshaking:
            self._resend_after_welcome.append(rid)
            return req, None
        self.last_send_ns = now_ns
        return req, parts

    def forget(self, rid: int) -> Outstanding | None:
        """Drop a request the driver could not send (its socket refused it): no event, no late answer."""
        req = self.outstanding.pop(rid, None)
        if req is not None and rid in self._resend_after_welcome:
            self._resend_after_welcome.remove(rid)
        return req

    def abandon(self, rid: int) -> Outstanding | None:
        """Stop waiting for a request (the driver answered it otherwise): its answer, if it comes,
        is a late answer."""
        return self.forget(rid)

    def ping(self, now_ns: int, nonce: int | None = None) -> list:
        """A ``ping`` to send now (its ``pong`` comes back as :class:`Ponged`)."""
        if nonce is None:
            self._ping_nonce += 1
            nonce = self._ping_nonce
        self.last_send_ns = now_ns
        return P.pack(P.ping(nonce, None if self._wall_clock is None else self._wall_clock()))

    def bye(self, reason: str) -> list | None:
        """The ``bye`` to send when closing, or None when there is no session to end."""
        return None if self.welcome is None else P.pack(P.bye(reason))

    def close(self) -> list[Outstanding]:
        """Forget the session (the driver closes its socket): returns the requests still outstanding."""
        reqs = list(self.outstanding.values())
        self.outstanding.clear()
        self._resend_after_welcome = []
        self.welcome = None
        self.handshaking = False
        return reqs

    # -- link events from the driver's monitor -------------------------------------------------
    def on_connected(self, now_ns: int) -> list[Event]:
        """The transport (re)connected: a server is there, so a pending handshake says hello at
        once instead of at its next backoff step (unless a hello is already queued for it)."""
        self.link_up = True
        out: list[Event] = []
        if self.handshaking and not self._hello_in_pipe:
            out.append(Send(self.hello(now_ns)))
        self._hello_in_pipe = False
        return out

    def on_disconnected(self, now_ns: int, message: str = "connection dropped") -> list[Event]:
        """The transport connection dropped: a session, if any, is lost."""
        self.link_up = False
        if self.welcome is None:
            return []
        return [self._lose(DISCONNECTED, None, message, now_ns)]

    def on_connect_failed(self) -> None:
        self.link_up = False

    # -- what arrives --------------------------------------------------------------------------
    def receive(self, parts: list, now_ns: int) -> list[Event]:
        """One message from the server -> what the driver must know and send."""
        self.last_recv_ns = now_ns
        try:
            msg = P.parse(parts, self.limits)
        except ProtocolError as e:  # the server sent garbage: report it and keep going
            return [BadMessage(e.code, f"bad message from server: {e.message}")]
        kind = msg.kind
        h = msg.header
        if kind == Kind.RESULT:
            req = self.outstanding.pop(h["id"], None)
            if req is None:
                self.late_answers += 1
                return [LateAnswer(h["id"], ResultTimings.from_header(h))]
            return [Answered(req.rid, h, msg.frames, ResultTimings.from_header(h), req)]
        if kind == Kind.ERROR:
            return self._on_error(ErrorReply.from_header(h), now_ns)
        if kind == Kind.WELCOME:
            return self._on_welcome(h, now_ns)
        if kind == Kind.PING:
            self.last_send_ns = now_ns
            return [Send(P.pack(P.pong(h["nonce"], None if self._wall_clock is None else self._wall_clock())))]
        if kind == Kind.PONG:
            return [Ponged(h["nonce"])]
        if kind == Kind.BYE:
            self.server_bye = h.get("reason") or "bye"
            return [
                self._lose(
                    ErrorCode.SHUTTING_DOWN.name, ErrorCode.SHUTTING_DOWN, f"server said bye: {self.server_bye}", now_ns
                )
            ]
        # hello / request: kinds a server never sends
        return [BadMessage(ErrorCode.MALFORMED, f"bad message from server: unexpected '{kind}'")]

    def _on_error(self, e: ErrorReply, now_ns: int) -> list[Event]:
        if e.rid is None:
            # Not about a request: a handshake refusal or the server's answer to something else we
            # sent. Either way the link is up (a monitor may have missed the first connection).
            self.link_up = True
            return [Refused(None, e.code, e.message, None)]
        req = self.outstanding.get(e.rid)
        if req is None:  # about a request already finished (timed out, or answered otherwise)
            self.late_answers += 1
            return [LateAnswer(e.rid, None)]
        if e.code == ErrorCode.NOT_READY and not req.resent and self.retry_not_ready:
            # The server lost our session (restart, reconnect, expiry): handshake again, resend once.
            req.resent = True
            self._resend_after_welcome.append(e.rid)
            return _NO_EVENTS if self.handshaking else [Send(self.hello(now_ns))]
        if e.code == ErrorCode.MALFORMED and req.compact:
            # A compact request refused as malformed: the peer does not take compact requests after
            # all (say, a v1.0 server took over the endpoint without a bye). Stop sending them until
            # a welcome offers them again, and resend this one once in full.
            self.compact_requests = False
            self._make_full(req)
            if self.handshaking:
                self._resend_after_welcome.append(e.rid)
                return _NO_EVENTS
            req.t_send_ns = self.last_send_ns = now_ns
            return [Send(req.parts)]
        del self.outstanding[e.rid]
        return [Refused(e.rid, e.code, e.message, req)]

    def _on_welcome(self, h: dict, now_ns: int) -> list[Event]:
        w = Welcome.from_header(h)
        if w.bundle != self.bundle_hash:
            return [Refused(None, ErrorCode.UNKNOWN_BUNDLE, f"welcome names bundle {w.bundle[:16]}...", None)]
        self.welcome = w
        self.compact_requests = w.compact_requests
        self.compact_ans = w.compact_requests and "ans" in w.codecs  # §4.4: ans modes may go compact too
        self.credits = w.credits
        self.heartbeat_ms = w.heartbeat_ms
        d, lim = P.DEFAULT_LIMITS, w.limits  # accept at least the defaults, whatever the server takes
        self.limits = P.Limits(
            max_header_bytes=max(lim.max_header_bytes, d.max_header_bytes),
            max_frame_bytes=max(lim.max_frame_bytes, d.max_frame_bytes),
            max_frames=max(lim.max_frames, d.max_frames),
            max_batch=lim.max_batch,
        )
        self.handshaking = False
        self.link_up = True
        self.server_bye = None
        reconnected = self._lost
        if reconnected:
            self._lost = False
            self.reconnects += 1
        out: list[Event] = [Welcomed(w, reconnected)]
        resend, self._resend_after_welcome = self._resend_after_welcome, []
        for rid in resend:
            req = self.outstanding.get(rid)
            if req is not None:
                if req.compact and not self.compact_requests:
                    self._make_full(req)  # built compact for a server that no longer offers it
                req.t_send_ns = self.last_send_ns = now_ns
                out.append(Send(req.parts))
        return out

    @staticmethod
    def _make_full(req: Outstanding) -> None:
        """Turn a compact request into the equivalent full request (same id and payload)."""
        header = P.pack_header(P.request(req.rid, req.mode, [req.desc], deadline_ms=req.deadline_ms))
        req.parts = [header, *req.parts[1:]]
        req.compact = False

    # -- time ----------------------------------------------------------------------------------
    def tick(self, now_ns: int) -> list[Event]:
        """Timeouts, the silence deadline, hello retries and heartbeats due at ``now_ns``."""
        out: list[Event] = []
        if self.welcome is not None and self.outstanding:
            oldest = next(iter(self.outstanding.values()))
            limit_ns, reason = self.silence_limit()
            if now_ns - max(self.last_recv_ns, oldest.t_send_ns) > limit_ns:
                out.append(
                    self._lose(
                        reason,
                        None,
                        f"nothing heard from {self.peer} for {limit_ns / 1e9:.1f} s with requests outstanding",
                        now_ns,
                    )
                )
        elif self.handshaking and self.link_up and now_ns >= self._next_hello_ns:
            out.append(Send(self.hello(now_ns)))  # no welcome yet: again, after a longer wait each time
        for rid, req in list(self.outstanding.items()):
            if now_ns - req.t_send_ns > self._timeout_ns:
                del self.outstanding[rid]
                out.append(TimedOut(rid, f"no answer from {self.peer} within {self.timeout_s:.1f} s", req))
        if self.heartbeat_ms and self.welcome is not None:
            if now_ns - max(self.last_send_ns, self.last_recv_ns) > self.heartbeat_ms * 1_000_000:
                out.append(Send(self.ping(now_ns)))
        return out

    def _lose(self, reason: str, code: ErrorCode | None, message: str, now_ns: int) -> Lost:
        """The session is gone: every outstanding request ends with it, and the handshake starts
        over (first hello after one backoff step, or at once when the link reconnects)."""
        self.welcome = None
        self.link_losses += 1
        self._lost = True
        self._resend_after_welcome = []
        reqs = tuple(self.outstanding.values())
        self.outstanding.clear()
        self.handshaking = True
        self.backoff.reset()
        self._next_hello_ns = now_ns + int(self.backoff.next_delay() * 1e9)
        return Lost(reason, code, message, reqs)
