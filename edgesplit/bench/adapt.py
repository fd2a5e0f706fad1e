"""``edgesplit bench adapt``: the bandwidth-adaptive controller on a real uplink trace, next to
every fixed mode, Assine et al.'s policy (EWMA with alpha 0.4, the best mode predicted under
0.8 x deadline) and an oracle that knows the trace.

``--sim`` (default) replays the trace through :mod:`edgesplit.control.simulator` with the bundle's
measured modes table: the same policy objects the live agent runs, thousands of frames a second.
``--live`` runs server and agent inside a network namespace whose loopback is shaped by
``tc tbf`` from the trace (:mod:`edgesplit.bench.adapt_live`), and adds the accuracy measured on
labelled frames.

The local fallback latency (``full.onnx`` on this machine) is measured unless given, because the
controller's outage decisions depend on it.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from .local_timing import measure_fallback_ms


def add_arguments(p) -> None:
    p.add_argument("--bundle", default=None, help="bundle (default: the shipped CIFAR-10 bundle)")
    p.add_argument("--trace", required=True, help="uplink trace: HSDPA (time, Mbit/s) or Mahimahi (.up)")
    p.add_argument("--deadline-ms", type=float, required=True, help="end-to-end deadline per frame (capture to answer)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--sim", dest="live", action="store_false", help="the fast trace simulator (default)")
    g.add_argument("--live", dest="live", action="store_true", help="real kernel shaping in a network namespace (root)")
    p.set_defaults(live=False)  # a store_false action would otherwise make the default True
    p.add_argument("--fps", type=float, default=30.0, help="frame rate of the camera")
    p.add_argument(
        "--fallback-ms", type=float, default=None, help="full.onnx latency on the device (default: measured here)"
    )
    p.add_argument(
        "--base-rtt-ms", type=float, default=20.0, help="propagation round trip beyond the shaped uplink (sim)"
    )
    p.add_argument("--server-ms", type=float, default=2.0, help="server time per request (sim)")
    p.add_argument("--start-s", type=float, default=0.0, help="start this far into the trace")
    p.add_argument("--duration-s", type=float, default=None, help="seconds of trace to replay (default: all of it)")
    p.add_argument("--device", default=None, help="the modes table's head-latency profile (default: the only one)")
    p.add_argument(
        "--policies",
        default=None,
        help="--live: comma-separated policies to run (fixed:ID, assine, deadline, deadline-ewma; default "
        "fixed:0,fixed:1,fixed:2,assine,deadline,deadline-ewma)",
    )
    p.add_argument(
        "--calibration-s",
        type=float,
        default=4.0,
        help="--live: seconds of each calibration run (the largest and smallest mode at a constant rate) that "
        "the simulator's link cost and server time are fitted on, apart from the judged runs",
    )
    p.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply the trace's capacity (the CIFAR bundle's 192-768 B frames need ~0.1-0.3 on the HSDPA "
        "traces for the choice to matter)",
    )


def verdict(policies: dict[str, dict[str, Any]], deadline_ms: float) -> dict[str, Any]:
    """The issue's targets for the controller (``deadline-harmonic`` when present): hit rate
    >= 0.99, accuracy within 1 point of the oracle, and at least as good as each baseline on both
    hit rate and accuracy (ties within 0.001) and strictly better on one. ``accuracy`` counts a
    late answer's accuracy as if it were on time, so a policy that is often late can still look
    accurate; ``ahead_of_timely`` makes the same comparison on ``timely_accuracy`` (late = wrong)."""
    ctrl_name = next(
        (n for n in policies if n.startswith("deadline") and "harmonic" in n),
        next((n for n in policies if n.startswith("deadline")), None),
    )
    if ctrl_name is None:
        return {}
    c = policies[ctrl_name]
    oracle = next((m for n, m in policies.items() if n.startswith("oracle")), None)

    def dominates(m: dict[str, Any], acc: str) -> bool:
        ge = c["hit_rate"] >= m["hit_rate"] - 1e-3 and c[acc] >= m[acc] - 1e-3
        gt = c["hit_rate"] > m["hit_rate"] + 1e-3 or c[acc] > m[acc] + 1e-3
        return bool(ge and gt)

    ahead, ahead_timely = {}, {}
    for n, m in policies.items():
        if n == ctrl_name or n.startswith("oracle") or n.startswith("deadline"):
            continue
        ahead[n] = dominates(m, "accuracy")
        if m.get("timely_accuracy") is not None and c.get("timely_accuracy") is not None:
            ahead_timely[n] = dominates(m, "timely_accuracy")
    return {
        "controller": ctrl_name,
        "deadline_ms": deadline_ms,
        "hit_rate": c["hit_rate"],
        "accuracy": c["accuracy"],
        "timely_accuracy": c.get("timely_accuracy"),
        "hit_rate_ge_0.99": c["hit_rate"] >= 0.99,
        "accuracy_below_oracle": None if oracle is None else round(oracle["accuracy"] - c["accuracy"], 5),
        "within_1pt_of_oracle": None if oracle is None else oracle["accuracy"] - c["accuracy"] <= 0.01,
        "ahead_of": ahead,
        "ahead_of_all": all(ahead.values()) if ahead else None,
        # the same with late answers worth nothing (a late answer is a miss to the user)
        "ahead_of_timely": ahead_timely,
        "ahead_of_all_timely": all(ahead_timely.values()) if ahead_timely else None,
    }


def _rate_steps(trace, step_s: float = 0.1):
    """A trace as (time, Mbit/s) steps of ``step_s`` (its mean over each step), for scaling."""
    import math

    n = max(1, math.ceil(trace.period_s / step_s))
    return [(k * step_s, trace.mbps_between(k * step_s, (k + 1) * step_s)) for k in range(n)]


def run(a) -> dict:
    from ..control.link import LinkModel
    from ..control.modes import modes_from_manifest
    from ..control.simulator import compare, standard_policies
    from ..control.traces import Trace, read_trace
    from ..loopback import DEFAULT_BUNDLE

    bundle_path = Path(a.bundle or DEFAULT_BUNDLE)
    fallback_ms = a.fallback_ms if a.fallback_ms is not None else measure_fallback_ms(bundle_path)
    modes = modes_from_manifest(bundle_path, a.device)
    trace = read_trace(a.trace)
    out: dict[str, Any] = {
        "bench": "adapt",
        "how": "live" if a.live else "sim",
        "bundle": modes.name,
        "trace": str(a.trace),
        "deadline_ms": a.deadline_ms,
        "fps": a.fps,
        "fallback_ms": round(fallback_ms, 3),
        "start_s": a.start_s,
        "duration_s": a.duration_s,
        "scale": a.scale,
    }
    if a.live:
        live = importlib.import_module("edgesplit.bench.adapt_live")
        kinds = (
            live.DEFAULT_POLICIES if not a.policies else tuple(k.strip() for k in a.policies.split(",") if k.strip())
        )
        policies = live.run_live(
            bundle_path,
            Path(a.trace),
            a.deadline_ms,
            a.fps,
            policies=kinds,
            fallback_ms=fallback_ms,
            start_s=a.start_s,
            duration_s=a.duration_s,
            scale=a.scale,
            calibration_s=a.calibration_s,
        )
        out["live_minus_sim_max_abs"] = max(
            (abs(m.get("hit_rate_live_minus_sim") or 0.0) for m in policies.values()), default=None
        )
    else:
        if a.scale != 1.0:
            trace = Trace.from_rates(
                *zip(*((t, r * a.scale) for t, r in _rate_steps(trace))),
                name=f"{trace.name} x{a.scale:g}",
                period_s=trace.period_s,
            )
        link = LinkModel(trace, a.base_rtt_ms, a.server_ms, 0.1, 0.0)
        res = compare(
            standard_policies(modes, link, a.fps, local_ms=fallback_ms),
            modes,
            link,
            fps=a.fps,
            deadline_ms=a.deadline_ms,
            fallback_ms=fallback_ms,
            start_s=a.start_s,
            duration_s=a.duration_s,
        )
        policies = {name: r.metrics for name, r in res.items()}
        out.update(base_rtt_ms=a.base_rtt_ms, server_ms=a.server_ms)
    out["policies"] = policies
    out["verdict"] = verdict(policies, a.deadline_ms)
    return out
