"""Server daemon + agent end to end: real ZeroMQ sockets on loopback, real ONNX Runtime, real JPEGs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from edgesplit.bundle import Bundle, write_manifest
from edgesplit.data.transforms import preprocess
from edgesplit.edge.agent import TIMEOUT, Agent, AgentError, summarize
from edgesplit.engine import create_engine
from edgesplit.server.daemon import Server
from edgesplit.wire import codec
from edgesplit.wire import protocol as P
from edgesplit.wire.codec import ErrorCode
from edgesplit.wire.transport import bind_router

ROOT = Path(__file__).resolve().parents[1]


# -- helpers -------------------------------------------------------------------------------------


class RawClient:
    """A bare DEALER speaking the protocol by hand (to send what a correct agent never would)."""

    def __init__(self, endpoint: str):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, parts):
        self.sock.send_multipart(parts)

    def recv(self, timeout=5.0) -> P.Message:
        assert self.sock.poll(int(timeout * 1000)), "no reply from the server"
        return P.parse(self.sock.recv_multipart())

    def hello(self, bundle: Bundle, max_inflight=64) -> dict:
        self.send(P.pack(P.hello(bundle.hash, "raw-client", max_inflight=max_inflight)))
        m = self.recv()
        assert m.kind == "welcome", m.header
        return m.header

    def request(self, bundle: Bundle, rid: int, z=None, mode_id=0, **kw):
        m = bundle.mode(mode_id)
        if z is None:
            z = np.random.default_rng(rid).uniform(0, 100 * m.scale, bundle.wire_spec["shape"]).astype(np.float32)
        d, p = codec.encode(z, m, name=bundle.wire_spec["name"])
        self.send(P.pack(P.request(rid, mode_id, [d], **kw), [p]))

    def close(self):
        self.sock.close(0)


def local_logits(bundle: Bundle, samples, mode_id=0) -> np.ndarray:
    """What the server must answer: head -> the same quantization -> zero-fill -> tail, in-process."""
    head = create_engine(bundle.file("head"))
    tail = create_engine(bundle.file("tail"))
    m = bundle.mode(mode_id)
    C = bundle.wire_spec["shape"][0]
    out = []
    for s in samples:
        z = head.run1(preprocess(s.data, bundle.input_spec)[None])[0]
        d, p = codec.encode(z, m, name=bundle.wire_spec["name"])
        out.append(tail.run1(codec.decode(d, p, full_channels=C)[None])[0])
    return np.stack(out)


def variant_bundle(src: Bundle, root: Path, modes: list[dict], name: str) -> Bundle:
    """Same model files, another manifest (so another hash), e.g. with extra modes."""
    root.mkdir(parents=True, exist_ok=True)
    for role in ("head", "tail", "full"):
        shutil.copy(src.file(role), root / src.file(role).name)
    manifest = json.loads(json.dumps(src.manifest))
    manifest["name"] = name
    manifest["modes"] = modes
    for entry in manifest["files"].values():
        entry.pop("sha256", None)
    write_manifest(root, manifest)
    return Bundle.load(root)


@pytest.fixture(scope="module")
def multi_bundle(tiny_bundle, tmp_path_factory):
    s = tiny_bundle.default_mode.scale
    modes = [
        {
            "id": 0,
            "name": "c8-b8",
            "channels": 8,
            "bits": 8,
            "quant": {"scale": s, "zero_point": 0},
            "bytes_per_frame": 512,
        },
        {
            "id": 1,
            "name": "c4-b4",
            "channels": 4,
            "bits": 4,
            "quant": {"scale": s * 17, "zero_point": 0},
            "bytes_per_frame": 128,
        },
        {
            "id": 2,
            "name": "c6-b6",
            "channels": 6,
            "bits": 6,
            "quant": {"scale": s * 4, "zero_point": 0},
            "bytes_per_frame": 288,
        },
        {
            "id": 3,
            "name": "c8-b2",
            "channels": 8,
            "bits": 2,
            "quant": {"scale": s * 85, "zero_point": 0},
            "bytes_per_frame": 128,
        },
    ]
    return variant_bundle(tiny_bundle, tmp_path_factory.mktemp("multi"), modes, "tiny-multi")


@pytest.fixture(scope="module")
def server(tiny_bundle, multi_bundle):
    with Server(
        [tiny_bundle, multi_bundle], "tcp://127.0.0.1:0", threads=1, max_batch=16, max_queue_delay_us=1000, credits=16
    ) as srv:
        yield srv


# -- end to end ----------------------------------------------------------------------------------


def test_agent_end_to_end_matches_local_split(server, tiny_bundle, cifar_samples):
    with Agent(tiny_bundle, server.endpoint, inflight=8, threads=1) as agent:
        assert agent.window == 8
        assert agent.compact_requests  # the server's welcome offered v1.1 compact requests
        results = sorted(agent.run(cifar_samples), key=lambda r: r.id)
    assert len(results) == len(cifar_samples) == 32
    assert all(r.ok for r in results), [r.to_json() for r in results if not r.ok]
    ref = local_logits(tiny_bundle, cifar_samples)
    got = np.stack([r.logits for r in results])
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    assert [r.pred for r in results] == ref.argmax(1).tolist()
    assert [r.key for r in results] == [s.key for s in cifar_samples]
    assert [r.label for r in results] == [s.label for s in cifar_samples]
    for r in results:
        j = r.to_json()
        for k in (
            "id",
            "key",
            "head_ms",
            "encode_ms",
            "bytes_sent",
            "rtt_ms",
            "server_queue_ms",
            "server_compute_ms",
            "batch_size",
            "pred",
            "label",
        ):
            assert k in j
        assert j["bytes_sent"] == 512 and 1 <= j["batch_size"] <= 16
        assert j["header_bytes"] < 40  # compact requests
        assert 0 < r.server_ms / 1e3 < r.rtt_ms / 1e3 + 1e-9 and r.server_compute_ms <= r.server_ms
    s = summarize(results)
    assert s["frames"] == 32 and s["ok"] == 32 and s["errors"] == {} and s["bytes_per_frame_median"] == 512
    assert s["accuracy"] == pytest.approx(np.mean(ref.argmax(1) == [x.label for x in cifar_samples]))


@pytest.mark.parametrize("mode_id,codec_name", [(1, "raw"), (2, "zstd"), (3, "auto"), (0, "zstd")])
def test_modes_channel_subsets_bits_and_codecs(server, multi_bundle, cifar_samples, mode_id, codec_name):
    samples = cifar_samples[:8]
    with Agent(multi_bundle, server.endpoint, mode=mode_id, codec=codec_name, threads=1) as agent:
        results = sorted(agent.run(samples), key=lambda r: r.id)
    assert all(r.ok for r in results), [r.error_message for r in results]
    ref = local_logits(multi_bundle, samples, mode_id)
    np.testing.assert_allclose(np.stack([r.logits for r in results]), ref, atol=1e-4, rtol=1e-4)
    m = multi_bundle.mode(mode_id)
    if codec_name == "raw":
        assert all(r.bytes_sent == m.bytes_per_frame for r in results)
        assert all(r.header_bytes < 40 for r in results)  # compact: channel subsets and 2/4/6 bits too
    elif codec_name == "zstd":
        assert all(r.header_bytes > 100 for r in results)  # a zstd frame needs its descriptor


def test_batching_and_per_request_replies(tiny_bundle):
    with Server([tiny_bundle], "tcp://127.0.0.1:0", threads=1, max_batch=8, max_queue_delay_us=3_000_000) as srv:
        c = RawClient(srv.endpoint)
        c.hello(tiny_bundle)
        for rid in range(1, 9):  # 8 requests = max_batch: dispatched at once, not after 3 s
            c.request(tiny_bundle, rid)
        msgs = [c.recv() for _ in range(8)]
        assert all(m.header["timing"]["queue_us"] < 3_000_000 for m in msgs)  # released by size, not the delay
        assert sorted(m.id for m in msgs) == list(range(1, 9))
        assert all(m.kind == "result" and m.header["timing"]["batch_size"] == 8 for m in msgs)
        # a 4-D request is several rows: replies [n, K]
        m = tiny_bundle.default_mode
        z = np.random.default_rng(0).uniform(0, 50 * m.scale, (3, 8, 8, 8)).astype(np.float32)
        d, p = codec.encode(z, m, name="z")
        c.send(P.pack(P.request(99, 0, [d]), [p]))
        r = c.recv(timeout=30)  # alone: released by the 3 s queue delay
        assert r.kind == "result" and r.header["outputs"][0]["shape"] == [3, 10]
        assert r.header["timing"]["batch_size"] == 3
        c.close()


# -- errors --------------------------------------------------------------------------------------


def test_server_survives_malformed_input_and_keeps_serving(server, tiny_bundle, cifar_samples):
    c = RawClient(server.endpoint)
    good = P.pack(P.ping(1))
    cases = [
        ([b"\x93\x01"], ErrorCode.MALFORMED),  # truncated msgpack
        ([os.urandom(64)], None),  # random bytes (some code)
        ([b"\x00" * (P.DEFAULT_LIMITS.max_header_bytes + 1)], ErrorCode.TOO_LARGE),  # oversized header
        ([P.pack({"v": 9, "kind": "ping", "nonce": 1})[0]], ErrorCode.UNSUPPORTED_VERSION),
        ([P.pack({"v": 1, "kind": "teleport"})[0]], ErrorCode.MALFORMED),
        ([P.pack({"v": 1, "kind": "scatter"})[0]], ErrorCode.UNSUPPORTED),
        (
            [
                P.pack(
                    {
                        "v": 1,
                        "kind": "result",
                        "id": 1,
                        "outputs": [],
                        "timing": {"queue_us": 0, "compute_us": 0, "server_us": 0, "batch_size": 1},
                    }
                )[0]
            ],
            ErrorCode.MALFORMED,
        ),
        ([b""], ErrorCode.MALFORMED),
    ]
    for parts, code in cases:
        c.send(parts)
        m = c.recv()
        assert m.kind == "error", m.header
        if code is not None:
            assert m.header["code"] == code, (parts[0][:20], m.header)
    # before hello: NOT_READY, naming the request
    c.request(tiny_bundle, 5)
    m = c.recv()
    assert (m.kind, m.id, m.header["code"]) == ("error", 5, ErrorCode.NOT_READY)
    c.hello(tiny_bundle)
    # lying nbytes / wrong shape / unknown mode / wrong channel count, after hello
    d, p = codec.encode(np.zeros((8, 8, 8), np.float32), tiny_bundle.default_mode, name="z")
    bad = [
        (P.request(10, 0, [{**d, "nbytes": 600}]), [p], ErrorCode.MALFORMED),
        (P.request(11, 0, [{**d, "shape": [8, 4, 16]}]), [p], ErrorCode.MALFORMED),
        (P.request(12, 0, [{**d, "name": "other"}]), [p], ErrorCode.MALFORMED),
        (P.request(13, 42, [d]), [p], ErrorCode.UNKNOWN_MODE),
        (P.request(14, 0, [{**d, "dtype": "complex64"}]), [p], ErrorCode.UNSUPPORTED),
        (P.request(15, 0, [d, d]), [p, p], ErrorCode.MALFORMED),
    ]
    d4, p4 = codec.encode(
        np.zeros((4, 8, 8), np.float32), type("M", (), dict(channels=4, bits=8, scale=0.1, zero_point=0)), name="z"
    )
    bad.append((P.request(16, 0, [d4]), [p4], ErrorCode.UNKNOWN_MODE))  # mode 0 sends 8 channels
    for header, frames, code in bad:
        c.send(P.pack(header, frames))
        m = c.recv()
        assert (m.kind, m.id, m.header["code"]) == ("error", header["id"], code), m.header
    c.send(good)
    assert c.recv().kind == "pong"
    c.close()
    # and a normal agent is still served correctly
    with Agent(tiny_bundle, server.endpoint, threads=1) as agent:
        r = agent.infer(cifar_samples[0])
    assert r.ok and r.pred == int(local_logits(tiny_bundle, cifar_samples[:1]).argmax())


def test_overloaded_when_queue_full(tiny_bundle):
    with Server(
        [tiny_bundle], "tcp://127.0.0.1:0", threads=1, max_batch=64, max_queue=4, max_queue_delay_us=300_000, credits=64
    ) as srv:
        c = RawClient(srv.endpoint)
        c.hello(tiny_bundle)
        for rid in range(1, 11):
            c.request(tiny_bundle, rid)
        msgs = [c.recv() for _ in range(10)]
        errors = [m for m in msgs if m.kind == "error"]
        results = [m for m in msgs if m.kind == "result"]
        assert sorted(m.id for m in errors) == [5, 6, 7, 8, 9, 10]
        assert all(m.header["code"] == ErrorCode.OVERLOADED for m in errors)
        assert sorted(m.id for m in results) == [1, 2, 3, 4]
        c.close()


def test_overloaded_when_credits_exceeded(tiny_bundle):
    with Server([tiny_bundle], "tcp://127.0.0.1:0", threads=1, max_queue_delay_us=300_000, credits=2) as srv:
        c = RawClient(srv.endpoint)
        assert c.hello(tiny_bundle, max_inflight=8)["credits"] == 2
        for rid in (1, 2, 3):
            c.request(tiny_bundle, rid)
        first = c.recv()
        assert (first.kind, first.id, first.header["code"]) == ("error", 3, ErrorCode.OVERLOADED)
        assert "credits" in first.header["message"]
        assert sorted(c.recv().id for _ in range(2)) == [1, 2]
        c.close()


def test_deadlines(tiny_bundle):
    with Server([tiny_bundle], "tcp://127.0.0.1:0", threads=1, max_queue_delay_us=2_000_000) as srv:
        c = RawClient(srv.endpoint)
        c.hello(tiny_bundle)
        c.request(tiny_bundle, 1, deadline_ms=0)
        m = c.recv()
        assert (m.kind, m.id, m.header["code"]) == ("error", 1, ErrorCode.DEADLINE_EXCEEDED)
        # a batch is flushed before its earliest deadline, not after the 2 s queue delay
        c.request(tiny_bundle, 2, deadline_ms=100)
        m = c.recv(timeout=30)
        assert m.kind == "result" and m.id == 2 and m.header["timing"]["queue_us"] < 2_000_000
        c.close()
        with Agent(tiny_bundle, srv.endpoint, threads=1, deadline_ms=0) as agent:
            r = agent.send_tensor(np.zeros((8, 8, 8), np.float32))
            res = agent.wait_for(r)
        assert not res.ok and res.error == "DEADLINE_EXCEEDED" and res.error_code == 8


def test_unknown_bundle(server, tiny_bundle, tmp_path):
    other = variant_bundle(tiny_bundle, tmp_path / "other", tiny_bundle.manifest["modes"], "not-served")
    agent = Agent(other, server.endpoint, threads=1, timeout_s=5)
    with pytest.raises(AgentError) as e:
        agent.connect()
    assert e.value.code == ErrorCode.UNKNOWN_BUNDLE


def test_agent_timeouts_do_not_hang(tiny_bundle):
    # nobody listening: the handshake times out with an error
    from edgesplit.wire.transport import free_tcp_endpoint

    agent = Agent(tiny_bundle, free_tcp_endpoint(), load_head=False, timeout_s=0.3)
    t0 = time.monotonic()
    with pytest.raises(AgentError):
        agent.connect()
    assert time.monotonic() - t0 < 20  # timed out (0.3 s), not hung: the bound only tells the two apart
    # a server that welcomes but never answers: each request ends as a TIMEOUT error
    router, endpoint = bind_router("tcp://127.0.0.1:0")
    try:
        agent = Agent(tiny_bundle, endpoint, load_head=False, timeout_s=0.3)
        agent._sock = None
        import threading

        def fake():
            ident, hdr = router.recv_multipart()
            h = P.parse([hdr]).header
            router.send_multipart(
                [
                    ident,
                    *P.pack(
                        P.welcome(
                            h["bundle"], "mute", credits=4, limits=P.DEFAULT_LIMITS, heartbeat_ms=0, codecs=["raw"]
                        )
                    ),
                ]
            )

        t = threading.Thread(target=fake)
        t.start()
        agent.connect(timeout_s=5)
        t.join()
        rid = agent.send_tensor(np.zeros((8, 8, 8), np.float32), key="k")
        t0 = time.monotonic()
        r = agent.wait_for(rid)
        assert r.error == TIMEOUT and 0.25 < time.monotonic() - t0 < 20  # waited its 0.3 s, then gave up
        agent.close()
    finally:
        router.close(0)


def test_agent_rehandshakes_after_server_restart(tiny_bundle):
    srv = Server([tiny_bundle], "tcp://127.0.0.1:0", threads=1, max_queue_delay_us=0).start()
    endpoint = srv.endpoint
    agent = Agent(tiny_bundle, endpoint, load_head=False, timeout_s=5).connect()
    z = np.zeros((8, 8, 8), np.float32)
    assert agent.wait_for(agent.send_tensor(z)).ok
    srv.stop()
    agent.poll(0.2)  # sees bye
    assert agent.server_bye is not None
    for _attempt in range(40):  # the old listening socket closes asynchronously
        try:
            srv2 = Server([tiny_bundle], endpoint, threads=1, max_queue_delay_us=0).start()
            break
        except OSError:
            time.sleep(0.05)
    else:
        pytest.fail(f"could not re-bind {endpoint}")
    try:
        agent.connect()  # after bye the agent is told to handshake again
        assert agent.wait_for(agent.send_tensor(z)).ok
        # the new server loses our session (as after its own restart): NOT_READY -> hello -> resend
        srv2.sessions.clear()
        time.sleep(0.05)
        r = agent.wait_for(agent.send_tensor(z))
        assert r.ok, r
        agent.close()
    finally:
        srv2.stop()


# -- processes -----------------------------------------------------------------------------------


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_sigterm_drains_and_exits_cleanly(tiny_bundle):
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgesplit.server.daemon",
            "--bundle",
            str(tiny_bundle.root),
            "--bind",
            "tcp://127.0.0.1:0",
            "--threads",
            "1",
            "--max-queue-delay-us",
            "5000000",
            "--log-level",
            "WARNING",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        cwd=ROOT,
    )
    try:
        line = p.stdout.readline()
        assert "listening on tcp://" in line, (line, p.stderr.read() if p.poll() is not None else "")
        endpoint = line.split("listening on ")[1].strip()
        c = RawClient(endpoint)
        c.hello(tiny_bundle)
        for rid in (1, 2, 3):
            c.request(tiny_bundle, rid)
        c.send(P.pack(P.ping(1)))  # one connection is handled in order: the pong means all 3 are queued
        assert c.recv().kind == "pong"
        p.send_signal(signal.SIGTERM)
        msgs = [c.recv(timeout=10) for _ in range(4)]
        assert sorted(m.id for m in msgs[:3]) == [1, 2, 3] and all(m.kind == "result" for m in msgs[:3])
        assert msgs[3].kind == "bye"
        assert p.wait(timeout=15) == 0
        c.close()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_agent_cli_never_imports_torch(server, tiny_bundle, tmp_path):
    out = tmp_path / "frames.jsonl"
    code = (
        "import sys\n"
        "from edgesplit.edge.agent import agent_main\n"
        f"rc = agent_main(['--bundle', {str(tiny_bundle.root)!r}, '--server', {server.endpoint!r}, "
        "'--source', 'cifar10:test', '--frames', '12', '--inflight', '4', '--threads', '1', "
        f"'--json-lines', {str(out)!r}])\n"
        "assert rc == 0, rc\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not bad, bad\n"
        "print('NO_TORCH_OK')\n"
    )
    env = _env()
    env.setdefault("EDGESPLIT_DATA", str(ROOT.parent / "shared" / "data"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and "NO_TORCH_OK" in r.stdout, r.stderr[-2000:]
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    frames, summary = lines[:-1], lines[-1]["summary"]
    assert len(frames) == 12 and all(f["pred"] is not None and f["label"] is not None for f in frames)
    assert summary["frames"] == 12 and summary["ok"] == 12 and summary["rtt_ms_p50"] > 0
    assert summary["torch_loaded"] is False
    assert "accuracy" in r.stdout


# -- batcher and heartbeats ----------------------------------------------------------------------


def _item(key, t, rows=1, deadline=None):
    from edgesplit.server.batcher import Item

    return Item(
        key=key,
        identity=b"x",
        req_id=0,
        desc={},
        payload=b"",
        rows=rows,
        single=True,
        t_recv_ns=t,
        deadline_ns=deadline,
    )


def test_batcher_rules():
    from edgesplit.server.batcher import Batcher

    b = Batcher(max_batch=4, max_delay_us=50_000, max_queue=6)
    now = time.perf_counter_ns()
    for _i in range(5):
        assert b.put(_item("a", now))
    assert b.put(_item("b", now))
    assert not b.put(_item("a", now))  # queue full
    first = b.next_batch(timeout=1)  # "a" has 5 rows >= max_batch: due at once, 4 rows taken
    assert len(first) == 4 and all(i.key == "a" for i in first)
    t0 = time.monotonic()
    second = b.next_batch(timeout=30)  # then the oldest due key after the 50 ms delay
    assert 0.02 < time.monotonic() - t0 and len(second) == 1
    assert len(b.next_batch(timeout=1)) == 1 and len(b) == 0
    assert b.next_batch(timeout=0.01) is None  # nothing queued
    # a deadline pulls the flush forward
    b2 = Batcher(
        max_batch=8, max_delay_us=600_000_000, max_queue=8
    )  # a 10-minute delay: only the deadline can release it
    now = time.perf_counter_ns()
    b2.put(_item("k", now, deadline=now + 30_000_000))
    assert len(b2.next_batch(timeout=30) or []) == 1
    # rows: a 3-row item and a 2-row item never share a 4-row batch
    b3 = Batcher(max_batch=4, max_delay_us=0, max_queue=8)
    b3.put(_item("k", now, rows=3))
    b3.put(_item("k", now, rows=2))
    assert [i.rows for i in b3.next_batch(timeout=1)] == [3]
    # close: everything left is due at once, then None
    b3.close()
    assert not b3.put(_item("k", now))
    assert [i.rows for i in b3.next_batch(timeout=1)] == [2]
    assert b3.next_batch() is None


def test_heartbeats_and_session_expiry(tiny_bundle):
    with Server([tiny_bundle], "tcp://127.0.0.1:0", threads=1, heartbeat_ms=150, max_queue_delay_us=0) as srv:
        c = RawClient(srv.endpoint)
        assert c.hello(tiny_bundle)["heartbeat_ms"] == 150
        c.send(P.pack(P.ping(77, 1)))
        m = c.recv()
        assert m.kind == "pong" and m.header["nonce"] == 77
        m = c.recv(timeout=2)  # silent for one interval: the server pings us
        assert m.kind == "ping"
        time.sleep(0.8)  # silent for > 3 intervals: session expired
        while c.sock.poll(0):
            c.sock.recv_multipart()
        c.request(tiny_bundle, 1)
        m = c.recv()
        assert (m.kind, m.header["code"]) == ("error", ErrorCode.NOT_READY)
        assert srv.stats()["sessions_expired"] >= 1
        c.close()
        # a real agent answers pings and re-handshakes by itself after expiry
        agent = Agent(tiny_bundle, srv.endpoint, load_head=False, timeout_s=5).connect()
        time.sleep(0.8)
        r = agent.wait_for(agent.send_tensor(np.zeros((8, 8, 8), np.float32)))
        assert r.ok, r
        agent.close()


def test_run_records_server_errors_per_frame(server, multi_bundle, cifar_samples):
    # deadline 0: every frame comes back as an error with its code, none is dropped
    with Agent(multi_bundle, server.endpoint, threads=1, deadline_ms=0) as agent:
        results = list(agent.run(cifar_samples[:6]))
    assert len(results) == 6 and all(r.error == "DEADLINE_EXCEEDED" and r.error_code == 8 for r in results)
    s = summarize(results)
    assert s["ok"] == 0 and s["errors"] == {"DEADLINE_EXCEEDED": 6} and s["accuracy"] is None


def test_internal_error_when_the_tail_fails_and_serving_continues(tiny_bundle, tmp_path):
    # The same tail with its batch axis fixed to 1: a batch of 2 makes ONNX Runtime fail.
    import onnx

    root = tmp_path / "fixed-batch"
    bundle = variant_bundle(tiny_bundle, root, tiny_bundle.manifest["modes"], "fixed-batch")
    model = onnx.load(str(bundle.file("tail")))
    for v in (*model.graph.input, *model.graph.output):
        v.type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(model, str(root / bundle.file("tail").name))
    manifest = json.loads(json.dumps(bundle.manifest))
    write_manifest(root, manifest)
    bundle = Bundle.load(root)
    with Server([bundle], "tcp://127.0.0.1:0", threads=1, max_batch=2, max_queue_delay_us=300_000) as srv:
        c = RawClient(srv.endpoint)
        c.hello(bundle)
        c.request(bundle, 1)
        c.request(bundle, 2)
        msgs = [c.recv() for _ in range(2)]
        assert sorted(m.id for m in msgs) == [1, 2]
        assert all(m.kind == "error" and m.header["code"] == ErrorCode.INTERNAL for m in msgs)
        c.request(bundle, 3, deadline_ms=200)  # alone in its batch (due before the 300 ms window): served
        m = c.recv()
        assert m.kind == "result" and m.id == 3
        c.close()


# -- fast paths: the same answers as the general paths -------------------------------------------


def _runner_items(bundle, specs):
    """Items for TailRunner.run: specs = [(mode, z)], validated like the I/O thread does."""
    from edgesplit.server.batcher import Item

    items = []
    for i, (m, z, codec_name) in enumerate(specs):
        d, p = codec.encode(z, m, name=bundle.wire_spec["name"], codec=codec_name)
        parts = P.pack(P.request(i + 1, m.id, [d]), [p])
        msg = P.parse(parts)
        items.append(
            Item(
                key=(bundle.hash, m.id),
                identity=b"x",
                req_id=i + 1,
                desc=msg.header["tensors"][0],
                payload=msg.frames[0],
                rows=1 if z.ndim == 3 else z.shape[0],
                single=z.ndim == 3,
                t_recv_ns=0,
            )
        )
    return items


def test_tail_runner_single_and_batched_paths_match_the_reference(multi_bundle):
    from edgesplit.server.daemon import TailRunner

    runner = TailRunner(multi_bundle, threads=1)
    tail = create_engine(multi_bundle.file("tail"), threads=1)
    C, h, w = multi_bundle.wire_spec["shape"]
    rng = np.random.default_rng(5)
    for m in multi_bundle.modes:  # 8/4/6/2 bits, channel subsets 8/4/6/8
        zs = [rng.uniform(0, 300 * multi_bundle.mode(0).scale, (C, h, w)).astype(np.float32) for _ in range(3)]
        for codec_name in ("raw", "zstd"):
            specs = [(m, z, codec_name) for z in zs]
            ref_in = np.stack([codec.decode(*codec.encode(z, m, codec=codec_name), full_channels=C) for z in zs])
            # one item at a time: the single-request fast path, batch of 1
            for k, it in enumerate(_runner_items(multi_bundle, specs)):
                logits, offsets, errors = runner.run([it])
                assert not errors and offsets == [0]
                assert np.array_equal(logits, tail.run1(ref_in[k : k + 1])), (m.name, codec_name)
            # all together: one stacked batch
            logits, offsets, errors = runner.run(_runner_items(multi_bundle, specs))
            assert not errors and offsets == [0, 1, 2]
            assert np.array_equal(logits, tail.run1(ref_in)), (m.name, codec_name)
    # 4-D requests (several rows) next to a single one, channel subset: rows land in order
    m = multi_bundle.mode(1)
    z4 = rng.uniform(0, 1, (2, C, h, w)).astype(np.float32)
    z3 = rng.uniform(0, 1, (C, h, w)).astype(np.float32)
    items = _runner_items(multi_bundle, [(m, z4, "raw"), (m, z3, "raw")])
    logits, offsets, errors = runner.run(items)
    ref = np.concatenate(
        [codec.decode(*codec.encode(z4, m), full_channels=C), codec.decode(*codec.encode(z3, m), full_channels=C)[None]]
    )
    assert offsets == [0, 2] and np.array_equal(logits, tail.run1(ref))
    runner.engine.close()


def test_tail_runner_buffers_keep_zero_fill_across_modes(multi_bundle):
    # The batch buffer is reused: after a wide mode, a narrow mode must still see zeros beyond its
    # channels (one buffer per channel count), and a batch larger than any before grows it.
    from edgesplit.server.daemon import TailRunner

    runner = TailRunner(multi_bundle, threads=1)
    tail = create_engine(multi_bundle.file("tail"), threads=1)
    C, h, w = multi_bundle.wire_spec["shape"]
    big = np.full((C, h, w), 5.0, np.float32)
    wide, narrow = multi_bundle.mode(0), multi_bundle.mode(1)
    for m in (wide, narrow, wide, narrow):
        for n in (1, 5):
            items = _runner_items(multi_bundle, [(m, big, "raw")] * n)
            logits, _, _ = runner.run(items)
            ref = codec.decode(*codec.encode(big, m), full_channels=C)
            assert np.array_equal(logits, tail.run1(np.stack([ref] * n))), (m.name, n)


def test_tail_runner_reports_decode_errors_per_item(tiny_bundle):
    from edgesplit.server.daemon import TailRunner

    runner = TailRunner(tiny_bundle, threads=1)
    m = tiny_bundle.default_mode
    z = np.ones((8, 8, 8), np.float32)
    items = _runner_items(tiny_bundle, [(m, z, "raw"), (m, z, "raw"), (m, z, "raw")])
    items[1].payload = items[1].payload[:-1]  # as if validation had been skipped: decode must still refuse
    logits, offsets, errors = runner.run(items)
    assert offsets == [0, -1, 1] and list(errors) == [1] and errors[1].code == ErrorCode.MALFORMED
    assert logits.shape == (2, 10)
    logits, offsets, errors = runner.run(items[1:2])  # alone: the single-request path reports it too
    assert offsets == [-1] and errors[0].code == ErrorCode.MALFORMED and logits.size == 0


def test_batcher_fast_path_and_batching_under_load():
    import threading

    from edgesplit.server.batcher import Batcher

    b = Batcher(max_batch=8, max_delay_us=0, max_queue=16)
    now = time.perf_counter_ns()
    one = _item("k", now)
    b.put(one)
    assert b.next_batch(timeout=1) == [one] and len(b) == 0  # idle: a batch of one at once
    for _ in range(5):  # queued while the tail was busy: they leave together
        b.put(_item("k", now))
    b.put(_item("other", now))
    got = b.next_batch(timeout=1)
    assert len(got) == 5 and all(i.key == "k" for i in got) and len(b) == 1
    assert [i.key for i in b.next_batch(timeout=1)] == ["other"]
    # a consumer blocked on an empty batcher: woken by put, and by close (then None)
    out = []
    t = threading.Thread(target=lambda: out.extend([b.next_batch(), b.next_batch()]))
    t.start()
    time.sleep(0.05)
    late = _item("k", time.perf_counter_ns())
    b.put(late)
    time.sleep(0.05)
    b.close()
    t.join(2)
    assert not t.is_alive() and out == [[late], None]
    assert not b.put(_item("k", now)) and len(b) == 0
    # a full batch does not wait for the queue delay (10 minutes here: only fullness can release it)
    full = Batcher(max_batch=2, max_delay_us=600_000_000, max_queue=8)
    full.put(_item("k", time.perf_counter_ns(), rows=2))
    assert len(full.next_batch(timeout=30) or []) == 1
    # a request alone waits for it
    b2 = Batcher(max_batch=2, max_delay_us=100_000, max_queue=8)
    b2.put(_item("k", time.perf_counter_ns()))
    t0 = time.monotonic()
    assert len(b2.next_batch(timeout=30)) == 1 and 0.08 < time.monotonic() - t0


def test_server_answers_undecodable_tensors_and_serves_the_rest(tiny_bundle):
    # zstd payloads are decompressed while decoding (compute thread): a frame that does not hold
    # the tensor gets MALFORMED there, and the other requests of its batch get their results.
    with Server([tiny_bundle], "tcp://127.0.0.1:0", threads=1, max_batch=8, max_queue_delay_us=500_000) as srv:
        c = RawClient(srv.endpoint)
        c.hello(tiny_bundle)
        m = tiny_bundle.default_mode
        z = np.random.default_rng(1).uniform(0, 100 * m.scale, (8, 8, 8)).astype(np.float32)
        d, p = codec.encode(z, m, name="z", codec="zstd")
        wrong = codec._compressor().compress(b"\x00" * 100)  # a valid zstd frame of 100 bytes, not 512
        c.send(P.pack(P.request(1, 0, [d]), [p]))
        c.send(P.pack(P.request(2, 0, [{**d, "nbytes": len(wrong)}]), [wrong]))
        c.send(P.pack(P.request(3, 0, [d]), [p]))
        msgs = {m_.id: m_ for m_ in (c.recv() for _ in range(3))}
        assert msgs[1].kind == msgs[3].kind == "result"
        assert msgs[1].header["timing"]["batch_size"] == 2  # the undecodable one took no row
        assert (msgs[2].kind, msgs[2].header["code"]) == ("error", ErrorCode.MALFORMED)
        assert "zstd" in msgs[2].header["message"]
        c.close()


def test_run_reads_the_next_frame_only_when_a_window_slot_is_free(server, tiny_bundle, cifar_samples):
    # The head of frame k+1 must not run while frame k could be waiting on the socket: that would
    # add the agent's own busy time to rtt_ms (and to what link estimation sees) and send staler
    # frames. So the source is only read with a free slot, for any window.
    for inflight in (1, 3):
        agent = Agent(tiny_bundle, server.endpoint, threads=1, inflight=inflight).connect()
        seen = []

        def source(agent=agent, seen=seen):
            for s in cifar_samples[:10]:
                seen.append(len(agent._pending))
                yield s

        results = list(agent.run(source()))
        agent.close()
        assert len(results) == 10 and all(r.ok for r in results)
        assert max(seen) < agent.window, (inflight, seen)
        assert sorted(r.id for r in results) == list(range(1, 11))


def test_send_parts_and_recv_parts_roundtrip(tiny_bundle):
    from edgesplit.wire.transport import COPY_THRESHOLD, connect_dealer, pending_in, recv_parts, send_parts

    router, endpoint = bind_router("tcp://127.0.0.1:0")
    dealer = connect_dealer(endpoint, identity=b"dealer-1")
    try:
        big = np.random.default_rng(0).integers(0, 256, COPY_THRESHOLD * 3, dtype=np.uint8).tobytes()  # zero-copy path
        parts = [b"header", b"", memoryview(b"abc"), big, bytearray(b"xyz")]
        send_parts(dealer, parts)
        assert router.poll(5000)
        got = recv_parts(router)
        assert got[0] == b"dealer-1" and got[1:] == [b"header", b"", b"abc", big, b"xyz"]
        assert not pending_in(router)
        send_parts(router, [b"dealer-1", b"reply"], int(zmq.NOBLOCK))
        assert dealer.poll(5000) and pending_in(dealer) and recv_parts(dealer) == [b"reply"]
        # ROUTER_MANDATORY: an unknown peer fails at the first frame, nothing half-sent
        with pytest.raises(zmq.ZMQError) as e:
            send_parts(router, [b"nobody", b"h", b"p"], int(zmq.NOBLOCK))
        assert e.value.errno == zmq.EHOSTUNREACH
        send_parts(router, [b"dealer-1", b"after"], int(zmq.NOBLOCK))
        assert dealer.poll(5000) and recv_parts(dealer) == [b"after"]
        with pytest.raises(zmq.Again):
            recv_parts(dealer, int(zmq.NOBLOCK))
    finally:
        dealer.close(0)
        router.close(0)


# -- v1.1: compact requests ----------------------------------------------------------------------


def _head_outputs(bundle: Bundle, samples) -> list[np.ndarray]:
    head = create_engine(bundle.file("head"), threads=1)
    return [head.run1(preprocess(s.data, bundle.input_spec)[None])[0] for s in samples]


def test_compact_and_full_requests_give_identical_logits(server, multi_bundle, cifar_samples):
    c = RawClient(server.endpoint)
    welcome = c.hello(multi_bundle)
    assert "compact_requests" in welcome["features"]
    zs = _head_outputs(multi_bundle, cifar_samples[:3])
    rid = 0
    for m in multi_bundle.modes:  # channel subsets 8/4/6/8 at 8/4/6/2 bits
        implied = P.compact_descriptor("z", multi_bundle.wire_spec["shape"], m)
        for z in zs:
            d, payload = codec.encode(z, m, name="z")
            assert d == implied  # the agent's raw encoding is the mode's implied one
            got = {}
            for form, tensors in (("full", [d]), ("compact", None)):
                rid += 1
                header = P.pack_header(P.request(rid, m.id, tensors))
                c.send([header, payload])  # one at a time: each runs alone, in a batch of one
                r = c.recv()
                assert r.kind == "result" and r.id == rid, r.header
                assert r.header["timing"]["batch_size"] == 1 and r.header["outputs"][0]["shape"] == [10]
                got[form] = (r.frames[0], len(header))
            assert got["compact"][0] == got["full"][0], m.name  # bit-identical logits
            assert got["compact"][1] < 40 < 100 < got["full"][1]
    c.close()
    # and both equal the in-process split (head -> quantize -> zero-fill -> tail)
    with Agent(multi_bundle, server.endpoint, mode=1, threads=1) as agent:
        results = sorted(agent.run(cifar_samples[:3]), key=lambda r: r.id)
    assert all(r.ok and r.header_bytes < 40 for r in results)
    np.testing.assert_allclose(
        np.stack([r.logits for r in results]), local_logits(multi_bundle, cifar_samples[:3], 1), atol=1e-4, rtol=1e-4
    )


def test_compact_request_errors_and_the_server_keeps_serving(server, tiny_bundle, multi_bundle, cifar_samples):
    z = _head_outputs(tiny_bundle, cifar_samples[:1])[0]
    d, payload = codec.encode(z, tiny_bundle.default_mode, name="z")
    assert len(payload) == 512
    c = RawClient(server.endpoint)
    c.send(P.pack(P.request(1, 0, None), [payload]))  # no session yet
    m = c.recv()
    assert (m.kind, m.id, m.header["code"]) == ("error", 1, ErrorCode.NOT_READY)
    c.hello(tiny_bundle)
    bad = [
        (2, 0, [payload[:-1]], ErrorCode.MALFORMED),  # one byte short
        (3, 0, [payload + b"\x00"], ErrorCode.MALFORMED),  # one byte long
        (4, 0, [b""], ErrorCode.MALFORMED),  # empty frame
        (5, 0, [payload * 2], ErrorCode.MALFORMED),  # a [2,8,8,8] batch needs a full request
        (6, 0, [payload, payload], ErrorCode.MALFORMED),  # two frames
        (7, 42, [payload], ErrorCode.UNKNOWN_MODE),  # no such mode
        (8, 1, [payload], ErrorCode.UNKNOWN_MODE),  # tiny bundle has only mode 0
    ]
    for rid, mode_id, frames, code in bad:
        c.send(P.pack(P.request(rid, mode_id, None), frames))
        m = c.recv()
        assert (m.kind, m.id, m.header["code"]) == ("error", rid, code), m.header
        if rid in (2, 3, 4, 5):
            assert "compact" in m.header["message"] and "512" in m.header["message"]
    c.send(P.pack({**P.request(9, 0, None), "tensors": None}, [payload]))  # nil is compact too
    assert c.recv().kind == "result"
    c.send(P.pack(P.request(10, 0, None), [payload]))
    ok = c.recv()
    c.send(P.pack(P.request(11, 0, [d]), [payload]))
    full = c.recv()
    assert ok.kind == full.kind == "result" and ok.frames[0] == full.frames[0]
    c.send(P.pack(P.ping(3)))
    assert c.recv().kind == "pong"
    # a session on another bundle checks against that bundle's modes: mode 1 (c4-b4) is 128 bytes
    c.hello(multi_bundle)
    c.send(P.pack(P.request(12, 1, None), [payload]))
    m = c.recv()
    assert (m.kind, m.id, m.header["code"]) == ("error", 12, ErrorCode.MALFORMED) and "128" in m.header["message"]
    d1, p1 = codec.encode(_head_outputs(multi_bundle, cifar_samples[:1])[0], multi_bundle.mode(1), name="z")
    c.send(P.pack(P.request(13, 1, None), [p1]))
    assert c.recv().kind == "result"
    c.close()
    stats = server.stats()
    assert stats["error_MALFORMED"] >= 6 and stats["error_UNKNOWN_MODE"] >= 2


class FakeServer:
    """A hand-written ROUTER peer playing a server of either revision: v1.1 when ``features``
    lists compact_requests, else v1.0 (whose parser answers a request without 'tensors'
    MALFORMED before it looks at the session). Answers requests with zero logits."""

    def __init__(self, features=()):
        import threading

        self.router, self.endpoint = bind_router("tcp://127.0.0.1:0")
        self.features = list(features)
        self.sessions: set[bytes] = set()
        self.requests: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()

    def _main(self):
        logits_desc, logits = codec.encode_float(np.zeros(10, np.float32), name="logits")
        while not self._stop.is_set():
            if not self.router.poll(20):
                continue
            ident, *parts = self.router.recv_multipart()
            h = P.unpack_header(parts[0])
            frames = []
            if h["kind"] == "hello":
                self.sessions.add(ident)
                reply = P.welcome(
                    h["bundle"],
                    "fake",
                    credits=8,
                    limits=P.DEFAULT_LIMITS,
                    heartbeat_ms=0,
                    codecs=["raw"],
                    features=self.features,
                )
            elif h["kind"] == "request":
                self.requests.append(h)
                if "tensors" not in h and "compact_requests" not in self.features:
                    reply = P.error(h["id"], ErrorCode.MALFORMED, "request: missing field 'tensors'")
                elif ident not in self.sessions:
                    reply = P.error(h["id"], ErrorCode.NOT_READY, "no session")
                else:
                    reply, frames = (
                        P.result(h["id"], [logits_desc], queue_us=1, compute_us=1, batch_size=1, server_us=2),
                        [logits],
                    )
            else:
                continue
            self.router.send_multipart([ident, *P.pack(reply, frames)])

    def restart_as(self, features):
        """A new server process on the same endpoint: sessions gone, no bye sent."""
        self.features = list(features)
        self.sessions.clear()

    def close(self):
        self._stop.set()
        self._thread.join(2)
        self.router.close(0)


def test_agent_sends_full_requests_unless_the_server_offers_compact(tiny_bundle, cifar_samples):
    fake = FakeServer(features=())  # a v1.0 server
    try:
        agent = Agent(tiny_bundle, fake.endpoint, threads=1, timeout_s=5).connect()
        assert agent.welcome is not None and not agent.compact_requests
        r = agent.infer(cifar_samples[0])
        assert r.ok and "tensors" in fake.requests[-1] and r.header_bytes > 100
        assert fake.requests[-1]["tensors"][0] == P.compact_descriptor("z", [8, 8, 8], tiny_bundle.default_mode)
        assert "t_send_ns" not in fake.requests[-1]  # the agent keeps its send times itself

        # restarted as v1.1: NOT_READY -> hello -> welcome with the feature -> the full request
        # resent as it was; the next ones go out compact
        fake.restart_as(["compact_requests"])
        r = agent.infer(cifar_samples[1])
        assert r.ok and agent.compact_requests and "tensors" in fake.requests[-1]
        r = agent.infer(cifar_samples[2])
        assert r.ok and "tensors" not in fake.requests[-1] and r.header_bytes < 40
        agent.deadline_ms = 50.0
        r = agent.infer(cifar_samples[3])
        assert r.ok and fake.requests[-1]["deadline_ms"] == 50 and r.header_bytes == 40

        # a v1.0 server takes the endpoint over without a bye: the compact request is refused
        # MALFORMED, the agent resends it in full (NOT_READY -> hello -> welcome without the
        # feature -> resend) and stays with full requests
        fake.restart_as([])
        n = len(fake.requests)
        r = agent.infer(cifar_samples[4])
        assert r.ok, r
        assert ["tensors" in h for h in fake.requests[n:]] == [False, True, True]
        assert not agent.compact_requests and r.header_bytes > 100
        r = agent.infer(cifar_samples[5])
        assert r.ok and "tensors" in fake.requests[-1]
        agent.close()
    finally:
        fake.close()
