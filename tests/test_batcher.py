"""The dynamic batcher's Triton semantics: preferred batch sizes, queue delay, max batch."""

from __future__ import annotations

import time

import pytest

from edgesplit.server.batcher import Batcher, Item


def _item(key, rows=1, t=None):
    return Item(
        key=key,
        identity=b"x",
        req_id=0,
        desc={},
        payload=b"",
        rows=rows,
        single=rows == 1,
        t_recv_ns=time.perf_counter_ns() if t is None else t,
    )


def test_largest_preferred_size_that_can_be_formed_runs_at_once():
    b = Batcher(max_batch=16, max_delay_us=600_000_000, max_queue=64, preferred=[8, 4])
    assert b.preferred == (4, 8)
    for _ in range(7):
        b.put(_item("k"))
    # 7 queued: 4 is the largest preferred size that can be formed -> a batch of 4 without waiting
    # for the queue delay (10 minutes: nothing else can release it); the 3 left form no preferred
    # size and wait.
    assert len(b.next_batch(timeout=30) or []) == 4
    assert b.next_batch(timeout=0.1) is None and len(b) == 3
    for _ in range(6):
        b.put(_item("k"))
    assert len(b.next_batch(timeout=1)) == 8  # 9 queued: 8 formed at once
    assert len(b) == 1


def test_without_a_preferred_size_the_queue_delay_rules_and_takes_everything():
    b = Batcher(max_batch=16, max_delay_us=60_000, max_queue=64, preferred=[8])
    for _ in range(5):
        b.put(_item("k"))
    t0 = time.monotonic()
    got = b.next_batch(timeout=30)
    # no preferred size can be formed: after the delay, the largest batch possible (all 5)
    assert len(got) == 5 and time.monotonic() - t0 >= 0.05


def test_preferred_sizes_respect_request_rows_and_keys():
    b = Batcher(max_batch=8, max_delay_us=5_000_000, max_queue=64, preferred=[4])
    b.put(_item("k", rows=3))
    b.put(_item("other", rows=1))
    b.put(_item("k", rows=3))  # "k" has 6 rows: aims at 4, a request is never split -> 3 rows
    assert [i.rows for i in b.next_batch(timeout=30)] == [3]
    b.close()  # drain: the rest is due at once, preferred sizes or not
    got = [b.next_batch(timeout=1), b.next_batch(timeout=1)]
    assert sorted(sum(i.rows for i in batch) for batch in got) == [1, 3]
    assert b.next_batch() is None


@pytest.mark.parametrize("bad", [[0], [17], [4, 40]])
def test_preferred_sizes_outside_max_batch_are_refused(bad):
    with pytest.raises(ValueError, match="preferred batch sizes"):
        Batcher(max_batch=16, preferred=bad)


def test_serve_cli_parses_preferred_batch_sizes():
    from edgesplit.server.daemon import build_parser

    a = build_parser().parse_args(["--bundle", "x", "--preferred-batch-sizes", "4,8,16"])
    assert a.preferred_batch_sizes == (4, 8, 16)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--bundle", "x", "--preferred-batch-sizes", "4,eight"])


def test_serve_cli_switch_interval_default_and_validation():
    from edgesplit.server.daemon import build_parser, serve_main

    assert build_parser().parse_args(["--bundle", "x"]).switch_interval_us == 1000.0
    with pytest.raises(SystemExit) as e:
        serve_main(["--bundle", "x", "--switch-interval-us", "-1"])
    assert e.value.code == 2
