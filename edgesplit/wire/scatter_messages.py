"""Builders and typed views of the v1.2 messages for ED-ViT (docs/PROTOCOL.md §13).

Builders return header dicts, as those of :mod:`edgesplit.wire.protocol` do (and extend them where
a v1.2 message is an existing kind with an added key: a worker's ``hello``/``welcome``, an
``error`` about one sub-model, a fused ``request`` and its ``result``). Views are frozen
dataclasses read from headers that :func:`~edgesplit.wire.protocol.parse` validated with the
matching ``features`` (``from_header`` checks nothing again); ``to_header()`` calls the builder,
so each message has one definition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from . import protocol as P
from .codec import PACKED_BITS, descriptor
from .errors import ErrorCode
from .kinds import FEATURE_SCATTER, PROTOCOL_VERSION, Kind, Limits
from .messages import Welcome
from .scatter import JPEG_DTYPE

Header = dict[str, Any]


def _ids(submodels: Iterable[int]) -> list[int]:
    return [int(s) for s in submodels]


# ---------------------------------------------------------------------------------------------
# Builders


def worker_hello(
    bundle: str, camera: str, submodels: Iterable[int] | None = None, *, max_inflight: int = 8, **caps: Any
) -> Header:
    """A camera's ``hello`` to a worker: the ED-ViT bundle hash and, optionally, the sub-models
    it will ask of this worker (any the worker does not hold: UNKNOWN_SUBMODEL)."""
    h = P.hello(bundle, camera, max_inflight=max_inflight, **caps)
    if submodels is not None:
        h["submodels"] = _ids(submodels)
    return h


def worker_welcome(
    bundle: str,
    worker: str,
    submodels: Iterable[int],
    *,
    credits: int,
    limits: Limits,
    heartbeat_ms: int,
    codecs: Iterable[str],
    bits: Iterable[int] = PACKED_BITS,
    features: Iterable[str] = (FEATURE_SCATTER,),
) -> Header:
    """A worker's ``welcome``: every sub-model of ``bundle`` it holds, and its features
    (``"scatter"``, plus ``"scatter_jpeg"`` when it decodes JPEG inputs)."""
    h = P.welcome(
        bundle,
        worker,
        credits=credits,
        limits=limits,
        heartbeat_ms=heartbeat_ms,
        codecs=codecs,
        bits=bits,
        features=features,
    )
    h["submodels"] = _ids(submodels)
    return h


def jpeg_descriptor(nbytes: int, height: int, width: int, name: str = "jpeg") -> Header:
    """The descriptor of a JPEG input frame of ``nbytes`` bytes that decodes to ``height`` x
    ``width`` RGB pixels (§13.3.1)."""
    return descriptor(name, (height, width, 3), JPEG_DTYPE, 8, 1.0, 0, None, "raw", nbytes)


def scatter(frame_id: int, deadline_ms: float, submodels: Iterable[int], input_desc: Header) -> Header:
    """One frame's input (``input_desc``: the preprocessed tensor's descriptor or
    :func:`jpeg_descriptor`) for ``submodels`` of one worker; the frame goes as the one tensor frame."""
    return {
        "v": PROTOCOL_VERSION,
        "kind": Kind.SCATTER,
        "id": int(frame_id),
        "deadline_ms": P.wire_number(deadline_ms),
        "submodels": _ids(submodels),
        "tensors": [input_desc],
    }


def gather(
    frame_id: int,
    submodel: int,
    output_desc: Header,
    *,
    queue_us: float,
    decode_us: float,
    compute_us: float,
    batch_size: int,
    worker_us: float,
) -> Header:
    """One sub-model's features for one frame (``output_desc``: a raw float vector ``[D]``)."""
    return {
        "v": PROTOCOL_VERSION,
        "kind": Kind.GATHER,
        "id": int(frame_id),
        "submodel": int(submodel),
        "outputs": [output_desc],
        "timing": {
            "queue_us": round(float(queue_us), 1),
            "decode_us": round(float(decode_us), 1),
            "compute_us": round(float(compute_us), 1),
            "batch_size": int(batch_size),
            "worker_us": round(float(worker_us), 1),
        },
    }


def scatter_error(frame_id: int | None, code: ErrorCode | int, message: str, submodel: int | None = None) -> Header:
    """An ``error`` about a scatter: the whole frame (``submodel`` None) or one of its sub-models."""
    h = P.error(frame_id, code, message)
    if submodel is not None:
        h["submodel"] = int(submodel)
    return h


def fused_request(
    req_id: int,
    mode: int,
    submodels: Iterable[int],
    tensors: list[Header],
    *,
    deadline_ms: float | None = None,
) -> Header:
    """A fused request (feature ``"fused_requests"``): ``tensors[i]`` are the features of
    ``submodels[i]``, the sub-models present in this frame (always a full request)."""
    h = P.request(req_id, mode, tensors, deadline_ms=deadline_ms)
    h["submodels"] = _ids(submodels)
    return h


def fused_result(
    req_id: int,
    outputs: list[Header],
    used: Iterable[int],
    *,
    queue_us: float,
    compute_us: float,
    batch_size: int,
    server_us: float,
) -> Header:
    """A fused request's ``result``: the logits and ``used``, the sub-models the fusion used."""
    h = P.result(req_id, outputs, queue_us=queue_us, compute_us=compute_us, batch_size=batch_size, server_us=server_us)
    h["used"] = _ids(used)
    return h


# ---------------------------------------------------------------------------------------------
# Typed views


@dataclass(frozen=True)
class WorkerWelcome:
    """A worker's ``welcome``: the session's terms and the sub-models it holds."""

    terms: Welcome
    submodels: tuple[int, ...]

    @classmethod
    def from_header(cls, h: Header) -> WorkerWelcome:
        return cls(Welcome.from_header(h), tuple(h["submodels"]))

    def to_header(self) -> Header:
        w = self.terms
        return worker_welcome(
            w.bundle,
            w.server,
            self.submodels,
            credits=w.credits,
            limits=w.limits,
            heartbeat_ms=w.heartbeat_ms,
            codecs=w.codecs,
            bits=w.bits,
            features=w.features,
        )


@dataclass(frozen=True)
class Scatter:
    """A ``scatter``: frame id, relative deadline, the sub-models wanted and the input's descriptor."""

    frame_id: int
    deadline_ms: float
    submodels: tuple[int, ...]
    input: Header

    @property
    def is_jpeg(self) -> bool:
        """Whether the input is the encoded camera frame (else the preprocessed tensor)."""
        return self.input["dtype"] == JPEG_DTYPE

    @classmethod
    def from_header(cls, h: Header) -> Scatter:
        return cls(int(h["id"]), h["deadline_ms"], tuple(h["submodels"]), h["tensors"][0])

    def to_header(self) -> Header:
        return scatter(self.frame_id, self.deadline_ms, self.submodels, self.input)


@dataclass(frozen=True)
class GatherTimings:
    """The ``timing`` map of a ``gather``, in us."""

    queue_us: float
    decode_us: float
    compute_us: float
    worker_us: float
    batch_size: int

    @classmethod
    def from_header(cls, h: Header) -> GatherTimings:
        """From a whole ``gather`` header (the ``timing`` map inside it)."""
        t = h["timing"]
        return cls(
            queue_us=float(t["queue_us"]),
            decode_us=float(t["decode_us"]),
            compute_us=float(t["compute_us"]),
            worker_us=float(t["worker_us"]),
            batch_size=int(t["batch_size"]),
        )


@dataclass(frozen=True)
class Gather:
    """A ``gather``: one sub-model's features for one frame, and the worker's timings."""

    frame_id: int
    submodel: int
    output: Header
    timings: GatherTimings

    @classmethod
    def from_header(cls, h: Header) -> Gather:
        return cls(int(h["id"]), int(h["submodel"]), h["outputs"][0], GatherTimings.from_header(h))

    def to_header(self) -> Header:
        t = self.timings
        return gather(
            self.frame_id,
            self.submodel,
            self.output,
            queue_us=t.queue_us,
            decode_us=t.decode_us,
            compute_us=t.compute_us,
            batch_size=t.batch_size,
            worker_us=t.worker_us,
        )


@dataclass(frozen=True)
class ScatterErrorReply:
    """An ``error`` about a scatter: ``submodel`` None refuses the whole frame."""

    frame_id: int | None
    submodel: int | None
    code: ErrorCode
    message: str

    @classmethod
    def from_header(cls, h: Header) -> ScatterErrorReply:
        """An unknown code number (a later revision's) reads as INTERNAL, as in ErrorReply."""
        try:
            code = ErrorCode(h["code"])
        except ValueError:
            code = ErrorCode.INTERNAL
        return cls(h.get("id"), h.get("submodel"), code, h["message"])

    def to_header(self) -> Header:
        return scatter_error(self.frame_id, self.code, self.message, self.submodel)


@dataclass(frozen=True)
class FusedRequest:
    """A fused ``request``: which sub-models are present, and their feature descriptors in order."""

    req_id: int
    mode: int
    submodels: tuple[int, ...]
    tensors: tuple[Header, ...]
    deadline_ms: float | None = None

    @classmethod
    def from_header(cls, h: Header) -> FusedRequest:
        return cls(int(h["id"]), int(h["mode"]), tuple(h["submodels"]), tuple(h["tensors"]), h.get("deadline_ms"))

    def to_header(self) -> Header:
        return fused_request(self.req_id, self.mode, self.submodels, list(self.tensors), deadline_ms=self.deadline_ms)
