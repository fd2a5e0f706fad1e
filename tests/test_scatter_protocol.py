"""Protocol v1.2, scatter/gather for ED-ViT (docs/PROTOCOL.md §13): every new message round-trips
through pack and parse, every malformed one gets its code (and the frame id when readable), and a
daemon that does not serve ED-ViT still answers a well-formed scatter UNSUPPORTED."""

from __future__ import annotations

import re
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from edgesplit.bundle import Bundle
from edgesplit.wire import protocol as P
from edgesplit.wire import scatter_messages as S
from edgesplit.wire.codec import ErrorCode, descriptor, encode_float
from edgesplit.wire.protocol import Limits, ProtocolError
from edgesplit.wire.scatter import MAX_SUBMODELS, validators_for

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "PROTOCOL.md"
SHIPPED = ROOT / "models" / "cifar10-resnet20-bottlefit"
HASH = "cd" * 32
SCATTER = (P.FEATURE_SCATTER,)
FUSED = (P.FEATURE_FUSED_REQUESTS,)
E = ErrorCode


def input_tensor():
    """A preprocessed input frame [3, 32, 32] as float16, and its descriptor."""
    x = np.random.default_rng(0).standard_normal((3, 32, 32)).astype(np.float16)
    return descriptor("image", x.shape, "float16", 16, 1.0, 0, 3, "raw", x.nbytes), x.tobytes()


def features(submodel: int, dim: int = 64):
    return encode_float(np.arange(dim, dtype=np.float32) / (submodel + 1), name=f"feat{submodel}")


def gather_parts(rid=42, submodel=1, **timing):
    d, f = features(submodel)
    kw = dict(queue_us=40, decode_us=900.5, compute_us=12000, batch_size=1, worker_us=13100)
    kw.update(timing)
    return S.gather(rid, submodel, d, **kw), [f]


def expect(parts, code, features=SCATTER, limits=P.DEFAULT_LIMITS, req_id="any"):
    with pytest.raises(ProtocolError) as e:
        P.parse(parts, limits, features)
    assert e.value.code == code, f"expected {code.name}, got {e.value}"
    if req_id != "any":
        assert e.value.req_id == req_id, e.value
    return e.value


def raw(h: dict) -> bytes:
    return msgpack.packb(h, use_bin_type=True)


@pytest.fixture(scope="module")
def jpeg(cifar_samples):
    """A real CIFAR-10 test JPEG (32x32) and its descriptor."""
    data = cifar_samples[0].data
    assert data[:3] == b"\xff\xd8\xff"
    return S.jpeg_descriptor(len(data), 32, 32), data


# -- round trips ---------------------------------------------------------------------------------


def test_every_new_message_round_trips(jpeg):
    d_in, x = input_tensor()
    d_feat, f = features(2)
    welcome = S.worker_welcome(
        HASH,
        "worker-a",
        [0, 1],
        credits=4,
        limits=Limits(),
        heartbeat_ms=5000,
        codecs=["raw"],
        features=(P.FEATURE_SCATTER, P.FEATURE_SCATTER_JPEG),
    )
    cases = [
        (S.worker_hello(HASH, "cam", [0, 1], max_inflight=4), [], SCATTER),
        (S.worker_hello(HASH, "cam"), [], SCATTER),
        (welcome, [], SCATTER),
        (S.scatter(7, 90, [0, 1], d_in), [x], SCATTER),
        (S.scatter(2**64 - 1, 12.5, [15], jpeg[0]), [jpeg[1]], SCATTER),
        (S.scatter(0, 0, list(range(MAX_SUBMODELS)), jpeg[0]), [jpeg[1]], SCATTER),
        gather_parts() + (SCATTER,),
        (S.scatter_error(42, E.DEADLINE_EXCEEDED, "late", submodel=3), [], SCATTER),
        (S.scatter_error(42, E.UNKNOWN_SUBMODEL, "not held"), [], SCATTER),
        (S.scatter_error(None, E.MALFORMED, "bad"), [], SCATTER),
        (S.fused_request(42, 0, [0, 2], [d_feat, d_feat], deadline_ms=30), [f, f], FUSED),
        (S.fused_result(42, [features(0)[0]], [0, 2], queue_us=1, compute_us=2, batch_size=1, server_us=3), [f], FUSED),
        (S.fused_result(43, [features(0)[0]], [], queue_us=1, compute_us=2, batch_size=1, server_us=3), [f], FUSED),
    ]
    for header, frames, feats in cases:
        msg = P.parse(P.pack(header, frames), P.DEFAULT_LIMITS, feats)
        assert msg.kind == header["kind"] and msg.header == header and msg.frames == frames
    assert welcome["features"] == ["scatter", "scatter_jpeg"] and welcome["submodels"] == [0, 1]
    assert "submodels" not in S.worker_hello(HASH, "cam")
    assert (
        S.scatter(7, 90.0, [0], d_in)["deadline_ms"] == 90 and type(S.scatter(7, 90.0, [0], d_in)["deadline_ms"]) is int
    )


def test_typed_views_read_and_rebuild_the_same_headers(jpeg):
    d_in, x = input_tensor()
    for h in (S.scatter(7, 90, [0, 1], d_in), S.scatter(8, 12.5, [3], jpeg[0])):
        v = S.Scatter.from_header(P.parse(P.pack(h, [x if h["id"] == 7 else jpeg[1]]), features=SCATTER).header)
        assert v.frame_id == h["id"] and v.submodels == tuple(h["submodels"]) and v.to_header() == h
        assert v.is_jpeg == (h["id"] == 8)
    h, frames = gather_parts(rid=9, submodel=4)
    g = S.Gather.from_header(P.parse(P.pack(h, frames), features=SCATTER).header)
    assert (g.frame_id, g.submodel, g.output["name"]) == (9, 4, "feat4")
    assert g.timings == S.GatherTimings(queue_us=40, decode_us=900.5, compute_us=12000, worker_us=13100, batch_size=1)
    assert g.to_header() == h
    w = S.worker_welcome(HASH, "w", [2, 5], credits=2, limits=Limits(max_frames=4), heartbeat_ms=0, codecs=["raw"])
    ww = S.WorkerWelcome.from_header(P.parse(P.pack(w), features=SCATTER).header)
    assert ww.submodels == (2, 5) and ww.terms.limits.max_frames == 4 and ww.terms.features == ("scatter",)
    assert ww.to_header() == w
    for e in (S.scatter_error(3, E.INTERNAL, "x", 1), S.scatter_error(None, E.NOT_READY, "y")):
        r = S.ScatterErrorReply.from_header(P.parse(P.pack(e), features=SCATTER).header)
        assert r.to_header() == e and r.submodel == e.get("submodel")
    future = S.ScatterErrorReply.from_header({**S.scatter_error(3, E.MALFORMED, "x", 1), "code": 99})
    assert future.code == E.INTERNAL and future.frame_id == 3 and future.submodel == 1
    d_feat, f = features(0)
    fr = S.fused_request(5, 0, [0, 3], [d_feat, d_feat])
    v = S.FusedRequest.from_header(P.parse(P.pack(fr, [f, f]), features=FUSED).header)
    assert v.submodels == (0, 3) and len(v.tensors) == 2 and v.to_header() == fr


# -- without the feature: v1.1 behaviour ---------------------------------------------------------


def test_without_the_feature_scatter_and_gather_stay_reserved(jpeg):
    d_in, x = input_tensor()
    e = expect(P.pack(S.scatter(11, 90, [0], d_in), [x]), E.UNSUPPORTED, features=(), req_id=11)
    assert "scatter" in e.message
    expect(P.pack(*gather_parts(rid=12)), E.UNSUPPORTED, features=(), req_id=12)
    # whatever their content: a malformed scatter is UNSUPPORTED too, as in v1.1
    expect([raw({"v": 1, "kind": "scatter", "id": 13})], E.UNSUPPORTED, features=(), req_id=13)
    expect([raw({"v": 1, "kind": "scatter", "id": 13})], E.MALFORMED, req_id=13)
    # the keys the features add to existing kinds are unknown keys, ignored
    h = {**P.hello(HASH, "cam"), "submodels": "all of them"}
    assert P.parse([raw(h)]).kind == "hello"
    expect([raw(h)], E.MALFORMED, req_id=None)
    r = {**P.request(3, 0, [d_in]), "submodels": [0, 1]}  # two ids, one tensor: only fused_requests says so
    assert P.parse(P.pack(r, [x])).id == 3
    expect(P.pack(r, [x]), E.MALFORMED, features=FUSED, req_id=3)
    # the other reserved kinds stay reserved even for a worker
    for kind in ("train_fwd", "train_bwd", "model_update"):
        expect([raw({"v": 1, "kind": kind, "id": 1})], E.UNSUPPORTED, req_id=1)


def test_unknown_feature_names_the_known_ones():
    with pytest.raises(ValueError, match="fused_requests.*scatter"):
        validators_for(["scater"])
    with pytest.raises(ValueError, match="scater"):
        P.parse(P.pack(P.ping(1)), features=("scater",))
    both = validators_for([P.FEATURE_SCATTER, P.FEATURE_FUSED_REQUESTS, P.FEATURE_SCATTER_JPEG])
    assert {"scatter", "gather", "request", "result", "hello", "ping"} <= both.keys()


# -- malformed scatters --------------------------------------------------------------------------


def test_scatter_missing_and_mistyped_fields():
    d_in, x = input_tensor()
    good = S.scatter(7, 90, [0, 1], d_in)
    for key in ("id", "deadline_ms", "submodels", "tensors"):
        bad = {k: v for k, v in good.items() if k != key}
        expect(P.pack(bad, [x]), E.MALFORMED, req_id=None if key == "id" else 7)
    for key, value in (
        ("id", -1),
        ("id", 1.0),
        ("id", "7"),
        ("deadline_ms", -1),
        ("deadline_ms", "soon"),
        ("deadline_ms", float("nan")),
        ("deadline_ms", True),
        ("deadline_ms", None),
        ("submodels", []),
        ("submodels", [1, 0]),
        ("submodels", [0, 0]),
        ("submodels", [16]),
        ("submodels", [-1]),
        ("submodels", [0, 1.0]),
        ("submodels", [True]),
        ("submodels", {"0": 1}),
        ("submodels", 3),
        ("tensors", []),
        ("tensors", [d_in, d_in]),
        ("tensors", d_in),
        ("tensors", ["z"]),
    ):
        expect(P.pack({**good, key: value}, [x]), E.MALFORMED, req_id=None if key == "id" else 7)


def test_too_many_submodels_is_too_large_before_the_entries_are_read():
    d_in, x = input_tensor()
    h = {**S.scatter(7, 90, [0], d_in), "submodels": list(range(MAX_SUBMODELS + 1))}
    e = expect(P.pack(h, [x]), E.TOO_LARGE, req_id=7)
    assert "17 sub-models" in e.message
    h["submodels"] = ["not", "ids"] * 9  # the count is judged first
    expect(P.pack(h, [x]), E.TOO_LARGE, req_id=7)


def test_scatter_frame_rules():
    d_in, x = input_tensor()
    h = S.scatter(7, 90, [0], d_in)
    expect(P.pack(h, []), E.MALFORMED, req_id=7)
    expect(P.pack(h, [x, x]), E.MALFORMED, req_id=7)
    # a descriptor that does not match its frame
    expect(P.pack(h, [x[:-2]]), E.MALFORMED, req_id=7)
    expect(P.pack(S.scatter(7, 90, [0], {**d_in, "nbytes": len(x) + 2}), [x + b"\0\0"]), E.MALFORMED, req_id=7)
    expect(P.pack(S.scatter(7, 90, [0], {**d_in, "dtype": "int8"}), [x]), E.UNSUPPORTED, req_id=7)
    expect(P.pack(h, [x]), E.TOO_LARGE, limits=Limits(max_frame_bytes=1024), req_id=7)
    # one frame, no batch axis
    batch = descriptor("image", (1, 3, 32, 32), "float16", 16, 1.0, 0, 3, "raw", len(x))
    expect(P.pack(S.scatter(7, 90, [0], batch), [x]), E.MALFORMED, req_id=7)


def test_jpeg_input_rules(jpeg):
    d, data = jpeg
    ok = P.pack(S.scatter(7, 90, [0], d), [data])
    assert P.parse(ok, features=SCATTER).header["tensors"][0]["dtype"] == "jpeg"
    # the JPEG frame over the frame limit
    e = expect(ok, E.TOO_LARGE, limits=Limits(max_frame_bytes=len(data) - 1), req_id=7)
    assert "jpeg frame" in e.message
    # a small JPEG claiming an image that decodes past the limit
    big = S.jpeg_descriptor(len(data), 4000, 4000)
    e = expect(P.pack(S.scatter(7, 90, [0], big), [data]), E.TOO_LARGE, req_id=7)
    assert "4000x4000" in e.message
    for key, value, code in (
        ("nbytes", len(data) + 1, E.MALFORMED),
        ("codec", "zstd", E.UNSUPPORTED),
        ("codec", 3, E.MALFORMED),
        ("bits", 16, E.MALFORMED),
        ("channels", 3, E.MALFORMED),
        ("shape", [32, 32], E.MALFORMED),
        ("shape", [3, 32, 32], E.MALFORMED),
        ("shape", [0, 32, 3], E.MALFORMED),
        ("shape", [32, 70000, 3], E.MALFORMED),
        ("name", 5, E.MALFORMED),
        ("zero_point", 0.5, E.MALFORMED),
    ):
        expect(P.pack(S.scatter(7, 90, [0], {**d, key: value}), [data]), code, req_id=7)
    expect(P.pack(S.scatter(7, 90, [0], {k: v for k, v in d.items() if k != "scale"}), [data]), E.MALFORMED, req_id=7)
    # not a JPEG at all
    png = b"\x89PNG\r\n\x1a\n" + data[8:]
    e = expect(P.pack(S.scatter(7, 90, [0], d), [png]), E.MALFORMED, req_id=7)
    assert "FF D8 FF" in e.message
    # "jpeg" is a scatter input only: in a request it is an unknown dtype
    expect(P.pack(P.request(7, 0, [d]), [data]), E.UNSUPPORTED, features=SCATTER, req_id=7)


# -- malformed gathers and the keys the features add ---------------------------------------------


def test_gather_rules():
    h, frames = gather_parts(rid=42, submodel=1)
    for key in ("id", "submodel", "outputs", "timing"):
        bad = {k: v for k, v in h.items() if k != key}
        expect(P.pack(bad, frames), E.MALFORMED, req_id=None if key == "id" else 42)
    for key in ("queue_us", "decode_us", "compute_us", "worker_us", "batch_size"):
        bad = {**h, "timing": {k: v for k, v in h["timing"].items() if k != key}}
        expect(P.pack(bad, frames), E.MALFORMED, req_id=42)
        expect(P.pack({**h, "timing": {**h["timing"], key: -1}}, frames), E.MALFORMED, req_id=42)
    for value in (16, -1, "1", 1.0, None):
        expect(P.pack({**h, "submodel": value}, frames), E.MALFORMED, req_id=42)
    expect(P.pack(h, []), E.MALFORMED, req_id=42)
    expect(P.pack(h, frames * 2), E.MALFORMED, req_id=42)
    expect(P.pack(h, [frames[0][:-4]]), E.MALFORMED, req_id=42)  # lying nbytes
    # features are a raw float vector
    d16 = descriptor("feat1", (64,), "uint8", 8, 0.1, 0, None, "raw", 64)
    expect(P.pack({**h, "outputs": [d16]}, [b"\0" * 64]), E.UNSUPPORTED, req_id=42)
    d2 = descriptor("feat1", (8, 8), "float32", 32, 1.0, 0, None, "raw", 256)
    expect(P.pack({**h, "outputs": [d2]}, [b"\0" * 256]), E.MALFORMED, req_id=42)


def test_handshake_and_error_keys():
    hello = S.worker_hello(HASH, "cam", [0, 1])
    for value in ([], [1, 1], [16], "0", list(range(17))):
        code = E.TOO_LARGE if isinstance(value, list) and len(value) > MAX_SUBMODELS else E.MALFORMED
        expect([raw({**hello, "submodels": value})], code, req_id=None)
    assert P.parse([raw({**hello, "submodels": None})], features=SCATTER).kind == "hello"
    w = S.worker_welcome(HASH, "w", [0], credits=1, limits=Limits(), heartbeat_ms=0, codecs=["raw"])
    expect([raw({k: v for k, v in w.items() if k != "submodels"})], E.MALFORMED, req_id=None)
    expect([raw({**w, "submodels": [0, 99]})], E.MALFORMED, req_id=None)
    err = S.scatter_error(42, E.DEADLINE_EXCEEDED, "late", submodel=3)
    for value in (16, -1, "3", 3.0):
        expect([raw({**err, "submodel": value})], E.MALFORMED, req_id=42)


def test_fused_request_and_result_keys():
    d, f = features(0)
    r = S.fused_request(42, 0, [0, 2], [d, d])
    expect(P.pack({**r, "submodels": [0]}, [f, f]), E.MALFORMED, features=FUSED, req_id=42)
    expect(P.pack({**r, "submodels": [2, 0]}, [f, f]), E.MALFORMED, features=FUSED, req_id=42)
    expect(P.pack({**r, "submodels": list(range(17))}, [f, f]), E.TOO_LARGE, features=FUSED, req_id=42)
    compact = {k: v for k, v in r.items() if k != "tensors"}
    e = expect(P.pack(compact, [f]), E.MALFORMED, features=FUSED, req_id=42)
    assert "compact" in e.message
    assert P.parse(P.pack(P.request(5, 0, [d]), [f]), features=FUSED).id == 5  # a plain request still passes
    res = S.fused_result(42, [d], [0, 2], queue_us=1, compute_us=2, batch_size=1, server_us=3)
    for value in ([2, 0], [16], "0,2"):
        expect(P.pack({**res, "used": value}, [f]), E.MALFORMED, features=FUSED, req_id=42)


# -- the document says what the code does --------------------------------------------------------


def test_protocol_doc_section_13_names_what_the_code_builds(jpeg):
    text = DOC.read_text()
    m = re.search(r"\n## 13\. (.*)", text, re.S)
    assert m, "docs/PROTOCOL.md lost its §13 (scatter/gather)"
    section = m.group(1)
    d_in, _ = input_tensor()
    built = [
        S.scatter(1, 1, [0], d_in),
        gather_parts()[0],
        S.worker_hello(HASH, "c", [0]),
        S.worker_welcome(HASH, "w", [0], credits=1, limits=Limits(), heartbeat_ms=0, codecs=["raw"]),
        S.scatter_error(1, E.INTERNAL, "x", 0),
        S.fused_request(1, 0, [0], [features(0)[0]]),
        S.fused_result(1, [features(0)[0]], [0], queue_us=0, compute_us=0, batch_size=1, server_us=0),
    ]
    for h in built:
        for key in h:
            assert f"`{key}`" in text, f"PROTOCOL.md does not name the key '{key}' of {h['kind']}"
    for key in built[1]["timing"]:
        assert f"`timing.{key}`" in section
    for name in (P.FEATURE_SCATTER, P.FEATURE_SCATTER_JPEG, P.FEATURE_FUSED_REQUESTS, "jpeg"):
        assert f'`"{name}"`' in section
    assert f"| {int(E.UNKNOWN_SUBMODEL)} | `UNKNOWN_SUBMODEL` |" in text
    assert f"N ≤ {MAX_SUBMODELS}" in section and "**v1.2** the kinds `scatter` and" in text
    assert jpeg[0]["shape"] == [32, 32, 3] and "`[H, W, 3]`" in section


# -- a daemon that does not serve ED-ViT ---------------------------------------------------------


def test_running_daemon_answers_a_well_formed_scatter_unsupported(jpeg):
    from edgesplit.server.daemon import Server

    bundle = Bundle.load(SHIPPED)
    d_in, x = input_tensor()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)

    def ask(parts) -> P.Message:
        sock.send_multipart(parts)
        assert sock.poll(5000), "no reply from the daemon"
        return P.parse(sock.recv_multipart())

    with Server([bundle], "tcp://127.0.0.1:0", threads=1, max_queue_delay_us=0) as srv:
        sock.connect(srv.endpoint)
        try:
            assert P.FEATURE_SCATTER not in (ask(P.pack(P.hello(bundle.hash, "cam"))).header.get("features") or [])
            for rid, parts in (
                (21, P.pack(S.scatter(21, 90, [0, 1], d_in), [x])),
                (22, P.pack(S.scatter(22, 90, [0], jpeg[0]), [jpeg[1]])),
                (23, P.pack(*gather_parts(rid=23))),
            ):
                reply = ask(parts)
                assert reply.kind == "error", reply.header
                assert reply.header["code"] == E.UNSUPPORTED, reply.header  # not MALFORMED
                assert reply.id == rid
            # and it keeps serving its own bundle
            z = np.zeros(bundle.wire_spec["shape"], np.float32)
            from edgesplit.wire import codec

            dz, pz = codec.encode(z, bundle.mode(0), name=bundle.wire_spec["name"])
            answer = ask(P.pack(P.request(24, 0, [dz]), [pz]))
            assert answer.kind == "result" and answer.id == 24
        finally:
            sock.close(0)
