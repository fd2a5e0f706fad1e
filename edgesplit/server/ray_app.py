"""Bundle tails as a Ray Serve deployment (issue 13): the replica side of ``serve --backend ray``.

Each replica (:class:`TailReplica`) loads the bundle and runs its tail with the daemon's own
:class:`~.tail_runner.TailRunner` (ONNX Runtime, torch CUDA or TensorRT, GPUs requested per
replica through ``ray_actor_options``), so a formed batch decodes and runs exactly as in the
daemon. Ray Serve owns the replicas: autoscaling on ongoing requests, a health check that fails a
replica whose engine failed (Ray then replaces it), placement across nodes.

Start it with Ray's own tools (the application builder :func:`build` takes the arguments)::

    serve run edgesplit.server.ray_app:build bundle=models/cifar10-resnet20-bottlefit
    serve deploy deploy/ray/serve-config.yaml            # or the KubeRay RayService manifest

and put gateways in front: ``edgesplit serve --backend ray --ray-app NAME``.

What crosses between gateway and replica is one formed batch in the wire's own style, not Python
objects: a msgpack header (each request's mode, validated descriptor, rows) plus the requests'
tensor frames as bytes, and back a msgpack header (row offsets, per-request errors, shape) plus
the logits' bytes (:func:`pack_batch`, :func:`unpack_batch`, :func:`pack_result`,
:func:`unpack_result`). Ray carries these ``bytes`` between its own processes, inside the cluster;
agents never reach it.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import msgpack
import numpy as np

from ..bundle import Bundle
from ..engine import EngineError, EngineOptions
from ..wire.errors import ErrorCode, WireError
from .batcher import Item

DEPLOYMENT = "TailReplica"


def pack_batch(items: list[Item]) -> list[bytes]:
    """A formed batch -> frames: header (mode, descriptor, rows, single per request), payloads."""
    head = [[it.key[1], it.desc, it.rows, it.single] for it in items]
    return [msgpack.packb(head), *(bytes(memoryview(it.payload)) for it in items)]


def unpack_batch(frames: list[bytes], bundle_hash: str) -> list[Item]:
    head = msgpack.unpackb(frames[0])
    if len(head) != len(frames) - 1:
        raise ValueError(f"batch header lists {len(head)} requests, {len(frames) - 1} frames came")
    return [
        Item((bundle_hash, int(mode)), b"", i, desc, frames[i + 1], int(rows), bool(single), 0)
        for i, (mode, desc, rows, single) in enumerate(head)
    ]


def pack_result(logits: np.ndarray, offsets: list[int], errors: dict[int, WireError]) -> list[bytes]:
    head = {
        "offsets": offsets,
        "errors": [[i, int(e.code), e.message] for i, e in errors.items()],
        "shape": list(logits.shape),
    }
    return [msgpack.packb(head), np.ascontiguousarray(logits, dtype="<f4").tobytes()]


def unpack_result(frames: list[bytes]) -> tuple[np.ndarray, list[int], dict[int, WireError]]:
    head = msgpack.unpackb(frames[0])
    logits = np.frombuffer(frames[1], dtype="<f4").reshape(head["shape"])
    errors = {int(i): WireError(ErrorCode(code), msg) for i, code, msg in head["errors"]}
    return logits, [int(o) for o in head["offsets"]], errors


class TailReplica:
    """One tail replica (a Ray Serve deployment class; plain Python, so it is testable alone)."""

    def __init__(
        self,
        bundle: str,
        backend: str = "ort",
        threads: int | None = None,
        device: str | None = None,
        precision: str = "fp32",
        accel: str = "none",
        max_batch: int = 32,
    ):
        from .tail_runner import TailRunner

        b = Bundle.load(bundle)
        if b.serving != "head-tail":
            raise ValueError(f"bundle '{b.name}' ({b.family}) has no tail for a Ray replica")
        opts = EngineOptions(device=device, precision=precision, accel=accel, max_batch=int(max_batch))
        self.bundle = b
        self.runner = TailRunner(b, backend, threads, opts)
        self.runner.warmup()
        self._lock = threading.Lock()  # one batch at a time: the runner reuses its batch buffers
        self.failed: str | None = None

    def describe(self) -> dict[str, Any]:
        """What a gateway checks before sending batches: the bundle, output name, batch size."""
        r = self.runner
        return {
            "bundle": self.bundle.hash,
            "output": r.output_name,
            "max_batch": r.max_batch,
            "backend": r.backend,
            "pid": os.getpid(),
        }

    def run_batch(self, frames: list[bytes]) -> list[bytes]:
        items = unpack_batch(frames, self.bundle.hash)
        with self._lock:
            try:
                out = self.runner.run(items)
            except EngineError as e:
                self.failed = f"{type(e).__name__}: {e}"
                raise
        return pack_result(*out)

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose engine failed is replaced, and the engine
        must still run one row."""
        if self.failed is not None:
            raise RuntimeError(f"tail engine failed: {self.failed}")
        with self._lock:
            self.runner.warmup()


def deployment(**options: Any):
    """:class:`TailReplica` as a Ray Serve deployment (``options``: ``serve.deployment``'s)."""
    from ray import serve

    defaults: dict[str, Any] = {
        "name": DEPLOYMENT,
        # One batch runs while the next waits in the replica: the hop to it is hidden.
        "max_ongoing_requests": 2,
        "health_check_period_s": 5.0,
        "health_check_timeout_s": 30.0,
    }
    return serve.deployment(TailReplica, **{**defaults, **options})


_BUILD_KEYS = {
    "bundle",
    "backend",
    "threads",
    "device",
    "precision",
    "accel",
    "max_batch",
    "num_replicas",
    "num_cpus",
    "num_gpus",
    "min_replicas",
    "max_replicas",
    "target_ongoing_requests",
}


def build(args: dict[str, Any]):
    """The application builder ``serve run``/``serve deploy`` call with the config's ``args``:
    ``bundle`` (a path every node sees), the engine keys of ``edgesplit serve`` (``backend``,
    ``threads``, ``device``, ``precision``, ``accel``, ``max_batch``), and the replicas:
    ``num_replicas``, or ``min_replicas``/``max_replicas``/``target_ongoing_requests`` for
    autoscaling, plus ``num_cpus``/``num_gpus`` per replica. Unknown keys are refused."""
    unknown = sorted(set(args) - _BUILD_KEYS)
    if unknown:
        raise ValueError(f"unknown argument(s) {', '.join(unknown)} (known: {', '.join(sorted(_BUILD_KEYS))})")
    if "bundle" not in args:
        raise ValueError("the 'bundle' argument is required")
    engine = {k: args[k] for k in ("backend", "threads", "device", "precision", "accel", "max_batch") if k in args}
    for k in ("threads", "max_batch"):
        if k in engine:
            engine[k] = int(engine[k])
    actor: dict[str, Any] = {"num_cpus": float(args.get("num_cpus", 1))}
    if "num_gpus" in args:
        actor["num_gpus"] = float(args["num_gpus"])
    opts: dict[str, Any] = {"ray_actor_options": actor}
    if "max_replicas" in args:
        opts["autoscaling_config"] = {
            "min_replicas": int(args.get("min_replicas", 1)),
            "max_replicas": int(args["max_replicas"]),
            # ongoing batches per replica, the queue-length signal Ray Serve scales on
            "target_ongoing_requests": float(args.get("target_ongoing_requests", 1)),
        }
    else:
        opts["num_replicas"] = int(args.get("num_replicas", 1))
    return deployment(**opts).bind(str(args["bundle"]), **engine)
