"""Typed views of the protocol messages both endpoints read field by field (docs/PROTOCOL.md §3).

Each view is a frozen dataclass built from a header that :func:`edgesplit.wire.protocol.parse`
already validated (``from_header`` checks nothing again: it only names and converts the fields).
Where the server builds that header, ``to_header()`` returns exactly the dict the matching builder
in :mod:`~edgesplit.wire.protocol` returns (it calls it), so one definition of each message holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import protocol as P
from .codec import PACKED_BITS
from .errors import ErrorCode


@dataclass(frozen=True)
class Welcome:
    """A server's ``welcome``: the session's terms."""

    bundle: str
    server: str
    credits: int
    limits: P.Limits
    heartbeat_ms: int
    codecs: tuple[str, ...]
    bits: tuple[int, ...] = tuple(PACKED_BITS)
    features: tuple[str, ...] = ()  # v1.1; empty for a v1.0 server

    @property
    def compact_requests(self) -> bool:
        """Whether this session may send compact requests (v1.1, §3.3.1)."""
        return P.FEATURE_COMPACT_REQUESTS in self.features

    @classmethod
    def from_header(cls, h: dict[str, Any]) -> Welcome:
        lim = h["limits"]
        return cls(
            bundle=h["bundle"],
            server=h["server"],
            credits=int(h["credits"]),
            limits=P.Limits(
                max_header_bytes=int(lim["max_header_bytes"]),
                max_frame_bytes=int(lim["max_frame_bytes"]),
                max_frames=int(lim["max_frames"]),
                max_batch=int(lim["max_batch"]),
            ),
            heartbeat_ms=int(h["heartbeat_ms"]),
            codecs=tuple(h["codecs"]),
            bits=tuple(int(b) for b in h["bits"]),
            features=tuple(h.get("features") or ()),
        )

    def to_header(self) -> dict[str, Any]:
        return P.welcome(
            self.bundle,
            self.server,
            credits=self.credits,
            limits=self.limits,
            heartbeat_ms=self.heartbeat_ms,
            codecs=self.codecs,
            bits=self.bits,
            features=self.features,
        )


@dataclass(frozen=True)
class ResultTimings:
    """The ``timing`` map of a ``result``: where the server spent the request's time, in us."""

    queue_us: float
    compute_us: float
    server_us: float
    batch_size: int

    @classmethod
    def from_header(cls, h: dict[str, Any]) -> ResultTimings:
        """From a whole ``result`` header (the ``timing`` map inside it)."""
        t = h["timing"]
        return cls(
            queue_us=float(t["queue_us"]),
            compute_us=float(t["compute_us"]),
            server_us=float(t["server_us"]),
            batch_size=int(t["batch_size"]),
        )

    def to_header(self, req_id: int, outputs: list[dict[str, Any]], *, t_send_ns: int | None = None) -> dict[str, Any]:
        """The ``result`` header carrying these timings."""
        return P.result(
            req_id,
            outputs,
            queue_us=self.queue_us,
            compute_us=self.compute_us,
            batch_size=self.batch_size,
            server_us=self.server_us,
            t_send_ns=t_send_ns,
        )


@dataclass(frozen=True)
class ErrorReply:
    """An ``error``: ``rid`` is None for errors that name no request (handshake, malformed header)."""

    rid: int | None
    code: ErrorCode
    message: str

    @classmethod
    def from_header(cls, h: dict[str, Any]) -> ErrorReply:
        """An unknown code number (a later revision's) reads as INTERNAL, which is retryable."""
        try:
            code = ErrorCode(h["code"])
        except ValueError:
            code = ErrorCode.INTERNAL
        return cls(rid=h.get("id"), code=code, message=h["message"])

    def to_header(self) -> dict[str, Any]:
        return P.error(self.rid, self.code, self.message)
