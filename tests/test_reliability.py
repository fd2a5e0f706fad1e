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

from edgesplit.bench.fuzz import FuzzClient
from edgesplit.bench.loadgen import LoadClient, head_workload
from edgesplit.bundle import Bundle
from edgesplit.data.transforms import preprocess
from edgesplit.edge.agent import Agent
from edgesplit.engine import create_engine
from edgesplit.server.batcher import Batcher
from edgesplit.server.daemon import Server
from edgesplit.wire import codec
from edgesplit.wire.codec import ErrorCode
from edgesplit.wire.fuzz import CLASSES, FuzzGenerator, FuzzTarget
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
    for name in CLASSES:  # every class builds, with a non-empty expectation and bytes frames
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
        fuzz.generator = FuzzGenerator(fuzz.generator.t, seed=3,
                                       weights={n: 1.0 for n in CLASSES} | {"oversized_frame": 0.05})
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
    assert set(r["by_class"]) == set(CLASSES), set(CLASSES) - set(r["by_class"])
    for code in ("MALFORMED", "TOO_LARGE", "UNSUPPORTED", "UNSUPPORTED_VERSION", "UNKNOWN_MODE", "UNKNOWN_BUNDLE",
                 "NOT_READY", "DEADLINE_EXCEEDED", "result", "pong"):
        assert r["answers"].get(code, 0) > 0, code
    assert "error_INTERNAL" not in stats

    assert len(results) == 2 * len(cifar_samples)
    assert all(x.ok for x in results), [x.to_json() for x in results if not x.ok][:3]
    ref = local_logits(bundle, cifar_samples)
    got = np.stack([x.logits for x in sorted(results, key=lambda x: x.id)])
    np.testing.assert_allclose(got, np.concatenate([ref, ref]), atol=1e-4, rtol=1e-4)
    assert after.ok and after.pred == int(ref[0].argmax())


def test_overload_every_request_answered_once_and_queue_bounded(bundle):
    """Open-loop load far over capacity (small queue, few credits, deadlines): every request gets
    exactly one answer, results are correct, the queue never exceeds its bound, and every
    session's in-flight count returns to zero."""
    workload = head_workload(bundle, 16)
    max_queue = 16
    with Server([bundle], "tcp://127.0.0.1:0", threads=1, max_batch=4, max_queue=max_queue, credits=8,
                max_queue_delay_us=500) as srv:
        peak = [0]
        done = threading.Event()

        def watch():
            while not done.is_set():
                peak[0] = max(peak[0], len(srv.batcher))
                time.sleep(0.0005)

        watcher = threading.Thread(target=watch)
        watcher.start()
        with LoadClient(srv.endpoint, bundle, 4, workload) as client:
            st = client.open_loop(4000, 1.5, deadline_ms=50)
            done.set()
            watcher.join()
            inflight = [s.inflight for s in srv.sessions.values()]
        queued_after = srv.stats()["queued"]
    assert st.sent > 1000
    assert st.unanswered == 0 and st.unexpected == 0 and st.answered == st.sent
    assert st.errors.get("OVERLOADED", 0) > 0 and st.results > 0
    assert set(st.errors) <= {"OVERLOADED", "DEADLINE_EXCEEDED"}, st.errors
    assert st.wrong == 0
    assert peak[0] <= max_queue and queued_after == 0
    assert inflight and all(n == 0 for n in inflight), inflight


def test_deadline_that_the_batch_cannot_meet_is_not_computed(bundle):
    """A request whose deadline falls before its batch can finish (by the tail's recent batch
    times) is answered DEADLINE_EXCEEDED at once instead of late; without a deadline the same
    request is computed."""
    workload = head_workload(bundle, 2)
    with Server([bundle], "tcp://127.0.0.1:0", threads=1, max_batch=4, max_queue_delay_us=0) as srv:
        with LoadClient(srv.endpoint, bundle, 1, workload) as client:
            # as if this mode's 1-row batches had been taking 10 s
            srv.batcher.note_compute((bundle.hash, workload.mode), 10.0, rows=1)
            st = client.closed_loop(requests=3, deadline_ms=1000)
            assert st.errors == {"DEADLINE_EXCEEDED": 3} and st.results == 0
            ok = client.closed_loop(requests=3)
            assert ok.results == 3 and ok.wrong == 0 and not ok.errors


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


def test_bench_fuzz_cli_small(tmp_path):
    """The benchmark end to end at CI size: server and fuzz worker as processes."""
    r = subprocess.run([sys.executable, "-m", "edgesplit", "bench", "fuzz", "--frames", "1500", "--baseline-s", "1",
                        "--agent-fps", "20", "--json"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["fuzzed_frames"] == 1500 and out["crashes"] == 0 and out["fuzz"]["mismatches"] == 0
    assert out["server_exit_code_on_sigterm"] == 0 and out["server_answers_ping"] and out["valid_after_fuzz_ok"]
    for phase in ("valid_baseline", "valid_under_fuzz"):
        v = out[phase]
        assert v["results"] == v["sent"] > 0 and v["wrong_results"] == 0 and not v["errors"]
