"""torch backend for the server: runs a bundle's ``tail.pt2`` (a torch.export ExportedProgram).

``torch.export.save`` writes graph and weights without pickled code, so loading it executes no
code from the file. CUDA is used when present; ``dtype`` picks autocast precision on GPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import Engine, EngineError, TensorSpec


class TorchEngine(Engine):
    backend = "torch"

    def __init__(self, path: str | Path, device: str | None = None, dtype: str = "float32", threads: int | None = None):
        try:
            import torch
        except ImportError:
            raise EngineError("the torch backend needs torch: pip install torch==2.13.0 (CPU) or a CUDA build") from None
        self._torch = torch
        if threads:
            torch.set_num_threads(int(threads))
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            ep = torch.export.load(str(path))
        except Exception as e:
            raise EngineError(f"torch could not load exported program {path}: {e}") from None
        self._module = ep.module().to(self.device)
        self._amp = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        sig = ep.graph_signature
        ins = [s for s in sig.user_inputs]
        outs = [s for s in sig.user_outputs]
        in_meta = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
        self._inputs = [TensorSpec(n, tuple(in_meta[n].shape) if in_meta.get(n) is not None else (), "float32") for n in ins]
        self._outputs = [TensorSpec(n, (), "float32") for n in outs]
        self.path = Path(path)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        args = [torch.from_numpy(np.ascontiguousarray(feeds[s.name])).to(self.device, non_blocking=True) for s in self._inputs]
        with torch.inference_mode():
            if self._amp is not None and self.device.type == "cuda":
                with torch.autocast("cuda", dtype=self._amp):
                    out = self._module(*args)
            else:
                out = self._module(*args)
        if not isinstance(out, (tuple, list)):
            out = (out,)
        return {s.name: o.float().cpu().numpy() for s, o in zip(self._outputs, out)}
