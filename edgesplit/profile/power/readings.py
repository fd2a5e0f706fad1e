"""What every power parser returns, and the one rule for a board's total from its rails."""

from __future__ import annotations

from dataclasses import dataclass, field

# Rails that measure the whole board's input: when one is present the total is that rail, since the
# other rails are branches of it and adding them would count their power twice.
INPUT_RAILS = ("VDD_IN", "POM_5V_IN")


class PowerError(RuntimeError):
    """A power sensor is missing, unreadable or printed something we cannot parse."""


@dataclass(frozen=True)
class Reading:
    """One reading of a sensor: watts per rail, the board total, and the sensor's own timestamp
    (as printed, e.g. tegrastats' leading date on L4T R35+) where it has one."""

    rails: dict[str, float]
    watts: float
    timestamp: str | None = None
    total_rule: str = field(default="sum of rails")


def reading_from_rails(rails: dict[str, float], timestamp: str | None = None) -> Reading:
    """The board total: the input rail when the sensor has one, else the sum of all rails."""
    if not rails:
        raise PowerError("no power rails in the sensor output")
    inputs = [r for r in INPUT_RAILS if r in rails]
    if inputs:
        return Reading(dict(rails), rails[inputs[0]], timestamp, f"input rail {inputs[0]}")
    return Reading(dict(rails), sum(rails.values()), timestamp, "sum of rails")
