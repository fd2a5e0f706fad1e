"""`edgesplit bench adapt --sim`: the controller and its baselines on a real trace, via the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgesplit.bench.adapt import verdict
from edgesplit.control.traces import traces_dir

ROOT = Path(__file__).resolve().parents[1]
TRACE = traces_dir() / "mahimahi-cellular" / "Verizon-EVDO-driving.up"


def test_bench_adapt_sim_reports_every_policy_on_a_real_trace():
    assert TRACE.is_file(), f"shared trace not found: {TRACE} (set EDGESPLIT_DATA)"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgesplit",
            "bench",
            "adapt",
            "--trace",
            str(TRACE),
            "--deadline-ms",
            "100",
            "--duration-s",
            "120",
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout)
    assert r["how"] == "sim" and r["bundle"] == "cifar10-resnet20-bottlefit" and 0 < r["fallback_ms"] < 100
    names = list(r["policies"])
    assert {"fixed:c12-b8", "fixed:c12-b4", "fixed:c12-b2"} <= set(names)
    assert any(n.startswith("assine") for n in names) and any(n.startswith("oracle") for n in names)
    for m in r["policies"].values():
        assert m["frames"] == 120 * 30
        assert 0 <= m["hit_rate"] <= 1 and 0.7 < m["accuracy"] < 0.9
        for k in ("bytes_per_frame", "switches", "fallbacks"):
            assert k in m
    oracle = next(m for n, m in r["policies"].items() if n.startswith("oracle"))
    # the oracle knows the trace: no policy meets more deadlines than it does
    assert all(m["hit_rate"] <= oracle["hit_rate"] + 1e-9 for m in r["policies"].values())
    # this stretch of the EVDO trace has outages: every fixed mode misses some frames
    assert all(r["policies"][f"fixed:{n}"]["hit_rate"] < 0.99 for n in ("c12-b8", "c12-b4", "c12-b2"))
    v = r["verdict"]
    assert v["controller"].startswith("deadline(harmonic") and set(v["ahead_of"]) == {
        n for n in names if n.startswith(("fixed", "assine"))
    }


def test_verdict_compares_on_hit_rate_and_accuracy():
    pol = {
        "deadline(harmonic(5))": {"hit_rate": 0.995, "accuracy": 0.81, "timely_accuracy": 0.80},
        "fixed:a": {"hit_rate": 0.90, "accuracy": 0.80},
        "fixed:b": {"hit_rate": 0.999, "accuracy": 0.82},
        "oracle": {"hit_rate": 1.0, "accuracy": 0.815},
    }
    v = verdict(pol, 100.0)
    assert v["ahead_of"] == {"fixed:a": True, "fixed:b": False}
    assert v["hit_rate_ge_0.99"] and v["within_1pt_of_oracle"] and v["ahead_of_all"] is False


# -- bench adapt --live: the simulator's inputs are fitted apart from the runs it is judged on --------


def test_calibration_fits_on_the_extreme_modes_at_a_rate_the_largest_leaves_mostly_idle():
    from edgesplit.bench.adapt_live import calibration_modes, calibration_schedule
    from edgesplit.control.modes import modes_from_manifest
    from edgesplit.control.traces import Trace

    modes = modes_from_manifest(ROOT / "models" / "cifar10-resnet20-bottlefit")  # 768, 384, 192 bytes
    assert calibration_modes(modes) == [0, 2]
    # 768 B x 8 x 10 fps = 0.06144 Mbit/s; four times that exceeds the 0.1 Mbit/s window's mean
    slow = calibration_schedule(Trace.constant(0.1), modes, fps=10.0, seconds=4.0)
    assert slow.mbps_between(0.0, 4.0) == pytest.approx(0.24576) and slow.period_s == 4.0
    fast = calibration_schedule(Trace.constant(2.0), modes, fps=10.0, seconds=4.0)
    assert fast.mbps_between(0.0, 4.0) == pytest.approx(2.0)


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")  # as root (CI) it must run
def test_live_simulator_inputs_come_from_calibration_runs():
    from edgesplit.bench.adapt_live import run_live
    from edgesplit.control.traces import Trace
    from edgesplit.loopback import free_port

    res = run_live(
        ROOT / "models" / "cifar10-resnet20-bottlefit",
        Trace.constant(0.3),
        100.0,
        10.0,
        policies=["fixed:1"],
        duration_s=4.0,
        calibration_s=3.0,
        port=free_port(),
    )
    ((name, m),) = res.items()
    assert name == "fixed:c12-b4" and m["frames"] == 40
    sim = m["sim"]
    # fitted on fixed:0 and fixed:2 at a constant rate before the judged run (fixed:1 on the trace)
    assert sim["fitted_on"].startswith(
        "link cost and server time: calibration runs fixed:0, fixed:2 at a constant 0.3 Mbit/s"
    )
    assert sim["server_ms"] > 0 and sim["device_ms"] > 0 and "full.onnx timed alone" in sim["fitted_on"]
