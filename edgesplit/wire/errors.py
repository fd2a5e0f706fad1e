"""Errors of wire protocol v1: the error codes (numbers fixed by docs/PROTOCOL.md), the exception
types every layer raises, and the two value checks both the codec and the protocol validation use.

Kept apart from the tensor codec and the message parser so that each endpoint's session logic can
name an error without importing either.
"""

from __future__ import annotations

import math
from enum import IntEnum
from typing import Any


class ErrorCode(IntEnum):
    """Error codes of protocol v1. The numbers are fixed by docs/PROTOCOL.md; never renumber."""

    MALFORMED = 1  # not a valid message / descriptor / payload
    UNSUPPORTED_VERSION = 2  # header "v" is not a version this peer speaks
    UNKNOWN_BUNDLE = 3  # hello names a bundle hash the server has not loaded
    NOT_READY = 4  # request (or other session message) before a successful hello
    UNKNOWN_MODE = 5  # request names a mode id the bundle does not have, or disagrees with it
    TOO_LARGE = 6  # header, frame, batch or tensor over the advertised limits
    OVERLOADED = 7  # server queue full, or the agent exceeded its credits
    DEADLINE_EXCEEDED = 8  # the request's deadline passed before its compute started
    INTERNAL = 9  # the server failed while computing; the request may be retried
    UNSUPPORTED = 10  # well-formed but not supported here: reserved kind, codec, bits, dtype
    SHUTTING_DOWN = 11  # the server is draining and accepts no new requests
    UNKNOWN_SUBMODEL = 12  # v1.2: a sub-model id the worker does not hold (or the bundle does not have)
    UNKNOWN_STEP = 13  # v1.4: a train_bwd for a training step the server does not hold (redo it from train_fwd)


class WireError(Exception):
    """A message, descriptor or payload that violates the wire contract. ``code`` is an ErrorCode."""

    def __init__(self, code: ErrorCode | int, message: str):
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class ProtocolError(WireError):
    """An incoming message that violates the protocol. ``req_id`` is the request id when it could
    be read (so the error reply can name it), else None."""

    def __init__(self, code: ErrorCode | int, message: str, req_id: int | None = None):
        super().__init__(code, message)
        self.req_id = req_id


def is_int(v: Any) -> bool:
    """A msgpack integer (bool is not one, though Python says it is an int)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v: Any) -> bool:
    """A finite msgpack number (int or float, not bool, not NaN or infinite)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
