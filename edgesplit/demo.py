"""``edgesplit demo``: the whole runtime on loopback in one command.

Starts the server daemon (its own process, as in production) with a bundle the project ships,
streams N real frames through the agent (head on ONNX Runtime, quantize, ZeroMQ, tail on the
server), and prints what a split buys: accuracy, bytes on the wire against the input JPEG, and
where the time goes (p50/p95). An ED-ViT bundle (serving shape "scatter") runs as one worker process
per sub-model and a camera that fuses their features instead (``demo_edvit.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from .bundle import Bundle, BundleError
from .data.sources import SourceError, open_source, take
from .loopback import DEFAULT_BUNDLE, DEFAULT_SOURCES


def percentiles(values: list[float]) -> tuple[float, float]:
    a = np.asarray([v for v in values if v is not None], np.float64)
    return (float(np.percentile(a, 50)), float(np.percentile(a, 95))) if a.size else (float("nan"), float("nan"))


def default_source(bundle_name: str) -> str:
    """The test split of the dataset a bundle's name starts with."""
    dataset = next((d for d in DEFAULT_SOURCES if bundle_name.startswith(d)), None)
    if dataset is None:
        raise SourceError(f"no default frame source for bundle '{bundle_name}': pass --source")
    return DEFAULT_SOURCES[dataset]


def run_demo(
    bundle_path: Path, source: str | None, frames: int, mode: int | None, inflight: int, threads: int | None
) -> dict:
    from .edge.agent import Agent

    bundle = Bundle.load(bundle_path)
    source = source or default_source(bundle.name)
    samples = list(take(open_source(source, bundle.classes), frames))
    from .bench.serverproc import ServerProcess

    server = ServerProcess([bundle_path], ["--max-queue-delay-us", "500"]).start()  # returns once it listens
    try:
        agent = Agent(bundle, server.endpoint, mode=mode, inflight=inflight, threads=threads, timeout_s=30.0).connect()
        t0 = time.perf_counter()
        results = list(agent.run(samples))
        wall = time.perf_counter() - t0
        agent.close()
    finally:
        server.stop()
    ok = [r for r in results if r.ok]
    labelled = [r for r in ok if r.label is not None]
    jpeg = [len(s.data) for s in samples]
    lat = {
        "head": [r.head_ms for r in results],
        "encode": [r.encode_ms for r in results],
        "server queue": [r.server_queue_ms for r in ok],
        "server compute": [r.server_compute_ms for r in ok],
        "link + runtime": [r.rtt_ms - r.server_queue_ms - r.server_compute_ms for r in ok],
        "round trip": [r.rtt_ms for r in ok],
    }
    u_shaped = bundle.serving == "u-shaped"  # the answer is the body's output: the tail runs here after it
    if u_shaped:
        lat["tail (device)"] = [r.tail_ms or 0.0 for r in ok]
    lat["end to end"] = [r.head_ms + r.encode_ms + r.rtt_ms + (r.tail_ms or 0.0) for r in ok]
    m = agent.mode
    return {
        "bundle": bundle.name,
        "bundle_hash": bundle.hash,
        "source": source,
        "mode": m.name,
        "frames": len(results),
        "ok": len(ok),
        "errors": {e: sum(1 for r in results if r.error == e) for e in {r.error for r in results if not r.ok}},
        "accuracy": None if not labelled else sum(r.pred == r.label for r in labelled) / len(labelled),
        "manifest_accuracy": m.accuracy,
        "teacher_accuracy": bundle.manifest.get("teacher_accuracy"),
        "bytes_per_frame": float(np.median([r.bytes_sent for r in results])),
        "header_bytes_per_frame": float(np.median([r.header_bytes for r in results])),
        "input_jpeg_bytes_median": float(np.median(jpeg)),
        "bytes_down_per_frame": float(np.median([r.bytes_received for r in ok])) if u_shaped and ok else None,
        "latency_ms": {k: dict(zip(("p50", "p95"), percentiles(v))) for k, v in lat.items()},
        "frames_per_s": len(results) / wall,
        "inflight": inflight,
    }


def _ratio(r: dict) -> str:
    """The wire against the JPEG, said the way round that reads: "4.5x fewer" or "1.8x more"."""
    sent = max(1.0, r["bytes_per_frame"] + r["header_bytes_per_frame"])
    x = r["input_jpeg_bytes_median"] / sent
    return f"{x:.1f}x fewer" if x >= 1 else f"{1 / x:.1f}x more"


def format_table(r: dict) -> str:
    lines = [
        f"edgesplit demo: {r['bundle']} ({r['mode']}), {r['frames']} frames of {r['source']}, "
        f"server and agent on loopback",
        "",
    ]
    acc = "n/a (no labels)" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
    if r["manifest_accuracy"] is not None and r["teacher_accuracy"] is not None:
        acc += (
            f"   (full test set, from the manifest: this mode {r['manifest_accuracy']:.3f}, "
            f"unsplit reference model {r['teacher_accuracy']:.3f})"
        )
    lines += [
        f"  accuracy          {acc}",
        f"  bytes per frame   {r['bytes_per_frame']:.0f} B tensor + {r['header_bytes_per_frame']:.0f} B header  vs  "
        f"{r['input_jpeg_bytes_median']:.0f} B input JPEG (median): {_ratio(r)}",
    ]
    if r.get("bytes_down_per_frame") is not None:
        lines.append(
            f"  bytes down        {r['bytes_down_per_frame']:.0f} B: the body's output, finished by the tail here "
            "(U-shaped: labels and logits never leave the device)"
        )
    lines += [
        f"  throughput        {r['frames_per_s']:.0f} frames/s with {r['inflight']} in flight",
        f"  errors            {r['errors'] or 'none'}",
        "",
        f"  {'latency (ms)':<18}{'p50':>9}{'p95':>9}",
    ]
    for k, v in r["latency_ms"].items():
        lines.append(f"  {k:<18}{v['p50']:>9.3f}{v['p95']:>9.3f}")
    return "\n".join(lines)


def demo_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="edgesplit demo", description=__doc__.split("\n\n")[0] + " " + __doc__.split("\n\n")[1]
    )
    p.add_argument("--bundle", default=str(DEFAULT_BUNDLE), help="bundle to serve (default: the shipped CIFAR-10 one)")
    p.add_argument(
        "--source", default=None, help="frames (default: the bundle dataset's test split from the data root)"
    )
    p.add_argument("--frames", type=int, default=500)
    p.add_argument("--mode", type=int, default=None, help="mode id (default: the bundle's default mode)")
    p.add_argument("--inflight", type=int, default=4, help="requests outstanding at once")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads for the head")
    p.add_argument("--json", action="store_true")
    g = p.add_argument_group("ED-ViT bundles (one worker process per sub-model)")
    g.add_argument("--budget-ms", type=float, default=200.0, help="per-frame deadline, capture to answer")
    g.add_argument("--kill-one", action="store_true", help="kill -9 the last worker halfway through")
    a = p.parse_args(argv)
    try:
        bundle = Bundle.load(a.bundle, verify=False)
        source = a.source or default_source(bundle.name)
    except (BundleError, SourceError) as e:
        print(f"edgesplit demo: {e}", file=sys.stderr)
        return 2
    if bundle.serving == "scatter":
        from .demo_edvit import format_edvit_table, run_edvit_demo

        r = run_edvit_demo(Path(a.bundle), source, a.frames, a.threads, a.budget_ms, a.kill_one)
        print(json.dumps(r, indent=2) if a.json else format_edvit_table(r))
    else:
        r = run_demo(Path(a.bundle), source, a.frames, a.mode, a.inflight, a.threads)
        print(json.dumps(r, indent=2) if a.json else format_table(r))
    return 0 if r["ok"] == r["frames"] else 1
