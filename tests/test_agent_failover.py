"""An agent given several endpoints (gateways serving the same bundle) fails over: real daemon
processes on loopback, one killed with SIGKILL or drained with SIGTERM mid-stream, real frames."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgesplit.bundle import Bundle
from edgesplit.edge.agent import Agent
from edgesplit.edge.connection import endpoints

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT / "models" / "cifar10-resnet20-bottlefit"


def free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


class Daemon:
    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        cmd = [sys.executable, "-m", "edgesplit.server.daemon", "--bundle", str(CIFAR), "--bind", endpoint]
        self.proc = subprocess.Popen(
            [*cmd, "--threads", "1", "--heartbeat-ms", "1000"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self.proc.stdout is not None
        line = ""
        while "listening on" not in line:
            line = self.proc.stdout.readline()
            assert line, f"serve exited {self.proc.wait()}"

    def stop(self, sig=signal.SIGKILL) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(30)


@pytest.fixture
def daemons():
    started: list[Daemon] = []
    yield lambda ep: started.append(Daemon(ep)) or started[-1]
    for d in started:
        d.stop()


def test_endpoint_lists():
    assert endpoints("tcp://a:1, tcp://b:2,") == ["tcp://a:1", "tcp://b:2"]
    assert endpoints(["tcp://a:1"]) == ["tcp://a:1"]
    with pytest.raises(ValueError):
        endpoints(" , ")


def test_gateway_killed_agent_moves_on(daemons, cifar_samples):
    """SIGKILL the gateway an agent streams to: the frames in flight are answered locally, the
    agent says hello to the next gateway, and the rest of the stream is served there."""
    a, b = daemons(free_endpoint()), daemons(free_endpoint())
    bundle = Bundle.load(CIFAR)
    samples = cifar_samples * 3
    results, t_kill, t_back = [], None, None
    with Agent(bundle, [a.endpoint, b.endpoint], inflight=4, threads=1, fallback="auto") as agent:
        assert agent.conn.server == a.endpoint
        for r in agent.run(samples, fps=200):
            results.append(r)
            if len(results) == 16:
                a.stop()
                t_kill = time.monotonic()
            elif t_kill is not None and t_back is None and r.source == "server":
                t_back = time.monotonic()
        assert agent.conn.server == b.endpoint and agent.conn.failovers == 1
    ids = [r.id for r in results]
    assert len(ids) == len(set(ids)) == len(samples)
    assert all(r.ok for r in results), [r.to_json() for r in results if not r.ok]
    assert all(r.source == "server" for r in results[:16])
    assert all(r.source == "server" for r in results[-16:])  # served by the second gateway
    assert {r.fallback_reason for r in results if r.source == "local"} <= {"DISCONNECTED", "UNREACHABLE"}
    assert t_back is not None
    print(f"failover: first server answer {1000 * (t_back - t_kill):.0f} ms after the kill")


def test_draining_gateway_loses_no_frame(daemons, cifar_samples):
    """SIGTERM: the gateway answers what it had queued, refuses what arrives while it drains
    (SHUTTING_DOWN) and says bye; the agent (no local fallback) sends the refused frames and the
    rest of the stream to the next gateway: every frame is answered by a server, once."""
    a, b = daemons(free_endpoint()), daemons(free_endpoint())
    bundle = Bundle.load(CIFAR)
    samples = cifar_samples * 2
    results = []
    with Agent(bundle, f"{a.endpoint},{b.endpoint}", inflight=4, threads=1) as agent:
        for r in agent.run(samples, fps=200):
            results.append(r)
            if len(results) == 8:
                a.proc.send_signal(signal.SIGTERM)
        assert agent.conn.server == b.endpoint and agent.conn.failovers == 1
    assert a.proc.wait(30) == 0  # drained cleanly
    assert sorted(r.id for r in results) == sorted({r.id for r in results}) and len(results) == len(samples)
    assert all(r.ok and r.source == "server" for r in results), [(r.id, r.error) for r in results if not r.ok]


def test_failover_session_resends_a_draining_servers_refusals():
    """The session alone (no sockets, its own clock): a request refused SHUTTING_DOWN is kept
    through the bye and sent again after the next welcome; a second refusal ends it."""
    from edgesplit.edge.connection import FailoverSession
    from edgesplit.wire import protocol as P
    from edgesplit.wire.errors import ErrorCode
    from edgesplit.wire.session_events import Lost, Refused, Send

    bundle = Bundle.load(CIFAR)
    s = FailoverSession(bundle.hash, "t", max_inflight=4)
    s.hello(0)
    welcome = P.pack(P.welcome(bundle.hash, "srv", credits=4, limits=P.DEFAULT_LIMITS, heartbeat_ms=0, codecs=["raw"]))
    s.receive(welcome, 1)
    m = bundle.default_mode
    desc = P.compact_descriptor(bundle.wire_spec["name"], bundle.wire_spec["shape"], m)
    r1, _ = s.request(m.id, desc, b"\0" * desc["nbytes"], 2)
    r2, _ = s.request(m.id, desc, b"\0" * desc["nbytes"], 2)
    assert s.receive(P.pack(P.error(r1.rid, ErrorCode.SHUTTING_DOWN, "draining")), 3) == []
    (lost,) = s.receive(P.pack(P.bye("draining")), 4)
    assert type(lost) is Lost and [q.rid for q in lost.requests] == [r2.rid]  # r1 is kept
    events = s.receive(welcome, 5)
    assert [e.parts for e in events if type(e) is Send] == [r1.parts]
    (refused,) = s.receive(P.pack(P.error(r1.rid, ErrorCode.SHUTTING_DOWN, "draining too")), 6)
    assert type(refused) is Refused and refused.rid == r1.rid


def test_first_gateway_down_at_start(daemons, cifar_samples):
    down = free_endpoint()  # nothing listens there
    b = daemons(free_endpoint())
    with Agent(Bundle.load(CIFAR), [down, b.endpoint], threads=1, reconnect_max_s=0.2) as agent:
        assert agent.welcome is not None and agent.conn.server == b.endpoint
        assert agent.infer(cifar_samples[0]).source == "server"
