"""The agent's link to its server: one DEALER socket, its link monitor, and the
:class:`~edgesplit.wire.client_session.ClientSession` they drive.

Given several endpoints (gateways in front of one cluster, or daemons serving the same bundle),
the connection fails over: when the session is lost (the connection dropped, the server went
silent, or it said bye while draining) or no welcome has come from the current endpoint for
``failover_s``, or it refused the handshake SHUTTING_DOWN, it closes the socket and says hello to
the next endpoint in the list (round robin). The session carries on as after any loss: frames in
flight on a lost connection end as they always did (locally, with fallback), except those a
draining gateway refused SHUTTING_DOWN, which :class:`FailoverSession` sends to the next one;
credits come from the new welcome (they are per session, so per gateway), request ids keep
counting. OVERLOADED is not a failure: an overloaded gateway's refusal is answered as always and
the agent stays (moving would only carry the load elsewhere).

The session decides everything the protocol asks of a client; this class only moves bytes and
time into it: it sends what the session hands out, feeds it every message received and every
connection event the monitor reports, and lets it check its deadlines (at most every few ms:
they are seconds long). Events other than :class:`~edgesplit.wire.session_events.Send` go back to
the agent, which decides what they mean for its frames.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import zmq

from ..wire.client_session import ClientSession, Event, Outstanding, Send
from ..wire.curve import ClientCurve, explain_handshake_failure
from ..wire.errors import ErrorCode
from ..wire.messages import ErrorReply
from ..wire.session_events import Lost, Refused
from ..wire.transport import connect_dealer, pending_in, recv_parts, send_parts
from . import link
from .link import LinkMonitor
from .results import AgentError

# Plain ints: pyzmq's enum constants cost an enum construction per use on the hot path.
_NOBLOCK, _RCVTIMEO = int(zmq.NOBLOCK), int(zmq.RCVTIMEO)
# The session's deadlines and heartbeats are checked at most this often (they are seconds long).
_CHECK_EVERY_NS = 5_000_000
_SHUTTING_DOWN = ErrorCode.SHUTTING_DOWN


@dataclass(frozen=True, slots=True)
class HandshakeFailed:
    """The transport's own handshake (ZMTP, CURVE) failed: no protocol session can start."""

    message: str


class FailoverSession(ClientSession):
    """The session of an agent with several servers to go to: a request refused SHUTTING_DOWN
    (its server drains, and its bye will end the session) is kept through the session's loss and
    sent again after the next welcome, from whichever server that comes; once only. With one
    server such a refusal ends the frame, as it always did."""

    def __init__(self, *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        self._elsewhere: list[int] = []

    def _on_error(self, e: ErrorReply, now_ns: int) -> list[Event]:
        req = None if e.rid is None or e.code != _SHUTTING_DOWN else self.outstanding.get(e.rid)
        if req is not None and not req.resent:
            req.resent = True
            self._elsewhere.append(req.rid)
            return []
        return super()._on_error(e, now_ns)

    def _lose(self, reason: str, code: ErrorCode | None, message: str, now_ns: int) -> Lost:
        keep = {rid: self.outstanding.pop(rid) for rid in self._elsewhere if rid in self.outstanding}
        self._elsewhere = []
        lost = super()._lose(reason, code, message, now_ns)
        if keep:
            self.outstanding.update(keep)
            self._resend_after_welcome = list(keep)
        return lost

    def close(self) -> list[Outstanding]:
        self._elsewhere = []
        return super().close()


def session_class(server: str | Sequence[str]) -> type[ClientSession]:
    """The session an agent for ``server`` (one endpoint or several) needs."""
    return FailoverSession if len(endpoints(server)) > 1 else ClientSession


def endpoints(server: str | Sequence[str]) -> list[str]:
    """``"tcp://a:5555,tcp://b:5555"`` or a list of endpoints -> the list (failover order)."""
    items = server.split(",") if isinstance(server, str) else list(server)
    out = [e.strip() for e in items if e.strip()]
    if not out:
        raise ValueError("no server endpoint given")
    return out


class ServerConnection:
    """One socket to ``server`` (or to one of several endpoints, failing over) for one session.
    Not thread-safe (one DEALER, one thread)."""

    def __init__(
        self,
        session: ClientSession,
        server: str | Sequence[str],
        ctx: zmq.Context,
        *,
        curve: ClientCurve | None = None,
        reconnect_max_s: float = 0.5,
        failover_s: float | None = None,
    ):
        self.session = session
        self.servers = endpoints(server)
        self.server = self.servers[0]
        # no welcome from an endpoint for this long: the next one (several endpoints only)
        self._failover_ns = int(1e9 * (max(0.5, 2 * reconnect_max_s) if failover_s is None else failover_s))
        self._opened_ns = 0
        self._multi = len(self.servers) > 1
        self._switch_due = False
        self.failovers = 0  # endpoint switches
        self.curve = curve
        self._ctx = ctx
        self._reconnect_ivl_max_ms = max(1, round(reconnect_max_s * 1000))
        self._sock: zmq.Socket | None = None
        self._monitor: LinkMonitor | None = None
        self._rcvtimeo = -1
        self._next_check_ns = 0
        # A side channel that may claim a message before the session sees it (the bundle update
        # fetcher, edgesplit/edge/ota_fetch.py): called with (parts, now_ns), True when it took it.
        self.side: Callable[[list, int], bool] | None = None

    @property
    def is_open(self) -> bool:
        return self._sock is not None

    @property
    def socket(self) -> zmq.Socket | None:
        """The DEALER (to poll several connections at once), or None while closed."""
        return self._sock

    def open(self) -> None:
        """Open the socket (libzmq connects, and reconnects, by itself) unless it is open."""
        if self._sock is None:
            # the same cap bounds libzmq's reconnect interval and the session's hello backoff
            self._sock = connect_dealer(
                self.server, ctx=self._ctx, curve=self.curve, reconnect_ivl_max_ms=self._reconnect_ivl_max_ms
            )
            self._rcvtimeo = -1
            self._monitor = LinkMonitor(self._sock)
            self.session.link_up = False  # until the monitor (or a welcome) says otherwise
            self._opened_ns = time.perf_counter_ns()

    def send(self, parts: list) -> None:
        if self._sock is None:
            raise AgentError("not connected")
        send_parts(self._sock, parts)  # small frames are copied, large ones zero-copy (copy_threshold)

    def hello(self) -> None:
        self.send(self.session.hello(time.perf_counter_ns()))

    def close(self, bye: bool = True) -> list[Outstanding]:
        """Say bye (when there is a session) and close the socket. Returns the requests that were
        still outstanding."""
        if self._sock is None:
            return []
        parts = self.session.bye("agent closing") if bye else None
        if parts is not None:
            try:
                self._sock.send_multipart(parts, zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        reqs = self.session.close()
        self._close_socket(200 if bye else 0)
        return reqs

    def _close_socket(self, linger_ms: int) -> None:
        if self._monitor is not None:
            self._monitor.close()
            self._monitor = None
        if self._sock is not None:
            self._sock.close(linger=linger_ms)
            self._sock = None

    def _fail_over(self) -> None:
        """The next endpoint: a new socket, and the hello the session's handshake needs."""
        self._close_socket(0)  # what is queued for the old endpoint is void with its session
        i = (self.servers.index(self.server) + 1) % len(self.servers)
        self.server = self.session.peer = self.servers[i]
        self.failovers += 1
        self.open()
        if self.session.handshaking:  # queued by libzmq until the connection is up
            self.send(self.session.hello(time.perf_counter_ns()))

    def pump(self, timeout_s: float) -> list[Event | HandshakeFailed]:
        """Wait up to ``timeout_s`` for messages, feed all that are there to the session, then let
        it check its deadlines when due. Returns the events for the agent."""
        sock = self._sock
        if sock is None:
            raise AgentError("not connected")
        out: list = []
        # A blocking receive with a timeout returns at once when something is queued (cheaper
        # than asking first and then receiving).
        ms = max(0, int(timeout_s * 1000))
        try:
            if ms == 0:
                if not pending_in(sock):
                    if time.perf_counter_ns() >= self._next_check_ns:
                        self._check(out)
                    return out
                parts = recv_parts(sock, _NOBLOCK)
            else:
                if ms != self._rcvtimeo:
                    sock.setsockopt(_RCVTIMEO, ms)
                    self._rcvtimeo = ms
                parts = recv_parts(sock)
        except zmq.Again:
            self._check(out)
            return out
        receive = self.session.receive if self.side is None else self._receive_with_side
        self._take(receive(parts, time.perf_counter_ns()), out)
        while pending_in(sock):
            self._take(receive(recv_parts(sock, _NOBLOCK), time.perf_counter_ns()), out)
        if time.perf_counter_ns() >= self._next_check_ns:
            self._check(out)
        return out

    def _receive_with_side(self, parts: list, now_ns: int) -> list:
        side = self.side
        if side is not None and side(parts, now_ns):
            self.session.last_recv_ns = now_ns  # the server is heard: it counts against silence (§8)
            return []
        return self.session.receive(parts, now_ns)

    def _take(self, events: list, out: list) -> None:
        for ev in events:
            if type(ev) is Send:
                self.send(ev.parts)
            else:
                out.append(ev)
                if self._multi and (type(ev) is Lost or (type(ev) is Refused and ev.code == _SHUTTING_DOWN)):
                    self._switch_due = True  # this endpoint lost the session, or is draining

    def _check(self, out: list) -> None:
        """Connection events from the monitor, then the session's deadlines, hellos and heartbeats."""
        now_ns = time.perf_counter_ns()
        self._next_check_ns = now_ns + _CHECK_EVERY_NS
        s = self.session
        for event, value in self._monitor.events() if self._monitor is not None else ():
            if event == link.CONNECTED:
                self._take(s.on_connected(now_ns), out)
            elif event == link.DISCONNECTED:
                self._take(s.on_disconnected(now_ns, f"connection to {self.server} dropped"), out)
            elif event == link.CONNECT_FAILED:
                s.on_connect_failed()
            elif event in link.HANDSHAKE_FAILED:
                out.append(
                    HandshakeFailed(
                        f"{link.HANDSHAKE_FAILED[event]} with {self.server}: "
                        f"{explain_handshake_failure(event, value, self.curve is not None)}"
                    )
                )
        self._take(s.tick(now_ns), out)
        if self._multi:
            if s.welcome is not None:
                self._switch_due = False
            elif s.handshaking and (self._switch_due or now_ns - self._opened_ns > self._failover_ns):
                self._switch_due = False
                self._fail_over()


def load_curve(server_key: str | Path | None, client_key: str | Path | None) -> ClientCurve | None:
    """CURVE (edgesplit/wire/curve.py): the server's public key and this agent's secret key, or None."""
    if (server_key is None) != (client_key is None):
        raise ValueError(
            "CURVE needs both server_key (the server's public key) and client_key (this agent's secret key)"
        )
    return None if server_key is None or client_key is None else ClientCurve.load(server_key, client_key)
