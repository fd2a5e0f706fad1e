"""Sampler names -> classes, and ``auto``: the first sensor this machine has.

Every sampler has ``name``, ``estimate`` (bool), ``read() -> watts | None`` (None: no new value this
tick), ``describe() -> dict`` and ``close()``. They are built from a name and plain options so that
the sampling process can build its own (see :mod:`.sampling`).
"""

from __future__ import annotations

from typing import Any

from .readings import PowerError

SAMPLER_NAMES = ("ina3221", "tegrastats", "jtop", "vcgencmd", "rapl", "nvml", "estimate")
# auto: the cheapest real sensor first (sysfs files, then tools that run a process), the estimate never.
AUTO_ORDER = ("ina3221", "vcgencmd", "tegrastats", "jtop", "rapl", "nvml")


def make_sampler(name: str, **options: Any):
    if name == "ina3221":
        from .ina3221 import Ina3221Sampler as cls
    elif name == "tegrastats":
        from .tegrastats import TegrastatsSampler as cls
    elif name == "jtop":
        from .jtop_sampler import JtopSampler as cls
    elif name == "vcgencmd":
        from .vcgencmd import VcgencmdSampler as cls
    elif name == "rapl":
        from .rapl import RaplSampler as cls
    elif name == "nvml":
        from .nvml import NvmlSampler as cls
    elif name == "estimate":
        from .estimate import EstimateSampler as cls
    else:
        raise PowerError(f"unknown sampler {name!r} (known: {', '.join(SAMPLER_NAMES)})")
    return cls(**options)


def detect_sampler(root: str = "/") -> tuple[str | None, dict[str, str]]:
    """The first real sensor that works here, and why each one before it did not."""
    why_not: dict[str, str] = {}
    for name in AUTO_ORDER:
        options = {"root": root} if name in ("ina3221", "rapl") else {}
        try:
            make_sampler(name, **options).close()
            return name, why_not
        except PowerError as e:
            why_not[name] = str(e)
    return None, why_not
