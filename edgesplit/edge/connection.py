"""The agent's link to its server: one DEALER socket, its link monitor, and the
:class:`~edgesplit.wire.client_session.ClientSession` they drive.

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
from typing import Callable

import zmq

from ..wire.client_session import ClientSession, Event, Outstanding, Send
from ..wire.curve import ClientCurve, explain_handshake_failure
from ..wire.transport import connect_dealer, pending_in, recv_parts, send_parts
from . import link
from .link import LinkMonitor
from .results import AgentError

# Plain ints: pyzmq's enum constants cost an enum construction per use on the hot path.
_NOBLOCK, _RCVTIMEO = int(zmq.NOBLOCK), int(zmq.RCVTIMEO)
# The session's deadlines and heartbeats are checked at most this often (they are seconds long).
_CHECK_EVERY_NS = 5_000_000


@dataclass(frozen=True, slots=True)
class HandshakeFailed:
    """The transport's own handshake (ZMTP, CURVE) failed: no protocol session can start."""

    message: str


class ServerConnection:
    """One socket to ``server`` for one session. Not thread-safe (one DEALER, one thread)."""

    def __init__(
        self,
        session: ClientSession,
        server: str,
        ctx: zmq.Context,
        *,
        curve: ClientCurve | None = None,
        reconnect_max_s: float = 0.5,
    ):
        self.session = session
        self.server = server
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
        if self._monitor is not None:
            self._monitor.close()
            self._monitor = None
        self._sock.close(linger=200 if bye else 0)
        self._sock = None
        return reqs

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


def load_curve(server_key: str | Path | None, client_key: str | Path | None) -> ClientCurve | None:
    """CURVE (edgesplit/wire/curve.py): the server's public key and this agent's secret key, or None."""
    if (server_key is None) != (client_key is None):
        raise ValueError(
            "CURVE needs both server_key (the server's public key) and client_key (this agent's secret key)"
        )
    return None if server_key is None or client_key is None else ClientCurve.load(server_key, client_key)
