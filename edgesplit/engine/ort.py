"""ONNX Runtime backend: the edge default and the server's CPU backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import Engine, EngineError, TensorSpec
from .providers import OrtExecution, ort_session

_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(uint8)": "uint8",
    "tensor(int8)": "int8",
}


class OrtEngine(Engine):
    backend = "ort"

    def __init__(self, path: str | Path, threads: int | None = None, execution: OrtExecution | None = None):
        # threads: intra-op threads where ``execution`` sets none (callers that only pass a count)
        ex = (execution or OrtExecution()).with_threads(threads)
        self._sess, self.choice = ort_session(path, ex)
        self.providers = self.choice.providers  # what the session runs on, as ORT reports it
        self._inputs = [
            TensorSpec(i.name, tuple(i.shape), _ORT_TYPES.get(i.type, i.type)) for i in self._sess.get_inputs()
        ]
        self._outputs = [
            TensorSpec(o.name, tuple(o.shape), _ORT_TYPES.get(o.type, o.type)) for o in self._sess.get_outputs()
        ]
        self._out_names = [o.name for o in self._outputs]
        self.path = Path(path)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            outs = self._sess.run(self._out_names, feeds)
        except Exception as e:
            raise EngineError(f"ONNX Runtime failed on {self.path.name}: {e}") from None
        return dict(zip(self._out_names, outs))
