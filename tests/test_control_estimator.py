"""Bandwidth estimators: step changes, robustness, guards; the link sampler on a real trace."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_control_common import trace

from edgesplit.control.estimator import EwmaEstimator, HarmonicMeanEstimator, LinkSampler, ScalarEwma
from edgesplit.control.link import FifoLink, LinkModel
from edgesplit.control.modes import ModeSpec
from edgesplit.control.traces import Trace

MBPS = 1e6


def feed(est, rate_bps, n, nbytes=1500):
    for _ in range(n):
        est.update(nbytes, nbytes * 8 / rate_bps)


def test_ewma_step_change_follows_its_definition():
    e = EwmaEstimator(alpha=0.4)
    assert e.estimate_bps() is None
    feed(e, 2 * MBPS, 30)
    assert e.estimate_bps() == pytest.approx(2 * MBPS)
    for k in range(1, 8):  # step down to 0.5: the gap shrinks by (1 - alpha) per sample
        feed(e, 0.5 * MBPS, 1)
        assert e.estimate_bps() == pytest.approx(0.5 * MBPS + 1.5 * MBPS * 0.6**k)
    slow = EwmaEstimator(alpha=0.1)
    feed(slow, 2 * MBPS, 30)
    feed(slow, 0.5 * MBPS, 3)
    assert slow.estimate_bps() > e.estimate_bps()  # smaller alpha, slower reaction


def test_harmonic_mean_step_changes_and_outliers():
    h = HarmonicMeanEstimator(window=5)
    feed(h, 2 * MBPS, 10)
    assert h.estimate_bps() == pytest.approx(2 * MBPS)
    feed(h, 0.2 * MBPS, 1)  # one slow sample: harmonic mean of [2,2,2,2,0.2] = 5 / (4/2 + 5)
    assert h.estimate_bps() == pytest.approx(5 / (4 / 2 + 1 / 0.2) * MBPS)
    arithmetic = (4 * 2 + 0.2) / 5 * MBPS
    assert h.estimate_bps() < 0.5 * arithmetic  # pessimistic at once
    feed(h, 0.2 * MBPS, 4)
    assert h.estimate_bps() == pytest.approx(0.2 * MBPS)  # the window has forgotten the old rate
    h2 = HarmonicMeanEstimator(window=5)
    feed(h2, 1 * MBPS, 5)
    feed(h2, 100 * MBPS, 1)  # one fast outlier barely moves it
    assert h2.estimate_bps() < 1.26 * MBPS
    e = EwmaEstimator(alpha=0.4)
    feed(e, 1 * MBPS, 5)
    feed(e, 100 * MBPS, 1)
    assert e.estimate_bps() > 30 * MBPS  # where the EWMA is thrown


@pytest.mark.parametrize("est", [EwmaEstimator(0.4), HarmonicMeanEstimator(5)], ids=["ewma", "harmonic"])
def test_guards_zero_negative_and_non_finite_link_times(est):
    assert est.update(1000, 0.0) and est.update(1000, -0.003)  # clock granularity; server time > rtt
    assert est.clamped == 2
    cap = 1000 * 8 / est.min_seconds
    assert math.isfinite(est.estimate_bps()) and est.estimate_bps() <= cap
    assert not est.update(1000, float("nan")) and not est.update(1000, float("inf")) and not est.update(0, 0.01)
    assert est.rejected == 3 and est.samples == 2
    est.reset()
    assert est.estimate_bps() is None and est.samples == 0


def test_estimators_reject_bad_parameters():
    with pytest.raises(ValueError):
        EwmaEstimator(alpha=0)
    with pytest.raises(ValueError):
        HarmonicMeanEstimator(window=0)
    with pytest.raises(ValueError):
        EwmaEstimator(min_seconds=0)
    s = ScalarEwma(alpha=0.5, initial=3.0)
    assert s.value == 3.0
    s.update(float("nan"))
    s.update(-1)
    assert s.value == 3.0 and s.n == 0
    s.update(10)
    s.update(20)
    assert s.value == 15.0


def test_link_sampler_recovers_transmit_time_when_requests_queue():
    """30 fps of 1568-byte requests on a 0.3 Mbit/s link: each needs 41.8 ms, frames come every
    33.3 ms, so they queue. The raw link time (rtt - server - base rtt) grows with the queue; the
    sampler's transmit time stays the true 41.8 ms."""
    link = LinkModel(Trace.constant(0.3), base_rtt_ms=20, server_ms=3, encode_ms=0.1)
    mode = ModeSpec(0, "m", 1568, 0.8, 2.0)
    pipe, sampler = FifoLink(link), LinkSampler()
    raw, sampled = [], []
    for i in range(40):
        t_send, _, _, arrival = pipe.send(i / 30, mode)
        raw.append(arrival - t_send - link.after_uplink_s)
        sampled.append(sampler.transmit_seconds(t_send, arrival, link.server_ms / 1000, link.base_rtt_ms / 1000))
    true = 1568 * 8 / 0.3e6
    assert raw[-1] > 5 * true  # the queue shows in the raw link time
    assert np.allclose(sampled, true, rtol=1e-9)


def test_link_sampler_on_a_real_packet_trace_never_beats_capacity():
    """On the real ATT uplink, requests every 50 ms: every sample's throughput is at most what the
    trace offered during that sample's transmission (conservation seen from the agent)."""
    tr = trace("ATT-LTE-driving.up")
    link = LinkModel(tr, base_rtt_ms=20, server_ms=2)
    mode = ModeSpec(0, "m", 1568, 0.8, 1.0)
    pipe, sampler = FifoLink(link), LinkSampler()
    prev_fin = -1.0
    for i in range(400):
        t_send, _, fin, arrival = pipe.send(100 + i * 0.05, mode)
        tx = sampler.transmit_seconds(t_send, arrival, link.server_ms / 1000, link.base_rtt_ms / 1000)
        start = fin - tx
        assert start == pytest.approx(max(t_send, prev_fin), abs=1e-9)
        assert tr.capacity_between(start, fin) >= 1568  # the bytes fitted in what the link offered
        prev_fin = fin
