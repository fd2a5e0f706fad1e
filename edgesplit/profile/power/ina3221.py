"""Jetson INA3221 power monitors read straight from sysfs (no subprocess: the cheapest sampler).

Two layouts, both under a root so that tests can point at a sysfs-shaped tree:

* hwmon (L4T R34+, Orin): ``/sys/class/hwmon/hwmonN/`` with ``name`` = ``ina3221`` and per
  channel ``inK_label`` (rail name), ``inK_input`` (mV) and ``currK_input`` (mA);
* iio (L4T R32, Nano/TX1/Xavier): ``/sys/bus/i2c/drivers/ina3221x/*/iio:device*/`` with
  ``rail_name_K``, ``in_power{K}_input`` (mW), ``in_current{K}_input`` (mA), ``in_voltage{K}_input`` (mV).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .readings import PowerError, Reading, reading_from_rails


@dataclass(frozen=True)
class Channel:
    rail: str
    power_mw: Path | None = None  # iio: power in mW directly
    voltage_mv: Path | None = None  # hwmon: voltage and current, power = V x I
    current_ma: Path | None = None

    def watts(self) -> float:
        if self.power_mw is not None:
            return _number(self.power_mw) / 1000.0
        return _number(self.voltage_mv) * _number(self.current_ma) / 1e6


def _number(path: Path) -> float:
    try:
        return float(path.read_text().strip())
    except (OSError, ValueError) as e:
        raise PowerError(f"{path}: cannot read a number: {e}") from None


def _hwmon_channels(root: Path) -> list[Channel]:
    found = []
    for dev in sorted((root / "sys/class/hwmon").glob("hwmon*")):
        name = dev / "name"
        if not name.is_file() or name.read_text().strip() != "ina3221":
            continue
        for label in sorted(dev.glob("in*_label")):
            k = label.name[2 : -len("_label")]
            v, i = dev / f"in{k}_input", dev / f"curr{k}_input"
            if v.is_file() and i.is_file():  # a channel with no shunt fitted has a label only
                found.append(Channel(label.read_text().strip(), voltage_mv=v, current_ma=i))
    return found


def _iio_channels(root: Path) -> list[Channel]:
    found = []
    for dev in sorted((root / "sys/bus/i2c/drivers/ina3221x").glob("*/iio:device*")):
        for label in sorted(dev.glob("rail_name_*")):
            k = label.name[len("rail_name_") :]
            p = dev / f"in_power{k}_input"
            if p.is_file():
                found.append(Channel(label.read_text().strip(), power_mw=p))
    return found


def find_channels(root: str | Path = "/") -> list[Channel]:
    """Every INA3221 rail under ``root`` (hwmon first, then the older iio layout)."""
    root = Path(root)
    channels = _hwmon_channels(root) or _iio_channels(root)
    if not channels:
        raise PowerError(f"no INA3221 rails under {root} (looked in sys/class/hwmon and sys/bus/i2c/drivers/ina3221x)")
    return channels


def read_ina3221(channels: list[Channel]) -> Reading:
    return reading_from_rails({c.rail: c.watts() for c in channels})


class Ina3221Sampler:
    name = "ina3221"
    estimate = False

    def __init__(self, root: str | Path = "/"):
        self.channels = find_channels(root)  # found once: each read is a few small file reads

    def read(self) -> float | None:
        return read_ina3221(self.channels).watts

    def describe(self) -> dict:
        return {
            "source": "INA3221 sysfs",
            "rails": [c.rail for c in self.channels],
            "total": read_ina3221(self.channels).total_rule,
        }

    def close(self) -> None:
        pass
