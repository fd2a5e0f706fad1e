"""What the agent knows about its link to the server, beyond the messages it receives.

Two small pieces, both read only where the agent checks timeouts (never per message):

- :class:`LinkMonitor`: libzmq's socket monitor on the agent's DEALER. A server that dies
  (``kill -9``, a crash, a reboot) closes its TCP connections, and libzmq reports
  ``EVENT_DISCONNECTED`` at once, where waiting for an answer would take the request timeout. A
  completed ZMTP handshake (``EVENT_HANDSHAKE_SUCCEEDED``) says a server is there again, so the
  agent can say ``hello`` right away instead of at its next backoff step.
- :class:`Backoff` (defined in :mod:`edgesplit.wire.session_events`, used by the client session):
  exponential delays with jitter for re-sending ``hello`` while no ``welcome`` arrives, so that a
  fleet of agents does not hammer a server that is coming back up.

A link that looks connected but carries nothing (a half-open TCP connection, a server that hangs)
is caught by the client session's silence deadline instead (see ``ClientSession.tick``).
"""

from __future__ import annotations

import zmq
from zmq.utils.monitor import parse_monitor_message

from ..wire.session_events import Backoff
from ..wire.transport import pending_in

__all__ = ["LinkMonitor", "Backoff", "CONNECTED", "DISCONNECTED", "CONNECT_FAILED", "HANDSHAKE_FAILED"]

# The events the agent acts on. Subscribing to these only keeps the monitor queue short.
CONNECTED = int(zmq.EVENT_HANDSHAKE_SUCCEEDED)  # TCP up and ZMTP (and CURVE, if any) handshake done
DISCONNECTED = int(zmq.EVENT_DISCONNECTED)  # an established connection dropped
CONNECT_FAILED = int(zmq.EVENT_CONNECT_RETRIED)  # an attempt failed; libzmq retries after its interval
HANDSHAKE_FAILED = {
    int(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL): "handshake failed",
    int(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL): "handshake failed (protocol error)",
    int(zmq.EVENT_HANDSHAKE_FAILED_AUTH): "handshake failed (authentication refused)",
}
_MASK = CONNECTED | DISCONNECTED | CONNECT_FAILED
for _event in HANDSHAKE_FAILED:
    _MASK |= _event


class LinkMonitor:
    """Connection events of one socket, read without blocking."""

    def __init__(self, sock: zmq.Socket):
        self._sock = sock
        self._pair = sock.get_monitor_socket(_MASK)

    def events(self) -> list[tuple[int, int]]:
        """The ``(event, value)`` pairs reported since the last call, oldest first."""
        out = []
        while pending_in(self._pair):
            ev = parse_monitor_message(self._pair.recv_multipart(zmq.NOBLOCK))
            out.append((int(ev["event"]), int(ev["value"])))
        return out

    def close(self) -> None:
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:  # the socket is already closed
            pass
        self._pair.close(linger=0)
