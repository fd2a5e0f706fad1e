"""One live agent under one mode policy, streaming frames like a camera; run by
:mod:`edgesplit.bench.adapt_live` inside the shaped network namespace (``python -m``, because a
process enters a namespace only when it starts).

Handshake with the parent over stdin/stdout: the runner loads the bundle, reads its frames into
memory, connects, prints ``ready``, and starts the clock when it reads a line (the parent starts
the trace replay at that moment). Frame *i* is captured at ``i / fps`` on that clock; the answer
time is when the agent hands the frame's result over. It writes one JSON line per frame (the
agent's ``FrameResult.to_json()`` plus ``t_capture_s`` and ``t_answer_s``) and a final
``{"summary": ...}`` line with the controller's switch times.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from ..bundle import Bundle
from ..data.sources import open_source, take
from ..edge.adaptive import bundle_modes, make_policy
from ..edge.agent import Agent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgesplit.bench.adapt_runner")
    p.add_argument("--bundle", required=True)
    p.add_argument("--server", required=True)
    p.add_argument("--policy", required=True, help="deadline, deadline-ewma, assine or fixed:ID")
    p.add_argument("--deadline-ms", type=float, required=True)
    p.add_argument("--fps", type=float, required=True)
    p.add_argument("--frames", type=int, required=True)
    p.add_argument("--local-ms", type=float, default=None)
    p.add_argument("--base-rtt-ms", type=float, default=0.0)
    p.add_argument("--source", default="cifar10:test")
    p.add_argument("--out", required=True, help="JSON lines file")
    a = p.parse_args(argv)

    bundle = Bundle.load(a.bundle)
    policy = make_policy(a.policy, bundle_modes(bundle), local_ms=a.local_ms, base_rtt_ms=a.base_rtt_ms)
    samples = list(take(open_source(a.source, bundle.classes), a.frames))
    # A window as large as the server's credits: frames wait on the (shaped) link, not in the agent,
    # as a camera's frames would. No server-side deadline: the policy plans for the end-to-end one.
    agent = Agent(
        bundle,
        a.server,
        inflight=64,
        threads=1,
        fallback="auto",
        timeout_s=5.0,
        policy=policy,
        policy_deadline_ms=a.deadline_ms,
    ).connect(timeout_s=60.0)  # the server may still be starting
    if agent.welcome is None:
        print(f"adapt_runner: no welcome from {a.server}", file=sys.stderr)
        return 1
    answered: dict[int, tuple[float, dict]] = {}

    def take_in(results) -> None:
        now = time.perf_counter()
        for r in results:
            answered[r.id] = (now, r.to_json())

    print("ready", flush=True)
    sys.stdin.readline()
    t0 = time.perf_counter()
    captured: dict[int, float] = {}
    for i, sample in enumerate(samples):
        t_cap = t0 + i / a.fps
        while (wait := t_cap - time.perf_counter()) > 0:
            take_in(agent.poll(min(wait, 0.02)))
        captured[agent.submit(sample)] = t_cap
        take_in(agent.poll(0.0))
    end = time.perf_counter() + 2 * agent.timeout_s
    while agent.in_flight and time.perf_counter() < end:
        take_in(agent.poll(0.02))
    take_in(agent.poll(0.0))
    summary = agent.controller.summary()
    agent.close()
    with open(a.out, "w") as f:
        for rid, t_cap in captured.items():
            t_ans, rec = answered.get(rid, (None, {"id": rid, "error": "UNANSWERED"}))
            rec.update(t_capture_s=round(t_cap - t0, 6), t_answer_s=None if t_ans is None else round(t_ans - t0, 6))
            f.write(json.dumps(rec) + "\n")
        f.write(json.dumps({"summary": summary}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
