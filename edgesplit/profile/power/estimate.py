"""No sensor: power estimated from CPU utilisation and the device profile's power figures,

    watts = idle + (active - idle) x utilisation,

with ``active`` the profile's ``power_active_w`` (all cores busy) or else ``power_max_w``. This is a
model, not a measurement: every result built on it says ``"estimate": true`` and names the figures.
Utilisation is that of one process (the one running the inferences) when a pid is given, so that
other load on a shared host is not billed to the model; else of the whole machine.
"""

from __future__ import annotations

import time

import psutil

from ..devices import DeviceProfile, ProfileError
from .readings import PowerError


def power_model(profile: DeviceProfile) -> dict:
    """The profile's idle and active watts, with where they come from."""
    active_key = "power_active_w" if "power_active_w" in profile.figures else "power_max_w"
    if "power_idle_w" not in profile.figures or active_key not in profile.figures:
        raise PowerError(
            f"device profile '{profile.name}' has no power_idle_w and power_active_w/power_max_w "
            "to estimate from: pass --profile with a device that has them"
        )
    try:
        return {
            "profile": profile.name,
            "idle_w": float(profile.value("power_idle_w")),
            "idle_source": profile.citation("power_idle_w"),
            "active_w": float(profile.value(active_key)),
            "active_key": active_key,
            "active_source": profile.citation(active_key),
        }
    except (ProfileError, TypeError) as e:
        raise PowerError(str(e)) from None


class EstimateSampler:
    name = "estimate"
    estimate = True

    def __init__(self, idle_w: float, active_w: float, pid: int | None = None, model: dict | None = None):
        if not 0 <= idle_w <= active_w:
            raise PowerError(f"estimate needs 0 <= idle ({idle_w} W) <= active ({active_w} W)")
        self.idle_w, self.active_w, self.pid, self.model = idle_w, active_w, pid, model or {}
        self._cpus = psutil.cpu_count() or 1
        try:
            self._proc = psutil.Process(pid) if pid is not None else None
        except psutil.NoSuchProcess:
            raise PowerError(f"no process {pid} to estimate the power of") from None
        self._last: tuple[float, float] | None = None

    def _busy_seconds(self) -> float:
        """CPU seconds spent so far (over all cores) by the process, or by the machine."""
        if self._proc is not None:
            t = self._proc.cpu_times()
            return t.user + t.system
        t = psutil.cpu_times()
        return t.user + t.system + getattr(t, "nice", 0.0) + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)

    def read(self) -> float | None:
        now, busy = time.monotonic(), self._busy_seconds()
        last, self._last = self._last, (now, busy)
        if last is None or now <= last[0]:
            return None
        util = min(1.0, max(0.0, (busy - last[1]) / ((now - last[0]) * self._cpus)))
        return self.idle_w + (self.active_w - self.idle_w) * util

    def describe(self) -> dict:
        return {
            "source": "estimate: idle + (active - idle) x CPU utilisation",
            "utilisation_of": f"process {self.pid}" if self.pid is not None else "the whole machine",
            "cpus": self._cpus,
            **self.model,
        }

    def close(self) -> None:
        pass
