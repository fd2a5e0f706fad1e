"""Engines: ``create_engine(path, backend)`` is the one way the rest of edgesplit makes one."""

from __future__ import annotations

from pathlib import Path

from .base import Engine, EngineError, TensorSpec

BACKENDS = ("ort", "torch", "tensorrt")


def create_engine(path: str | Path, backend: str = "ort", **options) -> Engine:
    """Make an engine for the graph at ``path``. Unknown backends are an error, never None."""
    if backend == "ort":
        from .ort import OrtEngine

        return OrtEngine(path, **options)
    if backend == "torch":
        from .torch_engine import TorchEngine

        return TorchEngine(path, **options)
    if backend == "tensorrt":
        raise EngineError("the TensorRT backend is not built yet (tracked in the server issue); use 'ort' or 'torch'")
    raise EngineError(f"unknown engine backend '{backend}' (known: {', '.join(BACKENDS)})")


__all__ = ["Engine", "EngineError", "TensorSpec", "create_engine", "BACKENDS"]
