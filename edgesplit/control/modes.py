"""The control plane's view of a bundle's modes table.

The controller needs four numbers per mode: its id, the bytes it puts on the wire, its measured
accuracy and the head's latency on *this* device. An entropy-coded mode's frames vary in length:
``bytes_per_frame`` is then their expected (mean) size and ``bytes_p95`` their 95th percentile,
which the latency predictions budget for (:attr:`ModeSpec.plan_bytes`). :func:`modes_table` reads them from anything
shaped like :class:`edgesplit.bundle.Mode` (attributes ``id``, ``name``, ``bytes_per_frame``,
``accuracy``, ``head_ms`` as a per-device-profile dict) or from a manifest's ``modes`` entries,
so the control code never imports the bundle class (nor torch, nor ONNX Runtime).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

FALLBACK = -1
"""Mode id of a local fallback: the device runs the full model (``full.onnx``) itself."""


@dataclass(frozen=True)
class ModeSpec:
    id: int
    name: str
    bytes_per_frame: float
    accuracy: float  # expected top-1 (measured, from the manifest)
    head_ms: float  # head latency on the device profile in use
    bytes_p95: float | None = None  # variable-length (ans) modes: the frames' 95th percentile

    @property
    def plan_bytes(self) -> float:
        """The size a latency prediction budgets before the frame is coded: the tail percentile of
        a variable-length mode (most frames fit in it), the fixed size of any other."""
        return self.bytes_per_frame if self.bytes_p95 is None else max(self.bytes_p95, self.bytes_per_frame)


class ModesTable:
    """The modes of one bundle on one device profile, plus the full model's accuracy (used for
    fallback frames)."""

    def __init__(self, modes: Iterable[ModeSpec], teacher_accuracy: float, device: str = "", name: str = ""):
        self.modes: tuple[ModeSpec, ...] = tuple(modes)
        if not self.modes:
            raise ValueError("a modes table needs at least one mode")
        ids = [m.id for m in self.modes]
        if len(set(ids)) != len(ids) or FALLBACK in ids:
            raise ValueError(f"mode ids must be unique and not {FALLBACK}: {ids}")
        for m in self.modes:
            if not (m.bytes_per_frame > 0 and math.isfinite(m.accuracy) and m.head_ms >= 0):
                raise ValueError(f"mode {m.id}: needs bytes_per_frame > 0, a finite accuracy and head_ms >= 0: {m}")
            if m.bytes_p95 is not None and not (math.isfinite(m.bytes_p95) and m.bytes_p95 > 0):
                raise ValueError(f"mode {m.id}: bytes_p95 must be a positive number or None: {m}")
        if not math.isfinite(teacher_accuracy):
            raise ValueError("teacher_accuracy must be a number (the manifest's 'teacher_accuracy')")
        self.teacher_accuracy = float(teacher_accuracy)
        self.device = device
        self.name = name
        self.by_id = {m.id: m for m in self.modes}
        # Most accurate first; among equals, fewer bytes first.
        self.ranked: tuple[ModeSpec, ...] = tuple(
            sorted(self.modes, key=lambda m: (-m.accuracy, m.bytes_per_frame, m.id))
        )
        # Fewest bytes; among equals, the most accurate.
        self.smallest: ModeSpec = min(self.modes, key=lambda m: (m.bytes_per_frame, -m.accuracy, m.id))

    def __iter__(self):
        return iter(self.modes)

    def __len__(self) -> int:
        return len(self.modes)

    def accuracy(self, mode_id: int) -> float:
        return self.teacher_accuracy if mode_id == FALLBACK else self.by_id[mode_id].accuracy

    def __repr__(self) -> str:
        ms = ", ".join(
            f"{m.id}:{m.name} {m.bytes_per_frame:g}B acc {m.accuracy:.3f} head {m.head_ms:g}ms" for m in self.modes
        )
        return (
            f"ModesTable({self.name or '?'} on {self.device or '?'}: {ms}; full model acc {self.teacher_accuracy:.3f})"
        )


def _get(m: Any, key: str, *default: Any) -> Any:
    if isinstance(m, Mapping):
        return m.get(key, *default) if default else m[key]
    return getattr(m, key, *default)


def _head_ms(m: Any, device: str | None, default: float | None) -> tuple[float, str]:
    h = _get(m, "head_ms")
    if isinstance(h, (int, float)):
        return float(h), device or ""
    h = dict(h or {})
    if device is None:
        if len(h) == 1:
            ((device, v),) = h.items()
            return float(v), device
        if not h and default is not None:
            return float(default), ""
        raise ValueError(
            f"mode {_get(m, 'id')}: name the device profile, the modes table has head_ms for {sorted(h) or 'none'}"
        )
    if device in h:
        return float(h[device]), device
    if default is not None:
        return float(default), device
    raise ValueError(f"mode {_get(m, 'id')}: no head_ms for device profile {device!r} (known: {sorted(h) or 'none'})")


def modes_table(
    modes: Iterable[Any],
    teacher_accuracy: float,
    device: str | None = None,
    head_ms_default: float | None = None,
    name: str = "",
) -> ModesTable:
    """Build a :class:`ModesTable` from ``Mode`` objects or manifest mode dicts. ``device`` picks
    the head latency profile (may be omitted when the table has exactly one)."""
    specs, dev = [], device or ""
    for m in modes:
        acc = _get(m, "accuracy")
        if acc is None:
            raise ValueError(f"mode {_get(m, 'id')}: no measured accuracy; the controller ranks modes by it")
        h, dev = _head_ms(m, device, head_ms_default)
        specs.append(
            ModeSpec(
                id=int(_get(m, "id")),
                name=str(_get(m, "name")),
                bytes_per_frame=float(_get(m, "bytes_per_frame")),
                accuracy=float(acc),
                head_ms=h,
                bytes_p95=None if _get(m, "bytes_p95", None) is None else float(_get(m, "bytes_p95")),
            )
        )
    return ModesTable(specs, teacher_accuracy, device=dev, name=name)


def modes_from_manifest(
    manifest: Mapping[str, Any] | str | Path, device: str | None = None, head_ms_default: float | None = None
) -> ModesTable:
    """Read the modes table and ``teacher_accuracy`` of a bundle manifest (a dict, a
    ``manifest.json`` path or a bundle directory)."""
    if not isinstance(manifest, Mapping):
        p = Path(manifest)
        p = p / "manifest.json" if p.is_dir() else p
        manifest = json.loads(p.read_text())
    ta = manifest.get("teacher_accuracy")
    if ta is None:
        raise ValueError("manifest has no 'teacher_accuracy' (the full model's accuracy, used for fallback frames)")
    return modes_table(manifest["modes"], float(ta), device, head_ms_default, name=str(manifest.get("name", "")))
