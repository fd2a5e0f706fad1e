"""``edgesplit demo --bundle <an ED-ViT bundle>``: the scatter/gather runtime on loopback.

One ``edgesplit worker`` process per sub-model (each stands for one edge device), a camera in this
process that scatters every frame to all of them, gathers their features by the frame's cut-off and
fuses them with the bundle's fusion head; then the same summary as the head/tail demo: accuracy
(fused, against the unpartitioned ViT on the same frames when the bundle holds it), bytes each way,
where the time goes. ``--kill-one`` kills the last worker with SIGKILL halfway through, to show a
dead device costing accuracy, not frames.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import numpy as np

from .data.sources import open_source, take
from .data.transforms import preprocess
from .edge.scatter_bundle import EdvitBundle, ort_session
from .edge.scatter_camera import ScatterCamera
from .edge.scatter_run import summarize
from .loopback import start_workers, stop_workers


def run_edvit_demo(
    bundle_path: Path, source: str, frames: int, threads: int | None, budget_ms: float, kill_one: bool
) -> dict[str, Any]:
    bundle = EdvitBundle.load(bundle_path)
    samples = list(take(open_source(source, bundle.classes), frames))
    n = len(bundle.submodels)
    workers = start_workers(bundle_path, n, n, threads or 1)
    kill_at = len(samples) // 2 if kill_one and n > 1 else None
    try:
        cam = ScatterCamera(
            bundle, [ep for _, ep, _ in workers], budget_ms=budget_ms, scatter_input="auto", threads=threads or 1
        ).connect()
        answers = []
        t0 = time.perf_counter()
        for i, s in enumerate(samples):
            if i == kill_at:
                workers[-1][0].send_signal(signal.SIGKILL)
                workers[-1][0].wait()
            answers.append(cam.infer(s))
        summary = summarize(answers, cam, time.perf_counter() - t0)
        cam.close()
    finally:
        stop_workers(workers)
    full_acc = None
    if bundle.full_path is not None and any(s.label is not None for s in samples):
        full = ort_session(bundle.full_path, threads or 1)
        name = full.get_inputs()[0].name
        hits = [
            int(np.argmax(full.run(None, {name: preprocess(s.data, bundle.input_spec)[None]})[0][0])) == s.label
            for s in samples
            if s.label is not None
        ]
        full_acc = round(sum(hits) / len(hits), 4)
    return {
        "bundle": bundle.name,
        "bundle_hash": bundle.hash,
        "family": "edvit",
        "source": source,
        "submodels": n,
        "workers": [{"endpoint": ep, "submodels": subs} for _, ep, subs in workers],
        "killed_worker_at_frame": kill_at,
        "frames": summary["frames"],
        "ok": summary["answered"],
        "with_logits": summary["with_logits"],
        "accuracy": summary["accuracy"],
        "accuracy_all_present": summary["accuracy_all_present"],
        "accuracy_degraded": summary["accuracy_degraded"],
        "full_model_accuracy": full_acc,
        "manifest_accuracy": bundle.accuracy,
        "frames_by_used": summary["frames_by_used"],
        "inputs": summary["inputs"],
        "bytes_out_per_frame": summary["bytes_out_per_frame_mean"],
        "bytes_in_per_frame": summary["bytes_in_per_frame_mean"],
        "input_jpeg_bytes_median": float(np.median([len(s.data) for s in samples])) if samples else None,
        "latency_ms": summary["latency_ms"],
        "frames_per_s": summary["frames_per_s"],
        "late_gathers": summary["late_gathers"],
    }


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def format_edvit_table(r: dict[str, Any]) -> str:
    m = r["manifest_accuracy"] or {}
    lines = [
        f"edgesplit demo: {r['bundle']} (ED-ViT, {r['submodels']} sub-models on {len(r['workers'])} worker "
        f"processes), {r['frames']} frames of {r['source']}, camera and workers on loopback",
        "",
        f"  accuracy          fused {_fmt(r['accuracy'])}   unpartitioned ViT on the same frames "
        f"{_fmt(r['full_model_accuracy'])}",
    ]
    if m.get("fused") is not None:
        lines.append(
            f"                    (full test set, from the manifest: fused {_fmt(m.get('fused'))}, full ViT "
            f"{_fmt(m.get('full'))}, one sub-model missing {_fmt(m.get('missing_mean'))} on average)"
        )
    if r["killed_worker_at_frame"] is not None:
        lines.append(
            f"  worker killed     at frame {r['killed_worker_at_frame']}: all present "
            f"{_fmt(r['accuracy_all_present'])}, degraded {_fmt(r['accuracy_degraded'])}"
        )
    lines += [
        f"  answered          {r['ok']} of {r['frames']} frames ({r['with_logits']} with logits); sub-models used: "
        f"{r['frames_by_used']}",
        f"  bytes per frame   {_fmt(r['bytes_out_per_frame'], '.0f')} B out ({r['inputs']}) + "
        f"{_fmt(r['bytes_in_per_frame'], '.0f')} B of features back; input JPEG {_fmt(r['input_jpeg_bytes_median'], '.0f')} B",
        f"  throughput        {_fmt(r['frames_per_s'], '.0f')} frames/s, one frame at a time",
        "",
        f"  {'latency (ms)':<18}{'p50':>9}{'p95':>9}",
    ]
    lat = r["latency_ms"]
    for k in ("scatter", "worker_compute", "gather", "fusion", "e2e"):
        lines.append(f"  {k.replace('_', ' '):<18}{_fmt(lat.get(k + '_p50')):>9}{_fmt(lat.get(k + '_p95')):>9}")
    return "\n".join(lines)
