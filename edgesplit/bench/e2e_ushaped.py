"""``edgesplit bench e2e`` for a U-shaped bundle (SFPrompt, docs/PROTOCOL.md §15.6): the same run as
:mod:`.e2e` (daemon and agent CLI in their own processes, one frame at a time), reported per stage
of the U: the head and the encoding of its tokens on the device, the body on the server (its
compute and queue), the tail on the device, and the bytes each way, as the agent received them:
the tokens up in the mode's dtype, the body's output down in the mode's answer encoding
(``bytes_down_per_frame``, ``answer``; PROTOCOL.md §15.6.1). ``overhead_ms_p50`` = e2e - head -
body - tail on p50s, set against a raw pyzmq round trip carrying the same bytes up and down,
measured in the same run.

The codec's stages are measured beside the run in this process (one thread) on the first frames of
the same source through the bundle's head and body: the tokens' encoding (the agent's) and decoding
(the server's) in the mode's dtype, and the answer's encoding (the server's) and decoding (the
agent's) in the mode's answer encoding.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from ..bundle import Bundle
from ..wire import split_train as S

RESULT_NAME = S.REPLY_NAMES[S.TRAIN_FWD]  # "body_out"


def token_codec_ms(bundle: Bundle, mode: int | None, source: str, frames: int = 100) -> dict:
    """Encode and decode time of the tokens in the mode's dtype, and of the body's output in the
    mode's answer encoding, on real frames (one thread)."""
    from ..data.sources import open_source, take
    from ..data.transforms import preprocess
    from ..engine import create_engine

    m = bundle.default_mode if mode is None else bundle.mode(mode)
    head, body = (create_engine(bundle.file(role), "ort", threads=1) for role in ("head", "body"))
    name, answer_bits = bundle.wire_spec["name"], int(m.answer_bits or 32)
    # report key prefix -> its times (ms): the tokens' codec, then the answer's
    times: dict[str, list[float]] = {"codec_encode": [], "codec_decode": [], "answer_encode": [], "answer_decode": []}
    for s in take(open_source(source, bundle.classes), frames):
        z = head.run1(preprocess(s.data, bundle.input_spec)[None])[0]
        t0 = time.perf_counter()
        d, payload = S.encode(z, m.bits, name)
        t1 = time.perf_counter()
        tokens = S.decode(d, payload)
        t2 = time.perf_counter()
        out = body.run1(tokens[None])[0]
        t3 = time.perf_counter()
        d, payload = S.encode(out, answer_bits, RESULT_NAME)
        t4 = time.perf_counter()
        S.decode(d, payload)
        t5 = time.perf_counter()
        for key, seconds in zip(times, (t1 - t0, t2 - t1, t4 - t3, t5 - t4)):
            times[key].append(seconds * 1e3)
    stats = {}
    for key, ms in times.items():
        stats[f"{key}_ms_p50"] = float(np.median(ms))
        stats[f"{key}_ms_p95"] = float(np.percentile(ms, 95))
    return {"codec": m.dtype, "answer": m.answer_dtype, "codec_frames": len(times["codec_encode"]), **stats}


def u_shaped_report(
    bundle: Bundle,
    source: str,
    mode: int | None,
    threads: int,
    recs: list[dict],
    agent_rss_mb: float,
    raw_rtt_ms: Callable[..., dict],
) -> dict:
    """The e2e figures of a U-shaped run from the agent's JSON lines (``recs``); ``raw_rtt_ms``:
    :func:`.e2e.raw_rtt_ms` (the bare transport's round trip, the same bytes each way)."""
    m = bundle.default_mode if mode is None else bundle.mode(mode)
    summary = next((r["summary"] for r in recs if "summary" in r), {})
    rows = [r for r in recs if "id" in r and r.get("error") is None]
    if not rows:
        raise RuntimeError(f"no frame was answered: {summary.get('errors')}")
    warm = rows[min(20, len(rows) // 10) :]  # the first frames pay ORT's and the sockets' warm-up
    col = lambda k: np.asarray([r[k] for r in warm], np.float64)  # noqa: E731
    head, enc, rtt, body, tail = (
        col("head_ms"),
        col("encode_ms"),
        col("rtt_ms"),
        col("server_compute_ms"),
        col("tail_ms"),
    )
    e2e = head + enc + rtt + tail
    up = float(np.median([r["bytes_sent"] for r in rows]))
    down = float(np.median([r["bytes_received"] for r in rows]))
    raw = raw_rtt_ms(int(up), reply_bytes=int(down))
    p50 = lambda a: float(np.median(a))  # noqa: E731
    overhead = p50(e2e) - p50(head) - p50(body) - p50(tail)
    return {
        "bench": "e2e",
        "serving": "u-shaped",
        "bundle": bundle.name,
        "mode": m.name,
        "source": source,
        "frames": len(rows),
        "errors": len(recs) - len(rows) - 1,
        "accuracy": summary.get("accuracy"),
        "mode_accuracy": m.accuracy,  # the manifest's, on the export's check frames
        "bytes_per_frame": up,
        "bytes_up_per_frame": up,
        "bytes_down_per_frame": down,
        "header_bytes_per_frame": float(np.median([r["header_bytes"] for r in rows])),
        "e2e_ms_p50": p50(e2e),
        "e2e_ms_p95": float(np.percentile(e2e, 95)),
        "head_ms_p50": p50(head),
        "encode_ms_p50": p50(enc),
        "server_body_ms_p50": p50(body),
        "server_queue_ms_p50": p50(col("server_queue_ms")),
        "tail_ms_p50": p50(tail),
        "rtt_ms_p50": p50(rtt),
        "raw_rtt_ms_p50": raw["p50"],
        "raw_rtt_ms_p95": raw["p95"],
        "overhead_ms_p50": overhead,
        "overhead_ratio": overhead / raw["p50"],
        "agent_rss_mb": round(agent_rss_mb, 1),
        "agent_torch_loaded": summary.get("torch_loaded"),
        "threads": threads,
        **token_codec_ms(bundle, mode, source),
    }
