"""The tensor codec of wire protocol v1 (numpy only; ``zstandard`` for the optional lossless stage).

A tensor travels as one ZeroMQ frame plus a *descriptor* (a small map inside the message header)
that says how to turn the frame back into a float32 array. docs/PROTOCOL.md is the normative text;
this module is its reference implementation.

Quantization (per tensor, affine, static parameters from the bundle mode)::

    q  = clip(rint(x / scale) + zero_point, 0, 2**bits - 1)     # rint: round half to even
    x' = (q - zero_point) * scale                                # float32 arithmetic

Bit packing (``dtype == "uint8"``, ``bits`` in 2, 4, 6, 8): the codes, in C order of ``shape``,
form one little-endian bit stream. Code ``i`` occupies stream bits ``[i*bits, (i+1)*bits)``, its
least significant bit first; stream bit ``j`` is bit ``j % 8`` (value ``1 << (j % 8)``) of byte
``j // 8``. The stream is padded with zero bits to a whole byte, so a tensor of ``n`` codes takes
``ceil(n * bits / 8)`` bytes. For 8 bits this is one code per byte; for 4 bits the first code is
the low nibble; for 2 bits the first code is bits 0-1; for 6 bits four codes fill three bytes as
the little-endian 24-bit integer ``q0 | q1 << 6 | q2 << 12 | q3 << 18``.

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

from .errors import ErrorCode, WireError, is_int as _is_int, is_num as _is_num

__all__ = ["ErrorCode", "WireError"]  # re-exported: older callers import them from here

# ---------------------------------------------------------------------------------------------
# Constants

CODECS = ("raw", "zstd")
PACKED_BITS = (2, 4, 6, 8)
FLOAT_DTYPES = {"float32": (32, "<f4"), "float16": (16, "<f2")}
DTYPES = ("uint8",) + tuple(FLOAT_DTYPES)
MAX_NDIM = 8
DEFAULT_MAX_BYTES = 8 << 20  # largest packed (pre-zstd) payload decode() accepts by default
ZSTD_LEVEL = 3

DESCRIPTOR_KEYS = ("name", "shape", "dtype", "bits", "scale", "zero_point", "channels", "codec", "nbytes")


class QuantMode(Protocol):
    """What encode() needs from a mode: :class:`edgesplit.bundle.Mode` satisfies it."""

    channels: int
    bits: int
    scale: float
    zero_point: int


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
# Quantization and bit packing (vectorized, no Python loops over elements)


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes taken by ``numel`` codes of ``bits`` bits each (before the lossless stage)."""
    return (numel * bits + 7) // 8


def quantize(x: np.ndarray, bits: int, scale: float, zero_point: int) -> np.ndarray:
    """Float array -> uint8 codes (one per element, not yet packed)."""
    qmax = (1 << bits) - 1
    q = np.divide(np.asarray(x, dtype=np.float32), np.float32(scale), dtype=np.float32)  # the one temporary
    np.rint(q, out=q)
    if zero_point:
        q += np.float32(zero_point)
    # clip as two ufuncs (np.clip's Python wrapper costs more than the work on small tensors)
    np.maximum(q, 0, out=q)
    np.minimum(q, qmax, out=q)
    return q.astype(np.uint8)


def dequantize(q: np.ndarray, scale: float, zero_point: int, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 codes -> float32 values ``(q - zero_point) * scale``; writes into ``out`` when given."""
    if out is None:
        out = np.empty(q.shape, dtype=np.float32)
    if zero_point:
        np.subtract(q, np.float32(zero_point), out=out, dtype=np.float32)
        out *= np.float32(scale)
    else:  # (q - 0) * scale: the same float32 values in one pass
        np.multiply(q, np.float32(scale), out=out, dtype=np.float32)
    return out


def pack_bits(q: np.ndarray, bits: int) -> bytes:
    """Pack uint8 codes (each < 2**bits) into the little-endian bit stream described above."""
    flat = np.ascontiguousarray(q, dtype=np.uint8).reshape(-1)
    if bits == 8:
        return flat.tobytes()
    per = {4: 2, 2: 4, 6: 4}[bits]  # codes per group; a group is 1 byte (4, 2 bits) or 3 bytes (6)
    pad = (-flat.size) % per
    if pad:
        flat = np.concatenate([flat, np.zeros(pad, np.uint8)])
    if bits == 4:
        # Each pair of codes read as one little-endian uint16 v = q0 | q1 << 8. Multiplying by
        # 2**8 + 2**4 (mod 2**16) puts q0 << 8 and q1 << 12 in the high byte, whose value is then
        # q0 | q1 << 4; the cross term q0 << 4 stays below it (codes < 16) and q1 << 16 wraps away.
        t = flat.view("<u2") * np.uint16(0x110)
        t >>= 8
        out = t.astype(np.uint8)
    elif bits == 2:
        # The same with four codes in a little-endian uint32 v = q0 | q1 << 8 | q2 << 16 | q3 << 24
        # and 2**24 + 2**18 + 2**12 + 2**6: the high byte is q0 | q1 << 2 | q2 << 4 | q3 << 6 (the
        # cross terms land in distinct 2-bit slots below bit 24, or at bit 32 and above).
        t = flat.view("<u4") * np.uint32(0x01041040)
        t >>= 24
        out = t.astype(np.uint8)
    else:  # 6 bits: 4 codes -> 24-bit little-endian word -> 3 bytes
        g = flat.reshape(-1, per)
        w = g.astype(np.uint32)
        v = w[:, 0] | (w[:, 1] << 6) | (w[:, 2] << 12) | (w[:, 3] << 18)
        out = np.empty((g.shape[0], 3), np.uint8)
        out[:, 0] = v & 0xFF
        out[:, 1] = (v >> 8) & 0xFF
        out[:, 2] = v >> 16
    nbytes = packed_nbytes(q.size, bits)
    return out.tobytes()[:nbytes]


# Decode tables for 2 and 4 bits: every possible packed byte -> the float32 values of the codes it
# holds, computed with dequantize() itself (so bit-identical to the arithmetic path). One np.take
# then unpacks and dequantizes in a single pass. Keyed by (bits, scale, zero_point): a bundle has
# a handful of modes, so the cache stays tiny; it is cleared if a peer sprays odd parameters.
_LUTS: dict[tuple[int, float, int], np.ndarray] = {}
_LUT_MAX = 64
_BYTES = np.arange(256, dtype=np.uint8)


def _lut(bits: int, scale: float, zero_point: int) -> np.ndarray:
    key = (bits, scale, zero_point)
    t = _LUTS.get(key)
    if t is None:
        per = 8 // bits
        codes = (_BYTES[:, None] >> (np.arange(per, dtype=np.uint8) * bits)) & ((1 << bits) - 1)
        t = dequantize(codes.astype(np.uint8), scale, zero_point)  # (256, per) float32
        if len(_LUTS) >= _LUT_MAX:
            _LUTS.clear()
        _LUTS[key] = t
    return t


def dequantize_packed(buf, numel: int, bits: int, scale: float, zero_point: int, out: np.ndarray) -> np.ndarray:
    """Packed codes -> float32 values written into ``out`` (any array of ``numel`` elements,
    contiguous or not): unpack + dequantize in one pass where a table does it (2, 4 bits), else
    :func:`unpack_bits` + :func:`dequantize`. Checks the length and the padding bits like
    :func:`unpack_bits`. Returns ``out``."""
    if bits in (2, 4) and out.flags.c_contiguous:
        b = np.frombuffer(buf, dtype=np.uint8)
        need = packed_nbytes(numel, bits)
        if b.size != need:
            raise WireError(ErrorCode.MALFORMED, f"packed payload is {b.size} bytes, {numel} codes of {bits} bits need {need}")
        per = 8 // bits
        full, rem = divmod(numel, per)
        lut = _lut(bits, scale, zero_point)
        flat = out.reshape(-1)
        if rem:
            last = int(b[full])
            if last >> (rem * bits):
                raise WireError(ErrorCode.MALFORMED, "non-zero padding bits after the last code")
            flat[full * per:] = lut[last, :rem]
            b = b[:full]
        np.take(lut, b, axis=0, out=flat[: full * per].reshape(full, per), mode="clip")
        return out
    q = unpack_bits(buf, numel, bits)
    dequantize(q.reshape(out.shape), scale, zero_point, out=out)
    return out


def unpack_bits(buf, numel: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: bytes -> ``numel`` uint8 codes. ``len(buf)`` must be exact."""
    b = np.frombuffer(buf, dtype=np.uint8)
    need = packed_nbytes(numel, bits)
    if b.size != need:
        raise WireError(ErrorCode.MALFORMED, f"packed payload is {b.size} bytes, {numel} codes of {bits} bits need {need}")
    if bits == 8:
        return b
    if bits == 4:
        out = np.empty((b.size, 2), np.uint8)
        out[:, 0] = b & 0x0F
        out[:, 1] = b >> 4
    elif bits == 2:
        out = np.empty((b.size, 4), np.uint8)
        out[:, 0] = b & 0x03
        out[:, 1] = (b >> 2) & 0x03
        out[:, 2] = (b >> 4) & 0x03
        out[:, 3] = b >> 6
    elif bits == 6:
        pad = (-b.size) % 3
        if pad:
            b = np.concatenate([b, np.zeros(pad, np.uint8)])
        t = b.reshape(-1, 3).astype(np.uint32)
        v = t[:, 0] | (t[:, 1] << 8) | (t[:, 2] << 16)
        out = np.empty((t.shape[0], 4), np.uint8)
        out[:, 0] = v & 0x3F
        out[:, 1] = (v >> 6) & 0x3F
        out[:, 2] = (v >> 12) & 0x3F
        out[:, 3] = v >> 18
    else:
        raise WireError(ErrorCode.UNSUPPORTED, f"bits={bits} cannot be packed (supported: {PACKED_BITS})")
    flat = out.reshape(-1)
    if flat.size > numel and flat[numel:].any():
        raise WireError(ErrorCode.MALFORMED, "non-zero padding bits after the last code")
    return flat[:numel]


# ---------------------------------------------------------------------------------------------
# Descriptors



_DTYPE_BITS = {"uint8": PACKED_BITS, "float32": (32,), "float16": (16,)}


def check_descriptor(d: Any, nbytes_actual: int | None = None, *, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[int, int]:
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
        raise WireError(ErrorCode.UNSUPPORTED, f"dtype '{dtype}' is not supported (supported: {', '.join(DTYPES)})")
    packed = dtype == "uint8"
    if bits not in allowed:
        if packed:
            raise WireError(ErrorCode.UNSUPPORTED, f"bits={bits} is not supported for uint8 codes (supported: {PACKED_BITS})")
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
        raise WireError(ErrorCode.TOO_LARGE, f"tensor {list(shape)} at {bits} bits is {need} bytes, over the limit of {max_bytes}")
    if codec == "raw" and nbytes != need:
        raise WireError(M, f"shape {list(shape)} at {bits} bits needs {need} bytes, descriptor says nbytes={nbytes}")
    return numel, need


def descriptor(name: str, shape, dtype: str, bits: int, scale: float, zero_point: int,
               channels: int | None, codec: str, nbytes: int) -> dict[str, Any]:
    return {"name": name, "shape": [int(s) for s in shape], "dtype": dtype, "bits": int(bits),
            "scale": float(scale), "zero_point": int(zero_point), "channels": channels,
            "codec": codec, "nbytes": int(nbytes)}


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


def encode(x: np.ndarray, mode: QuantMode, *, codec: str = "raw", name: str = "wire",
           auto_margin: int = 0) -> tuple[dict[str, Any], bytes]:
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


def encode_float(x: np.ndarray, *, name: str = "output", dtype: str = "float32", codec: str = "raw") -> tuple[dict[str, Any], bytes]:
    """Raw IEEE float tensor (used for result logits): no quantization, little-endian, C order."""
    if dtype not in FLOAT_DTYPES:
        raise WireError(ErrorCode.UNSUPPORTED, f"dtype '{dtype}' is not a float wire dtype")
    bits, np_dtype = FLOAT_DTYPES[dtype]
    a = np.ascontiguousarray(x, dtype=np_dtype)
    used, payload = _lossless(a.tobytes(), codec)
    return descriptor(name, a.shape, dtype, bits, 1.0, 0, None, used, len(payload)), payload


def decode(d: dict[str, Any], payload, *, full_channels: int | None = None, out: np.ndarray | None = None,
           max_bytes: int = DEFAULT_MAX_BYTES, validate: bool = True) -> np.ndarray:
    """Validate and decode one tensor frame to a float32 array of the descriptor's shape.

    ``full_channels``: zero-fill axis -3 up to this many channels (a channel subset was sent).
    ``out``: a float32 array (or view) of exactly the descriptor's shape to decode into (the
    server decodes straight into its batch buffer this way); returned.
    ``validate=False`` skips the descriptor checks when the caller already ran check_descriptor on
    this descriptor and frame (the server does, while parsing the message). Raises WireError.
    """
    buf = memoryview(payload)
    if validate:
        numel, need = check_descriptor(d, buf.nbytes, max_bytes=max_bytes)
    else:
        numel = math.prod(d["shape"])
        need = packed_nbytes(numel, d["bits"])
    if d["codec"] == "zstd":
        buf = _zstd_decompress(buf, need)
    shape = tuple(d["shape"])
    dtype = d["dtype"]
    if out is not None:
        if out.shape != shape or out.dtype != np.float32:
            raise WireError(ErrorCode.MALFORMED, f"decode target is {out.dtype}{list(out.shape)}, descriptor says float32{list(shape)}")
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
        dequantize_packed(buf, numel, d["bits"], d["scale"], d["zero_point"], out[..., : shape[-3], :, :] if out.shape != shape else out)
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
        raise WireError(ErrorCode.MALFORMED, f"zstd frame holds {params.content_size} bytes, the descriptor implies {expected}")
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
