"""``edgesplit bench adapt --live``: the mode policies in the real agent, over a link shaped by the
kernel from a trace.

One network namespace (:class:`~edgesplit.control.netns.ShapedNamespace`) whose loopback goes
through ``tc tbf``; the server daemon runs inside it for the whole run, and each policy in turn runs
in a fresh agent process inside it too (:mod:`edgesplit.bench.adapt_runner`), streaming real frames
at ``fps`` while :class:`~edgesplit.control.netns.TraceReplayer` replays the same trace window from
its start. Every policy therefore sees the same rate schedule, starting with an empty queue
(between runs the link is opened wide and drained).

The trace is replayed as its mean rate per ``step_s`` (what tc can apply), times ``scale``: the
shipped CIFAR-10 bundle sends 192-768 bytes a frame, so a 3G trace's Mbit/s must be scaled down for
the choice of mode to matter (:func:`live_trace` builds the schedule; the same object can be given
to the simulator, which is how live and simulated hit rates are compared on the same trace).

Metrics per policy: the keys of :func:`edgesplit.control.simulator.metrics` (hit = capture to
answer within the deadline; expected accuracy from the modes table, the full model's for local
frames) plus ``accuracy_measured`` (the answers' top-1 on the labelled frames), ``switch_ms_p50``
and ``switch_ms_max`` (head output to request ready, mode changed), ``heads`` (per head: run time
on the first frame after switching to it and when it follows itself, and the difference), and ``link_bytes_per_frame`` (every
byte tbf passed, both directions and all headers, per frame).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..control.modes import FALLBACK, ModesTable, modes_from_manifest
from ..control.netns import ShapedNamespace, TraceReplayer, shaping_available
from ..control.simulator import SimResult, metrics
from ..control.traces import Trace, read_trace
from .adapt_fit import calibration_modes, calibration_schedule, link_cost, simulate_schedule
from .serverproc import start_in_namespace, stop_process

DEFAULT_POLICIES = ("fixed:0", "fixed:1", "fixed:2", "assine", "deadline", "deadline-ewma")
# A token bucket passes a packet at once when it holds enough tokens, so with the namespace's
# defaults (1500-byte MTU, 4 KiB bucket) a CIFAR frame (0.3-0.9 KB on the wire) that finds the link
# idle crosses it in microseconds whatever the rate: tbf would only shape the long-run mean, not the
# per-frame delay a slow uplink has. A small MTU and a bucket of about one packet make each frame
# wait for its bytes' tokens, packet by packet: close to the serialisation delay of a real
# bottleneck (the FIFO uplink the simulator models) at 244-byte granularity.
SMALL_MTU = 296  # IPv4 + TCP headers leave 244 bytes of payload per segment
BURST_BYTES = 400  # one packet at that MTU plus the loopback's link header, and a little
OPEN_MBPS = 100.0  # the link between runs: handshakes and drains are not part of any policy's run


def live_trace(
    trace: Trace, *, scale: float = 1.0, step_s: float = 1.0, start_s: float = 0.0, duration_s: float = 20.0
) -> Trace:
    """The rate schedule a live run applies: the trace's mean capacity over each ``step_s`` from
    ``start_s`` for ``duration_s``, times ``scale``, as a rate trace starting at 0."""
    if scale <= 0 or step_s <= 0 or duration_s <= 0:
        raise ValueError("need scale > 0, step_s > 0, duration_s > 0")
    n = max(1, int(math.ceil(duration_s / step_s)))
    times = [k * step_s for k in range(n)]
    rates = [scale * trace.mbps_between(start_s + t, start_s + t + step_s) for t in times]
    return Trace.from_rates(
        times, rates, name=f"{trace.name} x{scale:g} [{start_s:g}, +{duration_s:g}] s", period_s=n * step_s
    )


def frames_metrics(name: str, records: list[dict], modes: ModesTable, deadline_ms: float, fps: float) -> dict[str, Any]:
    """The simulator's metrics, computed from a live run's per-frame records."""
    n = len(records)
    acc_by = {m.id: m.accuracy for m in modes} | {FALLBACK: modes.teacher_accuracy}
    local = np.array([r.get("source") == "local" for r in records])
    # a frame answered locally counts as a fallback whatever mode it was sent in (a rescue, a timeout)
    mode = np.array([FALLBACK if lc else r.get("mode", FALLBACK) for r, lc in zip(records, local)], dtype=np.int32)
    fallback = mode == FALLBACK
    lat = np.array(
        [
            math.inf if r.get("t_answer_s") is None or r.get("error") else (r["t_answer_s"] - r["t_capture_s"]) * 1e3
            for r in records
        ]
    )
    # an answer that never came counts as late; a remote frame finished locally (TIMEOUT, ...) counts
    # with its local answer's time
    frames = {
        "mode": mode,
        "fallback": fallback,
        "probe": np.zeros(n, bool),
        "rescued": np.array([r.get("fallback_reason") == "DEADLINE_RESCUE" for r in records], bool),
        "bytes": np.array([(r.get("bytes_sent") or 0) + (r.get("header_bytes") or 0) for r in records], float),
        "latency_ms": lat,
        "hit": lat <= deadline_ms,
        "accuracy": np.array([acc_by.get(int(m), modes.teacher_accuracy) for m in mode]),
    }
    res = SimResult(
        policy=name,
        deadline_ms=deadline_ms,
        fps=fps,
        frames=frames,
        reasons=[r.get("policy_reason") or "" for r in records],
    )
    with np.errstate(invalid="ignore"):  # percentiles over unanswered frames (latency inf)
        out = metrics(res)
    labelled = [r for r in records if r.get("label") is not None and r.get("pred") is not None]
    out["accuracy_measured"] = None if not labelled else float(np.mean([r["pred"] == r["label"] for r in labelled]))
    out["local_answers"] = int(local.sum())
    served = [r["server_ms"] for r in records if r.get("server_ms") is not None]
    out["server_ms_p50"] = float(np.median(served)) if served else None
    out["unanswered"] = int(sum(r.get("t_answer_s") is None for r in records))
    return out


def _wait_line(proc: subprocess.Popen, expect: str, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        line = proc.stdout.readline()
        if not line:
            break
        if line.strip() == expect:
            return
    raise RuntimeError(f"agent runner did not say '{expect}' (exit {proc.poll()})")


def run_live(
    bundle_path: str | Path,
    trace_path: str | Path | Trace,
    deadline_ms: float,
    fps: float,
    *,
    policies: Sequence[str] = DEFAULT_POLICIES,
    fallback_ms: float | None = None,
    start_s: float = 0.0,
    duration_s: float | None = None,
    scale: float = 1.0,
    step_s: float = 1.0,
    base_rtt_ms: float = 0.5,
    mtu: int | None = SMALL_MTU,
    burst_bytes: int | None = BURST_BYTES,
    port: int = 5599,
    progress: Callable[[str], None] | None = None,
    keep_frames: bool = False,
    source: str | None = None,
    calibration_s: float = 4.0,
) -> dict[str, dict[str, Any]]:
    """Run each policy (names as :func:`edgesplit.edge.adaptive.make_policy` takes them) for the
    same trace window in the shaped namespace; returns metrics per policy, keyed by the policy's
    name (the simulator's names). ``fallback_ms``: full.onnx latency the deadline policies weigh
    (unset: none, the local model is assumed late). ``duration_s`` defaults to 20 s (a live run
    takes real time). ``keep_frames``: add each policy's per-frame records under ``"records"``.
    ``base_rtt_ms``: the fixed round trip the policies assume (on the namespace loopback, ZeroMQ and
    message handling outside the server's own time; docs/BENCHMARKS.md). ``source``: the
    labelled frames (default: the bundle's dataset's test split, by the bundle's name).

    Each policy's dict also holds ``sim``: the simulator's metrics for the same policy on the same
    schedule (:func:`simulate_schedule`) and ``hit_rate_live_minus_sim``. The simulator's inputs
    are fitted apart from the runs it is compared with: the link cost and the server time on
    ``calibration_s``-second calibration runs (fixed modes at a constant rate,
    :func:`calibration_schedule`) made before the judged ones, the device's fallback time by timing
    full.onnx alone; ``sim["fitted_on"]`` says so."""
    ok, why = shaping_available()
    if not ok:
        raise RuntimeError(f"--live needs kernel shaping: {why}")
    from .local_timing import measure_fallback_ms

    bundle_path = Path(bundle_path)
    trace = trace_path if isinstance(trace_path, Trace) else read_trace(trace_path)
    duration_s = 20.0 if duration_s is None else float(duration_s)
    schedule = live_trace(trace, scale=scale, step_s=step_s, start_s=start_s, duration_s=duration_s)
    modes = modes_from_manifest(bundle_path)
    if source is None:
        from ..loopback import DEFAULT_SOURCES

        dataset = next((d for d in DEFAULT_SOURCES if modes.name.startswith(d)), None)
        if dataset is None:
            raise ValueError(f"no default frame source for bundle '{modes.name}': pass source=")
        source = DEFAULT_SOURCES[dataset]
    endpoint = f"tcp://127.0.0.1:{port}"
    say = progress or (lambda s: None)
    out: dict[str, dict[str, Any]] = {}
    with (
        ShapedNamespace(OPEN_MBPS, burst_bytes=burst_bytes) as ns,
        tempfile.TemporaryDirectory(prefix="edgesplit-adapt-") as tmp,
    ):
        if mtu is not None:
            subprocess.run(
                ["ip", "-n", ns.name, "link", "set", "lo", "mtu", str(int(mtu))], check=True, capture_output=True
            )
        server, _ = start_in_namespace(ns, [bundle_path], Path(tmp) / "server.log", port)

        def run_policy(kind: str, sched: Trace, seconds: float) -> tuple[list[dict], dict, int]:
            ns.set_rate(OPEN_MBPS)
            frames = int(seconds * fps)
            jl = Path(tmp) / f"{kind.replace(':', '_')}.jsonl"
            cmd = [
                sys.executable,
                "-m",
                "edgesplit.bench.adapt_runner",
                "--bundle",
                str(bundle_path),
                "--server",
                endpoint,
                "--policy",
                kind,
                "--deadline-ms",
                str(deadline_ms),
                "--fps",
                str(fps),
                "--frames",
                str(frames),
                "--base-rtt-ms",
                str(base_rtt_ms),
                "--source",
                source,
                "--out",
                str(jl),
            ]
            if fallback_ms is not None:
                cmd += ["--local-ms", str(fallback_ms)]
            runner = ns.popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            try:
                _wait_line(runner, "ready", 120.0)
                before = ns.stats().get("bytes", 0)
                with TraceReplayer(ns, sched, step_s=step_s):
                    runner.stdin.write("go\n")
                    runner.stdin.flush()
                    runner.wait(timeout=seconds + 60)
                link_bytes = ns.stats().get("bytes", 0) - before
            finally:
                if runner.poll() is None:
                    runner.kill()
                    runner.wait()
            if runner.returncode != 0:
                raise RuntimeError(f"agent runner for {kind} exited {runner.returncode}")
            lines = [json.loads(x) for x in jl.read_text().splitlines()]
            return lines[:-1], lines[-1]["summary"], link_bytes

        try:
            # 1. Calibration, apart from the judged runs: the simulator's link and server terms.
            calib = calibration_schedule(schedule, modes, fps, calibration_s)
            calib_kinds = [f"fixed:{i}" for i in calibration_modes(modes)]
            calib_runs = [{"records": run_policy(kind, calib, calibration_s)[0]} for kind in calib_kinds]
            fixed, per_byte = link_cost(calib_runs, calib)
            served = [r["server_ms"] for m in calib_runs for r in m["records"] if r.get("server_ms") is not None]
            server_ms = float(np.median(served)) if served else 1.0
            sim_local_ms = measure_fallback_ms(bundle_path, source=source)
            fitted_on = (
                f"link cost and server time: calibration runs {', '.join(calib_kinds)} at a constant "
                f"{calib.mbps_between(0, 1):.3g} Mbit/s, {calibration_s:g} s each, before the judged runs; "
                "fallback time: full.onnx timed alone"
            )
            say(
                f"calibration: link fixed {fixed:.1f} B, per byte {per_byte:.3f}, server {server_ms:.3f} ms, "
                f"local {sim_local_ms:.3f} ms"
            )
            # 2. The judged runs: every policy on the trace's schedule.
            for kind in policies:
                records, summary, link_bytes = run_policy(kind, schedule, duration_s)
                m = frames_metrics(summary["policy"], records, modes, deadline_ms, fps)
                m.update(
                    switch_ms_p50=summary["switch_ms_p50"],
                    switch_ms_max=summary["switch_ms_max"],
                    same_mode_ms_p50=summary["same_mode_ms_p50"],
                    link_bytes_per_frame=link_bytes / max(1, int(duration_s * fps)),
                    heads=summary.get("heads", {}),
                )
                if keep_frames:
                    m["records"] = records
                out[summary["policy"]] = m
                say(
                    f"{summary['policy']}: hit {m['hit_rate']:.3f}, acc {m['accuracy']:.4f} "
                    f"(measured {m['accuracy_measured']}), {m['fallbacks']} fallbacks, {m['switches']} switches"
                )
            # 3. The simulator on the judged schedule with the calibrated terms: the policies weigh
            # fallback_ms (None: the local model assumed late); the simulated device answers a
            # fallback frame in the time full.onnx took alone.
            sim = simulate_schedule(
                schedule,
                modes,
                policies,
                deadline_ms,
                fps,
                fallback_ms=fallback_ms,
                device_ms=sim_local_ms,
                base_rtt_ms=base_rtt_ms,
                server_ms=server_ms,
                fixed_bytes=fixed,
                per_byte=per_byte,
            )
            for name, m in out.items():
                if name in sim:
                    m["sim"] = {
                        k: sim[name][k]
                        for k in ("hit_rate", "accuracy", "bytes_per_frame", "switches", "fallbacks", "mode_frames")
                    }
                    m["sim"].update(
                        link_fixed_bytes=round(fixed, 1),
                        link_per_byte=round(per_byte, 3),
                        server_ms=round(server_ms, 3),
                        device_ms=round(sim_local_ms, 3),
                        fitted_on=fitted_on,
                    )
                    m["hit_rate_live_minus_sim"] = round(m["hit_rate"] - sim[name]["hit_rate"], 4)
        finally:
            stop_process(server, 20.0)
    return out
