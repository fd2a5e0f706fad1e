"""ONNX Runtime execution providers and threads: the one place an ONNX Runtime session is made.

Every ORT session of the edge plane (the heads, the local fallback model, the ED-ViT sub-models and
fusion) and the ``ort`` engine backend go through :func:`ort_session`, so a setting here
(``execution_providers``, threads, the provider options) holds for each of them.

Providers are named by short names from a fixed list (:data:`PROVIDERS`); ``available`` is what
*this* ONNX Runtime wheel says it has (``onnxruntime.get_available_providers()``): the PyPI wheel
has the CPU provider only, NVIDIA's JetPack wheels add CUDA and TensorRT, and XNNPACK exists only in
builds that enable it. :func:`choose_providers` keeps the requested providers the wheel has, in the
requested order; one it lacks is an error naming what is missing and what the wheel has, unless
``fallback_to_cpu`` is set, in which case the session runs on what is left (and on CPU). Refusing
is the default: a Jetson told to use TensorRT that quietly runs on its CPU is far slower and
misses every deadline, and the operator learns why only from the latency.

A provider the wheel lists can still fail to start (a CUDA library missing): ONNX Runtime then
drops it and goes on with CPU with a warning. :func:`ort_session` compares what the session reports
(``get_providers()``) with what was asked, and treats a dropped provider as missing.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .base import EngineError

# Short name -> ONNX Runtime's name. A fixed list: a typo is an error at start, not a silent CPU run.
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
_SHORT = {v: k for k, v in PROVIDERS.items()}


class ProviderError(EngineError):
    """The requested execution providers cannot run here (the message names what is missing)."""


@dataclass(frozen=True)
class OrtExecution:
    """How ORT sessions run. ``providers``: short names, in order of preference.
    ``intra_op_threads``: threads inside an operator (None: ORT's default, one per physical core).
    ``inter_op_threads``: threads across independent operators; ORT uses them only in its parallel
    execution mode, which a value above 1 turns on (it helps graphs with parallel branches only).
    ``tensorrt_fp16`` / ``tensorrt_cache_dir``: TensorRT provider options (fp16 kernels; where built
    engines are cached, so a restart does not rebuild them for minutes)."""

    providers: tuple[str, ...] = ("cpu",)
    fallback_to_cpu: bool = False
    intra_op_threads: int | None = None
    inter_op_threads: int | None = None
    tensorrt_fp16: bool = False
    tensorrt_cache_dir: str | None = None

    def __post_init__(self) -> None:
        names = tuple(self.providers)
        if not names:
            raise ProviderError("execution_providers is empty: name at least one of " + ", ".join(PROVIDERS))
        unknown = [n for n in names if n not in PROVIDERS]
        if unknown:
            raise ProviderError(
                f"unknown execution provider(s) {', '.join(map(repr, unknown))} (known: {', '.join(PROVIDERS)})"
            )
        if len(set(names)) != len(names):
            raise ProviderError(f"execution_providers lists a provider twice: {list(names)}")
        for key in ("intra_op_threads", "inter_op_threads"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ProviderError(f"{key} must be an integer >= 1 (or unset), got {v!r}")
        if (self.tensorrt_fp16 or self.tensorrt_cache_dir) and "tensorrt" not in names:
            raise ProviderError("tensorrt_fp16 and tensorrt_cache_dir are TensorRT options: add tensorrt to providers")
        object.__setattr__(self, "providers", names)

    def with_threads(self, threads: int | None) -> OrtExecution:
        """This setting with ``intra_op_threads`` set where it is unset (callers' ``threads``)."""
        if threads is None or self.intra_op_threads is not None:
            return self
        return replace(self, intra_op_threads=int(threads))


def as_execution(threads: int | OrtExecution | None) -> OrtExecution:
    """The callers that only ever passed a thread count keep doing so: CPU, that many threads."""
    if isinstance(threads, OrtExecution):
        return threads
    return OrtExecution(intra_op_threads=None if threads is None else int(threads))


def available_providers() -> list[str]:
    """What this ONNX Runtime wheel has, by ORT's names."""
    import onnxruntime as ort

    return list(ort.get_available_providers())


@dataclass(frozen=True)
class Choice:
    """The providers a session asks ORT for, and the requested ones this wheel lacks."""

    providers: tuple[str, ...]  # short names, in order
    missing: tuple[str, ...]
    available: tuple[str, ...]  # ORT's names, as the wheel lists them

    @property
    def ort_names(self) -> list[str]:
        return [PROVIDERS[p] for p in self.providers]


def _missing_message(ex: OrtExecution, missing: list[str], available: list[str], why: str) -> str:
    import onnxruntime as ort

    lacking = ", ".join(f"{m} ({PROVIDERS[m]})" for m in missing)
    return (
        f"execution_providers {list(ex.providers)}: {lacking} {why}; this ONNX Runtime wheel "
        f"(onnxruntime {ort.__version__}) has {', '.join(available) or 'no providers'}. Install a wheel "
        "built with them (on a Jetson: NVIDIA's onnxruntime-gpu for its JetPack), change "
        "execution_providers, or set fallback_to_cpu: true to run on what there is"
    )


def choose_providers(ex: OrtExecution, available: list[str] | None = None) -> Choice:
    """The requested providers this wheel has, in order; CPU is added last when falling back.
    Raises :class:`ProviderError` when one is missing and ``fallback_to_cpu`` is off."""
    have = available_providers() if available is None else list(available)
    missing = [p for p in ex.providers if PROVIDERS[p] not in have]
    if missing and not ex.fallback_to_cpu:
        raise ProviderError(_missing_message(ex, missing, have, "not in this wheel"))
    kept = [p for p in ex.providers if p not in missing]
    if missing and "cpu" not in kept:
        kept.append("cpu")
    return Choice(tuple(kept), tuple(missing), tuple(have))


def _provider_options(name: str, ex: OrtExecution) -> dict[str, str]:
    if name == "tensorrt":
        opts = {"trt_fp16_enable": "1" if ex.tensorrt_fp16 else "0"}
        if ex.tensorrt_cache_dir:
            opts.update(trt_engine_cache_enable="1", trt_engine_cache_path=str(ex.tensorrt_cache_dir))
        return opts
    if name == "xnnpack" and ex.intra_op_threads:
        # XNNPACK keeps its own thread pool: the threads go to it (see session_options)
        return {"intra_op_num_threads": str(ex.intra_op_threads)}
    return {}


def session_options(ex: OrtExecution, providers: tuple[str, ...]) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if "xnnpack" in providers:
        # ORT's XNNPACK guide: its pool and ORT's intra-op pool contend, so ORT's pool is cut to the
        # calling thread and does not spin; XNNPACK gets the threads (_provider_options).
        opts.intra_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    elif ex.intra_op_threads:
        opts.intra_op_num_threads = ex.intra_op_threads
    if ex.inter_op_threads and ex.inter_op_threads > 1:
        opts.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        opts.inter_op_num_threads = ex.inter_op_threads
    else:
        opts.inter_op_num_threads = 1  # sequential execution: ORT never uses inter-op threads
    return opts


def ort_session(path: str | Path, ex: OrtExecution | None = None, choice: Choice | None = None) -> tuple[Any, Choice]:
    """An ONNX Runtime session of the graph at ``path`` on ``ex``'s providers (chosen now unless
    ``choice`` is given), and the choice it actually got (``providers`` as the session reports
    them). Raises :class:`ProviderError` / :class:`EngineError`."""
    import onnxruntime as ort

    ex = ex or OrtExecution()
    choice = choice or choose_providers(ex)
    providers = [(PROVIDERS[p], _provider_options(p, ex)) for p in choice.providers]
    try:
        sess = ort.InferenceSession(str(path), sess_options=session_options(ex, choice.providers), providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types
        raise EngineError(f"ONNX Runtime could not load {path}: {e}") from None
    got = tuple(_SHORT.get(p, p) for p in sess.get_providers())
    dropped = [p for p in choice.providers if p != "cpu" and p not in got]
    if dropped and not ex.fallback_to_cpu:
        raise ProviderError(
            _missing_message(ex, dropped, list(choice.available), f"failed to start for {Path(path).name}")
        )
    return sess, Choice(got, tuple(dict.fromkeys(choice.missing + tuple(dropped))), choice.available)
