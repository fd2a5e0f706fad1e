"""An ED-ViT bundle's fusion head on the server (docs/PROTOCOL.md §13.5, BUNDLE.md §7.1): the
fused-request checks (:class:`FusionCheck`, I/O thread) and the fusion engine that turns a batch of
fused requests into logits (:class:`FusionRunner`, compute thread).

A fused request carries the features of the sub-models present in one frame (``submodels`` and one
tensor each). The runner writes each into its slice of the concatenated feature row (sub-model id
order, zeros for a missing one), sets the presence mask, and runs ``fusion.onnx`` through the same
engine interface as a head-tail bundle's tail. To the session table, the scheduler and the compute
thread a fused request is one queued item of one row: batches group items by (bundle, mode) as
for any bundle, so a fused batch never mixes bundles or feature modes.

:func:`check_for` and :func:`runner_for` pick the right kind for a bundle (its ``serving`` shape).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from ..bundle import Bundle, BundleError
from ..engine import EngineOptions  # numpy only: backends load lazily
from ..wire import codec
from ..wire.errors import ErrorCode, ProtocolError, WireError
from ..wire.kinds import FEATURE_FUSED_REQUESTS
from .batcher import Item
from .tail_runner import RequestCheck, TailRunner

log = logging.getLogger("edgesplit.server")

FUSED_FEATURES = (FEATURE_FUSED_REQUESTS,)  # what a session on an ED-ViT bundle is offered


class FusionCheck:
    """What a fused request must look like for one ED-ViT bundle: the sub-models' feature tensors
    (name, length) and the feature modes (the dtype features travel in)."""

    fused = True

    def __init__(self, bundle: Bundle):
        if bundle.serving != "scatter" or bundle.fusion is None:
            raise BundleError(f"bundle '{bundle.name}' ({bundle.family}) has no fusion head")
        self.bundle = bundle
        self.features = {s.id: (s.features, int(s.features_dim)) for s in bundle.submodels}
        self.modes = {m.id: m for m in bundle.feature_modes}

    def check_fused(self, h: dict[str, Any], rid: int) -> dict[str, Any]:
        """The checks of §13.5 beyond what :func:`~edgesplit.wire.protocol.parse` did (with the
        feature on: ``submodels`` valid and as long as ``tensors``, never compact), in order:
        each id a sub-model of the bundle [UNKNOWN_SUBMODEL]; each descriptor that sub-model's
        feature tensor by name and shape [MALFORMED]; ``mode`` a feature mode [UNKNOWN_MODE]; each
        descriptor raw [UNSUPPORTED] in the mode's dtype [UNKNOWN_MODE]. Returns the item's
        descriptor: ``{"submodels": [...], "tensors": [...]}``."""
        subs, tensors = h.get("submodels"), h.get("tensors")
        if subs is None or tensors is None:
            raise ProtocolError(
                ErrorCode.MALFORMED,
                f"bundle '{self.bundle.name}' is an ED-ViT bundle: a request carries 'submodels' and the features "
                "of each (a fused request, full form)",
                rid,
            )
        unknown = [s for s in subs if s not in self.features]
        if unknown:
            raise ProtocolError(
                ErrorCode.UNKNOWN_SUBMODEL,
                f"bundle '{self.bundle.name}' has no sub-model(s) {unknown} (it has {sorted(self.features)})",
                rid,
            )
        for s, d in zip(subs, tensors):
            name, dim = self.features[s]
            if d["name"] != name or list(d["shape"]) != [dim]:
                raise ProtocolError(
                    ErrorCode.MALFORMED,
                    f"sub-model {s}'s features are {d['name']!r} {list(d['shape'])}; the bundle's are {name!r} [{dim}]",
                    rid,
                )
        mode = self.modes.get(h["mode"])
        if mode is None:
            raise ProtocolError(
                ErrorCode.UNKNOWN_MODE,
                f"bundle '{self.bundle.name}' has no feature mode {h['mode']} (modes: {sorted(self.modes)})",
                rid,
            )
        for s, d in zip(subs, tensors):
            if d["codec"] != "raw":
                raise ProtocolError(
                    ErrorCode.UNSUPPORTED, f"sub-model {s}'s features travel raw, not {d['codec']}", rid
                )
            if d["dtype"] != mode.features_dtype:
                raise ProtocolError(
                    ErrorCode.UNKNOWN_MODE,
                    f"sub-model {s}'s features are {d['dtype']}; mode {mode.id} sends {mode.features_dtype}",
                    rid,
                )
        return {"submodels": subs, "tensors": tensors}


class FusionRunner:
    """The fusion head's engine plus what turns fused requests into its two inputs."""

    fused = True

    def __init__(
        self, bundle: Bundle, backend: str = "ort", threads: int | None = None, options: EngineOptions | None = None
    ):
        from ..engine import create_engine

        self.bundle = bundle
        self.requests = FusionCheck(bundle)
        fusion = bundle.fusion
        assert fusion is not None  # FusionCheck refused a bundle without one
        opts = EngineOptions.make(options, **({"threads": threads} if threads is not None else {}))
        # The fusion head is an ONNX graph only (no torch export): torch serves it with ONNX Runtime.
        used = "ort" if backend == "torch" else backend
        if used != backend:
            log.warning("bundle '%s': the fusion head runs with ONNX Runtime (it has no torch file)", bundle.name)
        self.backend = used
        self.engine = create_engine(bundle.file(fusion.role), used, opts)
        self.names = (fusion.features, fusion.mask, fusion.output)
        dims = [int(s.features_dim) for s in bundle.submodels]
        self.offsets = np.cumsum([0, *dims]).tolist()
        self.n = len(dims)
        self._out_descs: dict[tuple, list[dict[str, Any]]] = {}

    def warmup(self) -> None:
        f, m, _ = self.names
        self.engine.run({f: np.zeros((1, self.offsets[-1]), np.float32), m: np.ones((1, self.n), np.float32)})

    def run(self, items: list[Item]) -> tuple[np.ndarray, list[int], dict[int, WireError]]:
        """Assemble the items' feature rows and masks and run the fusion head. Returns (logits
        [rows, K], row offsets, per-item decode errors by index), as :meth:`TailRunner.run`."""
        x = np.zeros((len(items), self.offsets[-1]), np.float32)
        mask = np.zeros((len(items), self.n), np.float32)
        offsets: list[int] = []
        errors: dict[int, WireError] = {}
        r = 0
        for i, it in enumerate(items):
            try:
                for s, d, frame in zip(it.desc["submodels"], it.desc["tensors"], it.payload):
                    codec.decode(d, frame, out=x[r, self.offsets[s] : self.offsets[s + 1]], validate=False)
                    mask[r, s] = 1.0
            except WireError as e:
                errors[i] = e
                offsets.append(-1)
                x[r] = 0.0
                mask[r] = 0.0
                continue
            offsets.append(r)
            r += 1
        if r == 0:
            return np.empty((0,), np.float32), offsets, errors
        f, m, o = self.names
        out = self.engine.run({f: x[:r], m: mask[:r]})[o]
        return np.ascontiguousarray(out, dtype="<f4"), offsets, errors

    def outputs_for(self, shape: tuple) -> list[dict[str, Any]]:
        """The ``outputs`` list of a result carrying logits of ``shape`` (cached per shape)."""
        o = self._out_descs.get(shape)
        if o is None:
            n = 4 * math.prod(shape)
            o = self._out_descs[shape] = [codec.descriptor(self.names[2], shape, "float32", 32, 1.0, 0, None, "raw", n)]
        return o


def check_for(bundle: Bundle) -> RequestCheck | FusionCheck:
    """The request checks for a bundle: a head-tail bundle's wire tensor, or an ED-ViT bundle's
    fused requests."""
    return FusionCheck(bundle) if bundle.serving == "scatter" else RequestCheck(bundle)


def runner_for(
    bundle: Bundle, backend: str = "ort", threads: int | None = None, options: EngineOptions | None = None
) -> TailRunner | FusionRunner:
    """The engine the server runs for a bundle: its tail, or an ED-ViT bundle's fusion head."""
    cls = FusionRunner if bundle.serving == "scatter" else TailRunner
    return cls(bundle, backend, threads, options)
