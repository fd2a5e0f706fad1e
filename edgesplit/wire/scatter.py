"""Validation of the v1.2 messages for ED-ViT (docs/PROTOCOL.md §13): ``scatter`` and ``gather``,
the JPEG input descriptor, and the optional keys the three v1.2 features add to existing kinds.

The keys and kinds a feature defines are checked only by a receiver that takes part in that
feature: :func:`validators_for` composes, per kind, the core validator of
:mod:`edgesplit.wire.validate` with each feature's extra check, and
:func:`edgesplit.wire.protocol.parse` uses that table when it is given ``features``. Without
features, parse behaves exactly as in v1.1: ``scatter`` and ``gather`` are reserved kinds,
answered UNSUPPORTED whatever their content (what ``edgesplit serve`` does).

Counts are checked before contents, and sizes before anything is allocated: a ``submodels`` list
longer than :data:`MAX_SUBMODELS` is TOO_LARGE before its entries are read, a JPEG frame is bounded
by ``max_frame_bytes`` and so is the image it claims to decode to.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable, Collection

from .codec import FLOAT_DTYPES
from .errors import ErrorCode, ProtocolError, WireError
from .errors import is_int as _is_int
from .kinds import FEATURE_FUSED_REQUESTS, FEATURE_SCATTER, FEATURE_SCATTER_JPEG, Kind, Limits
from .ota import FEATURE_BUNDLE_UPDATES, OTA_CHECKS
from .validate import VALIDATORS, _descriptors, _get, _int, _map, _num

Validator = Callable[[dict, list, Limits], None]

MAX_SUBMODELS = 16  # sub-models per ED-ViT bundle; sub-model ids are in [0, MAX_SUBMODELS)
JPEG_DTYPE = "jpeg"  # a scatter input's encoded camera frame (§13.3.1); no other message carries it
JPEG_MAX_SIDE = 65535  # JPEG's own limit on height and width
JPEG_SOI = b"\xff\xd8\xff"  # start-of-image marker, then the first segment's marker byte
GATHER_DTYPES = tuple(FLOAT_DTYPES)  # features travel as raw floats (§13.4)
M = ErrorCode.MALFORMED


def _frame_len(f: Any) -> int:
    return len(f) if type(f) is bytes else memoryview(f).nbytes


def check_submodels(h: dict, key: str, kind: str, rid: int | None, *, min_len: int = 1) -> list[int]:
    """``h[key]``: a list of ``min_len`` to 16 strictly increasing sub-model ids in [0, 16). The
    count is checked first (TOO_LARGE), then each entry (MALFORMED)."""
    v = _get(h, key, kind, rid)
    if type(v) is not list:
        raise ProtocolError(M, f"{kind}: '{key}' must be a list of sub-model ids", rid)
    if len(v) > MAX_SUBMODELS:
        raise ProtocolError(
            ErrorCode.TOO_LARGE, f"{kind}: '{key}' lists {len(v)} sub-models, over the limit of {MAX_SUBMODELS}", rid
        )
    if len(v) < min_len:
        raise ProtocolError(M, f"{kind}: '{key}' must list at least {min_len} sub-model", rid)
    prev = -1
    for s in v:
        if not _is_int(s) or not prev < s < MAX_SUBMODELS:
            raise ProtocolError(
                M, f"{kind}: '{key}' must be strictly increasing sub-model ids in [0, {MAX_SUBMODELS}), got {v!r}", rid
            )
        prev = s
    return v


def check_jpeg_descriptor(d: dict, frame_len: int, limits: Limits) -> None:
    """A ``"jpeg"`` descriptor (§13.3.1) against its frame's length. Raises :class:`WireError`;
    the JPEG's own header is the worker's check, when it decodes."""
    missing = [k for k in ("name", "shape", "bits", "scale", "zero_point", "channels", "codec", "nbytes") if k not in d]
    if missing:
        raise WireError(M, f"tensor descriptor lacks '{missing[0]}'")
    if not isinstance(d["name"], str) or len(d["name"]) > 256:
        raise WireError(M, "descriptor 'name' must be a string of at most 256 characters")
    if d["codec"] != "raw":
        if not isinstance(d["codec"], str):
            raise WireError(M, "descriptor 'codec' must be a string")
        raise WireError(ErrorCode.UNSUPPORTED, f"a jpeg input travels with codec 'raw', not {d['codec']!r}")
    if not _is_int(d["bits"]) or d["bits"] != 8:
        raise WireError(M, f"a jpeg descriptor has bits=8, got {d['bits']!r}")
    if d["channels"] is not None:
        raise WireError(M, "a jpeg descriptor has channels nil")
    shape = d["shape"]
    if (
        type(shape) is not list
        or len(shape) != 3
        or not all(_is_int(s) for s in shape)
        or shape[2] != 3
        or not (1 <= shape[0] <= JPEG_MAX_SIDE and 1 <= shape[1] <= JPEG_MAX_SIDE)
    ):
        raise WireError(M, f"a jpeg descriptor's shape is [H, W, 3] with H, W in [1, {JPEG_MAX_SIDE}], got {shape!r}")
    if not isinstance(d["scale"], (int, float)) or isinstance(d["scale"], bool) or not _is_int(d["zero_point"]):
        raise WireError(M, "descriptor 'scale' must be a number and 'zero_point' an integer")
    nbytes = d["nbytes"]
    if not _is_int(nbytes) or nbytes < 0:
        raise WireError(M, "descriptor 'nbytes' must be a non-negative integer")
    decoded = shape[0] * shape[1] * 3
    if decoded > limits.max_frame_bytes:
        raise WireError(
            ErrorCode.TOO_LARGE,
            f"a {shape[0]}x{shape[1]} jpeg decodes to {decoded} bytes, over the limit of {limits.max_frame_bytes}",
        )
    if nbytes != frame_len:
        raise WireError(M, f"descriptor says nbytes={nbytes} but the frame has {frame_len} bytes")


# ---------------------------------------------------------------------------------------------
# The two kinds of feature "scatter" (no core validator: only these)


def check_scatter(h: dict, frames: list, limits: Limits) -> None:
    rid = _int(h, "id", "scatter")
    _num(h, "deadline_ms", "scatter", 0.0, rid)
    check_submodels(h, "submodels", "scatter", rid)
    if len(frames) != 1:
        raise ProtocolError(M, f"scatter: carries {len(frames)} tensor frames, expected exactly one (the input)", rid)
    descs = _get(h, "tensors", "scatter", rid)
    if type(descs) is not list or len(descs) != 1:
        raise ProtocolError(M, "scatter: 'tensors' must be a list of exactly one descriptor", rid)
    d = descs[0]
    if type(d) is dict and d.get("dtype") == JPEG_DTYPE:
        n = _frame_len(frames[0])
        if n > limits.max_frame_bytes:
            raise ProtocolError(
                ErrorCode.TOO_LARGE,
                f"scatter: jpeg frame is {n} bytes, over the limit of {limits.max_frame_bytes}",
                rid,
            )
        try:
            check_jpeg_descriptor(d, n, limits)
        except WireError as e:
            raise ProtocolError(e.code, f"scatter: input: {e.message}", rid) from None
        if bytes(memoryview(frames[0])[:3]) != JPEG_SOI:
            raise ProtocolError(M, "scatter: a jpeg input must begin with the JPEG start-of-image marker FF D8 FF", rid)
        return
    _descriptors(h, "tensors", "scatter", frames, limits, rid)
    if len(d["shape"]) != 3:
        raise ProtocolError(M, f"scatter: the input tensor is one frame [3, H, W], got shape {d['shape']!r}", rid)


def check_gather(h: dict, frames: list, limits: Limits) -> None:
    rid = _int(h, "id", "gather")
    _int(h, "submodel", "gather", 0, MAX_SUBMODELS - 1, rid)
    if len(frames) != 1:
        raise ProtocolError(M, f"gather: carries {len(frames)} tensor frames, expected exactly one", rid)
    (d,) = _descriptors(h, "outputs", "gather", frames, limits, rid)
    if d["dtype"] not in GATHER_DTYPES or d["codec"] != "raw":
        raise ProtocolError(
            ErrorCode.UNSUPPORTED,
            f"gather: features travel as raw {' or '.join(GATHER_DTYPES)}, got {d['dtype']}/{d['codec']}",
            rid,
        )
    if len(d["shape"]) != 1:
        raise ProtocolError(M, f"gather: features are a vector [D], got shape {d['shape']!r}", rid)
    t = _map(h, "timing", "gather", rid)
    for k in ("queue_us", "decode_us", "compute_us", "worker_us"):
        _num(t, k, "gather.timing", 0.0, rid)
    _int(t, "batch_size", "gather.timing", 1, 1 << 31, rid)


# ---------------------------------------------------------------------------------------------
# Extra checks the features add to existing kinds, run after the kind's core validator


def check_hello_submodels(h: dict, frames: list, limits: Limits) -> None:
    if h.get("submodels") is not None:
        check_submodels(h, "submodels", "hello", None)


def check_welcome_submodels(h: dict, frames: list, limits: Limits) -> None:
    check_submodels(h, "submodels", "welcome", None)


def check_error_submodel(h: dict, frames: list, limits: Limits) -> None:
    _int(h, "submodel", "error", 0, MAX_SUBMODELS - 1, h.get("id"), optional=True)


def check_fused_request(h: dict, frames: list, limits: Limits) -> None:
    if h.get("submodels") is None:
        return  # a plain request
    rid = h["id"]
    tensors = h.get("tensors")
    if tensors is None:
        raise ProtocolError(M, "request: a fused request (with 'submodels') is never compact: it needs 'tensors'", rid)
    present = check_submodels(h, "submodels", "request", rid)
    if len(present) != len(tensors):
        raise ProtocolError(
            M, f"request: 'submodels' names {len(present)} sub-models for {len(tensors)} feature tensors", rid
        )


def check_fused_result(h: dict, frames: list, limits: Limits) -> None:
    if h.get("used") is not None:
        check_submodels(h, "used", "result", h["id"], min_len=0)


# feature -> kind -> the check it adds (after the kind's core validator, when there is one)
FEATURE_CHECKS: dict[str, dict[str, Validator]] = {
    FEATURE_SCATTER: {
        Kind.HELLO: check_hello_submodels,
        Kind.WELCOME: check_welcome_submodels,
        Kind.ERROR: check_error_submodel,
        Kind.SCATTER: check_scatter,
        Kind.GATHER: check_gather,
    },
    FEATURE_SCATTER_JPEG: {},  # the jpeg input is checked with scatter; this feature only advertises it
    FEATURE_FUSED_REQUESTS: {Kind.REQUEST: check_fused_request, Kind.RESULT: check_fused_result},
    FEATURE_BUNDLE_UPDATES: OTA_CHECKS,  # v1.3, PROTOCOL.md §14 (edgesplit.wire.ota)
}


def _chain(checks: tuple[Validator, ...]) -> Validator:
    if len(checks) == 1:
        return checks[0]

    def run(h: dict, frames: list, limits: Limits) -> None:
        for check in checks:
            check(h, frames, limits)

    return run


@lru_cache(maxsize=32)
def _table(features: frozenset[str]) -> dict[str, Validator]:
    unknown = sorted(features - FEATURE_CHECKS.keys())
    if unknown:
        raise ValueError(f"unknown protocol feature(s) {unknown}; known: {sorted(FEATURE_CHECKS)}")
    table: dict[str, Validator] = dict(VALIDATORS)
    for kind in {k for f in features for k in FEATURE_CHECKS[f]}:
        core = (VALIDATORS[kind],) if kind in VALIDATORS else ()
        extra = tuple(FEATURE_CHECKS[f][kind] for f in sorted(features) if kind in FEATURE_CHECKS[f])
        table[kind] = _chain(core + extra)
    return table


def validators_for(features: Collection[str]) -> dict[str, Validator]:
    """The validator table (kind -> validator) of a receiver taking part in ``features``: the v1.1
    table plus the kinds and keys those features define. Raises ValueError on an unknown feature."""
    return _table(frozenset(features))
