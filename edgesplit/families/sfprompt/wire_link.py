"""The client side of split training over the wire (docs/PROTOCOL.md §15): :class:`WireBody`, a
:class:`~edgesplit.families.sfprompt.train.BodyLink` whose body runs on a body server.

One DEALER socket driving one :class:`~edgesplit.wire.split_train_session.SplitTrainSession` (the
protocol's client session, shared with the deploy agent, extended for training steps): the session
decides the handshake (``hello`` with ``serving: "u-shaped"``; the ``welcome`` must list
``"split_training"``), heartbeats, the silence deadline and reconnects; this class owns the socket
and the clock and turns each step into one blocking call. Each step is sent and its answer
awaited; a message whose answer does not come within ``timeout_s``, or that was lost with its
session (the server went silent for three heartbeats, said ``bye``), is resent with the same step
id once a session is up again (the server answers a retransmit again and never runs it twice), up
to ``retries`` times. A ``train_bwd`` answered UNKNOWN_STEP raises :class:`StepLost`: the caller
redoes the step from ``train_fwd`` under a new id.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import numpy as np
import zmq

from ...wire import split_train as S
from ...wire import transport
from ...wire.curve import ClientCurve
from ...wire.errors import ErrorCode, ProtocolError
from ...wire.session_events import Answered, Event, Lost, Refused, Send, TimedOut, Welcomed
from ...wire.split_train_session import SplitTrainSession

POLL_S = 0.05  # how often the session's clock is looked at while waiting (timeouts, heartbeats)


class WireError(RuntimeError):
    """The body server refused a message (its error code and text) or did not answer."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.code = code


class StepLost(WireError):
    """UNKNOWN_STEP: the server no longer holds this step (expired, evicted, or it restarted)."""


class WireBody:
    def __init__(
        self,
        endpoint: str,
        package_hash: str,
        *,
        act_bits: int = 32,
        grad_bits: int = 32,
        timeout_s: float = 30.0,
        retries: int = 2,
        agent: str | None = None,
        curve: ClientCurve | None = None,
        reconnect_max_s: float = 1.0,
    ):
        """``reconnect_max_s``: the longest wait between two hellos while no welcome comes."""
        self.endpoint, self.package_hash = endpoint, package_hash
        self.act_bits, self.grad_bits = act_bits, grad_bits
        self.timeout_s, self.retries = timeout_s, retries
        self.agent = agent or f"{socket.gethostname()}:{os.getpid()}"
        self.session = SplitTrainSession(
            package_hash, self.agent, timeout_s=timeout_s, reconnect_max_s=reconnect_max_s, peer=endpoint
        )
        self.sock = transport.connect_dealer(endpoint, curve=curve)
        self.bytes_up = self.bytes_down = 0  # every message sent and received (handshakes and resends too)
        self.resends = 0  # steps sent again after a timeout or a lost session
        self.server_us = 0.0
        try:
            self.welcome = self._handshake()
        except BaseException:
            self.sock.close(0)
            raise

    def close(self) -> None:
        try:
            bye = self.session.bye("done")
            if bye is not None:
                self._send(bye)
        finally:
            self.session.close()
            self.sock.close(0)

    # -- the socket and the clock --------------------------------------------------------------
    def _send(self, parts: list) -> None:
        """Send without blocking. With no connection to take it (the link is down, or its ZMTP
        handshake failed) the message is dropped: a hello is retried by the session's backoff, a
        step times out and is resent."""
        try:
            transport.send_parts(self.sock, parts, zmq.NOBLOCK)
        except zmq.Again:
            return
        self.bytes_up += sum(len(p) for p in parts)

    def _events(self, wait_s: float) -> list[Event]:
        """Wait up to ``wait_s`` for messages; feed them, then the clock, to the session; send
        what it asks, in order. Returns every event."""
        events: list[Event] = []
        if self.sock.poll(max(0, int(wait_s * 1000))):
            while transport.pending_in(self.sock):
                parts = transport.recv_parts(self.sock)
                self.bytes_down += sum(len(p) for p in parts)
                events += self.session.receive(parts, time.monotonic_ns())
        events += self.session.tick(time.monotonic_ns())
        for ev in events:
            if isinstance(ev, Send):
                self._send(ev.parts)
        return events

    def _refused(self, ev: Refused) -> WireError:
        return WireError(f"{self.endpoint} refused the session: {ev.code.name}: {ev.message}", int(ev.code))

    # -- the session and the steps -------------------------------------------------------------
    def _handshake(self) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout_s
        self._send(self.session.hello(time.monotonic_ns()))
        while (left := deadline - time.monotonic()) > 0:
            for ev in self._events(min(left, POLL_S)):
                if isinstance(ev, Welcomed):
                    assert self.session.welcome_header is not None
                    return self.session.welcome_header
                if isinstance(ev, Refused) and ev.rid is None:
                    raise self._refused(ev)
        raise WireError(f"no welcome from {self.endpoint} within {self.timeout_s} s")

    def _exchange(self, kind: str, step: int, tensor: np.ndarray, bits: int, grad: bool = True) -> np.ndarray:
        desc, payload = S.encode(tensor, bits, S.TENSOR_NAMES[kind])
        req, parts = self.session.step(kind, step, desc, payload, time.monotonic_ns(), grad=grad)
        if parts is not None:
            self._send(parts)
        tries = 1
        while True:
            for ev in self._events(POLL_S):
                if isinstance(ev, Answered) and ev.rid == step:
                    self.server_us += ev.timings.server_us
                    try:
                        return S.decode(ev.header["outputs"][0], ev.frames[0], step)
                    except ProtocolError as err:
                        raise WireError(f"step {step}: the server's answer does not decode: {err}") from None
                if isinstance(ev, Refused) and ev.rid == step:
                    cls = StepLost if ev.code == ErrorCode.UNKNOWN_STEP else WireError
                    raise cls(f"step {step}: {ev.code.name}: {ev.message}", int(ev.code))
                if isinstance(ev, Refused) and ev.rid is None and self.session.handshaking:
                    raise self._refused(ev)  # the server took our session and refuses a new one
                if (isinstance(ev, TimedOut) and ev.rid == step) or (isinstance(ev, Lost) and req in ev.requests):
                    if tries > self.retries:
                        raise WireError(f"step {step}: no answer from {self.endpoint} after {tries} tries")
                    tries += 1
                    self.resends += 1
                    parts = self.session.resend(req, time.monotonic_ns())
                    if parts is not None:
                        self._send(parts)

    def forward(self, step: int, tokens: np.ndarray, grad: bool) -> np.ndarray:
        return self._exchange(S.TRAIN_FWD, step, tokens, self.act_bits, grad)

    def backward(self, step: int, grad_out: np.ndarray) -> np.ndarray:
        return self._exchange(S.TRAIN_BWD, step, grad_out, self.grad_bits)
