"""The client side of split training over the wire (docs/PROTOCOL.md §15): :class:`WireBody`, a
:class:`~edgesplit.families.sfprompt.train.BodyLink` whose body runs on a body server.

One DEALER socket and one session (``hello`` with ``serving: "u-shaped"``, the ``welcome`` must
list ``"split_training"``). Each step is sent and its answer awaited; a message whose answer does
not come within ``timeout_s`` is resent with the same step id (the server answers a retransmit
again and never runs it twice), up to ``retries`` times. A ``train_bwd`` answered UNKNOWN_STEP
raises :class:`StepLost`: the caller redoes the step from ``train_fwd`` under a new id.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import numpy as np

from ...wire import protocol as P
from ...wire import split_train as S
from ...wire import transport
from ...wire.curve import ClientCurve
from ...wire.errors import ErrorCode, ProtocolError
from ...wire.messages import ErrorReply


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
    ):
        self.endpoint, self.package_hash = endpoint, package_hash
        self.act_bits, self.grad_bits = act_bits, grad_bits
        self.timeout_s, self.retries = timeout_s, retries
        self.agent = agent or f"{socket.gethostname()}:{os.getpid()}"
        self.sock = transport.connect_dealer(endpoint, curve=curve)
        self.bytes_up = self.bytes_down = 0
        self.resends = 0
        self.server_us = 0.0
        self.welcome = self._handshake()

    def close(self) -> None:
        try:
            transport.send(self.sock, P.bye("done"))
        finally:
            self.sock.close(0)

    def _recv(self, deadline: float) -> P.Message | None:
        left = deadline - time.monotonic()
        if left <= 0 or not self.sock.poll(int(left * 1000) + 1):
            return None
        parts = transport.recv_parts(self.sock)
        self.bytes_down += sum(len(p) for p in parts)
        return P.parse(parts)

    def _handshake(self) -> dict[str, Any]:
        transport.send(self.sock, S.hello(self.package_hash, self.agent, "u-shaped"))
        msg = self._recv(time.monotonic() + self.timeout_s)
        if msg is None:
            raise WireError(f"no welcome from {self.endpoint} within {self.timeout_s} s")
        if msg.kind == P.Kind.ERROR:
            e = ErrorReply.from_header(msg.header)
            raise WireError(f"{self.endpoint} refused the session: {e.code.name}: {e.message}", int(e.code))
        h = msg.header
        if msg.kind != P.Kind.WELCOME or S.FEATURE_SPLIT_TRAINING not in (h.get("features") or []):
            transport.send(self.sock, P.bye("no split training"))
            raise WireError(f"{self.endpoint} does not offer split training (features {h.get('features')})")
        return h

    def _exchange(self, header: dict[str, Any], payload: bytes, step: int) -> np.ndarray:
        parts = P.pack(header, [payload])
        for _ in range(self.retries + 1):
            transport.send_parts(self.sock, parts)
            self.bytes_up += sum(len(p) for p in parts)
            deadline = time.monotonic() + self.timeout_s
            while True:
                msg = self._recv(deadline)
                if msg is None:
                    break  # resend the same step
                if msg.kind in (P.Kind.PING,):
                    transport.send(self.sock, P.pong(msg.header["nonce"]))
                    continue
                if msg.id != step:
                    continue  # a late answer to an earlier step
                if msg.kind == P.Kind.ERROR:
                    e = ErrorReply.from_header(msg.header)
                    cls = StepLost if e.code == ErrorCode.UNKNOWN_STEP else WireError
                    raise cls(f"step {step}: {e.code.name}: {e.message}", int(e.code))
                if msg.kind != P.Kind.RESULT:
                    raise WireError(f"step {step}: unexpected '{msg.kind}'")
                self.server_us += float(msg.header["timing"]["server_us"])
                d = msg.header["outputs"][0]
                try:
                    return S.decode(d, msg.frames[0], step)
                except ProtocolError as err:
                    raise WireError(f"step {step}: the server's answer does not decode: {err}") from None
            self.resends += 1
        raise WireError(f"step {step}: no answer from {self.endpoint} after {self.retries + 1} tries")

    def forward(self, step: int, tokens: np.ndarray, grad: bool) -> np.ndarray:
        d, payload = S.encode(tokens, self.act_bits, S.TENSOR_NAMES[S.TRAIN_FWD])
        return self._exchange(S.train_fwd(step, d, grad), payload, step)

    def backward(self, step: int, grad_out: np.ndarray) -> np.ndarray:
        d, payload = S.encode(grad_out, self.grad_bits, S.TENSOR_NAMES[S.TRAIN_BWD])
        return self._exchange(S.train_bwd(step, d), payload, step)
