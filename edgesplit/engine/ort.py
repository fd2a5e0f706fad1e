"""ONNX Runtime backend: the edge default and the server's CPU backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import Engine, EngineError, TensorSpec

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

    def __init__(self, path: str | Path, threads: int | None = None, providers: list[str] | None = None):
        import onnxruntime as ort  # imported here so that importing edgesplit.engine stays cheap

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        available = ort.get_available_providers()
        providers = [p for p in (providers or ["CPUExecutionProvider"]) if p in available] or ["CPUExecutionProvider"]
        try:
            self._sess = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise EngineError(f"ONNX Runtime could not load {path}: {e}") from None
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
