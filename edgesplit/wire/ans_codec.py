"""Codec ``"ans"``: entropy-coded wire tensors (docs/PROTOCOL.md §4.4; numpy + constriction).

The head's output is rounded to integers (after division by the mode's ``scale``), clipped to each
channel's table (:mod:`edgesplit.wire.ans_tables`) and coded with constriction's stack ANS coder,
one categorical model per channel. A frame is variable-length::

    tag (2 bytes: the table set's digest, first bytes) | k little-endian uint32 words (k >= 0)

the words being constriction's ``AnsCoder.get_compressed()`` after the values were pushed in
reverse C order (so that they decode in C order). Every malformed frame (bad length, a tag of
other tables, a trailing zero word, words left over or missing when the last value is decoded) is
a :class:`WireError` MALFORMED; the decoded size is checked against ``max_bytes`` before anything
is allocated, and a frame longer than any coding of its shape can be is refused before decoding,
so the work per frame is bounded by its shape.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .ans_tables import CODER_PRECISION, TAG_BYTES, TableSet, constriction_module
from .errors import ErrorCode, WireError, is_int, is_num

ANS_CODEC = "ans"
ANS_DTYPE = "int32"  # the values are integers; the codec, not the dtype, says how they travel
ANS_BITS = 32
DEFAULT_MAX_BYTES = 8 << 20  # largest decoded float32 tensor accepted by default (as codec.py)
_M = ErrorCode.MALFORMED


def max_payload_bytes(numel: int) -> int:
    """The longest frame any coding of ``numel`` values can give: each value costs at most
    ``CODER_PRECISION`` bits (every probability is at least 2**-24), plus the 64-bit state."""
    return TAG_BYTES + 4 * (-(-numel * CODER_PRECISION // 32) + 2)


def check_payload_len(nbytes: int, numel: int) -> None:
    """A frame of ``nbytes`` for ``numel`` values: ``2 + 4k`` bytes, at most :func:`max_payload_bytes`
    (PROTOCOL.md §4.4) [MALFORMED]. Needs only the length: run it before anything is allocated."""
    if nbytes < TAG_BYTES or (nbytes - TAG_BYTES) % 4:
        raise WireError(_M, f"an 'ans' frame is {TAG_BYTES} + 4k bytes, got {nbytes}")
    bound = max_payload_bytes(numel)
    if nbytes > bound:
        raise WireError(_M, f"an 'ans' frame of {numel} values is at most {bound} bytes, got {nbytes}")


def check_ans_descriptor(
    d: Any, nbytes_actual: int | None = None, *, max_bytes: int = DEFAULT_MAX_BYTES
) -> tuple[int, int]:
    """Validate a descriptor with ``codec == "ans"`` (PROTOCOL.md §4.4). Returns ``(numel,
    decoded_bytes)``; raises WireError (MALFORMED, or TOO_LARGE when the decoded float32 tensor
    would exceed ``max_bytes``: checked before the payload is looked at)."""
    if not isinstance(d, dict):
        raise WireError(_M, f"tensor descriptor must be a map, got {type(d).__name__}")
    try:
        name, shape, dtype, bits = d["name"], d["shape"], d["dtype"], d["bits"]
        scale, zp, channels, codec, nbytes = d["scale"], d["zero_point"], d["channels"], d["codec"], d["nbytes"]
    except KeyError as e:
        raise WireError(_M, f"tensor descriptor lacks '{e.args[0]}'") from None
    if codec != ANS_CODEC:
        raise WireError(_M, f"not an 'ans' descriptor (codec {codec!r})")
    if not isinstance(name, str) or len(name) > 256:
        raise WireError(_M, "descriptor 'name' must be a string of at most 256 characters")
    if not isinstance(shape, (list, tuple)) or len(shape) not in (3, 4):
        raise WireError(_M, "an 'ans' tensor has shape [c,h,w] or [n,c,h,w]")
    if not all(is_int(s) and s >= 0 for s in shape):
        raise WireError(_M, f"descriptor 'shape' has a bad dimension: {list(shape)!r}")
    if dtype != ANS_DTYPE or not is_int(bits) or bits != ANS_BITS:
        raise WireError(_M, f"an 'ans' tensor has dtype '{ANS_DTYPE}' and bits {ANS_BITS}")
    if not is_num(scale) or scale <= 0:
        raise WireError(_M, f"descriptor 'scale' must be a finite positive number, got {scale!r}")
    if not is_int(zp) or zp != 0:
        raise WireError(_M, "an 'ans' tensor has zero_point 0 (the tables hold the offsets)")
    if not is_int(channels) or channels != shape[-3]:
        raise WireError(_M, f"descriptor 'channels'={channels!r} disagrees with shape {list(shape)} (axis -3)")
    if not is_int(nbytes) or nbytes < 0:
        raise WireError(_M, "descriptor 'nbytes' must be a non-negative integer")
    if nbytes_actual is not None and nbytes != nbytes_actual:
        raise WireError(_M, f"descriptor says nbytes={nbytes} but the frame has {nbytes_actual} bytes")
    numel = math.prod(shape)
    if numel * 4 > max_bytes:
        raise WireError(
            ErrorCode.TOO_LARGE, f"tensor {list(shape)} decodes to {numel * 4} bytes, over the limit of {max_bytes}"
        )
    check_payload_len(nbytes, numel)
    return numel, numel * 4


def descriptor(name: str, shape, scale: float, nbytes: int) -> dict[str, Any]:
    return {
        "name": name,
        "shape": [int(s) for s in shape],
        "dtype": ANS_DTYPE,
        "bits": ANS_BITS,
        "scale": float(scale),
        "zero_point": 0,
        "channels": int(shape[-3]),
        "codec": ANS_CODEC,
        "nbytes": int(nbytes),
    }


def implied_ans(implied: dict[str, Any] | None, d: dict[str, Any]) -> bool:
    """Whether ``d`` is what a compact request of an ans mode implies: ``implied`` is that mode's
    descriptor with ``nbytes`` None (the frame's length, PROTOCOL.md §3.3.1)."""
    return implied is not None and implied["nbytes"] is None and d == dict(implied, nbytes=d["nbytes"])


def _blocks(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(rows, channels, values per channel block) of a [c,h,w] or [n,c,h,w] shape."""
    rows = shape[0] if len(shape) == 4 else 1
    return rows, shape[-3], shape[-2] * shape[-1]


def _check_tables(tables: TableSet, shape: tuple[int, ...]) -> None:
    if len(shape) not in (3, 4):
        raise WireError(_M, f"an 'ans' tensor has shape [c,h,w] or [n,c,h,w], got {list(shape)}")
    if shape[-3] != tables.channels:
        raise WireError(
            _M, f"tensor has {shape[-3]} channels, table set '{tables.name}' has {tables.channels} (a CDF mismatch)"
        )


def quantize_values(x: np.ndarray, tables: TableSet, scale: float = 1.0) -> np.ndarray:
    """The integers a float tensor ``[c,h,w]``/``[n,c,h,w]`` is sent as: ``rint(x / scale)`` (float32
    division, round half to even) clipped to each channel's table ``[offset, offset + n - 1]``."""
    a = np.asarray(x, dtype=np.float32)
    _check_tables(tables, a.shape)
    q = np.rint(a / np.float32(scale))
    lo = np.array(tables.offsets, dtype=np.float32)
    hi = lo + tables.sizes().astype(np.float32) - 1
    q = np.clip(q, lo[:, None, None], hi[:, None, None])
    return q.astype(np.int32)


def encode_values(values: np.ndarray, tables: TableSet) -> bytes:
    """Code integer values (``[c,h,w]`` or ``[n,c,h,w]``, C order) into one frame. A value outside
    its channel's table is a WireError MALFORMED (:func:`quantize_values` never produces one)."""
    v = np.asarray(values)
    if v.dtype.kind not in "iu":
        raise WireError(_M, f"'ans' values must be integers, got {v.dtype}")
    _check_tables(tables, v.shape)
    rows, chans, per = _blocks(v.shape)
    sym = (v.reshape(rows, chans, per).astype(np.int64) - np.array(tables.offsets, np.int64)[None, :, None]).astype(
        np.int32
    )
    sizes = tables.sizes()
    bad = (sym < 0) | (sym >= sizes[None, :, None].astype(np.int32))
    if bad.any():
        r, c, i = (int(k[0]) for k in np.nonzero(bad))
        raise WireError(
            _M,
            f"value {int(v.reshape(rows, chans, per)[r, c, i])} of channel {c} is outside table set "
            f"'{tables.name}' ([{tables.offsets[c]}, {tables.offsets[c] + int(sizes[c]) - 1}])",
        )
    models = tables.models()
    coder = constriction_module().stream.stack.AnsCoder()
    # A stack: push the blocks last-first (each block reversed by encode_reverse) to pop them in order.
    for r in range(rows - 1, -1, -1):
        for c in range(chans - 1, -1, -1):
            coder.encode_reverse(sym[r, c], models[c])
    words = np.asarray(coder.get_compressed(), dtype="<u4")
    return tables.tag + words.tobytes()


def decode_values(payload, tables: TableSet, shape) -> np.ndarray:
    """Decode one frame to int32 values of ``shape``. Raises WireError MALFORMED for a frame that is
    not a coding of ``shape`` with ``tables`` (see the module text)."""
    shape = tuple(int(s) for s in shape)
    _check_tables(tables, shape)
    view = memoryview(payload).cast("B")
    numel = math.prod(shape)
    check_payload_len(view.nbytes, numel)
    if bytes(view[:TAG_BYTES]) != tables.tag:
        raise WireError(
            _M,
            f"frame was coded with tables {bytes(view[:TAG_BYTES]).hex()}..., the mode's are "
            f"'{tables.name}' ({tables.tag.hex()}...): a CDF mismatch",
        )
    words = np.frombuffer(view[TAG_BYTES:], dtype="<u4").astype(np.uint32)
    if words.size and words[-1] == 0:
        raise WireError(_M, "an 'ans' frame never ends in a zero word")
    models = tables.models()
    rows, chans, per = _blocks(shape)
    out = np.empty((rows, chans, per), dtype=np.int32)
    try:
        coder = constriction_module().stream.stack.AnsCoder(words)
        for r in range(rows):
            for c in range(chans):
                out[r, c] = coder.decode(models[c], per)
    except (ValueError, TypeError, KeyError) as e:  # constriction's refusals of bad input
        raise WireError(_M, f"'ans' frame does not decode: {e}") from None
    if not coder.is_empty():
        raise WireError(
            _M, "'ans' frame does not end where its values end (truncated, padded, or coded with other tables)"
        )
    out += np.array(tables.offsets, dtype=np.int32)[None, :, None]
    return out.reshape(shape)


def encode(x: np.ndarray, tables: TableSet, *, scale: float = 1.0, name: str = "wire") -> tuple[dict[str, Any], bytes]:
    """Quantize a float tensor to integers and code it: ``(descriptor, payload)``."""
    values = quantize_values(x, tables, scale)
    payload = encode_values(values, tables)
    return descriptor(name, values.shape, scale, len(payload)), payload


def decode(
    d: dict[str, Any],
    payload,
    tables: TableSet,
    *,
    full_channels: int | None = None,
    out: np.ndarray | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    validate: bool = True,
) -> np.ndarray:
    """Validate and decode one ``ans`` tensor frame to float32 (``value × scale``), zero-filling
    axis -3 up to ``full_channels`` or writing into ``out`` (exactly the descriptor's shape)."""
    view = memoryview(payload)
    if validate:
        check_ans_descriptor(d, view.nbytes, max_bytes=max_bytes)
    shape = tuple(d["shape"])
    values = decode_values(view, tables, shape)
    x = values.astype(np.float32) * np.float32(d["scale"])
    if out is not None:
        if out.shape != shape or out.dtype != np.float32:
            raise WireError(_M, f"decode target is {out.dtype}{list(out.shape)}, descriptor says float32{list(shape)}")
        out[...] = x
        return out
    if full_channels is None or full_channels == shape[-3]:
        return x
    if full_channels < shape[-3]:
        raise WireError(_M, f"cannot zero-fill shape {list(shape)} to {full_channels} channels")
    filled = np.zeros((*shape[:-3], full_channels, *shape[-2:]), dtype=np.float32)
    filled[..., : shape[-3], :, :] = x
    return filled
