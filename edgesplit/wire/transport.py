"""ZeroMQ transport for protocol v1: agent DEALER <-> server ROUTER over tcp (or ipc/inproc).

Thin helpers only: socket creation with the options the protocol relies on, and send/receive of
one protocol message. A pyzmq socket must stay in the thread that uses it; nothing here shares one.
"""

from __future__ import annotations

import os
import socket as _socket
from typing import Any, Sequence, cast

import zmq

from .curve import ClientCurve, ServerCurve
from .protocol import DEFAULT_LIMITS, Limits, Message, pack, parse

# Frames smaller than this are copied by libzmq anyway; larger ones are sent zero-copy.
COPY_THRESHOLD = 64 * 1024

# The per-frame calls of the Cython backend. pyzmq's ``send_multipart``/``recv_multipart`` wrap
# them in Python loops that check every part, turn option numbers into enums and go through the
# sugar ``send`` layer, several times the cost of calling the backend directly, on every request
# and every reply (docs/BENCHMARKS.md, "Figures behind design choices").
_Backend = getattr(zmq.backend, "Socket", zmq.Socket)
_c_send = _Backend.send
_c_recv = _Backend.recv
_c_get = _Backend.get
_SNDMORE = int(zmq.SNDMORE)
_RCVMORE = int(zmq.RCVMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)


def send_parts(sock: zmq.Socket, parts: Sequence, flags: int = 0) -> None:
    """Send one multipart message (a list of bytes-like frames) with one backend call per frame.
    Frames under the socket's ``copy_threshold`` are copied, larger ones go zero-copy. As with
    ``send_multipart``, libzmq accepts or refuses a message as a whole at its first frame (EAGAIN
    under NOBLOCK at the high-water mark, EHOSTUNREACH on a ROUTER with ROUTER_MANDATORY)."""
    last = len(parts) - 1
    more = flags | _SNDMORE
    for i in range(last):
        _c_send(sock, parts[i], more, False)
    _c_send(sock, parts[last], flags, False)


def pending_in(sock: zmq.Socket) -> bool:
    """Whether a message can be received now without blocking (``ZMQ_EVENTS & POLLIN``)."""
    return bool(cast(int, _c_get(sock, _EVENTS)) & _POLLIN)  # ZMQ_EVENTS is an int option


def recv_parts(sock: zmq.Socket, flags: int = 0) -> list[bytes]:
    """Receive one multipart message as a list of bytes (``recv_multipart`` without its layers)."""
    parts = [_c_recv(sock, flags)]
    while _c_get(sock, _RCVMORE):
        parts.append(_c_recv(sock, flags))
    return parts


def context() -> zmq.Context:
    """The process-wide ZeroMQ context."""
    return zmq.Context.instance()


def _tcp_keepalive(sock: zmq.Socket) -> None:
    # Detect half-open TCP connections (a device that lost its uplink) within about a minute.
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 30)
    sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, 10)


def bind_router(
    endpoint: str,
    *,
    limits: Limits = DEFAULT_LIMITS,
    ctx: zmq.Context | None = None,
    hwm: int = 100_000,
    rcvhwm: int | None = None,
    curve: ServerCurve | None = None,
) -> tuple[zmq.Socket, str]:
    """Bind a ROUTER socket. A tcp port of ``0`` or ``*`` picks a free port. Returns
    ``(socket, actual_endpoint)``.

    ROUTER_MANDATORY makes a send to a vanished peer raise instead of vanishing silently, so the
    server can forget that session. MAXMSGSIZE bounds what libzmq will allocate for one frame: a
    frame over twice the protocol frame limit disconnects the peer (frames between the protocol
    limit and that bound get a TOO_LARGE error reply).

    ``rcvhwm``: messages libzmq queues per peer before it stops reading that peer's connection
    (TCP then pushes back on the sender); default ``hwm``. ``curve``: make it a CURVE server (encrypted; the caller must have started the ZAP handler in
    ``ctx`` first, see :meth:`ServerCurve.start_authenticator`)."""
    ctx = ctx or context()
    s = ctx.socket(zmq.ROUTER)
    s.setsockopt(zmq.LINGER, 1000)
    s.setsockopt(zmq.ROUTER_MANDATORY, 1)
    s.setsockopt(zmq.SNDHWM, hwm)
    s.setsockopt(zmq.RCVHWM, hwm if rcvhwm is None else rcvhwm)
    s.setsockopt(zmq.MAXMSGSIZE, 2 * max(limits.max_frame_bytes, limits.max_header_bytes) + 4096)
    if endpoint.startswith("tcp://"):
        _tcp_keepalive(s)
    s.copy_threshold = COPY_THRESHOLD
    if curve is not None:
        curve.apply(s)
    if endpoint.startswith("tcp://") and endpoint.rsplit(":", 1)[-1] in ("0", "*"):
        endpoint = endpoint.rsplit(":", 1)[0] + ":*"
    try:
        s.bind(endpoint)
    except zmq.ZMQError as e:
        s.close(0)
        raise OSError(f"cannot bind {endpoint}: {e}") from None
    return s, s.getsockopt_string(zmq.LAST_ENDPOINT)


def connect_dealer(
    endpoint: str,
    *,
    ctx: zmq.Context | None = None,
    identity: bytes | None = None,
    hwm: int = 10_000,
    reconnect_ivl_max_ms: int = 5000,
    curve: ClientCurve | None = None,
) -> zmq.Socket:
    """Connect a DEALER socket to a server endpoint. libzmq reconnects by itself if the link drops,
    retrying after 100 ms, doubling up to ``reconnect_ivl_max_ms``: that cap bounds how long a
    restarted server waits for the agent to find it again (libzmq copies it at connect time).
    ``curve``: connect as a CURVE client (the server's public key and this agent's key pair)."""
    ctx = ctx or context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDHWM, hwm)
    s.setsockopt(zmq.RCVHWM, hwm)
    s.setsockopt(zmq.RECONNECT_IVL, 100)
    s.setsockopt(zmq.RECONNECT_IVL_MAX, reconnect_ivl_max_ms)
    if identity is not None:
        s.setsockopt(zmq.ROUTING_ID, identity)
    if endpoint.startswith("tcp://"):
        _tcp_keepalive(s)
    s.copy_threshold = COPY_THRESHOLD
    if curve is not None:
        curve.apply(s)
    s.connect(endpoint)
    return s


def send(
    sock: zmq.Socket, header: dict[str, Any], frames: Sequence = (), *, identity: bytes | None = None, flags: int = 0
) -> int:
    """Send one message (with a ROUTER identity prefix when given). Returns the payload bytes sent."""
    parts = pack(header, frames)
    if identity is not None:
        parts.insert(0, identity)
    send_parts(sock, parts, flags)
    return sum(memoryview(p).nbytes for p in parts[1 if identity is None else 2 :])


def recv(sock: zmq.Socket, *, limits: Limits = DEFAULT_LIMITS, flags: int = 0) -> Message:
    """Receive and validate one message on a DEALER socket (raises ProtocolError)."""
    return parse(recv_parts(sock, flags), limits)


def free_tcp_endpoint(host: str = "127.0.0.1") -> str:
    """A tcp endpoint on a currently free port (for tests and subprocess servers)."""
    with _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return f"tcp://{host}:{s.getsockname()[1]}"


def default_agent_name() -> str:
    return f"{_socket.gethostname()}:{os.getpid()}"
