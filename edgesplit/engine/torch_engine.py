"""torch backend for the server: runs a bundle's ``tail.pt2`` (a torch.export ExportedProgram).

``torch.export.save`` writes graph and weights without pickled code, so loading it executes no
code from the file.

Precision: the weights are cast to fp16/bf16 and the input is cast on the device, so the whole
program runs in that type (autocast would keep re-casting weights on every call); outputs are
cast back to float32 on the device before the copy to the host.

On CUDA (these paths cannot run on the CPU-only CI; ``tools/gpu_tail_bench.sh`` exercises them):
- inputs travel through pinned host buffers (:class:`PinnedStaging`) and 4-D activations use
  the channels-last layout that cuDNN's tensor-core convolutions want;
- ``accel="cudagraphs"`` captures one CUDA graph per batch bucket (powers of two up to
  ``max_batch``) with static device buffers; a batch is padded up to its bucket and the padding
  rows' outputs are dropped. A split tail is a few dozen small kernels, so at the batch sizes a
  server sees, launch overhead, not arithmetic, sets its latency, and a graph replays all of them
  with one launch. Captured by hand rather than through ``torch.compile(mode="reduce-overhead")``
  because the server captures on one thread and replays on its compute thread, and
  reduce-overhead's graph trees are thread-local;
- ``accel="compile"`` runs the program through ``torch.compile`` (inductor fuses the elementwise
  ops around the convolutions). Dynamo compiles batch 1 as a static graph and, on the first other
  size, one graph with a dynamic batch axis that serves every size after it; construction runs
  batch 1 and 2, so no request pays for compilation.
- cuDNN's autotuner is on (``cudnn.benchmark``): each batch shape picks its fastest convolution
  algorithm on first use, which the warm-up and the graph capture pay, not the requests.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .base import Engine, EngineError, TensorSpec, float32_batch
from .options import EngineOptions

log = logging.getLogger("edgesplit.engine")


def batch_buckets(max_batch: int) -> list[int]:
    """Powers of two below ``max_batch``, then ``max_batch`` itself: the CUDA-graph batch sizes.
    Padding a batch to its bucket wastes under half of it; there are log2(max_batch)+1 graphs."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [int(max_batch)]


class TorchEngine(Engine):
    backend = "torch"

    def __init__(self, path: str | Path, options: EngineOptions | None = None):
        opts = options or EngineOptions()
        opts.check("torch")
        try:
            import torch
        except ImportError:
            raise EngineError(
                "the torch backend needs torch: pip install torch==2.13.0 (CPU) or a CUDA build"
            ) from None
        self._torch = torch
        self.options = opts
        self.path = Path(path)
        if opts.threads:
            torch.set_num_threads(int(opts.threads))
        self.device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise EngineError(
                f"device '{opts.device}' asked for, but this torch has no usable CUDA "
                f"(torch {torch.__version__}, cuda build: {torch.version.cuda})"
            )
        if self.device.type == "cuda" and (self.device.index or 0) >= torch.cuda.device_count():
            raise EngineError(
                f"device '{opts.device}' does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
        if opts.accel == "cudagraphs" and self.device.type != "cuda":
            raise EngineError("CUDA graphs need a cuda device; this engine runs on cpu")
        self.dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[opts.precision]
        try:
            ep = torch.export.load(str(path))
        except Exception as e:
            raise EngineError(f"torch could not load exported program {path}: {e}") from None
        sig = ep.graph_signature
        in_meta = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
        self._inputs = [TensorSpec(n, _spec_shape(in_meta.get(n)), "float32") for n in sig.user_inputs]
        self._outputs = [TensorSpec(n, (), "float32") for n in sig.user_outputs]
        if len(self._inputs) != 1:
            raise EngineError(
                f"{self.path.name}: the torch backend runs single-input programs, this one has {len(self._inputs)}"
            )
        self._frame = tuple(d for d in self._inputs[0].shape[1:])
        if not all(isinstance(d, int) for d in self._frame):
            raise EngineError(
                f"{self.path.name}: only the batch axis may be dynamic (input shape {self._inputs[0].shape})"
            )

        on_cuda = self.device.type == "cuda"
        if on_cuda:
            torch.backends.cudnn.benchmark = True  # process-wide; a serving process runs only tails
        self._channels_last = on_cuda and len(self._frame) == 3
        module = ep.module().to(self.device)
        if self.dtype != torch.float32:
            module = module.to(self.dtype)
        if self._channels_last:
            module = module.to(memory_format=torch.channels_last)
        self._module = module
        self._staging = None
        self._graphs: dict[int, tuple] = {}
        if on_cuda:
            from .staging import PinnedStaging

            self._staging = PinnedStaging()
        if opts.accel == "compile":
            self._module = torch.compile(module)
        try:
            if opts.accel == "cudagraphs":
                self._capture_graphs(batch_buckets(opts.max_batch))
            else:  # warm-up: cuDNN autotuning, and compilation for batch 1 and the dynamic batch
                for b in (1, 2):
                    self.run({self._inputs[0].name: np.zeros((b, *self._frame), np.float32)})
        except EngineError:
            raise
        except Exception as e:
            raise EngineError(
                f"torch could not run {self.path.name} ({opts.precision}, accel={opts.accel}, "
                f"{self.device}): {type(e).__name__}: {e}"
            ) from None

    # -- plain path: CPU, and CUDA without graphs ---------------------------------------------------
    def _to_device(self, x: np.ndarray):
        torch = self._torch
        if self._staging is None:
            t = torch.from_numpy(x)
        else:
            host = self._staging.host("in", x.shape)
            host.numpy()[...] = x
            t = host.to(self.device, non_blocking=True)
        t = t.to(self.dtype)
        return t.contiguous(memory_format=torch.channels_last) if self._channels_last else t

    def _outputs_to_host(self, outs) -> dict[str, np.ndarray]:
        if self._staging is None:
            return {s.name: o.float().numpy() for s, o in zip(self._outputs, outs)}
        hosts = []
        for i, o in enumerate(outs):
            h = self._staging.host(f"out{i}", o.shape)
            h.copy_(o.float(), non_blocking=True)  # cast on the device: the copy moves float32
            hosts.append(h)
        self._torch.cuda.current_stream(self.device).synchronize()
        # Copies: the staging buffers are reused by the next call.
        return {s.name: h.numpy().copy() for s, h in zip(self._outputs, hosts)}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = float32_batch(feeds, self._inputs[0])
        if self._graphs:
            return self._run_graphs(x)
        torch = self._torch
        try:
            with torch.inference_mode():
                t = self._to_device(x)
                out = self._module(t)
                outs = out if isinstance(out, (tuple, list)) else (out,)
                return self._outputs_to_host(outs)
        except Exception as e:
            raise EngineError(
                f"torch failed on {self.path.name} with input {list(x.shape)}: {type(e).__name__}: {e}"
            ) from None

    # -- CUDA graphs -------------------------------------------------------------------------------
    def _capture_graphs(self, buckets: list[int]) -> None:
        """One graph per bucket, largest first, all sharing one memory pool: the replays never
        overlap (one compute thread), so their intermediate buffers can alias."""
        torch = self._torch
        pool = None
        with torch.inference_mode(), torch.cuda.device(self.device):
            for b in sorted(buckets, reverse=True):
                static_in = torch.zeros((b, *self._frame), dtype=self.dtype, device=self.device)
                if self._channels_last:
                    static_in = static_in.contiguous(memory_format=torch.channels_last)
                # Warm up on a side stream first, as CUDA graph capture requires (cuDNN picks its
                # algorithms and allocates workspaces outside the capture).
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    for _ in range(3):
                        self._module(static_in)
                torch.cuda.current_stream(self.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = self._module(static_in)
                    outs = tuple(o.float() for o in (out if isinstance(out, (tuple, list)) else (out,)))
                pool = graph.pool()
                self._graphs[b] = (graph, static_in, outs)
        self._buckets = sorted(self._graphs)

    def _run_graphs(self, x: np.ndarray) -> dict[str, np.ndarray]:
        torch = self._torch
        top = self._buckets[-1]
        parts: list[dict[str, np.ndarray]] = []
        try:
            with torch.inference_mode():
                for start in range(0, len(x), top):  # a batch over the largest bucket runs in chunks
                    chunk = x[start : start + top]
                    n = len(chunk)
                    b = next(k for k in self._buckets if k >= n)
                    graph, static_in, static_outs = self._graphs[b]
                    host = self._staging.host("in", chunk.shape)
                    host.numpy()[...] = chunk
                    # Rows n..b keep whatever the last call left there: rows are independent in an
                    # eval-mode network and their outputs are dropped, so they need no clearing.
                    static_in[:n].copy_(host.to(self.device, non_blocking=True))
                    graph.replay()
                    parts.append(self._outputs_to_host([o[:n] for o in static_outs]))
        except Exception as e:
            raise EngineError(
                f"torch (CUDA graphs) failed on {self.path.name} with input {list(x.shape)}: {type(e).__name__}: {e}"
            ) from None
        if len(parts) == 1:
            return parts[0]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _spec_shape(val) -> tuple:
    """An exported placeholder's shape: ints for fixed axes, the symbol's name for dynamic ones."""
    if val is None:
        return ()
    return tuple(d if isinstance(d, int) else str(d) for d in val.shape)
