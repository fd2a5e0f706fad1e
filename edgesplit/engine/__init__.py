"""Engines: ``create_engine(path, backend, options)`` is the one way the rest of edgesplit makes one.

    create_engine("tail.onnx")                                        # ONNX Runtime, CPU
    create_engine("tail.pt2", "torch", device="cuda", precision="bf16", accel="cudagraphs")
    create_engine("tail.onnx", "tensorrt", EngineOptions(precision="fp16", max_batch=64))

Keyword arguments are :class:`EngineOptions` fields and override ``options``. Each backend module
is imported only when asked for, so importing this package never imports torch or TensorRT.
"""

from __future__ import annotations

from pathlib import Path

from .base import Engine, EngineError, TensorSpec
from .options import ACCELERATIONS, PRECISIONS, EngineOptions
from .providers import PROVIDERS, OrtExecution, ProviderError

BACKENDS = ("ort", "torch", "tensorrt")


def create_engine(path: str | Path, backend: str = "ort", options: EngineOptions | None = None, **overrides) -> Engine:
    """Make an engine for the graph at ``path``. Unknown backends and option combinations a backend
    does not run are an EngineError saying why, never None and never a silent substitute."""
    if backend not in BACKENDS:
        raise EngineError(f"unknown engine backend '{backend}' (known: {', '.join(BACKENDS)})")
    opts = EngineOptions.make(options, **overrides)
    opts.check(backend)
    if backend == "ort":
        from .ort import OrtEngine

        return OrtEngine(path, threads=opts.threads, execution=opts.execution)
    if backend == "torch":
        from .torch_engine import TorchEngine

        return TorchEngine(path, opts)
    from .tensorrt import TensorRTEngine

    return TensorRTEngine(path, opts)


__all__ = [
    "ACCELERATIONS",
    "BACKENDS",
    "PRECISIONS",
    "Engine",
    "EngineError",
    "EngineOptions",
    "OrtExecution",
    "PROVIDERS",
    "ProviderError",
    "TensorSpec",
    "create_engine",
]
