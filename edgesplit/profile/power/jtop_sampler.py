"""Jetson through ``jtop`` (jetson-stats), when installed: it reads the same INA3221 rails as
:mod:`.ina3221` through its own service, so prefer ``ina3221`` unless sysfs is not readable."""

from __future__ import annotations

from .readings import PowerError


class JtopSampler:
    name = "jtop"
    estimate = False

    def __init__(self):
        try:
            from jtop import jtop
        except ImportError:
            raise PowerError("jtop is not installed (pip install jetson-stats, on a Jetson)") from None
        self._jetson = jtop()
        try:
            self._jetson.start()
        except Exception as e:  # noqa: BLE001 - jtop raises its own exception types when its service is down
            raise PowerError(f"jtop cannot connect to its service: {e}") from None

    def read(self) -> float | None:
        total = self._jetson.power.get("tot") or {}
        mw = total.get("power")
        return None if mw is None else mw / 1000.0

    def describe(self) -> dict:
        return {"source": "jtop power['tot']"}

    def close(self) -> None:
        self._jetson.close()
