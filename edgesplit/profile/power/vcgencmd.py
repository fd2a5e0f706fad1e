"""Raspberry Pi 5: ``vcgencmd pmic_read_adc`` prints each PMIC rail's current and voltage::

      VDD_CORE_A current(7)=2.12345600A
      VDD_CORE_V volt(15)=0.85000000V

Power is the sum over rails that report both of V x A. Rails with a voltage only (``EXT5V_V``,
the 5 V input, ``BATT_V``) carry no current and add nothing. This misses what is spent before
the PMIC (the 5 V input's regulator losses), so it reads a little below a USB power meter.
"""

from __future__ import annotations

import re
import shutil
import subprocess

from .readings import PowerError, Reading

_LINE = re.compile(r"^\s*(\S+)_([AV]) (?:current|volt)\(\d+\)=(-?\d+(?:\.\d+)?)[AV]\s*$")


def parse_pmic_read_adc(text: str) -> Reading:
    currents: dict[str, float] = {}
    volts: dict[str, float] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            (currents if m.group(2) == "A" else volts)[m.group(1)] = float(m.group(3))
    rails = {r: currents[r] * volts[r] for r in currents if r in volts}
    if not rails:
        raise PowerError(f"no rail with both current and voltage in vcgencmd output: {text.strip()[:120]!r}")
    return Reading(rails, sum(rails.values()), None, "sum of rails (V x A)")


class VcgencmdSampler:
    """Runs ``vcgencmd pmic_read_adc`` at each read: one short process per sample, so it costs
    more CPU than the sysfs samplers; keep the rate at 10-20 Hz on a Pi."""

    name = "vcgencmd"
    estimate = False

    def __init__(self, command: str = "vcgencmd"):
        exe = shutil.which(command)
        if exe is None:
            raise PowerError(f"'{command}' is not on PATH (Raspberry Pi OS ships it)")
        self._argv = [exe, "pmic_read_adc"]
        self.read()  # refuse at start, not mid-run, on a Pi without a PMIC ADC (Pi 4 and older)

    def read(self) -> float | None:
        out = subprocess.run(self._argv, check=False, capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            raise PowerError(f"vcgencmd pmic_read_adc failed: {out.stderr.strip() or out.stdout.strip()}")
        return parse_pmic_read_adc(out.stdout).watts

    def describe(self) -> dict:
        return {"source": "vcgencmd pmic_read_adc (sum of PMIC rails, V x A)"}

    def close(self) -> None:
        pass
