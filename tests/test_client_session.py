"""The client session state machine (edgesplit/wire/client_session.py) without sockets: messages
are built with the protocol module exactly as a server sends them, the clock is a number the test
advances, and what the session wants sent is parsed back with the protocol's own parser."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from edgesplit.wire import protocol as P
from edgesplit.wire.client_session import (
    DISCONNECTED,
    TIMEOUT,
    Answered,
    Backoff,
    BadMessage,
    ClientSession,
    LateAnswer,
    Lost,
    Ponged,
    Refused,
    Send,
    TimedOut,
    Welcomed,
)
from edgesplit.wire.codec import descriptor
from edgesplit.wire.errors import ErrorCode

HASH = "ab" * 32
MS = 1_000_000
MODE = SimpleNamespace(id=3, channels=8, bits=4, scale=0.5, zero_point=7)
IMPLICIT = P.compact_descriptor("z", [16, 4, 4], MODE)  # 8 channels x 4 x 4 at 4 bits: 64 bytes
PAYLOAD = bytes(range(64))
LOGITS = descriptor("logits", (10,), "float32", 32, 1.0, 0, None, "raw", 40)


class _Top:
    """An rng at the top of its range: every backoff delay is its full step."""

    def random(self) -> float:
        return 1.0


def make(**kw) -> ClientSession:
    kw.setdefault("max_inflight", 4)
    kw.setdefault("timeout_s", 2.0)
    kw.setdefault("implicit", {MODE.id: IMPLICIT})
    kw.setdefault("backoff", Backoff(0.05, 0.4, rng=_Top()))
    kw.setdefault("wall_clock", lambda: 123)
    return ClientSession(HASH, "cam-1", **kw)


def welcome(credits=8, heartbeat_ms=0, features=P.SERVER_FEATURES, bundle=HASH, limits=P.DEFAULT_LIMITS) -> list:
    return P.pack(
        P.welcome(
            bundle, "srv", credits=credits, limits=limits, heartbeat_ms=heartbeat_ms, codecs=["raw"], features=features
        )
    )


def result(rid, queue_us=10.0, compute_us=200.0, batch=2, server_us=250.0) -> list:
    return P.pack(
        P.result(rid, [LOGITS], queue_us=queue_us, compute_us=compute_us, batch_size=batch, server_us=server_us),
        [b"\0" * 40],
    )


def error(rid, code, message="no") -> list:
    return P.pack(P.error(rid, code, message))


def sent(parts) -> P.Message:
    """What the server would read from these parts."""
    return P.parse(parts)


def sends(events) -> list[P.Message]:
    return [sent(e.parts) for e in events if isinstance(e, Send)]


def session_up(now=0, **kw) -> ClientSession:
    terms = {k: kw.pop(k) for k in ("credits", "heartbeat_ms") if k in kw}
    s = make(**kw)
    s.hello(now)
    events = s.receive(welcome(**terms), now)
    assert isinstance(events[0], Welcomed)
    return s


# -- handshake -------------------------------------------------------------------------------


def test_hello_names_bundle_agent_and_window():
    s = make(max_inflight=6, codecs=["raw", "zstd"])
    m = sent(s.hello(0))
    assert m.kind == "hello" and m.header["bundle"] == HASH and m.header["agent"] == "cam-1"
    assert m.header["caps"]["max_inflight"] == 6 and m.header["caps"]["codecs"] == ["raw", "zstd"]
    assert s.handshaking and s.welcome is None


def test_welcome_sets_the_terms_and_the_window_follows_the_credits():
    s = make(max_inflight=8)
    s.hello(0)
    assert s.window == 8  # no credits yet: the agent's own limit
    big = P.Limits(max_header_bytes=1 << 20, max_frame_bytes=1 << 10, max_frames=2, max_batch=5)
    (ev,) = s.receive(welcome(credits=3, heartbeat_ms=700, limits=big), 5)
    assert isinstance(ev, Welcomed) and not ev.reconnected
    assert ev.welcome.credits == 3 and ev.welcome.heartbeat_ms == 700 and ev.welcome.server == "srv"
    assert not s.handshaking and s.credits == 3 and s.window == 3 and s.heartbeat_ms == 700
    assert s.compact_requests
    # what this side accepts: the server's limits, never below the protocol defaults
    assert s.limits.max_header_bytes == 1 << 20 and s.limits.max_frame_bytes == P.DEFAULT_LIMITS.max_frame_bytes
    assert s.limits.max_batch == 5
    s2 = make(max_inflight=2)
    s2.hello(0)
    s2.receive(welcome(credits=16), 0)
    assert s2.window == 2


def test_welcome_for_another_bundle_is_a_refusal_not_a_session():
    s = make()
    s.hello(0)
    (ev,) = s.receive(welcome(bundle="cd" * 32), 1)
    assert isinstance(ev, Refused) and ev.rid is None and ev.code == ErrorCode.UNKNOWN_BUNDLE
    assert s.welcome is None and s.handshaking


def test_handshake_refusal_without_an_id():
    s = make(link_up=False)
    s.hello(0)
    (ev,) = s.receive(error(None, ErrorCode.UNKNOWN_BUNDLE, "not loaded"), 1)
    assert ev == Refused(None, ErrorCode.UNKNOWN_BUNDLE, "not loaded", None)
    assert s.link_up  # an answer came: the link is up, whatever a monitor said


# -- request forms and ids -------------------------------------------------------------------


def test_compact_to_a_v11_server_full_otherwise_and_ids_count_up():
    s = session_up()
    r1, p1 = s.request(MODE.id, IMPLICIT, PAYLOAD, 10, deadline_ms=50.0)
    h = sent(p1).header
    assert r1.rid == 1 and "tensors" not in h and h["mode"] == 3 and p1[1] is PAYLOAD
    assert h["deadline_ms"] == 50 and type(h["deadline_ms"]) is int  # the fewest bytes for an integral deadline
    assert r1.compact and r1.header_bytes == len(p1[0])
    # a descriptor other than the mode's implied one (zstd) goes out in full
    zstd = dict(IMPLICIT, codec="zstd")
    r2, p2 = s.request(MODE.id, zstd, PAYLOAD, 11)
    assert r2.rid == 2 and sent(p2).header["tensors"] == [zstd] and not r2.compact
    assert r1.header_bytes + 50 < r2.header_bytes  # what compact saves: the descriptor (r1 also has a deadline)
    # a mode with no implied descriptor: full
    _, p3 = s.request(9, IMPLICIT, PAYLOAD, 12)
    assert "tensors" in sent(p3).header
    assert s.take_id() == 4 and s.next_id == 5
    assert list(s.outstanding) == [1, 2, 3]


def test_full_requests_to_a_v10_server():
    s = make()
    s.hello(0)
    s.receive(welcome(features=()), 0)
    assert not s.compact_requests
    req, parts = s.request(MODE.id, IMPLICIT, PAYLOAD, 1)
    assert sent(parts).header["tensors"] == [IMPLICIT] and not req.compact


def test_requests_without_a_session_are_held_and_sent_after_the_welcome():
    s = make()
    s.hello(0)
    req, parts = s.request(MODE.id, IMPLICIT, PAYLOAD, 5, tag="frame-a")
    assert parts is None and req.tag == "frame-a"
    events = s.receive(welcome(), 40 * MS)
    assert isinstance(events[0], Welcomed)
    (m,) = sends(events)
    # made before any welcome offered compact requests: it goes out as it was built, in full
    assert m.header["id"] == req.rid and m.header["tensors"] == [IMPLICIT] and m.frames == [PAYLOAD]
    assert req.t_send_ns == 40 * MS  # the round trip counts from the real send


def test_answer_timings_and_a_late_duplicate():
    s = session_up()
    req, _ = s.request(MODE.id, IMPLICIT, PAYLOAD, 0)
    (ev,) = s.receive(result(req.rid, queue_us=12.3, compute_us=456.7, batch=3, server_us=480.0), 5 * MS)
    assert isinstance(ev, Answered) and ev.rid == req.rid and ev.request is req
    assert (ev.timings.queue_us, ev.timings.compute_us, ev.timings.batch_size, ev.timings.server_us) == (
        12.3,
        456.7,
        3,
        480.0,
    )
    assert len(ev.frames) == 1 and bytes(ev.frames[0]) == b"\0" * 40 and not s.outstanding
    (late,) = s.receive(result(req.rid), 6 * MS)
    assert isinstance(late, LateAnswer) and late.rid == req.rid and late.timings is not None
    (late_err,) = s.receive(error(req.rid, ErrorCode.OVERLOADED), 7 * MS)
    assert late_err == LateAnswer(req.rid, None)
    assert s.late_answers == 2


def test_forgotten_and_abandoned_requests_are_late_when_answered():
    s = session_up()
    a, _ = s.request(MODE.id, IMPLICIT, PAYLOAD, 0)
    b, _ = s.request(MODE.id, IMPLICIT, PAYLOAD, 0)
    assert s.forget(a.rid) is a and s.abandon(b.rid) is b and not s.outstanding
    assert [type(e) for e in s.receive(result(b.rid), 1)] == [LateAnswer] and s.late_answers == 1


# -- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code",
    [
        ErrorCode.OVERLOADED,
        ErrorCode.DEADLINE_EXCEEDED,
        ErrorCode.UNKNOWN_MODE,
        ErrorCode.TOO_LARGE,
        ErrorCode.INTERNAL,
        ErrorCode.SHUTTING_DOWN,
    ],
)
def test_refusals_finish_the_request_with_their_code(code):
    s = session_up()
    req, _ = s.request(MODE.id, IMPLICIT, PAYLOAD, 0)
    (ev,) = s.receive(error(req.rid, code, "why"), 1)
    assert ev == Refused(req.rid, code, "why", req) and not s.outstanding


def test_not_ready_rehandshakes_and_resends_once():
    s = session_up()
    req, first = s.request(MODE.id, IMPLICIT, PAYLOAD, 0)
    events = s.receive(error(req.rid, ErrorCode.NOT_READY), 1 * MS)
    (hello,) = sends(events)
    assert hello.kind == "hello" and s.handshaking and req.rid in s.outstanding
    events = s.receive(welcome(), 2 * MS)
    assert isinstance(events[0], Welcomed)
    (again,) = sends(events)
    assert again.header["id"] == req.rid and again.frames == [PAYLOAD]
    (ev,) = s.receive(error(req.rid, ErrorCode.NOT_READY, "still"), 3 * MS)
    assert ev == Refused(req.rid, ErrorCode.NOT_READY, "still", req)  # once only


def test_not_ready_is_delivered_when_retries_are_off():
    s = session_up(retry_not_ready=False)
    req, _ = s.request(MODE.id, IMPLICIT, PAYLOAD, 0)
    (ev,) = s.receive(error(req.rid, ErrorCode.NOT_READY), 1)
    assert isinstance(ev, Refused) and ev.code == ErrorCode.NOT_READY and not s.handshaking


def test_a_compact_request_refused_malformed_goes_again_in_full_and_compact_stops():
    s = session_up()
    req, _ = s.request(MODE.id, IMPLICIT, PAYLOAD, 0)
    (m,) = sends(s.receive(error(req.rid, ErrorCode.MALFORMED, "tensors missing"), 4 * MS))
    assert m.header["id"] == req.rid and m.header["tensors"] == [IMPLICIT] and m.frames == [PAYLOAD]
    assert not s.compact_requests and req.t_send_ns == 4 * MS and req.header_bytes > 100
    _, parts = s.request(MODE.id, IMPLICIT, PAYLOAD, 5 * MS)
    assert "tensors" in sent(parts).header
    (ev,) = s.receive(error(req.rid, ErrorCode.MALFORMED, "really"), 6 * MS)  # a full one refused: final
    assert isinstance(ev, Refused) and ev.code == ErrorCode.MALFORMED


def test_a_held_compact_request_goes_out_in_full_to_a_server_without_the_feature():
    s = make()
    s.hello(0)
    s.receive(welcome(), 0)
    s.receive(P.pack(P.bye("restart")), 1)  # lost; the handshake starts over
    s.receive(welcome(), 2)
    s.receive(error(None, ErrorCode.INTERNAL), 2)
    req, _ = s.request(MODE.id, IMPLICIT, PAYLOAD, 3)
    assert req.compact
    s.receive(error(req.rid, ErrorCode.NOT_READY), 4)  # held for the next welcome, built compact
    (m,) = sends(s.receive(welcome(features=()), 5))
    assert m.header["tensors"] == [IMPLICIT] and not req.compact


# -- time: heartbeats, silence, timeouts, backoff ---------------------------------------------


def test_pings_after_a_quiet_heartbeat_and_pongs_to_pings():
    s = session_up(heartbeat_ms=100)
    assert s.tick(100 * MS) == []  # not quiet for longer than a heartbeat yet
    (ping,) = sends(s.tick(101 * MS))
    assert ping.kind == "ping" and ping.header["nonce"] == 1 and ping.header["t_ns"] == 123
    assert s.tick(150 * MS) == []  # the ping itself was sent at 101 ms
    (ping2,) = sends(s.tick(202 * MS))
    assert ping2.header["nonce"] == 2
    (pong,) = sends(s.receive(P.pack(P.ping(77)), 210 * MS))
    assert pong.kind == "pong" and pong.header["nonce"] == 77
    assert s.receive(P.pack(P.pong(2)), 211 * MS) == [Ponged(2)]


def test_no_pings_without_a_heartbeat_or_a_session():
    s = session_up(heartbeat_ms=0)
    assert sends(s.tick(10_000 * MS)) == []
    s2 = make()
    s2.receive(welcome(heartbeat_ms=100), 0)
    s2.receive(P.pack(P.bye()), 0)
    assert [m.kind for m in sends(s2.tick(500 * MS))] == ["hello"]  # a hello retry, no ping


def test_silence_for_three_heartbeats_loses_the_session():
    s = session_up(heartbeat_ms=100, timeout_s=10.0)
    req, _ = s.request(MODE.id, IMPLICIT, PAYLOAD, 0)
    s.receive(P.pack(P.pong(1)), 100 * MS)  # heard at 100 ms: the deadline counts from there
    assert not [e for e in s.tick(400 * MS) if isinstance(e, Lost)]
    (lost,) = [e for e in s.tick(401 * MS) if isinstance(e, Lost)]
    assert lost.reason == DISCONNECTED and lost.code is None and lost.requests == (req,)
    assert s.welcome is None and s.handshaking and not s.outstanding and s.link_losses == 1


def test_silence_without_heartbeats_is_the_request_timeout():
    s = session_up(heartbeat_ms=0, timeout_s=1.0)
    assert s.silence_limit() == (1000 * MS, TIMEOUT)
    req, _ = s.request(MODE.id, IMPLICIT, PAYLOAD, 0)
    assert s.tick(1000 * MS) == []
    (lost,) = s.tick(1001 * MS)
    assert isinstance(lost, Lost) and lost.reason == TIMEOUT and lost.requests == (req,)


def test_nothing_outstanding_means_no_silence_deadline():
    s = session_up(heartbeat_ms=0, timeout_s=1.0)
    assert s.tick(60_000 * MS) == [] and s.welcome is not None


def test_a_held_request_times_out_alone():
    s = make(timeout_s=0.5)
    s.hello(0)
    req, _ = s.request(MODE.id, IMPLICIT, PAYLOAD, 0)
    assert not [e for e in s.tick(500 * MS) if isinstance(e, TimedOut)]
    (to,) = [e for e in s.tick(501 * MS) if isinstance(e, TimedOut)]
    assert to.rid == req.rid and to.request is req and not s.outstanding


def test_hello_retries_back_off_to_the_cap_while_the_link_is_up():
    s = make(backoff=Backoff(0.05, 0.4, rng=_Top()))
    s.hello(0)
    times, now = [], 0
    while len(times) < 6:
        now += MS
        if sends(s.tick(now)):
            times.append(now)
    gaps = [b - a for a, b in zip([0, *times], times)]
    assert gaps == [50 * MS, 100 * MS, 200 * MS, 400 * MS, 400 * MS, 400 * MS]


def test_no_hello_retries_while_the_link_is_down_and_one_at_once_when_it_comes_up():
    s = make(link_up=False)
    s.hello(0)  # queued in the socket: it goes out by itself on connect
    assert sends(s.tick(5_000 * MS)) == []
    assert s.on_connected(5_001 * MS) == []  # that queued hello is on its way
    s.on_connect_failed()
    assert sends(s.tick(9_000 * MS)) == []
    (hello,) = sends(s.on_connected(9_001 * MS))  # a server is there again: hello now
    assert hello.kind == "hello"


def test_backoff_jitter_stays_in_the_upper_half_of_each_step_and_under_the_cap():
    rng = random.Random(7)
    b = Backoff(0.01, 0.08, rng=rng)
    steps = [0.01, 0.02, 0.04, 0.08, 0.08, 0.08, 0.08]
    for _ in range(50):
        b.reset()
        for step in steps:
            d = b.next_delay()
            assert step / 2 <= d <= step
    with pytest.raises(ValueError):
        Backoff(0.0, 1.0)


# -- losing and regaining the session ----------------------------------------------------------


def test_bye_loses_the_session_and_the_next_welcome_is_a_reconnect():
    s = session_up()
    req, _ = s.request(MODE.id, IMPLICIT, PAYLOAD, 0)
    (lost,) = s.receive(P.pack(P.bye("draining")), 1)
    assert lost.reason == "SHUTTING_DOWN" and lost.code == ErrorCode.SHUTTING_DOWN and lost.requests == (req,)
    assert s.server_bye == "draining" and s.bye("x") is None
    (w,) = s.receive(welcome(), 2)
    assert w.reconnected and s.reconnects == 1 and s.server_bye is None and s.bye("x") is not None


def test_a_dropped_connection_loses_the_session_and_the_first_hello_waits_a_backoff_step():
    s = session_up()
    req, _ = s.request(MODE.id, IMPLICIT, PAYLOAD, 0)
    (lost,) = s.on_disconnected(10 * MS, "gone")
    assert lost == Lost(DISCONNECTED, None, "gone", (req,))
    assert s.on_disconnected(11 * MS) == []  # no session, nothing more to lose
    s.link_up = True
    assert sends(s.tick(59 * MS)) == []
    assert [m.kind for m in sends(s.tick(61 * MS))] == ["hello"]


def test_close_hands_back_what_was_outstanding():
    s = session_up()
    a, _ = s.request(MODE.id, IMPLICIT, PAYLOAD, 0)
    assert sent(s.bye("done")).kind == "bye"
    assert s.close() == [a] and s.welcome is None and not s.outstanding


# -- malformed input from the server -----------------------------------------------------------


@pytest.mark.parametrize(
    "parts",
    [
        [b"\xc1"],  # not msgpack
        [P.pack_header([1, 2])],  # not a map
        [P.pack_header({"v": 1, "kind": "result", "id": 1})],  # a result without outputs or timing
        [P.pack_header({"v": 9, "kind": "welcome"})],  # a version nobody speaks
        [P.pack_header({"v": 1, "kind": "scatter"})],  # a reserved kind
        P.pack(P.hello(HASH, "x")),  # a kind servers never send
    ],
)
def test_garbage_from_the_server_is_reported_and_changes_nothing(parts):
    s = session_up()
    req, _ = s.request(MODE.id, IMPLICIT, PAYLOAD, 0)
    (ev,) = s.receive(parts, 1)
    assert isinstance(ev, BadMessage) and ev.message.startswith("bad message from server")
    assert s.outstanding == {req.rid: req} and s.welcome is not None and s.late_answers == 0
