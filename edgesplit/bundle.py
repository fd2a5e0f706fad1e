"""Contract 1: the bundle.

A bundle is a directory holding ``manifest.json`` and the model files it names (``head.onnx``,
``tail.onnx``, ``full.onnx``, optional ``tail.pt2`` / TensorRT plans). The manifest records the
sha256 of every file; loading re-hashes each one and refuses a mismatch. The bundle's identity on
the wire (``Bundle.hash``) is the sha256 of the manifest bytes, so it changes whenever any file,
mode or calibration changes, and agent and server agree on exactly the same artefacts.

Which families a manifest may name, which file roles each allows and which it must hold come
from the registry of split families (:mod:`edgesplit.families.registry`): a bundle of a family that
nothing registers is refused.

This module is used by every plane, so it imports neither torch nor onnxruntime (the registry and
the families' ``__init__`` modules it reads are torch-free).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .families.edvit import manifest as scatter
from .families.edvit.manifest import FeatureMode, Fusion, ScatterManifestError, Submodel
from .families.registry import HEAD_ROLE, Family, UnknownFamilyError, get_family
from .wire.codec import PACKED_BITS
from .wire.errors import is_int, is_num

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
# A family whose modes run their own heads (``Family.head_per_mode``): role "head" is the default
# mode's, "head.<tag>" (``HEAD_ROLE``, e.g. "head.c3") the others'; each mode names its head
# (``Mode.head``). ED-ViT (serving shape "scatter", section 7.1): FeatureMode, Submodel, Fusion.
__all__ = ["HEAD_ROLE", "Bundle", "BundleError", "FeatureMode", "Fusion", "Mode", "Submodel", "validate_manifest"]
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")  # lowercase only: the hash is compared as a string
MAX_MODE_ID = (1 << 31) - 1  # a request's ``mode`` is an int32 on the wire
MAX_SIDE = 1 << 16
MAX_FILE_BYTES = 1 << 40


class BundleError(Exception):
    """A bundle that cannot be used as it is: missing, malformed, or altered."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Mode:
    """One operating point of a bundle: which wire tensor variant is sent and what it costs."""

    id: int
    name: str
    channels: int
    bits: int
    scale: float
    zero_point: int
    bytes_per_frame: float
    accuracy: float | None
    head_ms: dict[str, float]
    head: str = "head"  # the file role of the head this mode runs (slimmable: one per width)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Mode":
        try:
            return cls(
                id=int(d["id"]),
                name=str(d["name"]),
                channels=int(d["channels"]),
                bits=int(d["bits"]),
                scale=float(d["quant"]["scale"]),
                zero_point=int(d["quant"]["zero_point"]),
                bytes_per_frame=float(d.get("bytes_per_frame", 0.0)),
                accuracy=None if d.get("accuracy") is None else float(d["accuracy"]),
                head_ms={str(k): float(v) for k, v in d.get("head_ms", {}).items()},
                head=str(d.get("head", "head")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"manifest: malformed mode entry {d!r}: {e}") from None


def _require(d: dict, key: str, typ: type | tuple[type, ...], where: str) -> Any:
    try:
        return scatter.require(d, key, typ, where)  # the JSON type check both shapes share
    except ScatterManifestError as e:
        raise BundleError(f"manifest: {e}") from None


def _require_int(d: dict, key: str, where: str, lo: int, hi: int) -> int:
    """An integer (JSON ``8``; not ``8.0``, ``"8"`` or ``true``) in ``[lo, hi]``."""
    v = _require(d, key, int, where)
    if not lo <= v <= hi:
        raise BundleError(f"manifest: '{where}{key}' must be in [{lo}, {hi}], got {v}")
    return v


def _require_number(d: dict, key: str, where: str, positive: bool = False) -> float:
    v = _require(d, key, (int, float), where)
    if not math.isfinite(v) or (positive and v <= 0):
        raise BundleError(f"manifest: '{where}{key}' must be a finite number{' > 0' if positive else ''}, got {v}")
    return float(v)


def _require_numbers(d: dict, key: str, where: str, n: int, positive: bool = False) -> None:
    v = _require(d, key, list, where)
    if len(v) != n or not all(is_num(x) and (not positive or x > 0) for x in v):
        what = "positive finite numbers" if positive else "finite numbers"
        raise BundleError(f"manifest: '{where}{key}' must be a list of {n} {what}, got {v!r}")


def _require_dims(d: dict, key: str, where: str) -> list[int]:
    v = _require(d, key, list, where)
    if len(v) != 3 or not all(is_int(x) and x > 0 for x in v):
        raise BundleError(f"manifest: '{where}{key}' must be a list of 3 positive integers, got {v!r}")
    return v


def _validate_input(m: dict[str, Any]) -> None:
    inp = _require(m, "input", dict, "")
    shape = _require_dims(inp, "shape", "input.")
    if shape[0] != 3 or shape[1] != shape[2]:
        raise BundleError(f"manifest: 'input.shape' must be [3, S, S] (RGB, square), got {shape}")
    _require_numbers(inp, "mean", "input.", 3)
    _require_numbers(inp, "std", "input.", 3, positive=True)
    _require_int(inp, "resize", "input.", 1, MAX_SIDE)


def _validate_mode(d: Any, i: int, wire_channels: int) -> None:
    """Every key of one mode entry, with the ranges the codec and the wire tensor allow."""
    if not isinstance(d, dict):
        raise BundleError(f"manifest: 'modes[{i}]' must be an object, got {type(d).__name__}")
    mode_id = _require_int(d, "id", f"modes[{i}].", 0, MAX_MODE_ID)
    where = f"modes[{i}] (id {mode_id})."
    _require(d, "name", str, where)
    _require_int(d, "channels", where, 1, wire_channels)
    bits = _require(d, "bits", int, where)
    if bits not in PACKED_BITS:
        raise BundleError(
            f"manifest: '{where}bits' must be one of {list(PACKED_BITS)} (the wire's bit depths), got {bits}"
        )
    quant = _require(d, "quant", dict, where)
    _require_number(quant, "scale", where + "quant.", positive=True)
    _require_int(quant, "zero_point", where + "quant.", 0, (1 << bits) - 1)
    if "head" in d:
        _require(d, "head", str, where)
    if "bytes_per_frame" in d and not (is_num(d["bytes_per_frame"]) and d["bytes_per_frame"] >= 0):
        raise BundleError(f"manifest: '{where}bytes_per_frame' must be a number >= 0, got {d['bytes_per_frame']!r}")
    acc = d.get("accuracy")
    if acc is not None and not (is_num(acc) and 0 <= acc <= 1):
        raise BundleError(f"manifest: '{where}accuracy' must be null or a number in [0, 1], got {acc!r}")
    head_ms = d.get("head_ms", {})
    if not isinstance(head_ms, dict) or not all(is_num(v) for v in head_ms.values()):
        raise BundleError(f"manifest: '{where}head_ms' must map device profile names to numbers, got {head_ms!r}")


def _validate_file_entry(family: Family, role: str, entry: Any) -> None:
    if not family.allows_role(role):
        raise BundleError(
            f"manifest: unknown file role '{role}' for family {family.name} (known: {', '.join(family.role_names())})"
        )
    if not isinstance(entry, dict):
        raise BundleError(f"manifest: 'files.{role}' must be an object, got {type(entry).__name__}")
    path = _require(entry, "path", str, f"files.{role}.")
    if not path or "/" in path or "\\" in path or path.startswith("."):
        raise BundleError(f"manifest: 'files.{role}.path' must be a plain file name, got {path!r}")
    digest = _require(entry, "sha256", str, f"files.{role}.")
    if not SHA256_HEX.match(digest):
        raise BundleError(
            f"manifest: 'files.{role}.sha256' must be 64 lowercase hex characters (docs/BUNDLE.md section 2), "
            f"got {digest!r}"
        )
    if "bytes" in entry:
        _require_int(entry, "bytes", f"files.{role}.", 0, MAX_FILE_BYTES)


def validate_manifest(m: dict[str, Any]) -> None:
    """Check the manifest against docs/BUNDLE.md section 3: required keys, their JSON types and
    ranges; raise :class:`BundleError` naming the first problem found (the key, and the mode id or
    file role it belongs to)."""
    if not isinstance(m, dict):
        raise BundleError("manifest: top level must be a JSON object")
    version = _require(m, "schema_version", int, "")
    if version != SCHEMA_VERSION:
        raise BundleError(
            f"manifest: schema_version {version} is not supported (this edgesplit reads {SCHEMA_VERSION})"
        )
    try:
        family = get_family(_require(m, "family", str, ""))
    except UnknownFamilyError as e:
        raise BundleError(f"manifest: {e}") from None
    _require(m, "name", str, "")
    classes = _require(m, "classes", list, "")
    if not classes or not all(isinstance(c, str) for c in classes):
        raise BundleError("manifest: 'classes' must be a non-empty list of names")
    _validate_input(m)
    if family.serving != "scatter":
        _validate_head_tail(m, family)
        return
    files = _validate_files(m, family)
    try:
        scatter.validate_scatter(m, files)
    except ScatterManifestError as e:
        raise BundleError(f"manifest: {e}") from None


def _validate_files(m: dict[str, Any], family: Family) -> dict[str, Any]:
    files = _require(m, "files", dict, "")
    for role in family.required_files:
        if role not in files:
            raise BundleError(f"manifest: 'files' has no '{role}' entry")
    for role, entry in files.items():
        _validate_file_entry(family, role, entry)
    return files


def _validate_head_tail(m: dict[str, Any], family: Family) -> None:
    """The wire tensor, the quantized modes and the heads they run (sections 3.3, 6)."""
    wire = _require(m, "wire", dict, "")
    _require(wire, "name", str, "wire.")
    wire_channels = _require_dims(wire, "shape", "wire.")[0]
    modes = _require(m, "modes", list, "")
    if not modes:
        raise BundleError("manifest: 'modes' must list at least one mode")
    for i, x in enumerate(modes):
        _validate_mode(x, i, wire_channels)
    parsed = [Mode.from_dict(x) for x in modes]
    ids = [x.id for x in parsed]
    if len(set(ids)) != len(ids):
        raise BundleError(f"manifest: mode ids must be unique, got {ids}")
    if "default_mode" in m:
        default = _require(m, "default_mode", int, "")
        if default not in ids:
            raise BundleError(f"manifest: 'default_mode' {default} names no mode (modes: {', '.join(map(str, ids))})")
    files = _validate_files(m, family)
    for x in parsed:
        if not family.is_head_role(x.head):
            raise BundleError(
                f"manifest: mode {x.id} names head '{x.head}', which is not a head role of family "
                f"{family.name} ({'head or head.<tag>' if family.head_per_mode else 'head'})"
            )
        if x.head not in files:
            raise BundleError(f"manifest: mode {x.id} runs head '{x.head}' but 'files' has no such entry")


class Bundle:
    """A verified bundle on disk. Construct with :meth:`load`."""

    def __init__(self, root: Path, manifest: dict[str, Any], manifest_bytes: bytes):
        self.root = root
        self.manifest = manifest
        self.hash = hashlib.sha256(manifest_bytes).hexdigest()
        self.serving = get_family(manifest["family"]).serving  # "head-tail" or "scatter"
        scattered = self.serving == "scatter"
        self.modes = [] if scattered else [Mode.from_dict(x) for x in manifest["modes"]]  # quantized wire modes
        self._modes_by_id = {m.id: m for m in self.modes}
        # scatter only: feature modes, sub-models in id order, the fusion graph's role and names
        self.feature_modes, self.submodels, self.fusion = scatter.parse(manifest) if scattered else ([], [], None)

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> "Bundle":
        """Load a bundle directory (or a ``.tar``/``.tar.gz`` of one) and verify every file hash."""
        path = Path(path)
        if path.is_file() and tarfile.is_tarfile(path):
            path = _extract_tar(path)
        mpath = path / MANIFEST
        if not mpath.is_file():
            raise BundleError(f"{path}: not a bundle (no {MANIFEST})")
        raw = mpath.read_bytes()
        try:
            manifest = json.loads(raw)
        except json.JSONDecodeError as e:
            raise BundleError(f"{mpath}: not valid JSON: {e}") from None
        validate_manifest(manifest)
        bundle = cls(path, manifest, raw)
        if verify:
            bundle.verify()
        return bundle

    def verify(self) -> None:
        """Re-hash every file the manifest names; raise on the first missing or altered one."""
        for role, entry in self.manifest["files"].items():
            f = self.root / entry["path"]
            if not f.is_file():
                raise BundleError(f"bundle {self.root}: {role} file '{entry['path']}' is missing")
            size = f.stat().st_size
            if "bytes" in entry and entry["bytes"] != size:
                raise BundleError(
                    f"bundle {self.root}: files.{role}.bytes is {entry['bytes']} but '{entry['path']}' has "
                    f"{size} bytes; the file was truncated, altered or belongs to another bundle"
                )
            actual = sha256_file(f)
            if actual != entry["sha256"]:
                raise BundleError(
                    f"bundle {self.root}: '{entry['path']}' does not match its manifest hash "
                    f"(expected sha256 {entry['sha256'][:16]}..., found {actual[:16]}...); "
                    "the file was altered or belongs to another bundle: re-export or re-copy the bundle"
                )

    # -- accessors -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def family(self) -> str:
        return self.manifest["family"]

    @property
    def classes(self) -> list[str]:
        return self.manifest["classes"]

    @property
    def input_spec(self) -> dict[str, Any]:
        return self.manifest["input"]

    @property
    def wire_spec(self) -> dict[str, Any]:
        if "wire" not in self.manifest:
            raise BundleError(f"bundle '{self.name}' ({self.family}) sends features, not a wire tensor")
        return self.manifest["wire"]

    def feature_mode(self, mode_id: int | None = None) -> FeatureMode:
        """A scatter bundle's feature mode by id (None: ``default_mode``, else the first listed)."""
        fm = scatter.pick_mode(self.feature_modes, self.manifest.get("default_mode"), mode_id)
        if fm is None:
            known = ", ".join(str(x.id) for x in self.feature_modes) or "none: not a scatter bundle"
            raise BundleError(f"bundle '{self.name}' has no feature mode {mode_id} (feature modes: {known})")
        return fm

    def has(self, role: str) -> bool:
        return role in self.manifest["files"]

    def file(self, role: str) -> Path:
        try:
            return self.root / self.manifest["files"][role]["path"]
        except KeyError:
            raise BundleError(f"bundle '{self.name}' has no '{role}' file") from None

    def mode(self, mode_id: int) -> Mode:
        try:
            return self._modes_by_id[mode_id]
        except KeyError:
            known = ", ".join(str(i) for i in self._modes_by_id) or "none: a scatter bundle, see feature_mode()"
            raise BundleError(f"bundle '{self.name}' has no mode {mode_id} (modes: {known})") from None

    @property
    def head_roles(self) -> list[str]:
        """The head files the modes run, in mode order without repeats (one for most bundles)."""
        return list(dict.fromkeys(m.head for m in self.modes))

    @property
    def default_mode(self) -> Mode:
        return self.mode(self.manifest.get("default_mode", self.modes[0].id if self.modes else -1))

    def __repr__(self) -> str:
        return f"Bundle({self.name!r}, family={self.family}, hash={self.hash[:12]}, modes={len(self.modes)})"


def write_manifest(root: Path, manifest: dict[str, Any]) -> str:
    """Fill in file hashes, validate and write ``manifest.json``; return the bundle hash."""
    files = manifest.get("files")
    for role, entry in files.items() if isinstance(files, dict) else ():
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise BundleError(f"manifest: 'files.{role}' must be an object with a 'path' string")
        f = root / entry["path"]
        entry["sha256"] = sha256_file(f)
        entry["bytes"] = f.stat().st_size
    manifest.setdefault("schema_version", SCHEMA_VERSION)
    validate_manifest(manifest)
    raw = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    (root / MANIFEST).write_bytes(raw)
    return hashlib.sha256(raw).hexdigest()


def _extract_tar(path: Path) -> Path:
    out = Path(tempfile.mkdtemp(prefix="edgesplit-bundle-"))
    with tarfile.open(path) as t:
        members = [m for m in t.getmembers() if m.isfile()]
        for m in members:
            # Flatten: a bundle is one directory; refuse anything that would escape it.
            name = Path(m.name).name
            if not name or name.startswith("."):
                continue
            src = t.extractfile(m)
            if src is not None:
                (out / name).write_bytes(src.read())
    return out
