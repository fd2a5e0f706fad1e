"""What a :class:`~edgesplit.wire.client_session.ClientSession` tells its driver, and the pieces it
is built from: the record of an outstanding request and the reconnect backoff.

Events are small frozen dataclasses; a driver handles the ones it cares about and must send every
:class:`Send`, in order, when it gets it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Union

from .errors import ErrorCode
from .messages import ResultTimings, Welcome

# Why a session or a request ended on the client side (not wire codes: a server never sends them).
TIMEOUT = "TIMEOUT"
DISCONNECTED = "DISCONNECTED"


@dataclass(slots=True, eq=False)
class Outstanding:
    """A request the session waits on: as it was (last) sent, for one resend."""

    rid: int
    mode: int
    parts: list  # header bytes + payload, as sent (or to be sent after the next welcome)
    t_send_ns: int  # when it was (last) sent, or made while held
    compact: bool  # sent as a v1.1 compact request (no 'tensors' in the header)
    desc: dict  # its descriptor, to rebuild the full form
    deadline_ms: float | int | None
    resent: bool = False  # already resent once after a NOT_READY
    tag: Any = None  # the driver's own data for this request

    @property
    def header_bytes(self) -> int:
        return len(self.parts[0])


@dataclass(frozen=True, slots=True)
class Send:
    """Parts the session needs sent now (a hello retry, a pong, a ping, a resend)."""

    parts: list


@dataclass(frozen=True, slots=True)
class Welcomed:
    """A welcome for this bundle: the session is up. ``reconnected``: after a lost session."""

    welcome: Welcome
    reconnected: bool


@dataclass(frozen=True, slots=True)
class Answered:
    """A result for an outstanding request. ``frames`` are the output tensors, as parsed."""

    rid: int
    header: dict
    frames: list
    timings: ResultTimings
    request: Outstanding


@dataclass(frozen=True, slots=True)
class Refused:
    """An error reply. With a ``rid``: that request is finished (``request`` is its record).
    Without: the server refused the session (handshake) or something not tied to a request; a
    welcome for another bundle is reported as one too (UNKNOWN_BUNDLE)."""

    rid: int | None
    code: ErrorCode
    message: str
    request: Outstanding | None


@dataclass(frozen=True, slots=True)
class TimedOut:
    """No answer within ``timeout_s`` of the request's (last) send: the request is finished."""

    rid: int
    message: str
    request: Outstanding


@dataclass(frozen=True, slots=True)
class Lost:
    """The session is gone: ``reason`` DISCONNECTED (connection dropped, or the server silent for
    three heartbeats), TIMEOUT (silent for timeout_s) or SHUTTING_DOWN (bye, ``code`` set). Every
    request outstanding ends with it (``requests``); the session says hello again by itself."""

    reason: str
    code: ErrorCode | None
    message: str
    requests: tuple[Outstanding, ...]


@dataclass(frozen=True, slots=True)
class LateAnswer:
    """A result (``timings`` set) or error (``timings`` None) for a request no longer
    outstanding (timed out, lost, or abandoned by the driver): counted, not an answer."""

    rid: int
    timings: ResultTimings | None


@dataclass(frozen=True, slots=True)
class BadMessage:
    """The server sent something that is not valid protocol; the session ignored it."""

    code: ErrorCode
    message: str


@dataclass(frozen=True, slots=True)
class Ponged:
    nonce: int


# -- scatter/gather (PROTOCOL.md §13): what a ScatterSession adds -----------------------------


@dataclass(frozen=True, slots=True)
class Gathered:
    """A valid ``gather``: sub-model ``submodel``'s features for frame ``frame_id`` (float32 [D]).
    ``done``: every sub-model scattered to this worker for the frame is now answered."""

    frame_id: int
    submodel: int
    features: Any
    timings: Any  # edgesplit.wire.scatter_messages.GatherTimings
    done: bool


@dataclass(frozen=True, slots=True)
class ScatterRefused:
    """An ``error`` about a scatter: one sub-model (``submodel``) or, with ``submodel`` None, every
    sub-model of the frame still pending on this worker (``submodels``)."""

    frame_id: int
    submodel: int | None
    submodels: tuple[int, ...]
    code: ErrorCode
    message: str
    done: bool


@dataclass(frozen=True, slots=True)
class BadGather:
    """A ``gather`` the camera cannot use (invalid, not scattered, a duplicate, or not the bundle's
    feature tensor), with the reason; the sub-model (when known) is missing from the frame."""

    frame_id: int | None
    submodel: int | None
    kind: str  # invalid | not_scattered | duplicate | wrong_features | undecodable
    reason: str
    done: bool


@dataclass(frozen=True, slots=True)
class LateGather:
    """A ``gather`` or ``error`` for a frame no longer outstanding (already fused): counted, dropped."""

    frame_id: int
    submodel: int | None


Event = Union[
    Send,
    Welcomed,
    Answered,
    Refused,
    TimedOut,
    Lost,
    LateAnswer,
    BadMessage,
    Ponged,
    Gathered,
    ScatterRefused,
    BadGather,
    LateGather,
]


class Backoff:
    """Delays ``initial_s, 2*initial_s, 4*initial_s, ...`` capped at ``max_s``, each drawn
    uniformly from its upper half ("equal jitter"): never 0, never above the cap, and clients that
    lost the same server at the same instant spread their retries out."""

    def __init__(self, initial_s: float = 0.05, max_s: float = 0.5, rng: random.Random | None = None):
        if initial_s <= 0 or max_s < initial_s:
            raise ValueError(f"backoff needs 0 < initial_s <= max_s, got {initial_s} and {max_s}")
        self.initial_s = initial_s
        self.max_s = max_s
        self._rng = rng or random.Random()
        self._step_s = initial_s

    def reset(self) -> None:
        self._step_s = self.initial_s

    def next_delay(self) -> float:
        d = self._step_s
        self._step_s = min(self._step_s * 2, self.max_s)
        return d / 2 + self._rng.random() * d / 2
