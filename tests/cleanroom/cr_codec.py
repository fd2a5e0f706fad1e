"""Wire codecs of the clean-room client, written from docs/PROTOCOL.md §4 and §10 only.

Uniform codes (§4.1 quantization, §4.2 bit packing) and the `ans` entropy codec (§4.4), with the
doc's own test vectors and worked examples as self-checks (`self_check`, and `header_self_check`
for §10's request header).
"""

from __future__ import annotations

import hashlib
import struct

import msgpack
import numpy as np

CODER_PRECISION = 24  # §4.4: 24-bit probabilities
CODER_MASK = (1 << CODER_PRECISION) - 1


def quantize(x: np.ndarray, scale: float, zero_point: int, bits: int) -> np.ndarray:
    """§4.1 in its five steps: float32 scale, float32 division, rint, + zero point, clip."""
    scale32 = np.float32(scale)
    quotient = np.asarray(x, dtype=np.float32) / scale32  # one float32 division, not a reciprocal
    rounded = np.rint(quotient)
    # Adding the zero point in float32 is exact for |value| < 2^24; larger ones saturate anyway.
    codes = np.clip(rounded + np.float32(zero_point), 0, (1 << bits) - 1)
    return codes.astype(np.uint8)


def dequantize(codes: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    return (codes.astype(np.float32) - np.float32(zero_point)) * np.float32(scale)


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """§4.2: one little-endian bit stream, code i at bits [i*bits, (i+1)*bits), zero padding."""
    flat = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1)
    if bits == 8:
        return flat.tobytes()
    stream = np.unpackbits(flat[:, None], axis=1, bitorder="little")[:, :bits].reshape(-1)
    return np.packbits(stream, bitorder="little").tobytes()


def packed_length(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


# ---------------------------------------------------------------------------------------------
# ans (§4.4 and BUNDLE.md §7.2)


class AnsTable:
    """One channel's coder table: the values offset..offset+n-1 and the 24-bit cumulative table."""

    def __init__(self, offset: int, freqs: list[int]):
        n = len(freqs)
        self.offset = offset
        self.size = n
        cumulative = [0]
        for f in freqs:
            cumulative.append(cumulative[-1] + f)
        # §4.4: cdf[i] = ((F[i] * (2^24 - n)) >> 16) + i, exact integer arithmetic.
        self.cdf = [((cumulative[i] * ((1 << 24) - n)) >> 16) + i for i in range(n + 1)]


def table_set_digest(channels: list[dict]) -> str:
    """BUNDLE.md §7.2: SHA-256 of count, then per channel offset, n and the frequencies (LE)."""
    parts = [struct.pack("<I", len(channels))]
    for ch in channels:
        freqs = ch["freqs"]
        parts.append(struct.pack("<iI", ch["offset"], len(freqs)))
        parts.append(struct.pack(f"<{len(freqs)}I", *freqs))
    return hashlib.sha256(b"".join(parts)).hexdigest()


def validate_cdf_file(doc: dict) -> None:
    """BUNDLE.md §7.2's file rules (unknown keys refused at every level)."""
    if set(doc) != {"format", "version", "precision", "sets"}:
        raise ValueError(f"cdf file keys {sorted(doc)}")
    if doc["format"] != "edgesplit-ans-tables" or doc["version"] != 1 or doc["precision"] != 16:
        raise ValueError("cdf file format/version/precision")
    if not 1 <= len(doc["sets"]) <= 64:
        raise ValueError("cdf file: 1 to 64 sets")
    for name, table_set in doc["sets"].items():
        if set(table_set) != {"channels", "sha256"}:
            raise ValueError(f"cdf set {name}: keys {sorted(table_set)}")
        channels = table_set["channels"]
        if not 1 <= len(channels) <= 4096:
            raise ValueError(f"cdf set {name}: channel count")
        for ch in channels:
            if set(ch) != {"offset", "freqs"}:
                raise ValueError(f"cdf set {name}: channel keys {sorted(ch)}")
            n = len(ch["freqs"])
            if not 2 <= n <= 4096 or sum(ch["freqs"]) != 1 << 16 or min(ch["freqs"]) < 0:
                raise ValueError(f"cdf set {name}: frequencies")
            if ch["offset"] < -(1 << 20) or ch["offset"] + n > 1 << 20:
                raise ValueError(f"cdf set {name}: offset")
        if table_set_digest(channels) != table_set["sha256"]:
            raise ValueError(f"cdf set {name}: digest mismatch")


def ans_values(x: np.ndarray, scale: float, tables: list[AnsTable]) -> np.ndarray:
    """§4.4 Values: clip(rint(x / scale), o_c, o_c + n_c - 1) per channel (axis -3)."""
    quotient = np.rint(np.asarray(x, dtype=np.float32) / np.float32(scale))
    low = np.array([t.offset for t in tables], dtype=np.float32)[:, None, None]
    high = np.array([t.offset + t.size - 1 for t in tables], dtype=np.float32)[:, None, None]
    return np.clip(quotient, low, high).astype(np.int64)


def ans_encode(values: np.ndarray, tables: list[AnsTable], tag: bytes) -> bytes:
    """§4.4's stack rANS coder: symbols pushed last first; frame = tag + W + the state's words."""
    channels, height, width = values.shape[-3:]
    plane = height * width
    flat = values.reshape(-1).tolist()
    state = 0
    words: list[int] = []
    for i in range(len(flat) - 1, -1, -1):
        table = tables[(i // plane) % channels]
        symbol = flat[i] - table.offset
        start = table.cdf[symbol]
        freq = table.cdf[symbol + 1] - start
        if (state >> 40) >= freq:
            words.append(state & 0xFFFFFFFF)
            state >>= 32
        state = ((state // freq) << CODER_PRECISION) | ((state % freq) + start)
    if state >= 1 << 32:
        words += [state & 0xFFFFFFFF, state >> 32]
    elif state > 0:
        words.append(state)
    return tag + struct.pack(f"<{len(words)}I", *words)


def ans_decode(frame: bytes, shape: tuple[int, ...], tables: list[AnsTable]) -> np.ndarray:
    """§4.4's decoder, used only to check the encoder (the server decodes, not this client)."""
    words = list(struct.unpack(f"<{(len(frame) - 2) // 4}I", frame[2:]))
    state = words.pop() if words else 0
    while state < 1 << 32 and words:
        state = (state << 32) | words.pop()
    channels, height, width = shape[-3:]
    plane = height * width
    out = []
    for i in range(int(np.prod(shape))):
        table = tables[(i // plane) % channels]
        q = state & CODER_MASK
        symbol = next(k for k in range(table.size) if table.cdf[k] <= q < table.cdf[k + 1])
        state = (table.cdf[symbol + 1] - table.cdf[symbol]) * (state >> CODER_PRECISION) + q - table.cdf[symbol]
        if state < 1 << 32 and words:
            state = (state << 32) | words.pop()
        out.append(symbol + table.offset)
    if state != 0 or words:
        raise ValueError("ans frame does not end in the zero state")
    return np.array(out, dtype=np.int64).reshape(shape)


def self_check() -> None:
    """The doc's test vectors (§4.1, §4.2, §4.4); raises AssertionError on any disagreement."""
    f32 = np.frombuffer(bytes.fromhex("25e620c1" + "9d46adc0"), dtype="<f4")  # 0xC120E625, 0xC0AD469D
    assert np.float32(1.5471057605743406).view(np.uint32) == 0x3FC60790
    assert quantize(f32, 1.5471057605743406, 8, 4).tolist() == [2, 5], quantize(f32, 1.5471057605743406, 8, 4)
    assert abs(float(dequantize(np.array([2]), 1.5471057605743406, 8)[0]) - -9.282635) < 1e-5
    assert pack_codes(np.array([0x1, 0xA]), 4) == b"\xa1"
    assert pack_codes(np.array([1, 2, 3, 0]), 2) == b"\x39"
    assert pack_codes(np.array([1, 2, 3, 4]), 6) == bytes.fromhex("813010")
    assert pack_codes(np.array([63]), 6) == b"\x3f"
    assert quantize(np.array([1.0, 0.5078125, 9.0]), 0.015625, 0, 8).tolist() == [0x40, 0x20, 0xFF]
    # BUNDLE.md §9's quantization lines (mode c12-b4).
    codes = quantize(np.array([0.0, 1.0, -2.0, 30.0]), 1.5471057605743406, 8, 4)
    assert codes.tolist() == [8, 9, 7, 15] and pack_codes(codes, 4) == bytes.fromhex("98f7")
    example = [{"offset": -1, "freqs": [16384, 32768, 16384]}, {"offset": 0, "freqs": [61440, 4096]}]
    digest = table_set_digest(example)
    assert digest == "01b228719a17d5a6c46c373923209deb0d27981451a5748495a3537274aebd7d", digest
    tables = [AnsTable(c["offset"], c["freqs"]) for c in example]
    assert tables[0].cdf == [0, 4194304, 12582911, 16777216] and tables[1].cdf == [0, 15728639, 16777216]
    values = np.array([[[0, 1, -1]], [[0, 0, 1]]])
    frame = ans_encode(values, tables, bytes.fromhex(digest)[:2])
    assert frame == bytes.fromhex("01b211009021"), frame.hex()
    assert ans_decode(frame, values.shape, tables).tolist() == values.tolist()
    x = np.array([[[0.2, 1.6, -0.7]], [[0.49, -3.0, 0.5]]])
    assert ans_values(x, 1.0, tables).tolist() == [[[0, 1, -1]], [[0, 0, 0]]]


def header_self_check() -> None:
    """§10's request header, byte for byte, and §10.1's compact one."""
    descriptor = {"name": "z", "shape": [8, 8, 8], "dtype": "uint8", "bits": 8, "scale": 0.015625}
    descriptor.update({"zero_point": 0, "channels": 8, "codec": "raw", "nbytes": 512})
    header = {"v": 1, "kind": "request", "id": 7, "mode": 0, "deadline_ms": 50, "tensors": [descriptor]}
    packed = msgpack.packb(header, use_bin_type=True)
    expected = (
        "86a17601a46b696e64a772657175657374a2696407a46d6f646500ab646561646c696e655f6d7332a774656e736f72739189"
        "a46e616d65a17aa5736861706593080808a56474797065a575696e7438a46269747308a57363616c65cb3f90000000000000"
        "aa7a65726f5f706f696e7400a86368616e6e656c7308a5636f646563a3726177a66e6279746573cd0200"
    )
    assert packed.hex() == expected, packed.hex()
    del header["tensors"]
    assert (
        msgpack.packb(header).hex()
        == "85a17601a46b696e64a772657175657374a26964" + "07a46d6f646500ab646561646c696e655f6d7332"
    )
