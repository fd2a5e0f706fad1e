"""``edgesplit agent --edvit``: frames from a source through a :class:`ScatterCamera`, one JSON
line per frame (``--json-lines``) and a summary, which ``edgesplit bench edvit`` reuses."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from typing import Any, Iterable

import numpy as np

from ..bundle import BundleError
from ..data.sources import SourceError, open_source, take
from ..engine.providers import OrtExecution
from .connection import load_curve
from .scatter_bundle import EdvitBundle
from .scatter_camera import SCATTER_INPUTS, EdvitAnswer, ScatterCamera


def add_edvit_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ED-ViT (--edvit): scatter each frame to workers, fuse their features")
    g.add_argument("--edvit", action="store_true", help="run as an ED-ViT camera (the bundle is an edvit bundle)")
    g.add_argument("--workers", default="", help="comma-separated worker endpoints (edgesplit worker --bind)")
    g.add_argument(
        "--fusion",
        default="camera",
        choices=("camera", "server"),
        help="where the fusion head runs: on this camera, or on --server (one fused request per frame, PROTOCOL.md "
        "§13.5; a frame whose fused request fails or is late is fused here)",
    )
    g.add_argument(
        "--scatter-input",
        default="tensor",
        choices=SCATTER_INPUTS,
        help="what a scatter carries: the preprocessed tensor, the frame's JPEG (workers decode it), or auto "
        "(the JPEG when it is at most a quarter of the tensor's bytes)",
    )
    g.add_argument("--tensor-dtype", default="float32", choices=("float32", "float16"), help="tensor input dtype")
    g.add_argument("--budget-ms", type=float, default=100.0, help="per-frame deadline: capture to answer")
    g.add_argument(
        "--edvit-fallback",
        default="local",
        choices=("local", "none"),
        help="a frame with no sub-model present: answered by full.onnx on this device (local) or without logits",
    )


def _pct(values: list[float], q: float) -> float | None:
    return None if not values else round(float(np.percentile(values, q)), 3)


def summarize(answers: list[EdvitAnswer], camera: ScatterCamera, wall_s: float) -> dict[str, Any]:
    """Frames, accuracy (all present / degraded / local), latencies per stage, bytes, workers."""
    n_sub = len(camera.bundle.submodels)
    labelled = [a for a in answers if a.label is not None and a.logits is not None]

    def acc(sel: Iterable[EdvitAnswer]) -> float | None:
        sel = [a for a in sel if a.label is not None and a.logits is not None]
        return None if not sel else round(sum(a.top1 == a.label for a in sel) / len(sel), 4)

    stages = {k: [a.stages_ms[k] for a in answers] for k in ("scatter", "gather", "fusion", "e2e")}
    compute = [v / 1e3 for a in answers for w in a.workers.values() for k, v in w.items() if k.startswith("compute")]
    return {
        "frames": len(answers),
        "answered": len({a.frame for a in answers}),
        "with_logits": sum(a.logits is not None for a in answers),
        "accuracy": acc(labelled),
        "accuracy_all_present": acc(a for a in answers if len(a.used) == n_sub),
        "accuracy_degraded": acc(a for a in answers if 0 < len(a.used) < n_sub),
        "accuracy_local": acc(a for a in answers if a.fallback == "local"),
        "frames_by_used": dict(Counter(",".join(map(str, a.used)) or "none" for a in answers)),
        "fallbacks": dict(Counter(a.fallback for a in answers if a.fallback)),
        "fused_on": dict(Counter(a.fused_on for a in answers if a.fused_on)),
        "inputs": dict(Counter(v for a in answers for v in a.inputs.values())),
        "latency_ms": {
            **{f"{k}_p50": _pct(v, 50) for k, v in stages.items()},
            **{f"{k}_p95": _pct(v, 95) for k, v in stages.items()},
            "worker_compute_p50": _pct(compute, 50),
            "worker_compute_p95": _pct(compute, 95),
        },
        "bytes_out_per_frame_mean": round(float(np.mean([a.bytes_out for a in answers])), 1) if answers else None,
        "bytes_in_per_frame_mean": round(float(np.mean([a.bytes_in for a in answers])), 1) if answers else None,
        "late_gathers": camera.late_gathers,
        "bad_gathers": camera.bad_gathers[:20],
        "refusals": camera.refusals,
        "workers": camera.worker_report(),
        "server": None if camera.server is None else camera.server.report(),
        "frames_per_s": round(len(answers) / wall_s, 2) if wall_s > 0 else None,
    }


def edvit_main(args: argparse.Namespace, execution: OrtExecution | None = None) -> int:
    """Exit codes as the agent's: 0 done, 1 could not run. ``execution``: the agent's providers and
    threads (default: CPU, ``--threads``)."""
    workers = [w.strip() for w in args.workers.split(",") if w.strip()]
    try:
        bundle = EdvitBundle.load(args.bundle)
        camera = ScatterCamera(
            bundle,
            workers,
            budget_ms=args.budget_ms,
            scatter_input=args.scatter_input,
            tensor_dtype=args.tensor_dtype,
            fallback=args.edvit_fallback,
            name=args.name,
            threads=execution or args.threads or 1,
            inflight=args.inflight,
            timeout_s=args.timeout_s,
            reconnect_max_s=args.reconnect_max_s,
            server=args.server if args.fusion == "server" else None,
            curve=load_curve(args.server_key, args.client_key) if args.fusion == "server" else None,
        ).connect()
        source = take(open_source(args.source, bundle.classes), args.frames or None)
    except (BundleError, OSError, ValueError, SourceError) as e:
        print(f"edgesplit agent --edvit: {e}", file=sys.stderr)
        return 1
    for r in camera.refusals:
        print(f"edgesplit agent --edvit: worker {r['worker']} refused: {r['message']}", file=sys.stderr)
    if camera.server is not None and camera.server.refusal is not None:
        print(f"edgesplit agent --edvit: server {args.server} refused: {camera.server.refusal}", file=sys.stderr)
    out = sys.stdout if args.json_lines == "-" else (open(args.json_lines, "w") if args.json_lines else None)
    answers: list[EdvitAnswer] = []
    t0 = time.perf_counter()
    period = 1.0 / args.fps if args.fps else 0.0
    try:
        for i, sample in enumerate(source):
            if period:
                time.sleep(max(0.0, t0 + i * period - time.perf_counter()))
            a = camera.infer(sample)
            answers.append(a)
            if out is not None:
                out.write(json.dumps(a.to_json()) + "\n")
    except KeyboardInterrupt:
        print("edgesplit agent --edvit: interrupted", file=sys.stderr)
    summary = summarize(answers, camera, time.perf_counter() - t0)
    camera.close()
    summary["torch_loaded"] = any(m == "torch" or m.startswith("torch.") for m in sys.modules)
    if out is not None:
        out.write(json.dumps({"summary": summary}) + "\n")
        if out is not sys.stdout:
            out.close()
    human = sys.stderr if out is sys.stdout else sys.stdout
    lat = summary["latency_ms"]
    print(
        f"edgesplit agent --edvit: {summary['frames']} frames, {summary['with_logits']} with logits, accuracy "
        f"{summary['accuracy']}; e2e p50 {lat['e2e_p50']} ms, p95 {lat['e2e_p95']} ms; used {summary['frames_by_used']}; "
        f"late gathers {summary['late_gathers']}, bad gathers {len(camera.bad_gathers)}",
        file=human,
    )
    return 0
