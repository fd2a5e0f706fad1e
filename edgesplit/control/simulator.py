"""A fast trace-driven simulator for mode policies.

It replays a real trace (:mod:`edgesplit.control.traces`) through the link model of
:mod:`edgesplit.control.link` with the measured modes table of a bundle and drives the **same
policy objects** the live agent uses: per frame ``policy.choose(FrameState)``; per result, once
its arrival time has passed, ``policy.observe(Feedback)``. A policy therefore learns about a
request only when the agent would (an outage is invisible until results stop coming).

Frames are captured at ``fps`` from ``start_s`` for ``duration_s``. Every frame gets exactly one
outcome, recorded per frame:

* **remote**: the chosen mode's request goes through the FIFO uplink; answered at its result's
  arrival; latency = arrival - capture;
* **fallback**: the device runs the full model (``full.onnx``) on a local executor apart from
  the head's: ``fallback_workers`` of them (default 1), each taking ``fallback_ms`` a frame,
  first come first served (a device that cannot run the full model at the frame rate falls
  behind: its fallback latency grows during a long outage); latency = local finish - capture. A fallback frame may also
  carry a probe request (its bytes are counted; its answer only feeds the policy);
* **rescued**: a remote frame whose answer would come later than the policy's
  ``rescue_after_ms`` after capture is answered by the local model from then on (an executor
  permitting), and counted as a fallback (``rescues``); its request stays on the link and its
  late answer still reaches the policy.

Metrics (:func:`metrics`):

* ``hit_rate``: frames whose end-to-end latency met the deadline; a fallback frame counts as a hit
  only if its local latency met the deadline (``fallback_hits``), never by default;
* ``accuracy``: mean expected accuracy over all frames, from the modes table; fallback frames
  count the full model's accuracy (the manifest's ``teacher_accuracy``), late frames count too
  (they are answered, late). ``timely_accuracy`` counts late frames as 0;
* ``bytes_per_frame``: bytes put on the uplink (requests and probes, with the link model's
  per-request overhead) divided by frames;
* ``switches``: frames whose outcome (mode id, or FALLBACK) differs from the previous frame's;
* ``fallbacks``: frames answered locally.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from .estimator import EwmaEstimator, HarmonicMeanEstimator
from .link import FifoLink, LinkModel
from .modes import FALLBACK, ModesTable
from .oracle import OraclePolicy
from .policy import AssinePolicy, DeadlinePolicy, Feedback, FixedPolicy, FrameState, Policy


class _Out:
    __slots__ = ("t_send_s", "nbytes")

    def __init__(self, t_send_s: float, nbytes: float):
        self.t_send_s = t_send_s
        self.nbytes = nbytes


@dataclass
class SimResult:
    policy: str
    deadline_ms: float
    fps: float
    frames: dict[str, np.ndarray]
    reasons: list[str]
    metrics: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0

    def records(self) -> list[dict[str, Any]]:
        """Per-frame records as dicts (for JSON; the arrays are in ``frames``)."""
        keys = list(self.frames)
        return [
            {k: self.frames[k][i].item() for k in keys} | {"reason": self.reasons[i]} for i in range(len(self.reasons))
        ]


def simulate(
    policy: Policy,
    modes: ModesTable,
    link: LinkModel,
    *,
    fps: float,
    deadline_ms: float,
    fallback_ms: float,
    start_s: float = 0.0,
    duration_s: float | None = None,
    fallback_workers: int = 1,
) -> SimResult:
    """Replay ``link.trace`` for one policy (``policy.reset()`` is called first). ``fallback_ms``:
    latency of the full model on the device; ``fallback_workers``: how many fallback frames the
    device can run at once (cores apart from the head's)."""
    if fps <= 0 or deadline_ms <= 0 or fallback_ms < 0 or fallback_workers < 1:
        raise ValueError("need fps > 0, deadline_ms > 0, fallback_ms >= 0, fallback_workers >= 1")
    duration_s = link.trace.period_s - start_s if duration_s is None else float(duration_s)
    n = int(math.floor(duration_s * fps + 1e-9))
    if n <= 0:
        raise ValueError(f"no frames: duration {duration_s} s at {fps} fps")
    t0 = time.perf_counter()
    policy.reset()
    pipe = FifoLink(link)
    fb_s = fallback_ms / 1000.0
    base_rtt = link.base_rtt_ms

    cap = start_s + np.arange(n) / fps
    mode = np.full(n, FALLBACK, dtype=np.int32)
    sent_mode = np.full(n, FALLBACK, dtype=np.int32)
    probe = np.zeros(n, dtype=bool)
    nbytes = np.zeros(n)
    t_send = np.full(n, np.nan)
    tx_start = np.full(n, np.nan)
    tx_finish = np.full(n, np.nan)
    t_answer = np.empty(n)
    predicted = np.full(n, np.nan)
    reasons: list[str] = []

    outstanding: deque[_Out] = deque()
    pending: deque[tuple[float, Feedback]] = deque()  # (arrival, report), in arrival order (FIFO)
    workers = [-math.inf] * int(fallback_workers)  # when each local executor is free
    by_id = modes.by_id
    rescued = np.zeros(n, dtype=bool)
    rescues: deque[tuple[float, int]] = deque()  # (when, frame): rescues due, in time order
    rescue_after = policy.rescue_after_ms(deadline_ms)

    def run_rescues(until: float) -> None:
        # In time order with the fallback frames, so that they queue for the executors as live.
        while rescues and rescues[0][0] <= until:
            t_r, j = rescues.popleft()
            w = min(range(len(workers)), key=workers.__getitem__)
            workers[w] = max(t_r, workers[w]) + fb_s
            t_answer[j] = workers[w]

    for i in range(n):
        a = float(cap[i])
        run_rescues(a)
        while pending and pending[0][0] <= a:
            policy.observe(pending.popleft()[1])
            outstanding.popleft()
        d = policy.choose(
            FrameState(now_s=a, deadline_ms=deadline_ms, index=i, outstanding=outstanding, base_rtt_ms=base_rtt)
        )
        reasons.append(d.reason)
        predicted[i] = d.predicted_ms
        if d.mode == FALLBACK:
            w = min(range(len(workers)), key=workers.__getitem__)
            workers[w] = max(a, workers[w]) + fb_s
            t_answer[i] = workers[w]
            send_id = d.probe_mode
            probe[i] = send_id is not None
        else:
            mode[i] = d.mode
            send_id = d.mode
        if send_id is not None:
            m = by_id[send_id]
            ts, tst, fin, arr = pipe.send(a, m)
            sent_mode[i], t_send[i], tx_start[i], tx_finish[i] = send_id, ts, tst, fin
            nbytes[i] = link.wire_bytes(m)
            if d.mode != FALLBACK:
                t_answer[i] = arr
                if rescue_after is not None and arr > a + rescue_after / 1000.0:
                    # no answer by the rescue time: the local model answers (the request stays)
                    rescued[i] = True
                    mode[i] = FALLBACK
                    rescues.append((a + rescue_after / 1000.0, i))
            outstanding.append(_Out(ts, float(nbytes[i])))
            pending.append(
                (
                    arr,
                    Feedback(
                        t_send_s=ts,
                        t_result_s=arr,
                        nbytes=float(nbytes[i]),
                        server_queue_ms=0.0,
                        server_compute_ms=link.server_ms,
                        encode_ms=link.encode_ms,
                        mode=send_id,
                        probe=d.mode == FALLBACK,
                    ),
                )
            )

    run_rescues(math.inf)
    latency = (t_answer - cap) * 1000.0
    hit = latency <= deadline_ms + 1e-9
    acc_by = {m.id: m.accuracy for m in modes}
    acc_by[FALLBACK] = modes.teacher_accuracy
    accuracy = np.vectorize(acc_by.__getitem__, otypes=[float])(mode)
    frames = {
        "t_capture": cap,
        "mode": mode,
        "fallback": mode == FALLBACK,
        "rescued": rescued,
        "probe": probe,
        "sent_mode": sent_mode,
        "bytes": nbytes,
        "t_send": t_send,
        "t_tx_start": tx_start,
        "t_tx_finish": tx_finish,
        "t_answer": t_answer,
        "latency_ms": latency,
        "hit": hit,
        "predicted_ms": predicted,
        "accuracy": accuracy,
    }
    res = SimResult(policy=policy.name, deadline_ms=deadline_ms, fps=fps, frames=frames, reasons=reasons)
    res.metrics = metrics(res)
    res.wall_s = time.perf_counter() - t0
    return res


def metrics(res: SimResult) -> dict[str, Any]:
    f = res.frames
    n = len(f["mode"])
    fb = f["fallback"]
    counts = {int(k): int(v) for k, v in zip(*np.unique(f["mode"], return_counts=True))}
    lat = f["latency_ms"]
    return {
        "policy": res.policy,
        "frames": n,
        "hit_rate": float(f["hit"].mean()),
        "accuracy": float(f["accuracy"].mean()),
        "timely_accuracy": float((f["accuracy"] * f["hit"]).mean()),
        "bytes_per_frame": float(f["bytes"].sum() / n),
        "switches": int(np.count_nonzero(f["mode"][1:] != f["mode"][:-1])),
        "fallbacks": int(fb.sum()),
        "fallback_hits": int((fb & f["hit"]).sum()),
        "rescues": int(f["rescued"].sum()) if "rescued" in f else 0,
        "probes": int(f["probe"].sum()),
        "late": int((~f["hit"]).sum()),
        "latency_p50_ms": float(np.percentile(lat, 50)),
        "latency_p95_ms": float(np.percentile(lat, 95)),
        "remote_latency_p95_ms": float(np.percentile(lat[~fb], 95)) if (~fb).any() else math.nan,
        "mode_frames": counts,
    }


def standard_policies(
    modes: ModesTable, link: LinkModel, fps: float, *, local_ms: float | None = None, hysteresis: bool = True
) -> list[Policy]:
    """The comparison set: every fixed mode, Assine et al. (as published: plain throughput samples),
    the deadline-aware controller (with the harmonic-mean and the EWMA estimator; counting bytes in
    whole packets on a packet link) and the oracle."""
    pols: list[Policy] = [FixedPolicy(modes, m.id) for m in modes.ranked]
    pols.append(AssinePolicy(modes, base_rtt_ms=link.base_rtt_ms))
    kw: dict[str, Any] = {"local_ms": local_ms, "base_rtt_ms": link.base_rtt_ms, "packet_bytes": link.packet_bytes}
    if not hysteresis:
        kw.update(up_frames=1, up_margin=0.0)
    pols.append(DeadlinePolicy(modes, HarmonicMeanEstimator(5), **kw))
    pols.append(DeadlinePolicy(modes, EwmaEstimator(0.4), **kw))
    pols.append(OraclePolicy(modes, link, 1.0 / fps))
    return pols


def compare(policies: Iterable[Policy], modes: ModesTable, link: LinkModel, **kw) -> dict[str, SimResult]:
    return {p.name: simulate(p, modes, link, **kw) for p in policies}


def format_table(results: dict[str, SimResult]) -> str:
    rows = [
        f"{'policy':52s} {'hit':>6s} {'acc':>6s} {'t.acc':>6s} {'B/frame':>8s} {'switch':>6s} {'fallbk':>6s} {'p95 ms':>8s}"
    ]
    for name, r in results.items():
        m = r.metrics
        rows.append(
            f"{name:52s} {m['hit_rate']:6.3f} {m['accuracy']:6.4f} {m['timely_accuracy']:6.4f} {m['bytes_per_frame']:8.1f} "
            f"{m['switches']:6d} {m['fallbacks']:6d} {m['latency_p95_ms']:8.1f}"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    from .modes import modes_from_manifest
    from .traces import read_trace

    ap = argparse.ArgumentParser(
        prog="python -m edgesplit.control", description="Replay a trace for the standard policies."
    )
    ap.add_argument("trace")
    ap.add_argument("manifest", help="a bundle directory or manifest.json")
    ap.add_argument("--device", default=None, help="device profile for head_ms (default: the only one in the manifest)")
    ap.add_argument("--fps", type=float, default=30.0)
    ap.add_argument("--deadline-ms", type=float, default=60.0)
    ap.add_argument("--fallback-ms", type=float, required=True, help="local latency of full.onnx on the device")
    ap.add_argument("--base-rtt-ms", type=float, default=20.0)
    ap.add_argument("--server-ms", type=float, default=2.0)
    ap.add_argument("--encode-ms", type=float, default=0.1)
    ap.add_argument("--overhead-bytes", type=float, default=0.0)
    ap.add_argument("--start-s", type=float, default=0.0)
    ap.add_argument("--duration-s", type=float, default=None)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    modes = modes_from_manifest(a.manifest, a.device)
    link = LinkModel(read_trace(a.trace), a.base_rtt_ms, a.server_ms, a.encode_ms, a.overhead_bytes)
    res = compare(
        standard_policies(modes, link, a.fps, local_ms=a.fallback_ms),
        modes,
        link,
        fps=a.fps,
        deadline_ms=a.deadline_ms,
        fallback_ms=a.fallback_ms,
        start_s=a.start_s,
        duration_s=a.duration_s,
    )
    if a.json:
        print(json.dumps({k: r.metrics for k, r in res.items()}, indent=1))
    else:
        print(modes)
        print(f"{link.trace}, {a.fps:g} fps, deadline {a.deadline_ms:g} ms, fallback {a.fallback_ms:g} ms")
        print(format_table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
