"""U-shaped serving of an SFPrompt bundle (docs/PROTOCOL.md §15.2, §15.6; BUNDLE.md §7.3), end to end
with real components: a tiny SFPrompt student cut from the tiny recipe's ViT and tuned here for a
few SFPrompt steps on a real CIFAR-10 slice, exported by the family's exporter (ONNX graphs checked
against torch), served by the real daemon (ONNX Runtime, the batcher) on loopback to the real agent,
which runs the head, sends the tokens, and runs the tail on the body's output.

The bundle is built in tests/ushaped_fixtures.py (shared with tests/test_ushaped_eval.py).

Checked: served logits equal the bundle's own head -> codec -> body -> tail run here in ONNX
Runtime, per mode; served accuracy equals that offline accuracy, the manifest's, and (float32
tokens) the tuned model's own (full.onnx, and torch); bytes each way as the manifest says (the
answer in the mode's own dtype); the
handshake refuses a serving shape that does not match the bundle, both ways (UNSUPPORTED); the
daemon's checks of a U-shaped request; the agent's session refuses a server that does not offer
``"u_shaped"``; the local fallback answers with full.onnx; ``bench e2e`` reports a U-shaped run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from build_fixtures import one_torch_thread  # noqa: F401  (pytest fixture by name)
from ushaped_fixtures import FRAMES, HandClient, bundle, full_logits, offline_logits, samples  # noqa: F401  (fixtures by name)

from edgesplit.bundle import Bundle
from edgesplit.data.sources import open_source, take
from edgesplit.data.transforms import preprocess
from edgesplit.engine import create_engine
from edgesplit.wire import protocol as P
from edgesplit.wire import split_train as S
from edgesplit.wire.errors import ErrorCode

HEAD_TAIL = "models/cifar10-resnet20-bottlefit"  # the shipped head-tail bundle, served beside it


@pytest.fixture(scope="module")
def server(bundle):
    """The daemon holding the U-shaped bundle and a head-tail bundle."""
    from edgesplit.server.daemon import Server

    with Server(
        [bundle, Bundle.load(HEAD_TAIL)], "tcp://127.0.0.1:0", threads=1, max_batch=8, max_queue_delay_us=500
    ) as srv:
        yield srv


# -- the bundle ------------------------------------------------------------------------------------


def test_the_bundle_is_u_shaped_and_says_what_travels(bundle):
    from edgesplit.families.sfprompt.bundle_export import body_package_dir
    from edgesplit.server.body_runner import BodyPackage

    b, m = bundle, bundle.manifest
    T, D = b.wire_spec["shape"]
    assert (b.family, b.serving) == ("sfprompt", "u-shaped") and (T, D) == (1 + 4 + 64, 128)
    assert set(m["files"]) == {"head", "body", "tail", "full"} and b.wire_spec["name"] == "tokens"
    assert [(x.name, x.dtype, x.bits) for x in b.modes] == [
        ("f32", "float32", 32),
        ("f16", "float16", 16),
        ("u8", "uint8", 8),
    ]
    assert b.default_mode.dtype == "float16"
    for raw, x in zip(m["modes"], b.modes):  # the answer comes back in the tokens' own dtype (§15.6.1)
        assert raw["answer"] == {"dtype": x.dtype, "bits": x.bits} and (x.answer_dtype, x.answer_bits) == (
            x.dtype,
            x.bits,
        )
        assert x.bytes_per_frame == T * D * x.bits // 8 and raw["bytes_down_per_frame"] == T * D * x.bits // 8
        assert 0 <= x.accuracy <= 1 and raw["accuracy_source"].startswith(f"onnxruntime, {FRAMES} frames")
    for graph, c in m["export"]["checks"].items():  # each graph against its torch part, on real frames
        assert c["frames"] == FRAMES and c["max_rel_diff"] < 1e-2, (graph, c)
    assert m["export"]["checks"]["full"]["top1_agreement"] == 1.0
    # the body package for split training, written beside it, is the same body
    pkg = BodyPackage.load(body_package_dir(b.root))
    assert pkg.hash == m["sfprompt"]["body_package"] and pkg.tokens == (T, D)
    x = np.random.default_rng(0).normal(size=(2, T, D)).astype(np.float32)
    with torch.no_grad():
        want = pkg.body(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(create_engine(b.file("body"), threads=1).run1(x), want, rtol=1e-3, atol=1e-3)


# -- served ------------------------------------------------------------------------------------------


def test_served_logits_and_accuracy_equal_the_offline_model(bundle, server, samples):
    from edgesplit.edge.agent import Agent
    from edgesplit.families.sfprompt.model import load_student

    labels = np.asarray([s.label for s in samples])
    T, D = bundle.wire_spec["shape"]
    with Agent(bundle, server.endpoint, threads=1) as agent:
        # full requests only (no compact_requests); answers in each mode's encoding
        assert agent.welcome.features == ("u_shaped", "u_shaped_answers")
        served = {}
        for m in bundle.modes:
            got = [agent.infer(s, mode=m.id) for s in samples]
            assert all(r.ok and r.source == "server" and r.mode == m.id for r in got), [r.to_json() for r in got]
            assert {r.bytes_sent for r in got} == {m.bytes_per_frame}
            assert {r.bytes_received for r in got} == {T * D * m.bits // 8}  # the answer in the tokens' dtype
            assert all(r.tail_ms > 0 and r.server_compute_ms > 0 and r.head_ms > 0 for r in got)
            served[m.id] = np.stack([r.logits for r in got])
            np.testing.assert_allclose(served[m.id], offline_logits(bundle, m.id, samples), rtol=1e-4, atol=1e-4)
            acc = float(np.mean(served[m.id].argmax(1) == labels))
            assert acc == m.accuracy, (m.name, acc, m.accuracy)  # the manifest's, measured at export
    preds = served[0].argmax(1)
    assert len(set(preds.tolist())) > 1, "a model that answers one class would make these checks empty"
    # float32 tokens: the tuned model itself, whole (full.onnx, the fallback) and in torch
    full = full_logits(bundle, samples)
    np.testing.assert_allclose(served[0], full, rtol=1e-3, atol=1e-3)
    assert (
        float(np.mean(preds == labels))
        == float(np.mean(full.argmax(1) == labels))
        == bundle.manifest["teacher_accuracy"]
    )
    model, _ = load_student(bundle.root.parent / "student.pt")
    x = np.stack([preprocess(s.data, bundle.input_spec) for s in samples])
    with torch.no_grad():
        assert model.eval()(torch.from_numpy(x)).argmax(1).numpy().tolist() == preds.tolist()


def test_a_request_of_several_frames_is_one_body_pass_with_the_rows_back(bundle, server, samples):
    head = create_engine(bundle.file("head"), threads=1)
    z = head.run1(np.stack([preprocess(s.data, bundle.input_spec) for s in samples[:3]]))
    with HandClient(server.endpoint) as c:
        assert c.hello(bundle.hash, "u-shaped")["kind"] == "welcome"
        d, p = S.encode(z, 16, "tokens")
        h, frames = c.request(1, d, p)
        assert h["kind"] == "result" and h["timing"]["batch_size"] == 3
        (out,) = h["outputs"]
        # the f16 mode's answer: float16, all three rows in one tensor
        assert (out["name"], out["shape"], out["dtype"]) == ("body_out", [3, *bundle.wire_spec["shape"]], "float16")
        body = create_engine(bundle.file("body"), threads=1).run1(S.roundtrip(z, 16))
        np.testing.assert_allclose(S.decode(out, frames[0]), S.roundtrip(body, 16), rtol=1e-3, atol=1e-3)


# -- the handshake and the checks -----------------------------------------------------------------------


@pytest.mark.parametrize("serving", [None, "head-tail", "scatter"])
def test_an_agent_that_is_not_u_shaped_is_refused_a_u_shaped_bundle(bundle, server, serving):
    """What a head-tail agent (no ``serving``, as every agent before v1.4) says, refused UNSUPPORTED
    with no id: it would take the body's output for logits."""
    with HandClient(server.endpoint) as c:
        e = c.hello(bundle.hash, serving)
        assert (e["kind"], e["code"], e["id"]) == ("error", ErrorCode.UNSUPPORTED, None), e
        assert "served u-shaped" in e["message"]
        # and no session came of it
        d, p = S.encode(np.zeros(bundle.wire_spec["shape"], np.float32), 32, "tokens")
        assert c.request(0, d, p)[0]["code"] == ErrorCode.NOT_READY


def test_a_u_shaped_agent_is_refused_a_head_tail_bundle_and_head_tail_agents_still_served(server):
    from edgesplit.edge.agent import Agent

    ht = Bundle.load(HEAD_TAIL)
    with HandClient(server.endpoint) as c:
        e = c.hello(ht.hash, "u-shaped")
        assert (e["kind"], e["code"], e["id"]) == ("error", ErrorCode.UNSUPPORTED, None), e
        assert "answers with logits" in e["message"]
        assert c.hello(ht.hash, 7)["code"] == ErrorCode.MALFORMED  # 'serving' is a string
    sample = next(iter(take(open_source("cifar10:test"), 1)))
    with Agent(ht, server.endpoint, threads=1) as agent:  # the same daemon, head-tail as before
        assert "compact_requests" in agent.welcome.features and "u_shaped" not in agent.welcome.features
        r = agent.infer(sample)
        assert r.ok and r.source == "server" and r.logits.shape == (len(ht.classes),)


def test_the_daemon_checks_a_u_shaped_request(bundle, server):
    T, D = bundle.wire_spec["shape"]
    x = np.random.default_rng(1).normal(size=(T, D)).astype(np.float32)
    with HandClient(server.endpoint) as c:
        assert c.hello(bundle.hash, "u-shaped")["features"] == ["u_shaped", "u_shaped_answers"]
        d16, p16 = S.encode(x, 16, "tokens")
        cases = [
            (9, d16, p16, ErrorCode.UNKNOWN_MODE),  # no such mode
            (2, d16, p16, ErrorCode.UNKNOWN_MODE),  # float16 tokens under the uint8 mode
            (1, None, p16, ErrorCode.MALFORMED),  # compact: a token tensor's descriptor always travels
            (1, {**d16, "name": "z"}, p16, ErrorCode.MALFORMED),
            (1, *S.encode(x[:-1], 16, "tokens"), ErrorCode.MALFORMED),  # not [T, D]
        ]
        nan = x.copy()
        nan[3, 5] = np.nan
        cases.append((1, *S.encode(nan, 16, "tokens"), ErrorCode.MALFORMED))  # nothing non-finite is run
        for mode, d, p, code in cases:
            h, _ = c.request(mode, d, p)
            assert (h["kind"], h.get("code")) == ("error", code), (mode, d and d["name"], h)
        h, frames = c.request(2, *S.encode(x, 8, "tokens"))  # 8-bit codes, their scale measured here
        assert h["kind"] == "result" and h["outputs"][0]["shape"] == [T, D]
        assert (h["outputs"][0]["dtype"], len(frames[0])) == ("uint8", T * D)  # and so is the answer


def test_the_agents_session_says_u_shaped_and_refuses_a_server_without_it(bundle):
    from edgesplit.edge.ushaped import session_for
    from edgesplit.wire.client_session import ClientSession
    from edgesplit.wire.messages import Welcome
    from edgesplit.wire.session_events import Refused, Send

    cls = session_for(bundle, "tcp://127.0.0.1:1")
    assert issubclass(cls, ClientSession) and session_for(Bundle.load(HEAD_TAIL), "tcp://x:1") is ClientSession
    s = cls(bundle.hash, "agent")
    hello = P.parse(s.hello(0))
    assert hello.header["serving"] == "u-shaped" and hello.header["bundle"] == bundle.hash
    w = Welcome(
        bundle.hash,
        "old",
        credits=4,
        limits=P.DEFAULT_LIMITS,
        heartbeat_ms=0,
        codecs=("raw",),
        features=("compact_requests",),
    )
    refused, bye = s.receive(P.pack(w.to_header()), 1)
    assert isinstance(refused, Refused) and refused.code == ErrorCode.UNSUPPORTED and refused.rid is None
    assert isinstance(bye, Send) and P.parse(bye.parts).kind == "bye"
    assert s.welcome is None and not s.handshaking  # no session, and no more hellos


def test_the_fallback_answers_with_the_whole_model(bundle, samples):
    from edgesplit.edge.agent import Agent
    from edgesplit.loopback import free_port

    agent = Agent(bundle, f"tcp://127.0.0.1:{free_port()}", threads=1, fallback="auto", timeout_s=0.5).connect()
    try:
        got = [agent.infer(s) for s in samples[:4]]
    finally:
        agent.close()
    assert all(r.ok and r.source == "local" and r.fallback_reason == "UNREACHABLE" for r in got)
    np.testing.assert_allclose(
        np.stack([r.logits for r in got]), full_logits(bundle, samples[:4]), rtol=1e-5, atol=1e-5
    )


# -- bench e2e ---------------------------------------------------------------------------------------------


def test_bench_e2e_reports_bytes_each_way_and_the_stages(bundle):
    from edgesplit.bench.e2e import bench_e2e

    T, D = bundle.wire_spec["shape"]
    rep = bench_e2e(bundle.root, 24, mode=2)
    assert (rep["serving"], rep["mode"], rep["frames"], rep["errors"]) == ("u-shaped", "u8", 24, 0)
    assert (rep["bytes_up_per_frame"], rep["bytes_down_per_frame"]) == (T * D, T * D)  # 8-bit answers too
    assert rep["answer"] == "uint8" and rep["answer_encode_ms_p50"] > 0 and rep["answer_decode_ms_p50"] > 0
    for stage in ("head_ms_p50", "encode_ms_p50", "server_body_ms_p50", "tail_ms_p50", "rtt_ms_p50"):
        assert rep[stage] > 0, stage
    assert rep["e2e_ms_p50"] >= rep["head_ms_p50"] + rep["tail_ms_p50"]
    assert rep["agent_torch_loaded"] is False and rep["codec"] == "uint8"
