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
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..control.netns import ShapedNamespace, shaping_available
from ..control.planner import Link, predict
from ..profile.plan_inputs import HOST_PROFILE, OVERHEAD_MS, Timing, bundle_options, scenario
from .plan_measure import PORT, measure_agent, overhead_for, probe_overhead
from .serverproc import start_in_namespace, stop_process

DEFAULT_MODELS = ("resnet20_cifar", "resnet18_w24")
BURST_BYTES = 1600  # one 1514-byte packet (1500 MTU + link header) and a little: the smallest bucket tbf passes
QUEUE_MS = 5000.0  # tbf queue bound: deep enough that a 300 kB message at 2 Mbit/s is never dropped
TARGET = 0.20


def _targets(a) -> list[dict[str, Any]]:
    """``[{"name", "kind", "bundles": [(label, bundle dir, mode id)]}]`` for the models and bundles asked."""
    out = []
    for b in [x for x in (a.bundles or "").split(",") if x]:
        from ..bundle import Bundle

        bundle = Bundle.load(b)
        keep = {int(x) for x in (a.modes or "").split(",") if x.strip()}
        out.append(
            {
                "name": bundle.name,
                "kind": "bundle",
                "options": [(m.name, Path(b), m.id) for m in bundle.modes if not keep or m.id in keep],
            }
        )
    models = [x for x in (a.models or "").split(",") if x]
    if models:
        from ..builder.split_bundles import cut_bundles

        cuts = [c for c in (a.cuts or "").split(",") if c] or None
        for m in models:
            bundles, _, meta = cut_bundles(
                m,
                cuts=cuts if len(models) == 1 else None,
                cache=a.cache,
                progress=lambda s: print(s, file=sys.stderr, flush=True),
            )
            out.append(
                {
                    "name": m,
                    "kind": "model",
                    "input_size": meta["input_size"],
                    "cut_points": meta["cut_points"],
                    "options": [(f"cut {c.name}", d, 0) for c, d in bundles],
                }
            )
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
                    server, endpoint = start_in_namespace(ns, bundles, Path(tmp) / "server.log", PORT)
                    try:
                        group_probes = []
                        if a.overhead_ms == "probe":
                            group_probes = probe_overhead(ns, mbps, endpoint, tgt["options"], a.pace_ms, Path(tmp))
                            probes += [{"target": tgt["name"], "mbps": mbps, **p} for p in group_probes]
                            print(
                                f"{tgt['name']:<16} runtime overhead probes: "
                                + ", ".join(f"{p['option']} {p['overhead_ms']:.3f} ms" for p in group_probes),
                                file=sys.stderr,
                                flush=True,
                            )
                        for label, d, mode in tgt["options"]:
                            probe = overhead_for(label, group_probes) if group_probes else None
                            overhead = float(a.overhead_ms) if probe is None else probe["overhead_ms"]
                            sc = scenario(HOST_PROFILE, HOST_PROFILE, HOST_PROFILE, link, overhead, None)
                            options, meta = bundle_options(
                                d, timing=Timing(a.runs, a.pace_ms), host=HOST_PROFILE, extras=False
                            )
                            opt = next(o for o in options if o.detail["mode"] == mode)
                            pred = predict(opt, sc)
                            # an idle gap before every frame: at least the bucket's refill time, and the
                            # planner's own pacing (so that both time the model a frame at a time)
                            period = 1.2 * pred.latency_ms + max(a.pace_ms, a.burst_bytes * 8 / (mbps * 1e3) + 5.0)
                            # short options get more frames (up to 4x, about 2 s of them): their median is the noisier
                            frames = max(a.frames, min(4 * a.frames, int(2000 / period)))
                            meas = measure_agent(
                                ns, d, endpoint, mode, meta["source"], frames, a.warmup, period, Path(tmp)
                            )
                            err = (pred.latency_ms - meas["e2e_ms"]) / meas["e2e_ms"]
                            rows.append(
                                {
                                    "target": tgt["name"],
                                    "option": label,
                                    "mbps": mbps,
                                    "mode": mode,
                                    "payload_bytes": opt.payload_bytes,
                                    "request_bytes": pred.request_bytes,
                                    "predicted_ms": round(pred.latency_ms, 4),
                                    "measured_ms": round(meas["e2e_ms"], 4),
                                    "rel_error": round(err, 4),
                                    "within_target": abs(err) <= TARGET,
                                    "overhead_ms": overhead,
                                    "overhead_probed_on": None if probe is None else probe["option"],
                                    "predicted": {k: round(v, 4) for k, v in pred.parts_ms.items()},
                                    "measured": {
                                        k: (round(v, 4) if isinstance(v, float) else v) for k, v in meas.items()
                                    },
                                }
                            )
                            r = rows[-1]
                            print(
                                f"{tgt['name']:<16} {label:<26} {mbps:>5g} Mbit/s  pred {r['predicted_ms']:9.2f}  "
                                f"meas {r['measured_ms']:9.2f}  err {err:+.1%}",
                                file=sys.stderr,
                                flush=True,
                            )
                    finally:
                        stop_process(server, 30.0)
    errs = [abs(r["rel_error"]) for r in rows]
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(f"{r['target']} @ {r['mbps']:g} Mbit/s", []).append(r)
    per = {k: ranking_check(v) for k, v in groups.items()}
    return {
        "bench": "plan",
        "bandwidths_mbps": bandwidths,
        "frames": a.frames,
        "warmup_frames": a.warmup,
        "burst_bytes": a.burst_bytes,
        "queue_ms": QUEUE_MS,
        "overhead_ms": a.overhead_ms,
        "overhead_probes": probes,
        "overhead_source": (
            "probed per group at 1 Gbit/s before its runs; each option predicted with the probe of "
            "another option (rows' overhead_probed_on), never its own"
        )
        if probes
        else "given",
        "ort_threads": 1,
        "nice": getattr(a, "nice", None),
        "targets": [{k: v for k, v in t.items() if k != "options"} | {"options": len(t["options"])} for t in targets],
        "rows": rows,
        "target_rel_error": TARGET,
        "summary": {
            "options": len(rows),
            "within_target": sum(r["within_target"] for r in rows),
            # link-bound: the predicted link time is more than half of the predicted latency
            **{
                k: _share(v)
                for k, v in (
                    ("link_bound", [r for r in rows if _link_share(r) > 0.5]),
                    ("compute_bound", [r for r in rows if _link_share(r) <= 0.5]),
                )
            },
            "max_abs_rel_error": max(errs),
            "median_abs_rel_error": float(np.median(errs)),
            "per_target_bandwidth": per,
        },
        "wall_s": round(time.time() - t0, 1),
    }


def _link_share(r: dict) -> float:
    return r["predicted"].get("link", 0.0) / r["predicted_ms"]


def _share(rows: list[dict]) -> dict[str, Any]:
    errs = [abs(r["rel_error"]) for r in rows]
    return {
        "options": len(rows),
        "within_target": sum(r["within_target"] for r in rows),
        "max_abs_rel_error": max(errs, default=None),
        "median_abs_rel_error": float(np.median(errs)) if errs else None,
    }


def _ranks(x: list[float]) -> np.ndarray:
    return np.argsort(np.argsort(np.asarray(x))).astype(float)


def ranking_check(rows: list[dict]) -> dict[str, Any]:
    """For one target and bandwidth: errors, and whether the planner ranks the options as the
    measurements do (the best option, Spearman's rank correlation)."""
    pred, meas = [r["predicted_ms"] for r in rows], [r["measured_ms"] for r in rows]
    errs = [abs(r["rel_error"]) for r in rows]
    out = {
        "options": len(rows),
        "max_abs_rel_error": max(errs),
        "median_abs_rel_error": float(np.median(errs)),
        "best_predicted": rows[int(np.argmin(pred))]["option"],
        "best_measured": rows[int(np.argmin(meas))]["option"],
    }
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
    p.add_argument(
        "--models", default=",".join(DEFAULT_MODELS), help="zoo models whose cut points to measure ('' for none)"
    )
    p.add_argument("--bundles", default="", help="bundles whose modes to measure, comma-separated")
    p.add_argument("--cuts", default=None, help="only these cut points (with a single --models entry)")
    p.add_argument("--modes", default=None, help="only these mode ids of the --bundles (default: all)")
    p.add_argument("--bandwidths", default="2,20", help="Mbit/s, comma-separated")
    p.add_argument(
        "--frames", type=int, default=20, help="measured frames per option (after --warmup; short options up to 4x)"
    )
    p.add_argument("--warmup", type=int, default=3, help="frames per option not counted")
    p.add_argument("--runs", type=int, default=30, help="timed runs per graph for the planner's inputs")
    p.add_argument("--pace-ms", type=float, default=20.0, help="the planner's timing: idle time before each timed run")
    p.add_argument("--burst-bytes", type=int, default=BURST_BYTES, help="tbf bucket (bytes)")
    p.add_argument(
        "--overhead-ms",
        type=_overhead,
        default=OVERHEAD_MS,
        help=f"the planner's runtime overhead per request: ms (default {OVERHEAD_MS}, bench e2e on a quiet "
        "host) or 'probe' (measured per group on this host as loaded now, see probe_overhead)",
    )
    p.add_argument("--cache", default=None, help="where cut bundles are exported (default runs/cache/plan)")
    p.add_argument(
        "--nice", type=int, default=None, help="run the bench, server and agents at this nice value (root: negative)"
    )


def run(a) -> dict[str, Any]:
    return run_bench(a)


def summarize(res: dict[str, Any]) -> str:
    lines = [f"{'target':<16} {'option':<26} {'Mbit/s':>6} {'bytes':>8} {'pred ms':>9} {'meas ms':>9} {'error':>7}"]
    for r in res["rows"]:
        lines.append(
            f"{r['target']:<16} {r['option']:<26} {r['mbps']:>6g} {r['request_bytes']:>8.0f} {r['predicted_ms']:>9.2f} "
            f"{r['measured_ms']:>9.2f} {r['rel_error']:>+7.1%}{'' if r['within_target'] else '  (miss)'}"
        )
    s = res["summary"]
    for k, v in s["per_target_bandwidth"].items():
        lines.append(
            f"{k}: best predicted {v['best_predicted']}, best measured {v['best_measured']} (regret {v['regret']:+.1%})"
            + (f", Spearman {v['spearman_rho']:.3f}" if "spearman_rho" in v else "")
        )
    lines.append(
        f"{s['within_target']}/{s['options']} within {res['target_rel_error']:.0%}; max |error| "
        f"{s['max_abs_rel_error']:.1%}, median {s['median_abs_rel_error']:.1%}"
    )
    return "\n".join(lines)
