"""``edgesplit bench plan``: the split planner's predictions against measured end-to-end latency, for
every cut point of real models over a link shaped by the kernel.

For each target (a zoo model: every cut point of the generic split, each exported as a one-mode
8-bit bundle by :mod:`edgesplit.builder.split_bundles`; or a bundle: each of its modes) and each
bandwidth, one network namespace (:class:`~edgesplit.control.netns.ShapedNamespace`, ``tc tbf`` on
its loopback) holds the real server daemon with every bundle of the target loaded. Then per option:

1. **prediction**: the planner's inputs are measured in this process just before (ONNX Runtime at 1
   thread, the codec, JPEG decoding; :func:`edgesplit.profile.plan_inputs.bundle_options`) and the
   link is described as tc shapes it: the rate, the bucket (``burst_bytes``), and TCP ACKs sharing
   the bottleneck (both directions cross the one shaped loopback). No measured end-to-end figure
   goes into a prediction.
2. **measurement**: the real agent (``edgesplit agent``, 1 ORT thread, one frame in flight, no
   local fallback) runs in the namespace on real frames, and a frame's latency is its
   ``head_ms + encode_ms + rtt_ms`` (JPEG decode and head, quantize and pack, send to result), the
   median over the frames after the warm-up ones. Frames are paced (``--fps``) with an idle gap of at
   least the bucket's refill time, so that each frame finds the link idle, as the prediction assumes.

Reported per option: prediction, measurement, relative error ``(pred - meas) / meas`` and the parts
of both; tbf's drop counter per run (a drop means TCP retransmits, which the model does not have).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..control.netns import ShapedNamespace, shaping_available
from ..profile.plan_inputs import HOST_PROFILE, OVERHEAD_MS, Timing, bundle_options, scenario
from ..control.planner import Link, predict

DEFAULT_MODELS = ("resnet20_cifar", "resnet18_w24")
BURST_BYTES = 1600   # one 1514-byte packet (1500 MTU + link header) and a little: the smallest bucket tbf passes
QUEUE_MS = 5000.0    # tbf queue bound: deep enough that a 300 kB message at 2 Mbit/s is never dropped
PORT = 5600
TARGET = 0.20


def _start_server(ns: ShapedNamespace, bundles: list[Path], log_path: Path) -> tuple[subprocess.Popen, str]:
    endpoint = f"tcp://127.0.0.1:{PORT}"
    cmd = [sys.executable, "-m", "edgesplit", "serve", "--bind", endpoint, "--threads", "1",
           "--max-queue-delay-us", "0", "--log-level", "WARNING"]
    for b in bundles:
        cmd += ["--bundle", str(b)]
    log = open(log_path, "w")
    proc = ns.popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    log.close()
    for line in proc.stdout:
        if "listening on " in line:
            # keep reading what the daemon prints, so that a full pipe never stalls it
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc, endpoint
    proc.wait()
    raise RuntimeError(f"server did not start ({proc.returncode}): {log_path.read_text()[-2000:]}")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def measure_agent(ns: ShapedNamespace, bundle: Path, endpoint: str, mode: int, source: str, frames: int, warmup: int,
                  period_ms: float, workdir: Path) -> dict[str, Any]:
    """One agent process, ``warmup + frames`` real frames paced ``period_ms`` apart; medians."""
    lines = workdir / "frames.jsonl"
    cmd = [sys.executable, "-m", "edgesplit", "agent", "--bundle", str(bundle), "--server", endpoint, "--source", source,
           "--frames", str(frames + warmup), "--mode", str(mode), "--inflight", "1", "--threads", "1",
           "--fallback", "off", "--timeout-s", "120", "--fps", f"{1e3 / period_ms:.6f}", "--json-lines", str(lines)]
    before = ns.stats()
    out = ns.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    after = ns.stats()
    if out.returncode != 0:
        raise RuntimeError(f"agent on {bundle.name} mode {mode} failed ({out.returncode}): {out.stderr[-2000:]}")
    recs = [json.loads(x) for x in lines.read_text().splitlines() if x.strip()]
    rows = [r for r in recs if "id" in r]
    bad = [r for r in rows if r.get("error") or r.get("source") != "server"]
    if bad:
        raise RuntimeError(f"agent on {bundle.name}: {len(bad)} frames not answered by the server: {bad[0]}")
    rows = sorted(rows, key=lambda r: r["id"])[warmup:]
    e2e = [r["head_ms"] + r["encode_ms"] + r["rtt_ms"] for r in rows]
    med = lambda k: float(np.median([r[k] for r in rows]))  # noqa: E731
    return {"frames": len(rows), "e2e_ms": float(np.median(e2e)), "e2e_ms_p90": float(np.percentile(e2e, 90)),
            "rtt_minus_compute_ms": float(np.median([r["rtt_ms"] - r["server_compute_ms"] for r in rows])),
            "head_incl_preprocess_ms": med("head_ms"), "encode_ms": med("encode_ms"), "rtt_ms": med("rtt_ms"),
            "server_ms": med("server_ms"), "server_compute_ms": med("server_compute_ms"),
            "request_bytes": med("bytes_sent") + med("header_bytes"),
            "tbf_drops": after.get("dropped", 0) - before.get("dropped", 0)}


def probe_overhead(ns: ShapedNamespace, mbps: float, endpoint: str, options: list[tuple[str, Path, int]], pace_ms: float,
                   workdir: Path) -> list[dict[str, Any]]:
    """The runtime's own time per request on this host as it is loaded now: send -> result minus
    the server's decode + tail (``compute_us``), median over 30 paced frames, with the namespace
    opened to 1 Gbit/s (the bytes then cross in microseconds, inside the bucket). It is what the
    planner's ``overhead`` term stands for. Probed on the group's two smallest requests, so that
    each option is predicted with an overhead measured on another option (:func:`overhead_for`),
    never on the option it is judged on; and at another rate than the runs it predicts."""
    from ..bundle import Bundle

    if len(options) < 2:
        raise SystemExit("edgesplit bench plan: --overhead-ms probe needs at least two options per group (each option's "
                         "overhead is probed on another one); give a number of ms instead")
    two = sorted(options, key=lambda o: Bundle.load(o[1]).mode(o[2]).bytes_per_frame)[:2]
    ns.set_rate(1000.0)
    try:
        probes = []
        for label, d, mode in two:
            m = measure_agent(ns, d, endpoint, mode, _source(d), 30, 5, pace_ms + 5.0, workdir)
            probes.append({"option": label, "overhead_ms": round(m["rtt_minus_compute_ms"], 4), "frames": m["frames"]})
    finally:
        ns.set_rate(mbps)
    return probes


def overhead_for(label: str, probes: list[dict[str, Any]]) -> dict[str, Any]:
    """The probe an option is predicted with: one taken on a different option."""
    return next(p for p in probes if p["option"] != label)


def _source(bundle_dir: Path) -> str:
    from ..bundle import Bundle
    from ..profile.latency import default_source

    return default_source(Bundle.load(bundle_dir).classes)


def _targets(a) -> list[dict[str, Any]]:
    """``[{"name", "kind", "bundles": [(label, bundle dir, mode id)]}]`` for the models and bundles asked."""
    out = []
    for b in [x for x in (a.bundles or "").split(",") if x]:
        from ..bundle import Bundle

        bundle = Bundle.load(b)
        keep = {int(x) for x in (a.modes or "").split(",") if x.strip()}
        out.append({"name": bundle.name, "kind": "bundle",
                    "options": [(m.name, Path(b), m.id) for m in bundle.modes if not keep or m.id in keep]})
    models = [x for x in (a.models or "").split(",") if x]
    if models:
        from ..builder.split_bundles import cut_bundles

        cuts = [c for c in (a.cuts or "").split(",") if c] or None
        for m in models:
            bundles, _, meta = cut_bundles(m, cuts=cuts if len(models) == 1 else None, cache=a.cache,
                                           progress=lambda s: print(s, file=sys.stderr, flush=True))
            out.append({"name": m, "kind": "model", "input_size": meta["input_size"], "cut_points": meta["cut_points"],
                        "options": [(f"cut {c.name}", d, 0) for c, d in bundles]})
    if not out:
        raise SystemExit("edgesplit bench plan: give --models and/or --bundles")
    return out


def run_bench(a) -> dict[str, Any]:
    ok, why = shaping_available()
    if not ok:
        raise SystemExit(f"edgesplit bench plan: needs kernel shaping: {why}")
    bandwidths = [float(x) for x in a.bandwidths.split(",")]
    if not bandwidths or min(bandwidths) <= 0:
        raise SystemExit("edgesplit bench plan: --bandwidths must be positive Mbit/s")
    if a.frames < 1:
        raise SystemExit("edgesplit bench plan: --frames must be at least 1")
    os.environ["OMP_NUM_THREADS"] = "1"
    if getattr(a, "nice", None):
        # this process and every child (server, agents) at this priority: on a shared host a
        # background job then takes the cores when the pipeline is idle, not in the middle of a frame
        os.nice(int(a.nice))
    targets = _targets(a)
    rows: list[dict[str, Any]] = []
    probes: list[dict[str, Any]] = []
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="edgesplit-benchplan-") as tmp:
        for tgt in targets:
            bundles = list(dict.fromkeys(d for _, d, _ in tgt["options"]))
            for mbps in bandwidths:
                link = Link(mbps, 0.0, ack_bytes=66, burst_bytes=a.burst_bytes)
                with ShapedNamespace(mbps, burst_bytes=a.burst_bytes, latency_ms=QUEUE_MS) as ns:
                    server, endpoint = _start_server(ns, bundles, Path(tmp) / "server.log")
                    try:
                        group_probes = []
                        if a.overhead_ms == "probe":
                            group_probes = probe_overhead(ns, mbps, endpoint, tgt["options"], a.pace_ms, Path(tmp))
                            probes += [{"target": tgt["name"], "mbps": mbps, **p} for p in group_probes]
                            print(f"{tgt['name']:<16} runtime overhead probes: "
                                  + ", ".join(f"{p['option']} {p['overhead_ms']:.3f} ms" for p in group_probes),
                                  file=sys.stderr, flush=True)
                        for label, d, mode in tgt["options"]:
                            probe = overhead_for(label, group_probes) if group_probes else None
                            overhead = float(a.overhead_ms) if probe is None else probe["overhead_ms"]
                            sc = scenario(HOST_PROFILE, HOST_PROFILE, HOST_PROFILE, link, overhead, None)
                            options, meta = bundle_options(d, timing=Timing(a.runs, a.pace_ms), host=HOST_PROFILE, extras=False)
                            opt = next(o for o in options if o.detail["mode"] == mode)
                            pred = predict(opt, sc)
                            # an idle gap before every frame: at least the bucket's refill time, and the
                            # planner's own pacing (so that both time the model a frame at a time)
                            period = 1.2 * pred.latency_ms + max(a.pace_ms, a.burst_bytes * 8 / (mbps * 1e3) + 5.0)
                            # short options get more frames (up to 4x, about 2 s of them): their median is the noisier
                            frames = max(a.frames, min(4 * a.frames, int(2000 / period)))
                            meas = measure_agent(ns, d, endpoint, mode, meta["source"], frames, a.warmup, period, Path(tmp))
                            err = (pred.latency_ms - meas["e2e_ms"]) / meas["e2e_ms"]
                            rows.append({"target": tgt["name"], "option": label, "mbps": mbps, "mode": mode,
                                         "payload_bytes": opt.payload_bytes, "request_bytes": pred.request_bytes,
                                         "predicted_ms": round(pred.latency_ms, 4), "measured_ms": round(meas["e2e_ms"], 4),
                                         "rel_error": round(err, 4), "within_target": abs(err) <= TARGET,
                                         "overhead_ms": overhead,
                                         "overhead_probed_on": None if probe is None else probe["option"],
                                         "predicted": {k: round(v, 4) for k, v in pred.parts_ms.items()},
                                         "measured": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in meas.items()}})
                            r = rows[-1]
                            print(f"{tgt['name']:<16} {label:<26} {mbps:>5g} Mbit/s  pred {r['predicted_ms']:9.2f}  "
                                  f"meas {r['measured_ms']:9.2f}  err {err:+.1%}", file=sys.stderr, flush=True)
                    finally:
                        _stop(server)
    errs = [abs(r["rel_error"]) for r in rows]
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(f"{r['target']} @ {r['mbps']:g} Mbit/s", []).append(r)
    per = {k: ranking_check(v) for k, v in groups.items()}
    return {"bench": "plan", "bandwidths_mbps": bandwidths, "frames": a.frames, "warmup_frames": a.warmup,
            "burst_bytes": a.burst_bytes, "queue_ms": QUEUE_MS, "overhead_ms": a.overhead_ms, "overhead_probes": probes,
            "overhead_source": ("probed per group at 1 Gbit/s before its runs; each option predicted with the probe of "
                                "another option (rows' overhead_probed_on), never its own") if probes else "given",
            "ort_threads": 1, "nice": getattr(a, "nice", None),
            "targets": [{k: v for k, v in t.items() if k != "options"} | {"options": len(t["options"])} for t in targets],
            "rows": rows, "target_rel_error": TARGET,
            "summary": {"options": len(rows), "within_target": sum(r["within_target"] for r in rows),
                        # link-bound: the predicted link time is more than half of the predicted latency
                        **{k: _share(v) for k, v in (("link_bound", [r for r in rows if _link_share(r) > 0.5]),
                                                     ("compute_bound", [r for r in rows if _link_share(r) <= 0.5]))},
                        "max_abs_rel_error": max(errs), "median_abs_rel_error": float(np.median(errs)),
                        "per_target_bandwidth": per},
            "wall_s": round(time.time() - t0, 1)}


def _link_share(r: dict) -> float:
    return r["predicted"].get("link", 0.0) / r["predicted_ms"]


def _share(rows: list[dict]) -> dict[str, Any]:
    errs = [abs(r["rel_error"]) for r in rows]
    return {"options": len(rows), "within_target": sum(r["within_target"] for r in rows),
            "max_abs_rel_error": max(errs, default=None), "median_abs_rel_error": float(np.median(errs)) if errs else None}


def _ranks(x: list[float]) -> np.ndarray:
    return np.argsort(np.argsort(np.asarray(x))).astype(float)


def ranking_check(rows: list[dict]) -> dict[str, Any]:
    """For one target and bandwidth: errors, and whether the planner ranks the options as the
    measurements do (the best option, Spearman's rank correlation)."""
    pred, meas = [r["predicted_ms"] for r in rows], [r["measured_ms"] for r in rows]
    errs = [abs(r["rel_error"]) for r in rows]
    out = {"options": len(rows), "max_abs_rel_error": max(errs), "median_abs_rel_error": float(np.median(errs)),
           "best_predicted": rows[int(np.argmin(pred))]["option"], "best_measured": rows[int(np.argmin(meas))]["option"]}
    if len(rows) > 2:
        out["spearman_rho"] = round(float(np.corrcoef(_ranks(pred), _ranks(meas))[0, 1]), 4)
    # the best predicted option's measured latency over the best measured one: what trusting the plan costs
    out["regret"] = round(meas[int(np.argmin(pred))] / min(meas) - 1.0, 4)
    return out


def _overhead(text: str) -> float | str:
    if text == "probe":
        return text
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--overhead-ms takes a number of ms or 'probe', got {text!r}") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"--overhead-ms must be >= 0, got {text!r}")
    return v


def add_arguments(p) -> None:
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="zoo models whose cut points to measure ('' for none)")
    p.add_argument("--bundles", default="", help="bundles whose modes to measure, comma-separated")
    p.add_argument("--cuts", default=None, help="only these cut points (with a single --models entry)")
    p.add_argument("--modes", default=None, help="only these mode ids of the --bundles (default: all)")
    p.add_argument("--bandwidths", default="2,20", help="Mbit/s, comma-separated")
    p.add_argument("--frames", type=int, default=20, help="measured frames per option (after --warmup; short options up to 4x)")
    p.add_argument("--warmup", type=int, default=3, help="frames per option not counted")
    p.add_argument("--runs", type=int, default=30, help="timed runs per graph for the planner's inputs")
    p.add_argument("--pace-ms", type=float, default=20.0, help="the planner's timing: idle time before each timed run")
    p.add_argument("--burst-bytes", type=int, default=BURST_BYTES, help="tbf bucket (bytes)")
    p.add_argument("--overhead-ms", type=_overhead, default=OVERHEAD_MS,
                   help=f"the planner's runtime overhead per request: ms (default {OVERHEAD_MS}, bench e2e on a quiet "
                        "host) or 'probe' (measured per group on this host as loaded now, see probe_overhead)")
    p.add_argument("--cache", default=None, help="where cut bundles are exported (default runs/cache/plan)")
    p.add_argument("--nice", type=int, default=None, help="run the bench, server and agents at this nice value (root: negative)")


def run(a) -> dict[str, Any]:
    return run_bench(a)


def summarize(res: dict[str, Any]) -> str:
    lines = [f"{'target':<16} {'option':<26} {'Mbit/s':>6} {'bytes':>8} {'pred ms':>9} {'meas ms':>9} {'error':>7}"]
    for r in res["rows"]:
        lines.append(f"{r['target']:<16} {r['option']:<26} {r['mbps']:>6g} {r['request_bytes']:>8.0f} {r['predicted_ms']:>9.2f} "
                     f"{r['measured_ms']:>9.2f} {r['rel_error']:>+7.1%}{'' if r['within_target'] else '  (miss)'}")
    s = res["summary"]
    for k, v in s["per_target_bandwidth"].items():
        lines.append(f"{k}: best predicted {v['best_predicted']}, best measured {v['best_measured']} (regret {v['regret']:+.1%})"
                     + (f", Spearman {v['spearman_rho']:.3f}" if "spearman_rho" in v else ""))
    lines.append(f"{s['within_target']}/{s['options']} within {res['target_rel_error']:.0%}; max |error| "
                 f"{s['max_abs_rel_error']:.1%}, median {s['median_abs_rel_error']:.1%}")
    return "\n".join(lines)

