"""Every shipped device profile loads, cites a source for every figure, and bad profiles are refused."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from edgesplit.profile.devices import ProfileError, list_profiles, load_profile, parse_profile, profiles_dir

EXPECTED = {
    "jetson-nano",
    "jetson-orin-nano",
    "jetson-agx-orin",
    "raspberry-pi-4",
    "raspberry-pi-5",
    "a100",
    "h100",
    "h200",
}


def test_the_devices_the_project_plans_for_are_all_there():
    assert EXPECTED <= set(list_profiles())


@pytest.mark.parametrize("name", list_profiles())
def test_profile_loads_and_every_figure_is_sourced(name):
    p = load_profile(name)
    assert p.name == name and p.path.name == f"{name}.yaml"
    for key, f in p.figures.items():
        cite = p.citation(key)
        assert cite and (f.source in p.sources or cite.split(":")[0] in ("derived", "estimate", "measured"))
    # what the planner reads from every profile
    assert p.get("memory_gb", 0) > 0
    if p.kind == "edge":
        assert p.get("power_idle_w") is not None and p.get("cpu_cores", 0) >= 1
    if p.kind == "server":
        assert p.get("gpu_fp32_tflops", 0) > 0 and "nvml" in p.samplers


def test_orders_of_magnitude_are_sane():
    nano, agx, h100 = load_profile("jetson-nano"), load_profile("jetson-agx-orin"), load_profile("h100")
    assert nano.value("gpu_fp32_tflops") < agx.value("gpu_fp32_tflops") < h100.value("gpu_fp32_tflops")
    assert (
        nano.value("memory_bandwidth_gbps") < agx.value("memory_bandwidth_gbps") < h100.value("memory_bandwidth_gbps")
    )


def _base():
    return yaml.safe_load((profiles_dir() / "raspberry-pi-5.yaml").read_text())


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(flops=1), "unknown keys"),
        (lambda d: d.update(schema=2), "schema"),
        (lambda d: d.update(kind="phone"), "kind"),
        (lambda d: d.update(samplers=["powermeter"]), "unknown samplers"),
        (lambda d: d["figures"]["cpu_cores"].update(source="somewhere"), "source"),
        (lambda d: d["figures"]["cpu_cores"].update(value="four"), "number"),
        (lambda d: d["figures"]["cpu_cores"].update(value=-4), "negative"),
        (lambda d: d["figures"].update(extra={"value": 1}), "value: ..., source"),
        (lambda d: d["sources"].update(orphan="a paper nobody cites"), "cited by no figure"),
    ],
)
def test_malformed_profiles_are_refused_with_the_reason(mutate, message):
    d = copy.deepcopy(_base())
    mutate(d)
    with pytest.raises(ProfileError, match=message):
        parse_profile(d)


def test_unknown_profile_and_missing_figure_name_what_exists():
    with pytest.raises(ProfileError, match="known: .*jetson-nano"):
        load_profile("jetson-tx2")
    with pytest.raises(ProfileError, match="has no figure 'gpu_fp32_tflops'"):
        load_profile("raspberry-pi-4").value("gpu_fp32_tflops")


def test_a_wheel_carries_every_device_profile(tmp_path):
    """A device installs edgesplit from a wheel, not a checkout: the profiles must travel with it
    (pyproject data-files), where profiles_dir() looks when no checkout is beside the package."""
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).resolve().parents[1]
    import importlib.util

    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(root), "-w", str(tmp_path)]
    if importlib.util.find_spec("setuptools") is not None:  # else pip fetches it into an isolated build
        cmd.append("--no-build-isolation")
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("edgesplit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {Path(n).stem for n in names if "/data/share/edgesplit/device_profiles/" in n and n.endswith(".yaml")}
    assert shipped == {p.stem for p in (root / "device_profiles").glob("*.yaml")} and "raspberry-pi-4" in shipped
