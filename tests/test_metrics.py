"""Metrics, health endpoints and JSON logs of the daemon, scraped over real HTTP after real traffic
(real ZeroMQ sockets, real ONNX Runtime tails, real CIFAR-10 JPEGs): the counts must match what
was sent and what the agents received."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from edgesplit.edge.agent import Agent
from edgesplit.logs import JsonFormatter
from edgesplit.server import compute, metrics, stats
from edgesplit.server.daemon import Server
from edgesplit.wire import codec
from edgesplit.wire import protocol as P
from edgesplit.wire.codec import ErrorCode

ROOT = Path(__file__).resolve().parents[1]


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """GET /metrics and parse it: {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def raw_session(endpoint: str, bundle, name: str) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    s.send_multipart(P.pack(P.hello(bundle.hash, name)))
    assert s.poll(5000) and P.parse(s.recv_multipart()).kind == "welcome"
    return s


def test_metrics_count_what_was_sent(tiny_bundle, cifar_samples, monkeypatch):
    monkeypatch.setattr(compute, "FOLD_EVERY_BATCHES", 4)  # fold often: folded and pending figures add up
    with Server(
        [tiny_bundle], "tcp://127.0.0.1:0", threads=1, max_batch=8, max_queue_delay_us=20_000, http_port=0
    ) as srv:
        agent = Agent(tiny_bundle, srv.endpoint, inflight=8, threads=1, name="cam-7", timeout_s=30).connect()
        # one at a time (batches of one), then eight in flight (the batcher groups them)
        results = [agent.infer(s) for s in cifar_samples[:6]]
        results += list(agent.run(iter(cifar_samples[:24]), 24))
        assert len(results) == 30 and all(r.ok for r in results)

        # provoked failures: an unknown mode (the session's bundle is known), and requests without
        # any session (no bundle: model "unknown")
        raw = raw_session(srv.endpoint, tiny_bundle, "raw")
        z = agent.head_tensor(cifar_samples[0].data)[0]
        d, p = codec.encode(z, tiny_bundle.default_mode, name=tiny_bundle.wire_spec["name"])
        for rid in (101, 102, 103):
            raw.send_multipart(P.pack(P.request(rid, 99, [dict(d)]), [p]))
            assert raw.poll(5000) and P.parse(raw.recv_multipart()).header["code"] == ErrorCode.UNKNOWN_MODE
        # one request carrying three rows: one success, three inferences
        d3, p3 = codec.encode(np.stack([z, z, z]), tiny_bundle.default_mode, name=tiny_bundle.wire_spec["name"])
        raw.send_multipart(P.pack(P.request(104, 0, [d3]), [p3]))
        assert raw.poll(5000)
        r3 = P.parse(raw.recv_multipart())
        assert r3.kind == "result"
        nobody = zmq.Context.instance().socket(zmq.DEALER)
        nobody.setsockopt(zmq.LINGER, 0)
        nobody.connect(srv.endpoint)
        for rid in (201, 202):
            nobody.send_multipart(P.pack(P.request(rid, 0, [dict(d)]), [p]))
            assert nobody.poll(5000) and P.parse(nobody.recv_multipart()).header["code"] == ErrorCode.NOT_READY

        m = scrape(srv.http.url)
        lab = (("mode", "0"), ("model", "tiny-test"), ("version", tiny_bundle.hash[:12]))
        # Batches as the clients saw them: each result reports its batch's size in rows, so the
        # number of batches is the sum of rows/batch_size over the results (exact: all succeeded).
        batches = sum(Fraction(1, r.batch_size) for r in results) + Fraction(3, r3.header["timing"]["batch_size"])
        assert batches.denominator == 1
        assert m[("edgesplit_inference_request_success_total", lab)] == 31
        assert m[("edgesplit_inference_count_total", lab)] == 33
        assert m[("edgesplit_inference_exec_count_total", lab)] == batches
        assert m[("edgesplit_inference_batch_size_count", lab)] == batches
        assert m[("edgesplit_inference_batch_size_sum", lab)] == 33

        # the six one-at-a-time frames ran alone; the three-row request ran in a batch of 3 or 4 rows
        def le(bound):
            return tuple(sorted(lab + (("le", bound),)))

        assert m[("edgesplit_inference_batch_size_bucket", le("1.0"))] >= 6
        assert m[("edgesplit_inference_batch_size_bucket", le("2.0"))] < batches
        for h in ("queue", "request"):
            assert m[(f"edgesplit_inference_{h}_histogram_us_count", lab)] == 31
            assert m[(f"edgesplit_inference_{h}_histogram_us_bucket", le("+Inf"))] == 31
        # cumulative totals agree with what the results reported, to rounding (results carry floats)
        queue_us = sum(r.server_queue_ms for r in results) * 1e3 + r3.header["timing"]["queue_us"]
        assert m[("edgesplit_inference_queue_duration_us_total", lab)] == pytest.approx(queue_us, rel=1e-3, abs=30)
        compute_us = sum(r.server_compute_ms for r in results) * 1e3 + r3.header["timing"]["compute_us"]
        assert m[("edgesplit_inference_compute_infer_duration_us_total", lab)] == pytest.approx(
            compute_us, rel=1e-3, abs=30
        )
        assert m[("edgesplit_inference_compute_infer_histogram_us_count", lab)] == batches

        fail = "edgesplit_inference_request_failure_total"
        assert m[(fail, (("model", "tiny-test"), ("reason", "UNKNOWN_MODE"), ("version", tiny_bundle.hash[:12])))] == 3
        assert m[(fail, (("model", metrics.UNKNOWN_MODEL), ("reason", "NOT_READY"), ("version", "")))] == 2

        assert m[("edgesplit_sessions", ())] == 2
        assert m[("edgesplit_inference_pending_request_count", ())] == 0
        assert m[("edgesplit_inflight_requests", ())] == 0
        assert m[("edgesplit_agent_requests_total", (("agent", "cam-7"),))] == 30
        assert m[("edgesplit_agent_errors_total", (("agent", "raw"),))] == 3
        assert m[("edgesplit_agent_errors_total", (("agent", "cam-7"),))] == 0
        # bytes: at least every tensor payload and header the agent reported sending
        sent = sum(r.bytes_sent + r.header_bytes for r in results)
        assert sent <= m[("edgesplit_agent_received_bytes_total", (("agent", "cam-7"),))] < sent + 4096
        assert ("process_resident_memory_bytes", ()) in m
        raw.close(0)
        nobody.close(0)
        agent.close()


def test_recorded_figures_fold_into_the_same_counts_as_direct_counting():
    rng = np.random.default_rng(0)
    st = stats.ModelStats("m", "v", 0, max_batch=8)
    bounds = stats.DURATION_BUCKETS_US
    queue = list(rng.choice([*bounds, 0.0, 7.5, 3e6], 150)) + list(
        rng.uniform(0, 2e6, 150)
    )  # the bounds themselves too
    batches = [
        (int(r), int(r) - int(k), float(c))
        for r, k, c in zip(rng.integers(1, 9, 300), rng.integers(0, 2, 300), rng.uniform(10, 5e4, 300))
    ]
    for i, (b, q) in enumerate(zip(batches, queue)):
        st.batches.append(b)
        st.queue_us.append(q)
        st.request_us.append(2 * q)
        if i in (10, 11, 200):
            st.fold()
    t = st.totals()  # folded + pending
    ref = np.zeros(len(bounds) + 1, int)
    for q in queue:
        ref[sum(q > b for b in bounds)] += 1  # Prometheus: bucket le=b counts v <= b
    assert [c for _, c in t.queue.buckets()] == list(np.cumsum(ref))
    assert t.queue.total == pytest.approx(sum(queue))
    assert t.request.total == pytest.approx(2 * sum(queue))
    assert (t.executions, t.inferences, t.success) == (300, sum(b[0] for b in batches), sum(b[1] for b in batches))
    assert t.compute_infer_us == pytest.approx(sum(b[1] * b[2] for b in batches))
    assert t.batch_size.buckets()[0] == ("1.0", sum(b[0] == 1 for b in batches))
    assert t.batch_size.buckets()[-1] == ("+Inf", 300) and t.batch_size.buckets()[-2][0] == "8.0"


def test_heartbeat_round_trip_per_agent_and_bounded_agent_series(tiny_bundle, monkeypatch):
    monkeypatch.setattr(metrics, "MAX_AGENT_SERIES", 3)
    with Server([tiny_bundle], "tcp://127.0.0.1:0", threads=1, heartbeat_ms=200, http_port=0) as srv:
        agent = Agent(tiny_bundle, srv.endpoint, load_head=False, name="pinged", timeout_s=30).connect()
        rtt = ("edgesplit_agent_heartbeat_rtt_us", (("agent", "pinged"),))
        end = time.monotonic() + 15
        while rtt not in (m := scrape(srv.http.url)):  # the agent answers the server's pings as it polls
            assert time.monotonic() < end, "no heartbeat round trip measured"
            agent.poll(0.05)
        assert 0 < m[rtt] < 15e6
        # five more agents: the series stop at MAX_AGENT_SERIES names, the rest add up in "_other"
        others = [raw_session(srv.endpoint, tiny_bundle, f"agent-{i}") for i in range(5)]
        m = scrape(srv.http.url)
        names = {dict(k[1])["agent"] for k in m if k[0] == "edgesplit_agent_requests_total"}
        assert len(names) == 3 and metrics.OTHER_AGENTS in names
        for s in others:
            s.close(0)
        agent.close()


def test_health_endpoints_follow_the_daemon_state(tiny_bundle):
    srv = Server([tiny_bundle], "tcp://127.0.0.1:0", threads=1, http_port=0)
    assert srv.ready() == (False, "starting: loading tails and binding the socket")
    srv.start()
    try:
        url = srv.http.url
        assert get(url + "/health/live") == (200, {"status": "ok"})
        assert get(url + "/health/ready") == (200, {"status": "ok"})
        assert get(url + "/nope")[0] == 404
        srv.request_stop()  # draining: not ready for new agents, still alive
        status, body = get(url + "/health/ready")
        assert status == 503 and "draining" in body["reason"]
        assert get(url + "/health/live")[0] == 200
    finally:
        srv.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(url + "/health/live", timeout=2)  # stop() closes the endpoints too


def test_json_log_lines_carry_the_structured_fields():
    rec = logging.LogRecord("edgesplit.server", logging.WARNING, __file__, 1, "hello from %s", ("cam",), None)
    rec.agent, rec.credits = "cam", 8
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        rec.exc_info = sys.exc_info()
    d = json.loads(JsonFormatter().format(rec))
    assert d["level"] == "WARNING" and d["logger"] == "edgesplit.server" and d["msg"] == "hello from cam"
    assert d["agent"] == "cam" and d["credits"] == 8 and "RuntimeError: boom" in d["exc"]
    assert d["ts"].endswith("Z") and "T" in d["ts"]


def test_serve_cli_json_logs_and_http_endpoints(tiny_bundle, cifar_samples):
    cmd = [
        sys.executable,
        "-m",
        "edgesplit.server.daemon",
        "--bundle",
        str(tiny_bundle.root),
        "--bind",
        "tcp://127.0.0.1:0",
        "--threads",
        "1",
        "--http-port",
        "0",
        "--log-format",
        "json",
    ]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        endpoint = p.stdout.readline().split("listening on ")[1].strip()
        url = p.stdout.readline().split("metrics and health on ")[1].strip()
        assert get(url + "/health/ready") == (200, {"status": "ok"})
        agent = Agent(tiny_bundle, endpoint, threads=1, name="json-agent", timeout_s=30).connect()
        assert agent.infer(cifar_samples[0]).ok
        agent.close()
        m = scrape(url)
        assert (
            m[
                (
                    "edgesplit_inference_request_success_total",
                    (("mode", "0"), ("model", "tiny-test"), ("version", tiny_bundle.hash[:12])),
                )
            ]
            == 1
        )
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0
        lines = [json.loads(line) for line in p.stderr.read().splitlines() if line.strip()]
    finally:
        if p.poll() is None:
            p.kill()
    assert lines and all({"ts", "level", "logger", "msg"} <= set(d) for d in lines)
    hello = [d for d in lines if d.get("event") == "hello"]
    assert hello and hello[0]["agent"] == "json-agent" and hello[0]["bundle"] == "tiny-test"
    assert any(d.get("event") == "stopped" and d["stats"]["results"] == 1 for d in lines)
