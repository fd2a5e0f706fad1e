"""Wire protocol v1 (revision 1.2): message kinds, header schemas, validation (docs/PROTOCOL.md is normative).

Every message is one ZeroMQ multipart message: frame 0 is a msgpack map (the header), frames
1..n are raw tensor payloads described, in order, by the header's descriptor list (``tensors`` in
a request, ``outputs`` in a result). This module builds headers and parses incoming messages;
it never touches sockets (see :mod:`edgesplit.wire.transport`) and never uses pickle. The
per-kind header checks are in :mod:`edgesplit.wire.validate`, the versions, kinds and
:class:`Limits` in :mod:`edgesplit.wire.kinds`; their public names are importable from here too.

Validation is strict and total: the header's size is checked before it is unpacked, msgpack runs
with length limits, every field's type and range is checked, each descriptor is checked against
its frame (declared ``nbytes`` == actual length <= the frame limit). Anything off raises
:class:`ProtocolError` with the code the peer must be told. Unknown *keys* are ignored (so later
minor revisions can add optional fields); unknown *kinds* are MALFORMED; reserved kinds are
UNSUPPORTED.

Revision 1.1 adds **compact requests**: a ``request`` without ``tensors`` carries one frame whose
descriptor is implied by the bundle mode (:func:`compact_descriptor`); a server that accepts them
lists ``"compact_requests"`` in ``welcome.features``, and an agent sends one only then.

Revision 1.2 defines ``scatter`` and ``gather`` (ED-ViT, docs/PROTOCOL.md §13) behind features:
``parse(parts, limits, features=...)`` validates them (:mod:`edgesplit.wire.scatter`), and their
builders are in :mod:`edgesplit.wire.scatter_messages`. Without ``features``, parse is v1.1's.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from typing import Any, Collection, Iterable, Sequence

import msgpack

from .ans_codec import ANS_CODEC
from .ans_codec import descriptor as ans_descriptor
from .codec import CODECS, PACKED_BITS, descriptor, packed_nbytes
from .errors import ErrorCode, ProtocolError
from .errors import is_int as _is_int
from .kinds import (
    DEFAULT_LIMITS,
    FEATURE_COMPACT_REQUESTS,
    FEATURE_FUSED_REQUESTS,
    FEATURE_SCATTER,
    FEATURE_SCATTER_JPEG,
    KINDS,
    PROTOCOL_REVISION,
    PROTOCOL_VERSION,
    RESERVED_KINDS,
    SERVER_FEATURES,
    SUPPORTED_VERSIONS,
    Kind,
    Limits,
)
from .scatter import validators_for
from .validate import (
    UINT64_MAX,
    VALIDATORS,
    unpack_header,
)

# re-exported: callers import the protocol's vocabulary (edgesplit.wire.kinds) from here
__all__ = [
    "DEFAULT_LIMITS",
    "FEATURE_COMPACT_REQUESTS",
    "FEATURE_FUSED_REQUESTS",
    "FEATURE_SCATTER",
    "FEATURE_SCATTER_JPEG",
    "KINDS",
    "PROTOCOL_REVISION",
    "SERVER_FEATURES",
    "unpack_header",
]


@dataclass
class Message:
    """A parsed, validated message: its header map and its tensor frames (buffers)."""

    kind: str
    header: dict[str, Any]
    frames: list

    @property
    def id(self) -> int | None:
        return self.header.get("id")


# ---------------------------------------------------------------------------------------------
# Building messages (headers are plain dicts; pack() turns header + frames into multipart parts)


_tls = threading.local()


def packer() -> msgpack.Packer:
    """This thread's msgpack packer (reused: building one per message costs more than packing a
    header; packers are not thread-safe, hence one per thread). bin type on, as packb's default."""
    try:
        return _tls.packer
    except AttributeError:
        p = _tls.packer = msgpack.Packer(use_bin_type=True)
        return p


def pack_header(header: dict[str, Any]) -> bytes:
    """One header map -> its msgpack bytes (frame 0)."""
    try:
        return _tls.packer.pack(header)
    except AttributeError:
        return packer().pack(header)


def pack(header: dict[str, Any], frames: Sequence = ()) -> list:
    """Header map + tensor payloads -> the multipart parts to send."""
    return [pack_header(header), *frames]


def hello(
    bundle: str, agent: str, *, codecs: Iterable[str] = CODECS, bits: Iterable[int] = PACKED_BITS, max_inflight: int = 8
) -> dict[str, Any]:
    return {
        "v": PROTOCOL_VERSION,
        "kind": Kind.HELLO,
        "bundle": bundle,
        "agent": agent,
        "caps": {"codecs": list(codecs), "bits": [int(b) for b in bits], "max_inflight": int(max_inflight)},
    }


def welcome(
    bundle: str,
    server: str,
    *,
    credits: int,
    limits: Limits,
    heartbeat_ms: int,
    codecs: Iterable[str],
    bits: Iterable[int] = PACKED_BITS,
    features: Iterable[str] = (),
) -> dict[str, Any]:
    """``features`` (v1.1): what this server accepts beyond v1.0, e.g. :data:`SERVER_FEATURES`;
    the key is left out when there are none (a v1.0 welcome)."""
    h = {
        "v": PROTOCOL_VERSION,
        "kind": Kind.WELCOME,
        "bundle": bundle,
        "server": server,
        "credits": int(credits),
        "limits": limits.to_wire(),
        "heartbeat_ms": int(heartbeat_ms),
        "codecs": list(codecs),
        "bits": [int(b) for b in bits],
    }
    features = [str(f) for f in features]
    if features:
        h["features"] = features
    return h


def request(
    req_id: int,
    mode: int,
    tensors: list[dict[str, Any]] | None,
    *,
    deadline_ms: float | None = None,
    t_send_ns: int | None = None,
) -> dict[str, Any]:
    """A request header. ``tensors=None`` makes a **compact request** (v1.1): no ``tensors`` key,
    one frame encoded exactly as :func:`compact_descriptor` says. Send one only to a server that
    listed ``"compact_requests"`` in its welcome."""
    h: dict[str, Any] = {"v": PROTOCOL_VERSION, "kind": Kind.REQUEST, "id": int(req_id), "mode": int(mode)}
    if deadline_ms is not None:
        h["deadline_ms"] = deadline_ms
    if t_send_ns is not None:
        h["t_send_ns"] = int(t_send_ns)
    if tensors is not None:
        h["tensors"] = tensors
    return h


def compact_descriptor(name: str, wire_shape: Sequence[int], mode: Any) -> dict[str, Any]:
    """The descriptor a compact request's frame implicitly has (v1.1, docs/PROTOCOL.md §3.3.1):
    the bundle's wire tensor ``name``, one frame ``[mode.channels, h, w]`` (``h, w`` from the
    wire shape ``[C, h, w]``), packed ``uint8`` codes at the mode's ``bits``, ``scale`` and
    ``zero_point``, codec ``raw``, ``nbytes = ceil(channels*h*w*bits/8)``. ``mode`` has the
    attributes of :class:`edgesplit.bundle.Mode` (channels, bits, scale, zero_point)."""
    c, h, w = int(mode.channels), int(wire_shape[-2]), int(wire_shape[-1])
    if getattr(mode, "codec", "raw") == ANS_CODEC:  # §4.4: variable length; nbytes is the frame's, None here
        return dict(ans_descriptor(name, (c, h, w), float(mode.scale), 0), nbytes=None)
    bits = int(mode.bits)
    return descriptor(
        name,
        (c, h, w),
        "uint8",
        bits,
        float(mode.scale),
        int(mode.zero_point),
        c,
        "raw",
        packed_nbytes(c * h * w, bits),
    )


def wire_number(x: float | int | None) -> float | int | None:
    """A number as the fewest msgpack bytes carry it: an integral float becomes an int (1 byte
    for 0..127 instead of 9), which readers accept wherever a number is allowed."""
    if type(x) is float and x.is_integer() and -(1 << 63) <= x < (1 << 63):
        return int(x)
    return x


def result(
    req_id: int,
    outputs: list[dict[str, Any]],
    *,
    queue_us: float,
    compute_us: float,
    batch_size: int,
    server_us: float,
    t_send_ns: int | None = None,
) -> dict[str, Any]:
    h: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "kind": Kind.RESULT,
        "id": int(req_id),
        "outputs": outputs,
        "timing": {
            "queue_us": round(float(queue_us), 1),
            "compute_us": round(float(compute_us), 1),
            "batch_size": int(batch_size),
            "server_us": round(float(server_us), 1),
        },
    }
    if t_send_ns is not None:
        h["t_send_ns"] = int(t_send_ns)
    return h


class ResultPacker:
    """Packs ``result`` headers for the server's hot path: the byte string is assembled from
    pre-packed constant pieces (map header, fixed keys, the output descriptors, which are the same
    for every reply of a given shape) and the few values that change, instead of building and
    packing the whole map each time, which is most of the cost of a small reply. The bytes are
    exactly ``pack_header(result(...))``. One instance per thread (it holds a msgpack Packer)."""

    def __init__(self) -> None:
        self._p = msgpack.Packer(use_bin_type=True)
        self._outputs: dict[int, bytes] = {}  # id(outputs list) -> packed array (callers cache the lists)
        self._keep: dict[int, list] = {}  # keeps those lists alive so their ids stay unique
        pk = self._p.pack
        self._head = {
            n: pk_map_header(n) + pk("v") + pk(PROTOCOL_VERSION) + pk("kind") + pk(Kind.RESULT) + pk("id")
            for n in (5, 6)
        }
        self._k_outputs = pk("outputs")
        # timing: floats as float64 (what packb writes for a Python float) through two struct
        # calls, batch_size through the packer: the bytes equal packb(result(...)).
        a, b, c, d = (
            pk("timing") + pk_map_header(4) + pk("queue_us"),
            pk("compute_us"),
            pk("batch_size"),
            pk("server_us"),
        )
        self._t1 = struct.Struct(f">{len(a)}sBd{len(b)}sBd{len(c)}s")
        self._t2 = struct.Struct(f">{len(d)}sBd")
        self._tk = (a, b, c, d)
        self._k_tsend = pk("t_send_ns")

    def pack(
        self,
        req_id: int,
        outputs: list[dict[str, Any]],
        *,
        queue_us: float,
        compute_us: float,
        batch_size: int,
        server_us: float,
        t_send_ns: int | None = None,
    ) -> bytes:
        """``pack_header(result(...))`` with the same arguments, byte for byte. ``outputs`` should
        be a list the caller reuses (its packed form is cached by identity)."""
        key = id(outputs)
        packed_outputs = self._outputs.get(key)
        if packed_outputs is None or self._keep[key] is not outputs:
            if len(self._outputs) >= 256:
                self._outputs.clear()
                self._keep.clear()
            packed_outputs = self._outputs[key] = self._p.pack(outputs)
            self._keep[key] = outputs
        pk = self._p.pack
        a, b, c, d = self._tk
        t1 = self._t1.pack(a, 0xCB, round(float(queue_us), 1), b, 0xCB, round(float(compute_us), 1), c)
        t2 = self._t2.pack(d, 0xCB, round(float(server_us), 1))
        if t_send_ns is None:
            return b"".join(
                (self._head[5], pk(int(req_id)), self._k_outputs, packed_outputs, t1, pk(int(batch_size)), t2)
            )
        return b"".join(
            (
                self._head[6],
                pk(int(req_id)),
                self._k_outputs,
                packed_outputs,
                t1,
                pk(int(batch_size)),
                t2,
                self._k_tsend,
                pk(int(t_send_ns)),
            )
        )


def pk_map_header(n: int) -> bytes:
    """The msgpack header of a map with ``n`` entries."""
    if n < 16:
        return bytes([0x80 | n])
    if n < 1 << 16:
        return b"\xde" + n.to_bytes(2, "big")
    return b"\xdf" + n.to_bytes(4, "big")


def error(req_id: int | None, code: ErrorCode | int, message: str) -> dict[str, Any]:
    code = ErrorCode(code)
    return {
        "v": PROTOCOL_VERSION,
        "kind": Kind.ERROR,
        "id": req_id,
        "code": int(code),
        "name": code.name,
        "message": str(message)[:1024],
    }


def ping(nonce: int, t_ns: int | None = None) -> dict[str, Any]:
    h = {"v": PROTOCOL_VERSION, "kind": Kind.PING, "nonce": int(nonce)}
    if t_ns is not None:
        h["t_ns"] = int(t_ns)
    return h


def pong(nonce: int, t_ns: int | None = None) -> dict[str, Any]:
    h = {"v": PROTOCOL_VERSION, "kind": Kind.PONG, "nonce": int(nonce)}
    if t_ns is not None:
        h["t_ns"] = int(t_ns)
    return h


def bye(reason: str = "") -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "kind": Kind.BYE, "reason": str(reason)[:1024]}


# ---------------------------------------------------------------------------------------------
# Parsing: the checks every message gets, then its kind's validator (edgesplit.wire.validate)

M = ErrorCode.MALFORMED


def parse(parts: Sequence, limits: Limits = DEFAULT_LIMITS, features: Collection[str] = ()) -> Message:
    """Validate one multipart message (without a ROUTER identity frame) and return it.
    ``features``: the optional features (v1.2, e.g. ``("scatter",)``) this receiver takes part in,
    whose kinds and keys are then validated too; without them a reserved kind is UNSUPPORTED."""
    if not parts:
        raise ProtocolError(M, "empty message")
    frames = list(parts[1:])
    h = unpack_header(parts[0], limits)
    rid: Any = h.get("id")  # not yet validated: any msgpack value
    if type(rid) is not int or not 0 <= rid <= UINT64_MAX:
        rid = rid if _is_int(rid) and 0 <= rid <= UINT64_MAX else None
    v = h.get("v")
    if type(v) is not int or v != PROTOCOL_VERSION:
        if not _is_int(v):
            raise ProtocolError(M, "header lacks an integer protocol version 'v'", rid)
        if v not in SUPPORTED_VERSIONS:
            raise ProtocolError(
                ErrorCode.UNSUPPORTED_VERSION,
                f"protocol version {v} is not supported (supported: {list(SUPPORTED_VERSIONS)})",
                rid,
            )
    kind = h.get("kind")
    if type(kind) is not str:
        raise ProtocolError(M, "header lacks a string 'kind'", rid)
    if len(frames) > limits.max_frames:
        raise ProtocolError(
            ErrorCode.TOO_LARGE, f"{len(frames)} tensor frames, over the limit of {limits.max_frames}", rid
        )
    validator = (validators_for(features) if features else VALIDATORS).get(kind)
    if validator is None:
        if kind in RESERVED_KINDS:
            raise ProtocolError(
                ErrorCode.UNSUPPORTED,
                f"message kind '{kind}' is reserved and not accepted here (this peer offers no feature defining it)",
                rid,
            )
        raise ProtocolError(M, f"unknown message kind {kind[:64]!r}", rid)
    validator(h, frames, limits)
    return Message(kind, h, frames)
