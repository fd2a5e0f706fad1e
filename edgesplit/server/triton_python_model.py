"""Triton python-backend model written by ``edgesplit triton-export --runtime python`` as
``<model>/1/model.py``: runs ``model.onnx`` beside it with ONNX Runtime on the CPU.

It is copied out of the edgesplit package and runs inside Triton's python backend stub, so it
imports nothing from edgesplit, and ``triton_python_backend_utils`` (which only that stub provides)
only inside :meth:`TritonPythonModel.execute`.
"""

from __future__ import annotations

import json
import os


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        import onnxruntime as ort  # type: ignore[import-untyped]

        cfg = json.loads(args["model_config"])
        self.inputs = [t["name"] for t in cfg["input"]]
        self.outputs = [t["name"] for t in cfg["output"]]
        opts = ort.SessionOptions()
        threads = cfg.get("parameters", {}).get("intra_op_thread_count", {}).get("string_value")
        if threads:
            opts.intra_op_num_threads = int(threads)
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])

    def execute(self, requests: list) -> list:
        import numpy as np
        import triton_python_backend_utils as pb  # type: ignore[import-not-found]

        # Triton's dynamic batcher may hand over several requests: one ONNX Runtime run on their
        # rows together, then each request gets its own rows back.
        feeds, sizes = {}, []
        for name in self.inputs:
            parts = [pb.get_input_tensor_by_name(r, name).as_numpy() for r in requests]
            sizes = [len(p) for p in parts]
            feeds[name] = parts[0] if len(parts) == 1 else np.concatenate(parts)
        outs = self.session.run(self.outputs, feeds)
        responses, start = [], 0
        for n in sizes:
            tensors = [pb.Tensor(name, o[start : start + n].copy()) for name, o in zip(self.outputs, outs)]
            responses.append(pb.InferenceResponse(output_tensors=tensors))
            start += n
        return responses
