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
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from .bundle_schema import CDF_ROLE, SCHEMA_VERSION, U_SHAPED, BundleError, Mode, validate_manifest
from .families.registry import HEAD_ROLE, get_family
from .wire.ans_tables import TableSet, parse_tables

MANIFEST = "manifest.json"
# A family whose modes run their own heads (``Family.head_per_mode``): role "head" is the default
# mode's, "head.<tag>" (``HEAD_ROLE``, e.g. "head.c3") the others'; each mode names its head
# (``Mode.head``). A family-defined shape (ED-ViT's "scatter", section 7.1) is parsed by the family's
# torch-free ``manifest_parse`` into feature modes, sub-models and the fusion (its own types).
# The manifest schema (Mode, validate_manifest, BundleError) lives in bundle_schema and is re-exported.
__all__ = [
    "HEAD_ROLE",
    "SCHEMA_VERSION",
    "Bundle",
    "BundleError",
    "Mode",
    "validate_manifest",
]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Bundle:
    """A verified bundle on disk. Construct with :meth:`load`."""

    def __init__(self, root: Path, manifest: dict[str, Any], manifest_bytes: bytes):
        self.root = root
        self.manifest = manifest
        self.hash = hashlib.sha256(manifest_bytes).hexdigest()
        family = get_family(manifest["family"])
        self.serving = family.serving  # "head-tail", "scatter" or "u-shaped"
        scattered = family.manifest_parse != ""
        self.modes: list[Mode]  # quantized wire modes; a U-shaped bundle's: the token tensor's dtypes
        if scattered:
            self.modes = []
        elif self.serving == U_SHAPED:
            self.modes = [Mode.from_token_dict(x, manifest["wire"]["shape"][0]) for x in manifest["modes"]]
        else:
            self.modes = [Mode.from_dict(x) for x in manifest["modes"]]
        self._modes_by_id = {m.id: m for m in self.modes}
        # scatter only: feature modes, sub-models in id order, the fusion graph's role and names
        self.feature_modes: list[Any]
        self.feature_modes, self.submodels, self.fusion = (
            family.entry("manifest_parse")(manifest) if scattered else ([], [], None)
        )
        self.tables: dict[str, TableSet] = {}  # the cdf file's table sets, by name (ans modes only)

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
        bundle._load_tables()
        return bundle

    def _load_tables(self) -> None:
        """Parse the ``cdf`` file and check each ans mode against it (BUNDLE.md 7.2): its table set
        exists, has the manifest's digest and one table per channel the mode sends."""
        coded = [m for m in self.modes if m.entropy_coded]
        if not coded:
            return
        f = self.file(CDF_ROLE)
        try:
            self.tables = parse_tables(f.read_bytes())
        except (OSError, ValueError) as e:
            raise BundleError(f"bundle {self.root}: '{f.name}' (role {CDF_ROLE}): {e}") from None
        for m in coded:
            ts = self.tables.get(str(m.tables))
            if ts is None:
                raise BundleError(
                    f"bundle {self.root}: mode {m.id} codes with table set '{m.tables}', which '{f.name}' does not "
                    f"hold (sets: {', '.join(sorted(self.tables))})"
                )
            if ts.digest != m.tables_sha256:
                raise BundleError(
                    f"bundle {self.root}: mode {m.id}: table set '{m.tables}' has digest {ts.digest[:16]}..., the "
                    f"manifest's entropy.sha256 says {str(m.tables_sha256)[:16]}..."
                )
            if ts.channels != m.channels:
                raise BundleError(
                    f"bundle {self.root}: mode {m.id} sends {m.channels} channels, table set '{m.tables}' has "
                    f"{ts.channels} tables"
                )

    def tables_for(self, mode: Mode) -> TableSet:
        """The table set an ans mode codes with (checked at load)."""
        try:
            return self.tables[str(mode.tables)]
        except KeyError:
            raise BundleError(f"bundle '{self.name}': mode {mode.id} is not entropy-coded") from None

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

    def feature_mode(self, mode_id: int | None = None) -> Any:
        """A scatter bundle's feature mode by id (None: ``default_mode``, else the first listed)."""
        want = mode_id
        if want is None:
            default = self.manifest.get("default_mode")
            want = default if default is not None else (self.feature_modes[0].id if self.feature_modes else None)
        fm = next((x for x in self.feature_modes if x.id == want), None)
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
