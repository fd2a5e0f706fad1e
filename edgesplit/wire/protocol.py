"""Wire protocol v1 (revision 1.1): message kinds, header schemas, validation (docs/PROTOCOL.md is normative).

Every message is one ZeroMQ multipart message: frame 0 is a msgpack map (the header), frames
1..n are raw tensor payloads described, in order, by the header's descriptor list (``tensors`` in
a request, ``outputs`` in a result). This module builds headers and validates incoming messages;
it never touches sockets (see :mod:`edgesplit.wire.transport`) and never uses pickle.

Validation is strict and total: the header's size is checked before it is unpacked, msgpack runs
with length limits, every field's type and range is checked, each descriptor is checked against
its frame (declared ``nbytes`` == actual length <= the frame limit). Anything off raises
:class:`ProtocolError` with the code the peer must be told. Unknown *keys* are ignored (so later
minor revisions can add optional fields); unknown *kinds* are MALFORMED; reserved kinds are
UNSUPPORTED.

Revision 1.1 adds **compact requests**: a ``request`` without ``tensors`` carries one frame whose
descriptor is implied by the bundle mode (:func:`compact_descriptor`); a server that accepts them
lists ``"compact_requests"`` in ``welcome.features``, and an agent sends one only then.
"""

from __future__ import annotations

import math
import struct
import threading
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

import msgpack

from .codec import CODECS, PACKED_BITS, check_descriptor, descriptor, packed_nbytes
from .errors import ErrorCode, ProtocolError, WireError, is_int as _is_int, is_num as _is_num

PROTOCOL_VERSION = 1          # the major version: the "v" of every header
PROTOCOL_REVISION = (1, 1)    # major.minor of docs/PROTOCOL.md; minor revisions add optional keys only
SUPPORTED_VERSIONS = (1,)
# Features a server may list in welcome.features (v1.1). A peer relies on one only when advertised.
FEATURE_COMPACT_REQUESTS = "compact_requests"
SERVER_FEATURES = (FEATURE_COMPACT_REQUESTS,)
UINT64_MAX = (1 << 64) - 1
_MODE_MAX = (1 << 31) - 1


class Kind:
    HELLO = "hello"
    WELCOME = "welcome"
    REQUEST = "request"
    RESULT = "result"
    ERROR = "error"
    PING = "ping"
    PONG = "pong"
    BYE = "bye"


KINDS = (Kind.HELLO, Kind.WELCOME, Kind.REQUEST, Kind.RESULT, Kind.ERROR, Kind.PING, Kind.PONG, Kind.BYE)
# Reserved for later revisions (documented, not implemented): ED-ViT scatter/gather, SFPrompt split training.
RESERVED_KINDS = ("scatter", "gather", "train_fwd", "train_bwd", "model_update")


@dataclass(frozen=True)
class Limits:
    """What a receiver accepts. The server advertises its limits in ``welcome``."""

    max_header_bytes: int = 64 * 1024  # frame 0, checked before unpacking
    max_frame_bytes: int = 8 << 20     # each tensor frame, and each tensor after zstd decompression
    max_frames: int = 16               # tensor frames per message
    max_batch: int = 256               # leading-axis rows in one request tensor

    def to_wire(self) -> dict[str, int]:
        return asdict(self)


DEFAULT_LIMITS = Limits()


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


def hello(bundle: str, agent: str, *, codecs: Iterable[str] = CODECS, bits: Iterable[int] = PACKED_BITS,
          max_inflight: int = 8) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "kind": Kind.HELLO, "bundle": bundle, "agent": agent,
            "caps": {"codecs": list(codecs), "bits": [int(b) for b in bits], "max_inflight": int(max_inflight)}}


def welcome(bundle: str, server: str, *, credits: int, limits: Limits, heartbeat_ms: int,
            codecs: Iterable[str], bits: Iterable[int] = PACKED_BITS, features: Iterable[str] = ()) -> dict[str, Any]:
    """``features`` (v1.1): what this server accepts beyond v1.0, e.g. :data:`SERVER_FEATURES`;
    the key is left out when there are none (a v1.0 welcome)."""
    h = {"v": PROTOCOL_VERSION, "kind": Kind.WELCOME, "bundle": bundle, "server": server,
         "credits": int(credits), "limits": limits.to_wire(), "heartbeat_ms": int(heartbeat_ms),
         "codecs": list(codecs), "bits": [int(b) for b in bits]}
    features = [str(f) for f in features]
    if features:
        h["features"] = features
    return h


def request(req_id: int, mode: int, tensors: list[dict[str, Any]] | None, *, deadline_ms: float | None = None,
            t_send_ns: int | None = None) -> dict[str, Any]:
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
    bits = int(mode.bits)
    return descriptor(name, (c, h, w), "uint8", bits, float(mode.scale), int(mode.zero_point), c, "raw",
                      packed_nbytes(c * h * w, bits))


def wire_number(x: float | int | None) -> float | int | None:
    """A number as the fewest msgpack bytes carry it: an integral float becomes an int (1 byte
    for 0..127 instead of 9), which readers accept wherever a number is allowed."""
    if type(x) is float and x.is_integer() and -(1 << 63) <= x < (1 << 63):
        return int(x)
    return x


def result(req_id: int, outputs: list[dict[str, Any]], *, queue_us: float, compute_us: float, batch_size: int,
           server_us: float, t_send_ns: int | None = None) -> dict[str, Any]:
    h: dict[str, Any] = {"v": PROTOCOL_VERSION, "kind": Kind.RESULT, "id": int(req_id), "outputs": outputs,
                         "timing": {"queue_us": round(float(queue_us), 1), "compute_us": round(float(compute_us), 1),
                                    "batch_size": int(batch_size), "server_us": round(float(server_us), 1)}}
    if t_send_ns is not None:
        h["t_send_ns"] = int(t_send_ns)
    return h


class ResultPacker:
    """Packs ``result`` headers for the server's hot path: the byte string is assembled from
    pre-packed constant pieces (map header, fixed keys, the output descriptors, which are the same
    for every reply of a given shape) and the few values that change, instead of building and
    packing the whole map each time (about 3 us instead of 5 on the CI box). The bytes are exactly
    ``pack_header(result(...))``. One instance per thread (it holds a msgpack Packer)."""

    def __init__(self) -> None:
        self._p = msgpack.Packer(use_bin_type=True)
        self._outputs: dict[int, bytes] = {}  # id(outputs list) -> packed array (callers cache the lists)
        self._keep: dict[int, list] = {}       # keeps those lists alive so their ids stay unique
        pk = self._p.pack
        self._head = {n: pk_map_header(n) + pk("v") + pk(PROTOCOL_VERSION) + pk("kind") + pk(Kind.RESULT) + pk("id")
                      for n in (5, 6)}
        self._k_outputs = pk("outputs")
        # timing: floats as float64 (what packb writes for a Python float) through two struct
        # calls, batch_size through the packer: the bytes equal packb(result(...)).
        a, b, c, d = (pk("timing") + pk_map_header(4) + pk("queue_us"), pk("compute_us"), pk("batch_size"), pk("server_us"))
        self._t1 = struct.Struct(f">{len(a)}sBd{len(b)}sBd{len(c)}s")
        self._t2 = struct.Struct(f">{len(d)}sBd")
        self._tk = (a, b, c, d)
        self._k_tsend = pk("t_send_ns")

    def pack(self, req_id: int, outputs: list[dict[str, Any]], *, queue_us: float, compute_us: float,
             batch_size: int, server_us: float, t_send_ns: int | None = None) -> bytes:
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
            return b"".join((self._head[5], pk(int(req_id)), self._k_outputs, packed_outputs, t1, pk(int(batch_size)), t2))
        return b"".join((self._head[6], pk(int(req_id)), self._k_outputs, packed_outputs, t1, pk(int(batch_size)), t2,
                         self._k_tsend, pk(int(t_send_ns))))


def pk_map_header(n: int) -> bytes:
    """The msgpack header of a map with ``n`` entries."""
    if n < 16:
        return bytes([0x80 | n])
    if n < 1 << 16:
        return b"\xde" + n.to_bytes(2, "big")
    return b"\xdf" + n.to_bytes(4, "big")


def error(req_id: int | None, code: ErrorCode | int, message: str) -> dict[str, Any]:
    code = ErrorCode(code)
    return {"v": PROTOCOL_VERSION, "kind": Kind.ERROR, "id": req_id, "code": int(code), "name": code.name,
            "message": str(message)[:1024]}


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
# Validation helpers

M = ErrorCode.MALFORMED



def _get(h: dict, key: str, kind: str, rid: int | None = None) -> Any:
    try:
        return h[key]
    except KeyError:
        raise ProtocolError(M, f"{kind}: missing field '{key}'", rid) from None


def _str(h: dict, key: str, kind: str, max_len: int = 256, rid: int | None = None, optional: bool = False) -> str | None:
    if optional and h.get(key) is None:
        return None
    v = _get(h, key, kind, rid)
    if not isinstance(v, str) or len(v) > max_len:
        raise ProtocolError(M, f"{kind}: '{key}' must be a string of at most {max_len} characters", rid)
    return v


def _int(h: dict, key: str, kind: str, lo: int = 0, hi: int = UINT64_MAX, rid: int | None = None,
         optional: bool = False) -> int | None:
    if optional and h.get(key) is None:
        return None
    v = _get(h, key, kind, rid)
    if not _is_int(v) or not lo <= v <= hi:
        raise ProtocolError(M, f"{kind}: '{key}' must be an integer in [{lo}, {hi}], got {v!r}", rid)
    return v


def _num(h: dict, key: str, kind: str, lo: float = 0.0, rid: int | None = None, optional: bool = False) -> float | None:
    if optional and h.get(key) is None:
        return None
    v = _get(h, key, kind, rid)
    if not _is_num(v) or v < lo:
        raise ProtocolError(M, f"{kind}: '{key}' must be a finite number >= {lo}, got {v!r}", rid)
    return v


def _map(h: dict, key: str, kind: str, rid: int | None = None) -> dict:
    v = _get(h, key, kind, rid)
    if not isinstance(v, dict):
        raise ProtocolError(M, f"{kind}: '{key}' must be a map", rid)
    return v


def _list(h: dict, key: str, kind: str, item: type, max_len: int = 64, rid: int | None = None) -> list:
    v = _get(h, key, kind, rid)
    if not isinstance(v, list) or len(v) > max_len or not all(isinstance(x, item) and not isinstance(x, bool) for x in v):
        raise ProtocolError(M, f"{kind}: '{key}' must be a list of at most {max_len} {item.__name__} values", rid)
    return v


def _no_frames(msg_kind: str, frames: list, rid: int | None = None) -> None:
    if frames:
        raise ProtocolError(M, f"{msg_kind}: carries {len(frames)} tensor frames, expected none", rid)


def _descriptors(h: dict, key: str, kind: str, frames: list, limits: Limits, rid: int | None) -> list[dict]:
    descs = _get(h, key, kind, rid)
    if type(descs) is not list:
        raise ProtocolError(M, f"{kind}: '{key}' must be a list of tensor descriptors", rid)
    if len(descs) != len(frames):
        raise ProtocolError(M, f"{kind}: {len(descs)} tensor descriptors but {len(frames)} tensor frames", rid)
    max_frame = limits.max_frame_bytes
    for i, (d, f) in enumerate(zip(descs, frames)):
        n = len(f) if type(f) is bytes else memoryview(f).nbytes
        if n > max_frame:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"{kind}: frame {i + 1} is {n} bytes, over the limit of {max_frame}", rid)
        try:
            check_descriptor(d, n, max_bytes=max_frame)
        except WireError as e:
            raise ProtocolError(e.code, f"{kind}: tensor {i}: {e.message}", rid) from None
    return descs


# ---------------------------------------------------------------------------------------------
# Per-kind validators: (header, frames, limits) -> None, raising ProtocolError


def _v_hello(h: dict, frames: list, limits: Limits) -> None:
    _no_frames("hello", frames)
    _str(h, "bundle", "hello", 128)
    _str(h, "agent", "hello", 256)
    caps = _map(h, "caps", "hello")
    _list(caps, "codecs", "hello.caps", str, 16)
    _list(caps, "bits", "hello.caps", int, 16)
    _int(caps, "max_inflight", "hello.caps", 1, 1 << 20)


def _v_welcome(h: dict, frames: list, limits: Limits) -> None:
    _no_frames("welcome", frames)
    _str(h, "bundle", "welcome", 128)
    _str(h, "server", "welcome", 256)
    _int(h, "credits", "welcome", 1, 1 << 20)
    lim = _map(h, "limits", "welcome")
    for k in ("max_header_bytes", "max_frame_bytes", "max_frames", "max_batch"):
        _int(lim, k, "welcome.limits", 1, 1 << 40)
    _int(h, "heartbeat_ms", "welcome", 0, 1 << 31)
    _list(h, "codecs", "welcome", str, 16)
    _list(h, "bits", "welcome", int, 16)
    if h.get("features") is not None:  # v1.1, optional
        _list(h, "features", "welcome", str, 32)


def _v_request(h: dict, frames: list, limits: Limits) -> None:
    # Hot path: exact-type tests inline; the generic helpers run only to raise (or to accept an
    # int subclass), so the error messages and codes are theirs.
    rid = h.get("id")
    if type(rid) is not int or not 0 <= rid <= UINT64_MAX:
        rid = _int(h, "id", "request")
    mode = h.get("mode")
    if type(mode) is not int or not 0 <= mode <= _MODE_MAX:
        _int(h, "mode", "request", 0, _MODE_MAX, rid)
    dl = h.get("deadline_ms")
    if dl is not None and not ((type(dl) is float or type(dl) is int) and 0.0 <= dl < math.inf):
        _num(h, "deadline_ms", "request", 0.0, rid, optional=True)
    ts = h.get("t_send_ns")
    if ts is not None and not (type(ts) is int and 0 <= ts <= UINT64_MAX):
        _int(h, "t_send_ns", "request", 0, UINT64_MAX, rid, optional=True)
    if not frames:
        raise ProtocolError(M, "request: carries no tensor frame", rid)
    if h.get("tensors") is None:
        # v1.1 compact request: exactly one frame, its descriptor implied by the bundle mode. Its
        # length is checked against that descriptor by the server, which knows the bundle.
        if len(frames) != 1:
            raise ProtocolError(M, f"request: a compact request (no 'tensors') carries exactly one frame, got {len(frames)}", rid)
        f = frames[0]
        n = len(f) if type(f) is bytes else memoryview(f).nbytes
        if n > limits.max_frame_bytes:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"request: frame 1 is {n} bytes, over the limit of {limits.max_frame_bytes}", rid)
        return
    descs = _descriptors(h, "tensors", "request", frames, limits, rid)
    for d in descs:
        shape = d["shape"]
        if len(shape) == 4 and shape[0] > limits.max_batch:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"request: {shape[0]} rows, over max_batch={limits.max_batch}", rid)


def _v_result(h: dict, frames: list, limits: Limits) -> None:
    rid = h.get("id")
    if type(rid) is not int or not 0 <= rid <= UINT64_MAX:
        rid = _int(h, "id", "result")
    _descriptors(h, "outputs", "result", frames, limits, rid)
    t = h.get("timing")
    if type(t) is not dict:
        t = _map(h, "timing", "result", rid)
    for k in ("queue_us", "compute_us", "server_us"):
        v = t.get(k)
        if not ((type(v) is float or type(v) is int) and 0.0 <= v < math.inf):
            _num(t, k, "result.timing", 0.0, rid)
    bs = t.get("batch_size")
    if type(bs) is not int or not 1 <= bs <= 1 << 31:
        _int(t, "batch_size", "result.timing", 1, 1 << 31, rid)
    ts = h.get("t_send_ns")
    if ts is not None and not (type(ts) is int and 0 <= ts <= UINT64_MAX):
        _int(h, "t_send_ns", "result", 0, UINT64_MAX, rid, optional=True)


def _v_error(h: dict, frames: list, limits: Limits) -> None:
    rid = _int(h, "id", "error", optional=True)
    _no_frames("error", frames, rid)
    _int(h, "code", "error", 0, 1 << 31, rid)
    _str(h, "name", "error", 64, rid)
    _str(h, "message", "error", 4096, rid)


def _v_ping(h: dict, frames: list, limits: Limits) -> None:
    _no_frames(h["kind"], frames)
    _int(h, "nonce", h["kind"])
    _int(h, "t_ns", h["kind"], 0, UINT64_MAX, optional=True)


def _v_bye(h: dict, frames: list, limits: Limits) -> None:
    _no_frames("bye", frames)
    _str(h, "reason", "bye", 4096, optional=True)


_VALIDATORS = {
    Kind.HELLO: _v_hello, Kind.WELCOME: _v_welcome, Kind.REQUEST: _v_request, Kind.RESULT: _v_result,
    Kind.ERROR: _v_error, Kind.PING: _v_ping, Kind.PONG: _v_ping, Kind.BYE: _v_bye,
}


def unpack_header(raw, limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    """Frame 0 -> header map. Size checked before unpacking; msgpack limits bound every container
    (strings are bounded by msgpack's default, the frame's own length)."""
    n = len(raw) if type(raw) is bytes else memoryview(raw).nbytes
    if n > limits.max_header_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"header is {n} bytes, over the limit of {limits.max_header_bytes}")
    if n == 0:
        raise ProtocolError(M, "empty header frame")
    try:
        # raw=False, strict_map_key=True, use_list=True are msgpack's defaults; every keyword
        # costs on each call, so only the limits are passed.
        h = msgpack.unpackb(raw, max_bin_len=0, max_ext_len=0, max_array_len=4096, max_map_len=64)
    except Exception as e:  # msgpack raises ValueError, FormatError, StackError, ExtraData, ...
        raise ProtocolError(M, f"header is not a valid msgpack map: {type(e).__name__}: {e}") from None
    if type(h) is not dict:
        raise ProtocolError(M, f"header must be a msgpack map, got {type(h).__name__}")
    return h


def parse(parts: Sequence, limits: Limits = DEFAULT_LIMITS) -> Message:
    """Validate one multipart message (without a ROUTER identity frame) and return it."""
    if not parts:
        raise ProtocolError(M, "empty message")
    frames = list(parts[1:])
    h = unpack_header(parts[0], limits)
    rid = h.get("id")
    if type(rid) is not int or not 0 <= rid <= UINT64_MAX:
        rid = rid if _is_int(rid) and 0 <= rid <= UINT64_MAX else None
    v = h.get("v")
    if type(v) is not int or v != PROTOCOL_VERSION:
        if not _is_int(v):
            raise ProtocolError(M, "header lacks an integer protocol version 'v'", rid)
        if v not in SUPPORTED_VERSIONS:
            raise ProtocolError(ErrorCode.UNSUPPORTED_VERSION,
                                f"protocol version {v} is not supported (supported: {list(SUPPORTED_VERSIONS)})", rid)
    kind = h.get("kind")
    if type(kind) is not str:
        raise ProtocolError(M, "header lacks a string 'kind'", rid)
    if len(frames) > limits.max_frames:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"{len(frames)} tensor frames, over the limit of {limits.max_frames}", rid)
    validator = _VALIDATORS.get(kind)
    if validator is None:
        if kind in RESERVED_KINDS:
            raise ProtocolError(ErrorCode.UNSUPPORTED, f"message kind '{kind}' is reserved and not implemented in v1", rid)
        raise ProtocolError(M, f"unknown message kind {kind[:64]!r}", rid)
    validator(h, frames, limits)
    return Message(kind, h, frames)
