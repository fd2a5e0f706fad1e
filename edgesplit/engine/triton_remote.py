"""A model on a Triton Inference Server, behind the :class:`~edgesplit.engine.base.Engine`
interface: one ``run`` is one gRPC inference request carrying the whole batch.

Not a ``create_engine`` backend (that makes an engine from a graph file; this one names a model on
a server), so it is made directly: ``TritonEngine("127.0.0.1:8001", "mybundle-tail")``.
``tritonclient[grpc]`` (the ``triton`` extra) is imported when one is made, never by this package.

Failures are :class:`EngineError`; :class:`RemoteOverloaded` when Triton refused the request
because the model's queue is full (``dynamic_batching.default_queue_policy.max_queue_size``), so
that a caller can answer "not now" rather than "broken".
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Engine, EngineError, TensorSpec, float32_batch

# Triton's datatype names (the protocol's, not the model config's TYPE_ names) -> numpy
_DTYPES = {
    "FP32": "float32",
    "FP16": "float16",
    "FP64": "float64",
    "INT64": "int64",
    "INT32": "int32",
    "INT8": "int8",
    "UINT8": "uint8",
    "BOOL": "bool",
}
# What Triton's dynamic batcher says when the model's queue is full (core: "Exceeds maximum queue size").
_QUEUE_FULL = "maximum queue size"


class RemoteOverloaded(EngineError):
    """Triton refused the request: the model's queue is full."""


def _client(url: str):
    try:
        import tritonclient.grpc as grpcclient
    except ImportError:
        raise EngineError(
            "the Triton backend needs tritonclient's gRPC client: pip install 'edgesplit[triton]'"
        ) from None
    return grpcclient, grpcclient.InferenceServerClient(url)


class TritonEngine(Engine):
    backend = "triton"

    def __init__(self, url: str, model: str, *, timeout_s: float = 10.0):
        from tritonclient.utils import InferenceServerException

        self.url, self.model, self.timeout_s = url, model, float(timeout_s)
        self._grpc, self._client = _client(url)
        self._exc = InferenceServerException
        try:
            if not self._client.is_model_ready(model, client_timeout=self.timeout_s):
                raise EngineError(f"Triton at {url} has no ready model '{model}'")
            meta = self._client.get_model_metadata(model, as_json=True, client_timeout=self.timeout_s)
            self.config: dict[str, Any] = self._client.get_model_config(
                model, as_json=True, client_timeout=self.timeout_s
            )["config"]
        except InferenceServerException as e:
            raise EngineError(f"Triton at {url}, model '{model}': {e.message()}") from None
        self._inputs = [self._spec(t) for t in meta["inputs"]]
        self._outputs = [self._spec(t) for t in meta["outputs"]]
        if len(self._inputs) != 1 or self._inputs[0].dtype != "float32":
            raise EngineError(f"Triton model '{model}' must take one FP32 input, not {self._inputs}")
        self._requested = [self._grpc.InferRequestedOutput(t.name) for t in self._outputs]
        self._probe: Any = None  # a second client for health checks from another thread

    @staticmethod
    def _spec(t: dict) -> TensorSpec:
        shape = tuple(int(d) if int(d) >= 0 else "batch" for d in t["shape"])
        return TensorSpec(t["name"], shape, _DTYPES.get(t["datatype"], t["datatype"]))

    @property
    def max_batch(self) -> int:
        return int(self.config.get("max_batch_size", 0))

    @property
    def instances(self) -> int:
        return sum(int(g.get("count", 1)) for g in self.config.get("instance_group", [])) or 1

    def parameters(self) -> dict[str, str]:
        """The model config's ``parameters`` as plain strings."""
        return {k: v.get("string_value", "") for k, v in self.config.get("parameters", {}).items()}

    def _input(self, feeds: dict[str, np.ndarray]):
        spec = self._inputs[0]
        x = float32_batch(feeds, spec)
        inp = self._grpc.InferInput(spec.name, list(x.shape), "FP32")
        inp.set_data_from_numpy(x)  # copied into the request: the caller may reuse its buffer
        return inp

    def _error(self, e) -> EngineError:
        msg = f"Triton at {self.url}, model '{self.model}': {e.message()}"
        return RemoteOverloaded(msg) if _QUEUE_FULL in (e.message() or "") else EngineError(msg)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        inp = self._input(feeds)
        try:
            res = self._client.infer(self.model, [inp], outputs=self._requested, client_timeout=self.timeout_s)
        except self._exc as e:
            raise self._error(e) from None
        return {t.name: res.as_numpy(t.name) for t in self._outputs}

    def submit(self, feeds: dict[str, np.ndarray]) -> "TritonPending":
        """Send one batch without waiting (gRPC async); ``result()`` waits for its outputs."""
        p = TritonPending(self)
        self._client.async_infer(
            self.model, [self._input(feeds)], p._done, outputs=self._requested, client_timeout=self.timeout_s
        )
        return p

    def health(self, timeout_s: float = 1.0) -> tuple[bool, str]:
        """(True, "") when the server is live and the model ready; else (False, why). Safe to call
        from a thread other than the one running batches (it has its own client)."""
        if self._probe is None:
            self._probe = self._grpc.InferenceServerClient(self.url)
        try:
            if self._probe.is_model_ready(self.model, client_timeout=timeout_s):
                return True, ""
            return False, f"Triton at {self.url}: model '{self.model}' is not ready"
        except self._exc as e:
            return False, f"Triton at {self.url}: {e.message()}"

    def close(self) -> None:
        for c in (self._client, self._probe):
            if c is not None:
                c.close()


class TritonPending:
    """One batch sent with :meth:`TritonEngine.submit`."""

    def __init__(self, engine: TritonEngine):
        import threading

        self._engine = engine
        self._event = threading.Event()
        self._result: Any = None
        self._exc: Any = None

    def _done(self, result, error) -> None:  # gRPC's thread
        self._result, self._exc = result, error
        self._event.set()

    def result(self) -> dict[str, np.ndarray]:
        e = self._engine
        if not self._event.wait(e.timeout_s + 1.0):
            raise EngineError(f"Triton at {e.url}, model '{e.model}': no answer within {e.timeout_s:.0f} s")
        if self._exc is not None:
            raise e._error(self._exc)
        return {t.name: self._result.as_numpy(t.name) for t in e._outputs}
