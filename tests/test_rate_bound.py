"""``edgesplit bench rate-bound``: the per-frame oracle densities a hyperprior could at best reach,
against the tables an ans bundle ships, on real frames."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from edgesplit.bench.rate_bound import _laplace_bits, frame_bits

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgesplit", *args], capture_output=True, text=True, timeout=300)


def test_a_frames_own_histogram_never_codes_longer_than_shared_tables():
    rng = np.random.default_rng(0)
    offsets = (-4, -4)
    freqs = (np.array([1, 2, 8, 20, 40, 20, 8, 2, 1]), np.array([9, 9, 9, 9, 9, 9, 9, 9, 9]))
    for _ in range(20):
        k = rng.integers(-3, 4, size=(2, 4, 4))
        bits = frame_bits(k, offsets, freqs)
        assert bits["empirical"] <= bits["shipped"] + 1e-9
        assert bits["quadrants"] == 8
    # a constant channel costs nothing under its own histogram, log2(9) a symbol under uniform tables
    k = np.zeros((2, 4, 4), np.int64)
    bits = frame_bits(k, offsets, freqs)
    assert bits["empirical"] == 0
    assert np.isclose(bits["shipped"], 16 * -np.log2(40 / 102) + 16 * np.log2(9))


def test_laplace_bits_match_the_closed_form():
    v = np.array([0.0, 1.0, -1.0, 0.0])  # median 0, mean |v| 0.5
    b = 0.5
    p0 = 1 - np.exp(-0.5 / b)
    p1 = 0.5 * (np.exp(-0.5 / b) - np.exp(-1.5 / b))
    assert np.isclose(_laplace_bits(v), -2 * np.log2(p0) - 2 * np.log2(p1))


def test_rate_bound_on_the_shipped_entropy_bundle():
    out = run_cli(
        "bench", "rate-bound", "--bundle", str(REPO / "models/cifar10-resnet20-entropy"),
        "--data", "cifar10:test", "--frames", "64", "--json",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["frames"] == 64 and r["symbols_per_frame"] == 12 * 8 * 8
    o = r["oracles"]
    assert o["empirical"]["bytes_mean"] < r["shipped_tables_bytes_mean"]
    assert o["laplace_channel"]["side_bytes"] == 12 * 4 / 8 and o["laplace_quadrant"]["side_scales"] == 48
    best = max(o[k]["net_saving_bytes"] for k in ("laplace_channel", "laplace_quadrant"))
    assert np.isclose(r["best_net_saving_bytes"], best)
    assert r["verdict"].startswith("at most" if best > 0 else "a hyperprior cannot pay")
    for k in ("laplace_channel", "laplace_quadrant"):
        gain = r["shipped_tables_bytes_mean"] - o[k]["bytes_mean"]
        assert np.isclose(o[k]["net_saving_bytes"], gain - o[k]["side_bytes"])


def test_rate_bound_refuses_a_mode_without_tables():
    out = run_cli(
        "bench", "rate-bound", "--bundle", str(REPO / "models/cifar10-resnet20-bottlefit"),
        "--data", "cifar10:test", "--frames", "8", "--json",
    )  # fmt: skip
    assert out.returncode != 0 and "is not an ans mode" in out.stderr
