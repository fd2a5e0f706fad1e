"""What a mode policy sees and says, and the interface every policy implements: the live agent and
the simulator (:mod:`edgesplit.control.simulator`) hand it a :class:`FrameState` per frame and a
:class:`Feedback` per result; it answers with a :class:`Decision`. The policies themselves are in
:mod:`edgesplit.control.policy`, which re-exports these names.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Sequence

from .modes import FALLBACK, ModesTable

__all__ = ["FrameState", "Feedback", "Decision", "Policy"]


@dataclass(frozen=True)
class FrameState:
    """What the agent knows when a frame is captured.

    ``outstanding``: the requests sent whose result has not come back, oldest first; any objects
    with ``t_send_s`` and ``nbytes`` attributes (read-only for the policy)."""

    now_s: float
    deadline_ms: float
    index: int = 0
    outstanding: Sequence[Any] = ()
    base_rtt_ms: float | None = None  # when known anew (e.g. from ping/pong); None: keep the policy's


@dataclass(frozen=True)
class Feedback:
    """One request's report (the agent's FrameResult, in seconds on the agent's clock).
    ``server_ms`` (receipt to reply, PROTOCOL.md ``timing.server_us``) is used when given, else
    ``server_queue_ms + server_compute_ms``."""

    t_send_s: float
    t_result_s: float
    nbytes: float
    server_queue_ms: float = 0.0
    server_compute_ms: float = 0.0
    encode_ms: float | None = None
    mode: int | None = None
    server_ms: float | None = None
    probe: bool = False

    @property
    def rtt_ms(self) -> float:
        return (self.t_result_s - self.t_send_s) * 1000.0

    @classmethod
    def from_frame_result(cls, r: Any, t_send_s: float) -> "Feedback | None":
        """From the agent's ``FrameResult`` (read by attribute name, no import) and the request's
        send time on the agent's clock. None for a request answered by an error or never
        answered: it carries no link sample (the agent still drops it from ``outstanding``)."""
        if getattr(r, "error", None) is not None or getattr(r, "rtt_ms", None) is None:
            return None
        return cls(
            t_send_s=t_send_s,
            t_result_s=t_send_s + r.rtt_ms / 1000.0,
            nbytes=float(r.bytes_sent) + float(getattr(r, "header_bytes", 0) or 0),
            server_queue_ms=r.server_queue_ms or 0.0,
            server_compute_ms=r.server_compute_ms or 0.0,
            server_ms=getattr(r, "server_ms", None),
            encode_ms=getattr(r, "encode_ms", None),
            mode=getattr(r, "mode", None),
        )

    @property
    def server_time_ms(self) -> float:
        return self.server_ms if self.server_ms is not None else self.server_queue_ms + self.server_compute_ms


@dataclass(frozen=True)
class Decision:
    """``mode``: a mode id, or FALLBACK (the device runs ``full.onnx`` itself; the frame is
    answered locally and recorded as a fallback, never dropped). ``probe_mode``: with FALLBACK,
    a mode to send anyway as a link probe (its answer only feeds the estimator)."""

    mode: int
    predicted_ms: float
    reason: str
    probe_mode: int | None = None

    @property
    def fallback(self) -> bool:
        return self.mode == FALLBACK


class Policy(ABC):
    """``choose`` once per frame, ``observe`` once per result (in arrival order), ``reset``
    before reuse."""

    name = "policy"

    def __init__(self, modes: ModesTable):
        self.modes = modes

    @abstractmethod
    def choose(self, state: FrameState) -> Decision: ...

    def observe(self, fb: Feedback) -> None:
        return None

    def reset(self) -> None:
        return None

    def coded_ms(self, d: Decision, nbytes: float) -> float:
        """``d``'s prediction once the frame is coded and ``nbytes`` (the request as sent) is
        known; a policy that does not model the link keeps its prediction."""
        return d.predicted_ms

    def rescue_after_ms(self, deadline_ms: float) -> float | None:
        """When a sent frame still has no answer this long after capture, the device answers it
        with the local model (a **rescue**: recorded as a fallback, the request's late answer
        still feeds ``observe``). None: never (the policy has no local model, or chooses not to)."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"
