"""One Engine interface for every backend (ONNX Runtime, torch, TensorRT).

An engine runs one graph: named float/int numpy arrays in, named numpy arrays out, batch on the
first axis. The agent, the server and the benchmarks speak only this interface, so a backend is
chosen by a string and nothing above it changes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np


class EngineError(Exception):
    """The engine could not be created or could not run the given inputs."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple  # ints, or None / a string for dynamic axes
    dtype: str  # numpy dtype name, e.g. "float32"


def float32_batch(feeds: dict[str, np.ndarray], spec: TensorSpec) -> np.ndarray:
    """The feed for ``spec`` as a C-contiguous float32 batch, or an EngineError saying what is wrong.

    Fixed axes of ``spec.shape`` must match; axes given as None or a name (the batch) may be any size.
    """
    if spec.name not in feeds:
        raise EngineError(f"missing input '{spec.name}' (given: {', '.join(feeds) or 'nothing'})")
    x = np.asarray(feeds[spec.name])
    if spec.shape:
        fixed = [(i, d) for i, d in enumerate(spec.shape) if isinstance(d, int) and i > 0]
        if x.ndim != len(spec.shape) or any(x.shape[i] != d for i, d in fixed):
            raise EngineError(f"input '{spec.name}' has shape {list(x.shape)}, expected {list(spec.shape)}")
    if x.ndim == 0 or x.shape[0] < 1:
        raise EngineError(f"input '{spec.name}' has no batch rows (shape {list(x.shape)})")
    return np.ascontiguousarray(x, dtype=np.float32)


class Engine(ABC):
    """Backends set ``self._inputs`` / ``self._outputs`` (lists of :class:`TensorSpec`) when built."""

    backend: str = "?"
    _inputs: list[TensorSpec]
    _outputs: list[TensorSpec]

    @property
    def inputs(self) -> list[TensorSpec]:
        return self._inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self._outputs

    @abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch. Arrays are batch-first; outputs are numpy arrays on the host."""

    def run1(self, x: np.ndarray) -> np.ndarray:
        """Convenience for single-input, single-output graphs."""
        return self.run({self.inputs[0].name: x})[self.outputs[0].name]

    def close(self) -> None:  # noqa: B027 (a no-op default, not abstract: only backends holding resources override it)
        pass

    def __repr__(self) -> str:
        ins = ", ".join(f"{t.name}{list(t.shape)}" for t in self.inputs)
        outs = ", ".join(f"{t.name}{list(t.shape)}" for t in self.outputs)
        return f"{type(self).__name__}({ins} -> {outs})"
