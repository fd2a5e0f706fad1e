"""Affine quantization and bit packing of wire protocol v1 (numpy only; docs/PROTOCOL.md §4).

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

Decoding 2- and 4-bit codes goes through a table (every packed byte -> its float32 values), so
unpacking and dequantizing are one ``np.take``. :mod:`edgesplit.wire.codec` wraps these in
descriptors and the lossless stage.
"""

from __future__ import annotations

import numpy as np

from .errors import ErrorCode, WireError

PACKED_BITS = (2, 4, 6, 8)


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
            raise WireError(
                ErrorCode.MALFORMED, f"packed payload is {b.size} bytes, {numel} codes of {bits} bits need {need}"
            )
        per = 8 // bits
        full, rem = divmod(numel, per)
        lut = _lut(bits, scale, zero_point)
        flat = out.reshape(-1)
        if rem:
            last = int(b[full])
            if last >> (rem * bits):
                raise WireError(ErrorCode.MALFORMED, "non-zero padding bits after the last code")
            flat[full * per :] = lut[last, :rem]
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
        raise WireError(
            ErrorCode.MALFORMED, f"packed payload is {b.size} bytes, {numel} codes of {bits} bits need {need}"
        )
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
