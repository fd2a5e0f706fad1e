"""The agent's frames under a mode policy: the policy picks each frame's mode before the head runs
(in a slimmable bundle the mode decides which head runs), or FALLBACK: the frame is answered by
full.onnx here (fallback_reason POLICY), with the probe mode's head output sent as a link probe
when the policy asks for one. A frame sent under a policy that can rescue is answered locally if
its server answer has not come by the rescue time (:meth:`Outcomes.rescue_due`).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..control.modes import FALLBACK
from .adaptive import POLICY
from .outcomes import Frame
from .results import AgentError, FrameResult


class _InFlight:
    """Request ids still on the link as the mode policy sees them: outstanding, or rescued
    (answered locally) with the server's answer still to come."""

    def __init__(self, agent: Any):
        self.agent = agent

    def __contains__(self, rid: object) -> bool:
        return rid in self.agent.session.outstanding or rid in self.agent.outcomes.rescued


def submit_with_policy(
    agent: Any, x: np.ndarray, t0: float, key: str, label: int | None, deadline_ms: float | None
) -> int:
    """The policy picks the frame's mode before the head (in a slimmable bundle the mode decides
    which head runs): run that head and send, or answer the frame locally (FALLBACK), sending
    the probe mode's head output as a link probe if asked."""
    deadline = agent.policy_deadline_ms or (agent.deadline_ms if deadline_ms is None else deadline_ms)
    if deadline is None:
        raise AgentError("a mode policy needs a deadline (policy_deadline_ms or deadline_ms)")
    ctl = agent.controller
    d = ctl.decide(t0, float(deadline), agent.session.next_id, _InFlight(agent))
    if d.mode == FALLBACK:
        head_ms = 0.0
        if d.probe_mode is not None:
            z = _run_head(agent, d.probe_mode, x)
            head_ms = (time.perf_counter() - t0) * 1e3
            t_decision = time.perf_counter_ns()
            pid = agent.send_tensor(z, key=key, mode=d.probe_mode, deadline_ms=deadline_ms, head_ms=head_ms)
            agent._probes.add(pid)
            probe = agent.session.outstanding[pid]
            ctl.sent(pid, probe.tag.result, probe.t_send_ns, t_decision, probe=True)
        res = FrameResult(
            id=agent.session.take_id(),
            key=key,
            label=label,
            mode=FALLBACK,
            head_ms=head_ms,
            policy_reason=d.reason,
            predicted_ms=d.predicted_ms,
        )
        agent.outcomes.local(res, x, POLICY, t0)
        return res.id
    z = _run_head(agent, d.mode, x)
    head_ms = (time.perf_counter() - t0) * 1e3
    t_decision = time.perf_counter_ns()  # switch_ms: head output -> request ready
    rid = agent.send_tensor(
        z,
        key=key,
        label=label,
        mode=d.mode,
        deadline_ms=deadline_ms,
        head_ms=head_ms,
        fallback_input=None if agent.fallback is None else x,
    )
    req = agent.session.outstanding[rid]
    frame: Frame = req.tag
    # The prediction with the frame's actual size: an entropy-coded mode's frames vary in length.
    sent_bytes = frame.result.bytes_sent + frame.result.header_bytes
    frame.result.policy_reason, frame.result.predicted_ms = d.reason, ctl.policy.coded_ms(d, sent_bytes)
    after = None if agent.fallback is None else ctl.policy.rescue_after_ms(float(deadline))
    if after is not None:
        agent.outcomes.schedule_rescue(frame, int(t0 * 1e9) + int(after * 1e6))
    ctl.sent(rid, frame.result, req.t_send_ns, t_decision)
    return rid


def _run_head(agent: Any, mode: int, x: np.ndarray) -> np.ndarray:
    """The mode's head on one preprocessed frame, timed for the controller's switch figures."""
    m = agent.bundle.mode(mode)
    z, ms = agent.runner.run(m, x)
    agent.controller.head_ran(m.head, ms)
    return z
