"""``edgesplit agent --config agent.yaml``: every agent flag is also a config key.

The keys are the flags' destinations (``--deadline-ms`` is ``deadline_ms``), read off the agent's
argument parser, so a flag added there is a config key at once and the two cannot drift apart.
A file is checked as a whole before anything runs: an unknown key is an error that names it (with
the nearest valid key, and the full list); each value must have the flag's type (a YAML ``true``
is not an int, an int is accepted where a float is meant), be one of the flag's choices, and lie
in its range. Values given on the command line override the file's. The ranges and the rules
between keys (:func:`validate`) apply to the merged result, so a flag is held to the same rules
as a key.
"""

from __future__ import annotations

import argparse
import difflib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]  # no stubs installed; only safe_load is used

from .device_config import check_device
from .ota_config import OTA_RANGES, check_ota

# Parser destinations that are not config keys: help, and the file itself.
_NOT_KEYS = frozenset({"help", "config"})

# Ranges: key -> (minimum, minimum allowed?, maximum or None). Keys not named have no range.
_RANGES: dict[str, tuple[float, bool, float | None]] = {
    "frames": (0, True, None),  # 0: the whole source (a service reads its camera for ever)
    "mode": (0, True, None),
    "inflight": (1, True, 4096),
    "deadline_ms": (0, False, None),
    "fps": (0, False, None),
    "local_ms": (0, False, None),
    "base_rtt_ms": (0, True, None),
    "packet_bytes": (1, True, None),
    "threads": (1, True, 1024),
    "timeout_s": (0, False, None),
    "reconnect_max_s": (0, False, None),
    "budget_ms": (0, False, None),
    "stop_grace_s": (0, True, None),
    "deliver_batch": (1, True, 10000),
    # a spool smaller than one record is no spool
    "spool_max_bytes": (4096, True, None),
    "spool_max_records": (1, True, None),
    "inter_op_threads": (1, True, 1024),
    **OTA_RANGES,
}


class ConfigError(ValueError):
    """The configuration (file, flags, or both) is not valid; the message says which key and why."""


@dataclass(frozen=True)
class KeySpec:
    name: str
    kind: type  # bool, int, float or str
    choices: tuple | None
    nullable: bool  # the flag's default is None: null in the file means "unset"
    many: bool = False  # a flag of one or more values (nargs "+"): a YAML list in the file


def key_specs(parser: argparse.ArgumentParser) -> dict[str, KeySpec]:
    """Every config key the parser's flags make, with its type, choices and whether null is allowed."""
    out: dict[str, KeySpec] = {}
    for a in parser._actions:  # argparse keeps no public list of its actions
        if a.dest in _NOT_KEYS or a.dest == argparse.SUPPRESS:
            continue
        if a.nargs == 0 and isinstance(a.const, bool):  # store_true / store_false
            kind: type = bool
        elif a.type in (int, float):
            kind = a.type
        else:
            kind = str
        choices = tuple(a.choices) if a.choices else None
        out[a.dest] = KeySpec(a.dest, kind, choices, a.default is None, a.nargs in ("+", "*"))
    return out


def _check_type(spec: KeySpec, value: Any, where: str) -> Any:
    if value is None:
        if spec.nullable:
            return None
        raise ConfigError(f"{where}: '{spec.name}' may not be null")
    if spec.many:
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{where}: '{spec.name}' must be a non-empty list, got {value!r}")
        one = KeySpec(spec.name, spec.kind, spec.choices, False)
        return [_check_type(one, v, where) for v in value]
    ok = (
        isinstance(value, bool)
        if spec.kind is bool
        else isinstance(value, (int, float)) and not isinstance(value, bool)
        if spec.kind is float
        else isinstance(value, spec.kind) and not isinstance(value, bool)
    )
    if not ok:
        raise ConfigError(f"{where}: '{spec.name}' must be {spec.kind.__name__}, got {type(value).__name__} {value!r}")
    if spec.kind is float:
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{where}: '{spec.name}' must be finite, got {value!r}")
    if spec.choices is not None and value not in spec.choices:
        raise ConfigError(f"{where}: '{spec.name}' must be one of {list(spec.choices)}, got {value!r}")
    return value


def load_config(path: str | Path, specs: dict[str, KeySpec]) -> dict[str, Any]:
    """Read and check a config file: a YAML mapping of known keys to values of the right type."""
    where = str(path)
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"{where}: cannot read: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must be a mapping of keys to values, got {type(data).__name__}")
    out: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str) or key not in specs:
            near = difflib.get_close_matches(str(key).replace("-", "_"), specs, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise ConfigError(f"{where}: unknown key '{key}'{hint}; valid keys: {', '.join(sorted(specs))}")
        out[key] = _check_type(specs[key], value, where)
    return out


def validate(values: dict[str, Any], where: str = "agent configuration") -> None:
    """Ranges and the rules between keys, on the merged configuration (file, then flags)."""
    for key, (lo, lo_ok, hi) in _RANGES.items():
        v = values.get(key)
        if v is None:
            continue
        if v < lo or (v == lo and not lo_ok) or (hi is not None and v > hi):
            span = f"{'>=' if lo_ok else '>'} {lo}" + ("" if hi is None else f" and <= {hi}")
            raise ConfigError(f"{where}: '{key}' must be {span}, got {v!r}")
    for key in ("bundle", "server", "source"):
        if key in values and not values[key]:
            raise ConfigError(f"{where}: '{key}' must not be empty")
    if (values.get("server_key") is None) != (values.get("client_key") is None):
        raise ConfigError(f"{where}: CURVE needs both 'server_key' and 'client_key' (or neither)")
    for problem in (check_ota(values, where), check_device(values, where)):
        if problem is not None:
            raise ConfigError(problem)
    deliver = values.get("deliver")
    if deliver is None:
        for key in ("spool_dir", "spool_max_bytes", "spool_max_records"):
            if values.get(key) is not None:
                raise ConfigError(f"{where}: '{key}' is for delivered results: it needs 'deliver'")
    else:
        if not deliver.startswith(("http://", "https://")):
            raise ConfigError(f"{where}: 'deliver' must be an http:// or https:// URL, got {deliver!r}")
        if values.get("edvit"):
            raise ConfigError(f"{where}: 'deliver' is not available with 'edvit'")
        if spool_dir(values) is None:
            raise ConfigError(
                f"{where}: 'deliver' needs 'spool_dir' (or STATE_DIRECTORY, which systemd sets for the unit "
                "'edgesplit agent install-service' writes)"
            )


def spool_dir(values: dict[str, Any]) -> Path | None:
    """Where undelivered results wait: ``spool_dir``, else ``$STATE_DIRECTORY/spool`` under systemd."""
    if values.get("spool_dir"):
        return Path(values["spool_dir"])
    state = os.environ.get("STATE_DIRECTORY")
    # systemd may list several directories, colon-separated: the first is the unit's own
    return Path(state.split(":")[0]) / "spool" if state else None


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``; with ``--config FILE``, the file's values replace the flags' defaults, so
    flags given on the command line override the file. Raises :class:`ConfigError`."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        values = load_config(known.config, key_specs(parser))
        parser.set_defaults(**values)
        for a in parser._actions:
            if a.dest in values and values[a.dest] is not None:
                a.required = False  # the file gave it
    args = parser.parse_args(argv)
    validate(vars(args), known.config or "agent flags")
    return args
