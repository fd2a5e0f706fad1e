"""Typed message views (edgesplit/wire/messages.py): each reads a parsed header and, where the
server builds that header, writes exactly the dict the protocol builder writes."""

from __future__ import annotations

import pytest

from edgesplit.wire import protocol as P
from edgesplit.wire.codec import descriptor
from edgesplit.wire.errors import ErrorCode
from edgesplit.wire.messages import ErrorReply, ResultTimings, Welcome


def _parsed(header: dict, frames=()) -> dict:
    """The header as the peer sees it: packed, sent, parsed and validated."""
    return P.parse(P.pack(header, list(frames))).header


def test_welcome_reads_every_field_and_writes_the_same_header():
    lim = P.Limits(max_header_bytes=1000, max_frame_bytes=2000, max_frames=3, max_batch=4)
    h = P.welcome(
        "abc",
        "srv-1",
        credits=7,
        limits=lim,
        heartbeat_ms=250,
        codecs=["raw", "zstd"],
        bits=[2, 8],
        features=[P.FEATURE_COMPACT_REQUESTS],
    )
    w = Welcome.from_header(_parsed(h))
    assert (w.bundle, w.server, w.credits, w.heartbeat_ms) == ("abc", "srv-1", 7, 250)
    assert w.limits == lim
    assert w.codecs == ("raw", "zstd") and w.bits == (2, 8)
    assert w.features == (P.FEATURE_COMPACT_REQUESTS,) and w.compact_requests
    assert w.to_header() == h


def test_v10_welcome_has_no_features_and_round_trips_without_the_key():
    h = P.welcome("abc", "old", credits=1, limits=P.DEFAULT_LIMITS, heartbeat_ms=0, codecs=["raw"])
    assert "features" not in h
    w = Welcome.from_header(_parsed(h))
    assert w.features == () and not w.compact_requests
    assert w.to_header() == h
    assert P.parse(P.pack(w.to_header())).header == _parsed(h)


def test_result_timings_round_trip_through_the_result_header():
    desc = descriptor("logits", (10,), "float32", 32, 1.0, 0, None, "raw", 40)
    h = P.result(42, [desc], queue_us=12.34, compute_us=567.89, batch_size=3, server_us=600.04, t_send_ns=99)
    t = ResultTimings.from_header(_parsed(h, [b"\0" * 40]))
    assert t == ResultTimings(queue_us=12.3, compute_us=567.9, server_us=600.0, batch_size=3)
    assert t.to_header(42, [desc], t_send_ns=99) == h
    assert t.to_header(42, [desc]) == P.result(
        42, [desc], queue_us=12.3, compute_us=567.9, batch_size=3, server_us=600.0
    )


@pytest.mark.parametrize("rid", [None, 0, 17])
@pytest.mark.parametrize("code", list(ErrorCode))
def test_error_reply_round_trips_every_code(rid, code):
    h = P.error(rid, code, f"because {code.name}")
    e = ErrorReply.from_header(_parsed(h))
    assert e == ErrorReply(rid, code, f"because {code.name}")
    assert isinstance(e.code, ErrorCode)
    assert e.to_header() == h


def test_error_reply_with_a_code_from_a_later_revision_reads_as_retryable_internal():
    h = dict(P.error(5, ErrorCode.MALFORMED, "x"), code=99, name="FUTURE")
    e = ErrorReply.from_header(_parsed(h))
    assert e.rid == 5 and e.code == ErrorCode.INTERNAL and e.message == "x"
