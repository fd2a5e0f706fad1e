"""The server's session logic and admission without sockets: real wire messages (packed, then
parsed by the real parser) fed to a real SessionTable and scheduler, a fake clock advanced by hand.
The real-socket versions of these paths are in test_server_agent.py and test_reliability.py."""

from __future__ import annotations

import numpy as np
import pytest

from edgesplit.server.batcher import Batcher, Item
from edgesplit.server.sessions import EXPIRY_INTERVALS, SessionTable
from edgesplit.server.stats import IoCounters
from edgesplit.server.tail_runner import RequestCheck
from edgesplit.wire import codec
from edgesplit.wire import protocol as P
from edgesplit.wire.errors import ErrorCode, ProtocolError
from edgesplit.wire.messages import Welcome

MS = 1_000_000  # ns
T0 = 10**12  # the fake clock's start (ns): any value, the table only compares differences
AGENT = b"\x00agent-1"
HB_MS = 100


def parsed(header, frames=()):
    return P.parse(P.pack(header, list(frames)))


def make(bundle, *, credits=4, max_queue=16, max_batch=8, heartbeat_ms=HB_MS):
    sched = Batcher(max_batch=max_batch, max_delay_us=1000, max_queue=max_queue)
    counters = IoCounters()
    table = SessionTable(
        {bundle.hash: RequestCheck(bundle)},
        sched,
        counters,
        server_name="srv",
        credits=credits,
        heartbeat_ms=heartbeat_ms,
        limits=P.Limits(max_batch=max_batch),
        codecs=codec.supported_codecs(),
        wall_clock_ns=lambda: 1234,
    )
    return table, sched, counters


def payload(bundle, mode_id=0):
    """A compact request's frame: the mode's codes for a real-valued tensor."""
    m = bundle.mode(mode_id)
    z = np.random.default_rng(0).uniform(0, 50 * m.scale, bundle.wire_spec["shape"]).astype(np.float32)
    return codec.encode(z, m, name=bundle.wire_spec["name"])


def hello(table, bundle, now, max_inflight=8, ident=AGENT):
    return table.receive(ident, parsed(P.hello(bundle.hash, "cam", max_inflight=max_inflight)), now)


def request(table, bundle, rid, now, ident=AGENT, draining=False, **kw):
    d, p = payload(bundle)
    return table.receive(ident, parsed(P.request(rid, 0, None, **kw), [p]), now, draining=draining)


def code_of(reply):
    assert reply is not None and reply["kind"] == "error", reply
    return ErrorCode(reply["code"])


def test_hello_opens_a_session_with_the_smaller_credit_count(tiny_bundle):
    table, _, counters = make(tiny_bundle, credits=4)
    w = hello(table, tiny_bundle, T0, max_inflight=2)
    assert (
        w
        == Welcome(
            tiny_bundle.hash,
            "srv",
            credits=2,
            limits=P.Limits(max_batch=8),
            heartbeat_ms=HB_MS,
            codecs=tuple(codec.supported_codecs()),
            features=P.SERVER_FEATURES,
        ).to_header()
    )
    assert hello(table, tiny_bundle, T0, max_inflight=64)["credits"] == 4  # the server's cap
    assert list(table.sessions) == [AGENT] and counters.sessions_opened == 2


def test_unknown_bundle_and_unsupported_version_are_refused(tiny_bundle):
    table, _, counters = make(tiny_bundle)
    r = table.receive(AGENT, parsed(P.hello("ab" * 32, "cam")), T0)
    assert code_of(r) == ErrorCode.UNKNOWN_BUNDLE and r["id"] is None and tiny_bundle.hash[:16] in r["message"]
    assert not table.sessions
    with pytest.raises(ProtocolError) as e:  # the daemon parses, then asks the table for the reply
        P.parse(P.pack({**P.request(7, 0, None), "v": 2}, [b"x"]))
    r = table.refuse(AGENT, e.value)
    assert (code_of(r), r["id"]) == (ErrorCode.UNSUPPORTED_VERSION, 7)
    assert counters.errors == {ErrorCode.UNKNOWN_BUNDLE: 1, ErrorCode.UNSUPPORTED_VERSION: 1}
    assert counters.failures == {(None, ErrorCode.UNSUPPORTED_VERSION): 1}  # only the one naming a request


def test_request_before_hello_is_not_ready(tiny_bundle):
    table, sched, counters = make(tiny_bundle)
    r = request(table, tiny_bundle, 5, T0)
    assert (code_of(r), r["id"]) == (ErrorCode.NOT_READY, 5) and len(sched) == 0
    assert counters.failures == {(None, ErrorCode.NOT_READY): 1}


def test_credits_bound_what_is_in_flight_and_come_back_with_replies(tiny_bundle):
    table, sched, counters = make(tiny_bundle, credits=8)
    hello(table, tiny_bundle, T0, max_inflight=2)
    assert request(table, tiny_bundle, 1, T0) is None and request(table, tiny_bundle, 2, T0) is None
    r = request(table, tiny_bundle, 3, T0)
    assert (code_of(r), r["id"]) == (ErrorCode.OVERLOADED, 3) and "credits exceeded" in r["message"]
    assert len(sched) == 2 and table.sessions[AGENT].inflight == 2
    table.settle(AGENT, error=False)  # one answered: one credit back
    assert request(table, tiny_bundle, 4, T0) is None
    s = table.sessions[AGENT]
    assert (s.inflight, s.requests, s.errors, counters.requests) == (2, 3, 1, 3)
    assert [it.req_id for it in sched.next_batch(timeout=0.5)] == [1, 2, 4]


def test_a_re_handshake_keeps_what_is_in_flight(tiny_bundle):
    table, _, _ = make(tiny_bundle)
    hello(table, tiny_bundle, T0)
    request(table, tiny_bundle, 1, T0)
    hello(table, tiny_bundle, T0 + MS)
    assert table.sessions[AGENT].inflight == 1 and table.sessions[AGENT].requests == 1


def test_malformed_compact_frame_unknown_mode_and_kinds_a_server_never_takes(tiny_bundle):
    table, sched, _ = make(tiny_bundle)
    hello(table, tiny_bundle, T0)
    r = table.receive(AGENT, parsed(P.request(1, 0, None), [b"\0" * 3]), T0)
    assert (code_of(r), r["id"]) == (ErrorCode.MALFORMED, 1) and "compact" in r["message"]
    _, p = payload(tiny_bundle)
    r = table.receive(AGENT, parsed(P.request(2, 99, None), [p]), T0)
    assert (code_of(r), r["id"]) == (ErrorCode.UNKNOWN_MODE, 2)
    welcome = P.welcome("b", "s", credits=1, limits=P.Limits(), heartbeat_ms=0, codecs=["raw"])
    r = table.receive(AGENT, parsed(welcome), T0)
    assert code_of(r) == ErrorCode.MALFORMED and "not a message an agent sends" in r["message"]
    assert len(sched) == 0 and table.sessions[AGENT].errors == 3


def test_ping_pong_and_heartbeat_expiry_after_three_silent_intervals(tiny_bundle):
    table, _, counters = make(tiny_bundle)
    hello(table, tiny_bundle, T0)
    assert table.receive(AGENT, parsed(P.ping(77, 5)), T0) == P.pong(77, 1234)
    assert table.tick(T0 + HB_MS * MS) == []  # not more than one interval since the welcome
    now = T0 + HB_MS * MS + 1
    pings = table.tick(now)
    assert [(i, h["kind"]) for i, h in pings] == [(AGENT, "ping")]
    nonce = pings[0][1]["nonce"]
    table.receive(AGENT, parsed(P.pong(nonce)), now + 3 * MS)  # answered 3 ms later: heard from it
    assert table.sessions[AGENT].rtt_us == pytest.approx(3000, abs=1)
    heard = now + 3 * MS
    table.tick(heard + EXPIRY_INTERVALS * HB_MS * MS)  # exactly three intervals of silence: still there
    assert AGENT in table.sessions
    table.tick(heard + EXPIRY_INTERVALS * HB_MS * MS + 1)
    assert AGENT not in table.sessions and counters.sessions_expired == 1
    r = request(table, tiny_bundle, 9, heard + 4 * HB_MS * MS)
    assert code_of(r) == ErrorCode.NOT_READY


def test_a_session_with_requests_in_flight_does_not_expire(tiny_bundle):
    table, _, counters = make(tiny_bundle)
    hello(table, tiny_bundle, T0)
    request(table, tiny_bundle, 1, T0)
    table.tick(T0 + 10 * HB_MS * MS)
    assert AGENT in table.sessions and counters.sessions_expired == 0
    table.settle(AGENT, error=False)
    table.tick(T0 + 10 * HB_MS * MS + 1)
    assert AGENT not in table.sessions


def test_bye_ends_the_session(tiny_bundle):
    table, _, _ = make(tiny_bundle)
    hello(table, tiny_bundle, T0)
    assert table.receive(AGENT, parsed(P.bye("done")), T0) is None
    assert not table.sessions and code_of(request(table, tiny_bundle, 1, T0)) == ErrorCode.NOT_READY


def test_draining_refuses_hello_and_requests_with_shutting_down(tiny_bundle):
    table, sched, _ = make(tiny_bundle)
    hello(table, tiny_bundle, T0)
    r = request(table, tiny_bundle, 4, T0, draining=True)
    assert (code_of(r), r["id"]) == (ErrorCode.SHUTTING_DOWN, 4)
    other = table.receive(b"other", parsed(P.hello(tiny_bundle.hash, "late")), T0, draining=True)
    assert code_of(other) == ErrorCode.SHUTTING_DOWN and b"other" not in table.sessions
    assert [(i, h["kind"]) for i, h in table.farewell()] == [(AGENT, "bye")]
    sched.close()  # a request that races the close is refused the same way
    r = request(table, tiny_bundle, 5, T0)
    assert (code_of(r), r["id"]) == (ErrorCode.SHUTTING_DOWN, 5) and len(sched) == 0


def test_admission_refuses_a_deadline_the_queue_cannot_meet_and_a_full_queue(tiny_bundle):
    table, sched, _ = make(tiny_bundle, credits=16, max_queue=3)
    hello(table, tiny_bundle, T0, max_inflight=16)
    key = (tiny_bundle.hash, 0)
    sched.note_compute(key, 0.050, rows=1, now_ns=T0)  # batches of this mode have been taking 50 ms
    sched.note_compute(key, 0.050, rows=2, now_ns=T0)
    r = request(table, tiny_bundle, 1, T0, deadline_ms=40)
    assert (code_of(r), r["id"]) == (ErrorCode.DEADLINE_EXCEEDED, 1) and "not queued" in r["message"]
    assert "40 ms" in r["message"] and len(sched) == 0
    assert request(table, tiny_bundle, 2, T0, deadline_ms=500) is None  # 50 ms (+4 deviations) fits
    # the same figures, stale (older than the estimate TTL): no estimate, the request is admitted
    later = T0 + sched.estimate_ttl_ns + 1
    assert request(table, tiny_bundle, 3, later, deadline_ms=40) is None
    assert request(table, tiny_bundle, 4, later) is None
    r = request(table, tiny_bundle, 5, later)
    assert (code_of(r), r["id"]) == (ErrorCode.OVERLOADED, 5) and "queue full" in r["message"]
    assert len(sched) == 3 and table.sessions[AGENT].inflight == 3


def _item(rid, key="k", t=T0, deadline=None):
    return Item(
        key=key,
        identity=AGENT,
        req_id=rid,
        desc={},
        payload=b"",
        rows=1,
        single=True,
        t_recv_ns=t,
        deadline_ns=deadline,
    )


def test_triage_takes_out_the_requests_a_batch_would_finish_late():
    sched = Batcher(max_batch=8)
    sched.note_compute("k", 0.010, rows=2, now_ns=T0)  # a batch of two: about 10 ms (+ deviations)
    on_time, late, passed, none = (
        _item(1, deadline=T0 + 500 * MS),
        _item(2, deadline=T0 + 5 * MS),
        _item(3, deadline=T0 - 1),
        _item(4),
    )
    live, refused = sched.triage([on_time, late, passed, none], T0)
    assert live == [on_time, none]
    assert [(it.req_id, r.code) for it, r in refused] == [
        (2, ErrorCode.DEADLINE_EXCEEDED),
        (3, ErrorCode.DEADLINE_EXCEEDED),
    ]
    assert "not computed" in refused[0][1].message and "passed" in refused[1][1].message
    batch = [on_time, none]
    assert sched.triage(batch, T0)[0] is batch  # nothing late: the batch as it is
