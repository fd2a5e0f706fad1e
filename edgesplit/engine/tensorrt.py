"""TensorRT backend (TensorRT 10 Python API) for the server: a bundle's ``tail.onnx`` on an NVIDIA GPU.

Build: a strongly typed network (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``), so every
tensor runs in the type the ONNX graph gives it and no builder flag picks precision (TensorRT 11
knows no other mode). For ``precision="fp16"`` the graph is first rewritten to fp16 compute with
fp32 inputs and outputs (:func:`edgesplit.engine.onnx_precision.lower_precision`); "fp32" builds
the bundle's graph as it is. One optimization profile covers the dynamic batch axis: min 1, opt
``opt_batch`` (default ``max_batch``), max ``max_batch``.

Cache: building takes seconds to minutes, so the serialized plan is kept on disk under
``cache_dir`` keyed by the sha256 of the ONNX actually built, the TensorRT version, the GPU name
and the profile. A plan only runs on the TensorRT version and GPU that built it, hence the key.
The cache is never inside the bundle: bundles are read-only and their files are hashed.

Run: ``set_input_shape`` for the batch, ``set_tensor_address`` for each I/O tensor,
``execute_async_v3`` on the engine's own CUDA stream, with the host copies on that same stream
through pinned buffers.

Device memory comes from torch CUDA tensors (the server has torch; TensorRT's Python API takes
raw device pointers, and torch's caching allocator and streams save a dependency on cuda-python
or pycuda). ``import tensorrt`` happens only when this engine is made.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from .base import Engine, EngineError, TensorSpec, float32_batch
from .options import EngineOptions

log = logging.getLogger("edgesplit.engine")

WORKSPACE_BYTES = 1 << 30  # builder scratch memory limit; a split tail needs far less


def default_cache_dir() -> Path:
    root = os.environ.get("EDGESPLIT_CACHE")
    return Path(root) / "tensorrt" if root else Path.home() / ".cache" / "edgesplit" / "tensorrt"


def _import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise EngineError(
            f"the TensorRT backend needs the 'tensorrt' Python package (TensorRT 10) and an NVIDIA GPU: "
            f"pip install tensorrt ({e}); or use --backend torch / ort"
        ) from None
    if int(trt.__version__.split(".")[0]) < 10:
        raise EngineError(f"the TensorRT backend needs TensorRT 10 or later, found {trt.__version__}")
    return trt


class TensorRTEngine(Engine):
    backend = "tensorrt"

    def __init__(self, path: str | Path, options: EngineOptions | None = None):
        opts = options or EngineOptions()
        opts.check("tensorrt")
        trt = _import_tensorrt()
        try:
            import torch
        except ImportError:
            raise EngineError(
                "the TensorRT backend uses torch for CUDA memory and streams: install torch with CUDA"
            ) from None
        if not torch.cuda.is_available():
            raise EngineError("the TensorRT backend needs a CUDA device, and torch sees none")
        self._trt, self._torch = trt, torch
        self.options = opts
        self.path = Path(path)
        self.device = torch.device(opts.device or "cuda")
        torch.cuda.set_device(self.device)  # TensorRT builds and runs on the current device (one daemon per GPU)
        self._logger = trt.Logger(trt.Logger.WARNING)

        onnx_bytes = self._graph_bytes(opts.precision)
        plan_path = self._plan_path(onnx_bytes)
        if plan_path.is_file():
            log.info("TensorRT plan from cache: %s", plan_path)
            plan = plan_path.read_bytes()
        else:
            log.info(
                "building TensorRT plan for %s (%s, batch 1..%d); cached at %s",
                self.path.name,
                opts.precision,
                opts.max_batch,
                plan_path,
            )
            plan = self._build(onnx_bytes)
            _write_atomic(plan_path, plan)
        self._runtime = trt.Runtime(self._logger)  # kept: the engine must not outlive its runtime
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise EngineError(f"TensorRT could not deserialize the plan {plan_path} (delete it to rebuild)")
        self._context = self._engine.create_execution_context()
        self._stream = torch.cuda.Stream(self.device)
        self._describe_io()
        self._allocate(int(opts.max_batch))
        from .staging import PinnedStaging

        self._staging = PinnedStaging()
        self.run({self._inputs[0].name: np.zeros((1, *self._frame), np.float32)})  # warm-up

    # -- build ---------------------------------------------------------------------------------
    def _graph_bytes(self, precision: str) -> bytes:
        """The ONNX to build, serialized: the bundle's graph, or its fp16-compute rewrite."""
        try:
            if precision == "fp32":
                return self.path.read_bytes()
            import onnx

            from .onnx_precision import lower_precision

            return lower_precision(onnx.load(str(self.path)), precision).SerializeToString()
        except (OSError, ValueError) as e:
            raise EngineError(f"TensorRT: cannot prepare {self.path} for {precision}: {e}") from None

    def _plan_path(self, onnx_bytes: bytes) -> Path:
        o = self.options
        gpu = self._torch.cuda.get_device_name(self.device)
        key = hashlib.sha256()
        for part in (
            hashlib.sha256(onnx_bytes).hexdigest(),
            self._trt.__version__,
            gpu,
            f"batch=1,{o.opt_batch or o.max_batch},{o.max_batch}",
        ):
            key.update(part.encode() + b"\0")
        cache = Path(o.cache_dir) if o.cache_dir else default_cache_dir()
        return cache / f"{self.path.stem}-{o.precision}-{key.hexdigest()[:24]}.plan"

    def _build(self, onnx_bytes: bytes) -> bytes:
        trt, o = self._trt, self.options
        builder = trt.Builder(self._logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse(onnx_bytes):
            errors = [_describe_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
            raise EngineError(
                f"TensorRT could not parse {self.path.name}:\n  " + "\n  ".join(errors or ["(no details)"])
            )
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
        profile = builder.create_optimization_profile()
        opt = int(o.opt_batch or o.max_batch)
        for i in range(network.num_inputs):
            t = network.get_input(i)
            frame = tuple(t.shape)[1:]
            if any(d < 0 for d in frame):
                raise EngineError(
                    f"TensorRT: input '{t.name}' of {self.path.name} has a dynamic axis besides the batch: {tuple(t.shape)}"
                )
            profile.set_shape(t.name, (1, *frame), (opt, *frame), (int(o.max_batch), *frame))
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise EngineError(f"TensorRT could not build an engine from {self.path.name} (see the TensorRT log above)")
        return bytes(plan)

    # -- buffers -------------------------------------------------------------------------------
    def _describe_io(self) -> None:
        trt, eng = self._trt, self._engine
        names = [eng.get_tensor_name(i) for i in range(eng.num_io_tensors)]
        ins = [n for n in names if eng.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outs = [n for n in names if eng.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(ins) != 1:
            raise EngineError(
                f"{self.path.name}: the TensorRT backend runs single-input graphs, this one has {len(ins)}"
            )
        for n in names:
            if eng.get_tensor_dtype(n) != trt.DataType.FLOAT:
                raise EngineError(
                    f"{self.path.name}: I/O tensor '{n}' is {eng.get_tensor_dtype(n)}, expected float32 "
                    "(precision belongs inside the graph, fp32 at its edges)"
                )

        def shape(n: str) -> tuple:
            return tuple(d if d >= 0 else "batch" for d in eng.get_tensor_shape(n))

        self._inputs = [TensorSpec(n, shape(n), "float32") for n in ins]
        self._outputs = [TensorSpec(n, shape(n), "float32") for n in outs]
        self._frame = tuple(self._inputs[0].shape[1:])

    def _allocate(self, max_batch: int) -> None:
        """Device buffers for the largest batch, bound once: every call reuses the same addresses."""
        torch, ctx = self._torch, self._context
        self._max_batch = max_batch
        name = self._inputs[0].name
        self._dev_in = torch.empty((max_batch, *self._frame), dtype=torch.float32, device=self.device)
        ctx.set_input_shape(name, self._dev_in.shape)
        ctx.set_tensor_address(name, self._dev_in.data_ptr())
        self._dev_out = {}
        for s in self._outputs:
            shp = tuple(ctx.get_tensor_shape(s.name))  # resolved for the max batch
            self._dev_out[s.name] = torch.empty(shp, dtype=torch.float32, device=self.device)
            ctx.set_tensor_address(s.name, self._dev_out[s.name].data_ptr())

    # -- run -----------------------------------------------------------------------------------
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = float32_batch(feeds, self._inputs[0])
        parts = [self._run_chunk(x[i : i + self._max_batch]) for i in range(0, len(x), self._max_batch)]
        if len(parts) == 1:
            return parts[0]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _run_chunk(self, x: np.ndarray) -> dict[str, np.ndarray]:
        torch, ctx = self._torch, self._context
        n = len(x)
        host_in = self._staging.host("in", x.shape)
        host_in.numpy()[...] = x
        if not ctx.set_input_shape(self._inputs[0].name, x.shape):
            raise EngineError(f"TensorRT refused input shape {list(x.shape)} for {self.path.name}")
        hosts = {}
        with torch.cuda.stream(self._stream):
            self._dev_in[:n].copy_(host_in, non_blocking=True)
            if not ctx.execute_async_v3(self._stream.cuda_stream):
                raise EngineError(f"TensorRT execution failed on {self.path.name} with input {list(x.shape)}")
            for s in self._outputs:
                shp = tuple(ctx.get_tensor_shape(s.name))
                numel = int(np.prod(shp))
                h = self._staging.host(f"out:{s.name}", shp)
                # The output is laid out for the batch just run, at the start of the buffer.
                h.copy_(self._dev_out[s.name].view(-1)[:numel].view(shp), non_blocking=True)
                hosts[s.name] = h
        self._stream.synchronize()
        return {k: h.numpy().copy() for k, h in hosts.items()}


def _describe_parser_error(err) -> str:
    """One line per ONNX parser error: the node (TensorRT 10 names it), its op, and the reason."""
    where = []
    for attr in ("node_name", "node_operator"):
        fn = getattr(err, attr, None)
        if fn is not None and fn():
            where.append(str(fn()))
    if not where:
        where.append(f"node #{err.node()}")
    return f"{' '.join(where)}: {err.desc()} ({err.code()})"


def _write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so a crash or a second server never sees half a plan."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
