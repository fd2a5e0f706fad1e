"""The tensor codec of wire protocol v1 (numpy only; ``zstandard`` for the optional lossless stage).

A tensor travels as one ZeroMQ frame plus a *descriptor* (a small map inside the message header)
that says how to turn the frame back into a float32 array. docs/PROTOCOL.md is the normative text;
this module is its reference implementation, with :mod:`edgesplit.wire.quantize` (the affine
quantization and the bit packing, whose names this module re-exports).

Raw floats (``dtype`` ``float32``/``float16``, ``bits`` 32/16): IEEE 754 little-endian, C order.

Lossless stage (``codec``): ``raw`` (the packed bytes as they are) or ``zstd`` (one Zstandard
frame, RFC 8878, holding exactly the packed bytes). ``encode(..., codec="auto")`` tries zstd and
keeps it only when it is smaller.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Protocol

import numpy as np

from .ans_codec import ANS_CODEC, ANS_DTYPE, check_ans_descriptor
from .errors import ErrorCode, WireError
from .errors import is_int as _is_int
from .errors import is_num as _is_num
from .quantize import (
    PACKED_BITS,
    dequantize,
    dequantize_packed,
    pack_bits,
    packed_nbytes,
    quantize,
    unpack_bits,
)

# re-exported: callers import the error types and the quantization functions from here
__all__ = [
    "ErrorCode",
    "WireError",
    "PACKED_BITS",
    "dequantize",
    "dequantize_packed",
    "pack_bits",
    "packed_nbytes",
    "quantize",
    "unpack_bits",
]

# ---------------------------------------------------------------------------------------------
# Constants

CODECS = ("raw", "zstd")
FLOAT_DTYPES = {"float32": (32, "<f4"), "float16": (16, "<f2")}
DTYPES = ("uint8",) + tuple(FLOAT_DTYPES)
MAX_NDIM = 8
DEFAULT_MAX_BYTES = 8 << 20  # largest packed (pre-zstd) payload decode() accepts by default
ZSTD_LEVEL = 3

DESCRIPTOR_KEYS = ("name", "shape", "dtype", "bits", "scale", "zero_point", "channels", "codec", "nbytes")


class QuantMode(Protocol):
    """What encode() needs from a mode: :class:`edgesplit.bundle.Mode` satisfies it. Read-only
    members, so that frozen dataclasses and named tuples satisfy it too."""

    @property
    def channels(self) -> int: ...

    @property
    def bits(self) -> int: ...

    @property
    def scale(self) -> float: ...

    @property
    def zero_point(self) -> int: ...


# ---------------------------------------------------------------------------------------------
# zstd, one compressor/decompressor per thread (zstandard objects are not thread-safe)

_tls = threading.local()


def _zstd():
    try:
        import zstandard
    except ImportError:  # pragma: no cover - zstandard is in the edge and server extras
        raise WireError(ErrorCode.UNSUPPORTED, "codec 'zstd' needs the zstandard package") from None
    return zstandard


def _compressor():
    c = getattr(_tls, "cctx", None)
    if c is None:
        zstd = _zstd()
        # write_content_size: the frame records its decompressed size; no checksum (TCP already has one).
        c = _tls.cctx = zstd.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True, write_checksum=False)
    return c


def _decompressor():
    d = getattr(_tls, "dctx", None)
    if d is None:
        d = _tls.dctx = _zstd().ZstdDecompressor()
    return d


def zstd_available() -> bool:
    try:
        _zstd()
        return True
    except WireError:
        return False


def supported_codecs() -> list[str]:
    return ["raw", "zstd"] if zstd_available() else ["raw"]


# ---------------------------------------------------------------------------------------------
# Descriptors


_DTYPE_BITS = {"uint8": PACKED_BITS, "float32": (32,), "float16": (16,)}


def check_descriptor(
    d: Any, nbytes_actual: int | None = None, *, max_bytes: int = DEFAULT_MAX_BYTES
) -> tuple[int, int]:
    """Validate a descriptor (types, values, internal consistency, against the actual frame length
    when given). Returns ``(numel, packed_nbytes)``. Raises :class:`WireError`.

    Written for the hot path (every request passes here): exact-type tests first (what msgpack
    produces), the general ``isinstance`` rules only as a fallback."""
    M = ErrorCode.MALFORMED
    if not isinstance(d, dict):
        raise WireError(M, f"tensor descriptor must be a map, got {type(d).__name__}")
    try:
        name = d["name"]
        shape = d["shape"]
        dtype = d["dtype"]
        bits = d["bits"]
        scale = d["scale"]
        zp = d["zero_point"]
        channels = d["channels"]
        codec = d["codec"]
        nbytes = d["nbytes"]
    except KeyError as e:
        raise WireError(M, f"tensor descriptor lacks '{e.args[0]}'") from None
    if type(name) is not str and not isinstance(name, str) or len(name) > 256:
        raise WireError(M, "descriptor 'name' must be a string of at most 256 characters")
    if not isinstance(shape, (list, tuple)) or not 1 <= len(shape) <= MAX_NDIM:
        raise WireError(M, f"descriptor 'shape' must be a list of 1 to {MAX_NDIM} integers")
    numel = 1
    for s in shape:
        if not (type(s) is int or _is_int(s)) or s < 0:
            raise WireError(M, f"descriptor 'shape' has a bad dimension {s!r}")
        numel *= s
    if type(dtype) is not str and not isinstance(dtype, str):
        raise WireError(M, "descriptor 'dtype' must be a string")
    if not (type(bits) is int or _is_int(bits)):
        raise WireError(M, "descriptor 'bits' must be an integer")
    allowed = _DTYPE_BITS.get(dtype)
    if allowed is None:
        if dtype == ANS_DTYPE and codec == ANS_CODEC:  # §4.4: its own rules (off the uint8 hot path)
            return check_ans_descriptor(d, nbytes_actual, max_bytes=max_bytes)
        raise WireError(ErrorCode.UNSUPPORTED, f"dtype '{dtype}' is not supported (supported: {', '.join(DTYPES)})")
    packed = dtype == "uint8"
    if bits not in allowed:
        if packed:
            raise WireError(
                ErrorCode.UNSUPPORTED, f"bits={bits} is not supported for uint8 codes (supported: {PACKED_BITS})"
            )
        raise WireError(M, f"dtype {dtype} needs bits={allowed[0]}, got {bits}")
    if not (type(scale) is float or _is_num(scale)) or not math.isfinite(scale) or (packed and scale <= 0):
        raise WireError(M, f"descriptor 'scale' must be a finite positive number, got {scale!r}")
    if not (type(zp) is int or _is_int(zp)) or (packed and not 0 <= zp < (1 << bits)):
        raise WireError(M, f"descriptor 'zero_point' must be an integer in [0, 2**bits), got {zp!r}")
    if channels is not None:
        if not (type(channels) is int or _is_int(channels)) or channels < 0:
            raise WireError(M, "descriptor 'channels' must be a non-negative integer or nil")
        if len(shape) < 3 or shape[-3] != channels:
            raise WireError(M, f"descriptor 'channels'={channels} disagrees with shape {list(shape)} (axis -3)")
    if codec != "raw" and codec not in CODECS:
        if not isinstance(codec, str):  # a type error, not an unknown codec (PROTOCOL.md §4)
            raise WireError(M, f"descriptor 'codec' must be a string, got {type(codec).__name__}")
        raise WireError(ErrorCode.UNSUPPORTED, f"codec {codec!r} is not supported (supported: {', '.join(CODECS)})")
    if not (type(nbytes) is int or _is_int(nbytes)) or nbytes < 0:
        raise WireError(M, "descriptor 'nbytes' must be a non-negative integer")
    if nbytes_actual is not None and nbytes != nbytes_actual:
        raise WireError(M, f"descriptor says nbytes={nbytes} but the frame has {nbytes_actual} bytes")
    need = (numel * bits + 7) >> 3
    if need > max_bytes:
        raise WireError(
            ErrorCode.TOO_LARGE, f"tensor {list(shape)} at {bits} bits is {need} bytes, over the limit of {max_bytes}"
        )
    if codec == "raw" and nbytes != need:
        raise WireError(M, f"shape {list(shape)} at {bits} bits needs {need} bytes, descriptor says nbytes={nbytes}")
    return numel, need


def descriptor(
    name: str,
    shape,
    dtype: str,
    bits: int,
    scale: float,
    zero_point: int,
    channels: int | None,
    codec: str,
    nbytes: int,
) -> dict[str, Any]:
    return {
        "name": name,
        "shape": [int(s) for s in shape],
        "dtype": dtype,
        "bits": int(bits),
        "scale": float(scale),
        "zero_point": int(zero_point),
        "channels": channels,
        "codec": codec,
        "nbytes": int(nbytes),
    }


# ---------------------------------------------------------------------------------------------
# encode / decode


def _lossless(packed: bytes, codec: str, auto_margin: int = 0) -> tuple[str, bytes]:
    if codec == "raw":
        return "raw", packed
    if codec == "zstd":
        return "zstd", _compressor().compress(packed)
    if codec == "auto":
        if not zstd_available():
            return "raw", packed
        z = _compressor().compress(packed)
        return ("zstd", z) if len(z) + auto_margin < len(packed) else ("raw", packed)
    raise WireError(ErrorCode.UNSUPPORTED, f"codec {codec!r} is not supported (use raw, zstd or auto)")


def encode(
    x: np.ndarray, mode: QuantMode, *, codec: str = "raw", name: str = "wire", auto_margin: int = 0
) -> tuple[dict[str, Any], bytes]:
    """Quantize, keep the first ``mode.channels`` channels (axis -3), pack and optionally compress.

    ``x`` is float32 ``[C, h, w]`` (one frame) or ``[N, C, h, w]``. Returns ``(descriptor, payload)``.
    ``codec="auto"`` keeps zstd only when it saves more than ``auto_margin`` bytes (the agent
    passes what a zstd frame costs in header bytes over a raw one sent as a compact request).
    """
    x = np.asarray(x)
    if x.ndim not in (3, 4):
        raise WireError(ErrorCode.MALFORMED, f"encode expects [C,h,w] or [N,C,h,w], got shape {list(x.shape)}")
    bits, c = int(mode.bits), int(mode.channels)
    if bits not in PACKED_BITS:
        raise WireError(ErrorCode.UNSUPPORTED, f"bits={bits} is not supported (supported: {PACKED_BITS})")
    if not 0 < c <= x.shape[-3]:
        raise WireError(ErrorCode.MALFORMED, f"mode sends {c} channels but the tensor has {x.shape[-3]}")
    if c != x.shape[-3]:
        x = x[..., :c, :, :]
    q = quantize(x, bits, mode.scale, mode.zero_point)
    used, payload = _lossless(pack_bits(q, bits), codec, auto_margin)
    return descriptor(name, q.shape, "uint8", bits, mode.scale, mode.zero_point, c, used, len(payload)), payload


def encode_float(
    x: np.ndarray, *, name: str = "output", dtype: str = "float32", codec: str = "raw"
) -> tuple[dict[str, Any], bytes]:
    """Raw IEEE float tensor (used for result logits): no quantization, little-endian, C order."""
    if dtype not in FLOAT_DTYPES:
        raise WireError(ErrorCode.UNSUPPORTED, f"dtype '{dtype}' is not a float wire dtype")
    bits, np_dtype = FLOAT_DTYPES[dtype]
    a = np.ascontiguousarray(x, dtype=np_dtype)
    used, payload = _lossless(a.tobytes(), codec)
    return descriptor(name, a.shape, dtype, bits, 1.0, 0, None, used, len(payload)), payload


def decode(
    d: dict[str, Any],
    payload,
    *,
    full_channels: int | None = None,
    out: np.ndarray | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    validate: bool = True,
) -> np.ndarray:
    """Validate and decode one tensor frame to a float32 array of the descriptor's shape.

    ``full_channels``: zero-fill axis -3 up to this many channels (a channel subset was sent).
    ``out``: a float32 array (or view) of exactly the descriptor's shape to decode into (the
    server decodes straight into its batch buffer this way); returned.
    ``validate=False`` skips the descriptor checks when the caller already ran check_descriptor on
    this descriptor and frame (the server does, while parsing the message). Raises WireError.
    """
    view = memoryview(payload)
    if validate:
        numel, need = check_descriptor(d, view.nbytes, max_bytes=max_bytes)
    else:
        numel = math.prod(d["shape"])
        need = packed_nbytes(numel, d["bits"])
    buf: memoryview | bytes = _zstd_decompress(view, need) if d["codec"] == "zstd" else view
    shape = tuple(d["shape"])
    dtype = d["dtype"]
    if out is not None:
        if out.shape != shape or out.dtype != np.float32:
            raise WireError(
                ErrorCode.MALFORMED,
                f"decode target is {out.dtype}{list(out.shape)}, descriptor says float32{list(shape)}",
            )
        if dtype == "uint8":
            return dequantize_packed(buf, numel, d["bits"], d["scale"], d["zero_point"], out)
        if len(buf) != need:
            raise WireError(ErrorCode.MALFORMED, f"float payload is {len(buf)} bytes, shape {list(shape)} needs {need}")
        out[...] = np.frombuffer(buf, dtype=FLOAT_DTYPES[dtype][1]).reshape(shape)
        return out
    if dtype == "uint8":
        if full_channels is None or full_channels == shape[-3]:
            out = np.empty(shape, np.float32)
        else:
            out = _zero_filled(shape, full_channels)
        dequantize_packed(
            buf,
            numel,
            d["bits"],
            d["scale"],
            d["zero_point"],
            out[..., : shape[-3], :, :] if out.shape != shape else out,
        )
        return out
    np_dtype = FLOAT_DTYPES[dtype][1]
    if len(buf) != need:
        raise WireError(ErrorCode.MALFORMED, f"float payload is {len(buf)} bytes, shape {list(shape)} needs {need}")
    a = np.frombuffer(buf, dtype=np_dtype).reshape(shape).astype(np.float32)
    if full_channels is not None and len(shape) >= 3 and full_channels != shape[-3]:
        out = _zero_filled(shape, full_channels)
        out[..., : shape[-3], :, :] = a
        return out
    return a


def _zero_filled(shape: tuple, full_channels: int) -> np.ndarray:
    if len(shape) < 3 or full_channels < shape[-3]:
        raise WireError(ErrorCode.MALFORMED, f"cannot zero-fill shape {list(shape)} to {full_channels} channels")
    s = list(shape)
    s[-3] = full_channels
    return np.zeros(s, dtype=np.float32)


def _zstd_decompress(buf, expected: int) -> bytes:
    zstd = _zstd()
    try:
        params = zstd.get_frame_parameters(buf)
    except zstd.ZstdError as e:
        raise WireError(ErrorCode.MALFORMED, f"zstd payload has no valid frame header: {e}") from None
    if params.content_size not in (expected, zstd.CONTENTSIZE_UNKNOWN):
        raise WireError(
            ErrorCode.MALFORMED, f"zstd frame holds {params.content_size} bytes, the descriptor implies {expected}"
        )
    try:
        # max_output_size bounds the allocation even when the frame does not record its size.
        out = _decompressor().decompress(buf, max_output_size=max(expected, 1))
    except zstd.ZstdError as e:
        raise WireError(ErrorCode.MALFORMED, f"zstd payload does not decompress: {e}") from None
    if len(out) != expected:
        raise WireError(ErrorCode.MALFORMED, f"zstd payload decompressed to {len(out)} bytes, expected {expected}")
    return out


def roundtrip_error(x: np.ndarray, mode: QuantMode) -> float:
    """Max abs difference between ``x`` (channel subset) and its decoded reconstruction (a test aid)."""
    d, p = encode(x, mode)
    y = decode(d, p)
    return float(np.max(np.abs(np.asarray(x)[..., : mode.channels, :, :] - y))) if y.size else 0.0
