"""Header validation of wire protocol v1: frame 0 unpacked within bounds, the field checks, and
one validator per message kind (:data:`VALIDATORS`).

Each validator takes ``(header, frames, limits)`` and returns nothing or raises
:class:`ProtocolError` with the code the peer must be told (docs/PROTOCOL.md §3, §5). The checks
common to every message (``v``, ``kind``, frame count) are in
:func:`edgesplit.wire.protocol.parse`, which calls these; this module does not import it back.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack

from .codec import check_descriptor
from .errors import ErrorCode, ProtocolError, WireError
from .errors import is_int as _is_int
from .errors import is_num as _is_num
from .kinds import DEFAULT_LIMITS, Kind, Limits

UINT64_MAX = (1 << 64) - 1
MODE_MAX = (1 << 31) - 1  # a mode id is a non-negative int32
M = ErrorCode.MALFORMED


# ---------------------------------------------------------------------------------------------
# Field checks


def _get(h: dict, key: str, kind: str, rid: int | None = None) -> Any:
    try:
        return h[key]
    except KeyError:
        raise ProtocolError(M, f"{kind}: missing field '{key}'", rid) from None


def _str(
    h: dict, key: str, kind: str, max_len: int = 256, rid: int | None = None, optional: bool = False
) -> str | None:
    if optional and h.get(key) is None:
        return None
    v = _get(h, key, kind, rid)
    if not isinstance(v, str) or len(v) > max_len:
        raise ProtocolError(M, f"{kind}: '{key}' must be a string of at most {max_len} characters", rid)
    return v


def _int(
    h: dict, key: str, kind: str, lo: int = 0, hi: int = UINT64_MAX, rid: int | None = None, optional: bool = False
) -> int | None:
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
    if (
        not isinstance(v, list)
        or len(v) > max_len
        or not all(isinstance(x, item) and not isinstance(x, bool) for x in v)
    ):
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
            raise ProtocolError(
                ErrorCode.TOO_LARGE, f"{kind}: frame {i + 1} is {n} bytes, over the limit of {max_frame}", rid
            )
        try:
            check_descriptor(d, n, max_bytes=max_frame)
        except WireError as e:
            raise ProtocolError(e.code, f"{kind}: tensor {i}: {e.message}", rid) from None
    return descs


# ---------------------------------------------------------------------------------------------
# Per-kind validators: (header, frames, limits) -> None, raising ProtocolError


def check_hello(h: dict, frames: list, limits: Limits) -> None:
    _no_frames("hello", frames)
    _str(h, "bundle", "hello", 128)
    _str(h, "agent", "hello", 256)
    caps = _map(h, "caps", "hello")
    _list(caps, "codecs", "hello.caps", str, 16)
    _list(caps, "bits", "hello.caps", int, 16)
    _int(caps, "max_inflight", "hello.caps", 1, 1 << 20)


def check_welcome(h: dict, frames: list, limits: Limits) -> None:
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


def check_request(h: dict, frames: list, limits: Limits) -> None:
    # Hot path: exact-type tests inline; the generic helpers run only to raise (or to accept an
    # int subclass), so the error messages and codes are theirs.
    rid = h.get("id")
    if type(rid) is not int or not 0 <= rid <= UINT64_MAX:
        rid = _int(h, "id", "request")
    mode = h.get("mode")
    if type(mode) is not int or not 0 <= mode <= MODE_MAX:
        _int(h, "mode", "request", 0, MODE_MAX, rid)
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
            raise ProtocolError(
                M, f"request: a compact request (no 'tensors') carries exactly one frame, got {len(frames)}", rid
            )
        f = frames[0]
        n = len(f) if type(f) is bytes else memoryview(f).nbytes
        if n > limits.max_frame_bytes:
            raise ProtocolError(
                ErrorCode.TOO_LARGE, f"request: frame 1 is {n} bytes, over the limit of {limits.max_frame_bytes}", rid
            )
        return
    descs = _descriptors(h, "tensors", "request", frames, limits, rid)
    for d in descs:
        shape = d["shape"]
        if len(shape) == 4 and shape[0] > limits.max_batch:
            raise ProtocolError(
                ErrorCode.TOO_LARGE, f"request: {shape[0]} rows, over max_batch={limits.max_batch}", rid
            )


def check_result(h: dict, frames: list, limits: Limits) -> None:
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


def check_error(h: dict, frames: list, limits: Limits) -> None:
    rid = _int(h, "id", "error", optional=True)
    _no_frames("error", frames, rid)
    _int(h, "code", "error", 0, 1 << 31, rid)
    _str(h, "name", "error", 64, rid)
    _str(h, "message", "error", 4096, rid)


def check_ping(h: dict, frames: list, limits: Limits) -> None:
    _no_frames(h["kind"], frames)
    _int(h, "nonce", h["kind"])
    _int(h, "t_ns", h["kind"], 0, UINT64_MAX, optional=True)


def check_bye(h: dict, frames: list, limits: Limits) -> None:
    _no_frames("bye", frames)
    _str(h, "reason", "bye", 4096, optional=True)


# kind -> validator; parse() looks the kind up here after the checks common to every message
VALIDATORS = {
    Kind.HELLO: check_hello,
    Kind.WELCOME: check_welcome,
    Kind.REQUEST: check_request,
    Kind.RESULT: check_result,
    Kind.ERROR: check_error,
    Kind.PING: check_ping,
    Kind.PONG: check_ping,
    Kind.BYE: check_bye,
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
