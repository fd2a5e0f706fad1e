"""Agent resilience: lost links, reconnects and local fallback, with real server processes killed
with SIGKILL, real ZeroMQ sockets on loopback, real ONNX Runtime and real CIFAR-10 JPEGs.

The contract under test: every frame ends as exactly one of a server result, a local fallback
result (the bundle's full.onnx on the device) or an explicit error, never silently lost, and
server results come back once a server is there again.
"""

from __future__ import annotations

import itertools
import json
import random
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from edgesplit.bench.restart import account
from edgesplit.bench.serverproc import ServerProcess
from edgesplit.bundle import Bundle
from edgesplit.data.sources import open_source, take
from edgesplit.data.transforms import preprocess
from edgesplit.edge.agent import DISCONNECTED, TIMEOUT, Agent, AgentError, agent_main
from edgesplit.edge.fallback import RTT_OVER_DEADLINE, UNREACHABLE
from edgesplit.edge.link import Backoff
from edgesplit.engine import create_engine
from edgesplit.loopback import free_port
from edgesplit.server.daemon import Server
from edgesplit.wire import codec
from edgesplit.wire import protocol as P
from edgesplit.wire.codec import ErrorCode
from edgesplit.wire.transport import bind_router

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "cifar10-resnet20-bottlefit"  # ships full.onnx, the fallback model
SERVER_ARGS = ["--threads", "1", "--max-queue-delay-us", "0"]


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    b = Bundle.load(SHIPPED)
    assert b.has("full")
    return b


@pytest.fixture(scope="module")
def samples(bundle):
    return list(take(open_source("cifar10:test", bundle.classes), 300))


@pytest.fixture(scope="module")
def full_model(bundle):
    return create_engine(bundle.file("full"), threads=1)


def full_logits(full_model, bundle, sample) -> np.ndarray:
    """What a local fallback must answer: the unsplit model on the preprocessed image."""
    return full_model.run1(preprocess(sample.data, bundle.input_spec)[None])[0]


def check_local_results(results, frame_of, full_model, bundle) -> None:
    for r in results:
        if r.source == "local":
            ref = full_logits(full_model, bundle, frame_of[r.id])
            np.testing.assert_allclose(r.logits, ref, rtol=1e-4, atol=1e-4)
            assert r.pred == int(ref.argmax()) and r.error is None and r.local_ms > 0


def stream_through_kill(agent: Agent, server: ServerProcess, samples, kill_after: int, outage_frames: int):
    """Stream frames; after ``kill_after`` frames SIGKILL the server and start it again on the same
    port; send ``outage_frames`` more at once (the outage), then, once the new server listens,
    frames at camera pace until a frame sent after that comes back from the server (or 30 s: a
    liveness bound, not a speed target). Returns (results, the frame of each id)."""
    yielded = []
    resumed = threading.Event()
    first_id_after_ready = [None]

    def frames():
        pool = itertools.cycle(samples)
        for _ in range(kill_after):
            yielded.append(next(pool))
            yield yielded[-1]
        server.kill9()
        server.start(wait_s=None)
        for _ in range(outage_frames):
            yielded.append(next(pool))
            yield yielded[-1]
        server.wait_ready(60)
        first_id_after_ready[0] = len(yielded) + 1
        give_up = time.monotonic() + 30
        while not resumed.is_set() and time.monotonic() < give_up:
            time.sleep(0.005)
            yielded.append(next(pool))
            yield yielded[-1]

    results = []
    for r in agent.run(frames()):
        results.append(r)
        if r.source == "server" and first_id_after_ready[0] is not None and r.id >= first_id_after_ready[0]:
            resumed.set()
    return results, {i + 1: s for i, s in enumerate(yielded)}, resumed.is_set()


# -- (a) kill -9 mid-stream, fallback on ---------------------------------------------------------


def test_kill9_mid_stream_every_frame_ends_once_and_server_results_resume(bundle, samples, full_model):
    server = ServerProcess([SHIPPED], SERVER_ARGS, port=free_port()).start()
    try:
        agent = Agent(bundle, server.endpoint, inflight=8, threads=1, fallback="auto", reconnect_max_s=0.2).connect()
        results, frame_of, resumed = stream_through_kill(agent, server, samples, kill_after=60, outage_frames=100)
        agent.close()
    finally:
        server.stop()
    n = len(frame_of)
    acc = account(results, n)
    assert acc["silently_lost"] == 0 and acc["duplicates"] == 0 and acc["unknown_ids"] == 0, acc
    assert acc["results_server"] + acc["results_local"] + acc["errors"] == n
    assert acc["errors"] == 0, [r.to_json() for r in results if r.error]  # fallback answers every frame
    for r in results:
        assert (r.source == "server") == (r.fallback_reason is None)
        assert r.pred is not None and r.logits is not None
    # the frame sent while the kill went unnoticed ends locally, as do the frames of the outage
    reasons = Counter(r.fallback_reason for r in results if r.source == "local")
    assert reasons[DISCONNECTED] >= 1 and reasons[UNREACHABLE] >= 1 and set(reasons) <= {DISCONNECTED, UNREACHABLE}
    check_local_results(results, frame_of, full_model, bundle)
    # server results before the kill, and again after the restart
    assert any(r.source == "server" and r.id <= 60 for r in results)
    assert resumed, "no server result within 30 s of the restarted server listening"
    assert agent.link_losses == 1 and agent.reconnects == 1
    assert [r.key for r in sorted(results, key=lambda r: r.id)] == [frame_of[i].key for i in range(1, n + 1)]


# -- (b) no server at all ------------------------------------------------------------------------


def test_no_server_every_frame_falls_back_locally(bundle, samples, full_model):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with pytest.raises(AgentError):  # fallback off: no server is an error, as before
        Agent(bundle, endpoint, threads=1, timeout_s=0.3, fallback="off").connect()
    agent = Agent(bundle, endpoint, threads=1, timeout_s=0.3, fallback="auto").connect()
    assert agent.welcome is None  # started without a session instead of failing
    frames = samples[:40]
    results = list(agent.run(frames))
    agent.close()
    assert sorted(r.id for r in results) == list(range(1, 41))
    assert all(r.source == "local" and r.fallback_reason == UNREACHABLE and r.error is None for r in results)
    assert all(r.bytes_sent == 0 and r.rtt_ms is None for r in results)  # nothing was queued in the dead socket
    check_local_results(results, {i + 1: s for i, s in enumerate(frames)}, full_model, bundle)


# -- (c) kill -9 mid-stream, fallback off ---------------------------------------------------------


def test_fallback_off_frames_end_as_explicit_errors_not_lost(bundle, samples):
    server = ServerProcess([SHIPPED], SERVER_ARGS, port=free_port()).start()
    try:
        agent = Agent(bundle, server.endpoint, inflight=8, threads=1, fallback="off", reconnect_max_s=0.2).connect()
        assert agent.fallback is None
        results, frame_of, resumed = stream_through_kill(agent, server, samples, kill_after=60, outage_frames=20)
        agent.close()
    finally:
        server.stop()
    acc = account(results, len(frame_of))
    assert acc["silently_lost"] == 0 and acc["duplicates"] == 0 and acc["unknown_ids"] == 0, acc
    assert acc["results_local"] == 0
    errors = Counter(r.error for r in results if r.error is not None)
    # the frame sent into the dead connection fails at once, not after the 10 s timeout
    assert errors[DISCONNECTED] >= 1 and set(errors) <= {DISCONNECTED, TIMEOUT}, errors
    for r in results:
        assert (r.error is None) == (r.source == "server") and r.fallback_reason is None
    # frames of the outage were held, not failed, and went out once the new server welcomed the agent
    assert resumed and agent.reconnects == 1


# -- (d) late answers, "not now" refusals, the deadline guard -------------------------------------


class ScriptedServer:
    """A bare ROUTER on loopback that welcomes agents and answers each request as ``script(id)``
    says: ``("result", delay_s)`` (logits with argmax 3, after the delay) or ``("error", code)``."""

    def __init__(self, bundle: Bundle, script):
        self.bundle, self.script = bundle, script
        self.router, self.endpoint = bind_router("tcp://127.0.0.1:0")
        self.requests: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        held: list[tuple[float, bytes, int]] = []
        desc, payload = codec.encode_float(np.eye(10, dtype=np.float32)[3], name="logits")
        while not self._stop.is_set():
            if self.router.poll(10):
                ident, *parts = self.router.recv_multipart()
                m = P.parse(parts)
                if m.kind == "hello":
                    self.router.send_multipart(
                        [
                            ident,
                            *P.pack(
                                P.welcome(
                                    self.bundle.hash,
                                    "scripted",
                                    credits=8,
                                    limits=P.DEFAULT_LIMITS,
                                    heartbeat_ms=0,
                                    codecs=["raw"],
                                )
                            ),
                        ]
                    )
                elif m.kind == "request":
                    rid = m.header["id"]
                    self.requests.append(rid)
                    kind, arg = self.script(rid)
                    if kind == "error":
                        self.router.send_multipart([ident, *P.pack(P.error(rid, arg, "scripted refusal"))])
                    else:
                        held.append((time.monotonic() + arg, ident, rid))
            for item in [h for h in held if h[0] <= time.monotonic()]:
                held.remove(item)
                _, ident, rid = item
                self.router.send_multipart(
                    [
                        ident,
                        *P.pack(P.result(rid, [desc], queue_us=0, compute_us=0, batch_size=1, server_us=0), [payload]),
                    ]
                )
        self.router.close(0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def wait_until(agent: Agent, cond, timeout_s: float = 10.0) -> list:
    """Poll the agent until ``cond()`` holds; returns the frames completed meanwhile."""
    out, end = [], time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        out += agent.poll(0.02)
    return out


def test_late_result_after_local_fallback_is_dropped_and_refusals_fall_back(bundle, cifar_samples):
    # frame 1: answered long after the agent gave up on it; frame 2: OVERLOADED; frame 3: served
    script = {1: ("result", 1.0), 2: ("error", ErrorCode.OVERLOADED), 3: ("result", 0.0)}
    srv = ScriptedServer(bundle, lambda rid: script[rid])
    try:
        agent = Agent(bundle, srv.endpoint, inflight=4, threads=1, timeout_s=0.3, fallback="auto").connect()
        results = [agent.infer(cifar_samples[0])]
        assert results[0].source == "local" and results[0].fallback_reason == TIMEOUT
        assert results[0].bytes_sent > 0  # it was sent, then answered locally
        # the late result arrives and is dropped; meanwhile the agent re-handshakes (hello backoff)
        results += wait_until(agent, lambda: agent.late_answers == 1 and agent.welcome is not None)
        results.append(agent.infer(cifar_samples[1]))
        assert results[-1].source == "local" and results[-1].fallback_reason == "OVERLOADED"
        results.append(agent.infer(cifar_samples[2]))
        assert results[-1].source == "server" and results[-1].pred == 3
        results += agent.poll(0.3)
        agent.close()
    finally:
        srv.close()
    assert sorted(r.id for r in results) == [1, 2, 3]  # one result each: no duplicate for frame 1
    assert srv.requests == [1, 2, 3] and agent.late_answers == 1


def test_rtt_over_deadline_goes_local_and_keeps_probing(bundle, cifar_samples):
    srv = ScriptedServer(bundle, lambda rid: ("result", 0.08))  # every round trip >= 80 ms
    try:
        agent = Agent(bundle, srv.endpoint, inflight=1, threads=1, deadline_ms=20, fallback="auto").connect()
        results = [agent.infer(s) for s in cifar_samples[:10]]
        agent.close()
    finally:
        srv.close()
    # no estimate for the first five; then one probe still goes to the server
    assert [r.source for r in results[:6]] == ["server"] * 6
    assert all(r.rtt_ms >= 80 for r in results[:6])
    local = [r for r in results[6:] if r.source == "local"]
    assert local and all(r.fallback_reason == RTT_OVER_DEADLINE for r in local)


def test_backoff_doubles_with_jitter_up_to_its_cap():
    b = Backoff(0.05, 0.4, rng=random.Random(1))
    delays = [b.next_delay() for _ in range(8)]
    steps = [0.05, 0.1, 0.2, 0.4, 0.4, 0.4, 0.4, 0.4]
    assert all(s / 2 <= d <= s for d, s in zip(delays, steps)), delays
    assert len(set(delays)) == len(delays)  # jittered
    b.reset()
    assert b.next_delay() <= 0.05
    with pytest.raises(ValueError):
        Backoff(0.5, 0.1)


# -- (e) the CLI ---------------------------------------------------------------------------------


def test_agent_cli_fallback_flag_and_json_fields(bundle, tmp_path):
    args = [
        "--bundle",
        str(SHIPPED),
        "--source",
        "cifar10:test",
        "--frames",
        "12",
        "--threads",
        "1",
        "--timeout-s",
        "0.3",
    ]
    nobody = f"tcp://127.0.0.1:{free_port()}"
    # no server, fallback auto (the default): every frame answered locally, exit 0
    out = tmp_path / "local.jsonl"
    assert agent_main(args + ["--server", nobody, "--json-lines", str(out)]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    frames, summary = lines[:-1], lines[-1]["summary"]
    assert len(frames) == 12
    assert all(
        f["source"] == "local"
        and f["fallback_reason"] == UNREACHABLE
        and f["pred"] is not None
        and f["local_ms"] > 0
        and "error" not in f
        for f in frames
    )
    assert (summary["server"], summary["local"], summary["error_frames"]) == (0, 12, 0)
    assert summary["fallback_reasons"] == {UNREACHABLE: 12} and summary["reconnects"] == 0
    # no server, fallback off: the agent cannot run (exit 1), as before
    assert agent_main(args + ["--server", nobody, "--fallback", "off"]) == 1
    with pytest.raises(SystemExit):
        agent_main(args + ["--fallback", "sometimes"])
    # a server: server results, no fallback fields
    with Server([bundle], "tcp://127.0.0.1:0", threads=1, max_queue_delay_us=0) as srv:
        out = tmp_path / "server.jsonl"
        assert (
            agent_main(
                args
                + ["--server", srv.endpoint, "--fallback", "auto", "--reconnect-max-s", "0.2", "--json-lines", str(out)]
            )
            == 0
        )
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert all(f["source"] == "server" and f["fallback_reason"] is None and f["local_ms"] is None for f in lines[:-1])
    assert lines[-1]["summary"]["server"] == 12 and lines[-1]["summary"]["link_losses"] == 0
