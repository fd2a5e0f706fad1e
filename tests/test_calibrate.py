"""``edgesplit profile calibrate`` measures this machine and writes a profile that loads."""

from __future__ import annotations

import pytest
import yaml

from edgesplit.profile.cli import profile_main
from edgesplit.profile.devices import load_profile
from edgesplit.profile.power.samplers import detect_sampler

TINY = ["--sizes", "64,96", "--bandwidth-mib", "4", "--ort-runs", "5"]


def test_calibrate_with_tiny_sizes_writes_a_valid_host_profile(tmp_path, capsys):
    out = tmp_path / "this-host.yaml"
    assert profile_main(["calibrate", "--out", str(out), *TINY]) == 0
    p = load_profile(out)  # validated by the same loader as the shipped profiles
    assert p.name == "this-host" and p.kind == "host"
    for key in ("cpu_cores", "cpu_fp32_gflops", "memory_gb", "memory_bandwidth_gbps", "ort_reference_ms"):
        assert p.value(key) > 0
        assert p.figures[key].source.startswith("measured: edgesplit profile calibrate ")
    assert "n=64/96" in p.citation("cpu_fp32_gflops")
    if detect_sampler()[0] is None:  # no sensor: no power figures, not invented ones
        assert p.samplers == () and not any(k.startswith("power_") for k in p.figures)
    assert "written:" in capsys.readouterr().out


def test_calibrate_refuses_to_overwrite_and_bad_sizes(tmp_path):
    out = tmp_path / "h.yaml"
    out.write_text("keep me\n")
    with pytest.raises(SystemExit, match="exists"):
        profile_main(["calibrate", "--out", str(out), *TINY])
    assert out.read_text() == "keep me\n"
    with pytest.raises(SystemExit, match="invalid literal"):
        profile_main(["calibrate", "--out", str(tmp_path / "g.yaml"), "--sizes", "big"])


def test_committed_ci_host_profile_is_a_measured_host():
    p = load_profile("x86-ci-host")
    assert p.kind == "host"
    assert all(f.source.startswith("measured: ") for f in p.figures.values())
    assert yaml.safe_load(p.path.read_text())["figures"]["cpu_cores"]["value"] >= 1


# What one x86-64 core can do (calibrate runs one BLAS thread and one numpy copy): sgemm at least
# SSE2's 4 fp32 lanes x (mul + add) at 1 GHz = 8 GFLOPS, at most AVX-512's 2 FMA units x 16 lanes x
# 2 FLOP at 6 GHz = 384 GFLOPS; a copy at least one DDR3 channel's worth (read + write, 4 GB/s), at
# most what one core's outstanding cache-line misses allow (under 100 GB/s on any x86 core). A
# figure outside is a unit or a thread-count error, not a machine.
@pytest.mark.parametrize("figure, low, high", [("cpu_fp32_gflops", 8, 384), ("memory_bandwidth_gbps", 4, 100)])
def test_committed_figures_are_possible_for_one_x86_core(figure, low, high):
    p = load_profile("x86-ci-host")
    assert low <= p.value(figure) <= high
    assert "OMP_NUM_THREADS=1" in p.figures["cpu_fp32_gflops"].source  # one BLAS thread, as the bounds assume
