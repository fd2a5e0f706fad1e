"""The oracle: a policy that knows the trace, for the simulator only. It bounds what any policy
could reach on a trace (on-time frames first, then accuracy), so the real ones are judged against
it (:mod:`edgesplit.control.simulator`).
"""

from __future__ import annotations

from .link import FifoLink, LinkModel
from .modes import FALLBACK, ModeSpec, ModesTable
from .policy_interface import Decision, FrameState, Policy

__all__ = ["OraclePolicy"]


class OraclePolicy(Policy):
    """Knows the trace, the link model and the frame schedule; decides with exact latencies.

    Per frame: if not even the smallest mode can meet the deadline, FALLBACK (sending would only
    delay later frames). Otherwise the most accurate mode *m* that meets the deadline **and** costs
    no later frame its deadline: from the uplink state *m* leaves, and from the state the smallest
    mode leaves, the next frames are replayed greedily (the smallest mode when it meets the
    deadline, else not sent) until both states coincide (the uplink has drained) or
    ``horizon_frames`` frames; *m* is taken when it reaches as many on-time frames.

    Sending the smallest mode whenever it is on time maximises on-time frames (fewer bytes never
    delay anyone, and with equal sizes, FIFO order and equal relative deadlines, accepting every
    request that can still make it is optimal), and every choice above keeps that maximum, so the
    oracle meets as many deadlines as any policy can when a local fallback cannot meet the
    deadline; among those schedules it then raises accuracy greedily, frame by frame (not an
    accuracy-optimal schedule).
    """

    def __init__(self, modes: ModesTable, link: LinkModel, frame_interval_s: float, horizon_frames: int = 600):
        super().__init__(modes)
        self.model = link
        self.interval = float(frame_interval_s)
        self.horizon = int(horizon_frames)
        self.link = FifoLink(link)
        self.name = "oracle"

    def reset(self) -> None:
        self.link.reset()

    def _on_time(self, t: float, mode: ModeSpec, level: float, deadline_s: float) -> tuple[bool, float, float]:
        end, _, arrival = self.link.peek(t, mode, level)
        return arrival - t <= deadline_s, end, arrival

    def _future_hits(self, t0: float, level_a: float, level_b: float, deadline_s: float) -> tuple[int, int]:
        small, trace, hits_a, hits_b = self.modes.smallest, self.model.trace, 0, 0
        for j in range(1, self.horizon + 1):
            t = t0 + j * self.interval
            free = trace.level_at(self.model.send_time(t, small))
            if (level_a <= free and level_b <= free) or level_a == level_b:
                break
            ok, end, _ = self._on_time(t, small, level_a, deadline_s)
            if ok:
                hits_a, level_a = hits_a + 1, end
            ok, end, _ = self._on_time(t, small, level_b, deadline_s)
            if ok:
                hits_b, level_b = hits_b + 1, end
        return hits_a, hits_b

    def choose(self, state: FrameState) -> Decision:
        t, d = state.now_s, state.deadline_ms / 1000.0
        small = self.modes.smallest
        ok, end_small, arr = self._on_time(t, small, self.link.level, d)
        if not ok:
            return Decision(FALLBACK, (arr - t) * 1000.0, "smallest mode would be late: local fallback")
        choice, why = small, "smallest mode: no more accurate one on time"
        for m in self.modes.ranked:
            if m.id == small.id:
                break
            ok, end, arr_m = self._on_time(t, m, self.link.level, d)
            if not ok:
                continue
            if end != end_small:
                mine, base = self._future_hits(t, end, end_small, d)
                if mine < base:
                    why = "smallest mode: a more accurate one would make a later frame late"
                    continue
            choice, why, arr = m, "most accurate on time, costs no later frame", arr_m
            break
        self.link.send(t, choice)
        return Decision(choice.id, (arr - t) * 1000.0, why)
