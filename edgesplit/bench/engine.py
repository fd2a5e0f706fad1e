"""``edgesplit bench engine``: tail throughput of one engine alone, per batch size.

No sockets and no pyzmq: this is the engine-level figure a server benchmark compares itself
against (the GPU machine has no pyzmq). :func:`measure_engine` is the reusable part; each batch
size is timed for a fixed wall-clock budget after a warm-up, on the same input for every call
(fixed random data: the timing of a dense tail does not depend on the values).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..engine import Engine

# The shipped CIFAR-10 bundle. Not imported from edgesplit.demo: that imports pyzmq, which this
# scenario must not need (the GPU machine has none).
DEFAULT_BUNDLE = Path(__file__).resolve().parents[2] / "models" / "cifar10-resnet20-bottlefit"


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


def measure_engine(
    engine: Engine, input_shape: Sequence[int], batch_sizes: Sequence[int], seconds: float = 2.0, warmup: int = 10
) -> list[dict]:
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
        times = _time_calls(lambda x=x: engine.run({name: x}), seconds, warmup, sync=lambda: None)
        rows.append(_row(int(b), times))
    return rows


def measure_bare_torch(
    program: str | Path,
    input_shape: Sequence[int],
    batch_sizes: Sequence[int],
    device: str,
    precision: str = "fp32",
    seconds: float = 2.0,
    warmup: int = 10,
) -> list[dict]:
    """The same rows for the exported program called directly on device tensors: no numpy, no host
    copies, no engine. What the model alone costs, for the engine's figures to be read against.
    Same weights dtype and (on CUDA) the same channels-last layout as the torch engine uses."""
    import torch

    dev = torch.device(device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    module = torch.export.load(str(program)).module().to(dev).to(dtype)
    channels_last = dev.type == "cuda" and len(input_shape) == 3
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    rows = []
    with torch.inference_mode():
        for b in batch_sizes:
            x = torch.randn((int(b), *input_shape), generator=gen).to(dev, dtype)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            rows.append(_row(int(b), _time_calls(lambda x=x: module(x), seconds, warmup, sync)))
    return rows


def add_arguments(p) -> None:
    from ..engine import ACCELERATIONS, BACKENDS, PRECISIONS

    p.add_argument(
        "--bundle",
        default=None,
        help="bundle (default: the shipped CIFAR-10 bundle); the torch backend "
        "and --bare-torch need its tail_torch file (edgesplit export --torch-tail)",
    )
    p.add_argument("--backend", default="ort", choices=BACKENDS)
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the backend's own choice)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS)
    p.add_argument("--accel", default="none", choices=ACCELERATIONS, help="torch only: torch.compile or CUDA graphs")
    p.add_argument("--batch-sizes", default="1,4,16,32", help="comma-separated batch sizes")
    p.add_argument("--seconds", type=float, default=2.0, help="timed seconds per batch size (after warm-up)")
    p.add_argument("--threads", type=int, default=None, help="intra-op CPU threads")
    p.add_argument("--cache-dir", default=None, help="TensorRT plan cache")
    p.add_argument(
        "--bare-torch",
        action="store_true",
        help="also time the bare torch program on device tensors at the same batch sizes",
    )


def run(a) -> dict:
    from ..bundle import Bundle
    from ..engine import EngineError, EngineOptions, create_engine

    bundle = Bundle.load(a.bundle or DEFAULT_BUNDLE)
    try:
        batch_sizes = [int(s) for s in a.batch_sizes.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--batch-sizes must be comma-separated integers, not '{a.batch_sizes}'") from None
    if not batch_sizes or min(batch_sizes) < 1:
        raise SystemExit("--batch-sizes needs at least one size >= 1")
    needs_program = a.backend == "torch" or a.bare_torch
    if needs_program and not bundle.has("tail_torch"):
        raise SystemExit(
            f"bundle '{bundle.name}' has no tail_torch file, which the torch backend and --bare-torch "
            "run; export one with: edgesplit export STUDENT --out DIR --torch-tail"
        )
    graph = bundle.file("tail_torch") if a.backend == "torch" else bundle.file("tail")
    frame = tuple(int(s) for s in bundle.wire_spec["shape"])
    t0 = time.perf_counter()
    try:
        opts = EngineOptions(
            device=a.device,
            precision=a.precision,
            accel=a.accel,
            max_batch=max(batch_sizes),
            threads=a.threads,
            cache_dir=a.cache_dir,
        )
        engine = create_engine(graph, a.backend, opts)
    except EngineError as e:
        raise SystemExit(f"edgesplit bench engine: {e}") from None
    res = {
        "bench": "engine",
        "bundle": bundle.name,
        "backend": a.backend,
        "precision": a.precision,
        "accel": a.accel,
        "device": str(getattr(engine, "device", a.device or "cpu")),
        "input_shape": list(frame),
        "engine_start_s": round(time.perf_counter() - t0, 3),
        "seconds_per_batch": a.seconds,
        "engine": measure_engine(engine, frame, batch_sizes, a.seconds),
    }
    if a.bare_torch:
        bare = measure_bare_torch(bundle.file("tail_torch"), frame, batch_sizes, res["device"], a.precision, a.seconds)
        res["bare_torch"] = bare
        # > 1: the engine sustains more than the bare program (its accelerations outweigh its copies).
        res["engine_over_bare_fps"] = [
            round(e["frames_per_s"] / b["frames_per_s"], 3) for e, b in zip(res["engine"], bare)
        ]
    res["gpu"] = _gpu_name(res["device"])
    return res


def _gpu_name(device: str) -> str | None:
    if not device.startswith("cuda"):
        return None
    import torch

    return torch.cuda.get_device_name(torch.device(device))
