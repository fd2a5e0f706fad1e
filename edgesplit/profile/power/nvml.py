"""NVIDIA GPUs through NVML (``pynvml``, from the ``nvidia-ml-py`` package).

The total-energy counter (mJ since the driver loaded; Volta and newer) is preferred: its rate is
the exact average power between two reads. Older GPUs fall back to the instantaneous power
reading (mW), which NVML itself averages over about a second on many boards. Jetson's NVML
answers NotSupported to both: use ``ina3221`` or ``tegrastats`` there.
"""

from __future__ import annotations

import time

from .readings import PowerError


class NvmlSampler:
    name = "nvml"
    estimate = False

    def __init__(self, index: int = 0):
        try:
            import pynvml
        except ImportError:
            raise PowerError("pynvml is not installed (pip install nvidia-ml-py)") from None
        self._nvml = pynvml
        try:
            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except pynvml.NVMLError as e:
            raise PowerError(f"NVML: no GPU {index}: {e}") from None
        try:
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
            self.counter = True
        except pynvml.NVMLError:
            self.counter = False
        try:
            if not self.counter:
                pynvml.nvmlDeviceGetPowerUsage(self._handle)
        except pynvml.NVMLError as e:
            raise PowerError(f"NVML reports no power for GPU {index}: {e}") from None
        self._last: tuple[float, int] | None = None

    def read(self) -> float | None:
        if not self.counter:
            return self._nvml.nvmlDeviceGetPowerUsage(self._handle) / 1000.0
        now, mj = time.monotonic(), self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
        last, self._last = self._last, (now, mj)
        if last is None or now <= last[0]:
            return None
        return (mj - last[1]) / 1000.0 / (now - last[0])  # a 64-bit mJ counter: it does not wrap

    def describe(self) -> dict:
        return {"source": "NVML total energy counter" if self.counter else "NVML power usage"}

    def close(self) -> None:
        self._nvml.nvmlShutdown()
