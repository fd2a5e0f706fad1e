"""Policies: the deadline-aware controller's choice and hysteresis, Assine et al.'s rule, the
oracle's lookahead; hysteresis against flapping on a real trace."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_control_common import bundle_like_modes, trace

from edgesplit.control.estimator import EwmaEstimator, HarmonicMeanEstimator
from edgesplit.control.link import FifoLink, LinkModel
from edgesplit.control.modes import FALLBACK, ModeSpec, ModesTable
from edgesplit.control.oracle import OraclePolicy
from edgesplit.control.policy import AssinePolicy, DeadlinePolicy, Feedback, FixedPolicy, FrameState
from edgesplit.control.simulator import simulate
from edgesplit.control.traces import Trace

BASE_RTT, SERVER, ENCODE = 20.0, 3.0, 0.2

# A table with an inefficient mode (id 3: more bytes than id 1, less accurate): "most accurate"
# and "most bytes" differ.
MODES = ModesTable(
    [
        ModeSpec(0, "b8", 1600, 0.90, 4.0),
        ModeSpec(1, "b4", 800, 0.89, 4.0),
        ModeSpec(2, "b2", 400, 0.85, 4.0),
        ModeSpec(3, "odd", 1200, 0.86, 5.0),
    ],
    teacher_accuracy=0.91,
)


def idle_feedback(t: float, nbytes: float, bps: float) -> Feedback:
    """A request that found the link idle: link time = bytes / rate + the fixed terms."""
    tx = nbytes * 8 / bps
    return Feedback(
        t_send_s=t,
        t_result_s=t + tx + (BASE_RTT + SERVER) / 1000,
        nbytes=nbytes,
        server_queue_ms=1.0,
        server_compute_ms=SERVER - 1.0,
        encode_ms=ENCODE,
    )


def trained(policy, bps: float, n: int = 10, start: float = 0.0):
    for k in range(n):
        policy.observe(idle_feedback(start + k, 1000, bps))
    return policy


def state(t: float, deadline: float, outstanding=()) -> FrameState:
    return FrameState(now_s=t, deadline_ms=deadline, outstanding=outstanding, base_rtt_ms=BASE_RTT)


def predicted(m: ModeSpec, bps: float) -> float:
    return m.head_ms + ENCODE + m.bytes_per_frame * 8 / bps * 1000 + SERVER + BASE_RTT


@pytest.mark.parametrize("bps", [0.3e6, 1e6, 4e6])
def test_deadline_policy_picks_the_most_accurate_fitting_mode(bps):
    margin = 0.15
    for deadline in np.arange(25.0, 90.0, 2.5):
        p = trained(
            DeadlinePolicy(MODES, HarmonicMeanEstimator(5), margin=margin, local_ms=1e9, base_rtt_ms=BASE_RTT), bps
        )
        d = p.choose(state(100.0, deadline))
        fits = [m for m in MODES if predicted(m, bps) <= (1 - margin) * deadline]
        if fits:
            best = max(fits, key=lambda m: (m.accuracy, -m.bytes_per_frame))
            assert d.mode == best.id, (deadline, d)
            assert d.predicted_ms == pytest.approx(predicted(best, bps))
        else:  # nothing fits: the smallest mode (a sure miss otherwise: the local model is slow)
            assert d.mode == MODES.smallest.id and "nothing fits" in d.reason
        assert d.mode != 3  # never the inefficient mode: b4 is smaller and more accurate


def test_down_at_once_up_after_k_frames_with_extra_margin():
    bps, deadline, K = 1e6, 50.0, 4
    p = trained(
        DeadlinePolicy(MODES, HarmonicMeanEstimator(3), margin=0.1, up_margin=0.1, up_frames=K, base_rtt_ms=BASE_RTT),
        bps,
    )
    # b8 at 1 Mbit/s: 4 + 0.2 + 12.8 + 3 + 20 = 40.0 ms <= (1 - 0.1) x 50: the first choice.
    assert p.choose(state(20.0, deadline)).mode == 0
    # The link drops to 0.3 Mbit/s: b8 needs 69.9 ms, b4 48.5 > 45, b2 37.9: down at once.
    trained(p, 0.3e6, n=3, start=30.0)
    d = p.choose(state(40.0, deadline))
    assert d.mode == 2 and d.reason.startswith("down")
    # Back to 4 Mbit/s: b8 fits with the extra margin (27.2 + 3.2 = 30.4 <= 40), but only after K frames.
    trained(p, 4e6, n=3, start=50.0)
    picks = [p.choose(state(60.0 + i / 30, deadline)).mode for i in range(K + 2)]
    assert picks == [2] * (K - 1) + [0] * 3


def test_first_choice_and_no_hysteresis_variant():
    p = trained(DeadlinePolicy(MODES, EwmaEstimator(0.4), margin=0.1, base_rtt_ms=BASE_RTT), 1e6)
    assert p.choose(state(20.0, 50.0)).mode == 0  # 40.0 ms <= 45: the most accurate fits
    fresh = DeadlinePolicy(MODES, up_frames=1, up_margin=0.0)
    assert "hyst off" in fresh.name
    d = fresh.choose(state(0.0, 50.0))
    assert d.mode == MODES.smallest.id and math.isnan(d.predicted_ms)  # no estimate yet


def test_no_news_is_bad_news_and_outage_fallback_with_probe():
    p = trained(
        DeadlinePolicy(MODES, HarmonicMeanEstimator(5), local_ms=120.0, probe_interval_s=0.19, base_rtt_ms=BASE_RTT),
        2e6,
    )
    assert p.choose(state(20.0, 60.0)).mode == 0

    class Out:
        def __init__(self, t, n):
            self.t_send_s, self.nbytes = t, n

    # A request sent 3 s ago has not come back: the link is taken for dead -> local fallback,
    # without any result having said so. No probe while a request is outstanding.
    stuck = [Out(17.0, 1600)]
    d = p.choose(state(20.0, 60.0, stuck))
    assert d.mode == FALLBACK and d.probe_mode is None and d.predicted_ms > 4 * 120
    # The requests sent before the outage come back one every 3 s: the estimate is about
    # 4 kbit/s. Nothing is outstanding any more: fallback frames probe with the smallest mode,
    # at most every 0.19 s.
    for k in range(5):
        p.observe(Feedback(t_send_s=17.0 + 0.03 * k, t_result_s=20.5 + 3 * k, nbytes=1600, server_compute_ms=SERVER))
    ds = [p.choose(state(33.0 + i / 30, 60.0)) for i in range(12)]
    assert all(x.mode == FALLBACK for x in ds)
    probes = [i for i, x in enumerate(ds) if x.probe_mode is not None]
    assert probes == [0, 6] and ds[0].probe_mode == MODES.smallest.id
    # The probes come back fast: the policy leaves fallback.
    for k in range(5):
        p.observe(idle_feedback(33.5 + 0.1 * k, 400, 2e6))
    d = p.choose(state(34.0, 60.0))
    assert d.mode != FALLBACK and "leave fallback" in d.reason


def test_local_model_that_meets_the_deadline_is_preferred_when_nothing_fits():
    p = trained(DeadlinePolicy(MODES, HarmonicMeanEstimator(5), local_ms=20.0, base_rtt_ms=BASE_RTT), 0.05e6)
    d = p.choose(state(20.0, 60.0))
    assert d.mode == FALLBACK  # a sure hit with the full model's accuracy


def test_assine_policy_matches_its_definition_on_a_real_trace():
    """Feed the policy the reports of requests on the real Verizon uplink; at every step its
    choice must equal: EWMA(alpha 0.4) of throughput, the most accurate mode whose predicted time
    is under 0.8 x deadline, else the smallest mode."""
    tr = trace("Verizon-EVDO-driving.up")
    link = LinkModel(tr, base_rtt_ms=BASE_RTT, server_ms=SERVER, encode_ms=ENCODE)
    pipe = FifoLink(link)
    modes = bundle_like_modes()
    p, deadline = AssinePolicy(modes, base_rtt_ms=BASE_RTT), 60.0
    ewma = None
    rng = np.random.default_rng(1)
    t = 130.0
    for step in range(300):
        d = p.choose(state(t, deadline))
        if ewma is None:
            assert d.mode == modes.smallest.id
        else:
            pred = {m.id: m.head_ms + ENCODE + m.bytes_per_frame * 8 / ewma * 1000 + SERVER + BASE_RTT for m in modes}
            ok = [m for m in modes if pred[m.id] < 0.8 * deadline]
            want = max(ok, key=lambda m: (m.accuracy, -m.bytes_per_frame)).id if ok else modes.smallest.id
            assert d.mode == want, step
        m = modes.by_id[d.mode]
        t_send, _, fin, arrival = pipe.send(t, m)
        p.observe(
            Feedback(
                t_send_s=t_send,
                t_result_s=arrival,
                nbytes=m.bytes_per_frame,
                server_compute_ms=SERVER,
                encode_ms=ENCODE,
            )
        )
        bps = m.bytes_per_frame * 8 / max(fin - t_send, 1e-4)
        ewma = bps if ewma is None else 0.4 * bps + 0.6 * ewma
        t = arrival + rng.uniform(0.05, 0.5)


def test_fixed_policy_always_sends_its_mode():
    p = FixedPolicy(MODES, 2)
    assert {p.choose(state(t, 1.0)).mode for t in range(5)} == {2}
    with pytest.raises(KeyError):
        FixedPolicy(MODES, 9)


def test_oracle_takes_a_smaller_mode_when_a_bigger_one_would_make_later_frames_late():
    """1 Mbit/s, a frame every 2 ms, deadline 13 ms, no fixed terms; b8 takes 12.8 ms, b2 3.2.
    Frame 0 alone is on time with b8, but then frame 1 (at 2 ms) waits until 12.8 ms and is late
    even with b2 (14 ms). The oracle's lookahead sees it; the same oracle without lookahead
    (most accurate on time, frame by frame) does not, and meets fewer deadlines."""
    link = LinkModel(Trace.constant(1.0), base_rtt_ms=0, server_ms=0, encode_ms=0)
    modes = ModesTable(
        [ModeSpec(0, "b8", 1600, 0.9, 0.0), ModeSpec(1, "b4", 800, 0.88, 0.0), ModeSpec(2, "b2", 400, 0.8, 0.0)],
        teacher_accuracy=0.92,
    )
    kw = dict(fps=500, deadline_ms=13.0, fallback_ms=1000, duration_s=0.2)
    assert OraclePolicy(modes, link, 0.002, horizon_frames=0).choose(FrameState(now_s=0.0, deadline_ms=13.0)).mode == 0
    assert OraclePolicy(modes, link, 0.002).choose(FrameState(now_s=0.0, deadline_ms=13.0)).mode != 0
    full = simulate(OraclePolicy(modes, link, 0.002), modes, link, **kw).metrics
    greedy = simulate(OraclePolicy(modes, link, 0.002, horizon_frames=0), modes, link, **kw).metrics
    assert full["hit_rate"] > greedy["hit_rate"]
    for m in modes:
        assert full["hit_rate"] >= simulate(FixedPolicy(modes, m.id), modes, link, **kw).metrics["hit_rate"]


def test_hysteresis_limits_switches_on_a_noisy_real_trace():
    tr = trace("Verizon-EVDO-driving.up")
    modes = bundle_like_modes()
    link = LinkModel(tr, base_rtt_ms=BASE_RTT, server_ms=SERVER, encode_ms=ENCODE)
    fixed = BASE_RTT + SERVER + ENCODE + max(m.head_ms for m in modes)
    deadline = (
        fixed + 2.5 * max(m.bytes_per_frame for m in modes) * 8 / 1e6 * 1000
    )  # the largest mode fits only at good times
    kw = dict(fps=30, deadline_ms=deadline, fallback_ms=3 * deadline, start_s=300.0, duration_s=240.0)
    with_h = simulate(DeadlinePolicy(modes, HarmonicMeanEstimator(5), local_ms=3 * deadline), modes, link, **kw).metrics
    without = simulate(
        DeadlinePolicy(modes, HarmonicMeanEstimator(5), local_ms=3 * deadline, up_frames=1, up_margin=0.0),
        modes,
        link,
        **kw,
    ).metrics
    assert without["switches"] > 200  # the trace is noisy enough to flap
    assert with_h["switches"] < 0.5 * without["switches"]
    assert with_h["hit_rate"] >= without["hit_rate"] - 0.02


def test_packet_link_counts_whole_packets():
    # On a link that serves a packet per delivery opportunity, a 150-byte request takes as long as
    # a 1,400-byte one: a sample of the small one must not read as a slow link, and every
    # sub-packet mode must be predicted to cost the same.
    fluid = DeadlinePolicy(MODES, HarmonicMeanEstimator(5), base_rtt_ms=BASE_RTT)
    packet = DeadlinePolicy(MODES, HarmonicMeanEstimator(5), base_rtt_ms=BASE_RTT, packet_bytes=1500)
    assert "pkt 1500" in packet.name and "pkt" not in fluid.name
    for k in range(6):  # 150 B through one 2 ms opportunity
        fb = Feedback(
            t_send_s=k,
            t_result_s=k + 0.002 + (BASE_RTT + SERVER) / 1000,
            nbytes=150,
            server_queue_ms=1.0,
            server_compute_ms=SERVER - 1.0,
            encode_ms=ENCODE,
        )
        fluid.observe(fb)
        packet.observe(fb)
    assert packet.bandwidth_bps() == pytest.approx(1500 * 8 / 0.002, rel=0.01)
    assert fluid.bandwidth_bps() == pytest.approx(150 * 8 / 0.002, rel=0.01)
    bps = packet.bandwidth_bps()
    # modes of 800 and 1200 B are one packet: the same link time; 1600 B is two
    p = {m.id: packet.predict_ms(m, bps) - m.head_ms for m in MODES}
    assert p[1] == pytest.approx(p[3]) and p[0] - p[1] == pytest.approx(1500 * 8 / bps * 1000)
    with pytest.raises(ValueError, match="packet_bytes"):
        DeadlinePolicy(MODES, packet_bytes=0)


def test_packet_accounting_lifts_accuracy_on_a_real_mahimahi_uplink():
    from edgesplit.control.traces import read_trace
    from edgesplit.data.sources import data_root

    path = data_root() / "traces" / "mahimahi-cellular" / "ATT-LTE-driving.up"
    if not path.is_file():
        pytest.fail(f"shared traces not found under {data_root()} (set EDGESPLIT_DATA)")
    link = LinkModel(read_trace(path), BASE_RTT, SERVER, ENCODE, 0.0)
    assert link.packet_bytes == 1500
    modes = bundle_like_modes()
    acc = {}
    for pkt in (None, 1500):
        pol = DeadlinePolicy(modes, HarmonicMeanEstimator(5), base_rtt_ms=BASE_RTT, local_ms=3.0, packet_bytes=pkt)
        acc[pkt] = simulate(pol, modes, link, fps=30, deadline_ms=60.0, fallback_ms=3.0, duration_s=240.0).metrics
    assert acc[1500]["hit_rate"] >= acc[None]["hit_rate"] - 0.005
    assert acc[1500]["accuracy"] > acc[None]["accuracy"]
