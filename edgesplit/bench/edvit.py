"""``edgesplit bench edvit``: the ED-ViT runtime on loopback with real sockets and real frames.

N ``edgesplit worker`` processes (sub-model ``s`` on worker ``s mod N``) and one camera in this
process. Three phases over the same frames of the source:

1. **inputs**: the frames scattered as the preprocessed tensor, then as the JPEG, each with every
   worker up: end-to-end latency and bytes per frame of each, so the default of
   ``--scatter-input`` is a measured choice;
2. **stream**: the frames with ``--scatter-input``; at ``--kill-at`` (a fraction of the frames) the
   last worker is killed with SIGKILL: every frame must still be answered; latency per stage
   (scatter, worker compute, gather, fusion, end to end) and the accuracy before and after (the
   degraded state);
3. **reference**: the bundle's ``full.onnx`` on the same frames in this process (the accuracy the
   fused answers are compared with).
"""

from __future__ import annotations

import argparse
import signal
import time
from typing import Any

import numpy as np

from ..data.sources import open_source, take
from ..data.transforms import preprocess
from ..edge.scatter_bundle import EdvitBundle, ort_session
from ..edge.scatter_camera import ScatterCamera
from ..edge.scatter_run import summarize as summarize_answers
from ..loopback import start_workers, stop_workers


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, help="an ED-ViT bundle directory")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: one per sub-model)")
    p.add_argument("--frames", type=int, default=200)
    p.add_argument("--source", default="cifar10:test")
    p.add_argument("--budget-ms", type=float, default=200.0, help="per-frame deadline (capture to answer)")
    p.add_argument("--scatter-input", default="tensor", choices=("tensor", "jpeg", "auto"))
    p.add_argument("--kill-at", type=float, default=0.5, help="kill -9 the last worker after this fraction")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per worker and the camera")


def _camera(bundle: EdvitBundle, eps: list[str], args: argparse.Namespace, how: str) -> ScatterCamera:
    return ScatterCamera(bundle, eps, budget_ms=args.budget_ms, scatter_input=how, threads=args.threads).connect()


def run(args: argparse.Namespace) -> dict[str, Any]:
    bundle = EdvitBundle.load(args.bundle)
    n_sub = len(bundle.submodels)
    n = args.workers or n_sub
    frames = list(take(open_source(args.source, bundle.classes), args.frames))
    workers = start_workers(args.bundle, n, n_sub, args.threads)
    eps = [ep for _, ep, _ in workers]
    result: dict[str, Any] = {
        "scenario": "edvit",
        "bundle": bundle.name,
        "submodels": n_sub,
        "workers": [{"endpoint": ep, "submodels": subs} for _, ep, subs in workers],
        "frames": len(frames),
        "budget_ms": args.budget_ms,
    }
    try:
        inputs = {}
        probe = frames[: max(20, len(frames) // 4)]
        for how in ("tensor", "jpeg"):
            cam = _camera(bundle, eps, args, how)
            t0 = time.perf_counter()
            answers = [cam.infer(s) for s in probe]
            s = summarize_answers(answers, cam, time.perf_counter() - t0)
            cam.close()
            inputs[how] = {
                "e2e_ms_p50": s["latency_ms"]["e2e_p50"],
                "e2e_ms_p95": s["latency_ms"]["e2e_p95"],
                "bytes_out_per_frame": s["bytes_out_per_frame_mean"],
                "inputs": s["inputs"],
            }
        result["inputs"] = inputs
        cam = _camera(bundle, eps, args, args.scatter_input)
        kill_at = int(len(frames) * args.kill_at)
        killed = workers[-1]
        answers = []
        t0 = time.perf_counter()
        for i, sample in enumerate(frames):
            if i == kill_at and n > 1:
                killed[0].send_signal(signal.SIGKILL)
                killed[0].wait()
            answers.append(cam.infer(sample))
        wall = time.perf_counter() - t0
        before = summarize_answers(answers[:kill_at], cam, wall)
        after = summarize_answers(answers[kill_at:], cam, wall)
        cam.close()
        result["stream"] = {
            "scatter_input": args.scatter_input,
            "killed_worker": {"endpoint": killed[1], "submodels": killed[2], "at_frame": kill_at} if n > 1 else None,
            "every_frame_answered": len({a.frame for a in answers}) == len(frames) == len(answers),
            "before_kill": {
                k: before[k]
                for k in (
                    "accuracy",
                    "latency_ms",
                    "frames_by_used",
                    "bytes_out_per_frame_mean",
                    "bytes_in_per_frame_mean",
                )
            },
            "after_kill": {
                k: after[k]
                for k in (
                    "accuracy",
                    "accuracy_degraded",
                    "accuracy_all_present",
                    "latency_ms",
                    "frames_by_used",
                    "fallbacks",
                )
            },
            "late_gathers": cam.late_gathers,
            "bad_gathers": len(cam.bad_gathers),
            "workers_report": cam.worker_report(),
        }
    finally:
        stop_workers(workers)
    if bundle.full_path is not None:
        full = ort_session(bundle.full_path, args.threads)
        correct, times = 0, []
        for s in frames:
            x = preprocess(s.data, bundle.input_spec)[None]
            t = time.perf_counter_ns()
            logits = full.run(None, {full.get_inputs()[0].name: x})[0][0]
            times.append((time.perf_counter_ns() - t) / 1e6)
            correct += int(np.argmax(logits)) == s.label
        result["full_model"] = {
            "accuracy": round(correct / len(frames), 4),
            "local_ms_p50": round(float(np.percentile(times, 50)), 3),
        }
    result["bundle_accuracy"] = bundle.accuracy
    return result
