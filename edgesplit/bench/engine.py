"""``edgesplit bench engine``: tail throughput of one engine alone, per batch size.

No sockets and no pyzmq: this is the engine-level figure a server benchmark compares itself
against (the GPU machine has no pyzmq). :func:`measure_engine` is the reusable part; each batch
size is timed for a fixed wall-clock budget after a warm-up, on the same input for every call
(fixed random data: the timing of a dense tail does not depend on the values).
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np

from ..engine import Engine


def _time_calls(call: Callable[[], object], seconds: float, warmup: int, sync: Callable[[], None]) -> list[float]:
    """Run ``call`` ``warmup`` times, then repeatedly for ``seconds``; per-call latencies in ms.

    ``sync`` waits for queued device work, so a latency covers the work and not just its launch.
    At least 5 timed calls are made whatever ``seconds`` says, so a percentile always exists.
    """
    for _ in range(warmup):
        call()
    sync()
    times: list[float] = []
    end = time.perf_counter() + seconds
    while len(times) < 5 or time.perf_counter() < end:
        t = time.perf_counter()
        call()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    return times


def _row(batch: int, times_ms: list[float]) -> dict:
    ms = np.asarray(times_ms)
    return {
        "batch": batch,
        "calls": len(ms),
        "latency_ms_p50": float(np.median(ms)),
        "latency_ms_p95": float(np.percentile(ms, 95)),
        # throughput from the total time, not the median: it is what a saturated server sustains
        "frames_per_s": float(batch * len(ms) / (ms.sum() / 1e3)),
    }


def measure_engine(engine: Engine, input_shape: Sequence[int], batch_sizes: Sequence[int],
                   seconds: float = 2.0, warmup: int = 10) -> list[dict]:
    """Frames/s and latency of ``engine.run`` per batch size; one row per batch size.

    ``input_shape`` is one frame's shape (without the batch axis). The engine is called the way
    the server calls it: float32 numpy in, float32 numpy out, so host<->device copies are counted.
    Rows: ``batch, calls, latency_ms_p50, latency_ms_p95, frames_per_s``.
    """
    name = engine.inputs[0].name
    rng = np.random.default_rng(0)
    rows = []
    for b in batch_sizes:
        x = rng.standard_normal((int(b), *input_shape), dtype=np.float32)
        times = _time_calls(lambda: engine.run({name: x}), seconds, warmup, sync=lambda: None)
        rows.append(_row(int(b), times))
    return rows
