"""An ED-ViT bundle (docs/BUNDLE.md section 7.1) as the scatter runtime reads it: the sub-models
with their feature tensors, the fusion head, and ONNX Runtime sessions for them.

The bundle contract (:mod:`edgesplit.bundle`) validates an ED-ViT manifest once the ``edvit``
family is registered; until then this reader checks what the runtime relies on itself (the
family, the ``edvit`` object, the file roles) and re-hashes every file, so an altered bundle is
refused either way. The bundle's identity is the SHA-256 of its manifest bytes (section 2), what a
camera names in ``hello.bundle`` and a worker matches.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import MANIFEST, Bundle, BundleError, sha256_file
from ..families.registry import UnknownFamilyError, get_family

FAMILY = "edvit"


@dataclass(frozen=True)
class SubModel:
    """One sub-model: its id (the protocol's sub-model id), its graph and its feature tensor."""

    id: int
    role: str
    path: Path
    feature_name: str
    dim: int
    classes: tuple[int, ...]


def _need(d: Any, key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise BundleError(f"manifest: missing '{where}{key}'")
    v = d[key]
    if not isinstance(v, typ) or isinstance(v, bool):
        raise BundleError(f"manifest: '{where}{key}' has the wrong type ({type(v).__name__})")
    return v


def _edvit_registered() -> bool:
    try:
        get_family(FAMILY)
    except UnknownFamilyError:
        return False
    return True


def _read_manifest(root: Path, verify: bool) -> tuple[dict[str, Any], str]:
    """The manifest and the bundle hash: through the bundle contract when it knows the family,
    else read here (the files re-hashed all the same)."""
    if _edvit_registered():
        b = Bundle.load(root, verify=verify)
        return b.manifest, b.hash
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{root}: not a bundle (no {MANIFEST})")
    raw = mpath.read_bytes()
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as e:
        raise BundleError(f"{mpath}: not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("schema_version") != 1:
        raise BundleError(f"{mpath}: schema_version must be 1")
    files = _need(manifest, "files", dict, "")
    if verify:
        for role, entry in files.items():
            f = root / _need(entry, "path", str, f"files.{role}.")
            if not f.is_file():
                raise BundleError(f"bundle {root}: {role} file '{f.name}' is missing")
            if sha256_file(f) != _need(entry, "sha256", str, f"files.{role}."):
                raise BundleError(
                    f"bundle {root}: '{f.name}' does not match its manifest hash; the file was altered or "
                    "belongs to another bundle"
                )
    return manifest, hashlib.sha256(raw).hexdigest()


class EdvitBundle:
    """A verified ED-ViT bundle directory."""

    def __init__(self, root: Path, manifest: dict[str, Any], bundle_hash: str):
        if manifest.get("family") != FAMILY:
            raise BundleError(f"bundle {root}: family '{manifest.get('family')}' is not '{FAMILY}' (ED-ViT)")
        self.root = root
        self.manifest = manifest
        self.hash = bundle_hash
        self.name = str(manifest.get("name", root.name))
        self.classes: list[str] = list(_need(manifest, "classes", list, ""))
        self.input_spec: dict[str, Any] = _need(manifest, "input", dict, "")
        self.input_shape = tuple(int(s) for s in _need(self.input_spec, "shape", list, "input."))
        files = _need(manifest, "files", dict, "")
        ed = _need(manifest, "edvit", dict, "")
        subs: dict[int, SubModel] = {}
        for i, s in enumerate(_need(ed, "submodels", list, "edvit.")):
            where = f"edvit.submodels[{i}]."
            sid = _need(s, "id", int, where)
            if sid != i:
                raise BundleError(f"manifest: '{where}id' is {sid}; sub-model ids are 0..N-1 in order")
            role = _need(s, "role", str, where)
            feats = _need(s, "features", dict, where)
            subs[sid] = SubModel(
                sid,
                role,
                self._file(files, role),
                _need(feats, "name", str, where + "features."),
                _need(feats, "dim", int, where + "features."),
                tuple(_need(s, "classes", list, where)),
            )
        if not 1 <= len(subs) <= 16:
            raise BundleError(f"manifest: 'edvit.submodels' lists {len(subs)} sub-models; 1 to 16 allowed")
        covered = sorted(c for s in subs.values() for c in s.classes)
        if covered != list(range(len(self.classes))):
            raise BundleError(
                f"manifest: the sub-models' 'classes' must cover every class of the bundle exactly once, got {covered}"
            )
        self.submodels = subs
        fusion = _need(ed, "fusion", dict, "edvit.")
        self.fusion_path = self._file(files, _need(fusion, "role", str, "edvit.fusion."))
        self.fusion_names = tuple(_need(fusion, k, str, "edvit.fusion.") for k in ("features", "mask", "output"))
        self.full_path = self._file(files, "full") if "full" in files else None
        modes = _need(manifest, "modes", list, "")
        self.features_dtype = str(_need(modes[0], "features_dtype", str, "modes[0].")) if modes else "float32"
        self.mode_id = int(manifest.get("default_mode", modes[0]["id"] if modes else 0))
        self.accuracy: dict[str, Any] = dict(ed.get("accuracy") or {})

    def _file(self, files: dict, role: str) -> Path:
        if role not in files:
            raise BundleError(f"manifest: 'files' has no role '{role}'")
        return self.root / files[role]["path"]

    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> EdvitBundle:
        root = Path(path)
        manifest, bundle_hash = _read_manifest(root, verify)
        return cls(root, manifest, bundle_hash)

    @property
    def feature_dims(self) -> list[int]:
        return [self.submodels[i].dim for i in sorted(self.submodels)]


def ort_session(path: Path, threads: int = 1):
    """An ONNX Runtime CPU session of one graph (``threads`` intra-op threads)."""
    import onnxruntime as ort  # type: ignore[import-untyped]

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, int(threads))
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class Fusion:
    """The fusion head: features of the present sub-models (zeros for the missing) and the mask
    -> logits over every class."""

    def __init__(self, bundle: EdvitBundle, threads: int = 1):
        self.bundle = bundle
        self.session = ort_session(bundle.fusion_path, threads)
        self.dims = bundle.feature_dims
        self.offsets = np.cumsum([0, *self.dims])

    def __call__(self, features: dict[int, np.ndarray]) -> np.ndarray:
        """``features``: sub-model id -> its feature vector [D]. Returns the logits [K]."""
        n = len(self.dims)
        x = np.zeros((1, int(self.offsets[-1])), np.float32)
        mask = np.zeros((1, n), np.float32)
        for sid, f in features.items():
            x[0, self.offsets[sid] : self.offsets[sid + 1]] = f
            mask[0, sid] = 1.0
        fname, mname, oname = self.bundle.fusion_names
        (logits,) = self.session.run([oname], {fname: x, mname: mask})
        return np.asarray(logits[0], np.float32)


class SubModelRunner:
    """The sub-models of a bundle a process holds, each one ONNX Runtime session."""

    def __init__(self, bundle: EdvitBundle, ids: list[int] | None = None, threads: int = 1):
        self.bundle = bundle
        ids = sorted(bundle.submodels) if ids is None else sorted(ids)
        unknown = [i for i in ids if i not in bundle.submodels]
        if unknown:
            raise BundleError(f"bundle {bundle.name} has no sub-model(s) {unknown} (it has {sorted(bundle.submodels)})")
        self.ids = ids
        self.sessions = {i: ort_session(bundle.submodels[i].path, threads) for i in ids}
        self.input_name = self.sessions[ids[0]].get_inputs()[0].name if ids else "input"

    def run(self, sid: int, x: np.ndarray) -> np.ndarray:
        """One sub-model on one preprocessed frame [3, H, W] -> its features [D] (float32)."""
        sub = self.bundle.submodels[sid]
        (feats,) = self.sessions[sid].run([sub.feature_name], {self.input_name: x[None]})
        return np.asarray(feats[0], np.float32)
