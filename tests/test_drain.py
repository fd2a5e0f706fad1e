"""Graceful drain of the real daemon process (``edgesplit serve`` as a child, the shipped CIFAR-10
bundle, real JPEGs): SIGTERM lands while a real Agent has frames in flight and a second session
keeps sending. Queued frames are computed and answered, frames that arrive during the drain get
SHUTTING_DOWN, every session gets bye, and every frame ends exactly once.

Determinism without timing: the server runs with a batch size the queue does not reach before
SIGTERM and a queue delay of a minute, so nothing queued is computed before the drain makes it
due, and the queue's content at SIGTERM is known (the agent's full window, then the raw session's
burst, confirmed by a ping answered behind it). The two use different modes, so the drain runs
two batches, the agent's (older) first: its window frees and it sends new frames while the
burst's batch is still being computed."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest
import zmq

from edgesplit.bench.loadgen import head_workload
from edgesplit.bench.serverproc import ServerProcess
from edgesplit.bundle import Bundle
from edgesplit.edge.agent import Agent
from edgesplit.wire import protocol as P
from edgesplit.wire.errors import ErrorCode

ROOT = Path(__file__).resolve().parents[1]
CIFAR_BUNDLE = ROOT / "models" / "cifar10-resnet20-bottlefit"
WINDOW = 6  # the agent's frames in flight (its bundle's default mode)
BURST = 1000  # the raw session's requests queued before SIGTERM (another mode)
SERVER_ARGS = [
    "--threads",
    "1",
    "--max-batch",
    "1024",
    "--max-queue-delay-us",
    "60000000",
    "--credits",
    "1024",
    "--max-queue",
    "1024",
]


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    return Bundle.load(CIFAR_BUNDLE)


def _stream(agent: Agent, samples, results: list, submitted: list, stop: threading.Event) -> None:
    """Keep the agent's window full until the server's bye; submit only with a free slot (so a
    submit never waits, and no frame is sent after the bye was read)."""
    i = 0
    while not stop.is_set():
        results.extend(agent.poll(0.0))
        if agent.server_bye is not None:
            break
        if agent.in_flight < agent.window:
            submitted.append(agent.submit(samples[i % len(samples)]))
            i += 1
        else:
            results.extend(agent.poll(0.02))
    results.extend(agent.drain())


class _Raw:
    """A bare session that queues a burst, then keeps sending while the server drains."""

    def __init__(self, endpoint: str, bundle: Bundle):
        self.work = head_workload(bundle, 1, mode=next(m.id for m in bundle.modes if m.id != bundle.default_mode.id))
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)  # the burst is sent without waiting
        self.sock.connect(endpoint)
        self.sock.send_multipart(P.pack(P.hello(bundle.hash, "raw", max_inflight=1024)))
        assert self.recv(10).kind == "welcome"
        self.answers: dict[int, list] = {}  # rid -> answers ("result" or the error name)
        self.bye = None

    def recv(self, timeout_s: float):
        assert self.sock.poll(int(timeout_s * 1000)), "no answer from the server"
        return P.parse(self.sock.recv_multipart())

    def send(self, rid: int) -> bool:
        try:
            self.sock.send_multipart(P.pack(P.request(rid, self.work.mode, None), [self.work.payloads[0]]), zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def take(self, m) -> None:
        if m.kind == "bye":
            self.bye = m.header.get("reason")
        elif m.kind in ("result", "error"):
            name = "result" if m.kind == "result" else ErrorCode(m.header["code"]).name
            self.answers.setdefault(m.id, []).append(name)

    def queue_burst(self) -> None:
        for rid in range(BURST):
            assert self.send(rid)
        self.sock.send_multipart(P.pack(P.ping(99)))  # answered after the burst was read (and queued)
        while (m := self.recv(10)).kind != "pong":
            self.take(m)

    def send_until_bye(self, first_rid: int, limit_s: float = 60.0) -> list[int]:
        """One request, then what came back within a millisecond, until bye."""
        sent, rid, end = [], first_rid, time.monotonic() + limit_s
        while self.bye is None:
            assert time.monotonic() < end, "no bye from the draining server"
            if len(sent) < 20_000 and self.send(rid):
                sent.append(rid)
                rid += 1
            wait_ms = 1
            while self.bye is None and self.sock.poll(wait_ms):
                self.take(P.parse(self.sock.recv_multipart()))
                wait_ms = 0
        return sent


@pytest.mark.parametrize("fallback", ["off", "auto"])
def test_sigterm_drains_with_frames_in_flight_and_arriving(bundle, cifar_samples, fallback):
    srv = ServerProcess([CIFAR_BUNDLE], SERVER_ARGS).start()
    try:
        agent = Agent(bundle, srv.endpoint, inflight=WINDOW, threads=1, timeout_s=60, fallback=fallback).connect()
        results, submitted, stop = [], [], threading.Event()
        streamer = threading.Thread(target=_stream, args=(agent, cifar_samples, results, submitted, stop))
        streamer.start()
        end = time.monotonic() + 60
        while agent.in_flight < WINDOW:  # nothing is computed before the drain: the window fills and stays full
            assert time.monotonic() < end and streamer.is_alive(), "the agent's window never filled"
            time.sleep(0.01)
        raw = _Raw(srv.endpoint, bundle)
        raw.queue_burst()  # the agent's window was sent before the burst, so it is queued too
        in_flight_at_sigterm = list(submitted)
        assert len(in_flight_at_sigterm) == WINDOW and not results

        srv.proc.send_signal(signal.SIGTERM)
        after = raw.send_until_bye(BURST)
        streamer.join(60)
        stop.set()
        assert not streamer.is_alive()
        assert srv.proc.wait(60) == 0
        agent.close(bye=False)
    finally:
        srv.stop()

    # the raw session: the burst queued before SIGTERM computed; what came after refused once the drain began
    assert all(raw.answers.get(rid) == ["result"] for rid in range(BURST)), raw.answers
    assert set(raw.answers) <= set(range(BURST)) | set(after) and all(len(a) == 1 for a in raw.answers.values())
    late = [raw.answers[rid][0] for rid in after if rid in raw.answers]
    assert "SHUTTING_DOWN" in late, late[:20]
    first = late.index("SHUTTING_DOWN")
    assert set(late[first:]) == {"SHUTTING_DOWN"}, late[first : first + 20]  # a drain never takes new work
    assert raw.bye == "server shutting down"

    # the agent: bye reached it, every frame ended exactly once, the ones queued at SIGTERM were computed
    assert agent.server_bye == "server shutting down"
    ids = [r.id for r in results]
    assert len(ids) == len(set(ids)) and sorted(ids) == sorted(submitted) and agent.in_flight == 0
    by_id = {r.id: r for r in results}
    assert all(by_id[i].ok and by_id[i].source == "server" for i in in_flight_at_sigterm), [
        by_id[i].to_json() for i in in_flight_at_sigterm
    ]
    new = [by_id[i] for i in submitted if i not in in_flight_at_sigterm]
    assert new, "the agent sent nothing while the server drained"
    if fallback == "off":
        assert all(r.error == "SHUTTING_DOWN" and r.error_code == ErrorCode.SHUTTING_DOWN for r in new), [
            r.to_json() for r in new
        ]
        # refused by the draining server itself (not only lost to the bye)
        assert any(r.error_message == "server is shutting down" for r in new)
    else:  # each refused frame answered locally instead, none lost
        assert all(r.ok and r.source == "local" and r.fallback_reason == "SHUTTING_DOWN" for r in new), [
            r.to_json() for r in new
        ]
        assert all(r.pred is not None for r in results)
