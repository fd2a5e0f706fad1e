"""x86 RAPL through the powercap sysfs: ``/sys/class/powercap/intel-rapl:N/energy_uj`` is a
cumulative energy counter (µJ) that wraps at ``max_energy_range_uj``; power is its rate.

Top-level zones (``intel-rapl:N``, one per package; AMD Zen uses the same names) are summed;
sub-zones (``intel-rapl:N:M``, core/uncore/dram) are parts of them and are not added again.
``psys`` (the whole platform, on some laptops) is used alone when present, since it contains the
packages. Reading ``energy_uj`` needs root on kernels since 5.10 (CVE-2020-8694).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .readings import PowerError


@dataclass(frozen=True)
class RaplZone:
    name: str
    energy_uj: Path
    max_range_uj: int


def counter_delta(before: int, after: int, max_range: int) -> int:
    """Energy between two counter readings, across at most one wraparound (sampling at 10+ Hz,
    a counter that wraps after minutes at full power cannot wrap twice in between)."""
    return after - before if after >= before else after + max_range - before


def find_zones(root: str | Path = "/") -> list[RaplZone]:
    base = Path(root) / "sys/class/powercap"
    zones = []
    for d in sorted(base.glob("intel-rapl:*")):
        if d.name.count(":") != 1:
            continue  # a sub-zone
        try:
            zone = RaplZone(
                (d / "name").read_text().strip(), d / "energy_uj", int((d / "max_energy_range_uj").read_text())
            )
            int(zone.energy_uj.read_text())  # unreadable without root: refuse now, not mid-run
        except (OSError, ValueError) as e:
            raise PowerError(f"{d}: cannot read the RAPL counter ({e}); reading energy_uj needs root") from None
        zones.append(zone)
    if not zones:
        raise PowerError(f"no RAPL zones under {base} (not an x86 host, or the powercap driver is not loaded)")
    psys = [z for z in zones if z.name == "psys"]
    return psys or zones


class RaplSampler:
    """Each read returns the average power since the previous read (None at the first read)."""

    name = "rapl"
    estimate = False

    def __init__(self, root: str | Path = "/"):
        self.zones = find_zones(root)
        self._last: tuple[float, list[int]] | None = None

    def _energies(self) -> list[int]:
        return [int(z.energy_uj.read_text()) for z in self.zones]

    def read(self) -> float | None:
        now, energies = time.monotonic(), self._energies()
        last, self._last = self._last, (now, energies)
        if last is None or now <= last[0]:
            return None
        uj = sum(counter_delta(b, a, z.max_range_uj) for b, a, z in zip(last[1], energies, self.zones))
        return uj / 1e6 / (now - last[0])

    def describe(self) -> dict:
        return {"source": "RAPL powercap energy_uj", "zones": [z.name for z in self.zones]}

    def close(self) -> None:
        pass
