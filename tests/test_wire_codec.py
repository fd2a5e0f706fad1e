"""Codec: quantization, bit packing (exact bit order), zstd stage, validation of descriptors/payloads."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from edgesplit.wire import codec, quantize
from edgesplit.wire.codec import ErrorCode, WireError, decode, encode, encode_float, pack_bits, unpack_bits

RNG = np.random.default_rng(1234)


def mode(channels=8, bits=8, scale=0.05, zero_point=0):
    return SimpleNamespace(channels=channels, bits=bits, scale=scale, zero_point=zero_point)


def reference_pack(q: np.ndarray, bits: int) -> bytes:
    """The documented bit stream, built bit by bit (slow, obviously right): code i occupies stream
    bits [i*bits, (i+1)*bits) LSB first; stream bit j is bit j%8 of byte j//8."""
    stream = ((q.reshape(-1)[:, None].astype(np.uint16) >> np.arange(bits)) & 1).astype(np.uint8).reshape(-1)
    return np.packbits(stream, bitorder="little").tobytes()


# -- bit packing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
def test_pack_matches_documented_bit_stream(bits):
    for n in [0, 1, 2, 3, 4, 5, 7, 8, 9, 13, 511, 512, 1000]:
        q = RNG.integers(0, 1 << bits, n, dtype=np.uint8)
        packed = pack_bits(q, bits)
        assert len(packed) == (n * bits + 7) // 8
        assert packed == reference_pack(q, bits), (bits, n)
        assert np.array_equal(unpack_bits(packed, n, bits), q)


def test_pack_worked_examples():
    # The examples written in docs/PROTOCOL.md.
    assert pack_bits(np.array([0x1, 0xA], np.uint8), 4) == bytes([0xA1])
    assert pack_bits(np.array([1, 2, 3, 0], np.uint8), 2) == bytes([0b00111001])
    v = 1 | (2 << 6) | (3 << 12) | (4 << 18)
    assert pack_bits(np.array([1, 2, 3, 4], np.uint8), 6) == v.to_bytes(3, "little") == bytes([0x81, 0x30, 0x10])
    assert pack_bits(np.array([63], np.uint8), 6) == bytes([0x3F])
    assert pack_bits(np.array([7, 200], np.uint8), 8) == bytes([7, 200])


def test_unpack_rejects_wrong_length_and_padding():
    q = np.array([1, 2, 3], np.uint8)
    p = pack_bits(q, 4)  # 2 bytes, high nibble of byte 1 is padding
    with pytest.raises(WireError) as e:
        unpack_bits(p + b"\x00", 3, 4)
    assert e.value.code == ErrorCode.MALFORMED
    with pytest.raises(WireError) as e:
        unpack_bits(p[:1] + bytes([p[1] | 0xF0]), 3, 4)
    assert e.value.code == ErrorCode.MALFORMED and "padding" in e.value.message


# -- quantization round trips (property style over shapes, bits, channel subsets, codecs) --------


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
@pytest.mark.parametrize("lossless", ["raw", "zstd", "auto"])
def test_roundtrip_property(bits, lossless):
    for trial in range(12):
        ndim = 3 if trial % 2 else 4
        C = int(RNG.integers(1, 12))
        shape = (C, int(RNG.integers(1, 9)), int(RNG.integers(1, 9)))
        if ndim == 4:
            shape = (int(RNG.integers(1, 5)),) + shape
        channels = int(RNG.integers(1, C + 1))
        zp = int(RNG.integers(0, 1 << bits))
        scale = float(RNG.uniform(0.01, 0.5))
        m = mode(channels, bits, scale, zp)
        lo, hi = (0 - zp) * scale, ((1 << bits) - 1 - zp) * scale
        x = RNG.uniform(lo, hi, size=shape).astype(np.float32)
        d, payload = encode(x, m, codec=lossless, name="t")
        assert d["nbytes"] == len(payload) and d["channels"] == channels and d["bits"] == bits
        assert d["shape"][-3] == channels and d["codec"] in ("raw", "zstd")
        y = decode(d, payload)
        assert y.dtype == np.float32 and y.shape == x[..., :channels, :, :].shape
        # in range: error at most half a step (plus float slack)
        assert np.max(np.abs(y - x[..., :channels, :, :])) <= scale / 2 + 1e-5
        # zero-fill to the full width
        full = decode(d, payload, full_channels=C)
        assert full.shape == x.shape
        assert np.array_equal(full[..., :channels, :, :], y) and not full[..., channels:, :, :].any()


def test_quantization_formula_and_clipping():
    m = mode(channels=1, bits=4, scale=0.5, zero_point=3)
    x = np.array([[[-100.0, -1.5, -0.25, 0.0, 0.25, 0.75, 1.0, 100.0]]], np.float32)
    q = codec.quantize(x, 4, 0.5, 3)
    # rint rounds half to even: -0.5 -> -0, 0.5 -> 0, 1.5 -> 2
    assert q.reshape(-1).tolist() == [0, 0, 3, 3, 3, 5, 5, 15]
    d, p = encode(x, m)
    assert decode(d, p).reshape(-1).tolist() == [(v - 3) * 0.5 for v in [0, 0, 3, 3, 3, 5, 5, 15]]


def test_float_outputs_roundtrip():
    x = RNG.standard_normal((3, 10)).astype(np.float32)
    d, p = encode_float(x, name="logits")
    assert d["dtype"] == "float32" and d["bits"] == 32 and d["channels"] is None and len(p) == 120
    assert np.array_equal(decode(d, p), x)
    d16, p16 = encode_float(x, dtype="float16")
    assert len(p16) == 60 and np.allclose(decode(d16, p16), x, atol=1e-2)
    dz, pz = encode_float(np.zeros((1000,), np.float32), codec="zstd")
    assert dz["codec"] == "zstd" and len(pz) < 100 and not decode(dz, pz).any()


def test_decode_into_batch_view():
    m = mode(channels=4, bits=8, scale=0.1)
    x = RNG.uniform(0, 20, (4, 3, 3)).astype(np.float32)
    d, p = encode(x, m)
    batch = np.zeros((2, 6, 3, 3), np.float32)
    decode(d, p, out=batch[1, :4])
    assert np.array_equal(batch[1, :4], decode(d, p)) and not batch[0].any() and not batch[1, 4:].any()
    with pytest.raises(WireError):
        decode(d, p, out=batch[1])  # 6 channels, descriptor says 4


def test_zstd_is_worth_it_on_sparse_activations():
    # ReLU activations are mostly zero: the lossless stage must pay for its framing.
    x = np.maximum(RNG.standard_normal((64, 28, 28)).astype(np.float32) - 0.5, 0)
    m = mode(64, 8, 4 / 255)
    d_raw, p_raw = encode(x, m, codec="raw")
    d_z, p_z = encode(x, m, codec="zstd")
    assert len(p_z) < 0.8 * len(p_raw)
    assert np.array_equal(decode(d_raw, p_raw), decode(d_z, p_z))
    # auto keeps raw when zstd does not help (uniform noise)
    noise = RNG.uniform(0, 255 * m.scale, (8, 8, 8)).astype(np.float32)
    d_a, _ = encode(noise, mode(8, 8, m.scale), codec="auto")
    assert d_a["codec"] == "raw"


def test_auto_margin_keeps_zstd_only_when_it_saves_more():
    # The agent passes the header bytes a zstd frame costs over a compact raw request: zstd must
    # save more than that, else the frame goes raw (and compact).
    x = np.maximum(RNG.standard_normal((8, 8, 8)).astype(np.float32) - 0.5, 0)
    m = mode(8, 8, 4 / 255)
    _, p_raw = encode(x, m, codec="raw")
    _, p_z = encode(x, m, codec="zstd")
    saved = len(p_raw) - len(p_z)
    assert saved > 10
    assert encode(x, m, codec="auto")[0]["codec"] == "zstd"
    assert encode(x, m, codec="auto", auto_margin=saved - 1)[0]["codec"] == "zstd"
    d, p = encode(x, m, codec="auto", auto_margin=saved)
    assert d["codec"] == "raw" and p == p_raw
    assert encode(x, m, codec="zstd", auto_margin=10_000)[0]["codec"] == "zstd"  # only auto looks at it


def test_a_large_batch_round_trips_exactly_at_every_bit_width():
    # A 1.6 M-element batch (the size of a real wire batch) through every packed width: the payload
    # is the documented bit stream of the documented codes and decodes to (q - zp) * scale. Speed is
    # measured by the benchmarks (tools/bench_hotpath.py), not asserted here.
    x = RNG.standard_normal((32, 64, 28, 28)).astype(np.float32)
    for bits in (8, 6, 4, 2):
        zp, scale = (1 << bits) // 2, np.float32(0.05)
        q = np.clip(np.rint(x / scale) + zp, 0, (1 << bits) - 1).astype(np.uint8)
        d, p = encode(x, mode(64, bits, 0.05, zp))
        assert d["shape"] == [32, 64, 28, 28] and len(p) == x.size * bits // 8
        assert p == reference_pack(q, bits), f"{bits}-bit stream differs from the documented one"
        assert np.array_equal(decode(d, p), (q.astype(np.float32) - np.float32(zp)) * scale)


# -- validation errors ---------------------------------------------------------------------------


def good():
    x = RNG.uniform(0, 10, (8, 4, 4)).astype(np.float32)
    return encode(x, mode(8, 8, 0.05))


@pytest.mark.parametrize(
    "change,code",
    [
        ({"nbytes": 129}, ErrorCode.MALFORMED),  # lies about the frame length
        ({"shape": [8, 4, 5], "nbytes": 128}, ErrorCode.MALFORMED),  # shape product vs payload
        ({"shape": [8, -4, 4]}, ErrorCode.MALFORMED),
        ({"shape": []}, ErrorCode.MALFORMED),
        ({"shape": "8x4x4"}, ErrorCode.MALFORMED),
        ({"bits": 3}, ErrorCode.UNSUPPORTED),
        ({"bits": True}, ErrorCode.MALFORMED),
        ({"dtype": "int8"}, ErrorCode.UNSUPPORTED),
        ({"dtype": "float32"}, ErrorCode.MALFORMED),  # float32 needs bits 32
        ({"codec": "lz4"}, ErrorCode.UNSUPPORTED),
        ({"scale": 0.0}, ErrorCode.MALFORMED),
        ({"scale": float("nan")}, ErrorCode.MALFORMED),
        ({"scale": "0.1"}, ErrorCode.MALFORMED),
        ({"zero_point": 256}, ErrorCode.MALFORMED),
        ({"zero_point": 1.5}, ErrorCode.MALFORMED),
        ({"channels": 7}, ErrorCode.MALFORMED),
        ({"name": 5}, ErrorCode.MALFORMED),
        ({"codec": "zstd"}, ErrorCode.MALFORMED),  # raw bytes are not a zstd frame
    ],
)
def test_decode_rejects_bad_descriptors(change, code):
    d, p = good()
    d = {**d, **change}
    with pytest.raises(WireError) as e:
        decode(d, p)
    assert e.value.code == code, e.value


def test_decode_rejects_missing_keys_and_non_maps():
    d, p = good()
    for k in codec.DESCRIPTOR_KEYS:
        bad = dict(d)
        del bad[k]
        with pytest.raises(WireError) as e:
            decode(bad, p)
        assert e.value.code == ErrorCode.MALFORMED and k in e.value.message
    with pytest.raises(WireError):
        decode([1, 2], p)


def test_decode_rejects_bad_zstd_payloads():
    x = np.zeros((8, 4, 4), np.float32)
    d, p = encode(x, mode(8, 8, 0.05), codec="zstd")
    with pytest.raises(WireError) as e:  # truncated frame
        decode({**d, "nbytes": len(p) - 3}, p[:-3])
    assert e.value.code == ErrorCode.MALFORMED
    # a valid zstd frame of the wrong decompressed size
    other = codec._compressor().compress(b"\x00" * 129)
    with pytest.raises(WireError) as e:
        decode({**d, "nbytes": len(other)}, other)
    assert e.value.code == ErrorCode.MALFORMED
    # a zstd "bomb": tiny frame claiming a huge tensor is refused before decompressing
    with pytest.raises(WireError) as e:
        decode({**d, "shape": [8, 4096, 4096], "channels": 8}, p)
    assert e.value.code == ErrorCode.TOO_LARGE


def test_encode_rejects_bad_inputs():
    with pytest.raises(WireError):
        encode(np.zeros((4, 4), np.float32), mode(1))
    with pytest.raises(WireError):
        encode(np.zeros((4, 4, 4), np.float32), mode(channels=8))
    with pytest.raises(WireError) as e:
        encode(np.zeros((4, 4, 4), np.float32), mode(channels=4, bits=5))
    assert e.value.code == ErrorCode.UNSUPPORTED
    with pytest.raises(WireError):
        encode(np.zeros((4, 4, 4), np.float32), mode(4), codec="gzip")


def test_encode_with_a_bundle_mode(tiny_bundle):
    m = tiny_bundle.default_mode
    C, h, w = tiny_bundle.wire_spec["shape"]
    x = RNG.uniform(0, 200 * m.scale, (C, h, w)).astype(np.float32)
    d, p = encode(x, m, name=tiny_bundle.wire_spec["name"])
    assert len(p) == m.bytes_per_frame == 512
    assert np.max(np.abs(decode(d, p) - x)) <= m.scale / 2 + 1e-6


# -- fast paths: identical to the reference formulas ---------------------------------------------


def reference_unpack(buf: bytes, n: int, bits: int) -> np.ndarray:
    """The documented bit stream read bit by bit (slow, obviously right)."""
    stream = np.unpackbits(np.frombuffer(buf, np.uint8), bitorder="little")[: n * bits].reshape(n, bits)
    return (stream.astype(np.uint16) << np.arange(bits)).sum(axis=1).astype(np.uint8)


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
def test_table_decode_is_bit_identical_to_the_formula(bits):
    # 2/4-bit decode goes through a 256-entry table, 8-bit skips the subtraction when zp == 0:
    # every value must equal (q - zero_point) * scale computed in float32, bit for bit.
    for n in [1, 2, 3, 5, 7, 64, 511, 768, 1001]:
        for zp in {0, 1, (1 << bits) // 2, (1 << bits) - 1}:
            scale = float(RNG.uniform(1e-4, 3.0))
            q = RNG.integers(0, 1 << bits, n, dtype=np.uint8)
            payload = pack_bits(q, bits)
            expect = (reference_unpack(payload, n, bits).astype(np.float32) - np.float32(zp)) * np.float32(scale)
            d = codec.descriptor("t", [n], "uint8", bits, scale, zp, None, "raw", len(payload))
            got = decode(d, payload)
            assert got.dtype == np.float32 and got.view(np.uint32).tolist() == expect.view(np.uint32).tolist(), (
                bits,
                n,
                zp,
            )
            out = np.full(n, np.nan, np.float32)
            codec.dequantize_packed(payload, n, bits, scale, zp, out)
            assert np.array_equal(out, expect)


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
def test_dequantize_packed_into_strided_views_and_batches(bits):
    # a channel subset of a [N, C, h, w] batch buffer is not contiguous: same values as a fresh decode
    m = mode(channels=3, bits=bits, scale=0.07, zero_point=1)
    x = RNG.uniform(0, 3, (2, 5, 3, 3)).astype(np.float32)
    d, p = encode(x, m)
    batch = np.zeros((4, 5, 3, 3), np.float32)
    codec.dequantize_packed(p, 2 * 3 * 9, bits, 0.07, 1, batch[1:3, :3])
    assert np.array_equal(batch[1:3, :3], decode(d, p))
    assert not batch[0].any() and not batch[3].any() and not batch[:, 3:].any()


@pytest.mark.parametrize("bits", [2, 4])
def test_table_decode_checks_length_and_padding(bits):
    q = RNG.integers(0, 1 << bits, 5, dtype=np.uint8)  # 5 codes: the last byte has padding bits
    p = pack_bits(q, bits)
    out = np.empty(5, np.float32)
    with pytest.raises(WireError) as e:
        codec.dequantize_packed(p + b"\x00", 5, bits, 0.1, 0, out)
    assert e.value.code == ErrorCode.MALFORMED
    bad = p[:-1] + bytes([p[-1] | 0x80])
    with pytest.raises(WireError) as e:
        codec.dequantize_packed(bad, 5, bits, 0.1, 0, out)
    assert e.value.code == ErrorCode.MALFORMED and "padding" in e.value.message
    d = codec.descriptor("t", [5], "uint8", bits, 0.1, 0, None, "raw", len(bad))
    with pytest.raises(WireError):
        decode(d, bad)


def test_decode_tables_stay_bounded():
    q = np.arange(16, dtype=np.uint8)
    p = pack_bits(q, 4)
    for i in range(3 * quantize._LUT_MAX):
        s = 0.001 * (i + 1)
        d = codec.descriptor("t", [16], "uint8", 4, s, 3, None, "raw", len(p))
        assert np.array_equal(decode(d, p), (q.astype(np.float32) - np.float32(3)) * np.float32(s))
    assert len(quantize._LUTS) <= quantize._LUT_MAX


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantize_matches_the_formula(bits):
    # quantize() clips with two ufuncs instead of np.clip: the same codes, saturation included
    x = np.concatenate([RNG.uniform(-5, 20, 997), [0.5, 1.5, 2.5, -0.5, 1e9, -1e9]]).astype(np.float32)
    for zp in (0, (1 << bits) // 2):
        ref = np.clip(np.rint(x / np.float32(0.05)) + np.float32(zp), 0, (1 << bits) - 1).astype(np.uint8)
        assert np.array_equal(codec.quantize(x, bits, 0.05, zp), ref)


def test_check_descriptor_fast_path_keeps_every_rule():
    d, p = good()

    class MyInt(int):  # int subclasses are integers (the exact-type test is only a fast path)
        pass

    assert codec.check_descriptor({**d, "bits": MyInt(8), "shape": [MyInt(8), 4, 4]}, len(p)) == (128, 128)
    for change in (
        {"shape": [8, True, 4]},
        {"shape": [8, 4.0, 4]},
        {"channels": True},
        {"channels": 8.0},
        {"nbytes": 128.0},
        {"nbytes": True},
        {"zero_point": False},
        {"scale": True},
        {"scale": float("inf")},
        {"name": b"z"},
        {"dtype": b"uint8"},
        {"dtype": ["uint8"]},
        {"shape": (8,) * 9},
        {"channels": -1},
    ):
        with pytest.raises(WireError) as e:
            codec.check_descriptor({**d, **change}, len(p))
        assert e.value.code == ErrorCode.MALFORMED, change
    for bad in (["raw"], 1, None):  # not a string: a type error (PROTOCOL.md §4), not an unknown codec
        with pytest.raises(WireError) as e:
            codec.check_descriptor({**d, "codec": bad}, len(p))
        assert e.value.code == ErrorCode.MALFORMED, bad
    with pytest.raises(WireError) as e:
        codec.check_descriptor({**d, "codec": "lz4"}, len(p))
    assert e.value.code == ErrorCode.UNSUPPORTED
