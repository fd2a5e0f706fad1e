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


@pytest.mark.parametrize("figure", ["cpu_fp32_gflops", "memory_bandwidth_gbps"])
def test_committed_figures_are_in_a_sane_range(figure):
    v = load_profile("x86-ci-host").value(figure)
    assert 0.1 < v < 100_000
