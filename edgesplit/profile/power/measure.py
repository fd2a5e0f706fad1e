"""``edgesplit profile power``: joules per inference of a bundle's head in each mode (and of its
full model, the local fallback), measured on this device while a sampler runs in its own process.

The run: start the sampler; an idle window (the process sleeps) gives the baseline watts; then one
phase per mode, each at least ``min_seconds`` and ``frames`` inferences of head + encode on real
preprocessed frames; then the full model. A phase's energy is the trapezoid integral of the
samples over it; its net energy subtracts baseline x duration; J/inference = net / inferences.
Every mode runs the same head (modes differ in the encoding of its output), so the per-mode
difference is the quantize-and-pack cost.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from ...bundle import Bundle, BundleError
from ..devices import ProfileError, load_profile
from .estimate import power_model
from .readings import PowerError
from .samplers import SAMPLER_NAMES, detect_sampler
from .sampling import SampleSeries, SamplingProcess


def _frames(bundle: Bundle, source: str | None, n: int) -> list[np.ndarray]:
    from ...data.sources import open_source, take
    from ...data.transforms import preprocess

    spec = source or bundle.manifest.get("export", {}).get("check_source")
    if not spec:
        raise PowerError("this bundle names no data source (manifest export.check_source): pass --source")
    frames = [preprocess(s.data, bundle.input_spec)[None] for s in take(open_source(spec), n)]
    if not frames:
        raise PowerError(f"frame source {spec!r} gave no frames")
    return frames


def _phase(run, frames: list[np.ndarray], min_frames: int, min_seconds: float) -> tuple[float, float, int]:
    """Run ``run(frame)`` over the frames, round after round, until both minimums are met."""
    t0, n = time.monotonic(), 0
    while n < min_frames or time.monotonic() - t0 < min_seconds:
        run(frames[n % len(frames)])
        n += 1
    return t0, time.monotonic(), n


def _result(series: SampleSeries, baseline_w: float, t0: float, t1: float, n: int) -> dict[str, Any]:
    gross = series.energy_j(t0, t1)
    net = gross - baseline_w * (t1 - t0)
    return {
        "inferences": n,
        "seconds": round(t1 - t0, 4),
        "samples": series.count(t0, t1),
        "mean_w": round(gross / (t1 - t0), 4),
        "joules_per_inference": net / n,
        "gross_joules_per_inference": gross / n,
    }


def resolve_sampler(name: str, profile: str | None, root: str = "/") -> tuple[str, dict[str, Any], dict[str, str]]:
    """A sampler name and its options; ``auto`` falls back to the estimate when no sensor exists."""
    why_not: dict[str, str] = {}
    if name == "auto":
        found, why_not = detect_sampler(root)
        name = found or "estimate"
    if name != "estimate":
        return name, ({"root": root} if name in ("ina3221", "rapl") else {}), why_not
    if profile is None:
        raise PowerError(
            "no power sensor here"
            + (f" ({'; '.join(why_not.values())})" if why_not else "")
            + ": the estimate needs --profile NAME, a device profile with power_idle_w and "
            "power_active_w or power_max_w"
        )
    model = power_model(load_profile(profile))
    # the estimate follows the measuring process's own CPU use: other load on the host is not billed to it
    return (
        "estimate",
        {"idle_w": model["idle_w"], "active_w": model["active_w"], "pid": os.getpid(), "model": model},
        why_not,
    )


def measure_power(
    bundle: Bundle,
    *,
    sampler: str = "auto",
    profile: str | None = None,
    hz: float = 50.0,
    frames: int = 64,
    min_seconds: float = 2.0,
    baseline_seconds: float = 2.0,
    source: str | None = None,
    threads: int = 1,
    root: str = "/",
) -> dict[str, Any]:
    from ...engine import create_engine
    from ...wire import codec

    name, options, why_not = resolve_sampler(sampler, profile, root)
    inputs = _frames(bundle, source, frames)
    head = create_engine(bundle.file("head"), backend="ort", threads=threads)
    full = create_engine(bundle.file("full"), backend="ort", threads=threads) if bundle.has("full") else None
    for engine in (head, full):  # warm-up (session allocations) outside the measured phases
        if engine is not None:
            engine.run1(inputs[0])
    wire_name = bundle.wire_spec.get("name", "wire")

    proc = SamplingProcess(name, hz=hz, **options).start()
    try:
        b0 = time.monotonic()
        time.sleep(baseline_seconds)
        b1 = time.monotonic()
        phases = []
        for m in bundle.modes:

            def run(x, m=m):
                codec.encode(head.run1(x)[0], m, name=wire_name)

            phases.append((m, _phase(run, inputs, frames, min_seconds)))
        full_phase = _phase(full.run1, inputs, frames, min_seconds) if full is not None else None
        time.sleep(2.5 / hz)  # two more samples, so that the last phase is covered at its end
    finally:
        series = proc.stop() if proc.series is None else proc.series
    baseline_w = series.mean_w(b0, b1)
    out: dict[str, Any] = {
        "bundle": bundle.name,
        "bundle_hash": bundle.hash,
        "sampler": series.sampler,
        "estimate": series.estimate,
        "sampler_info": series.describe,
        "hz": hz,
        "samples": len(series.t),
        "sampler_cpu_percent": round(series.cpu_percent, 3),
        "baseline": {"seconds": round(b1 - b0, 4), "watts": round(baseline_w, 4), "samples": series.count(b0, b1)},
        "threads": threads,
        "frames": len(inputs),
        "modes": [
            {"mode": m.id, "name": m.name, "bits": m.bits, "channels": m.channels, **_result(series, baseline_w, *ph)}
            for m, ph in phases
        ],
        "full": _result(series, baseline_w, *full_phase) if full_phase else None,
        "note": "head + encode per mode; joules_per_inference has the idle baseline subtracted",
    }
    if why_not:
        out["sensors_not_found"] = why_not
    if series.estimate:
        out["note"] += "; ESTIMATE from CPU utilisation and the device profile's power figures, not a measurement"
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, help="bundle directory (or .tar.gz)")
    p.add_argument(
        "--sampler",
        default="auto",
        choices=("auto",) + SAMPLER_NAMES,
        help="power sensor (auto: the first found; the estimate when there is none)",
    )
    p.add_argument("--profile", default=None, help="device profile whose power figures the estimate uses")
    p.add_argument("--hz", type=float, default=50.0, help="sampling rate, 10-100 Hz (default 50)")
    p.add_argument("--frames", type=int, default=64, help="real frames, and the least inferences per phase")
    p.add_argument("--min-seconds", type=float, default=2.0, help="shortest phase per mode (default 2)")
    p.add_argument("--baseline-seconds", type=float, default=2.0, help="idle window for the baseline")
    p.add_argument("--source", default=None, help="frame source (default: the bundle's export check source)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")


def run(a: argparse.Namespace) -> dict[str, Any]:
    """``edgesplit profile power``; a bad bundle, profile or sensor exits with the reason."""
    if not 10 <= a.hz <= 100:
        raise SystemExit("edgesplit profile power: --hz must be within 10-100")
    try:
        return measure_power(
            Bundle.load(Path(a.bundle)),
            sampler=a.sampler,
            profile=a.profile,
            hz=a.hz,
            frames=a.frames,
            min_seconds=a.min_seconds,
            baseline_seconds=a.baseline_seconds,
            source=a.source,
            threads=a.threads,
        )
    except (PowerError, ProfileError, BundleError) as e:
        raise SystemExit(f"edgesplit profile power: {e}") from None


def summarize(res: dict[str, Any]) -> str:
    tag = " (ESTIMATE)" if res["estimate"] else ""
    lines = [
        f"{res['bundle']}: sampler {res['sampler']}{tag} at {res['hz']:g} Hz, baseline {res['baseline']['watts']:.3f} W, "
        f"sampler CPU {res['sampler_cpu_percent']:.2f}% of a core"
    ]
    rows = [(f"mode {r['mode']} {r['name']}", r) for r in res["modes"]] + (
        [("full", res["full"])] if res["full"] else []
    )
    for label, r in rows:
        lines.append(
            f"  {label:<16} {r['joules_per_inference'] * 1e3:9.4f} mJ/inference (net)  {r['mean_w']:.3f} W  "
            f"{r['inferences']} inferences in {r['seconds']:.2f} s"
        )
    return "\n".join(lines)
