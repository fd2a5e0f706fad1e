"""Trace readers on the real files: the statistics the data README quotes, and the service curve
checked against the raw delivery opportunities."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_control_common import HSDPA, MAHIMAHI, need

from edgesplit.control.traces import Trace, TraceError, hsdpa_paths, read_hsdpa, read_mahimahi, read_trace

# Per-second throughput (Mbit/s) as the data README tabulates it: mean, p5, median, p95, max.
README_MAHIMAHI = {
    "ATT-LTE-driving.up": (0.83, 0.00, 1.04, 1.19, 1.30),
    "ATT-LTE-driving.down": (5.17, 0.65, 5.40, 9.53, 15.5),
    "TMobile-LTE-short.up": (13.2, 2.48, 11.2, 27.5, 29.8),
    "Verizon-EVDO-driving.up": (0.84, 0.07, 0.96, 1.26, 1.78),
}
README_LENGTH_S = {
    "ATT-LTE-driving.up": 1012,
    "ATT-LTE-driving.down": 786,
    "TMobile-LTE-short.up": 140,
    "Verizon-EVDO-driving.up": 1065,
}


def _rounds_to(x: float, quoted: float) -> bool:
    """``x`` agrees with ``quoted`` to its last digit (2 decimals below 10, else 1), allowing for
    a double rounding (29.748 -> 29.75 -> 29.8)."""
    unit = 0.01 if abs(quoted) < 10 else 0.1
    return abs(x - quoted) <= 0.6 * unit


@pytest.mark.parametrize("name", sorted(README_MAHIMAHI))
def test_mahimahi_per_second_stats_match_the_readme(name):
    tr = read_trace(need(MAHIMAHI / name))
    assert tr.kind == "packets"
    c = tr.per_second_mbps()
    assert abs(len(c) - README_LENGTH_S[name]) <= 1
    got = (c.mean(), *np.percentile(c, [5, 50, 95], method="nearest"), c.max())
    for what, g, q in zip(("mean", "p5", "median", "p95", "max"), got, README_MAHIMAHI[name]):
        assert _rounds_to(g, q), f"{name} {what}: {g:.3f}, the README says {q}"


def test_hsdpa_all_traces_median_and_spread():
    paths = hsdpa_paths(need(HSDPA))
    assert len(paths) == 80
    traces = [read_hsdpa(p) for p in paths]
    samples = np.concatenate([t.mbps for t in traces])
    # The README quotes the samples: median about 1.4, p5 0.5, p95 3.8, max 8.
    assert abs(np.median(samples) - 1.4) < 0.05
    assert abs(np.percentile(samples, 5) - 0.5) < 0.05 and abs(np.percentile(samples, 95) - 3.8) < 0.1
    assert 7.5 < samples.max() < 8.5
    # Time-weighted, the per-second capacity is lower: slow stretches are reported less often
    # (long gaps between samples). The simulator replays time, so this is what it sees.
    per_s = np.concatenate([t.per_second_mbps() for t in traces])
    assert 0.8 < np.median(per_s) < np.median(samples)


def test_mahimahi_transmit_matches_the_raw_opportunities():
    path = need(MAHIMAHI / "Verizon-EVDO-driving.up")
    raw = np.asarray([int(x) for x in path.read_text().split()])
    period = raw[-1]
    opp = np.concatenate([raw, raw + period, raw + 2 * period]) / 1000.0  # three loops, seconds
    tr = read_mahimahi(path)
    rng = np.random.default_rng(0)
    for t in np.concatenate([rng.uniform(0, 2 * period / 1000, 300), [0.0, period / 1000, 0.8315]]):
        for nbytes in (1, 392, 1500, 1501, 1568, 6000):
            k = math.ceil(nbytes / 1500)  # opportunities needed on an idle link
            first = np.searchsorted(opp, t, side="left")  # first opportunity at or after t
            assert tr.finish_time(t, nbytes) == pytest.approx(opp[first + k - 1], abs=1e-9), (t, nbytes)


def test_mahimahi_shares_an_opportunity_between_queued_messages_like_mm_link():
    tr = Trace.from_mahimahi([10, 20, 30, 40], name="tiny")
    s1, e1, f1 = tr.transmit(0.0, 400)
    s2, e2, f2 = tr.transmit(0.0, 400, e1)  # queued at the same time: the same 1500-byte opportunity
    assert f1 == f2 == 0.010
    _, e3, f3 = tr.transmit(0.0, 1000, e2)  # 700 bytes left in it, 300 go in the next one
    assert f3 == 0.020
    _, _, f4 = tr.transmit(0.025, 100, e3)  # arrives after the 20 ms opportunity: its leftover is lost
    assert f4 == 0.030
    _, _, f5 = tr.transmit(0.0395, 100)  # loops: period 40 ms, the next opportunities are 40, 50, ...
    assert f5 == 0.040
    assert tr.transmit(0.041, 100)[2] == 0.050


def test_rate_trace_integrates_capacity_and_loops():
    tr = Trace.from_rates([0.0, 1.0, 2.0], [8.0, 0.0, 4.0], period_s=3.0)  # 1 MB/s, nothing, 0.5 MB/s
    assert tr.level_at(1.0) == pytest.approx(1e6) and tr.level_at(2.0) == pytest.approx(1e6)
    assert tr.finish_time(0.5, 500_000) == pytest.approx(1.0)
    assert tr.finish_time(0.5, 750_000) == pytest.approx(2.5)  # 500 kB before the gap, 250 kB after it
    assert tr.finish_time(1.2, 1) == pytest.approx(2.0 + 1 / 500_000)  # nothing goes in the gap
    assert tr.finish_time(2.5, 1_000_000) == pytest.approx(3.0 + 0.75)  # wraps into the next loop
    assert tr.per_second_mbps(6) == pytest.approx([8, 0, 4, 8, 0, 4])
    assert tr.capacity_between(0.5, 2.5) == pytest.approx(500_000 + 250_000)


def test_hsdpa_service_curve_matches_the_samples():
    path = hsdpa_paths(need(HSDPA))[0]
    a = np.loadtxt(path)
    tr = read_trace(path)
    assert tr.kind == "rate"
    t, v = a[:, 0] - a[0, 0], a[:, 1]
    # Bytes offered between two sample times = sum of rate x duration of the samples in between.
    i, j = 3, len(t) - 2
    expect = float(np.sum(v[i:j] * np.diff(t[i : j + 1]))) * 1e6 / 8
    assert tr.level_at(t[j]) - tr.level_at(t[i]) == pytest.approx(expect, rel=1e-9)
    # A message that fits in one sample's interval takes bytes / that sample's rate.
    k = next(k for k in range(len(t) - 1) if v[k] * 1e6 / 8 * (t[k + 1] - t[k]) / 2 > 1000)
    mid = (t[k] + t[k + 1]) / 2
    assert tr.finish_time(mid, 1000) == pytest.approx(mid + 1000 * 8 / (v[k] * 1e6), rel=1e-9)


def test_real_outage_is_zero_capacity():
    tr = read_trace(need(MAHIMAHI / "ATT-LTE-driving.up"))
    c = tr.per_second_mbps()
    zero = np.flatnonzero(c == 0)  # p5 is 0.00
    runs = np.split(zero, np.flatnonzero(np.diff(zero) > 1) + 1)
    longest = max(runs, key=len)
    s, e = float(longest[0]), float(longest[-1] + 1)
    assert e - s >= 60  # one outage of more than a minute, and a few short ones
    assert tr.capacity_between(s, e - 1e-3) == 0.0
    assert tr.finish_time(s + 10, 100) >= e  # a message sent in the outage waits for its end


def test_reader_errors_and_format_detection(tmp_path):
    (tmp_path / "bad.up").write_text("10\nabc\n")
    with pytest.raises(TraceError):
        read_trace(tmp_path / "bad.up")
    (tmp_path / "empty.up").write_text("")
    with pytest.raises(TraceError):
        read_trace(tmp_path / "empty.up")
    (tmp_path / "desc.up").write_text("30\n20\n")
    with pytest.raises(TraceError, match="non-decreasing"):
        read_trace(tmp_path / "desc.up")
    (tmp_path / "rates").write_text("0.0\t1.5\n1.0\t2.0\n")
    assert read_trace(tmp_path / "rates").kind == "rate"
    (tmp_path / "ints").write_text("5\n5\n12\n")
    tr = read_trace(tmp_path / "ints")
    assert tr.kind == "packets" and tr.level_at(0.006) == 3000
    with pytest.raises(TraceError, match="no capacity"):
        Trace.from_rates([0.0, 1.0], [0.0, 0.0])
