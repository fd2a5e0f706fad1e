"""The link model the simulator replays and the oracle knows: a trace plus the fixed terms.

One request of mode *m* for a frame captured at ``t`` (seconds):

* the device runs the head and encodes: it is sent at ``t + (head_ms(m) + encode_ms) / 1000``;
* its ``bytes_per_frame(m) + overhead_bytes`` go through the uplink, a FIFO pipe with the trace's
  capacity (:meth:`edgesplit.control.traces.Trace.transmit`): it waits for earlier requests;
* its result arrives ``(base_rtt_ms + server_ms) / 1000`` after its last byte left the uplink
  (``base_rtt_ms``: propagation both ways plus the return of the small result, a fixed term;
  Mahimahi and HSDPA traces carry capacity only, no delay).

End-to-end latency = result arrival - capture.
"""

from __future__ import annotations

from dataclasses import dataclass

from .modes import ModeSpec
from .traces import MAHIMAHI_PACKET_BYTES, Trace


@dataclass(frozen=True)
class LinkModel:
    trace: Trace
    base_rtt_ms: float = 20.0
    server_ms: float = 2.0
    encode_ms: float = 0.1
    overhead_bytes: float = 0.0

    def __post_init__(self):
        for k in ("base_rtt_ms", "server_ms", "encode_ms", "overhead_bytes"):
            if not getattr(self, k) >= 0:
                raise ValueError(f"LinkModel.{k} must be >= 0, got {getattr(self, k)}")

    def send_time(self, t_capture: float, mode: ModeSpec) -> float:
        return t_capture + (mode.head_ms + self.encode_ms) / 1000.0

    @property
    def packet_bytes(self) -> int | None:
        """Whole packets per delivery opportunity (a Mahimahi trace), or None for a fluid rate."""
        return MAHIMAHI_PACKET_BYTES if self.trace.kind == "packets" else None

    def wire_bytes(self, mode: ModeSpec) -> float:
        return mode.bytes_per_frame + self.overhead_bytes

    @property
    def after_uplink_s(self) -> float:
        return (self.base_rtt_ms + self.server_ms) / 1000.0


class FifoLink:
    """The uplink's state: the level (bytes of the trace's service curve) at which the last
    request sent ends."""

    def __init__(self, model: LinkModel):
        self.model = model
        self.level = 0.0

    def peek(self, t_capture: float, mode: ModeSpec, level: float | None = None) -> tuple[float, float, float]:
        """``(end_level, uplink_finish_s, result_arrival_s)`` if ``mode`` were sent for a frame
        captured at ``t_capture`` with the pipe busy until ``level`` (default: the current state)."""
        m = self.model
        _, end, fin = m.trace.transmit(
            m.send_time(t_capture, mode), m.wire_bytes(mode), self.level if level is None else level
        )
        return end, fin, fin + m.after_uplink_s

    def send(self, t_capture: float, mode: ModeSpec) -> tuple[float, float, float, float]:
        """Send it: ``(t_send, t_tx_start, uplink_finish_s, result_arrival_s)``; ``t_tx_start`` is
        when its first byte could go (``t_send``, or later when it queued behind others)."""
        m = self.model
        t_send = m.send_time(t_capture, mode)
        start, end, fin = m.trace.transmit(t_send, m.wire_bytes(mode), self.level)
        queued = start > m.trace.level_at(t_send)
        t_start = max(t_send, m.trace.time_at_level(start)) if queued else t_send
        self.level = end
        return t_send, t_start, fin, fin + m.after_uplink_s

    def reset(self) -> None:
        self.level = 0.0
