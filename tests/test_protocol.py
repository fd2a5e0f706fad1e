"""Protocol v1: every kind round-trips; every malformed input gets its defined ProtocolError code."""

from __future__ import annotations

import re
from pathlib import Path

import msgpack
import numpy as np
import pytest

from edgesplit.wire import protocol as P
from edgesplit.wire.codec import ErrorCode, encode_float
from edgesplit.wire.protocol import Limits, ProtocolError

DOC = Path(__file__).resolve().parents[1] / "docs" / "PROTOCOL.md"
HASH = "ab" * 32


def desc(nbytes=512, **kw):
    d = {
        "name": "z",
        "shape": [8, 8, 8],
        "dtype": "uint8",
        "bits": 8,
        "scale": 0.015625,
        "zero_point": 0,
        "channels": 8,
        "codec": "raw",
        "nbytes": nbytes,
    }
    d.update(kw)
    return d


def request_parts(rid=7, payload=b"\x00" * 512, **kw):
    return P.pack(P.request(rid, 0, [desc(len(payload), **kw)], deadline_ms=50), [payload])


def raw_header(h: dict) -> bytes:
    return msgpack.packb(h, use_bin_type=True)


def expect(parts, code, limits=P.DEFAULT_LIMITS, req_id="any"):
    with pytest.raises(ProtocolError) as e:
        P.parse(parts, limits)
    assert e.value.code == code, f"expected {code.name}, got {e.value}"
    if req_id != "any":
        assert e.value.req_id == req_id
    return e.value


# -- every kind round-trips ----------------------------------------------------------------------


def test_every_kind_roundtrips():
    logits_d, logits = encode_float(np.arange(10, dtype=np.float32), name="logits")
    messages = [
        (P.hello(HASH, "cam-1", max_inflight=4), []),
        (P.welcome(HASH, "srv", credits=4, limits=Limits(), heartbeat_ms=5000, codecs=["raw", "zstd"]), []),
        (P.request(2**64 - 1, 3, [desc()], deadline_ms=12.5, t_send_ns=123), [b"\x01" * 512]),
        (P.request(0, 0, [desc()]), [b"\x01" * 512]),
        (P.result(9, [logits_d], queue_us=1.5, compute_us=20, batch_size=4, server_us=30, t_send_ns=5), [logits]),
        (P.error(9, ErrorCode.OVERLOADED, "queue full"), []),
        (P.error(None, ErrorCode.MALFORMED, "bad"), []),
        (P.ping(1, 2), []),
        (P.pong(1), []),
        (P.bye("done"), []),
        (P.bye(), []),
    ]
    for header, frames in messages:
        msg = P.parse(P.pack(header, frames))
        assert msg.kind == header["kind"] and msg.header == header and len(msg.frames) == len(frames)
    err = P.parse(P.pack(P.error(3, ErrorCode.DEADLINE_EXCEEDED, "late"), []))
    assert err.header["code"] == 8 and err.header["name"] == "DEADLINE_EXCEEDED" and err.id == 3


def test_error_codes_are_fixed():
    assert {c.name: int(c) for c in ErrorCode} == {
        "MALFORMED": 1,
        "UNSUPPORTED_VERSION": 2,
        "UNKNOWN_BUNDLE": 3,
        "NOT_READY": 4,
        "UNKNOWN_MODE": 5,
        "TOO_LARGE": 6,
        "OVERLOADED": 7,
        "DEADLINE_EXCEEDED": 8,
        "INTERNAL": 9,
        "UNSUPPORTED": 10,
        "SHUTTING_DOWN": 11,
        "UNKNOWN_SUBMODEL": 12,
        "UNKNOWN_STEP": 13,
    }


# -- malformed messages --------------------------------------------------------------------------


def test_truncated_header():
    parts = request_parts()
    for cut in (1, 5, len(parts[0]) // 2, len(parts[0]) - 1):
        expect([parts[0][:cut], parts[1]], ErrorCode.MALFORMED)


def test_empty_message_and_empty_header():
    expect([], ErrorCode.MALFORMED)
    expect([b""], ErrorCode.MALFORMED)


def test_oversized_header_is_refused_before_unpacking():
    big = raw_header({"v": 1, "kind": "ping", "nonce": 1, "pad": "x" * 70000})
    expect([big], ErrorCode.TOO_LARGE)
    # a header that is not even msgpack is still TOO_LARGE: the size check comes first
    expect([b"\xff" * 70000], ErrorCode.TOO_LARGE)
    small = Limits(max_header_bytes=100)
    expect(request_parts(), ErrorCode.TOO_LARGE, small)


def test_header_not_a_map_or_trailing_bytes():
    expect([msgpack.packb([1, "request"])], ErrorCode.MALFORMED)
    expect([raw_header({"v": 1, "kind": "ping", "nonce": 1}) + b"\x00"], ErrorCode.MALFORMED)
    expect([msgpack.packb({1: 1})], ErrorCode.MALFORMED)  # non-string keys
    expect([msgpack.packb({"v": 1, "kind": "ping", "nonce": msgpack.ExtType(1, b"ab")})], ErrorCode.MALFORMED)
    expect([msgpack.packb({"v": 1, "kind": "ping", "nonce": b"bytes"}, use_bin_type=True)], ErrorCode.MALFORMED)
    expect([b"\x91" * 3000 + b"\x01"], ErrorCode.MALFORMED)  # nesting bomb


def test_wrong_version():
    h = P.request(5, 0, [desc()])
    h["v"] = 2
    e = expect(P.pack(h, [b"\x00" * 512]), ErrorCode.UNSUPPORTED_VERSION, req_id=5)
    assert "2" in e.message
    h.pop("v")
    expect(P.pack(h, [b"\x00" * 512]), ErrorCode.MALFORMED)
    expect([raw_header({"v": "1", "kind": "ping", "nonce": 1})], ErrorCode.MALFORMED)
    expect([raw_header({"v": True, "kind": "ping", "nonce": 1})], ErrorCode.MALFORMED)


def test_unknown_and_reserved_kinds():
    expect([raw_header({"v": 1, "kind": "frobnicate"})], ErrorCode.MALFORMED)
    expect([raw_header({"v": 1, "kind": 3})], ErrorCode.MALFORMED)
    expect([raw_header({"v": 1})], ErrorCode.MALFORMED)
    for kind in P.RESERVED_KINDS:
        expect([raw_header({"v": 1, "kind": kind})], ErrorCode.UNSUPPORTED)


def test_lying_nbytes_and_frame_count():
    payload = b"\x00" * 512
    expect(P.pack(P.request(7, 0, [desc(600)]), [payload]), ErrorCode.MALFORMED, req_id=7)
    expect(P.pack(P.request(7, 0, [desc(512)]), [payload[:500]]), ErrorCode.MALFORMED, req_id=7)
    expect(P.pack(P.request(7, 0, [desc(), desc()]), [payload]), ErrorCode.MALFORMED, req_id=7)
    expect(P.pack(P.request(7, 0, [desc()]), [payload, payload]), ErrorCode.MALFORMED, req_id=7)
    expect(P.pack(P.request(7, 0, []), []), ErrorCode.MALFORMED, req_id=7)
    expect(P.pack(P.ping(1), [b"x"]), ErrorCode.MALFORMED)


def test_frame_limits():
    limits = Limits(max_frame_bytes=256, max_frames=2)
    expect(request_parts(), ErrorCode.TOO_LARGE, limits, req_id=7)
    frames = [b"\x00" * 512] * 3
    expect(P.pack(P.request(7, 0, [desc()] * 3), frames), ErrorCode.TOO_LARGE, Limits(max_frames=2))
    # rows over max_batch
    d = desc(nbytes=8 * 512, shape=[8, 8, 8, 8])
    expect(P.pack(P.request(7, 0, [d]), [b"\x00" * 4096]), ErrorCode.TOO_LARGE, Limits(max_batch=4))


def test_wrong_dtype_and_shape():
    expect(request_parts(dtype="int8"), ErrorCode.UNSUPPORTED, req_id=7)
    expect(request_parts(bits=5), ErrorCode.UNSUPPORTED, req_id=7)
    expect(request_parts(dtype="float32"), ErrorCode.MALFORMED, req_id=7)
    expect(request_parts(shape=[8, 8, 9]), ErrorCode.MALFORMED, req_id=7)
    expect(request_parts(shape=[8, 8]), ErrorCode.MALFORMED, req_id=7)  # channels=8 but no channel axis
    expect(request_parts(codec="brotli"), ErrorCode.UNSUPPORTED, req_id=7)
    h = P.request(7, 0, [desc()])
    h["tensors"] = "z"
    expect(P.pack(h, [b"\x00" * 512]), ErrorCode.MALFORMED, req_id=7)


@pytest.mark.parametrize(
    "field,value",
    [
        ("id", -1),
        ("id", 1.5e19),
        ("id", "7"),
        ("id", True),
        ("id", 1.0),
        ("id", None),
        ("mode", -1),
        ("mode", "0"),
        ("mode", 0.0),
        ("mode", False),
        ("mode", 1 << 31),
        ("mode", None),
        ("deadline_ms", -5),
        ("deadline_ms", "soon"),
        ("deadline_ms", float("inf")),
        ("deadline_ms", float("nan")),
        ("deadline_ms", -0.001),
        ("deadline_ms", True),
        ("t_send_ns", -1),
        ("t_send_ns", 1.0),
        ("t_send_ns", True),
        ("t_send_ns", "1"),
    ],
)
def test_request_field_types(field, value):
    h = P.request(7, 0, [desc()])
    h[field] = value
    expect(P.pack(h, [b"\x00" * 512]), ErrorCode.MALFORMED)


def test_request_fast_path_accepts_what_the_rules_allow():
    for extra in (
        {"deadline_ms": 0},
        {"deadline_ms": 0.0},
        {"deadline_ms": 1e12},
        {"deadline_ms": None},
        {"t_send_ns": 0},
        {"t_send_ns": 2**64 - 1},
        {"t_send_ns": None},
        {"mode": (1 << 31) - 1},
        {"id": 0},
    ):
        h = {**P.request(7, 0, [desc()]), **extra}
        assert P.parse(P.pack(h, [b"\x00" * 512])).header == h


@pytest.mark.parametrize(
    "field,value",
    [
        ("queue_us", -1.0),
        ("queue_us", "1"),
        ("queue_us", float("nan")),
        ("compute_us", True),
        ("server_us", None),
        ("batch_size", 0),
        ("batch_size", 1.0),
        ("batch_size", True),
        ("batch_size", 1 << 32),
    ],
)
def test_result_timing_types(field, value):
    d, logits = encode_float(np.arange(10, dtype=np.float32), name="logits")
    h = P.result(3, [d], queue_us=1, compute_us=2, batch_size=1, server_us=3)
    h["timing"][field] = value
    expect(P.pack(h, [logits]), ErrorCode.MALFORMED, req_id=3)
    del h["timing"][field]
    expect(P.pack(h, [logits]), ErrorCode.MALFORMED, req_id=3)
    h["timing"] = [1, 2]
    expect(P.pack(h, [logits]), ErrorCode.MALFORMED, req_id=3)


def test_result_packer_equals_packing_the_result_map():
    d, logits = encode_float(np.arange(10, dtype=np.float32), name="logits")
    d2, _ = encode_float(np.zeros((3, 10), np.float32), name="logits")
    rp = P.ResultPacker()
    outs, outs2 = [d], [d2]
    for rid, outputs, ts, bs in [
        (7, outs, None, 1),
        (2**64 - 1, outs, 2**64 - 1, 2**31),
        (0, outs2, 5, 3),
        (300, outs, 0, 17),
    ]:
        kw = dict(queue_us=12.34, compute_us=80.06, batch_size=bs, server_us=1e7 + 0.05, t_send_ns=ts)
        raw = rp.pack(rid, outputs, **kw)
        ref = P.result(rid, outputs, **kw)
        assert raw == P.pack_header(ref)
        assert P.parse([raw, b"\x00" * outputs[0]["nbytes"]]).header == ref
    # the outputs cache is keyed by the list object: a new list with other content is not confused
    other = [dict(d, name="other")]
    assert msgpack.unpackb(rp.pack(1, other, queue_us=0, compute_us=0, batch_size=1, server_us=0))["outputs"] == other


def test_pack_reuses_a_packer_per_thread_and_survives_errors():
    import threading

    with pytest.raises(TypeError):
        P.pack({"v": 1, "kind": "ping", "nonce": object()})
    assert msgpack.unpackb(P.pack(P.ping(5))[0]) == P.ping(5)  # no leftover bytes from the failed call
    seen = []
    t = threading.Thread(target=lambda: seen.append(P.packer()))
    t.start()
    t.join()
    assert seen[0] is not P.packer()


def test_missing_fields_of_each_kind():
    examples = {
        "hello": P.hello(HASH, "a"),
        "welcome": P.welcome(HASH, "s", credits=1, limits=Limits(), heartbeat_ms=0, codecs=["raw"]),
        "error": P.error(1, 1, "x"),
        "ping": P.ping(1),
        "pong": P.pong(1),
    }
    for kind, h in examples.items():
        for key in h:
            if key in ("v", "kind") or (kind == "error" and key == "id"):
                continue
            bad = {k: v for k, v in h.items() if k != key}
            expect([raw_header(bad)], ErrorCode.MALFORMED)
    bad = P.hello(HASH, "a")
    bad["caps"]["max_inflight"] = 0
    expect([raw_header(bad)], ErrorCode.MALFORMED)
    bad = P.hello(HASH, "a")
    bad["caps"]["codecs"] = ["raw", 1]
    expect([raw_header(bad)], ErrorCode.MALFORMED)


def test_unknown_keys_are_ignored():
    h = P.request(7, 0, [desc()])
    h["future_field"] = {"anything": [1, 2]}
    h["tensors"][0]["future"] = 1
    assert P.parse(P.pack(h, [b"\x00" * 512])).id == 7


def test_random_bytes_always_give_a_protocol_error():
    rng = np.random.default_rng(0)
    good = request_parts()
    for i in range(600):
        n = int(rng.integers(1, 300))
        if i % 3 == 0:
            header = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        else:  # mutate a valid header: flip bytes
            header = bytearray(good[0])
            for _ in range(int(rng.integers(1, 6))):
                header[int(rng.integers(0, len(header)))] = int(rng.integers(0, 256))
            header = bytes(header)
        parts = [header] + ([good[1]] if i % 2 else [])
        try:
            P.parse(parts)
        except ProtocolError as e:
            assert isinstance(e.code, ErrorCode)
        # anything else (TypeError, KeyError, ...) fails the test by propagating


# -- the document's worked example is what the code produces -------------------------------------


def test_protocol_doc_worked_example_matches_code():
    text = DOC.read_text()
    m = re.search(r"<!-- example-request-hex -->\s*```\n(.*?)```", text, re.S)
    assert m, "docs/PROTOCOL.md lost its worked example block"
    doc_bytes = bytes.fromhex("".join(m.group(1).split()))
    header = P.request(7, 0, [desc()], deadline_ms=50)
    assert doc_bytes == P.pack(header)[0]
    assert P.parse([doc_bytes, b"\x00" * 512]).header == header


def test_protocol_doc_lists_every_code_and_kind():
    text = DOC.read_text()
    for c in ErrorCode:
        assert re.search(rf"\|\s*{int(c)}\s*\|\s*`?{c.name}`?\s*\|", text), f"{c.name} missing from the error table"
    for kind in P.KINDS + P.RESERVED_KINDS:
        assert f"`{kind}`" in text


# -- v1.1: compact requests and welcome.features -------------------------------------------------


class _Mode:
    def __init__(self, channels=8, bits=8, scale=0.015625, zero_point=0):
        self.channels, self.bits, self.scale, self.zero_point = channels, bits, scale, zero_point


def test_compact_request_roundtrips_and_is_small():
    for rid, extra in ((7, {}), (2**64 - 1, {"deadline_ms": 12.5}), (0, {"t_send_ns": 5}), (3, {"tensors": None})):
        h = {**P.request(rid, 2, None), **extra}
        msg = P.parse(P.pack(h, [b"\x01" * 100]))
        assert msg.kind == "request" and msg.header == h and len(msg.frames) == 1
        assert msg.header.get("tensors") is None
    assert "tensors" not in P.request(1, 0, None)
    # the agent's usual compact header: v, kind, id, mode and nothing else
    for rid, size in ((1, 27), (127, 27), (128, 28), (255, 28), (256, 29), (65535, 29), (65536, 31)):
        assert len(P.pack_header(P.request(rid, 1, None))) == size < 40
    assert len(P.pack_header(P.request(1, 1, None, deadline_ms=P.wire_number(50.0)))) == 40


def test_compact_request_frame_rules():
    # exactly one frame (the length against the mode is the server's check: it knows the bundle)
    expect(P.pack(P.request(7, 0, None), []), ErrorCode.MALFORMED, req_id=7)
    e = expect(P.pack(P.request(7, 0, None), [b"\x00" * 8, b"\x00" * 8]), ErrorCode.MALFORMED, req_id=7)
    assert "compact" in e.message
    expect(P.pack(P.request(7, 0, None), [b"\x00" * 300]), ErrorCode.TOO_LARGE, Limits(max_frame_bytes=256), req_id=7)
    # the header fields keep their rules
    for field, value in (("id", -1), ("mode", "0"), ("deadline_ms", -1), ("t_send_ns", 1.5)):
        expect(P.pack({**P.request(7, 0, None), field: value}, [b"\x00"]), ErrorCode.MALFORMED)
    # 'tensors' present but not a list is still MALFORMED (only absent or nil means compact)
    expect(P.pack({**P.request(7, 0, None), "tensors": {}}, [b"\x00" * 512]), ErrorCode.MALFORMED, req_id=7)


def test_compact_descriptor_is_the_mode_default_encoding():
    from edgesplit.wire.codec import check_descriptor, encode

    d = P.compact_descriptor("z", [8, 8, 8], _Mode())
    assert d == desc()  # the descriptor of the worked example in §10
    assert check_descriptor(d, 512) == (512, 512)
    # channel subset and odd packing: [c, h, w] from the mode's channels, ceil(n*bits/8) bytes
    d6 = P.compact_descriptor("z", [12, 8, 8], _Mode(channels=5, bits=6, scale=0.5, zero_point=3))
    assert d6 == {
        "name": "z",
        "shape": [5, 8, 8],
        "dtype": "uint8",
        "bits": 6,
        "scale": 0.5,
        "zero_point": 3,
        "channels": 5,
        "codec": "raw",
        "nbytes": 240,
    }
    x = np.random.default_rng(0).uniform(0, 10, (12, 8, 8)).astype(np.float32)
    for m in (_Mode(), _Mode(12, 4, 0.7, 8), _Mode(5, 6, 0.5, 3), _Mode(12, 2, 3.0, 1)):
        got, payload = encode(x, m, name="z")  # what the agent produces with codec raw
        assert got == P.compact_descriptor("z", [12, 8, 8], m)
        assert len(payload) == got["nbytes"]


def test_welcome_features():
    h = P.welcome(HASH, "s", credits=2, limits=Limits(), heartbeat_ms=0, codecs=["raw"], features=P.SERVER_FEATURES)
    assert h["features"] == ["compact_requests"] == list(P.SERVER_FEATURES)
    assert P.parse(P.pack(h)).header == h
    assert "features" not in P.welcome(HASH, "s", credits=2, limits=Limits(), heartbeat_ms=0, codecs=["raw"])
    for bad in ("compact_requests", [1], ["x"] * 33, {"compact_requests": True}):
        expect([raw_header({**h, "features": bad})], ErrorCode.MALFORMED)
    # unknown feature names are fine (a later revision's), nil is as if absent
    for ok in (["compact_requests", "from_the_future"], [], None):
        assert P.parse([raw_header({**h, "features": ok})]).kind == "welcome"


def test_wire_number():
    assert P.wire_number(None) is None
    assert P.wire_number(50.0) == 50 and type(P.wire_number(50.0)) is int
    assert P.wire_number(12.5) == 12.5 and P.wire_number(7) == 7
    assert type(P.wire_number(1e30)) is float and P.wire_number(float("inf")) == float("inf")


def test_protocol_doc_compact_example_matches_code():
    text = DOC.read_text()
    m = re.search(r"<!-- example-compact-request-hex -->\s*```\n(.*?)```", text, re.S)
    assert m, "docs/PROTOCOL.md lost its compact request example block"
    doc_bytes = bytes.fromhex("".join(m.group(1).split()))
    header = P.request(7, 0, None, deadline_ms=P.wire_number(50.0))
    assert doc_bytes == P.pack_header(header)
    assert f"is {len(doc_bytes)} bytes" in text
    assert P.parse([doc_bytes, b"\x00" * 512]).header == header
    assert P.pack_header(P.request(7, 0, None)) == b"\x84" + doc_bytes[1:27]  # "without a deadline"
    # the frame it carries is the one of the full example (§10): same implied descriptor
    assert P.compact_descriptor("z", [8, 8, 8], _Mode()) == desc()
    assert f'"{P.FEATURE_COMPACT_REQUESTS}"' in text
    assert f"v{P.PROTOCOL_REVISION[0]}.{P.PROTOCOL_REVISION[1]}" in text
