"""The split planner: its link and compute model, rankings on real measurements and real device
profiles, the command line's errors, and one prediction checked against a real run over a link
shaped by the kernel (skipped where namespaces cannot be made)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgesplit.control.netns import shaping_available
from edgesplit.control.planner import Link, Machine, Option, PlanError, Scenario, Work, plan, predict
from edgesplit.profile.devices import load_profile
from edgesplit.profile.plan_inputs import Timing, bundle_options, scenario

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT / "models" / "cifar10-resnet20-bottlefit"
IMAGENETTE = ROOT / "models" / "imagenette-resnet18-bottlefit"
OK, WHY = shaping_available()
FAST = Timing(runs=5, pace_ms=0.0, warmup=1)


@pytest.fixture(scope="module")
def imagenette_options():
    # real ONNX Runtime timings of the shipped bundle on real Imagenette frames
    options, meta = bundle_options(IMAGENETTE, timing=FAST, frames=4)
    return options, meta


def test_link_counts_segment_headers_acks_reply_and_burst():
    link = Link(2.0, rtt_ms=10.0, mss=1000, per_segment_bytes=50, ack_bytes=60, burst_bytes=500, framing_bytes=20)
    # 2480 + 20 framing = 2500 bytes: 3 segments of headers; of the ACKs for 2 pairs the last rides on the reply
    assert link.wire_bytes(2480) == 2500 + 3 * 50 + 1 * 60
    assert link.wire_bytes(4980) == 5000 + 5 * 50 + 2 * 60
    # reply 80 + 20 = 100 bytes: one segment, its ACK comes after the answer. The request finds the
    # bucket's 500 bytes; the reply finds what refilled while the server computed (250 bytes a ms here)
    request, reply = 2500 + 150 + 60, 100 + 50
    assert link.transfer_ms(2480, 80) == pytest.approx(((request - 500) + reply) * 8 / 2000 + 10.0)
    assert link.transfer_ms(2480, 80, server_ms=0.2) == pytest.approx(
        ((request - 500) + (reply - 50)) * 8 / 2000 + 10.0
    )
    assert link.transfer_ms(2480, 80, server_ms=5.0) == pytest.approx((request - 500) * 8 / 2000 + 10.0)
    assert Link(2.0, burst_bytes=10**6).transfer_ms(2480, 80) == 0.0  # all within the bucket
    # no bucket: every byte at the rate
    plain = Link(2.0, mss=1000, per_segment_bytes=50, ack_bytes=60, framing_bytes=20)
    assert plain.transfer_ms(2480, 80, server_ms=5.0) == pytest.approx((request + reply) * 8 / 2000)


def test_energy_of_hand_computed_split_and_local_options():
    dev = Machine(
        "dev", 10.0, 5.0, active_w=6.4, idle_w=2.7
    )  # also the measuring host: its times are taken as measured
    srv = Machine("srv", 1000.0, 100.0)
    link = Link(1.0, rtt_ms=10.0)  # 125 bytes a ms; no bucket, no ACKs on the bottleneck
    split = Option(
        "s",
        "split",
        payload_bytes=1000,
        header_bytes=40,
        reply_bytes=80,
        preprocess=Work(1.0),
        head=Work(4.0),
        encode=Work(1.0),
    )
    local = Option("l", "local", preprocess=Work(1.0), head=Work(10.0))
    sc = Scenario(dev, srv, dev, link, overhead_ms=0.5)
    # Device: 1 + 4 + 1 = 6 ms at 6.4 W = 38.4 mJ. Link: the request is 1040 + 20 framing + 66 header
    # = 1126 bytes, the reply 80 + 20 + 66 = 166: 1292 / 125 + 10 = 20.336 ms, at idle 2.7 W (no
    # radio figure: an estimate) 54.9072 mJ, at a 1.2 W radio 24.4032 mJ.
    p = predict(split, sc)
    assert (p.device_ms, p.link_ms) == (pytest.approx(6.0), pytest.approx(20.336))
    assert p.energy_mj == pytest.approx(93.3072) and p.energy_estimate
    radio = predict(split, Scenario(dev, srv, dev, link, overhead_ms=0.5, radio_w=1.2))
    assert radio.energy_mj == pytest.approx(62.8032) and not radio.energy_estimate
    on_device = predict(local, sc)  # 11 ms at 6.4 W, nothing sent
    assert on_device.energy_mj == pytest.approx(70.4) and not on_device.energy_estimate


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf")])
def test_link_refuses_a_bandwidth_that_is_not_positive(bad):
    with pytest.raises(PlanError, match="bandwidth must be a positive"):
        Link(bad)


def test_compute_scales_by_roofline_to_other_devices():
    host = Machine.from_profile(load_profile("x86-ci-host"))
    pi4 = Machine.from_profile(load_profile("raspberry-pi-4"))
    h100 = Machine.from_profile(load_profile("h100"))
    conv = Work(2.0, nodes=((4e8, 1e6),))  # compute-bound on every CPU here
    copy = Work(2.0, nodes=((1e3, 4e8),))  # memory-bound
    assert host.time_ms(conv, host) == (2.0, "measured")
    assert pi4.time_ms(conv, host)[0] == pytest.approx(2.0 * 97.4 / 24)  # GFLOPS ratio
    assert pi4.time_ms(copy, host)[0] == pytest.approx(2.0 * 22.1 / 12.8)  # bandwidth ratio
    ms, how = h100.time_ms(conv, host)
    assert how.startswith("estimate") and ms < 0.1
    assert h100.time_ms(Work(1.5, cpu_only=True), host)[0] == 1.5  # a numpy step stays on the CPU


def test_ranking_flips_with_bandwidth(imagenette_options):
    options, meta = imagenette_options
    kinds = {o.kind for o in options}
    assert kinds == {"split", "local", "raw"} and meta["jpeg_bytes_median"] > 5000
    sizes = {o.name: o.payload_bytes for o in options if o.kind == "split"}
    assert sizes == {"c8-b8": 1568, "c8-b4": 784, "c8-b2": 392}

    def best(mbps):
        sc = scenario("raspberry-pi-4", "h100", "x86-ci-host", Link(mbps, rtt_ms=2.0), 0.5, None)
        return plan(options, sc)

    slow, fast = best(0.5), best(500.0)
    # a slow uplink: the JPEG (the earliest cut: everything on the server) is last, and among the
    # bottleneck modes the fewest bytes win
    assert slow[-1].option.startswith("raw") and slow[0].option != "raw (send the JPEG)"
    order = [p.option for p in slow if p.kind == "split"]
    assert order == ["c8-b2", "c8-b4", "c8-b8"]
    assert "link-bound" in next(p for p in slow if p.option == "c8-b8").bound
    # a fast uplink and a fast server: send the frame and compute everything there
    assert fast[0].option.startswith("raw"), [(p.option, p.latency_ms) for p in fast]
    assert "loses on device compute" in next(p for p in fast if p.kind == "local").reason
    # every reason is a breakdown that adds up
    for p in slow + fast:
        assert p.latency_ms == pytest.approx(sum(p.parts_ms.values()))
        assert f"= {p.latency_ms:.2f} ms" in p.reason


def test_energy_objective_uses_profile_power_and_labels_estimates(imagenette_options):
    options, _ = imagenette_options
    sc = scenario("raspberry-pi-4", "h100", "x86-ci-host", Link(1.0, rtt_ms=20.0), 0.5, None)
    preds = plan(options, sc, "energy")
    assert [p.energy_mj for p in preds] == sorted(p.energy_mj for p in preds)
    split = next(p for p in preds if p.option == "c8-b4")
    # the profile's power figures (active 6.4 W, idle 2.7 W); the energy formula is checked on a
    # hand-computed case below
    assert (sc.device.active_w, sc.device.idle_w) == (6.4, 2.7)
    assert split.energy_estimate  # no radio figure: idle power while the bytes go out
    local = next(p for p in preds if p.kind == "local")
    assert local.energy_mj > 0 and not local.energy_estimate
    with_radio = predict(
        next(o for o in options if o.name == "c8-b4"),
        scenario("raspberry-pi-4", "h100", "x86-ci-host", Link(1.0, rtt_ms=20.0), 0.5, 1.2),
    )
    # the same device and link times, the bytes sent at 1.2 W instead of 2.7 W
    assert with_radio.device_ms == pytest.approx(split.device_ms) and with_radio.energy_mj < split.energy_mj
    assert (
        not with_radio.energy_estimate
    )  # sourced device figures, a given radio power: the server's estimates do not count
    with pytest.raises(PlanError, match="no power figures"):
        plan(options, scenario("x86-ci-host", "h100", "x86-ci-host", Link(1.0), 0.5, None), "energy")


def _plan_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgesplit", "plan", *args], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--bundle", str(CIFAR), "--bandwidth-mbps", "2", "--device", "jetson-nanoo"],
            "no device profile 'jetson-nanoo' (known: ",
        ),
        (["--bundle", str(CIFAR), "--bandwidth-mbps", "-3"], "--bandwidth-mbps must be a positive number, got '-3'"),
        (["--bundle", str(CIFAR), "--bandwidth-mbps", "fast"], "--bandwidth-mbps must be a number, got 'fast'"),
        (["--bundle", "/nonexistent/bundle", "--bandwidth-mbps", "2"], "no bundle at /nonexistent/bundle"),
        (["--bundle", str(CIFAR), "--bandwidth-mbps", "2", "--objective", "energy"], "has no power figures"),
        (["--model", "resnet21_cifar", "--bandwidth-mbps", "2"], "unknown zoo model 'resnet21_cifar'"),
    ],
)
def test_cli_errors_are_clear(args, message):
    out = _plan_cli(*args)
    assert out.returncode == 2, out.stdout
    assert message in out.stderr, out.stderr


def test_cli_ranks_a_bundle_as_json():
    out = _plan_cli(
        "--bundle",
        str(CIFAR),
        "--bandwidth-mbps",
        "0.2",
        "--rtt-ms",
        "30",
        "--device",
        "raspberry-pi-5",
        "--server",
        "a100",
        "--runs",
        "5",
        "--pace-ms",
        "0",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["device"] == "raspberry-pi-5" and res["link"]["mbps"] == 0.2
    names = [o["option"] for o in res["options"]]
    assert sorted(names) == sorted(["c12-b8", "c12-b4", "c12-b2", "local (full.onnx on device)", "raw (send the JPEG)"])
    assert [o["rank"] for o in res["options"]] == list(range(1, 6))
    assert res["best"] == names[0] and res["options"][0]["reason"].endswith("best")


@pytest.mark.skipif(not OK and os.geteuid() != 0, reason=f"kernel shaping unavailable: {WHY}")  # root: must run
def test_prediction_matches_a_real_shaped_run(tmp_path):
    """ResNet-20 cut after its last block (64x8x8, 4 kB at 8 bits; random weights, real frames):
    the real server daemon and agent in a namespace whose loopback tbf shapes to 1 Mbit/s, five
    frames. The predicted median latency is within the bench's 20 % target of the measured one."""
    from types import SimpleNamespace

    from edgesplit.bench.plan import BURST_BYTES, run_bench

    a = SimpleNamespace(
        models="resnet20_cifar",
        bundles="",
        cuts="relu_18",
        modes=None,
        bandwidths="1",
        frames=5,
        warmup=2,
        runs=10,
        pace_ms=20.0,
        burst_bytes=BURST_BYTES,
        overhead_ms=0.5,
        cache=str(tmp_path),
    )
    res = run_bench(a)
    assert [(r["option"], r["mbps"]) for r in res["rows"]] == [("cut relu_18", 1.0)]
    r = res["rows"][0]
    # the header differs by the request id's msgpack size only
    assert r["payload_bytes"] == 4096 and abs(r["measured"]["request_bytes"] - r["request_bytes"]) <= 4
    assert r["measured"]["tbf_drops"] == 0 and 5 <= r["measured"]["frames"] <= 20
    assert r["predicted"]["link"] > 0.5 * r["predicted_ms"]  # link-bound: the bytes matter
    assert abs(r["rel_error"]) <= 0.2, r
