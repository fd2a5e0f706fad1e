"""``edgesplit bench plan``'s measurements in the shaped namespace: the server daemon, the real
agent's end-to-end latency per option (:func:`measure_agent`), and the runtime-overhead probe
(:func:`probe_overhead`), taken on other options than the one each prediction is judged on."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..control.netns import ShapedNamespace

PORT = 5600  # the daemon's port inside the namespace (its own network: nothing else listens there)


def measure_agent(
    ns: ShapedNamespace,
    bundle: Path,
    endpoint: str,
    mode: int,
    source: str,
    frames: int,
    warmup: int,
    period_ms: float,
    workdir: Path,
) -> dict[str, Any]:
    """One agent process, ``warmup + frames`` real frames paced ``period_ms`` apart; medians."""
    lines = workdir / "frames.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "edgesplit",
        "agent",
        "--bundle",
        str(bundle),
        "--server",
        endpoint,
        "--source",
        source,
        "--frames",
        str(frames + warmup),
        "--mode",
        str(mode),
        "--inflight",
        "1",
        "--threads",
        "1",
        "--fallback",
        "off",
        "--timeout-s",
        "120",
        "--fps",
        f"{1e3 / period_ms:.6f}",
        "--json-lines",
        str(lines),
    ]
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
    return {
        "frames": len(rows),
        "e2e_ms": float(np.median(e2e)),
        "e2e_ms_p90": float(np.percentile(e2e, 90)),
        "rtt_minus_compute_ms": float(np.median([r["rtt_ms"] - r["server_compute_ms"] for r in rows])),
        "head_incl_preprocess_ms": med("head_ms"),
        "encode_ms": med("encode_ms"),
        "rtt_ms": med("rtt_ms"),
        "server_ms": med("server_ms"),
        "server_compute_ms": med("server_compute_ms"),
        "request_bytes": med("bytes_sent") + med("header_bytes"),
        "tbf_drops": after.get("dropped", 0) - before.get("dropped", 0),
    }


def probe_overhead(
    ns: ShapedNamespace, mbps: float, endpoint: str, options: list[tuple[str, Path, int]], pace_ms: float, workdir: Path
) -> list[dict[str, Any]]:
    """The runtime's own time per request on this host as it is loaded now: send -> result minus
    the server's decode + tail (``compute_us``), median over 30 paced frames, with the namespace
    opened to 1 Gbit/s (the bytes then cross in microseconds, inside the bucket). It is what the
    planner's ``overhead`` term stands for. Probed on the group's two smallest requests, so that
    each option is predicted with an overhead measured on another option (:func:`overhead_for`),
    never on the option it is judged on; and at another rate than the runs it predicts."""
    from ..bundle import Bundle

    if len(options) < 2:
        raise SystemExit(
            "edgesplit bench plan: --overhead-ms probe needs at least two options per group (each option's "
            "overhead is probed on another one); give a number of ms instead"
        )
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
