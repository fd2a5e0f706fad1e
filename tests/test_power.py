"""Power sensors: parsers on real captured output, sysfs readers on sysfs-shaped trees, the
sampling process, trapezoid integration, and ``edgesplit profile power`` (estimate sampler here)."""

from __future__ import annotations

import importlib.util
import os
import threading
import time
from pathlib import Path

import pytest
from conftest import CIFAR_TEST

from edgesplit.profile.cli import profile_main
from edgesplit.profile.devices import load_profile, parse_profile
from edgesplit.profile.power import PowerError, SamplingProcess, energy_j, make_sampler
from edgesplit.profile.power.estimate import power_model
from edgesplit.profile.power.ina3221 import Ina3221Sampler, find_channels, read_ina3221
from edgesplit.profile.power.measure import measure_power
from edgesplit.profile.power.rapl import RaplSampler, counter_delta
from edgesplit.profile.power.tegrastats import parse_tegrastats_line
from edgesplit.profile.power.vcgencmd import parse_pmic_read_adc

DATA = Path(__file__).parent / "data" / "power"


def _line(name: str) -> str:
    return (DATA / name).read_text()


# -- tegrastats, several L4T releases ------------------------------------------------------------
def test_tegrastats_r32_nano_uses_the_input_rail_instant_value():
    r = parse_tegrastats_line(_line("tegrastats_r32_nano.txt"))
    assert r.rails == {"POM_5V_IN": 0.9, "POM_5V_GPU": 0.0, "POM_5V_CPU": 0.123}
    assert r.watts == 0.9 and r.total_rule == "input rail POM_5V_IN" and r.timestamp is None


def test_tegrastats_tx1_ignores_clocks_and_memory_that_look_like_rails():
    r = parse_tegrastats_line(_line("tegrastats_r28_tx1.txt"))
    assert set(r.rails) == {"VDD_IN", "VDD_CPU", "VDD_GPU"}  # not APE 25 (MHz), RAM/IRAM (MB, kB)
    assert r.watts == pytest.approx(2.532)


def test_tegrastats_agx_xavier_without_an_input_rail_sums_the_rails():
    r = parse_tegrastats_line(_line("tegrastats_r32_agx_xavier.txt"))
    assert set(r.rails) == {"GPU", "CPU", "SOC", "CV", "VDDRQ", "SYS5V"}
    assert r.total_rule == "sum of rails" and r.watts == pytest.approx(0.216 + 0.864 + 0.144 + 1.889)


def test_tegrastats_r35_instant_only_mw():
    r = parse_tegrastats_line(_line("tegrastats_r35_orin_nano.txt"))
    assert r.rails == pytest.approx({"VDD_IN": 5.765, "VDD_CPU_GPU_CV": 1.548, "VDD_SOC": 1.497})
    assert r.watts == pytest.approx(5.765)


def test_tegrastats_r36_leading_date_and_mw_pairs():
    r = parse_tegrastats_line(_line("tegrastats_r36_dated.txt"))
    assert r.timestamp == "11-27-2026 12:00:00"
    assert r.rails == pytest.approx({"VDD_IN": 5.123, "VDD_CPU_GPU_CV": 1.234, "VDD_SOC": 1.456})


def test_tegrastats_line_without_rails_is_refused():
    with pytest.raises(PowerError, match="no power rails"):
        parse_tegrastats_line("RAM 613/3964MB (lfb 634x4MB) CPU [2%@102] APE 25")


# -- Raspberry Pi 5 PMIC -------------------------------------------------------------------------
def test_pmic_read_adc_sums_v_times_a_over_rails_with_both():
    r = parse_pmic_read_adc(_line("pmic_read_adc_pi5.txt"))
    assert "EXT5V" not in r.rails and "BATT" not in r.rails  # voltage only: no power
    assert len(r.rails) == 12
    assert r.rails["VDD_CORE"] == pytest.approx(1.11625 * 0.7494498)
    by_hand = (
        0.09466522 * 3.629252
        + 0.08197812 * 3.316529
        + 0.1502932 * 1.798777
        + 0.00390372 * 1.101464
        + 0.0 * 0.6062265
        + 0.2029934 * 1.104028
        + 0.3054661 * 0.798534
        + 1.11625 * 0.7494498
        + 0.0 * 3.310436
        + 0.00018315 * 3.316846
        + 0.00274725 * 0.7979479
        + 0.0166056 * 5.10138
    )
    assert r.watts == pytest.approx(by_hand, rel=1e-9)


def test_pmic_output_without_pairs_is_refused():
    with pytest.raises(PowerError, match="both current and voltage"):
        parse_pmic_read_adc("     EXT5V_V volt(24)=5.08530000V\n")


# -- INA3221 sysfs: hwmon (Orin) and iio (L4T R32) -----------------------------------------------
def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text + "\n")
    return root


def test_ina3221_hwmon_tree(tmp_path):
    d = "sys/class/hwmon/hwmon1/"
    _write(
        tmp_path,
        {
            "sys/class/hwmon/hwmon0/name": "cpu_thermal",  # another hwmon device: skipped
            d + "name": "ina3221",
            d + "in1_label": "VDD_IN",
            d + "in1_input": "5000",
            d + "curr1_input": "1200",
            d + "in2_label": "VDD_CPU_GPU_CV",
            d + "in2_input": "5000",
            d + "curr2_input": "300",
            d + "in3_label": "VDD_SOC",
            d + "in3_input": "5000",
            d + "curr3_input": "250",
            d + "in7_label": "sum of shunt voltages",
            d + "in7_input": "120",
        },
    )  # no current: skipped
    chans = find_channels(tmp_path)
    assert [c.rail for c in chans] == ["VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"]
    r = read_ina3221(chans)
    assert r.rails == pytest.approx({"VDD_IN": 6.0, "VDD_CPU_GPU_CV": 1.5, "VDD_SOC": 1.25})
    assert r.watts == pytest.approx(6.0)
    s = Ina3221Sampler(tmp_path)
    (tmp_path / d / "curr1_input").write_text("1500\n")  # the sampler re-reads the files every time
    assert s.read() == pytest.approx(7.5)


def test_ina3221_iio_tree_of_l4t_r32(tmp_path):
    d = "sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0/"
    _write(
        tmp_path,
        {
            d + "rail_name_0": "POM_5V_IN",
            d + "in_power0_input": "2150",
            d + "rail_name_1": "POM_5V_GPU",
            d + "in_power1_input": "0",
            d + "rail_name_2": "POM_5V_CPU",
            d + "in_power2_input": "572",
            d + "in_current0_input": "430",
            d + "in_voltage0_input": "5000",
        },
    )
    r = read_ina3221(find_channels(tmp_path))
    assert r.rails == pytest.approx({"POM_5V_IN": 2.15, "POM_5V_GPU": 0.0, "POM_5V_CPU": 0.572})
    assert r.watts == pytest.approx(2.15)


def test_ina3221_missing_or_garbled_is_a_clear_error(tmp_path):
    with pytest.raises(PowerError, match="no INA3221 rails"):
        find_channels(tmp_path)
    d = "sys/class/hwmon/hwmon0/"
    _write(
        tmp_path, {d + "name": "ina3221", d + "in1_label": "VDD_IN", d + "in1_input": "5000", d + "curr1_input": "n/a"}
    )
    with pytest.raises(PowerError, match="cannot read a number"):
        Ina3221Sampler(tmp_path).read()


# -- RAPL: counter wraparound, and a live counter through the sampling process --------------------
def test_rapl_counter_delta_across_wraparound():
    assert counter_delta(1_000, 4_000, 262_143_328_850) == 3_000
    assert counter_delta(262_143_328_000, 500, 262_143_328_850) == 1_350


def _rapl_tree(root: Path, max_range: int) -> Path:
    z = root / "sys/class/powercap/intel-rapl:0"
    _write(
        root,
        {
            "sys/class/powercap/intel-rapl:0/name": "package-0",
            "sys/class/powercap/intel-rapl:0/max_energy_range_uj": str(max_range),
            "sys/class/powercap/intel-rapl:0/energy_uj": "0",
            "sys/class/powercap/intel-rapl:0:0/name": "core",  # a sub-zone: not added again
            "sys/class/powercap/intel-rapl:0:0/max_energy_range_uj": str(max_range),
            "sys/class/powercap/intel-rapl:0:0/energy_uj": "0",
        },
    )
    return z / "energy_uj"


def test_rapl_sampler_measures_a_counter_that_wraps_five_times_a_second(tmp_path):
    """A writer thread advances energy_uj at 5 W (5e6 uJ/s) in a counter that wraps every 1e6 uJ;
    the sampler, in its own process at 50 Hz, must integrate that back to 5 W."""
    watts, max_range = 5.0, 1_000_000
    counter = _rapl_tree(tmp_path, max_range)
    assert [z.name for z in RaplSampler(tmp_path).zones] == ["package-0"]
    stop, t_start = threading.Event(), time.monotonic()

    def advance():
        tmp = counter.with_suffix(".tmp")
        while not stop.is_set():
            tmp.write_text(str(int(watts * 1e6 * (time.monotonic() - t_start)) % max_range))
            os.replace(tmp, counter)  # atomic: the sampler never reads a half-written file
            time.sleep(0.002)

    writer = threading.Thread(target=advance, daemon=True)
    writer.start()
    try:
        with SamplingProcess("rapl", hz=50, root=str(tmp_path)) as s:
            t0 = time.monotonic()
            time.sleep(1.0)
            t1 = time.monotonic()
            time.sleep(0.1)
    finally:
        stop.set()
        writer.join()
    assert s.series.sampler == "rapl" and not s.series.estimate
    assert s.series.mean_w(t0, t1) == pytest.approx(watts, rel=0.15)


def test_rapl_absent_here_is_a_clear_error(tmp_path):
    with pytest.raises(PowerError, match="no RAPL zones"):
        make_sampler("rapl", root=str(tmp_path))


# -- NVML and jtop: only where installed ----------------------------------------------------------
@pytest.mark.skipif(
    importlib.util.find_spec("pynvml") is None, reason="pynvml (nvidia-ml-py) not installed: no NVIDIA GPU here"
)
def test_nvml_reads_watts_when_a_gpu_is_present():
    try:
        s = make_sampler("nvml")
    except PowerError as e:
        pytest.skip(f"NVML present but no GPU power: {e}")
    first = s.read()
    time.sleep(0.2)
    w = s.read()
    s.close()
    assert (first if w is None else w) is not None and 0 <= (w or first) < 2000


@pytest.mark.skipif(importlib.util.find_spec("jtop") is None, reason="jtop (jetson-stats) not installed: not a Jetson")
def test_jtop_reads_watts_on_a_jetson():
    s = make_sampler("jtop")
    time.sleep(1.0)
    w = s.read()
    s.close()
    assert w is None or 0 < w < 100


# -- integration ----------------------------------------------------------------------------------
def test_trapezoid_energy_with_interpolated_edges():
    t, w = [0.0, 1.0, 2.0, 3.0], [2.0, 2.0, 4.0, 4.0]
    assert energy_j(t, w, 0.0, 1.0) == pytest.approx(2.0)
    assert energy_j(t, w, 1.0, 2.0) == pytest.approx(3.0)  # ramp 2 -> 4 W
    assert energy_j(t, w, 0.5, 2.5) == pytest.approx(1.0 + 3.0 + 2.0)
    assert energy_j(t, w, 1.5, 1.75) == pytest.approx(0.25 * (3.0 + 3.5) / 2)  # between two samples
    with pytest.raises(PowerError, match="not covered"):
        energy_j(t, w, 2.5, 3.5)
    with pytest.raises(PowerError, match="empty interval"):
        energy_j(t, w, 2.0, 2.0)


# -- the estimate ---------------------------------------------------------------------------------
def test_estimate_follows_the_process_cpu_use_within_the_profile_figures():
    model = power_model(load_profile("raspberry-pi-5"))
    assert (model["idle_w"], model["active_w"], model["active_key"]) == (2.7, 7.0, "power_active_w")
    with SamplingProcess("estimate", hz=50, idle_w=model["idle_w"], active_w=model["active_w"], pid=os.getpid()) as s:
        i0 = time.monotonic()
        time.sleep(0.5)
        i1 = time.monotonic()
        while time.monotonic() - i1 < 0.5:  # busy: this process uses one core
            sum(range(1000))
        b1 = time.monotonic()
        time.sleep(0.1)
    ser = s.series
    assert ser.estimate and ser.describe["utilisation_of"] == f"process {os.getpid()}"
    idle, busy = ser.mean_w(i0, i1), ser.mean_w(i1, b1)
    assert 2.7 <= idle < 2.7 + 0.2 * (7.0 - 2.7)
    assert idle + 0.5 < busy <= 7.0


def test_estimate_needs_power_figures():
    no_power = parse_profile(
        {
            "schema": 1,
            "name": "bare",
            "kind": "host",
            "description": "a host without power figures",
            "figures": {"cpu_cores": {"value": 2, "source": "measured: os.cpu_count"}},
        }
    )
    with pytest.raises(PowerError, match="power_idle_w"):
        power_model(no_power)


def test_sampling_rejects_bad_rates_and_reports_a_sampler_that_cannot_start(tmp_path):
    with pytest.raises(PowerError, match="outside"):
        SamplingProcess("estimate", hz=1000, idle_w=1, active_w=2)
    with pytest.raises(PowerError, match="cannot start: PowerError: no INA3221"):
        SamplingProcess("ina3221", hz=50, root=str(tmp_path)).start()


# -- edgesplit profile power ----------------------------------------------------------------------
def test_profile_power_reports_joules_per_mode_labelled_as_estimate(tiny_bundle):
    res = measure_power(
        tiny_bundle,
        sampler="estimate",
        profile="raspberry-pi-5",
        hz=50,
        frames=8,
        min_seconds=0.3,
        baseline_seconds=0.3,
        source=str(CIFAR_TEST),
    )
    assert res["estimate"] is True and "ESTIMATE" in res["note"]
    assert res["sampler_info"]["profile"] == "raspberry-pi-5" and res["sampler_info"]["idle_source"]
    assert 0 <= res["sampler_cpu_percent"] < 100
    assert res["baseline"]["samples"] >= 5 and 2.7 <= res["baseline"]["watts"] < 3.5
    assert [m["mode"] for m in res["modes"]] == [m.id for m in tiny_bundle.modes]
    for r in res["modes"] + [res["full"]]:
        assert r["inferences"] >= 8 and r["seconds"] >= 0.3 and r["samples"] >= 5
        assert r["gross_joules_per_inference"] > r["joules_per_inference"] > 0


def test_profile_power_cli_errors_are_clear(tiny_bundle):
    with pytest.raises(SystemExit, match="needs --profile"):
        profile_main(["power", "--bundle", str(tiny_bundle.root), "--sampler", "estimate"])
    with pytest.raises(SystemExit, match="10-100"):
        profile_main(["power", "--bundle", str(tiny_bundle.root), "--hz", "500"])


@pytest.mark.skipif(
    Path("/sys/class/powercap").exists(), reason="this host has RAPL zones: their absence cannot be shown"
)
def test_profile_power_cli_without_rapl_zones_says_so(tiny_bundle):
    with pytest.raises(SystemExit, match="no RAPL zones"):
        profile_main(["power", "--bundle", str(tiny_bundle.root), "--sampler", "rapl", "--source", str(CIFAR_TEST)])
