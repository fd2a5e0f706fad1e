"""`edgesplit bench plan --overhead-ms probe`: the planner's runtime-overhead term is measured on
another option than the one each prediction is judged against (a real shaped namespace, the real
daemon and agent, the shipped CIFAR-10 bundle's two extreme modes)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from edgesplit.bench.plan import BURST_BYTES, overhead_for, run_bench
from edgesplit.control.netns import shaping_available

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT / "models" / "cifar10-resnet20-bottlefit"
OK, WHY = shaping_available()


def test_overhead_for_never_picks_the_option_itself():
    probes = [{"option": "a", "overhead_ms": 0.4}, {"option": "b", "overhead_ms": 0.6}]
    assert overhead_for("a", probes)["option"] == "b" and overhead_for("b", probes)["option"] == "a"
    assert overhead_for("c", probes)["option"] == "a"


@pytest.mark.skipif(not OK and os.geteuid() != 0, reason=f"kernel shaping unavailable: {WHY}")  # root: must run
def test_probed_overhead_comes_from_another_option(tmp_path):
    a = SimpleNamespace(
        models="",
        bundles=str(CIFAR),
        cuts="",
        modes="0,2",
        bandwidths="2",
        frames=3,
        warmup=1,
        runs=5,
        pace_ms=10.0,
        burst_bytes=BURST_BYTES,
        overhead_ms="probe",
        cache=str(tmp_path),
    )
    res = run_bench(a)
    probes = {p["option"]: p for p in res["overhead_probes"]}
    rows = {r["option"]: r for r in res["rows"]}
    assert len(probes) == 2 and set(probes) == set(rows)  # two options: each is the other's probe
    for label, r in rows.items():
        assert r["overhead_probed_on"] != label and r["overhead_ms"] == probes[r["overhead_probed_on"]]["overhead_ms"]
    assert "never its own" in res["overhead_source"]
    one = SimpleNamespace(**{**vars(a), "modes": "0"})
    with pytest.raises(SystemExit, match="at least two options"):
        run_bench(one)
