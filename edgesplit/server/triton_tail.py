"""``edgesplit serve --backend triton``: the daemon as a ZeroMQ gateway in front of a Triton server.

Agents, sessions, credits, admission, deadlines and dynamic batching are the daemon's as always;
the compute thread decodes a formed batch into one float32 tensor exactly as for an in-process
tail (:class:`~.tail_runner.TailRunner`) and sends it to Triton as **one** gRPC inference request
(:class:`~edgesplit.engine.triton_remote.TritonEngine`). The model is the one
``edgesplit triton-export`` wrote for the bundle (``<bundle name or --triton-model-prefix>-tail``);
at start the gateway checks that its ``edgesplit_bundle`` and ``edgesplit_sha256`` parameters are
this bundle's hash and tail file, and that Triton's ``max_batch_size`` takes the gateway's batches.

How the remote tail keeps the daemon's promises:

- **Deadlines and capacity.** The scheduler times each batch from hand-off to logits, so its
  estimates (admission, DEADLINE_EXCEEDED, the deadline-aware flush) include the RPC and Triton's
  own queue: the gateway learns the remote tail's capacity from the batches it runs, as it learns
  a local one's.
- **OVERLOADED.** Triton refusing a batch because the model's queue is full
  (``max_queue_size``, written from ``--max-queue``) answers each of its requests OVERLOADED, the
  refusal an agent falls back on and retries later; credits keep their meaning because they are
  the gateway's, per agent, as before.
- **Never lost.** Any other failure (Triton down, timeout) answers each request INTERNAL, which an
  agent with fallback answers locally; /health/ready reports the remote model's readiness.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from ..bundle import Bundle, BundleError
from ..engine import EngineError, EngineOptions
from ..engine.triton_remote import RemoteOverloaded, TritonEngine
from ..wire.errors import ErrorCode, WireError
from .batcher import Item
from .tail_backend import Capacity
from .tail_runner import TailRunner
from .triton_repo import PARAM_BUNDLE, PARAM_ROLE, PARAM_SHA, model_name

log = logging.getLogger("edgesplit.server")

# A remote tail that keeps failing is logged once per this many seconds, not once per batch.
LOG_EVERY_S = 5.0


class TritonTail(TailRunner):
    """A bundle's tail on a Triton server (a :class:`~.tail_backend.TailBackend`)."""

    def __init__(
        self,
        bundle: Bundle,
        url: str,
        options: EngineOptions | None = None,
        *,
        prefix: str | None = None,
        timeout_s: float = 10.0,
    ):
        if bundle.serving != "head-tail":
            raise BundleError(f"bundle '{bundle.name}' ({bundle.family}) has no tail to serve from Triton")
        opts = EngineOptions.make(options)
        if opts.device not in (None, "cpu") or opts.precision != "fp32" or opts.accel != "none":
            raise EngineError(
                "with --backend triton the tail's device and precision are the Triton model's "
                "(edgesplit triton-export --device/--precision), not the gateway's"
            )
        name = model_name(bundle, "tail", prefix)
        engine = TritonEngine(url, name, timeout_s=timeout_s)
        try:
            self._check_identity(engine, bundle, opts.max_batch)
            super().__init__(bundle, "triton", None, opts, engine=engine)
        except BaseException:
            engine.close()
            raise
        self.remote: TritonEngine = engine
        self._logged_at = -LOG_EVERY_S
        self.remote_failures = 0  # batches answered with an error because Triton failed

    @staticmethod
    def _check_identity(engine: TritonEngine, bundle: Bundle, max_batch: int) -> None:
        where = f"Triton model '{engine.model}' at {engine.url}"
        p = engine.parameters()
        if p.get(PARAM_BUNDLE) != bundle.hash:
            raise EngineError(
                f"{where} holds bundle {p.get(PARAM_BUNDLE, 'unknown')[:12]}, this gateway serves "
                f"'{bundle.name}' {bundle.hash[:12]}: export it with 'edgesplit triton-export'"
            )
        if p.get(PARAM_ROLE) != "tail" or p.get(PARAM_SHA) != bundle.manifest["files"]["tail"]["sha256"]:
            raise EngineError(f"{where} is not this bundle's tail (role {p.get(PARAM_ROLE)}, sha256 differs)")
        if engine.max_batch < max_batch:
            raise EngineError(
                f"{where} takes batches of at most {engine.max_batch} rows, the gateway forms up to {max_batch} "
                "(--max-batch): export with the same --max-batch"
            )

    def run(self, items: list[Item]) -> tuple[np.ndarray, list[int], dict[int, WireError]]:
        try:
            return super().run(items)
        except EngineError as e:
            return self._failed(items, e)

    def submit(self, items: list[Item]) -> _Pending:
        """Decode and send the batch now (the pipelined compute thread keeps several out);
        ``result()`` gives what :meth:`run` would have."""
        x, offsets, errors = self.prepare(items)
        try:
            pending = None if x is None else self.remote.submit({self.input_name: x})
        except EngineError as e:
            return _Pending(self, items, None, offsets, errors, e)
        return _Pending(self, items, pending, offsets, errors, None)

    def _failed(self, items: list[Item], e: EngineError):
        if isinstance(e, RemoteOverloaded):
            return self._all_failed(items, ErrorCode.OVERLOADED, str(e))
        now = time.monotonic()
        if now - self._logged_at >= LOG_EVERY_S:
            self._logged_at = now
            log.warning("remote tail failed: %s", e, extra={"event": "remote_tail_failed"})
        return self._all_failed(items, ErrorCode.INTERNAL, f"tail unavailable: {e}")

    def _all_failed(self, items: list[Item], code: ErrorCode, message: str):
        self.remote_failures += 1
        return _EMPTY, [-1] * len(items), {i: WireError(code, message) for i in range(len(items))}

    def health(self) -> tuple[bool, str]:
        return self.remote.health()

    def capacity(self) -> Capacity:
        return Capacity(self.remote.max_batch, self.remote.instances, f"triton {self.remote.url} {self.remote.model}")


class _Pending:
    __slots__ = ("tail", "items", "pending", "offsets", "errors", "failure")

    def __init__(self, tail: TritonTail, items, pending, offsets, errors, failure):
        self.tail, self.items, self.pending = tail, items, pending
        self.offsets, self.errors, self.failure = offsets, errors, failure

    def result(self) -> tuple[np.ndarray, list[int], dict[int, WireError]]:
        t = self.tail
        if self.failure is not None:
            return t._failed(self.items, self.failure)
        if self.pending is None:  # nothing decoded: no request was sent
            return _EMPTY, self.offsets, self.errors
        try:
            out = self.pending.result()[t.output_name]
        except EngineError as e:
            return t._failed(self.items, e)
        return np.ascontiguousarray(out, dtype="<f4"), self.offsets, self.errors


_EMPTY = np.empty((0,), np.float32)
