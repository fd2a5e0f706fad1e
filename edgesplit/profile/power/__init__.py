"""Power measurement: what an inference costs in joules, per mode, on the device itself.

One small module per sensor (``tegrastats``, ``ina3221``, ``vcgencmd``, ``nvml``, ``rapl``,
``jtop``), each a pure parser of the sensor's real output format plus a sampler class with
``read() -> watts | None``; ``estimate`` stands in where no sensor exists (a utilisation model over
the device profile's power figures, always labelled an estimate). :mod:`.sampling` runs a sampler
in a separate process at 10-100 Hz and integrates its samples (trapezoid, idle baseline
subtracted); :mod:`.measure` is ``edgesplit profile power``.
"""

from __future__ import annotations

from .readings import PowerError, Reading
from .samplers import SAMPLER_NAMES, detect_sampler, make_sampler
from .sampling import SampleSeries, SamplingProcess, energy_j

__all__ = [
    "SAMPLER_NAMES",
    "PowerError",
    "Reading",
    "SampleSeries",
    "SamplingProcess",
    "detect_sampler",
    "energy_j",
    "make_sampler",
]
