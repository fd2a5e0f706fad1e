"""The ED-ViT part of a bundle manifest (docs/BUNDLE.md section 7.1), checked and parsed.

Torch-free and free of the rest of the bundle contract (the stdlib and the wire library only,
tests/test_layers.py): ED-ViT registers :func:`validate_scatter` as its ``manifest_check``, which
the bundle schema runs through the family registry and whose :class:`ScatterManifestError` (a
``ValueError``) it reports as ``BundleError("manifest: <message>")``; :mod:`edgesplit.bundle`
parses the validated section with :func:`parse`. The checks here are the ones section 7.1 adds: feature
modes instead of ``wire``; the ``edvit`` object (sub-models with ids 0..N-1 in order, N at most 16,
every class of the bundle in exactly one sub-model's list; the fusion graph's names; the measured
accuracies); one ``submodel.<id>`` file per sub-model and none for an id that does not exist.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ...wire.errors import is_int, is_num
from ...wire.scatter import MAX_SUBMODELS

FEATURE_DTYPES = ("float32", "float16")
FEATURE_BYTES = {"float32": 4, "float16": 2}
MAX_MODE_ID = (1 << 31) - 1


class ScatterManifestError(ValueError):
    """The ``edvit`` part of a manifest is malformed; the message names the key (and sub-model)."""


@dataclass(frozen=True)
class FeatureMode:
    """How the sub-models' features travel: their dtype, and the fused accuracy through it."""

    id: int
    features_dtype: str
    bytes_per_frame: int
    accuracy: float | None
    name: str = ""


@dataclass(frozen=True)
class Submodel:
    """One class-partitioned sub-model: its file role, its classes and its outputs."""

    id: int
    role: str  # "submodel.<id>"
    classes: tuple[int, ...]  # indices into the bundle's classes
    features: str  # output name of the feature vector the fusion head reads
    features_dim: int
    logits: str  # output name of its own classifier (len(classes) + 1: the last is "other")
    logits_dim: int
    params: int
    macs: int
    memory_mb: float
    config: dict[str, Any]


@dataclass(frozen=True)
class Fusion:
    """The fusion graph: its file role and input/output names."""

    role: str
    features: str  # [B, sum of features_dim], in sub-model id order, zeros for a missing one
    mask: str  # [B, N], 1 present, 0 missing
    output: str  # [B, len(classes)]


def require(d: dict, key: str, typ: type | tuple[type, ...], where: str) -> Any:
    """``d[key]`` of JSON type ``typ`` (a bool is no int), else an error naming ``where + key``."""
    if key not in d:
        raise ScatterManifestError(f"missing '{where}{key}'")
    v = d[key]
    types = typ if isinstance(typ, tuple) else (typ,)
    if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
        names = " or ".join(t.__name__ for t in types)
        raise ScatterManifestError(f"'{where}{key}' must be {names}, got {type(v).__name__}")
    return v


def _int(d: dict, key: str, where: str, lo: int, hi: int) -> int:
    v = require(d, key, int, where)
    if not lo <= v <= hi:
        raise ScatterManifestError(f"'{where}{key}' must be in [{lo}, {hi}], got {v}")
    return v


def _accuracy(v: Any, where: str) -> None:
    if v is not None and not (is_num(v) and 0 <= v <= 1):
        raise ScatterManifestError(f"'{where}' must be null or a number in [0, 1], got {v!r}")


def _check_mode(d: Any, i: int) -> None:
    if not isinstance(d, dict):
        raise ScatterManifestError(f"'modes[{i}]' must be an object, got {type(d).__name__}")
    mode_id = _int(d, "id", f"modes[{i}].", 0, MAX_MODE_ID)
    where = f"modes[{i}] (id {mode_id})."
    if "wire" in d or "bits" in d:
        raise ScatterManifestError(f"'{where}': an edvit mode has features_dtype, not bits or a wire (section 7.1)")
    dtype = require(d, "features_dtype", str, where)
    if dtype not in FEATURE_DTYPES:
        raise ScatterManifestError(f"'{where}features_dtype' must be one of {list(FEATURE_DTYPES)}, got {dtype!r}")
    if "bytes_per_frame" in d:
        _int(d, "bytes_per_frame", where, 0, 1 << 40)
    _accuracy(d.get("accuracy"), where + "accuracy")


def _check_output(d: dict, key: str, where: str, dim: int | None) -> int:
    out = require(d, key, dict, where)
    require(out, "name", str, f"{where}{key}.")
    got = _int(out, "dim", f"{where}{key}.", 1, 1 << 20)
    if dim is not None and got != dim:
        raise ScatterManifestError(f"'{where}{key}.dim' must be {dim} (the bundle's classes + 'other'), got {got}")
    return got


def _check_submodel(d: Any, i: int, n_classes: int) -> list[int]:
    if not isinstance(d, dict):
        raise ScatterManifestError(f"'edvit.submodels[{i}]' must be an object, got {type(d).__name__}")
    sid = require(d, "id", int, f"edvit.submodels[{i}].")
    if sid != i:
        raise ScatterManifestError(f"'edvit.submodels[{i}].id' must be {i} (ids are 0..N-1 in order), got {sid}")
    where = f"edvit.submodels[{i}]."
    role = require(d, "role", str, where)
    if role != f"submodel.{i}":
        raise ScatterManifestError(f"'{where}role' must be 'submodel.{i}', got {role!r}")
    classes = require(d, "classes", list, where)
    if not classes or not all(is_int(c) and 0 <= c < n_classes for c in classes):
        raise ScatterManifestError(
            f"'{where}classes' must be a non-empty list of class indices in [0, {n_classes}), got {classes!r}"
        )
    if len(set(classes)) != len(classes):
        raise ScatterManifestError(f"'{where}classes' lists a class twice: {classes!r}")
    return classes


def _check_submodel_outputs(d: dict, i: int) -> None:
    where = f"edvit.submodels[{i}]."
    classes = d["classes"]
    _check_output(d, "features", where, None)
    _check_output(d, "logits", where, len(classes) + 1)
    _int(d, "params", where, 0, 1 << 50)
    _int(d, "macs", where, 0, 1 << 60)
    mem = require(d, "memory_mb", (int, float), where)
    if not (math.isfinite(mem) and mem > 0):
        raise ScatterManifestError(f"'{where}memory_mb' must be a finite number > 0, got {mem}")
    if "config" in d:
        require(d, "config", dict, where)


def check_partition(parts: list[list[int]], classes: list[str]) -> None:
    """Every class in exactly one part: an uncovered class or one covered twice is named."""
    owner: dict[int, int] = {}
    for sid, part in enumerate(parts):
        for c in part:
            if c in owner:
                raise ScatterManifestError(
                    f"edvit partition: class {c} ('{classes[c]}') is covered by sub-models {owner[c]} and {sid}; "
                    "every class must belong to exactly one sub-model"
                )
            owner[c] = sid
    missing = [c for c in range(len(classes)) if c not in owner]
    if missing:
        names = ", ".join(f"{c} ('{classes[c]}')" for c in missing)
        raise ScatterManifestError(f"edvit partition: class {names} is covered by no sub-model")


def validate_scatter(m: dict[str, Any], files: dict[str, Any]) -> None:
    """Section 7.1 on a manifest whose common keys (family, classes, input, files) are checked."""
    if "wire" in m:
        raise ScatterManifestError("'wire' must be absent from an edvit bundle (features travel per mode)")
    modes = require(m, "modes", list, "")
    if not modes:
        raise ScatterManifestError("'modes' must list at least one feature mode")
    for i, x in enumerate(modes):
        _check_mode(x, i)
    ids = [x["id"] for x in modes]
    if len(set(ids)) != len(ids):
        raise ScatterManifestError(f"mode ids must be unique, got {ids}")
    if "default_mode" in m and require(m, "default_mode", int, "") not in ids:
        raise ScatterManifestError(f"'default_mode' {m['default_mode']} names no mode (modes: {ids})")
    ed = require(m, "edvit", dict, "")
    subs = require(ed, "submodels", list, "edvit.")
    if not 1 <= len(subs) <= MAX_SUBMODELS:
        raise ScatterManifestError(f"'edvit.submodels' must list 1 to {MAX_SUBMODELS} sub-models, got {len(subs)}")
    classes = m["classes"]
    check_partition([_check_submodel(d, i, len(classes)) for i, d in enumerate(subs)], classes)
    for i, d in enumerate(subs):
        _check_submodel_outputs(d, i)
    fusion = require(ed, "fusion", dict, "edvit.")
    for key in ("role", "features", "mask", "output"):
        require(fusion, key, str, "edvit.fusion.")
    if fusion["role"] != "fusion":
        raise ScatterManifestError(f"'edvit.fusion.role' must be 'fusion', got {fusion['role']!r}")
    part = require(ed, "partition", dict, "edvit.")
    require(part, "method", str, "edvit.partition.")
    require(part, "seed", int, "edvit.partition.")
    _check_accuracy(require(ed, "accuracy", dict, "edvit."), len(subs))
    if "placement" in ed:
        require(ed, "placement", dict, "edvit.")
    for i in range(len(subs)):
        if f"submodel.{i}" not in files:
            raise ScatterManifestError(f"'files' has no 'submodel.{i}' entry (sub-model {i})")
    for role in files:
        if role.startswith("submodel.") and role not in {f"submodel.{i}" for i in range(len(subs))}:
            raise ScatterManifestError(f"'files.{role}' names no sub-model (the bundle has {len(subs)})")


def _check_accuracy(acc: dict, n: int) -> None:
    for key in ("full", "fused", "missing_mean"):
        if key in acc:
            _accuracy(acc[key], f"edvit.accuracy.{key}")
    missing = acc.get("missing_one", {})
    if not isinstance(missing, dict) or not set(missing) <= {str(i) for i in range(n)}:
        raise ScatterManifestError(
            f"'edvit.accuracy.missing_one' must map sub-model ids '0'..'{n - 1}' to accuracies, got {missing!r}"
        )
    for k, v in missing.items():
        _accuracy(v, f"edvit.accuracy.missing_one.{k}")


def feature_modes(m: dict[str, Any]) -> list[FeatureMode]:
    """The modes of a validated manifest."""
    return [
        FeatureMode(
            x["id"],
            x["features_dtype"],
            int(x.get("bytes_per_frame", 0)),
            None if x.get("accuracy") is None else float(x["accuracy"]),
            str(x.get("name", x["features_dtype"])),
        )
        for x in m["modes"]
    ]


def submodels(m: dict[str, Any]) -> list[Submodel]:
    """The sub-models of a validated manifest, in id order."""
    return [
        Submodel(
            d["id"],
            d["role"],
            tuple(d["classes"]),
            d["features"]["name"],
            d["features"]["dim"],
            d["logits"]["name"],
            d["logits"]["dim"],
            d["params"],
            d["macs"],
            float(d["memory_mb"]),
            dict(d.get("config", {})),
        )
        for d in m["edvit"]["submodels"]
    ]


def fusion(m: dict[str, Any]) -> Fusion:
    f = m["edvit"]["fusion"]
    return Fusion(f["role"], f["features"], f["mask"], f["output"])


def parse(m: dict[str, Any]) -> tuple[list[FeatureMode], list[Submodel], Fusion | None]:
    """Feature modes, sub-models and fusion of a validated manifest (what ``Bundle`` holds)."""
    return feature_modes(m), submodels(m), fusion(m)
