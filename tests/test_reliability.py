"""Reliability, CI-sized: fuzzed frames at a live daemon while a valid agent streams, and a small
10x overload. Real ZeroMQ on loopback, real ONNX Runtime, the shipped CIFAR-10 bundle, real JPEGs.
The heavier versions are ``edgesplit bench fuzz`` and ``edgesplit bench overload``."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from edgesplit.bench.fuzz import FuzzClient
from edgesplit.bench.loadgen import LoadClient, head_workload
from edgesplit.bundle import Bundle
from edgesplit.data.transforms import preprocess
from edgesplit.edge.agent import Agent
from edgesplit.engine import create_engine
from edgesplit.server.batcher import Batcher
from edgesplit.server.daemon import Server
from edgesplit.wire import codec
from edgesplit.wire import protocol as P
from edgesplit.wire.codec import ErrorCode
from edgesplit.wire.fuzz import CLASSES, FuzzGenerator, FuzzTarget, default_classes
from edgesplit.wire.fuzz_ans import ANS_CLASSES
from edgesplit.wire.protocol import DEFAULT_LIMITS

ROOT = Path(__file__).resolve().parents[1]
CIFAR_BUNDLE = ROOT / "models" / "cifar10-resnet20-bottlefit"


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    return Bundle.load(CIFAR_BUNDLE)


def local_logits(bundle: Bundle, samples) -> np.ndarray:
    """What the server must answer: head -> quantize in the default mode -> decode -> tail."""
    head, tail = create_engine(bundle.file("head"), threads=1), create_engine(bundle.file("tail"), threads=1)
    C = bundle.wire_spec["shape"][0]
    out = []
    for s in samples:
        z = head.run1(preprocess(s.data, bundle.input_spec)[None])[0]
        d, p = codec.encode(z, bundle.default_mode, name=bundle.wire_spec["name"])
        out.append(tail.run1(codec.decode(d, p, full_channels=C)[None])[0])
    return np.stack(out)


def test_generator_is_deterministic_and_covers_every_class(bundle):
    target = FuzzTarget.from_bundle(bundle, DEFAULT_LIMITS)
    light = {n: 1.0 for n in CLASSES} | {"oversized_frame": 0.0, "oversized_header": 0.1}
    a = [FuzzGenerator(target, seed=7, weights=light).next() for _ in range(400)]
    b = [FuzzGenerator(target, seed=7, weights=light).next() for _ in range(400)]
    c = [FuzzGenerator(target, seed=8, weights=light).next() for _ in range(400)]
    assert [x.parts for x in a] == [x.parts for x in b]
    assert [x.parts for x in a] != [x.parts for x in c]
    # every class of a uniform bundle builds, with a non-empty expectation and bytes frames (the
    # ans classes need an ans mode: tests/test_entropy_serving.py runs them)
    assert default_classes(target) == [n for n in CLASSES if n not in ANS_CLASSES]
    for name in default_classes(target):
        case = FuzzGenerator(target, seed=1).case(name)
        assert case.cls == name and case.expect and all(isinstance(p, bytes) for p in case.parts)


def test_fuzz_every_class_answered_as_documented_while_an_agent_streams(bundle, cifar_samples):
    """~3000 malformed messages of every class: each answered with the code PROTOCOL.md gives
    (matched by request id, or in order where the answer has none), nothing INTERNAL, and a valid
    agent streaming meanwhile gets every logit right."""
    with Server([bundle], "tcp://127.0.0.1:0", threads=1, max_batch=8, max_queue_delay_us=1000, credits=16) as srv:
        results: list = []

        def stream():
            with Agent(bundle, srv.endpoint, inflight=4, threads=1, timeout_s=30) as agent:
                results.extend(agent.run(cifar_samples * 2))

        agent_thread = threading.Thread(target=stream)
        agent_thread.start()
        fuzz = FuzzClient(srv.endpoint, bundle, seed=3, window=16).connect()
        # every class about equally often, but only a few real 8 MiB frames
        fuzz.generator = FuzzGenerator(
            fuzz.generator.t, seed=3, weights={n: 1.0 for n in CLASSES} | {"oversized_frame": 0.05}
        )
        report = fuzz.run(3000)
        fuzz.close()
        agent_thread.join(60)
        assert not agent_thread.is_alive()
        stats = srv.stats()
        # still serving after all of it
        with Agent(bundle, srv.endpoint, threads=1) as agent:
            after = agent.infer(cifar_samples[0])
        assert not srv.failed

    r = report.to_json()
    assert r["mismatches"] == 0, json.dumps(r["mismatch_examples"], indent=1)
    assert r["unexpected"] == 0 and r["unanswered"] == 0 and r["internal_errors"] == 0
    assert r["chaos_answers"] == r["chaos_sent"] > 0  # bit-flipped requests: one answer each
    uniform = set(CLASSES) - set(ANS_CLASSES)  # a uniform bundle: every class but the ans ones
    assert set(r["by_class"]) == uniform, uniform - set(r["by_class"])
    for code in (
        "MALFORMED",
        "TOO_LARGE",
        "UNSUPPORTED",
        "UNSUPPORTED_VERSION",
        "UNKNOWN_MODE",
        "UNKNOWN_BUNDLE",
        "NOT_READY",
        "DEADLINE_EXCEEDED",
        "result",
        "pong",
    ):
        assert r["answers"].get(code, 0) > 0, code
    assert "error_INTERNAL" not in stats

    assert len(results) == 2 * len(cifar_samples)
    assert all(x.ok for x in results), [x.to_json() for x in results if not x.ok][:3]
    ref = local_logits(bundle, cifar_samples)
    got = np.stack([x.logits for x in sorted(results, key=lambda x: x.id)])
    np.testing.assert_allclose(got, np.concatenate([ref, ref]), atol=1e-4, rtol=1e-4)
    assert after.ok and after.pred == int(ref[0].argmax())


def test_overload_every_request_answered_once_and_queue_bounded(bundle):
    """Open-loop load far over capacity (small queue, few credits), then the same with deadlines:
    every request gets exactly one answer, results are correct, the queue never exceeds its
    bound, and every session's in-flight count returns to zero."""
    workload = head_workload(bundle, 16)
    max_queue = 16
    with Server(
        [bundle], "tcp://127.0.0.1:0", threads=1, max_batch=4, max_queue=max_queue, credits=8, max_queue_delay_us=500
    ) as srv:
        peak = [0]
        done = threading.Event()

        def watch():
            while not done.is_set():
                peak[0] = max(peak[0], len(srv.batcher))
                time.sleep(0.0005)

        watcher = threading.Thread(target=watch)
        watcher.start()
        with LoadClient(srv.endpoint, bundle, 4, workload) as client:
            plain = client.open_loop(8000, 1.0)
            timed = client.open_loop(8000, 1.0, deadline_ms=20)
            done.set()
            watcher.join()
            inflight = [s.inflight for s in srv.sessions.values()]
        queued_after = srv.stats()["queued"]
    for st in (plain, timed):
        assert st.sent > 1000
        assert st.unanswered == 0 and st.unexpected == 0 and st.answered == st.sent
        assert st.results > 0 and st.wrong == 0
    assert plain.errors.get("OVERLOADED", 0) > 0 and set(plain.errors) == {"OVERLOADED"}, plain.errors
    assert sum(timed.errors.values()) > 0 and set(timed.errors) <= {"OVERLOADED", "DEADLINE_EXCEEDED"}, timed.errors
    assert peak[0] <= max_queue and queued_after == 0
    assert inflight and all(n == 0 for n in inflight), inflight


class _Raw:
    """A bare DEALER with a session, sending compact requests with chosen deadlines."""

    def __init__(self, endpoint: str, bundle: Bundle, workload):
        self.workload = workload
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.sock.send_multipart(P.pack(P.hello(bundle.hash, "raw", max_inflight=64)))
        assert self.recv().kind == "welcome"

    def request(self, rid: int, deadline_ms=None):
        self.sock.send_multipart(
            P.pack(P.request(rid, self.workload.mode, None, deadline_ms=deadline_ms), [self.workload.payloads[0]])
        )

    def recv(self):
        assert self.sock.poll(10_000), "no answer"
        return P.parse(self.sock.recv_multipart())

    def close(self):
        self.sock.close(0)


def test_deadline_the_queue_ahead_cannot_meet_is_refused_at_once(bundle):
    """With the queue ahead expected to take longer than a request's deadline, the request is
    answered DEADLINE_EXCEEDED at once (not queued to expire); the request ahead is computed."""
    workload = head_workload(bundle, 1)
    key = (bundle.hash, workload.mode)
    with Server([bundle], "tcp://127.0.0.1:0", threads=1, max_batch=8, max_queue_delay_us=300_000) as srv:
        srv.batcher.estimate_ttl_ns = 60 * 10**9  # the primed figure below stays in use for the whole test
        srv.batcher.note_compute(key, 10.0, rows=1)  # as if this mode's batches had been taking 10 s
        c = _Raw(srv.endpoint, bundle, workload)
        c.request(1)  # no deadline: queued, waits up to 300 ms for company
        c.request(2, deadline_ms=1000)  # behind it: 2 rows, ~10+ s expected
        first = c.recv()
        assert (first.kind, first.id, first.header["code"]) == ("error", 2, ErrorCode.DEADLINE_EXCEEDED)
        assert "not queued" in first.header["message"]
        second = c.recv()
        assert (second.kind, second.id) == ("result", 1)
        c.close()


def test_deadline_the_batch_cannot_meet_is_not_computed(bundle):
    """A request admitted alone, then batched with another: when the batch's expected time would
    end past its deadline it is answered DEADLINE_EXCEEDED and not computed; the rest of the
    batch is computed."""
    workload = head_workload(bundle, 1)
    key = (bundle.hash, workload.mode)
    with Server([bundle], "tcp://127.0.0.1:0", threads=1, max_batch=8, max_queue_delay_us=200_000) as srv:
        srv.batcher.estimate_ttl_ns = 60 * 10**9
        srv.batcher.note_compute(key, 0.001, rows=1)  # one row: fast, so the first request is admitted
        srv.batcher.note_compute(key, 10.0, rows=2)  # two rows: as if they had been taking 10 s
        c = _Raw(srv.endpoint, bundle, workload)
        c.request(1, deadline_ms=5000)
        c.request(2)  # joins the batch: 2 rows
        answers = {m.id: m for m in (c.recv(), c.recv())}
        assert answers[1].kind == "error" and answers[1].header["code"] == ErrorCode.DEADLINE_EXCEEDED
        assert "not computed" in answers[1].header["message"]
        assert answers[2].kind == "result" and answers[2].header["timing"]["batch_size"] == 1
        c.close()


def test_batch_time_estimate_per_batch_size():
    b = Batcher(max_batch=32)
    assert b.expected_compute_ns("k", 8) == 0.0  # nothing measured yet
    for _ in range(40):
        b.note_compute("k", 0.010, rows=32)
        b.note_compute("k", 0.001, rows=1)
    assert b.expected_compute_ns("k", 32) == pytest.approx(10e6, rel=0.01)  # steady: mean, deviation ~0
    assert b.expected_compute_ns("k", 1) == pytest.approx(1e6, rel=0.01)
    assert b.expected_compute_ns("k", 8) == pytest.approx(10e6, rel=0.01)  # next larger bucket measured
    assert b.expected_compute_ns("k", 64) == pytest.approx(20e6, rel=0.01)  # beyond: scaled up
    for t in (0.010, 0.030) * 20:  # a tail whose time varies is planned for its slow batches
        b.note_compute("j", t, rows=32)
    assert b.expected_compute_ns("j", 32) > 30e6
    # queue ahead: 40 requests = one full batch of 32 + its own batch of 8 + 1 rows (bucket 16 -> 32 measured)
    for i in range(40):
        assert b.put(_item("k", i))
    assert b.expected_wait_ns("k", 1) == pytest.approx(20e6, rel=0.01)
    # estimates not refreshed within the TTL are not used (a slow spell must not refuse forever)
    b.estimate_ttl_ns = 0
    time.sleep(0.002)
    assert b.expected_compute_ns("k", 32) == 0.0 and b.expected_wait_ns("k", 1) == 0.0


def _item(key, i):
    from edgesplit.server.batcher import Item

    return Item(key=key, identity=b"x", req_id=i, desc={}, payload=b"", rows=1, single=True, t_recv_ns=0)


def test_bench_fuzz_cli_small(tmp_path):
    """The benchmark end to end at CI size: server and fuzz worker as processes."""
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgesplit",
            "bench",
            "fuzz",
            "--frames",
            "1500",
            "--baseline-s",
            "1",
            "--agent-fps",
            "20",
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["fuzzed_frames"] == 1500 and out["crashes"] == 0 and out["fuzz"]["mismatches"] == 0
    assert out["server_exit_code_on_sigterm"] == 0 and out["server_answers_ping"] and out["valid_after_fuzz_ok"]
    for phase in ("valid_baseline", "valid_under_fuzz"):
        v = out[phase]
        assert v["results"] == v["sent"] > 0 and v["wrong_results"] == 0 and not v["errors"]
