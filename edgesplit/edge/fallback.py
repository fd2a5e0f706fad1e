"""Local fallback: answer a frame on the device with the bundle's unsplit model (``full.onnx``)
when the server cannot.

The agent keeps the preprocessed input of every frame it has in flight (only while fallback is
on), so a frame whose server answer will not come can still be finished here. Which conditions
send a frame here is the agent's business (see ``Agent``); this module holds the model, the names
of the reasons, and the simple round-trip check that sends frames here before they miss a deadline.
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np

from ..bundle import Bundle
from ..engine.providers import OrtExecution, as_execution
from ..wire.codec import ErrorCode

FALLBACK_CHOICES = ("auto", "off")

# Why a frame ended locally, beyond the agent's TIMEOUT / DISCONNECTED and the server's error names.
UNREACHABLE = "UNREACHABLE"  # no session with the server when the frame was submitted
RTT_OVER_DEADLINE = "RTT_OVER_DEADLINE"  # recent round trips are longer than the frame's deadline
SHUTDOWN = "SHUTDOWN"  # in flight when the agent was told to stop (an error instead, with fallback off)

# Server refusals that mean "not now" rather than "this request is wrong": a local answer is the
# right outcome for them. The others (MALFORMED, UNKNOWN_MODE, TOO_LARGE, UNSUPPORTED, ...) point
# at a bug or a misconfiguration, which a local answer would hide, so they stay errors.
FALLBACK_ERROR_CODES = frozenset(
    {
        ErrorCode.OVERLOADED,
        ErrorCode.DEADLINE_EXCEEDED,
        ErrorCode.SHUTTING_DOWN,
        ErrorCode.INTERNAL,
        ErrorCode.NOT_READY,
    }
)


class LocalModel:
    """The bundle's ``full`` model on ONNX Runtime: preprocessed image ``[1,C,H,W]`` -> logits."""

    def __init__(self, bundle: Bundle, threads: int | OrtExecution | None = None):
        from ..engine import create_engine

        self.engine = create_engine(bundle.file("full"), backend="ort", execution=as_execution(threads))

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.engine.run1(x)[0]


def load_fallback(bundle: Bundle, fallback: str, threads: int | OrtExecution | None = None) -> LocalModel | None:
    """``"auto"``: the bundle's full model when it ships one, else no fallback; ``"off"``: none."""
    if fallback not in FALLBACK_CHOICES:
        raise ValueError(f"fallback must be one of {', '.join(FALLBACK_CHOICES)}, got {fallback!r}")
    if fallback == "off" or not bundle.has("full"):
        return None
    return LocalModel(bundle, threads)


class RttGuard:
    """Says when the server path cannot meet a deadline, from the median of the last ``window``
    server round trips (agent send -> result received: link plus server time); silent until it has
    ``window`` of them, so that one slow first request (warm-up) decides nothing.

    While that median exceeds the deadline, frames go local, except one every ``probe_every_s``
    that still goes to the server: without probes the estimate would never learn that the link
    has recovered. Deliberately simple; adapting width and bits to the link is the mode policy's
    job (edgesplit.control), not this guard's."""

    def __init__(self, window: int = 5, probe_every_s: float = 0.5):
        self._window = window
        self._rtts: deque[float] = deque(maxlen=window)
        self.probe_every_s = probe_every_s
        self._next_probe = 0.0

    def record(self, rtt_ms: float) -> None:
        self._rtts.append(rtt_ms)

    def estimate_ms(self) -> float | None:
        return None if len(self._rtts) < self._window else float(np.median(self._rtts))

    def too_slow(self, deadline_ms: float) -> bool:
        est = self.estimate_ms()
        if est is None or est <= deadline_ms:
            return False
        now = time.monotonic()
        if now >= self._next_probe:
            self._next_probe = now + self.probe_every_s
            return False  # this frame is the probe
        return True
