"""Mode policies: per frame, which mode to send (or a local fallback), from what the agent knows.

The same objects run in the live agent and in the simulator (:mod:`edgesplit.control.simulator`):
both call ``choose(FrameState)`` once per frame and ``observe(Feedback)`` once per result, in the
order results arrive. Nothing in a policy knows whether it is simulated, except
:class:`~edgesplit.control.oracle.OraclePolicy`, whose whole point is to know the trace. What a
policy sees and says, and the interface, are in :mod:`edgesplit.control.policy_interface`
(re-exported here).

Predicted end-to-end latency of mode *m* (:meth:`EstimatingPolicy.predict_ms`):

    head_ms(m, device) + encode_ms + backlog_ms + 8 * (bytes(m) + overhead) / bandwidth
      + server_ms + base_rtt_ms

* ``bandwidth``: the policy's :class:`~edgesplit.control.estimator.BandwidthEstimator`, fed
  with uplink transmission times (:class:`~edgesplit.control.estimator.LinkSampler`);
* ``server_ms``: EWMA of the server's reported queue + compute time;
* ``encode_ms``: EWMA of the agent's measured encode time;
* ``base_rtt_ms``: the fixed round-trip term (propagation both ways and the small result's
  return), given to the policy's constructor and updated by :class:`FrameState` when the caller
  knows it anew (the live agent: the smallest recent ping/pong round trip; the simulator: its
  link model's value); the link sampler subtracts it from every report's link time;
* ``backlog_ms`` (deadline-aware policy only): how long the uplink still needs for requests
  already sent, by replaying the outstanding requests through a FIFO at the estimated bandwidth.
"""

from __future__ import annotations

import math
from typing import Sequence

from .estimator import BandwidthEstimator, EwmaEstimator, HarmonicMeanEstimator, LinkSampler, ScalarEwma
from .modes import FALLBACK, ModeSpec, ModesTable
from .policy_interface import Decision, Feedback, FrameState, Policy

__all__ = [
    "FALLBACK",
    "FrameState",
    "Feedback",
    "Decision",
    "Policy",
    "EstimatingPolicy",
    "DeadlinePolicy",
    "AssinePolicy",
    "FixedPolicy",
    "RoundRobinPolicy",
]


class RoundRobinPolicy(Policy):
    """Cycles through ``mode_ids`` frame by frame (never falls back): the mode-switch benchmark's
    policy, which makes every frame a switch."""

    def __init__(self, modes: ModesTable, mode_ids: Sequence[int]):
        super().__init__(modes)
        unknown = [i for i in mode_ids if i not in modes.by_id]
        if not mode_ids or unknown:
            raise ValueError(f"round robin needs mode ids of the table, got {list(mode_ids)} (unknown: {unknown})")
        self.mode_ids = list(mode_ids)
        self.name = "round-robin(" + ",".join(map(str, self.mode_ids)) + ")"
        self._i = 0

    def choose(self, state: FrameState) -> Decision:
        m = self.mode_ids[self._i % len(self.mode_ids)]
        self._i += 1
        return Decision(m, math.nan, "round robin")

    def reset(self) -> None:
        self._i = 0


class FixedPolicy(Policy):
    """Always the same mode (the no-adaptation baseline; never falls back)."""

    def __init__(self, modes: ModesTable, mode_id: int):
        super().__init__(modes)
        self.mode = modes.by_id[mode_id]
        self.name = f"fixed:{self.mode.name}"

    def choose(self, state: FrameState) -> Decision:
        return Decision(self.mode.id, math.nan, "fixed")


class EstimatingPolicy(Policy):
    """Base of the policies that learn the link from feedback: a bandwidth estimator, EWMAs of
    server and encode time, the latency prediction."""

    def __init__(
        self,
        modes: ModesTable,
        estimator: BandwidthEstimator | None = None,
        *,
        base_rtt_ms: float = 0.0,
        overhead_bytes: float = 0.0,
        initial_bps: float | None = None,
        server_alpha: float = 0.2,
        packet_bytes: int | None = None,
    ):
        super().__init__(modes)
        # A link that serves whole packets per delivery opportunity (cellular schedulers; Mahimahi
        # replays them so) takes as long for a 150-byte request as for a 1,400-byte one. Counting
        # bytes in whole packets keeps small requests' samples from reading as a slow link and
        # predicts sub-packet modes as costing the same. None: a fluid link (bytes / rate).
        if packet_bytes is not None and packet_bytes <= 0:
            raise ValueError(f"packet_bytes must be positive or None, got {packet_bytes}")
        self.packet_bytes = packet_bytes
        self.estimator = estimator if estimator is not None else HarmonicMeanEstimator(5)
        self.overhead_bytes = float(overhead_bytes)
        self.initial_bps = initial_bps
        self.server = ScalarEwma(server_alpha)
        self.encode = ScalarEwma(server_alpha)
        self.sampler = LinkSampler()
        self.initial_base_rtt_ms = float(base_rtt_ms)
        self.base_rtt_ms = self.initial_base_rtt_ms
        self._decision_bps: float | None = None  # the bandwidth behind the latest choice's prediction

    def link_bytes(self, nbytes: float) -> float:
        """What ``nbytes`` costs the link: rounded up to whole packets on a packet link."""
        p = self.packet_bytes
        return nbytes if p is None else math.ceil(nbytes / p) * p

    def observe(self, fb: Feedback) -> None:
        tx = self.sampler.transmit_seconds(
            fb.t_send_s, fb.t_result_s, fb.server_time_ms / 1000.0, self.base_rtt_ms / 1000.0
        )
        self.estimator.update(self.link_bytes(fb.nbytes), tx)
        self.server.update(fb.server_time_ms)
        if fb.encode_ms is not None:
            self.encode.update(fb.encode_ms)

    def bandwidth_bps(self) -> float | None:
        est = self.estimator.estimate_bps()
        return self.initial_bps if est is None else est

    def predict_ms(self, mode: ModeSpec, bps: float, backlog_ms: float = 0.0, nbytes: float | None = None) -> float:
        """End-to-end latency of a frame in ``mode``: ``nbytes`` on the wire when known (the frame
        is coded), else what the mode plans for (:attr:`ModeSpec.plan_bytes`)."""
        size = mode.plan_bytes if nbytes is None else nbytes
        return (
            mode.head_ms
            + self.encode.value
            + backlog_ms
            + 8.0 * self.link_bytes(size + self.overhead_bytes) / bps * 1000.0
            + self.server.value
            + self.base_rtt_ms
        )

    def coded_ms(self, d: Decision, nbytes: float) -> float:
        """The decision's prediction redone with the frame's actual size once coded (bytes of the
        request on the wire) in place of the planned one, at the bandwidth the decision used."""
        m, bps = self.modes.by_id.get(d.mode), self._decision_bps
        if m is None or bps is None or not math.isfinite(d.predicted_ms):
            return d.predicted_ms
        planned = self.link_bytes(m.plan_bytes + self.overhead_bytes)
        actual = self.link_bytes(float(nbytes))  # the request as sent: header included
        return d.predicted_ms + 8.0 * (actual - planned) / bps * 1000.0

    def reset(self) -> None:
        self.estimator.reset()
        self.server.reset()
        self.encode.reset()
        self.sampler.reset()
        self.base_rtt_ms = self.initial_base_rtt_ms
        self._decision_bps = None

    def _update_base_rtt(self, state: FrameState) -> None:
        if state.base_rtt_ms is not None:
            self.base_rtt_ms = float(state.base_rtt_ms)


class AssinePolicy(EstimatingPolicy):
    """Assine et al. (WoWMoM 2023) as this project compares against it: bandwidth = EWMA of
    per-frame throughput with alpha 0.4; send the most accurate mode whose predicted latency is
    under ``threshold`` (0.8) x deadline; when none is, the smallest mode (the scheme always
    transmits: no local fallback). No backlog term, no hysteresis. Before the first sample: the
    smallest mode. The latency predicted is the same model as every policy here (head + encode +
    transmission + server + base RTT)."""

    def __init__(self, modes: ModesTable, estimator: BandwidthEstimator | None = None, *, threshold: float = 0.8, **kw):
        super().__init__(modes, estimator if estimator is not None else EwmaEstimator(alpha=0.4), **kw)
        self.threshold = float(threshold)
        self.name = f"assine({self.estimator.name}, {self.threshold:g}D)"

    def choose(self, state: FrameState) -> Decision:
        self._update_base_rtt(state)
        bps = self.bandwidth_bps()
        small = self.modes.smallest
        if bps is None:
            return Decision(small.id, math.nan, "no estimate yet: smallest mode")
        limit = self.threshold * state.deadline_ms
        for m in self.modes.ranked:
            p = self.predict_ms(m, bps)
            if p < limit:
                return Decision(m.id, p, f"best under {self.threshold:g} x deadline")
        return Decision(small.id, self.predict_ms(small, bps), "nothing fits: smallest mode")


class DeadlinePolicy(EstimatingPolicy):
    """The deadline-aware controller.

    * **fit**: a mode fits when its predicted latency (with the uplink backlog) is at most
      ``(1 - margin) x deadline``; the choice is the most accurate fitting mode.
    * **hysteresis**: down at once (the current mode no longer fits); up only after
      ``up_frames`` consecutive frames in which the same more accurate mode fits with the extra
      margin ``up_margin`` (predicted <= ``(1 - margin - up_margin) x deadline``).
      ``up_frames=1, up_margin=0`` turns hysteresis off.
    * **no news is bad news**: when the oldest outstanding request is overdue (it has been out
      longer than its bytes need at the estimated bandwidth plus the fixed terms), the bandwidth
      used is at most its bytes over the time it has been out, so an outage is seen before any
      result reports it.
    * **nothing fits** (not even the smallest mode within the margin): if the local model meets
      the deadline with the margin (``local_ms``: the measured latency of ``full.onnx`` on this
      device), FALLBACK: a sure hit. Otherwise a fallback frame is a sure miss, so the smallest
      mode is still sent (it may make it) unless its predicted latency exceeds ``outage_factor``
      x max(deadline, ``local_ms``): then the link is taken for dead (an outage; sending would
      only queue bytes that delay the frames after it) and the frame is answered by the local
      model, FALLBACK. (``local_ms=None``: unknown, the local model is assumed late.)
      Falling back as soon as the remote answer would come after the local one (factor 1) gives
      up on short stalls that end within the deadline; factor 4 keeps those and still stops
      sending soon after an outage starts (docs/BENCHMARKS.md, "Figures behind design choices").
    * **rescue** (``rescue=True`` and ``local_ms`` known): a frame already sent whose answer has
      not come ``deadline - 1.5 x local_ms - 2 ms`` after capture is answered by the local model
      (:meth:`rescue_after_ms`). These are the frames that were on the link when an outage began:
      no choice made at capture can save them, the local model still can. The request stays on
      the link, and its late answer still feeds the estimator.
    * **leaving FALLBACK** needs only the normal margin (a frame that may hit beats a frame that
      cannot). While in FALLBACK with nothing outstanding, the smallest mode is also sent as a
      probe at most every ``probe_interval_s`` (its answer only feeds the estimator), so the
      estimate can recover after an outage (``None``: never probe).
    """

    def __init__(
        self,
        modes: ModesTable,
        estimator: BandwidthEstimator | None = None,
        *,
        margin: float = 0.15,
        up_margin: float = 0.1,
        up_frames: int = 5,
        probe_interval_s: float | None = 0.1,
        use_backlog: bool = True,
        local_ms: float | None = None,
        outage_factor: float = 4.0,
        rescue: bool = True,
        **kw,
    ):
        super().__init__(modes, estimator, **kw)
        if not (0 <= margin < 1 and 0 <= up_margin < 1 - margin and up_frames >= 1 and outage_factor >= 1):
            raise ValueError("need 0 <= margin < 1, 0 <= up_margin < 1 - margin, up_frames >= 1, outage_factor >= 1")
        self.outage_factor = float(outage_factor)
        self.margin, self.up_margin, self.up_frames = float(margin), float(up_margin), int(up_frames)
        self.probe_interval_s = probe_interval_s
        self.use_backlog = use_backlog
        self.local_ms = None if local_ms is None else float(local_ms)
        self.rescue = bool(rescue)
        hyst = "off" if (self.up_frames == 1 and self.up_margin == 0) else f"K={self.up_frames},+{self.up_margin:g}"
        pkt = "" if self.packet_bytes is None else f", pkt {self.packet_bytes}"
        self.name = f"deadline({self.estimator.name}, m={self.margin:g}, hyst {hyst}{pkt})"
        self._reset_state()

    def _reset_state(self) -> None:
        self.current: int | None = None
        self._up_target: int | None = None
        self._up_count = 0
        self._last_probe = -math.inf

    def reset(self) -> None:
        super().reset()
        self._reset_state()

    def rescue_after_ms(self, deadline_ms: float) -> float | None:
        if not self.rescue or self.local_ms is None:
            return None
        # 1.5 x: the local model's run time varies (a busy device); 2 ms: waking up to start it.
        after = deadline_ms - 1.5 * self.local_ms - 2.0
        return after if after > 0 else None

    def _effective_bps(self, state: FrameState, bps: float) -> float:
        if not state.outstanding:
            return bps
        o = state.outstanding[0]
        out_s = state.now_s - o.t_send_s - (self.base_rtt_ms + self.server.value) / 1000.0
        nb = self.link_bytes(o.nbytes)
        if out_s > 0 and out_s > nb * 8.0 / bps:
            return nb * 8.0 / out_s
        return bps

    def _backlog_ms(self, state: FrameState, bps: float, t_send: float) -> float:
        if not (self.use_backlog and state.outstanding):
            return 0.0
        free = -math.inf
        for o in state.outstanding:
            free = max(free, o.t_send_s) + self.link_bytes(o.nbytes) * 8.0 / bps
        return max(0.0, free - t_send) * 1000.0

    def predictions(self, state: FrameState, bps: float) -> dict[int, float]:
        out = {}
        for m in self.modes.modes:
            t_send = state.now_s + (m.head_ms + self.encode.value) / 1000.0
            out[m.id] = self.predict_ms(m, bps, self._backlog_ms(state, bps, t_send))
        return out

    def choose(self, state: FrameState) -> Decision:
        self._update_base_rtt(state)
        bps = self.bandwidth_bps()
        if bps is None:
            m = self.modes.smallest
            self.current = m.id
            return Decision(m.id, math.nan, "no estimate yet: smallest mode")
        bps = self._decision_bps = self._effective_bps(state, bps)
        pred = self.predictions(state, bps)
        limit = (1.0 - self.margin) * state.deadline_ms
        up_limit = (1.0 - self.margin - self.up_margin) * state.deadline_ms
        best = next((m for m in self.modes.ranked if pred[m.id] <= limit), None)

        if best is None:
            small = self.modes.smallest
            local = self.local_ms
            if local is None or local > limit:  # the local model would be late too: remote is the only chance
                if pred[small.id] <= self.outage_factor * max(state.deadline_ms, local or 0.0):
                    self.current, self._up_target, self._up_count = small.id, None, 0
                    return Decision(small.id, pred[small.id], "nothing fits with margin: smallest mode")
            self.current, self._up_target, self._up_count = FALLBACK, None, 0
            probe = None
            if (
                self.probe_interval_s is not None
                and not state.outstanding
                and state.now_s - self._last_probe >= self.probe_interval_s
            ):
                probe = small.id
                self._last_probe = state.now_s
            return Decision(FALLBACK, pred[small.id], "nothing fits: local fallback", probe)

        cur = self.current
        if cur is None or cur == FALLBACK:
            self.current, self._up_target, self._up_count = best.id, None, 0
            return Decision(best.id, pred[best.id], "start" if cur is None else "link back: leave fallback")
        if pred[cur] > limit:  # the current mode no longer fits: down at once
            self.current, self._up_target, self._up_count = best.id, None, 0
            return Decision(best.id, pred[best.id], "down: current mode does not fit")
        cur_acc = self.modes.by_id[cur].accuracy
        up = next((m for m in self.modes.ranked if m.accuracy > cur_acc and pred[m.id] <= up_limit), None)
        if up is None:
            self._up_target, self._up_count = None, 0
            return Decision(cur, pred[cur], "hold")
        if up.id == self._up_target:
            self._up_count += 1
        else:
            self._up_target, self._up_count = up.id, 1
        if self._up_count >= self.up_frames:
            self.current, self._up_target, self._up_count = up.id, None, 0
            return Decision(up.id, pred[up.id], f"up: fitted with extra margin for {self.up_frames} frames")
        return Decision(cur, pred[cur], f"hold: up candidate {up.id} ({self._up_count}/{self.up_frames})")
