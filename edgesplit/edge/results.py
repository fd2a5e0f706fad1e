"""What the agent reports: one :class:`FrameResult` per frame, :func:`summarize` over a run, and
:class:`AgentError` when it cannot work at all."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from ..wire.errors import ErrorCode
from ..wire.session_events import DISCONNECTED, TIMEOUT

__all__ = ["AgentError", "FrameResult", "summarize", "TIMEOUT", "DISCONNECTED", "FALLBACK_FAILED"]

# Agent-side failure names beyond the session's TIMEOUT and DISCONNECTED (not wire codes).
FALLBACK_FAILED = "FALLBACK_FAILED"  # the local model itself failed on a frame


class AgentError(Exception):
    """The agent cannot work at all (handshake refused, no server, bad bundle). ``code`` is the
    server's ErrorCode when the server said so, else None."""

    def __init__(self, message: str, code: ErrorCode | None = None):
        super().__init__(message)
        self.code = code


@dataclass
class FrameResult:
    id: int
    key: str
    label: int | None = None
    mode: int = 0
    head_ms: float = 0.0
    encode_ms: float = 0.0
    bytes_sent: int = 0  # tensor payload bytes on the wire
    bytes_received: int | None = None  # the result's tensor payload bytes (logits; U-shaped: the body's output)
    header_bytes: int = 0  # msgpack header bytes of the request
    rtt_ms: float | None = None  # send -> result received (includes server time)
    server_queue_ms: float | None = None
    server_compute_ms: float | None = None
    server_ms: float | None = None  # server receive -> reply sent
    batch_size: int | None = None
    pred: int | None = None
    logits: np.ndarray | None = field(default=None, repr=False)
    error: str | None = None  # error name (ErrorCode name, TIMEOUT, DISCONNECTED or FALLBACK_FAILED)
    error_code: int | None = None  # ErrorCode value when the server sent the error
    error_message: str | None = None
    source: str | None = None  # "server" or "local" (None for an error)
    fallback_reason: str | None = None  # why a local result is local (TIMEOUT, DISCONNECTED, UNREACHABLE, ...)
    local_ms: float | None = None  # time of the local fallback model (plus preprocessing for new frames)
    policy_reason: str | None = None  # with a mode policy: why it chose this frame's mode (or FALLBACK, mode -1)
    predicted_ms: float | None = None  # with a mode policy: its predicted end-to-end latency for the choice
    tail_ms: float | None = None  # U-shaped bundles: decoding the body's output and running the tail here

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        def r(v):
            return None if v is None else round(float(v), 4)

        d = {
            "id": self.id,
            "key": self.key,
            "mode": self.mode,
            "head_ms": r(self.head_ms),
            "encode_ms": r(self.encode_ms),
            "bytes_sent": self.bytes_sent,
            "header_bytes": self.header_bytes,
            "rtt_ms": r(self.rtt_ms),
            "server_queue_ms": r(self.server_queue_ms),
            "server_compute_ms": r(self.server_compute_ms),
            "server_ms": r(self.server_ms),
            "batch_size": self.batch_size,
            "pred": self.pred,
            "label": self.label,
            "source": self.source,
            "fallback_reason": self.fallback_reason,
            "local_ms": r(self.local_ms),
        }
        if self.bytes_received is not None:
            d["bytes_received"] = self.bytes_received
        if self.tail_ms is not None:
            d["tail_ms"] = r(self.tail_ms)
        if self.policy_reason is not None:
            d.update(policy_reason=self.policy_reason, predicted_ms=r(self.predicted_ms))
        if self.error is not None:
            d.update(error=self.error, error_code=self.error_code, error_message=self.error_message)
        return d


def _pct(values: Iterable[float | None], q: float) -> float | None:
    """Percentile of the values that were measured (a field a frame never reached is None)."""
    xs = [v for v in values if v is not None]
    return None if not xs else round(float(np.percentile(np.asarray(xs, np.float64), q)), 4)


def summarize(results: list[FrameResult], wall_s: float | None = None, agent: Any = None) -> dict[str, Any]:
    """Aggregate per-frame results: accuracy (server and local answers), how frames ended (server,
    local by reason, errors by name), bytes and latency percentiles of the frames sent, and, given
    the agent, its link history (sessions lost and re-established, late answers dropped)."""
    ok = [r for r in results if r.ok]
    served = [r for r in ok if r.source == "server"]
    local = [r for r in ok if r.source == "local"]
    sent = [r for r in results if r.header_bytes]  # went on the wire (a frame answered locally at once did not)
    labelled = [r for r in ok if r.label is not None and r.pred is not None]
    s: dict[str, Any] = {
        "frames": len(results),
        "ok": len(ok),
        "server": len(served),
        "local": len(local),
        "error_frames": len(results) - len(ok),
        "accuracy": None if not labelled else round(sum(r.pred == r.label for r in labelled) / len(labelled), 4),
        "bytes_per_frame_median": _pct([r.bytes_sent for r in sent], 50),
        "header_bytes_median": _pct([r.header_bytes for r in sent], 50),
        "rtt_ms_p50": _pct([r.rtt_ms for r in served], 50),
        "rtt_ms_p95": _pct([r.rtt_ms for r in served], 95),
        "head_ms_p50": _pct([r.head_ms for r in sent], 50),
        "encode_ms_p50": _pct([r.encode_ms for r in sent], 50),
        "server_queue_ms_p50": _pct([r.server_queue_ms for r in served], 50),
        "server_compute_ms_p50": _pct([r.server_compute_ms for r in served], 50),
        "batch_size_mean": None if not served else round(float(np.mean([r.batch_size for r in served])), 3),
        "local_ms_p50": _pct([r.local_ms for r in local], 50),
        "fallback_reasons": dict(Counter(r.fallback_reason for r in local)),
        "errors": dict(Counter(r.error for r in results if not r.ok)),
    }
    if any(r.tail_ms is not None for r in served):  # U-shaped: the answer came down as the body's output
        s["bytes_received_median"] = _pct([r.bytes_received for r in served], 50)
        s["tail_ms_p50"] = _pct([r.tail_ms for r in served], 50)
    if agent is not None:
        s.update(
            link_losses=agent.link_losses,
            reconnects=agent.reconnects,
            late_answers=agent.late_answers,
            rescues=agent.rescues,
        )
        if agent.controller is not None:  # frames per mode (-1: the policy's local fallback) and switch times
            s["adapt"] = agent.controller.summary() | {"mode_frames": dict(Counter(r.mode for r in results))}
    if wall_s:
        s["wall_s"] = round(wall_s, 3)
        s["frames_per_s"] = round(len(results) / wall_s, 2)
    return s
