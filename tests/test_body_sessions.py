"""The SFPrompt body link's session logic without sockets (docs/PROTOCOL.md §15, §6-§8), both ends.

Server: a real body package (exported from an untrained SFPrompt student) in a real
:class:`BodyRunner`, driven through the :class:`BodySessionTable` that the body server's loop
uses, with messages packed as a client sends them and a fake clock advanced by hand. Client: the
:class:`SplitTrainSession` that :class:`~edgesplit.families.sfprompt.wire_link.WireBody` drives,
fed the replies of that same server table. The real-socket versions are in test_sfprompt_wire.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from build_fixtures import one_torch_thread  # noqa: F401  (pytest fixture by name)

from edgesplit.builder.zoo import create_model
from edgesplit.families.sfprompt.export import export_body
from edgesplit.families.sfprompt.model import SFPromptModel, save_student
from edgesplit.server.body_runner import BodyPackage, BodyRunner
from edgesplit.server.body_sessions import BodySessionTable
from edgesplit.server.session_lifecycle import EXPIRY_INTERVALS
from edgesplit.server.stats import IoCounters
from edgesplit.wire import protocol as P
from edgesplit.wire import split_train as S
from edgesplit.wire.errors import ErrorCode
from edgesplit.wire.messages import Welcome
from edgesplit.wire.session_events import (
    DISCONNECTED,
    Answered,
    Backoff,
    Lost,
    Ponged,
    Refused,
    Send,
    TimedOut,
    Welcomed,
)
from edgesplit.wire.split_train_session import SplitTrainSession

MS = 1_000_000  # ns
T0 = 10**12  # the fake clock's start (ns): only differences matter
HB_MS = 100
TTL_MS = 1000
CLIENT = b"\x00client-1"
TOKENS = (69, 128)  # 1 class token + 4 prompts + 64 patches, ViT-tiny width


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> BodyPackage:
    d = tmp_path_factory.mktemp("body")
    torch.manual_seed(0)
    model = SFPromptModel(create_model("vit_tiny_cifar", 10), 1, 4, prompts=4, reset_classifier=False)
    save_student(model, d / "student.pt")
    return BodyPackage.load(export_body(d / "student.pt", d / "pkg").root)


def make(package, *, credits=4, max_pending=2, replay=4) -> tuple[BodySessionTable, BodyRunner, IoCounters]:
    runner = BodyRunner(package, max_pending=max_pending, replay=replay, ttl_ms=TTL_MS)
    counters = IoCounters()
    table = BodySessionTable(
        runner, counters, server_name="body", credits=credits, heartbeat_ms=HB_MS, wall_clock_ns=lambda: 1234
    )
    return table, runner, counters


def tokens(seed=0, rows=1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, *TOKENS)).astype(np.float32)


def fwd(step, x, grad=True, bits=32) -> list:
    d, p = S.encode(x, bits, "tokens")
    return P.pack(S.train_fwd(step, d, grad), [p])


def bwd(step, g, bits=32) -> list:
    d, p = S.encode(g, bits, "grad_out")
    return P.pack(S.train_bwd(step, d), [p])


def hello(table, now, serving="u-shaped", bundle=None, ident=CLIENT, max_inflight=8):
    h = S.hello(bundle or table.package.hash, "client", serving, max_inflight=max_inflight)
    if serving is None:
        h = P.hello(bundle or table.package.hash, "client", max_inflight=max_inflight)
    return table.handle(ident, P.pack(h), now)


def error_of(reply) -> tuple[ErrorCode, int | None, str]:
    assert reply is not None and reply[0]["kind"] == "error", reply
    return ErrorCode(reply[0]["code"]), reply[0]["id"], reply[0]["message"]


# -- server: hello and welcome ---------------------------------------------------------------------


def test_the_welcome_offers_split_training_with_the_train_terms_and_the_smaller_credits(package):
    table, runner, counters = make(package, credits=4)
    header, frames = hello(table, T0, max_inflight=2)
    want = Welcome(
        package.hash,
        "body",
        credits=2,
        limits=P.DEFAULT_LIMITS,
        heartbeat_ms=HB_MS,
        codecs=("raw",),
        bits=(8,),
        features=(S.FEATURE_SPLIT_TRAINING, S.FEATURE_U_SHAPED),
    ).to_header()
    want["train"] = {"tokens": list(TOKENS), "max_pending": 2, "replay": 4, "ttl_ms": TTL_MS}
    assert (header, frames) == (want, [])
    assert hello(table, T0, max_inflight=64)[0]["credits"] == 4  # the server's cap
    assert list(table.sessions) == [CLIENT] and counters.sessions_opened == 2


@pytest.mark.parametrize(
    "serving, bundle, code",
    [
        (None, None, ErrorCode.UNSUPPORTED),  # an agent that expects logits
        ("head-tail", None, ErrorCode.UNSUPPORTED),
        ("u-shaped", "0" * 64, ErrorCode.UNKNOWN_BUNDLE),
    ],
)
def test_a_hello_the_body_server_cannot_serve_is_refused_without_a_session(package, serving, bundle, code):
    table, _, counters = make(package)
    got, rid, message = error_of(hello(table, T0, serving=serving, bundle=bundle))
    assert (got, rid) == (code, None)
    assert ("served U-shaped" if code == ErrorCode.UNSUPPORTED else f"={package.hash[:16]}") in message
    assert not table.sessions and counters.errors == {code: 1}


# -- server: steps on a session --------------------------------------------------------------------


def test_steps_need_a_session_and_a_retransmit_is_answered_again_without_running_twice(package):
    table, runner, _ = make(package)
    x, g = tokens(0), tokens(1)
    assert error_of(table.handle(CLIENT, fwd(1, x), T0))[:2] == (ErrorCode.NOT_READY, 1)
    hello(table, T0)
    first = table.handle(CLIENT, fwd(1, x), T0)
    assert first is not None and first[0]["kind"] == "result" and first[0]["outputs"][0]["name"] == "body_out"
    assert table.handle(CLIENT, fwd(1, x), T0 + MS) == first  # the same header and bytes
    code, rid, message = error_of(table.handle(CLIENT, fwd(1, x + 1), T0 + MS))
    assert (code, rid) == (ErrorCode.MALFORMED, 1) and "reused" in message
    back = table.handle(CLIENT, bwd(1, g), T0 + 2 * MS)
    assert back is not None and back[0]["outputs"][0]["name"] == "grad_in"
    assert table.handle(CLIENT, bwd(1, g), T0 + 3 * MS) == back
    assert runner.counters["train_fwd"] == 1 and runner.counters["train_bwd"] == 1
    assert runner.counters["retransmits"] == 2
    s = table.sessions[CLIENT]
    assert (s.inflight, s.requests) == (0, 4)  # answered in place: nothing stays in flight


def test_u_shaped_requests_share_the_session_checks(package):
    table, _, _ = make(package)
    d, p = S.encode(tokens(2), 32, "tokens")
    assert error_of(table.handle(CLIENT, P.pack(P.request(5, 0, [d]), [p]), T0))[:2] == (ErrorCode.NOT_READY, 5)
    hello(table, T0)
    header, frames = table.handle(CLIENT, P.pack(P.request(6, 0, [d]), [p]), T0)
    assert header["kind"] == "result" and header["outputs"][0]["shape"] == [1, *TOKENS] and len(frames) == 1


def test_messages_a_client_never_sends_and_garbage_are_refused_and_counted(package):
    table, _, counters = make(package)
    hello(table, T0)
    w = P.welcome(package.hash, "s", credits=1, limits=P.Limits(), heartbeat_ms=0, codecs=["raw"])
    code, _, message = error_of(table.handle(CLIENT, P.pack(w), T0))
    assert code == ErrorCode.MALFORMED and "not a message an agent sends" in message
    assert error_of(table.handle(CLIENT, [b"\xc1not msgpack"], T0))[:2] == (ErrorCode.MALFORMED, None)
    assert table.sessions[CLIENT].errors == 2 and counters.errors == {ErrorCode.MALFORMED: 2}
    assert counters.messages == 3


# -- server: heartbeats, expiry, bye ---------------------------------------------------------------


def test_pings_each_interval_and_a_silent_session_with_a_pending_step_is_kept(package):
    table, runner, counters = make(package)
    hello(table, T0)
    x = tokens(3)
    out = table.handle(CLIENT, fwd(1, x), T0)
    assert table.handle(CLIENT, P.pack(P.ping(77, 5)), T0)[0] == P.pong(77, 1234)
    assert table.tick(T0 + HB_MS * MS) == []  # not more than one interval since the welcome
    pings = table.tick(T0 + HB_MS * MS + 1)
    assert [(i, h["kind"]) for i, h in pings] == [(CLIENT, "ping")]
    table.handle(CLIENT, P.pack(P.pong(pings[0][1]["nonce"])), T0 + HB_MS * MS + 2 * MS)
    assert table.sessions[CLIENT].rtt_us == pytest.approx(2000, abs=1)
    heard = T0 + HB_MS * MS + 2 * MS
    table.tick(heard + 5 * HB_MS * MS)  # silent for five intervals, but step 1 awaits its train_bwd
    assert CLIENT in table.sessions and counters.sessions_expired == 0
    g = np.ones_like(S.decode(out[0]["outputs"][0], out[1][0]))
    later = heard + 6 * HB_MS * MS
    assert table.handle(CLIENT, bwd(1, g), later)[0]["kind"] == "result"
    table.tick(later + EXPIRY_INTERVALS * HB_MS * MS)  # exactly three intervals: still there
    assert CLIENT in table.sessions
    table.tick(later + EXPIRY_INTERVALS * HB_MS * MS + 1)
    assert not table.sessions and counters.sessions_expired == 1
    assert runner.steps == {}  # its finished steps went with it
    assert error_of(table.handle(CLIENT, bwd(1, g), later + 4 * HB_MS * MS))[0] == ErrorCode.NOT_READY


def keep_alive(table, start_ns, end_ns):
    """A client that pings every half interval from ``start_ns`` to ``end_ns``, the server ticking as often."""
    for t in range(start_ns, end_ns + 1, HB_MS // 2 * MS):
        table.handle(CLIENT, P.pack(P.ping(t // MS, 0)), t)
        table.tick(t)


def test_a_pending_step_past_its_ttl_is_dropped_and_its_backward_is_unknown(package):
    table, _, _ = make(package)
    hello(table, T0)
    x = tokens(4)
    table.handle(CLIENT, fwd(1, x), T0)
    keep_alive(table, T0, T0 + TTL_MS * MS)
    assert table.handle(CLIENT, bwd(1, x), T0 + TTL_MS * MS)[0]["kind"] == "result"  # just in time
    table.handle(CLIENT, fwd(2, x), T0 + TTL_MS * MS)
    keep_alive(table, T0 + TTL_MS * MS, T0 + (2 * TTL_MS + HB_MS) * MS)
    assert CLIENT in table.sessions  # the session lives on; only the step went
    code, rid, message = error_of(table.handle(CLIENT, bwd(2, x), T0 + (2 * TTL_MS + HB_MS) * MS))
    assert (code, rid) == (ErrorCode.UNKNOWN_STEP, 2) and "redo it from train_fwd" in message


def test_bye_and_a_vanished_peer_take_the_sessions_steps_with_them(package):
    table, runner, _ = make(package)
    x = tokens(5)
    for ident in (CLIENT, b"other"):
        hello(table, T0, ident=ident)
        table.handle(ident, fwd(1, x), T0)
    assert table.handle(CLIENT, P.pack(P.bye("done")), T0) is None
    table.drop(b"other")  # the server's send found the peer gone
    assert not table.sessions and runner.steps == {}
    hello(table, T0 + MS)
    assert error_of(table.handle(CLIENT, bwd(1, x), T0 + MS))[:2] == (ErrorCode.UNKNOWN_STEP, 1)


def test_too_many_pending_steps_are_overloaded_but_credits_never_bite_in_place(package):
    table, _, _ = make(package, credits=1, max_pending=2)
    hello(table, T0)
    x = tokens(6)
    assert all(table.handle(CLIENT, fwd(i, x), T0)[0]["kind"] == "result" for i in (1, 2))
    code, rid, message = error_of(table.handle(CLIENT, fwd(3, x), T0))
    assert (code, rid) == (ErrorCode.OVERLOADED, 3) and "max_pending" in message
    assert table.handle(CLIENT, fwd(4, x, grad=False), T0)[0]["kind"] == "result"  # one credit, reused


# -- client: the SplitTrainSession that WireBody drives, against the server table above -------------


class _Top:
    """An rng at the top of its range: every backoff delay is its full step."""

    def random(self) -> float:
        return 1.0


TIMEOUT_S = 0.5  # over three heartbeats (the silence deadline), under the ttl of a pending step


def client(package) -> SplitTrainSession:
    return SplitTrainSession(
        package.hash, "client", timeout_s=TIMEOUT_S, backoff=Backoff(0.05, 0.4, rng=_Top()), wall_clock=lambda: 99
    )


def deliver(session, table, parts, now) -> list:
    """``parts`` sent by the client reach the server table; its reply (if any) reaches the client."""
    reply = table.handle(CLIENT, parts, now)
    return [] if reply is None else session.receive(P.pack(*reply), now)


def sent(events) -> list:
    return [ev.parts for ev in events if isinstance(ev, Send)]


def connect(session, table, now) -> list:
    events = deliver(session, table, session.hello(now), now)
    assert isinstance(events[0], Welcomed), events
    return events


def heartbeats(session, table, start_ns, end_ns) -> list:
    """Both ends tick every half interval from ``start_ns`` to ``end_ns`` and every ping and pong
    is delivered; returns the client's events."""
    events = []
    for t in range(start_ns, end_ns + 1, HB_MS // 2 * MS):
        for _, ping in table.tick(t):
            for parts in sent(session.receive(P.pack(ping), t)):
                deliver(session, table, parts, t)
        for ev in session.tick(t):
            events.append(ev)
            if isinstance(ev, Send):
                events += deliver(session, table, ev.parts, t)
    return events


def fwd_step(session, step, x, now, grad=True):
    d, payload = S.encode(x, 32, "tokens")
    return session.step(S.TRAIN_FWD, step, d, payload, now, grad=grad)


def test_the_client_says_hello_u_shaped_and_keeps_the_train_terms(package):
    table, _, _ = make(package)
    session = client(package)
    h = P.parse(session.hello(T0)).header
    assert (h["kind"], h["serving"], h["bundle"]) == ("hello", "u-shaped", package.hash)
    (welcomed,) = deliver(session, table, session.hello(T0), T0)
    assert isinstance(welcomed, Welcomed) and not welcomed.reconnected
    assert session.train_terms == {"tokens": list(TOKENS), "max_pending": 2, "replay": 4, "ttl_ms": TTL_MS}
    assert S.FEATURE_SPLIT_TRAINING in session.welcome.features and session.credits == 4


def test_a_step_goes_out_under_its_own_id_and_its_answer_and_refusal_come_back_by_it(package):
    table, runner, _ = make(package)
    session = client(package)
    connect(session, table, T0)
    x = tokens(7)
    req, parts = fwd_step(session, 41, x, T0)
    assert parts is not None and P.pack_header(S.train_fwd(41, S.encode(x, 32, "tokens")[0], True)) == parts[0]
    (answered,) = deliver(session, table, parts, T0 + MS)
    assert isinstance(answered, Answered) and answered.rid == 41 and answered.request is req
    body_out = S.decode(answered.header["outputs"][0], answered.frames[0])
    d, payload = S.encode(np.ones_like(body_out), 32, "grad_out")
    _, parts = session.step(S.TRAIN_BWD, 41, d, payload, T0 + 2 * MS)
    (answered,) = deliver(session, table, parts, T0 + 2 * MS)
    assert answered.header["outputs"][0]["name"] == "grad_in" and not session.outstanding
    _, parts = session.step(S.TRAIN_BWD, 42, d, payload, T0 + 3 * MS)  # never sent forward
    (refused,) = deliver(session, table, parts, T0 + 3 * MS)
    assert isinstance(refused, Refused) and (refused.rid, refused.code) == (42, ErrorCode.UNKNOWN_STEP)
    assert runner.counters["train_fwd"] == 1 and runner.counters["train_bwd"] == 1


def test_a_step_made_before_the_welcome_is_held_and_sent_after_it(package):
    table, _, _ = make(package)
    session = client(package)
    hello_parts = session.hello(T0)
    _, parts = fwd_step(session, 1, tokens(8), T0)
    assert parts is None and 1 in session.outstanding
    events = deliver(session, table, hello_parts, T0 + MS)
    assert isinstance(events[0], Welcomed) and len(sent(events)) == 1
    (answered,) = deliver(session, table, sent(events)[0], T0 + MS)
    assert isinstance(answered, Answered) and answered.rid == 1


def test_a_step_that_times_out_is_resent_with_its_id_and_answered_again_without_running_twice(package):
    table, runner, _ = make(package)
    session = client(package)
    connect(session, table, T0)
    req, parts = fwd_step(session, 5, tokens(9), T0)
    first = table.handle(CLIENT, parts, T0)  # the server answered; the answer was lost on the way
    late = T0 + int(TIMEOUT_S * 1e9) + 1
    events = heartbeats(session, table, T0, late - MS)  # the server is there: it pings, it is answered
    assert not [ev for ev in events if isinstance(ev, (Lost, TimedOut))] and 5 in session.outstanding
    timed_out = [ev for ev in session.tick(late) if isinstance(ev, TimedOut)]
    assert [ev.rid for ev in timed_out] == [5] and not session.outstanding
    again = session.resend(req, late)
    assert again == parts
    (answered,) = deliver(session, table, again, late)
    assert isinstance(answered, Answered) and answered.rid == 5
    assert table.handle(CLIENT, parts, late) == first and runner.counters["train_fwd"] == 1


def test_a_silent_server_loses_the_session_and_the_step_goes_again_after_the_next_welcome(package):
    table, runner, _ = make(package)
    session = client(package)
    connect(session, table, T0)
    assert session.silence_limit() == (EXPIRY_INTERVALS * HB_MS * MS, DISCONNECTED)
    req, parts = fwd_step(session, 3, tokens(10), T0)
    table.handle(CLIENT, parts, T0)  # computed, but the answer never arrives: silence from here on
    pinged = sent(session.tick(T0 + HB_MS * MS + 1))  # a quiet interval: the client pings
    assert [P.parse(p).kind for p in pinged] == ["ping"]
    (lost,) = session.tick(T0 + 3 * HB_MS * MS + 1)
    assert isinstance(lost, Lost) and lost.reason == DISCONNECTED and lost.requests == (req,)
    assert session.resend(req, T0 + 3 * HB_MS * MS + 1) is None  # no session: held
    assert sent(session.tick(T0 + 3 * HB_MS * MS + 2)) == []  # the hello waits one backoff step
    now = T0 + 3 * HB_MS * MS + 60 * MS
    (hello_again,) = sent(session.tick(now))
    events = deliver(session, table, hello_again, now)
    assert isinstance(events[0], Welcomed) and events[0].reconnected and session.reconnects == 1
    (answered,) = deliver(session, table, sent(events)[0], now)
    assert isinstance(answered, Answered) and answered.rid == 3
    assert runner.counters["train_fwd"] == 1 and runner.counters["retransmits"] == 1  # answered again, not rerun


def test_a_session_the_server_expired_is_re_handshaken_and_the_step_resent_once(package):
    table, _, _ = make(package)
    session = client(package)
    connect(session, table, T0)
    table.tick(T0 + (EXPIRY_INTERVALS * HB_MS + 1) * MS)  # the client said nothing for three intervals
    assert not table.sessions
    now = T0 + 4 * HB_MS * MS
    _, parts = fwd_step(session, 9, tokens(11), now)
    events = deliver(session, table, parts, now)  # NOT_READY: the session says hello again by itself
    (hello_again,) = sent(events)
    events = deliver(session, table, hello_again, now)
    assert isinstance(events[0], Welcomed)
    (answered,) = deliver(session, table, sent(events)[0], now)
    assert isinstance(answered, Answered) and answered.rid == 9


def test_heartbeats_both_ways(package):
    table, _, _ = make(package)
    session = client(package)
    connect(session, table, T0)
    (ping,) = [h for _, h in table.tick(T0 + HB_MS * MS + 1)]
    (pong,) = sent(session.receive(P.pack(ping), T0 + HB_MS * MS + 1))
    assert table.handle(CLIENT, pong, T0 + HB_MS * MS + 2 * MS) is None
    assert table.sessions[CLIENT].rtt_us == pytest.approx(2000, abs=1)
    (own,) = sent(session.tick(T0 + 2 * HB_MS * MS + 2))  # a quiet interval since the pong it sent
    (ponged,) = deliver(session, table, own, T0 + 2 * HB_MS * MS + 2)
    assert isinstance(ponged, Ponged)


def test_a_welcome_without_split_training_is_refused_and_the_session_closed(package):
    session = client(package)
    session.hello(T0)
    w = P.welcome(package.hash, "old", credits=4, limits=P.DEFAULT_LIMITS, heartbeat_ms=HB_MS, codecs=["raw"])
    refused, bye = session.receive(P.pack(w), T0)
    assert isinstance(refused, Refused) and (refused.rid, refused.code) == (None, ErrorCode.UNSUPPORTED)
    assert "does not offer split training" in refused.message
    assert isinstance(bye, Send) and P.parse(bye.parts).kind == "bye"
    assert session.welcome is None and not session.handshaking and sent(session.tick(T0 + 10**9)) == []


# -- the driver: WireBody on a real socket, its server losing one answer --------------------------------


def test_wire_body_resends_a_step_whose_answer_was_lost_and_gets_the_same_answer(package):
    """One real-socket check of the driver's loop: a body server (in a thread) that drops its first
    answer; WireBody's session gives up on the silent session, says hello again, resends the step
    under its id, and the server answers the retransmit without running the step again."""
    import threading

    from edgesplit.families.sfprompt.wire_link import WireBody
    from edgesplit.server.body_server import BodyServer

    class LosesFirstAnswer(BodyServer):
        dropped = 0

        def _send(self, identity, header, frames):
            if header["kind"] == "result" and not self.dropped:
                self.dropped += 1
                return
            super()._send(identity, header, frames)

    server = LosesFirstAnswer(package, max_pending=2, replay=4, ttl_ms=60_000)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    try:
        link = WireBody(server.endpoint, package.hash, timeout_s=2.0, retries=1)  # ample for a loaded CPU
        x = tokens(12)
        out = link.forward(1, x, True)
        assert link.resends == 1 and server.dropped == 1 and link.session.reconnects == 1
        assert server.runner.counters["train_fwd"] == 1 and server.runner.counters["retransmits"] == 1
        with torch.no_grad():
            assert np.allclose(out, package.body(torch.from_numpy(x)).numpy(), atol=1e-6)
        assert link.backward(1, np.ones_like(out)).shape == x.shape and link.resends == 1
        link.close()
    finally:
        server.stop_event.set()
        thread.join(timeout=10)
