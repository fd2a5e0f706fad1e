"""``edgesplit serve --backend ray``: the daemon as a ZeroMQ gateway in front of tail replicas that
run as a Ray Serve deployment (:mod:`.ray_app`).

The compute thread hands each formed batch, still quantized (the requests' frames, a few hundred
bytes each, not the float32 batch), to the deployment through a Ray Serve handle; a replica
decodes and runs it with the daemon's own tail runner and returns the logits. Ray's router picks
the replica.

- **A replica dies with the batch** (kill -9, a lost node): the batch is sent again, to another
  replica, while the earliest deadline in it has not passed (``retries`` times); otherwise each
  request is answered INTERNAL, which an agent answers locally. Never lost, never answered twice:
  a batch's requests are answered once, from the attempt that returned.
- **Deadlines and capacity**: the scheduler times each batch from hand-off to logits, so its
  estimates (admission, DEADLINE_EXCEEDED, flushes) include the hop and the replica's queue; the
  gateway learns the deployment's capacity from the batches it runs.
- **Credits and OVERLOADED** stay the gateway's: per agent, against the gateway's own queue.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np

from ..bundle import Bundle, BundleError
from ..engine import EngineError
from ..wire import codec
from ..wire.errors import ErrorCode, WireError
from .batcher import Item
from .ray_app import DEPLOYMENT, pack_batch, unpack_result
from .tail_backend import Capacity

log = logging.getLogger("edgesplit.server")

LOG_EVERY_S = 5.0


class RayTail:
    """A bundle's tail on a Ray Serve deployment (a :class:`~.tail_backend.TailBackend`)."""

    fused = False

    def __init__(
        self,
        bundle: Bundle,
        app: str,
        *,
        address: str | None = None,
        max_batch: int = 32,
        timeout_s: float = 30.0,
        retries: int = 1,
    ):
        import ray
        from ray import serve

        if bundle.serving != "head-tail":
            raise BundleError(f"bundle '{bundle.name}' ({bundle.family}) has no tail to serve from Ray")
        if not ray.is_initialized():
            ray.init(address=address or "auto", log_to_driver=False)
        self.bundle, self.app, self.timeout_s, self.retries = bundle, app, float(timeout_s), int(retries)
        self._ray_errors = (ray.exceptions.RayError, TimeoutError)
        try:
            self.handle = serve.get_deployment_handle(DEPLOYMENT, app_name=app)
            info = self.handle.describe.remote().result(timeout_s=self.timeout_s)
        except Exception as e:
            raise EngineError(f"Ray Serve application '{app}' ({DEPLOYMENT}): {type(e).__name__}: {e}") from None
        if info["bundle"] != bundle.hash:
            raise EngineError(
                f"Ray Serve application '{app}' serves bundle {info['bundle'][:12]}, this gateway serves "
                f"'{bundle.name}' {bundle.hash[:12]}"
            )
        if int(info["max_batch"]) < max_batch:
            raise EngineError(
                f"Ray Serve application '{app}' runs batches of at most {info['max_batch']} rows, the gateway "
                f"forms up to {max_batch} (--max-batch)"
            )
        self.output_name = info["output"]
        self.max_batch = int(info["max_batch"])
        self._out_descs: dict[tuple, list[dict[str, Any]]] = {}
        self._logged_at = -LOG_EVERY_S
        self.retried = 0  # batches sent again after a replica failed them
        self.remote_failures = 0  # batches answered with an error

    def warmup(self) -> None:
        """The replicas warmed up when they were made; describe() above reached one."""

    def run(self, items: list[Item]) -> tuple[np.ndarray, list[int], dict[int, WireError]]:
        return self.submit(items).result()

    def submit(self, items: list[Item]) -> _Pending:
        """Send the batch now; its result (with the retries above) when ``result()`` is called.
        The pipelined compute thread (:mod:`.pipelined`) keeps several batches in flight so."""
        frames = pack_batch(items)
        return _Pending(self, items, frames, self.handle.run_batch.remote(frames))

    def _warn(self, e: BaseException) -> None:
        now = time.monotonic()
        if now - self._logged_at >= LOG_EVERY_S:
            self._logged_at = now
            log.warning("remote tail failed: %s: %s", type(e).__name__, e, extra={"event": "remote_tail_failed"})

    def outputs_for(self, shape: tuple) -> list[dict[str, Any]]:
        o = self._out_descs.get(shape)
        if o is None:
            n = 4 * math.prod(shape)
            o = self._out_descs[shape] = [
                codec.descriptor(self.output_name, shape, "float32", 32, 1.0, 0, None, "raw", n)
            ]
        return o

    def _deployment_status(self):
        from ray import serve

        app = serve.status().applications.get(self.app)
        return None if app is None else (app.status, app.deployments.get(DEPLOYMENT))

    def health(self) -> tuple[bool, str]:
        try:
            st = self._deployment_status()
        except Exception as e:  # the cluster is gone
            return False, f"Ray Serve: {type(e).__name__}: {e}"
        if st is None or st[1] is None:
            return False, f"Ray Serve application '{self.app}' is not deployed"
        if str(st[1].status).rsplit(".", 1)[-1] != "HEALTHY":
            return False, f"Ray Serve application '{self.app}': {DEPLOYMENT} is {st[1].status}"
        return True, ""

    def capacity(self) -> Capacity:
        try:
            st = self._deployment_status()
            counts = {} if st is None or st[1] is None else st[1].replica_states
            replicas = int(counts.get("RUNNING", 0))
        except Exception:
            replicas = 0
        return Capacity(self.max_batch, replicas, f"ray serve app {self.app}")

    def close(self) -> None:
        """The replicas belong to Ray Serve; the gateway leaves them running."""


class _Pending:
    """One submitted batch: its result, sent again while its earliest deadline allows."""

    __slots__ = ("tail", "items", "frames", "response")

    def __init__(self, tail: RayTail, items: list[Item], frames: list[bytes], response: Any):
        self.tail, self.items, self.frames, self.response = tail, items, frames, response

    def result(self) -> tuple[np.ndarray, list[int], dict[int, WireError]]:
        t = self.tail
        deadlines = [it.deadline_ns for it in self.items if it.deadline_ns is not None]
        last = min(deadlines) if deadlines else None
        attempt, response = 0, self.response
        while True:
            try:
                return unpack_result(response.result(timeout_s=t.timeout_s))
            except t._ray_errors as e:
                attempt += 1
                if attempt <= t.retries and (last is None or time.perf_counter_ns() < last):
                    t.retried += 1
                    response = t.handle.run_batch.remote(self.frames)
                    continue
                t._warn(e)
                t.remote_failures += 1
                msg = f"tail unavailable: Ray Serve application '{t.app}': {type(e).__name__}"
                n = len(self.items)
                return _EMPTY, [-1] * n, {i: WireError(ErrorCode.INTERNAL, msg) for i in range(n)}


_EMPTY = np.empty((0,), np.float32)
