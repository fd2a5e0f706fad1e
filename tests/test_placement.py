"""ED-ViT sub-model placement (edgesplit/control/placement.py): greedy vs the exact optimum, memory
budgets, clear refusals, and the scatter latency model on hand-computed cases."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest

from edgesplit.control.placement import (
    Device,
    PlacementError,
    SubModel,
    best_placement,
    greedy_placement,
    predict_scatter,
    time_table,
)
from edgesplit.control.planner import Link, Machine, Work
from edgesplit.profile.devices import load_profile

HOST = Machine("host", gflops=100.0, mem_gbps=20.0)


def _subs(ms: list[float], mem: list[float] | None = None) -> list[SubModel]:
    mem = mem or [1.0] * len(ms)
    return [SubModel(f"s{i}", Work(t), m) for i, (t, m) in enumerate(zip(ms, mem))]


def _devices(n: int, mem: float = 100.0) -> list[Device]:
    return [Device(Machine(f"d{i}", 10.0, 10.0), mem) for i in range(n)]


def _brute_force(times, mem, budgets):
    best = None
    n, m = len(times), len(budgets)
    for assign in itertools.product(range(m), repeat=n):
        used = [0.0] * m
        load = [0.0] * m
        for i, d in enumerate(assign):
            used[d] += mem[i]
            load[d] += times[i][d]
        if all(u <= b for u, b in zip(used, budgets)):
            best = max(load) if best is None else min(best, max(load))
    return best


def test_lpt_counterexample_greedy_is_seven_where_the_optimum_is_six():
    # Graham's classic case on two identical machines: jobs 3,3,2,2,2. LPT puts 3|3, then 2 on
    # either, then 2|2 -> loads 7 and 5; the optimum is 3+3 | 2+2+2 = 6.
    subs, devs = _subs([3, 3, 2, 2, 2]), _devices(2)
    times = [[s.work.host_ms] * 2 for s in subs]
    g, b = greedy_placement(subs, devs, times), best_placement(subs, devs, times)
    assert g.makespan_ms == 7.0
    assert b.makespan_ms == 6.0
    assert sorted(sorted(b.on_device(d)) for d in range(2)) == [[0, 1], [2, 3, 4]]


def test_heterogeneous_devices_take_work_in_proportion_to_speed():
    # device 1 is twice as fast: four equal sub-models of 4 ms there, 8 ms on device 0. Splits
    # (slow|fast): 0|4 -> 16, 1|3 -> max(8, 12) = 12, 2|2 -> max(16, 8) = 16. The optimum is 1|3.
    subs = _subs([4, 4, 4, 4])
    times = [[8.0, 4.0] for _ in subs]
    b = best_placement(subs, _devices(2), times)
    assert b.makespan_ms == 12.0
    assert len(b.on_device(0)) == 1 and len(b.on_device(1)) == 3


def test_exact_search_agrees_with_brute_force_and_greedy_never_beats_it():
    rng = random.Random(7)
    gaps = []
    for _ in range(150):
        n, m = rng.randint(2, 6), rng.randint(2, 4)
        times = [[round(rng.uniform(1, 20), 2) for _ in range(m)] for _ in range(n)]
        mem = [rng.choice([1.0, 2.0, 3.0]) for _ in range(n)]
        budgets = [rng.choice([3.0, 4.0, 6.0, 10.0]) for _ in range(m)]
        subs = _subs([t[0] for t in times], mem)
        devs = [Device(Machine(f"d{j}", 10.0, 10.0), budgets[j]) for j in range(m)]
        expected = _brute_force(times, mem, budgets)
        if expected is None:
            with pytest.raises(PlacementError):
                best_placement(subs, devs, times)
            continue
        b = best_placement(subs, devs, times)
        assert b.makespan_ms == pytest.approx(expected)
        for d in range(m):  # the returned assignment is feasible and its loads are what it says
            assert sum(mem[i] for i in b.on_device(d)) <= budgets[d]
            assert b.device_ms[d] == pytest.approx(sum(times[i][d] for i in b.on_device(d)))
        try:
            g = greedy_placement(subs, devs, times)
        except PlacementError:
            continue  # greedy can miss a packing that exists; the exact search found it
        assert g.makespan_ms >= b.makespan_ms - 1e-9
        gaps.append(g.makespan_ms / b.makespan_ms)
    assert len(gaps) > 50  # most random cases are feasible for both


def test_memory_budget_refusals_name_the_sub_model():
    subs = _subs([5, 5], mem=[50.0, 300.0])
    with pytest.raises(PlacementError, match=r"'s1' needs 300.0 MB .*largest budget 200.0 MB"):
        greedy_placement(subs, _devices(2, mem=200.0), [[5, 5], [5, 5]])
    with pytest.raises(PlacementError, match="need 300.0 MB together and the devices have 280.0 MB"):
        best_placement(_subs([1, 1, 1], mem=[100.0] * 3), _devices(2, mem=140.0), [[1, 1]] * 3)
    # enough memory in total, but three 100 MB sub-models do not pack into two 150 MB devices
    with pytest.raises(PlacementError, match="no assignment fits"):
        best_placement(_subs([1, 1, 1], mem=[100.0] * 3), _devices(2, mem=150.0), [[1, 1]] * 3)
    with pytest.raises(PlacementError, match="no sub-models"):
        greedy_placement([], _devices(1), [])
    with pytest.raises(PlacementError, match="too many"):
        best_placement(_subs([1] * 12), _devices(6), [[1] * 6] * 12, max_cases=10_000)


def test_time_table_scales_by_the_device_profiles_roofline():
    pi4, nano = Machine.from_profile(load_profile("raspberry-pi-4")), Machine.from_profile(load_profile("jetson-nano"))
    work = Work(10.0, flops=2e9, mem_bytes=1e6)  # compute-bound on every device here
    t = time_table([SubModel("s", work, 1.0)], [Device(pi4, 100), Device(nano, 100)], HOST)
    # on a CPU device: host time x (its roofline / host's) = 10 ms x (2e9/24e9) / (2e9/100e9)
    assert t[0][0] == pytest.approx(10.0 * 100.0 / pi4.gflops)
    assert t[0][1] > 0


def test_scatter_latency_on_a_hand_computed_case():
    # 10 Mbit/s LAN (1250 bytes/ms), RTT 2 ms, no ACK or framing overhead to keep the sums exact.
    link = Link(10.0, rtt_ms=2.0, per_segment_bytes=0, framing_bytes=0)
    subs = [SubModel("a", Work(30.0), 1.0, feature_bytes=1250), SubModel("b", Work(10.0), 1.0, feature_bytes=2500)]
    devs = _devices(2)
    placement = best_placement(subs, devs, [[30.0, 30.0], [10.0, 10.0]])
    p = predict_scatter(placement, subs, input_bytes=12_500, link=link, fusion_ms=0.5)
    # slowest device first: input 10 ms, +1 ms propagation, 30 ms compute, 1 ms back + 1 ms = 43
    # second device: inputs 20 ms, +1, 10 compute, 2 ms back + 1 = 34; latency = 43 + 0.5 fusion
    assert sorted(p.device_finish_ms) == pytest.approx([34.0, 43.0])
    assert p.input_ms == pytest.approx(20.0)
    assert p.latency_ms == pytest.approx(43.5)


# -- edgesplit plan --devices on a real ED-ViT bundle --------------------------------------------
@pytest.fixture(scope="module")
def heavy_full_bundle(tmp_path_factory):
    """The fixture ED-ViT bundle (two small sub-models) with a full ViT much larger than either, as
    ED-ViT's pruned sub-models are against their teacher: real ONNX files throughout."""
    import dataclasses
    import json

    import torch
    from edvit_fixtures import SIDE, TINY, build_edvit_bundle

    from edgesplit.builder.zoo.vit import VisionTransformer
    from edgesplit.bundle import sha256_file
    from edgesplit.families.edvit.export import export_graph

    root = build_edvit_bundle(tmp_path_factory.mktemp("edvit") / "b", n=2)
    big = dataclasses.replace(TINY, dim=64, depth=6, heads=4, mlp_hidden=256, qk_dim=16, v_dim=16)
    torch.manual_seed(1)
    full = root / "full.onnx"
    export_graph(VisionTransformer(big, 10), (torch.randn(2, 3, SIDE, SIDE),), full, ["input"], ["logits"])
    m = json.loads((root / "manifest.json").read_text())
    m["files"]["full"] = {"path": "full.onnx", "sha256": sha256_file(full), "bytes": full.stat().st_size}
    (root / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
    return root


def _wire_bytes(message: int) -> int:
    # 20 bytes of ZeroMQ framing, then 66 bytes of TCP/IP/link headers per 1448-byte segment
    m = message + 20
    return m + 66 * -(-m // 1448)


def test_scatter_plan_flips_from_local_on_a_slow_lan_to_edvit_on_a_fast_one(heavy_full_bundle):
    from edgesplit.profile.plan_inputs import Timing
    from edgesplit.profile.plan_scatter import device_set, plan_scatter, scatter_inputs

    inputs = scatter_inputs(heavy_full_bundle, timing=Timing(runs=5, pace_ms=0.0, warmup=1), frames=4)
    host = Machine.from_profile(load_profile("x86-ci-host"))
    pi4 = device_set(["raspberry-pi-4", "raspberry-pi-4"])
    slow, fast = Link(1.0, rtt_ms=1.0), Link(1000.0, rtt_ms=1.0)
    by_lan = {}
    for name, lan in (("slow", slow), ("fast", fast)):
        ranked = plan_scatter(inputs, pi4, host, lan)
        by_lan[name] = {v.name.split(" (")[0] + (" jpeg" if "JPEG" in v.name else ""): v for v in ranked}
        by_lan[name]["_first"] = ranked[0]
    # the full model is many times one sub-model's work: what a split has to win
    assert inputs.local.head.flops > 5 * max(s.work.flops for s in inputs.subs)
    assert inputs.jpeg_bytes < inputs.tensor_bytes  # a 32-px JPEG is smaller than its float32 tensor

    # local does not touch the LAN: the same figure on both, the Pi's preprocess + full model
    pi = pi4[0].machine
    local = pi.time_ms(inputs.local.preprocess, host)[0] + pi.time_ms(inputs.local.head, host)[0]
    for lan in ("slow", "fast"):
        assert by_lan[lan]["local"].latency_ms == pytest.approx(local)
    # 1 Mbit/s: local wins; ED-ViT waits at least for its one input over the LAN (the camera runs
    # the other sub-model itself): bytes x 8 / 1000 ms
    assert by_lan["slow"]["_first"].kind == "local"
    assert by_lan["slow"]["edvit jpeg"].latency_ms > inputs.jpeg_bytes * 8 / 1000
    assert by_lan["slow"]["edvit jpeg"].latency_ms < by_lan["slow"]["edvit"].latency_ms  # fewer bytes
    # 1000 Mbit/s: ED-ViT wins, sub-models in parallel on the two Pis
    assert by_lan["fast"]["_first"].kind == "edvit"
    assert by_lan["fast"]["_first"].latency_ms < local
    # the only difference between the two LANs is the remote device's input and features on the wire
    feature = max(s.feature_bytes for s in inputs.subs)
    on_wire = _wire_bytes(inputs.jpeg_bytes) + _wire_bytes(feature)
    gap = by_lan["slow"]["edvit jpeg"].latency_ms - by_lan["fast"]["edvit jpeg"].latency_ms
    assert gap == pytest.approx(on_wire * 8 * (1 / 1000 - 1 / 1e6))
    # two equal sub-models on two equal devices: one each, and the greedy rule is the optimum
    v = by_lan["fast"]["edvit jpeg"]
    assert sorted(v.detail["placement"].values()) == ["raspberry-pi-4#0", "raspberry-pi-4#1"]
    assert v.detail["optimal"]["latency_ms"] == pytest.approx(v.latency_ms)


def test_plan_cli_devices_json_and_refusals(heavy_full_bundle, tmp_path):
    import json
    import subprocess
    import sys

    def plan(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "edgesplit", "plan", "--runs", "3", "--pace-ms", "0", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    lan = ["--bandwidth-mbps", "1000", "--rtt-ms", "1"]
    r = plan("--bundle", str(heavy_full_bundle), "--devices", "raspberry-pi-4,raspberry-pi-4", *lan, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["camera"] == "raspberry-pi-4" and out["uplink"] is None
    assert {o["kind"] for o in out["options"]} == {"edvit", "local"}  # no uplink: raw not ranked
    assert out["best"] == out["options"][0]["name"]
    r = plan("--bundle", str(heavy_full_bundle), "--devices", "raspberry-pi-4", *lan)
    r2 = plan(
        "--bundle", str(heavy_full_bundle), "--devices", "raspberry-pi-4", *lan, "--uplink-mbps", "10",
        "--server", "a100", "--json",
    )  # fmt: skip
    assert r.returncode == 0 and "local (full.onnx on raspberry-pi-4)" in r.stdout
    assert "raw" in {o["kind"] for o in json.loads(r2.stdout)["options"]}
    # refusals: a scatter bundle without devices, an unknown device, devices for a head-tail bundle
    r = plan("--bundle", str(heavy_full_bundle), *lan)
    assert r.returncode == 2 and "scatter (ED-ViT) bundle" in r.stderr and "--devices" in r.stderr
    r = plan("--bundle", str(heavy_full_bundle), "--devices", "raspberry-pi-4,no-such-device", *lan)
    assert r.returncode == 2 and "no-such-device" in r.stderr
    cnn = Path(__file__).resolve().parents[1] / "models" / "cifar10-resnet20-bottlefit"
    r = plan("--bundle", str(cnn), "--devices", "raspberry-pi-4", *lan)
    assert r.returncode == 2 and "not a scatter bundle" in r.stderr
