"""An ED-ViT bundle (docs/BUNDLE.md section 7.1) as the scatter runtime reads it: the sub-models
with their feature tensors, the fusion head, and ONNX Runtime sessions for them.

Loading goes through the bundle contract (:meth:`edgesplit.bundle.Bundle.load`: the manifest
validated, including the ``edvit`` object, and every file re-hashed); this module only turns what
the contract parsed into the paths and names the worker and the camera use. The bundle's identity
is the SHA-256 of its manifest bytes (section 2), what a camera names in ``hello.bundle`` and a
worker matches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import Bundle, BundleError
from ..engine.providers import OrtExecution
from ..engine.providers import ort_session as _ort_session

SERVING = "scatter"  # the serving shape this runtime runs (edgesplit.families.registry.SERVING_SHAPES)


@dataclass(frozen=True)
class SubModel:
    """One sub-model: its id (the protocol's sub-model id), its graph and its feature tensor."""

    id: int
    role: str
    path: Path
    feature_name: str
    dim: int
    classes: tuple[int, ...]


class EdvitBundle:
    """A verified ED-ViT bundle directory."""

    def __init__(self, bundle: Bundle):
        # The serving shape, not the family's name: any family registered as "scatter" runs here.
        if bundle.serving != SERVING or bundle.fusion is None:
            raise BundleError(
                f"bundle {bundle.root}: family '{bundle.family}' is served '{bundle.serving}', not '{SERVING}' "
                "(whole sub-models on several devices, fused), so the scatter runtime cannot run it"
            )
        self.bundle = bundle
        self.root = bundle.root
        self.manifest: dict[str, Any] = bundle.manifest
        self.hash = bundle.hash
        self.name = bundle.name
        self.classes: list[str] = bundle.classes
        self.input_spec: dict[str, Any] = bundle.input_spec
        self.input_shape = tuple(int(s) for s in self.input_spec["shape"])
        self.submodels = {
            s.id: SubModel(s.id, s.role, bundle.file(s.role), s.features, s.features_dim, s.classes)
            for s in bundle.submodels
        }
        self.fusion_path = bundle.file(bundle.fusion.role)
        self.fusion_names = (bundle.fusion.features, bundle.fusion.mask, bundle.fusion.output)
        self.full_path = bundle.file("full") if bundle.has("full") else None
        mode = bundle.feature_mode()  # the default one; validation guarantees at least one
        self.features_dtype = mode.features_dtype
        self.mode_id = mode.id
        # the family's own section is keyed by its name (docs/BUNDLE.md section 7; "edvit" for ED-ViT)
        self.accuracy: dict[str, Any] = dict(self.manifest[bundle.family].get("accuracy") or {})

    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> EdvitBundle:
        return cls(Bundle.load(path, verify=verify))

    @property
    def feature_dims(self) -> list[int]:
        return [self.submodels[i].dim for i in sorted(self.submodels)]


def ort_session(path: Path, threads: int | OrtExecution = 1):
    """An ONNX Runtime session of one graph: ``threads`` intra-op threads on CPU, or the agent's
    execution settings (providers, threads), through the engine's one session maker."""
    ex = threads if isinstance(threads, OrtExecution) else OrtExecution(intra_op_threads=max(1, int(threads)))
    return _ort_session(path, ex)[0]


class Fusion:
    """The fusion head: features of the present sub-models (zeros for the missing) and the mask
    -> logits over every class."""

    def __init__(self, bundle: EdvitBundle, threads: int | OrtExecution = 1):
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

    def __init__(self, bundle: EdvitBundle, ids: list[int] | None = None, threads: int | OrtExecution = 1):
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
