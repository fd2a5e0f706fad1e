"""The simulator on real uplinks: every frame has an outcome, outages become fallbacks, bytes are
conserved and never beat the trace's capacity, the oracle is not beaten, and it is fast."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from test_control_common import HSDPA, MAHIMAHI, bundle_like_modes, need

from edgesplit.control.estimator import HarmonicMeanEstimator
from edgesplit.control.link import LinkModel
from edgesplit.control.modes import FALLBACK
from edgesplit.control.oracle import OraclePolicy
from edgesplit.control.policy import DeadlinePolicy, FixedPolicy
from edgesplit.control.simulator import compare, format_table, simulate, standard_policies
from edgesplit.control.traces import hsdpa_paths, read_trace

FPS = 30.0
OUTAGE = (790.0, 864.0)  # inside the 77 s without a single delivery opportunity (788 s to 865 s)


def deadline_for(modes, link) -> float:
    """A deadline at which the choice matters on a ~1 Mbit/s uplink: the fixed terms plus 2.5x the
    largest mode's transmission time at 1 Mbit/s (it fits when the link is good, not always)."""
    fixed = link.base_rtt_ms + link.server_ms + link.encode_ms + max(m.head_ms for m in modes)
    return round(fixed + 2.5 * max(m.bytes_per_frame for m in modes) * 8 / 1e6 * 1000, 1)


@pytest.fixture(scope="module")
def att():
    path = need(MAHIMAHI / "ATT-LTE-driving.up")
    modes = bundle_like_modes()
    link = LinkModel(read_trace(path), base_rtt_ms=20.0, server_ms=2.0, encode_ms=0.1)
    d = deadline_for(modes, link)
    fallback_ms = 2 * d  # a device that cannot run the full model within the deadline
    t0 = time.perf_counter()
    res = compare(
        standard_policies(modes, link, FPS, local_ms=fallback_ms),
        modes,
        link,
        fps=FPS,
        deadline_ms=d,
        fallback_ms=fallback_ms,
    )
    wall = time.perf_counter() - t0
    print(
        f"\n{modes}\n{link.trace}, {FPS:g} fps, deadline {d} ms, fallback {fallback_ms} ms, {wall:.1f} s\n{format_table(res)}"
    )
    return {
        "path": path,
        "modes": modes,
        "link": link,
        "deadline": d,
        "fallback_ms": fallback_ms,
        "res": res,
        "wall": wall,
    }


def test_a_1000_s_trace_at_30_fps_is_simulated_frame_by_frame_for_all_policies(att):
    assert len(att["res"]) >= 6
    assert all(len(r.reasons) == int(att["link"].trace.period_s * FPS) for r in att["res"].values())


def test_every_frame_has_an_outcome_and_the_metrics_follow_from_them(att):
    modes, d, fb_ms = att["modes"], att["deadline"], att["fallback_ms"]
    valid = {m.id for m in modes} | {FALLBACK}
    for name, r in att["res"].items():
        f = r.frames
        n = len(f["mode"])
        assert set(np.unique(f["mode"])) <= valid, name
        assert np.all(np.isfinite(f["latency_ms"])) and np.all(f["t_answer"] >= f["t_capture"]), name
        assert np.array_equal(f["hit"], f["latency_ms"] <= d + 1e-9), name
        fb = f["fallback"]
        assert np.all(f["latency_ms"][fb] >= fb_ms - 1e-6), name  # answered by the local model
        assert not f["hit"][fb].any(), name  # local latency (2 x deadline) never meets the deadline
        acc = np.array([modes.accuracy(int(k)) for k in f["mode"]])
        m = r.metrics
        assert m["accuracy"] == pytest.approx(acc.mean()) and m["hit_rate"] == pytest.approx(f["hit"].mean())
        assert m["timely_accuracy"] == pytest.approx((acc * f["hit"]).mean())
        assert m["fallbacks"] == int(fb.sum()) and m["frames"] == n
        assert m["switches"] == sum(1 for i in range(1, n) if f["mode"][i] != f["mode"][i - 1])
        assert m["bytes_per_frame"] == pytest.approx(f["bytes"].sum() / n)


def test_outage_becomes_local_fallback_never_a_silent_drop(att):
    res = att["res"]
    ctrl = next(r for k, r in res.items() if k.startswith("deadline(harmonic"))
    f = ctrl.frames
    inside = (f["t_capture"] >= OUTAGE[0]) & (f["t_capture"] < OUTAGE[1])
    assert f["fallback"][inside].mean() > 0.95
    # While the link is dead, it sends only the probes (one at a time, each stuck until the end).
    assert f["bytes"][inside].sum() <= 4 * max(m.bytes_per_frame for m in att["modes"])
    after = (f["t_capture"] >= 880.0) & (f["t_capture"] < 900.0)
    assert (~f["fallback"][after]).mean() > 0.8  # back to the server once the link is back
    for k, r in res.items():
        if k.startswith("fixed:"):  # the no-adaptation baseline sends into the outage: late, answered
            g = r.frames
            assert g["fallback"].sum() == 0 and not g["hit"][inside].any()
            assert np.all(np.isfinite(g["t_answer"][inside]))


def test_the_oracle_meets_the_most_deadlines_and_is_not_dominated(att):
    res = att["res"]
    o = res["oracle"].metrics
    for k, r in res.items():
        m = r.metrics
        assert o["hit_rate"] >= m["hit_rate"], k
        dominated = (
            m["hit_rate"] >= o["hit_rate"]
            and m["accuracy"] >= o["accuracy"]
            and (m["hit_rate"] > o["hit_rate"] or m["accuracy"] > o["accuracy"])
        )
        assert not dominated, k
    smallest = res[f"fixed:{att['modes'].smallest.name}"].metrics
    assert o["accuracy"] > smallest["accuracy"]


def test_the_controller_beats_assine_and_the_largest_fixed_mode_on_hit_rate(att):
    res = att["res"]
    ctrl = next(r for k, r in res.items() if k.startswith("deadline(harmonic")).metrics
    assine = next(r for k, r in res.items() if k.startswith("assine")).metrics
    largest = max(att["modes"], key=lambda m: m.bytes_per_frame)
    assert ctrl["hit_rate"] > assine["hit_rate"]
    assert ctrl["hit_rate"] > res[f"fixed:{largest.name}"].metrics["hit_rate"]


def test_bytes_are_conserved_and_never_beat_the_real_opportunities(att):
    raw = np.asarray([int(x) for x in att["path"].read_text().split()])
    opp = np.concatenate([raw + k * raw[-1] for k in range(3)]) / 1000.0  # three loops, seconds
    modes = att["modes"]
    for name, r in att["res"].items():
        f = r.frames
        sent = f["sent_mode"] != FALLBACK
        remote = ~f["fallback"]
        assert np.array_equal(remote, sent & ~f["probe"]), name
        expect = sum(modes.by_id[int(k)].bytes_per_frame for k in f["mode"][remote])
        expect += sum(modes.by_id[int(k)].bytes_per_frame for k in f["sent_mode"][f["probe"]])
        assert f["bytes"].sum() == pytest.approx(expect), name
        ts, start, fin, b = f["t_send"][sent], f["t_tx_start"][sent], f["t_tx_finish"][sent], f["bytes"][sent]
        assert np.all(ts >= f["t_capture"][sent]) and np.all(start >= ts - 1e-12) and np.all(fin >= start), name
        assert np.all(np.diff(fin) >= 0), name  # FIFO
        # Cumulative: the first k requests' bytes fit in the opportunities from the first send to
        # the k-th finish (1500 bytes each, raw file times).
        n_opp = np.searchsorted(opp, fin, side="right") - np.searchsorted(opp, ts[0], side="left")
        assert np.all(1500 * n_opp >= np.cumsum(b) - 1e-6), name
        # Each request: its bytes fit in the opportunities between its first possible and its last byte.
        per = np.searchsorted(opp, fin, side="right") - np.searchsorted(opp, start, side="left")
        assert np.all(1500 * per >= b), name


def test_fluid_trace_sends_exactly_the_capacity_between_start_and_finish():
    path = hsdpa_paths(need(HSDPA))[5]
    a = np.loadtxt(path)
    t, v = a[:, 0] - a[0, 0], a[:, 1] * 1e6 / 8  # bytes/s
    period = t[-1] + np.median(np.diff(t))
    edges = np.append(t, period)
    cum = np.concatenate([[0.0], np.cumsum(v * np.diff(edges))])

    def offered(x):  # bytes offered in [0, x), from the raw samples (held until the next one), looping
        k, r = np.divmod(x, period)
        i = np.searchsorted(edges, r, side="right") - 1
        return k * cum[-1] + cum[i] + v[i] * (r - edges[i])

    modes = bundle_like_modes()
    link = LinkModel(read_trace(path), base_rtt_ms=20.0, server_ms=2.0, encode_ms=0.1)
    d = deadline_for(modes, link)
    for pol in (
        DeadlinePolicy(modes, HarmonicMeanEstimator(5), local_ms=2 * d, base_rtt_ms=20.0),
        FixedPolicy(modes, max(modes, key=lambda m: m.bytes_per_frame).id),
    ):
        r = simulate(pol, modes, link, fps=FPS, deadline_ms=d, fallback_ms=2 * d, duration_s=120.0)
        f = r.frames
        s = f["sent_mode"] != FALLBACK
        got = offered(f["t_tx_finish"][s]) - offered(f["t_tx_start"][s])
        assert np.allclose(got, f["bytes"][s], rtol=1e-9, atol=1e-6), pol.name  # work-conserving fluid FIFO


def test_local_fallback_is_a_hit_only_when_its_local_latency_meets_the_deadline():
    path = need(MAHIMAHI / "ATT-LTE-driving.up")
    modes = bundle_like_modes()
    link = LinkModel(read_trace(path), base_rtt_ms=20.0, server_ms=2.0, encode_ms=0.1)
    d = 60.0
    kw = dict(fps=10.0, deadline_ms=d, start_s=770.0, duration_s=120.0)
    # A device whose full model takes half the deadline: fallback frames are hits (100 ms apart, no queue).
    fast = simulate(DeadlinePolicy(modes, local_ms=0.5 * d, base_rtt_ms=20.0), modes, link, fallback_ms=0.5 * d, **kw)
    fb = fast.frames["fallback"]
    assert fb.sum() > 500 and fast.frames["hit"][fb].all()
    assert fast.metrics["fallback_hits"] == fb.sum()
    # The same frames answered by a full model that takes 1.5x the deadline: late, every one.
    slow = simulate(DeadlinePolicy(modes, local_ms=1.5 * d, base_rtt_ms=20.0), modes, link, fallback_ms=1.5 * d, **kw)
    fb = slow.frames["fallback"]
    assert fb.sum() > 500 and not slow.frames["hit"][fb].any() and slow.metrics["fallback_hits"] == 0
    # A full model slower than the frame interval falls behind with one executor, not with two.
    one = simulate(DeadlinePolicy(modes, local_ms=1.5 * d, base_rtt_ms=20.0), modes, link, fallback_ms=150.0, **kw)
    two = simulate(
        DeadlinePolicy(modes, local_ms=1.5 * d, base_rtt_ms=20.0),
        modes,
        link,
        fallback_ms=150.0,
        fallback_workers=2,
        **kw,
    )
    lat1 = one.frames["latency_ms"][one.frames["fallback"]]
    lat2 = two.frames["latency_ms"][two.frames["fallback"]]
    assert lat1.max() > 10 * 150.0 and lat2.max() == pytest.approx(150.0)


def test_simulator_rejects_bad_arguments():
    modes = bundle_like_modes()
    link = LinkModel(read_trace(need(MAHIMAHI / "TMobile-LTE-short.up")))
    with pytest.raises(ValueError):
        simulate(FixedPolicy(modes, modes.smallest.id), modes, link, fps=0, deadline_ms=50, fallback_ms=100)
    with pytest.raises(ValueError):
        simulate(
            FixedPolicy(modes, modes.smallest.id), modes, link, fps=30, deadline_ms=50, fallback_ms=100, duration_s=0.0
        )
    with pytest.raises(ValueError):
        LinkModel(link.trace, base_rtt_ms=-1)
    r = simulate(OraclePolicy(modes, link, 1 / 30), modes, link, fps=30, deadline_ms=50, fallback_ms=100, duration_s=10)
    assert r.metrics["frames"] == 300 and not math.isnan(r.metrics["hit_rate"])
