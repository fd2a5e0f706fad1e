"""Device profiles: one YAML per device in ``device_profiles/``, data only, validated on load.

A profile names the device, its kind (``edge`` device, ``server`` GPU or a ``host`` measured by
``edgesplit profile calibrate``), the power samplers that exist on it, and its **figures**:
compute, memory and power numbers, each with the source it came from. A source is either a key
of the file's ``sources`` table (a datasheet, a published measurement) or an inline string that
says how the number was obtained: ``"derived: ..."`` (computed from other sourced figures),
``"estimate: ..."`` (no published figure; the planner labels anything built on it an estimate)
or ``"measured: ..."`` (measured on the device itself). Unknown keys and unsourced figures are
errors: a planner is only as honest as its inputs.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SCHEMA = 1
KINDS = ("edge", "server", "host")
SAMPLERS = ("tegrastats", "jtop", "ina3221", "vcgencmd", "nvml", "rapl")
INLINE_SOURCES = ("derived:", "estimate:", "measured:")
_TOP_KEYS = {"schema", "name", "kind", "description", "samplers", "figures", "sources"}


class ProfileError(ValueError):
    """A device profile is missing, unknown or malformed (the message says which and where)."""


@dataclass(frozen=True)
class Figure:
    value: float | list[float]
    source: str  # a key of the profile's sources, or an inline "derived:/estimate:/measured:" note

    @property
    def estimated(self) -> bool:
        return self.source.startswith("estimate:")


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    kind: str
    description: str
    samplers: tuple[str, ...]
    figures: dict[str, Figure]
    sources: dict[str, str] = field(default_factory=dict)
    path: Path | None = None

    def value(self, key: str) -> float | list[float]:
        """A figure's value; a missing one is an error naming what the profile has."""
        f = self.figures.get(key)
        if f is None:
            raise ProfileError(
                f"device profile '{self.name}' has no figure '{key}' (it has: {', '.join(sorted(self.figures))})"
            )
        return f.value

    def get(self, key: str, default: Any = None) -> Any:
        f = self.figures.get(key)
        return default if f is None else f.value

    def citation(self, key: str) -> str:
        """Where a figure comes from, in words."""
        src = self.figures[key].source
        return self.sources.get(src, src)


def profiles_dir() -> Path:
    """The project's ``device_profiles/`` folder: the checkout's (an editable install, the tests), else
    the copy a wheel installs under ``<prefix>/share/edgesplit/`` (pyproject's data-files)."""
    checkout = Path(__file__).resolve().parents[2] / "device_profiles"
    if checkout.is_dir():
        return checkout
    return Path(sys.prefix) / "share" / "edgesplit" / "device_profiles"


def list_profiles(root: str | Path | None = None) -> list[str]:
    return sorted(p.stem for p in Path(root or profiles_dir()).glob("*.yaml"))


def load_profile(name_or_path: str | Path, root: str | Path | None = None) -> DeviceProfile:
    """Load a profile by name (``jetson-orin-nano``) or by path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix not in (".yaml", ".yml"):
        p = Path(root or profiles_dir()) / f"{name_or_path}.yaml"
        if not p.is_file():
            raise ProfileError(f"no device profile '{name_or_path}' (known: {', '.join(list_profiles(root))})")
    try:
        data = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ProfileError(f"{p}: cannot read: {e}") from None
    return parse_profile(data, p)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_profile(data: Any, path: Path | None = None) -> DeviceProfile:
    where = str(path) if path else "profile"
    if not isinstance(data, dict):
        raise ProfileError(f"{where}: expected a mapping at the top")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise ProfileError(f"{where}: unknown keys {sorted(unknown)} (allowed: {sorted(_TOP_KEYS)})")
    if data.get("schema") != SCHEMA:
        raise ProfileError(f"{where}: schema must be {SCHEMA}, got {data.get('schema')!r}")
    for k in ("name", "kind", "description"):
        if not isinstance(data.get(k), str) or not data[k]:
            raise ProfileError(f"{where}: '{k}' must be a non-empty string")
    if data["kind"] not in KINDS:
        raise ProfileError(f"{where}: kind must be one of {KINDS}, got {data['kind']!r}")
    samplers = data.get("samplers") or []
    bad = [s for s in samplers if s not in SAMPLERS]
    if not isinstance(samplers, list) or bad:
        raise ProfileError(f"{where}: unknown samplers {bad} (known: {SAMPLERS})")
    sources = data.get("sources") or {}
    if not isinstance(sources, dict) or not all(isinstance(v, str) and v for v in sources.values()):
        raise ProfileError(f"{where}: 'sources' must map keys to citations")
    figures_raw = data.get("figures")
    if not isinstance(figures_raw, dict) or not figures_raw:
        raise ProfileError(f"{where}: 'figures' must be a non-empty mapping")
    figures: dict[str, Figure] = {}
    used: set[str] = set()
    for key, f in figures_raw.items():
        if not isinstance(f, dict) or set(f) != {"value", "source"}:
            raise ProfileError(f"{where}: figure '{key}' must be {{value: ..., source: ...}}")
        v, src = f["value"], f["source"]
        if not (_number(v) or (isinstance(v, list) and v and all(_number(x) for x in v))):
            raise ProfileError(f"{where}: figure '{key}' must be a number or a list of numbers, got {v!r}")
        if not isinstance(src, str) or not (src in sources or src.startswith(INLINE_SOURCES)):
            raise ProfileError(
                f"{where}: figure '{key}' has source {src!r}: name a key of 'sources' "
                f"or say {', '.join(INLINE_SOURCES)} ..."
            )
        if _number(v) and v < 0:
            raise ProfileError(f"{where}: figure '{key}' is negative ({v})")
        used.add(src)
        figures[key] = Figure(v, src)
    unused = set(sources) - used
    if unused:
        raise ProfileError(f"{where}: sources {sorted(unused)} are cited by no figure")
    return DeviceProfile(data["name"], data["kind"], data["description"], tuple(samplers), figures, dict(sources), path)
