"""What ``bench adapt --live`` compares its live runs with, and the inputs it fits for that: the
link cost (:func:`link_cost`) and server time measured on calibration runs
(:func:`calibration_modes` at :func:`calibration_schedule`) made apart from the judged runs, and
the simulator on the schedule a live run applied (:func:`simulate_schedule`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..control.link import LinkModel
from ..control.modes import ModesTable
from ..control.simulator import simulate
from ..control.traces import Trace


def link_cost(runs: Sequence[dict[str, Any]], schedule: Trace) -> tuple[float, float]:
    """``(fixed, per_byte)``: the bytes a frame's latency pays for on the shaped link, as
    ``fixed + (1 + per_byte) x request bytes``, measured from the frames themselves. Every segment
    carries its own headers (``per_byte``); the result comes back through the same bucket and the
    bucket's burst lets the first bytes through at once (together ``fixed``, which may be negative).

    Only frames that found the link idle count (every earlier request answered before the frame
    was captured): ``(latency - server time) x rate`` is then the bytes its own transmission took.
    Per mode the median of those, then a least-squares line over the modes' request sizes (a single
    mode: all fixed)."""
    per_mode: dict[int, tuple[list[float], list[float]]] = {}
    for m in runs:
        busy_until = -math.inf
        for r in m["records"]:
            t_cap, t_ans = r["t_capture_s"], r.get("t_answer_s")
            if r.get("source") == "server" and t_ans is not None:
                if t_cap >= busy_until:
                    rate = schedule.mbps_between(t_cap, t_cap + 1e-3)
                    lat_ms = (t_ans - t_cap) * 1e3 - (r.get("server_ms") or 0.0)
                    sizes, paid = per_mode.setdefault(r["mode"], ([], []))
                    sizes.append(r["bytes_sent"] + r["header_bytes"])
                    paid.append(lat_ms * rate * 1e3 / 8)
                busy_until = max(busy_until, t_ans)
    pts = [(float(np.mean(x)), float(np.median(y))) for x, y in per_mode.values() if len(y) >= 3]
    if not pts:
        return 0.0, 0.0
    x, y = np.array(pts).T
    if len(x) < 2:
        return float(y[0] - x[0]), 0.0
    slope, fixed = np.polyfit(x, y, 1)
    return float(fixed), max(0.0, float(slope) - 1.0)


def simulate_schedule(
    schedule: Trace,
    modes: ModesTable,
    policies: Sequence[str],
    deadline_ms: float,
    fps: float,
    *,
    fallback_ms: float | None,
    base_rtt_ms: float,
    server_ms: float,
    fixed_bytes: float,
    device_ms: float | None = None,
    per_byte: float = 0.0,
    encode_ms: float = 0.1,
) -> dict[str, dict[str, Any]]:
    """The simulator on the very schedule a live run applied, with the same policies (built the
    same way) and the live link's measured terms: what the live hit rates are compared with.
    A request's latency pays for ``fixed_bytes + (1 + per_byte) x payload`` on the shaped link
    (:func:`link_cost`); the simulated FIFO uplink carries the payload plus a fixed overhead, so
    the schedule is divided by ``1 + per_byte`` and the overhead is ``fixed_bytes / (1 + per_byte)``:
    the same transmission time for every request size. ``fallback_ms``: what the policies are told
    about the local model; ``device_ms``: how long the simulated device takes for a fallback frame
    (default ``fallback_ms``)."""
    from ..edge.adaptive import make_policy

    k = 1.0 + per_byte
    t = np.arange(int(round(schedule.period_s)), dtype=float)
    goodput = Trace.from_rates(
        t, [schedule.mbps_between(s, s + 1) / k for s in t], name=schedule.name, period_s=schedule.period_s
    )
    link = LinkModel(
        goodput,
        base_rtt_ms=base_rtt_ms,
        server_ms=server_ms,
        encode_ms=encode_ms,
        overhead_bytes=max(0.0, fixed_bytes) / k,
    )  # a FIFO cannot give bytes back
    out = {}
    for kind in policies:
        pol = make_policy(kind, modes, local_ms=fallback_ms, base_rtt_ms=base_rtt_ms)
        r = simulate(
            pol,
            modes,
            link,
            fps=fps,
            deadline_ms=deadline_ms,
            fallback_ms=device_ms if device_ms is not None else (fallback_ms or 0.0),
            duration_s=schedule.period_s,
        )
        out[pol.name] = r.metrics
    return out


def calibration_modes(modes: ModesTable) -> list[int]:
    """The modes the link cost is fitted on: the largest and the smallest request (the line through
    request sizes needs two; one when every mode sends the same bytes)."""
    by_bytes = sorted(modes.modes, key=lambda m: m.bytes_per_frame)
    return list(dict.fromkeys([by_bytes[-1].id, by_bytes[0].id]))


def calibration_schedule(schedule: Trace, modes: ModesTable, fps: float, seconds: float) -> Trace:
    """A constant rate for the calibration runs: the judged window's mean, raised where needed so that
    the largest mode uses at most a quarter of it (most frames then find the link idle, the only
    ones :func:`link_cost` can use)."""
    largest_mbps = max(m.bytes_per_frame for m in modes.modes) * 8 * fps / 1e6
    rate = max(schedule.mbps_between(0.0, schedule.period_s), 4 * largest_mbps)
    return Trace.from_rates([0.0], [rate], name=f"calibration {rate:.3g} Mbit/s", period_s=seconds)
