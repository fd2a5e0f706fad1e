"""``edgesplit bench e2e``: end-to-end latency of one frame at a time through the real runtime,
set against a raw pyzmq round trip of the same payload measured in the same run.

The server daemon and the agent each run in their own process, as deployed; the agent's peak RSS
is read from the kernel (``RUSAGE_CHILDREN``) once it exits, and the agent reports whether torch
was ever imported. ``overhead_ratio`` = (e2e - head - tail) / raw_rtt on p50s: what the runtime
adds beyond the model halves, in units of the bare transport.

The codec's own stages are measured beside the run, in this process with one thread, on the first
frames of the same source through the bundle's head: encode and decode p50/p95 of the mode's codec
(the uniform codes, or an ``"ans"`` mode's entropy coder with its tables), so the per-stage table
shows what entropy coding costs each end. The run's ``encode_ms_p50`` is the agent's own.

A U-shaped bundle (SFPrompt, PROTOCOL.md §15.6) runs the same way and is reported by
:mod:`.e2e_ushaped`: bytes each way and the stages head, encode, server body and tail (on the device).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

from ..bundle import Bundle
from ..loopback import DEFAULT_SOURCES, free_port
from .e2e_ushaped import u_shaped_report
from .serverproc import ServerProcess

_ECHO = r"""
import sys, zmq
ctx = zmq.Context(); s = ctx.socket(zmq.ROUTER); s.bind(sys.argv[1]); print("ready", flush=True)
reply = bytes(int(sys.argv[2])) if len(sys.argv) > 2 else None  # else the message itself goes back
while True:
    parts = s.recv_multipart(copy=False)
    if len(parts) == 2 and bytes(parts[1]) == b"stop":
        break
    s.send_multipart(parts if reply is None else [parts[0], reply], copy=False)
"""


def raw_rtt_ms(payload_bytes: int, rounds: int = 2000, warmup: int = 200, reply_bytes: int | None = None) -> dict:
    """DEALER -> ROUTER echo (another process) -> DEALER, one message at a time; ``reply_bytes``:
    the answer's size when it is not the payload's (a U-shaped answer is larger than its request)."""
    port = free_port()
    argv = [
        sys.executable,
        "-c",
        _ECHO,
        f"tcp://127.0.0.1:{port}",
        *([] if reply_bytes is None else [str(reply_bytes)]),
    ]
    echo = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    echo.stdout.readline()
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.connect(f"tcp://127.0.0.1:{port}")
    payload = np.random.default_rng(0).integers(0, 255, payload_bytes, dtype=np.uint8).tobytes()
    ts = []
    try:
        for i in range(warmup + rounds):
            t = time.perf_counter()
            s.send(payload, copy=False)
            s.recv(copy=False)
            if i >= warmup:
                ts.append((time.perf_counter() - t) * 1e3)
        s.send(b"stop")
    finally:
        s.close(0)
        echo.wait(10)
    return {"p50": float(np.median(ts)), "p95": float(np.percentile(ts, 95)), "rounds": rounds}


def codec_stage_ms(bundle: Bundle, mode: int | None, source: str, frames: int = 200) -> dict:
    """Encode and decode time of the mode's codec on real frames (one thread, this process)."""
    from ..data.sources import open_source, take
    from ..data.transforms import preprocess
    from ..engine import create_engine
    from ..wire.mode_codec import decode_any, encode_mode

    m = bundle.default_mode if mode is None else bundle.mode(mode)
    tables = bundle.tables_for(m) if m.entropy_coded else None
    head = create_engine(bundle.file(m.head), "ort", threads=1)
    C, name = int(bundle.wire_spec["shape"][0]), bundle.wire_spec["name"]
    enc, dec, sizes = [], [], []
    for s in take(open_source(source, bundle.classes), frames):
        z = head.run1(preprocess(s.data, bundle.input_spec)[None])[0]
        t0 = time.perf_counter()
        d, payload = encode_mode(z, m, tables=tables, name=name)
        t1 = time.perf_counter()
        decode_any(d, payload, tables=tables, full_channels=C)
        t2 = time.perf_counter()
        enc.append((t1 - t0) * 1e3)
        dec.append((t2 - t1) * 1e3)
        sizes.append(len(payload))
    warm = slice(min(10, len(enc) // 10), None)  # the first calls build the coder's models
    pct = lambda a, q: float(np.percentile(a[warm], q))  # noqa: E731
    e, d_ = np.asarray(enc), np.asarray(dec)
    return {
        "codec": m.codec,
        "codec_frames": len(enc),
        "codec_encode_ms_p50": pct(e, 50),
        "codec_encode_ms_p95": pct(e, 95),
        "codec_decode_ms_p50": pct(d_, 50),
        "codec_decode_ms_p95": pct(d_, 95),
        "codec_bytes_mean": float(np.mean(sizes)),
        "codec_bytes_p95": float(np.percentile(sizes, 95)),
    }


def default_source(bundle: Bundle) -> str:
    """The frames a bundle is benchmarked on: its dataset's by name, else the export's check frames."""
    known = next((v for k, v in DEFAULT_SOURCES.items() if bundle.name.startswith(k)), None)
    return known or bundle.manifest["export"]["check_source"]


def run_agent(bundle_path: Path, frames: int, source: str, mode: int | None, threads: int) -> tuple[list[dict], float]:
    """The daemon and the agent CLI, each in its own process, one frame at a time: the agent's JSON
    lines (one per frame, then the summary) and its peak RSS in MB."""
    server = ServerProcess([bundle_path], ["--max-queue-delay-us", "0", "--threads", str(threads)]).start()
    lines_path = Path(tempfile.mkstemp(suffix=".jsonl")[1])
    try:
        cmd = [
            sys.executable,
            "-m",
            "edgesplit",
            "agent",
            "--bundle",
            str(bundle_path),
            "--server",
            server.endpoint,
            "--source",
            source,
            "--frames",
            str(frames),
            "--inflight",
            "1",
            "--threads",
            str(threads),
            "--timeout-s",
            "60",
            "--json-lines",
            str(lines_path),
            # every frame must take the split path: this measures it, not the local fallback
            "--fallback",
            "off",
        ]
        if mode is not None:
            cmd += ["--mode", str(mode)]
        agent = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        # ru_maxrss of waited children, in KiB on Linux; the server is still running, so this is the agent.
        agent_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        if agent.returncode != 0:
            raise RuntimeError(f"agent failed ({agent.returncode}): {agent.stderr[-2000:]}")
    finally:
        server.stop()
    recs = [json.loads(line) for line in lines_path.read_text().splitlines() if line.strip()]
    lines_path.unlink()
    return recs, agent_rss_mb


def bench_e2e(
    bundle_path: Path, frames: int, source: str | None = None, mode: int | None = None, threads: int = 1
) -> dict:
    bundle = Bundle.load(bundle_path)
    source = source or default_source(bundle)
    recs, agent_rss_mb = run_agent(bundle_path, frames, source, mode, threads)
    if bundle.serving == "u-shaped":
        return u_shaped_report(bundle, source, mode, threads, recs, agent_rss_mb, raw_rtt_ms)
    summary = next((r["summary"] for r in recs if "summary" in r), {})
    rows = [r for r in recs if "id" in r and r.get("error") is None]
    warm = rows[min(20, len(rows) // 10) :]  # the first frames pay ORT's and the sockets' warm-up
    head = np.asarray([r["head_ms"] for r in warm])
    enc = np.asarray([r["encode_ms"] for r in warm])
    rtt = np.asarray([r["rtt_ms"] for r in warm])
    tail = np.asarray([r["server_compute_ms"] for r in warm])
    e2e = head + enc + rtt
    bytes_pf = float(np.median([r["bytes_sent"] for r in rows]))
    raw = raw_rtt_ms(int(bytes_pf))
    p50 = lambda a: float(np.median(a))  # noqa: E731
    return {
        "bench": "e2e",
        "bundle": bundle.name,
        "source": source,
        "frames": len(rows),
        "errors": len(recs) - len(rows) - 1,
        "bytes_per_frame": bytes_pf,
        "header_bytes_per_frame": float(np.median([r["header_bytes"] for r in rows])),
        "e2e_ms_p50": p50(e2e),
        "e2e_ms_p95": float(np.percentile(e2e, 95)),
        "head_ms_p50": p50(head),
        "encode_ms_p50": p50(enc),
        "tail_ms_p50": p50(tail),
        "rtt_ms_p50": p50(rtt),
        "server_queue_ms_p50": p50([r["server_queue_ms"] for r in warm]),
        "raw_rtt_ms_p50": raw["p50"],
        "raw_rtt_ms_p95": raw["p95"],
        "overhead_ms_p50": p50(e2e) - p50(head) - p50(tail),
        "overhead_ratio": (p50(e2e) - p50(head) - p50(tail)) / raw["p50"],
        "agent_rss_mb": round(agent_rss_mb, 1),
        "agent_torch_loaded": summary.get("torch_loaded"),
        "threads": threads,
        "bytes_mean": float(np.mean([r["bytes_sent"] for r in rows])),  # ans frames vary in length
        "bytes_p95": float(np.percentile([r["bytes_sent"] for r in rows], 95)),
        **codec_stage_ms(bundle, mode, source),
    }


def add_arguments(p) -> None:
    p.add_argument("--bundle", default=None, help="bundle (default: the shipped CIFAR-10 bundle)")
    p.add_argument("--frames", type=int, default=500)
    p.add_argument("--source", default=None)
    p.add_argument("--mode", type=int, default=None)
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads for head and tail")


def run(a) -> dict:
    from ..loopback import DEFAULT_BUNDLE

    return bench_e2e(Path(a.bundle or DEFAULT_BUNDLE), a.frames, a.source, a.mode, a.threads)
