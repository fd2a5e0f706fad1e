"""The live agent's side of the control plane: a mode policy driven by the agent's own frames.

:class:`ModeController` is what :class:`~edgesplit.edge.agent.Agent` holds when it is given a
:class:`~edgesplit.control.policy.Policy`. It feeds the policy exactly as the simulator
(:mod:`edgesplit.control.simulator`) does, from real timings instead of a link model:

* per frame, ``choose(FrameState)`` with the frame's capture time, its deadline and the requests
  still on the link (oldest first, probes included: they hold the uplink too);
* per finished request, in the order the results arrived, ``observe(Feedback)`` built from the
  agent's ``FrameResult`` (send time, round trip, bytes on the wire, the server's own time), so the
  estimator sees link time = round trip - server time. A request that ended without a server result
  (error, timeout, lost session) leaves ``outstanding`` and feeds nothing.

Results are collected lazily, at the next decision: a request is finished once the agent no longer
has it pending, and its ``FrameResult`` (shared with the agent) then holds its timings.

Mode switches cost nothing to set up: a mode is the codec's bits and channels (a different
argument to ``codec.encode``) and, in a slimmable bundle, which of the heads runs; every head is
an ONNX Runtime session loaded and warmed when the agent starts. The controller measures both
parts anyway: the time from the head's output to the encoded request being ready to send, for
frames whose mode differs from the previous request's (``switch_ms``) and for the others
(``same_ms``); and each head's run time on the first frame after the agent moved to it from
another head (``head_after_switch``) against its run time on a frame that followed itself
(``head_steady``). The switch cost is the difference, per head.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Container

import numpy as np

from ..control.estimator import EwmaEstimator, HarmonicMeanEstimator
from ..control.modes import ModesTable, modes_from_manifest, modes_table
from ..control.policy import AssinePolicy, DeadlinePolicy, Decision, Feedback, FixedPolicy, FrameState, Policy

# Policy kinds by their command-line names (``edgesplit agent --adapt``, ``bench adapt --live``).
POLICY_KINDS = ("deadline", "deadline-ewma", "assine", "fixed")
POLICY = "POLICY"  # fallback_reason of a frame the policy chose to answer locally (nothing fits the deadline)
RESCUE = "DEADLINE_RESCUE"  # fallback_reason of a sent frame answered locally because its answer was due too late


@dataclass
class _Sent:
    """One request on the link, as the policy sees it (``t_send_s``, ``nbytes``), and its result."""

    t_send_s: float
    nbytes: float
    result: Any  # the agent's FrameResult for this request, filled in when its answer arrives
    probe: bool


class ModeController:
    """Wraps one policy for one agent. ``decide`` per frame, ``sent`` per request put on the link."""

    def __init__(self, policy: Policy, base_rtt_ms: float | None = None):
        self.policy = policy
        self.base_rtt_ms = base_rtt_ms  # None: the policy keeps its constructor's value
        self._out: dict[int, _Sent] = {}  # request id -> request, in send order
        self._prev_mode: int | None = None
        self.frames = 0
        self.switch_ms: list[float] = []  # decision -> request ready, mode differs from the previous request's
        self.same_ms: list[float] = []  # the same, mode unchanged
        self._prev_head: str | None = None
        self.head_ms: dict[str, tuple[list[float], list[float]]] = {}  # role -> (after a switch, steady)
        self.observed = 0

    @property
    def outstanding(self) -> list[_Sent]:
        return list(self._out.values())

    def collect(self, pending: Container[int]) -> None:
        """Feed the policy every request no longer ``pending`` in the agent, in arrival order."""
        done = [(rid, s) for rid, s in self._out.items() if rid not in pending]
        if not done:
            return
        reports = []
        for rid, s in done:
            del self._out[rid]
            fb = Feedback.from_frame_result(s.result, s.t_send_s)
            if fb is not None:
                if s.probe:
                    fb = replace(fb, probe=True)
                reports.append(fb)
        for fb in sorted(reports, key=lambda f: f.t_result_s):
            self.policy.observe(fb)
            self.observed += 1

    def decide(self, now_s: float, deadline_ms: float, index: int, pending: Container[int]) -> Decision:
        self.collect(pending)
        self.frames += 1
        return self.policy.choose(
            FrameState(
                now_s=now_s,
                deadline_ms=deadline_ms,
                index=index,
                outstanding=tuple(self._out.values()),
                base_rtt_ms=self.base_rtt_ms,
            )
        )

    def late_result(self, rid: int, result: Any) -> None:
        """The server's answer to a request whose frame was already answered locally (a rescue):
        it still reports on the link, so it replaces the request's result for :meth:`collect`."""
        s = self._out.get(rid)
        if s is not None:
            self._out[rid] = replace(s, result=result)

    def head_ran(self, role: str, ms: float) -> None:
        """The head ``role`` ran for ``ms`` on this frame (after the decision, before encoding)."""
        after, steady = self.head_ms.setdefault(role, ([], []))
        (steady if self._prev_head in (None, role) else after).append(ms)
        self._prev_head = role

    def sent(self, rid: int, result: Any, t_send_ns: int, t_decision_ns: int, probe: bool = False) -> None:
        """A request went out (or was queued for the next welcome) ``t_send_ns`` after a decision
        made at ``t_decision_ns`` (both ``perf_counter_ns``)."""
        ms = (t_send_ns - t_decision_ns) / 1e6
        (self.same_ms if self._prev_mode in (None, result.mode) else self.switch_ms).append(ms)
        self._prev_mode = result.mode
        self._out[rid] = _Sent(t_send_ns / 1e9, float(result.bytes_sent + result.header_bytes), result, probe)

    def summary(self) -> dict[str, Any]:
        def pct(v: list[float], q: float) -> float | None:
            return None if not v else round(float(np.percentile(v, q)), 4)

        return {
            "policy": self.policy.name,
            "decisions": self.frames,
            "observed": self.observed,
            "switches": len(self.switch_ms),
            "switch_ms_p50": pct(self.switch_ms, 50),
            "switch_ms_max": None if not self.switch_ms else round(max(self.switch_ms), 4),
            "same_mode_ms_p50": pct(self.same_ms, 50),
            "same_mode_ms_max": None if not self.same_ms else round(max(self.same_ms), 4),
            "heads": {
                role: {
                    "after_switch_n": len(a),
                    "after_switch_ms_p50": pct(a, 50),
                    "steady_n": len(st),
                    "steady_ms_p50": pct(st, 50),
                    "switch_cost_ms": None if not (a and st) else round(float(np.median(a) - np.median(st)), 4),
                }
                for role, (a, st) in sorted(self.head_ms.items())
            },
        }


def make_policy(
    kind: str,
    modes: ModesTable,
    *,
    local_ms: float | None,
    base_rtt_ms: float = 0.0,
    mode_id: int | None = None,
    packet_bytes: int | None = None,
) -> Policy:
    """The policies of :func:`edgesplit.control.simulator.standard_policies`, by name (the oracle
    needs the trace: simulator only). ``kind``: ``deadline`` (harmonic-mean estimator, the
    controller), ``deadline-ewma``, ``assine``, ``fixed`` (``mode_id``; default the most accurate),
    or ``fixed:ID``. ``packet_bytes``: the deadline policies count bytes in whole packets of this
    size (a link that serves a packet per delivery opportunity); None: bytes / rate."""
    if kind.startswith("fixed"):
        if ":" in kind:
            mode_id = int(kind.split(":", 1)[1])
        return FixedPolicy(modes, modes.ranked[0].id if mode_id is None else mode_id)
    if kind == "deadline":
        return DeadlinePolicy(
            modes, HarmonicMeanEstimator(5), local_ms=local_ms, base_rtt_ms=base_rtt_ms, packet_bytes=packet_bytes
        )
    if kind == "deadline-ewma":
        return DeadlinePolicy(
            modes, EwmaEstimator(0.4), local_ms=local_ms, base_rtt_ms=base_rtt_ms, packet_bytes=packet_bytes
        )
    if kind == "assine":
        return AssinePolicy(modes, base_rtt_ms=base_rtt_ms)
    raise ValueError(f"unknown policy {kind!r}: one of {', '.join(POLICY_KINDS)} (or fixed:ID)")


def bundle_modes(bundle: Any, device: str | None = None) -> ModesTable:
    """The control plane's modes table of a loaded :class:`edgesplit.bundle.Bundle`."""
    return modes_from_manifest(bundle.manifest, device)


def device_modes(
    bundle: Any, device: str | None, measure_heads: Callable[[], dict[str, float]]
) -> tuple[ModesTable, str]:
    """The modes table the policy plans with on ``device`` (a device profile name), and where its
    head latencies come from. Without a profile: the bundle's table as it is (its one row). With
    one: the bundle's row for that profile when every mode has it (measured there, BUNDLE.md
    section 3.3); else each head is timed here, on this device with the agent's providers and
    threads (``measure_heads``: file role -> ms), rather than planning with another machine's row."""
    if device is None:
        return bundle_modes(bundle), "bundle"
    if all(device in m.head_ms for m in bundle.modes):
        return bundle_modes(bundle, device), f"bundle head_ms[{device}]"
    ms = measure_heads()
    rows = [
        {
            "id": m.id,
            "name": m.name,
            "bytes_per_frame": m.bytes_per_frame,
            "accuracy": m.accuracy,
            "head_ms": ms[m.head],
            "bytes_p95": m.bytes_p95,
        }
        for m in bundle.modes
    ]
    ta = float(bundle.manifest["teacher_accuracy"])
    return modes_table(rows, ta, device, name=bundle.name), "measured here"


def measure_heads_ms(runner: Any, runs: int = 20) -> dict[str, float]:
    """Median latency of each head of a :class:`~edgesplit.edge.heads.HeadRunner` on this device."""
    x = np.zeros((1, *runner.bundle.input_spec["shape"]), np.float32)
    return {role: measure_local_ms(_Logits(e), x.shape[1:], runs) for role, e in runner.heads.items()}


class _Logits:
    def __init__(self, engine: Any):
        self.engine = engine

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.engine.run1(x)[0]


def measure_local_ms(local_model: Any, input_shape: tuple[int, ...], runs: int = 20) -> float:
    """Median latency of the local fallback model (``LocalModel.logits``) on this device, after a
    few warm-up runs: what a DeadlinePolicy weighs a fallback against (its ``local_ms``)."""
    x = np.zeros((1, *input_shape), np.float32)
    times = []
    for i in range(runs + 3):
        t0 = time.perf_counter()
        local_model.logits(x)
        if i >= 3:
            times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))
