"""Jetson ``tegrastats``: parse its power rails, and a sampler that streams it.

Formats seen across L4T releases (all on one line with RAM, CPU, temperatures ...):

* R32 (Nano, TX1, Xavier): ``POM_5V_IN 2150/2150 POM_5V_GPU 0/0`` - instant/average, mW implied;
* R35 (Orin): ``VDD_IN 5123mW/5123mW VDD_CPU_GPU_CV 1234mW/1234mW`` - units printed;
* some builds print the instant value only: ``VDD_IN 5765mW``;
* R35/R36 lines may start with the date: ``11-27-2026 12:00:00 RAM ...``.

A rail is an upper-case name followed by milliwatts (``mW`` or the ``a/b`` pair); that rules out
``APE 150`` (a clock in MHz) and ``RAM 613/3964MB`` (megabytes). The instant value is used.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

from .readings import PowerError, Reading, reading_from_rails

_RAIL = re.compile(r"(?<!\S)([A-Z][A-Z0-9_]*) (\d+(?:\.\d+)?)(?:mW/(\d+(?:\.\d+)?)mW|/(\d+(?:\.\d+)?)|mW)(?!\S)")
_DATE = re.compile(r"^\s*(\d{2}-\d{2}-\d{4} \d{2}:\d{2}:\d{2})\s")


def parse_tegrastats_line(line: str) -> Reading:
    """One tegrastats line -> watts per rail (instant values) and the leading date if printed."""
    rails = {m.group(1): float(m.group(2)) / 1000.0 for m in _RAIL.finditer(line)}
    if not rails:
        raise PowerError(f"no power rails in tegrastats line: {line.strip()[:120]!r}")
    date = _DATE.match(line)
    return reading_from_rails(rails, date.group(1) if date else None)


class TegrastatsSampler:
    """Runs ``tegrastats --interval MS`` and returns the newest line's total at each read.

    tegrastats paces itself, so reads never block: the pipe is non-blocking and a read without a
    new complete line returns None (the sampling loop then records nothing for that tick)."""

    name = "tegrastats"
    estimate = False

    def __init__(self, interval_ms: int = 20, command: str = "tegrastats"):
        exe = shutil.which(command)
        if exe is None:
            raise PowerError(f"'{command}' is not on PATH (it ships with L4T on Jetson devices)")
        # tegrastats' floor is about 10 ms; below that it prints at its own rate.
        self._proc = subprocess.Popen(
            [exe, "--interval", str(max(10, int(interval_ms)))], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        os.set_blocking(self._proc.stdout.fileno(), False)
        self._buffer = b""

    def read(self) -> float | None:
        chunk = self._proc.stdout.read()  # None when nothing is waiting (non-blocking pipe)
        if chunk:
            self._buffer += chunk
        if b"\n" not in self._buffer:
            if self._proc.poll() is not None:
                raise PowerError(f"tegrastats exited with status {self._proc.returncode}")
            return None
        lines, self._buffer = self._buffer.rsplit(b"\n", 1)
        return parse_tegrastats_line(lines.rsplit(b"\n", 1)[-1].decode(errors="replace")).watts

    def describe(self) -> dict:
        return {"source": "tegrastats (instant rail values)"}

    def close(self) -> None:
        self._proc.terminate()
        self._proc.wait(timeout=5)
