"""How an engine runs its graph: device, compute precision, acceleration, batch range.

One frozen dataclass for every backend, so the server, the benchmarks and the tests describe an
engine the same way; :meth:`EngineOptions.check` says, per backend, which combinations exist and
refuses the others with the reason (an :class:`EngineError`, never a silent fallback).

Whatever the options, an engine takes float32 numpy arrays and returns float32 numpy arrays:
precision is what runs inside, never what crosses the interface.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace

from .base import EngineError
from .providers import OrtExecution

PRECISIONS = ("fp32", "fp16", "bf16")
ACCELERATIONS = ("none", "compile", "cudagraphs")
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


@dataclass(frozen=True)
class EngineOptions:
    """``device``: "cpu", "cuda" or "cuda:N"; None lets the backend choose (ONNX Runtime: cpu;
    torch: cuda when present, else cpu; TensorRT: cuda).
    ``precision``: compute precision, "fp32", "fp16" or "bf16".
    ``accel``: torch only. "compile" runs the program through ``torch.compile`` (kernel fusion);
    "cudagraphs" captures one CUDA graph per padded batch bucket (removes per-kernel launch cost).
    ``max_batch``: the largest batch the caller will send in one call (the server's max batch): the
    top of TensorRT's optimization profile and of the CUDA-graph buckets. Larger batches still run,
    in chunks.
    ``opt_batch``: the batch TensorRT tunes its kernels for (default: ``max_batch``).
    ``threads``: intra-op CPU threads (ONNX Runtime, torch on CPU).
    ``cache_dir``: where TensorRT plans are cached (default: $EDGESPLIT_CACHE/tensorrt, else
    ~/.cache/edgesplit/tensorrt); never inside a bundle, which is read-only and hashed.
    ``execution``: ONNX Runtime only: execution providers, threads and provider options
    (:class:`edgesplit.engine.providers.OrtExecution`; ``threads`` fills its intra-op threads
    where it sets none). ``device`` stays "cpu" for this backend: the providers place the graph.
    """

    device: str | None = None
    precision: str = "fp32"
    accel: str = "none"
    max_batch: int = 32
    opt_batch: int | None = None
    threads: int | None = None
    cache_dir: str | None = None
    execution: OrtExecution | None = None

    def __post_init__(self) -> None:
        if self.device is not None and not _DEVICE.match(self.device):
            raise EngineError(f"unknown device '{self.device}' (expected cpu, cuda or cuda:N)")
        if self.precision not in PRECISIONS:
            raise EngineError(f"unknown precision '{self.precision}' (known: {', '.join(PRECISIONS)})")
        if self.accel not in ACCELERATIONS:
            raise EngineError(f"unknown acceleration '{self.accel}' (known: {', '.join(ACCELERATIONS)})")
        if int(self.max_batch) < 1:
            raise EngineError(f"max_batch must be at least 1, not {self.max_batch}")
        if self.opt_batch is not None and not 1 <= int(self.opt_batch) <= int(self.max_batch):
            raise EngineError(f"opt_batch must lie in [1, max_batch={self.max_batch}], not {self.opt_batch}")

    @classmethod
    def make(cls, base: EngineOptions | None = None, **overrides) -> EngineOptions:
        """``base`` with ``overrides`` applied; an unknown keyword is an EngineError naming it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise EngineError(f"unknown engine option(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return replace(base or cls(), **overrides)

    def check(self, backend: str) -> None:
        """Refuse the combinations ``backend`` does not run, with the reason."""
        on_cpu = self.device in (None, "cpu")
        if backend == "ort":
            if not on_cpu:
                raise EngineError(
                    f"the ONNX Runtime backend runs on cpu only, not '{self.device}' (use torch or tensorrt on a GPU)"
                )
            if self.precision != "fp32":
                raise EngineError(
                    "ONNX Runtime computes in the graph's own precision: for "
                    f"{self.precision} lower the graph first (edgesplit.engine.onnx_precision) or use torch/tensorrt"
                )
        elif backend == "tensorrt":
            if self.device == "cpu":
                raise EngineError("the TensorRT backend runs on cuda only")
            if self.precision == "bf16":
                raise EngineError(
                    "the TensorRT backend takes its precision from the ONNX graph, and the bundles' "
                    "opset-18 graphs cannot carry bf16 convolutions; use fp16 or fp32 (or torch for bf16)"
                )
        if backend != "ort" and self.execution is not None:
            raise EngineError(f"execution providers are ONNX Runtime options, not {backend}'s")
        if backend != "torch" and self.accel != "none":
            raise EngineError(f"acceleration '{self.accel}' is a torch option; the {backend} backend does its own")
        if backend == "torch" and self.accel == "cudagraphs" and self.device == "cpu":
            raise EngineError("CUDA graphs need a cuda device, not cpu")
