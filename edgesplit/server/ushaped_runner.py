"""A U-shaped bundle's body on the server (docs/PROTOCOL.md §15.6, BUNDLE.md §7.3): the request
checks (:class:`UShapedCheck`, I/O thread) and the body engine that turns a batch of requests into
the body's output (:class:`UShapedRunner`, compute thread).

The daemon serves a U-shaped bundle as it serves a head-tail one: the session table checks each
request here, the batcher groups them by (bundle, mode), the compute thread runs a batch and packs
one result per request. What differs is what runs and what comes back: the request's tensor is the
head's tokens ``[T, D]`` (or ``[n, T, D]``) in its mode's dtype (float32, float16, or 8-bit codes
with their own per-tensor scale), the runner decodes them into one float32 batch, runs
``body.onnx``, and each result carries that request's rows of the body's output, named
``"body_out"``, of the request's shape, in the encoding its mode states (:meth:`UShapedRunner.answer`,
§15.6.1: float32, float16, or 8-bit codes with a scale measured on that result as the agent
measures its tokens'; float32 for a mode that states none). The agent runs the tail. Requests are
never compact (a token tensor's scale travels with it).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from ..bundle import Bundle, BundleError
from ..engine import EngineOptions  # numpy only: backends load lazily
from ..wire import codec
from ..wire import split_train as S
from ..wire.errors import ErrorCode, ProtocolError, WireError
from ..wire.split_train import FEATURE_U_SHAPED, FEATURE_U_SHAPED_ANSWERS, REPLY_NAMES, TRAIN_FWD
from .batcher import Item
from .tail_runner import InProcessRunner

log = logging.getLogger("edgesplit.server")

U_SHAPED = "u-shaped"
# what a session on a U-shaped bundle is offered: its results come in each mode's answer encoding
U_SHAPED_FEATURES = (FEATURE_U_SHAPED, FEATURE_U_SHAPED_ANSWERS)
RESULT_NAME = REPLY_NAMES[TRAIN_FWD]  # "body_out"
_LOSSLESS = ("raw", "zstd")  # a token tensor's codecs (§15.3); "ans" codes a wire tensor with tables


class UShapedCheck:
    """What a request must look like to run a U-shaped bundle's body: the token tensor's name and
    ``[T, D]``, and each mode's dtype."""

    fused = False  # answered like any request, one result per request (FusionCheck's are fused)
    u_shaped = True

    def __init__(self, bundle: Bundle):
        if bundle.serving != U_SHAPED:
            raise BundleError(f"bundle '{bundle.name}' ({bundle.family}) is not U-shaped")
        self.bundle = bundle
        spec = bundle.wire_spec
        self.wire_name = spec["name"]
        self.tokens = tuple(int(s) for s in spec["shape"])  # (T, D)
        self.modes = {m.id: m for m in bundle.modes}

    def check(self, mode_id: int, d: dict[str, Any], rid: int) -> tuple[int, bool]:
        """§15.6: the mode one of the bundle's [UNKNOWN_MODE]; the tensor named as the wire, shaped
        ``[T, D]`` or ``[n, T, D]``, no channel axis [MALFORMED]; its dtype and bits the mode's
        [UNKNOWN_MODE]; a lossless codec [UNSUPPORTED]. Returns (rows, single)."""
        mode = self.modes.get(mode_id)
        if mode is None:
            raise ProtocolError(
                ErrorCode.UNKNOWN_MODE,
                f"bundle '{self.bundle.name}' has no mode {mode_id} (modes: {sorted(self.modes)})",
                rid,
            )
        if d["name"] != self.wire_name:
            raise ProtocolError(
                ErrorCode.MALFORMED, f"tensor is named '{d['name']}', the bundle's tokens are '{self.wire_name}'", rid
            )
        shape, (T, D) = d["shape"], self.tokens
        nd = len(shape)
        if nd not in (2, 3) or tuple(shape[-2:]) != (T, D) or (nd == 3 and shape[0] < 1):
            raise ProtocolError(
                ErrorCode.MALFORMED, f"tensor shape {shape} is not the tokens [{T}, {D}] or [n, {T}, {D}]", rid
            )
        if d["channels"] is not None:
            raise ProtocolError(ErrorCode.MALFORMED, "a token tensor has no channel axis ('channels' must be nil)", rid)
        if d["dtype"] != mode.dtype or d["bits"] != mode.bits:
            raise ProtocolError(
                ErrorCode.UNKNOWN_MODE,
                f"tensor ({d['dtype']}, {d['bits']} bits) disagrees with mode {mode.id} '{mode.name}' "
                f"({mode.dtype}, {mode.bits} bits)",
                rid,
            )
        if d["codec"] not in _LOSSLESS:
            raise ProtocolError(ErrorCode.UNSUPPORTED, f"codec '{d['codec']}' does not carry token tensors", rid)
        return (1, True) if nd == 2 else (int(shape[0]), False)

    def check_compact(self, mode_id: int, frame, rid: int) -> dict[str, Any]:
        raise ProtocolError(
            ErrorCode.MALFORMED,
            f"bundle '{self.bundle.name}' is U-shaped: a request carries its token tensor's descriptor (full form, "
            "PROTOCOL.md §15.6)",
            rid,
        )


class UShapedRunner(InProcessRunner):
    """A U-shaped bundle's body engine (``body.onnx``) and the batch buffer its requests decode into."""

    fused = False
    what = " (body)"

    def __init__(
        self, bundle: Bundle, backend: str = "ort", threads: int | None = None, options: EngineOptions | None = None
    ):
        from ..engine import create_engine

        opts = EngineOptions.make(options, **({"threads": threads} if threads is not None else {}))
        self.max_batch = opts.max_batch
        if backend == "torch":  # a U-shaped bundle ships ONNX only; ONNX Runtime stands in where it can
            opts.check("ort")
            log.warning("bundle '%s' is U-shaped: running its ONNX body with ONNX Runtime", bundle.name)
            backend = "ort"
        self.backend = backend
        self.bundle = bundle
        self._bind(create_engine(bundle.file("body"), backend, opts), UShapedCheck(bundle))
        self.tokens = self.input_shape = self.requests.tokens
        self._buf = np.zeros((0, *self.tokens), np.float32)
        # mode id -> the bits its results carry the body's output at (32, 16, 8: §15.6.1)
        self.answer_bits = {m.id: int(m.answer_bits or 32) for m in bundle.modes}

    def _buffer(self, rows: int) -> np.ndarray:
        """The reusable input batch ``[n >= rows, T, D]`` (compute thread only; every row used is
        overwritten by decoding, so it is never cleared)."""
        if self._buf.shape[0] < rows:
            n = 1
            while n < rows:
                n *= 2
            self._buf = np.zeros((n, *self.tokens), np.float32)
        return self._buf

    @staticmethod
    def _decode(d: dict[str, Any], payload, dst: np.ndarray) -> None:
        """One checked token tensor -> float32 in ``dst``; a float tensor holding NaN or infinity is
        MALFORMED (PROTOCOL.md §15.5, step 7: nothing non-finite is run)."""
        codec.decode(d, payload, out=dst, validate=False)
        if d["dtype"] != "uint8" and not np.isfinite(dst).all():
            raise WireError(ErrorCode.MALFORMED, f"tensor '{d['name']}' holds NaN or infinity")

    def run(self, items: list[Item]) -> tuple[np.ndarray, list[int], dict[int, WireError]]:
        """Decode the items into one batch and run the body: (body output, row offsets, per-item
        decode errors by index); items that failed to decode get no rows."""
        x = self._buffer(sum(it.rows for it in items))
        offsets: list[int] = []
        errors: dict[int, WireError] = {}
        r = 0
        for i, it in enumerate(items):
            try:
                self._decode(it.desc, it.payload, x[r] if it.single else x[r : r + it.rows])
            except WireError as e:
                errors[i] = e
                offsets.append(-1)
                continue
            offsets.append(r)
            r += it.rows
        if not r:
            return np.empty((0, *self.tokens), np.float32), offsets, errors
        out = self.engine.run({self.input_name: x[:r]})[self.output_name]
        return np.ascontiguousarray(out, dtype="<f4"), offsets, errors

    def answer(self, it: Item, out: np.ndarray) -> tuple[list[dict[str, Any]], bytes]:
        """One request's result (compute thread): its rows ``out`` of the body's output in its mode's
        answer encoding -> (``outputs``, payload). float32: the output as computed; float16 and
        8-bit codes: the tokens' own encoding (:func:`~edgesplit.wire.split_train.encode`, one
        scale for the whole result tensor). A body output such an answer cannot carry (NaN,
        infinity, beyond float16's range) is INTERNAL for that request: nothing non-finite is sent."""
        bits = self.answer_bits[it.key[1]]
        if bits == 32:
            return self.outputs_for(out.shape), out.tobytes()
        if bits == 8 and not np.isfinite(out).all():
            raise WireError(ErrorCode.INTERNAL, "the body's output holds NaN or infinity: it has no 8-bit range")
        d, payload = S.encode(out, bits, RESULT_NAME)
        if bits == 16 and not np.isfinite(np.frombuffer(payload, "<f2")).all():
            raise WireError(ErrorCode.INTERNAL, "the body's output does not fit float16 (NaN, infinity or |x| > 65504)")
        return [d], payload

    def outputs_for(self, shape: tuple) -> list[dict[str, Any]]:
        """The ``outputs`` of a float32 result carrying body output of ``shape`` (cached, never mutated)."""
        o = self._out_descs.get(shape)
        if o is None:
            o = self._out_descs[shape] = [
                codec.descriptor(RESULT_NAME, shape, "float32", 32, 1.0, 0, None, "raw", 4 * math.prod(shape))
            ]
        return o
