"""How long the device's local model takes here: what ``bench adapt`` tells the policies and what
the simulator charges for a fallback frame, measured on its own (not from the runs it is used on)."""

from __future__ import annotations

import time
from pathlib import Path


def measure_fallback_ms(bundle_path: Path, frames: int = 40, source: str | None = None) -> float:
    """Median latency of the bundle's full model on this machine (ONNX Runtime, 1 thread),
    preprocessing included, on real frames (``source``; default: the bundle's dataset's test split)."""
    import numpy as np

    from ..bundle import Bundle
    from ..data.sources import open_source, take
    from ..data.transforms import preprocess
    from ..engine import create_engine
    from ..loopback import DEFAULT_SOURCES

    b = Bundle.load(bundle_path)
    if source is None:
        dataset = next((d for d in DEFAULT_SOURCES if b.name.startswith(d)), None)
        if dataset is None:
            raise ValueError(f"no default frame source for bundle '{b.name}': pass --fallback-ms")
        source = DEFAULT_SOURCES[dataset]
    eng = create_engine(b.file("full"), backend="ort", threads=1)
    times = []
    for s in take(open_source(source, b.classes), frames):
        t0 = time.perf_counter()
        eng.run1(preprocess(s.data, b.input_spec)[None])
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times[5:] if len(times) > 10 else times))
