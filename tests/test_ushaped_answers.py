"""The U-shaped answer's encoding (docs/PROTOCOL.md §15.6.1, BUNDLE.md §7.3 ``answer``): the body's
output comes back in the dtype each mode states (the exporter: the tokens' own, float32 / float16 /
8-bit codes with a per-tensor scale), float32 for a mode that states none.

Real components throughout: the tiny SFPrompt bundle of tests/ushaped_fixtures.py (trained and
exported here), the real daemon (ONNX Runtime body, batcher) on loopback ZeroMQ, a hand-written
DEALER client (what another language's client would send and read) and the real agent.

Checked: the §15.6.1 test vector against the code; the reader's rules for ``answer``; each mode's
answer is byte for byte the encoding of the body output the daemon computed (got from the same
daemon in float32), with payloads of exactly T·D·4, T·D·2 and T·D bytes; the agent's tail on a
decoded answer equals the tail on the locally encoded-then-decoded body output, exactly; served
logits equal the offline head → codec → body → answer codec → tail; accuracy on the real frames
with compact answers within a stated tolerance of float32 answers; a bundle without ``answer``
(every bundle before it) still answers float32 and is still served; the agent's session refuses a
result in the wrong encoding (MALFORMED) and expects float32 from a server without the feature; a
body output the answer cannot carry is INTERNAL, never sent.
"""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
from build_fixtures import one_torch_thread  # noqa: F401  (pytest fixture by name)
from ushaped_fixtures import FRAMES, HandClient, bundle, offline_logits, samples  # noqa: F401  (fixtures by name)

from edgesplit.bundle import Bundle, BundleError, write_manifest
from edgesplit.bundle_schema import validate_manifest
from edgesplit.data.transforms import preprocess
from edgesplit.engine import create_engine
from edgesplit.wire import codec
from edgesplit.wire import protocol as P
from edgesplit.wire import split_train as S
from edgesplit.wire.errors import ErrorCode, WireError

# Served accuracy with compact answers may differ from float32 answers' by at most this many of the
# test's frames (the manifest's accuracies are measured the same way at export).
ACCURACY_TOLERANCE_FRAMES = 1


@pytest.fixture(scope="module")
def old_bundle(bundle, tmp_path_factory) -> Bundle:
    """The same graphs under a manifest written as before ``answer`` existed: no mode states one."""
    root = tmp_path_factory.mktemp("old-ushaped")
    m = copy.deepcopy(bundle.manifest)
    T, D = m["wire"]["shape"]
    for mode in m["modes"]:
        del mode["answer"]
        mode["bytes_down_per_frame"] = T * D * 4
    m["wire"]["result"]["dtype"] = "float32"
    for entry in m["files"].values():
        shutil.copy(bundle.root / entry["path"], root / entry["path"])
    write_manifest(root, m)
    return Bundle.load(root)


@pytest.fixture(scope="module")
def server(bundle, old_bundle):
    from edgesplit.server.daemon import Server

    with Server([bundle, old_bundle], "tcp://127.0.0.1:0", threads=1, max_batch=8, max_queue_delay_us=500) as srv:
        yield srv


@pytest.fixture(scope="module")
def tokens(bundle, samples) -> list[np.ndarray]:
    head = create_engine(bundle.file("head"), threads=1)
    return [head.run1(preprocess(s.data, bundle.input_spec)[None])[0] for s in samples]


def test_the_protocol_test_vector_is_what_the_code_computes():
    """PROTOCOL.md §15.6.1's test vector."""
    x = np.array([[-1.5, 0.0], [0.75, 3.0]], np.float32)
    d, p = S.encode(x, 8, "body_out")
    assert (d["dtype"], d["bits"], d["zero_point"], d["nbytes"]) == ("uint8", 8, 85, 4)
    assert d["scale"] == 0.01764705963432789 and np.float32(d["scale"]).view(np.uint32) == 0x3C909091
    assert d["scale"] == float(np.float32(4.5 / 255))
    assert bytes(p).hex() == "00557fff"
    quotients = x / np.float32(d["scale"])  # one float32 division each
    assert quotients.dtype == np.float32 and quotients[1, 0] < 42.5  # 42.499996: code 42 + 85, no tie
    np.testing.assert_array_equal(codec.decode(d, p), np.array([[-1.5000001, 0.0], [0.7411765, 3.0000002]], np.float32))
    d16, p16 = S.encode(x, 16, "body_out")
    assert (d16["dtype"], d16["nbytes"]) == ("float16", 8) and bytes(p16).hex() == "00be0000003a0042"


def test_the_reader_takes_an_answer_or_none_and_refuses_a_wrong_one(bundle, old_bundle):
    assert [(m.answer_dtype, m.answer_bits) for m in bundle.modes] == [("float32", 32), ("float16", 16), ("uint8", 8)]
    assert {(m.answer_dtype, m.answer_bits) for m in old_bundle.modes} == {("float32", 32)}  # absent: float32
    for bad in ({"dtype": "float16", "bits": 8}, {"dtype": "bfloat16", "bits": 16}, {"bits": 8}, "uint8", None):
        m = copy.deepcopy(bundle.manifest)
        m["modes"][2]["answer"] = bad
        with pytest.raises(BundleError, match="answer"):
            validate_manifest(m)


def test_each_mode_answers_in_its_dtype_byte_for_byte(bundle, server, tokens):
    """Each mode's answer is exactly the §15.6.1 encoding of the body output the daemon computed:
    the same tokens (as the daemon decodes them) sent again in the float32 mode give that output in
    float32, and encoding it here gives the same descriptor and the same bytes."""
    T, D = bundle.wire_spec["shape"]
    c = HandClient(server.endpoint, bundle.hash, serving="u-shaped")
    try:
        assert c.welcome["features"] == ["u_shaped", "u_shaped_answers"]
        header_bytes = {}
        for m in bundle.modes:
            for z in tokens[:8]:
                h, (frame,) = c.request_tokens(m.id, z, m.bits)
                (d,) = h["outputs"]
                assert (d["name"], d["shape"], d["dtype"], d["bits"], d["codec"]) == (
                    "body_out",
                    [T, D],
                    m.answer_dtype,
                    m.answer_bits,
                    "raw",
                )
                assert len(frame) == d["nbytes"] == T * D * m.bits // 8  # 35328 / 17664 / 8832 for 69x128
                ref_h, (ref_frame,) = c.request_tokens(0, S.roundtrip(z, m.bits), 32)  # the same body input, float32
                ref = codec.decode(ref_h["outputs"][0], ref_frame)
                want_d, want_p = S.encode(ref, m.bits, "body_out")
                assert {k: d[k] for k in want_d} == want_d and bytes(frame) == bytes(want_p)
                header_bytes.setdefault(m.dtype, set()).add(h["_header_bytes"])
        print(f"\nresult header bytes by answer dtype: {header_bytes}; payload bytes T*D*bits/8 with T,D={T},{D}")
        # the result's msgpack header (descriptor and timings) is the same size whatever the dtype, to a few bytes
        assert all(180 < n < 240 for sizes in header_bytes.values() for n in sizes), header_bytes
    finally:
        c.close()


def test_the_agents_tail_on_a_decoded_answer_is_the_tail_on_the_encoded_body_output(bundle, server, tokens):
    """Exact: the agent's tail output from a decoded float16 / 8-bit answer equals the tail run here
    on the daemon's float32 body output encoded and decoded here."""
    from edgesplit.edge.results import FrameResult
    from edgesplit.edge.ushaped import UShapedPart

    part = UShapedPart(bundle, threads=1)
    tail = create_engine(bundle.file("tail"), threads=1)
    c = HandClient(server.endpoint, bundle.hash, serving="u-shaped")
    try:
        for m in bundle.modes[1:]:
            for z in tokens[:8]:
                h, (frame,) = c.request_tokens(m.id, z, m.bits)
                got = part.finish(FrameResult(0, "k"), codec.decode(h["outputs"][0], frame))
                ref_h, (ref_frame,) = c.request_tokens(0, S.roundtrip(z, m.bits), 32)
                ref = codec.decode(ref_h["outputs"][0], ref_frame)
                np.testing.assert_array_equal(got, tail.run1(S.roundtrip(ref, m.bits)[None])[0])
    finally:
        c.close()


def test_served_with_compact_answers_and_an_old_bundle_still_float32(bundle, old_bundle, server, samples):
    """The real agent on both bundles, every mode: logits equal the offline path with each bundle's
    answer encoding; the old bundle's answers are float32 (T·D·4 bytes) in every mode; accuracy with
    compact answers within ACCURACY_TOLERANCE_FRAMES of float32 answers for the same tokens."""
    from edgesplit.edge.agent import Agent

    labels = np.asarray([s.label for s in samples])
    T, D = bundle.wire_spec["shape"]
    acc: dict[str, dict[str, float]] = {}
    for b in (bundle, old_bundle):
        with Agent(b, server.endpoint, threads=1) as agent:
            assert "u_shaped_answers" in agent.welcome.features
            for m in b.modes:
                got = [agent.infer(s, mode=m.id) for s in samples]
                assert all(r.ok and r.source == "server" for r in got), [r.to_json() for r in got]
                assert {r.bytes_received for r in got} == {T * D * int(m.answer_bits or 32) // 8}
                logits = np.stack([r.logits for r in got])
                np.testing.assert_allclose(logits, offline_logits(b, m.id, samples), rtol=1e-4, atol=1e-4)
                acc.setdefault(m.name, {})["float32 answer" if b is old_bundle else "own answer"] = float(
                    np.mean(logits.argmax(1) == labels)
                )
    assert {x for a in acc.values() for x in a} == {"float32 answer", "own answer"}
    print(f"\naccuracy on {FRAMES} frames of cifar10:test by mode: {acc}")
    assert acc["f32"]["own answer"] == acc["f32"]["float32 answer"]  # the same bytes: nothing changed
    for name in ("f16", "u8"):
        delta = abs(acc[name]["own answer"] - acc[name]["float32 answer"])
        assert delta <= ACCURACY_TOLERANCE_FRAMES / FRAMES, (name, acc[name])


def test_an_old_bundle_answers_float32_on_the_wire(old_bundle, server, tokens):
    T, D = old_bundle.wire_spec["shape"]
    c = HandClient(server.endpoint, old_bundle.hash, serving="u-shaped")
    try:
        for m in old_bundle.modes:
            h, (frame,) = c.request_tokens(m.id, tokens[0], m.bits)
            assert (h["outputs"][0]["dtype"], h["outputs"][0]["bits"], len(frame)) == ("float32", 32, T * D * 4)
    finally:
        c.close()


def test_the_agents_session_checks_the_answer_against_the_welcome(bundle):
    """Socket-free: with ``"u_shaped_answers"`` in the welcome, a result must be in the mode's answer
    encoding; without it (a server before the feature), float32. Anything else is MALFORMED and
    never reaches the tail."""
    from edgesplit.edge.ushaped import session_for
    from edgesplit.wire.messages import Welcome
    from edgesplit.wire.session_events import Answered, Refused

    T, D = bundle.wire_spec["shape"]
    body_out = np.random.default_rng(2).normal(size=(T, D)).astype(np.float32)

    def answer(features: tuple[str, ...], mode: int, bits: int):
        s = session_for(bundle, "tcp://127.0.0.1:1")(bundle.hash, "agent")
        s.hello(0)
        welcome = Welcome(
            bundle.hash, "srv", credits=4, limits=P.DEFAULT_LIMITS, heartbeat_ms=0, codecs=("raw",), features=features
        )
        s.receive(P.pack(welcome.to_header()), 1)
        d, p = S.encode(np.zeros((T, D), np.float32), bundle.mode(mode).bits, "tokens")
        req, _ = s.request(mode, d, p, 2)
        od, op = S.encode(body_out, bits, "body_out")
        result = P.result(req.rid, [od], queue_us=1, compute_us=1, batch_size=1, server_us=2)
        (ev,) = s.receive([P.pack_header(result), op], 3)
        return ev

    new, old = ("u_shaped", "u_shaped_answers"), ("u_shaped",)
    assert isinstance(answer(new, 1, 16), Answered) and isinstance(answer(new, 2, 8), Answered)
    assert isinstance(answer(new, 0, 32), Answered) and isinstance(answer(old, 2, 32), Answered)
    for features, mode, bits in ((new, 1, 32), (new, 2, 16), (old, 1, 16), (old, 2, 8)):
        ev = answer(features, mode, bits)
        assert isinstance(ev, Refused) and ev.code == ErrorCode.MALFORMED and ev.rid is not None, (features, mode)
        assert "does not match the mode's answer" in ev.message


def test_a_body_output_the_answer_cannot_carry_is_internal(bundle):
    from edgesplit.server.batcher import Item
    from edgesplit.server.ushaped_runner import UShapedRunner

    T, D = bundle.wire_spec["shape"]
    runner = UShapedRunner(bundle, threads=1)

    def item(mode: int) -> Item:
        return Item(
            key=(bundle.hash, mode), identity=b"a", req_id=1, desc={}, payload=b"", rows=1, single=True, t_recv_ns=0
        )

    big = np.full((T, D), 7e4, np.float32)  # beyond float16's 65504
    nan = np.zeros((T, D), np.float32)
    nan[1, 2] = np.nan
    for mode, out in ((1, big), (2, nan)):
        with pytest.raises(WireError) as e:
            runner.answer(item(mode), out)
        assert e.value.code == ErrorCode.INTERNAL
    (d,), p = runner.answer(item(2), big)  # 8-bit codes carry any finite range
    assert d["dtype"] == "uint8" and np.allclose(codec.decode(d, p), big, rtol=1e-6)
    (d,), p = runner.answer(item(0), big)  # float32: the output as computed
    assert d["dtype"] == "float32" and bytes(p) == big.tobytes()
