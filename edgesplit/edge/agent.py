"""The deploy agent: frames -> preprocess -> head (ONNX Runtime) -> encode -> server -> logits.

This module is the edge plane's public face: it names what other modules import
(:class:`Agent`, :class:`FrameResult`, :class:`AgentError`, :func:`summarize`, the CLI's
:func:`build_parser` and :func:`agent_main`). The agent is composed in :mod:`.agent_core` from
the protocol's client session (:mod:`edgesplit.wire.client_session`, driven by
:mod:`.connection`), the heads (:mod:`.heads`), how frames end (:mod:`.outcomes`, with the
fallback) and the mode policy (:mod:`.adaptive`). The edge plane runs on the device and must
never import torch (a test checks it in a fresh interpreter). One DEALER socket from one thread:
``Agent`` is not thread-safe.

In-process use::

    agent = Agent(bundle, "tcp://127.0.0.1:5555", inflight=8).connect()
    r = agent.infer(sample)                 # one frame, synchronous -> FrameResult
    for r in agent.run("cifar10:test", 100):  # streaming, up to `inflight` requests outstanding
        print(r.to_json())
    agent.close()

Requests go out **compact** (protocol v1.1: header ``{v, kind, id, mode[, deadline_ms]}``, no
tensor descriptor, 27-31 bytes instead of ~130) when the server's welcome lists
``"compact_requests"`` and the frame is the mode's default encoding (raw codec, all the mode's
channels, one row); otherwise, and to v1.0 servers, as full requests.

Every frame ends as exactly one :class:`FrameResult`: a server result (``source="server"``), a
local fallback result (``source="local"``, with ``fallback_reason``), or an error (``error`` set to
the server's error name, or ``TIMEOUT`` / ``DISCONNECTED`` / ``FALLBACK_FAILED`` for failures seen
on the agent side). A late answer to a frame already finished is counted and dropped.

Resilience. libzmq reconnects the TCP link by itself; a socket monitor tells the agent at once when
the connection drops, and a silence deadline (nothing heard for ``min(3 heartbeats, timeout_s)``
with requests outstanding) catches links that hang without dropping. Then the session is lost:
outstanding frames end locally (fallback on) or as ``DISCONNECTED`` / ``TIMEOUT`` errors, and the
agent says ``hello`` again, with exponential backoff and jitter capped at ``reconnect_max_s`` (the
same cap bounds libzmq's reconnect interval), at once when the monitor sees a new connection. With fallback
on (``fallback="auto"`` and a bundle with ``full.onnx``), frames submitted while there is no
session are answered locally, as are frames the server refuses with a "not now" code (OVERLOADED,
DEADLINE_EXCEEDED, SHUTTING_DOWN, INTERNAL, NOT_READY), frames that time out, and, with a
deadline, frames whose recent round trips would not fit it (see ``fallback.RttGuard``). With
fallback off, frames submitted while there is no session wait for the next welcome (up to
``timeout_s``, then ``TIMEOUT``).

Adaptive modes. Given a ``policy`` (:mod:`edgesplit.control.policy`, run through
:class:`~edgesplit.edge.adaptive.ModeController`), each frame's mode is the policy's choice, made
before the head runs (``mode=`` is then ignored), or FALLBACK: the frame is answered by full.onnx
here with fallback_reason ``POLICY``. Every server result feeds the policy's estimators. Switching
modes reloads nothing: a mode is the codec's bits and channels plus, in a slimmable bundle, which
of the heads (one per width, all loaded and warmed at start) runs. The time from decision to
request ready is measured for switches and non-switches (summary ``adapt``).
A policy that can rescue (``Policy.rescue_after_ms``: the deadline-aware one with a local model
fast enough) has every frame it sent answered by full.onnx, fallback_reason ``DEADLINE_RESCUE``,
if the server's answer has not come by then; the late answer is dropped as an answer but still
feeds the policy (summary ``rescues``).
"""

from __future__ import annotations

import sys

from .agent_cli import agent_main, build_parser
from .agent_core import DISCONNECTED, FALLBACK_FAILED, TIMEOUT, Agent
from .results import AgentError, FrameResult, summarize

__all__ = [
    "Agent",
    "AgentError",
    "FrameResult",
    "summarize",
    "build_parser",
    "agent_main",
    "TIMEOUT",
    "DISCONNECTED",
    "FALLBACK_FAILED",
]

if __name__ == "__main__":
    sys.exit(agent_main(sys.argv[1:]))
