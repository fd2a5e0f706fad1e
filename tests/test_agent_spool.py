"""Delivered results and the spool: records on disk in order, bounded (oldest dropped, counted),
surviving restarts; and an agent process whose server and collector processes are killed with
SIGKILL mid-stream and restarted: every frame's result reaches the collector once, in order.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from edgesplit.bench.serverproc import ServerProcess
from edgesplit.edge.delivery import Deliverer
from edgesplit.edge.spool import Spool
from edgesplit.loopback import free_port

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "cifar10-resnet20-bottlefit"
SERVER_ARGS = ["--threads", "1", "--max-queue-delay-us", "0"]


def recs(a: int, b: int) -> list[dict]:
    return [{"seq": i, "pad": "x" * 50} for i in range(a, b)]


# -- the spool on its own ------------------------------------------------------------------------


def test_spool_keeps_order_across_segments_and_reopen(tmp_path):
    s = Spool(tmp_path, max_bytes=10**7, max_records=10**6, segment_records=7)
    s.append(recs(1, 31))
    assert len(s) == 30 and len(list(tmp_path.glob("*.jsonl"))) == 5
    got = []
    for _ in range(3):
        batch = s.peek(4)
        got += [r["seq"] for r in batch]
        s.commit(len(batch))
    assert got == list(range(1, 13))
    s2 = Spool(tmp_path, max_bytes=10**7, max_records=10**6, segment_records=7)  # a restarted agent
    assert len(s2) == 18
    out = []
    while len(s2):
        b = s2.peek(100)
        out += [r["seq"] for r in b]
        s2.commit(len(b))
    assert out == list(range(13, 31)) and s2.bytes == 0 and s2.dropped == 0
    assert not list(tmp_path.glob("*.jsonl"))  # delivered segments are deleted
    s2.append(recs(31, 33))
    assert [r["seq"] for r in Spool(tmp_path, 10**7, 10**6).peek(10)] == [31, 32]


def test_spool_full_drops_the_oldest_and_counts_them(tmp_path):
    s = Spool(tmp_path, max_bytes=10**7, max_records=25, segment_records=10)
    s.append(recs(1, 101))
    assert len(s) == 25 and s.dropped == 75
    assert [r["seq"] for r in s.peek(100)] == list(range(76, 101))  # the newest 25
    last10 = sum(len(json.dumps(r, separators=(",", ":"))) + 1 for r in recs(30, 40))
    b = Spool(tmp_path / "bytes", max_bytes=last10, max_records=10**6, segment_records=4)
    b.append(recs(1, 40))
    assert b.bytes == last10 and len(b) == 10 and b.dropped == 29
    assert [r["seq"] for r in b.peek(100)] == list(range(30, 40))
    reopened = Spool(tmp_path, max_bytes=10**7, max_records=25, segment_records=10)
    assert reopened.dropped == 75 and len(reopened) == 25


def test_spool_skips_a_line_cut_off_by_a_crash(tmp_path):
    s = Spool(tmp_path, 10**7, 10**6)
    s.append(recs(1, 4))
    seg = next(tmp_path.glob("*.jsonl"))
    with open(seg, "ab") as f:
        f.write(b'{"seq": 4, "pa')  # power lost mid-write
    s2 = Spool(tmp_path, 10**7, 10**6)
    assert [r["seq"] for r in s2.peek(10)] == [1, 2, 3] and s2.dropped == 1
    s2.append(recs(5, 6))
    assert [r["seq"] for r in s2.peek(10)] == [1, 2, 3, 5]


# -- a real collector process ----------------------------------------------------------------------


class CollectorProcess:
    def __init__(self, out: Path, port: int):
        self.out, self.port, self.proc = out, port, None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/results"

    def start(self) -> CollectorProcess:
        cmd = [sys.executable, "-m", "edgesplit", "collect", "--bind", f"127.0.0.1:{self.port}", "--out", str(self.out)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert "listening on" in line, line
        return self

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def records(self) -> list[dict]:
        return [json.loads(x) for x in self.out.read_text().splitlines()] if self.out.exists() else []


def wait_until(cond, timeout_s: float = 30.0) -> None:
    end = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < end, "condition not met in time (a liveness bound)"
        time.sleep(0.02)


def test_deliverer_bounded_spool_then_replay_in_order_and_across_runs(tmp_path):
    port = free_port()
    col = CollectorProcess(tmp_path / "got.jsonl", port)
    # no collector yet: memory spills to the spool, which keeps only the newest 30
    d = Deliverer(col.url, tmp_path / "spool", agent="cam", max_records=30, memory_records=5, timeout_s=1.0)
    for i in range(100):
        d.put({"i": i})
    wait_until(lambda: d.failures >= 1 and d.spool.dropped > 0 and d.pending <= 30 + 5)
    col.start()
    try:
        wait_until(lambda: d.pending == 0)
        d.close()
        s = d.summary()
        got = col.records()
        seqs = [r["seq"] for r in got]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)  # in order, once
        assert seqs[-1] == 100 and s["dropped_total"] == 100 - len(got)  # a gap, counted
        assert [r["i"] for r in got] == [q - 1 for q in seqs]
        # a second run: records left undelivered by the first go out first, then its own
        col.kill9()
        d2 = Deliverer(col.url, tmp_path / "spool", agent="cam", timeout_s=1.0)
        for i in range(10):
            d2.put({"i": 1000 + i})
        d2.close(flush_s=0.5)  # collector down: everything stays on disk
        assert d2.summary()["left_in_spool"] == 10
        col.start()
        d3 = Deliverer(col.url, tmp_path / "spool", agent="cam", timeout_s=1.0)
        assert d3.replayed_from_start == 10
        d3.put({"i": 2000})
        wait_until(lambda: d3.pending == 0)
        d3.close()
        tail = [r["i"] for r in col.records()[len(got) :]]
        assert tail == [1000 + i for i in range(10)] + [2000]
    finally:
        col.stop()


# -- the agent with its server and collector killed ----------------------------------------------


def test_agent_results_survive_server_and_collector_kill9(tmp_path):
    server = ServerProcess([SHIPPED], SERVER_ARGS, port=free_port()).start()
    col = CollectorProcess(tmp_path / "got.jsonl", free_port()).start()
    out = tmp_path / "frames.jsonl"
    cfg = tmp_path / "agent.yaml"
    n = 400
    cfg.write_text(
        yaml.safe_dump(
            dict(
                bundle=str(SHIPPED),
                server=server.endpoint,
                frames=n,
                fps=50.0,
                threads=1,
                timeout_s=1.0,
                reconnect_max_s=0.2,
                json_lines=str(out),
                deliver=col.url,
                deliver_batch=20,
                spool_dir=str(tmp_path / "spool"),
            )
        )
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agent = subprocess.Popen(
        [sys.executable, "-m", "edgesplit", "agent", "--config", str(cfg)], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_until(lambda: len(col.records()) >= 40, 60)
        server.kill9()
        col.kill9()
        outage_start = len(out.read_text().splitlines())
        wait_until(lambda: len(out.read_text().splitlines()) >= outage_start + 40, 60)  # results while down
        server.start()
        col.start()
        _, err = agent.communicate(timeout=120)
        assert agent.returncode == 0, err
    finally:
        if agent.poll() is None:
            agent.kill()
        server.stop()
        col.stop()
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    frames, summary = lines[:-1], lines[-1]["summary"]
    assert len(frames) == n and summary["local"] >= 40  # the outage was answered locally
    d = summary["delivery"]
    assert d["spooled"] > 0 and d["left_in_spool"] == 0 and d["dropped_total"] == 0 and d["records"] == n
    got = col.records()
    assert [r["seq"] for r in got] == list(range(1, n + 1))  # every result once, in order
    assert len({r["run"] for r in got}) == 1
    # what was delivered is what the agent reported, frame by frame
    for rec, f in zip(got, frames):
        assert {k: rec[k] for k in f} == f
    assert any(r["source"] == "local" for r in got) and any(r["source"] == "server" for r in got)


@pytest.fixture(autouse=True)
def _no_state_directory(monkeypatch):
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
