"""A bundle's tail on the server: the request checks (:class:`RequestCheck`, bundle only, no
engine: the session table validates requests with them on the I/O thread) and the tail engine
that turns a batch of queued requests into logits (:class:`TailRunner`, compute thread).

Requests arrive full (with their tensor descriptor) or, from agents that saw
``"compact_requests"`` in the server's welcome (protocol v1.1), compact: no descriptor, one frame
whose descriptor the bundle mode implies. :meth:`RequestCheck.check_compact` checks such a frame's
length against that descriptor before anything is decoded; from then on both kinds are the same
queued item.

Modes of codec ``"ans"`` (PROTOCOL.md §4.4, a bundle's ``cdf`` file) carry variable-length frames:
their compact form implies the descriptor with ``nbytes`` = the frame's length (§3.3.1), checked
against the §4.4 bounds of the mode's shape before anything is allocated; the frame is decoded with
the mode's table set at its batch. The uint8 ``raw`` path is untouched by them.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from ..bundle import Bundle
from ..engine import Engine, EngineOptions  # numpy only: backends load lazily
from ..wire import ans_codec, codec
from ..wire import protocol as P
from ..wire.ans_tables import TableSet, ans_available
from ..wire.errors import ErrorCode, ProtocolError, WireError
from .batcher import Item
from .tail_backend import Capacity

log = logging.getLogger("edgesplit.server")


class RequestCheck:
    """What a request tensor must look like to run a bundle's tail: its wire tensor's name and
    shape, each mode's bits and channels, and each mode's implied compact descriptor."""

    fused = False  # an ED-ViT bundle's checks (FusionCheck) take fused requests instead

    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        spec = bundle.wire_spec
        self.wire_name = spec["name"]
        self.wire_shape = tuple(int(s) for s in spec["shape"])  # (C, h, w)
        self.modes = {m.id: m for m in bundle.modes}
        self._mode_spec = {m.id: (int(m.bits), int(m.channels)) for m in bundle.modes}
        # v1.1 compact requests: each mode's implied descriptor, built once and shared (never
        # mutated) by every compact request of that mode.
        self._compact = {m.id: P.compact_descriptor(self.wire_name, self.wire_shape, m) for m in bundle.modes}
        # ans modes: the table set each codes with; a server without the entropy extra refuses them.
        self.tables: dict[int, TableSet] = {m.id: bundle.tables_for(m) for m in bundle.modes if m.entropy_coded}
        self._ans_ok = ans_available()

    def check(self, mode_id: int, d: dict[str, Any], rid: int) -> tuple[int, bool]:
        """Validate a request tensor against the bundle; return (rows, single)."""
        spec = self._mode_spec.get(mode_id)
        if spec is None:
            raise ProtocolError(
                ErrorCode.UNKNOWN_MODE,
                f"bundle '{self.bundle.name}' has no mode {mode_id} (modes: {sorted(self.modes)})",
                rid,
            )
        if d["name"] != self.wire_name:
            raise ProtocolError(
                ErrorCode.MALFORMED,
                f"tensor is named '{d['name']}', the bundle's wire tensor is '{self.wire_name}'",
                rid,
            )
        shape = d["shape"]
        C, h, w = self.wire_shape
        nd = len(shape)
        if (nd != 3 and nd != 4) or shape[-1] != w or shape[-2] != h:
            raise ProtocolError(
                ErrorCode.MALFORMED, f"tensor shape {shape} does not fit the wire tensor [N,<= {C},{h},{w}]", rid
            )
        bits, channels = spec
        if d["bits"] != bits or d["channels"] != channels or shape[-3] > C:
            mode = self.modes[mode_id]
            raise ProtocolError(
                ErrorCode.UNKNOWN_MODE,
                f"tensor ({d['channels']} channels, {d['bits']} bits) disagrees with mode {mode.id} "
                f"'{mode.name}' ({mode.channels} channels, {mode.bits} bits)",
                rid,
            )
        if nd == 3:
            return 1, True
        rows = shape[0]
        if rows < 1:
            raise ProtocolError(ErrorCode.MALFORMED, "request tensor has zero rows", rid)
        return rows, False

    def check_compact(self, mode_id: int, frame, rid: int) -> dict[str, Any]:
        """Validate a compact request's frame against its mode (before anything is decoded or
        allocated for it); return the implied descriptor."""
        d = self._compact.get(mode_id)
        if d is None:
            raise ProtocolError(
                ErrorCode.UNKNOWN_MODE,
                f"bundle '{self.bundle.name}' has no mode {mode_id} (modes: {sorted(self.modes)})",
                rid,
            )
        n = len(frame) if type(frame) is bytes else memoryview(frame).nbytes
        if n != d["nbytes"]:
            if d["nbytes"] is None:  # an ans mode (its implied nbytes is the frame's): off the raw path
                return self._check_compact_ans(mode_id, d, n, rid)
            c, h, w = d["shape"]
            raise ProtocolError(
                ErrorCode.MALFORMED,
                f"compact request: frame is {n} bytes, mode {mode_id} ({c}x{h}x{w} codes at {d['bits']} bits, "
                f"raw) needs exactly {d['nbytes']}",
                rid,
            )
        return d

    def _check_compact_ans(self, mode_id: int, d: dict[str, Any], n: int, rid: int) -> dict[str, Any]:
        """An ans mode's compact frame: the codec is decoded here [UNSUPPORTED], and its length fits
        the §4.4 bounds of the mode's shape [MALFORMED]; the implied descriptor takes ``nbytes = n``."""
        if not self._ans_ok:
            raise ProtocolError(
                ErrorCode.UNSUPPORTED, f"mode {mode_id} is 'ans'-coded and this server lacks the entropy extra", rid
            )
        c, h, w = d["shape"]
        try:
            ans_codec.check_payload_len(n, c * h * w)
        except WireError as e:
            raise ProtocolError(e.code, f"compact request: {e.message}", rid) from None
        return dict(d, nbytes=n)


class InProcessRunner:
    """What every runner whose engine lives in this process shares (the tail's and a U-shaped
    bundle's body): its engine bound with its request checks, warm-up, health, capacity, close.
    A subclass sets ``input_shape`` (one row of the engine's input) and may add a ``what`` note
    to its capacity."""

    backend: str
    max_batch: int
    input_shape: tuple
    what = ""

    def _bind(self, engine: Any, requests: Any) -> None:
        self.engine = engine
        self.requests = requests
        self.check, self.check_compact = requests.check, requests.check_compact
        self.input_name = engine.inputs[0].name
        self.output_name = engine.outputs[0].name
        self._out_descs: dict[tuple, list[dict[str, Any]]] = {}

    def warmup(self) -> None:
        self.engine.run({self.input_name: np.zeros((1, *self.input_shape), np.float32)})

    def health(self) -> tuple[bool, str]:
        """An in-process engine is as healthy as the daemon (a failing batch is answered INTERNAL)."""
        return True, ""

    def capacity(self) -> Capacity:
        return Capacity(self.max_batch, 1, f"in-process {self.backend}{self.what}")

    def close(self) -> None:
        self.engine.close()


class TailRunner(InProcessRunner):
    """A bundle's tail engine plus what is needed to turn requests into its input batch: the
    in-process :class:`~.tail_backend.TailBackend` (``engine``: one made elsewhere, such as a
    remote one, instead of the bundle's tail file on ``backend``)."""

    fused = False  # results carry logits only (FusionRunner's also carry ``used``)

    def __init__(
        self,
        bundle: Bundle,
        backend: str = "ort",
        threads: int | None = None,
        options: EngineOptions | None = None,
        *,
        engine: Engine | None = None,
    ):
        from ..engine import EngineError, create_engine

        self.bundle = bundle
        opts = EngineOptions.make(options, **({"threads": threads} if threads is not None else {}))
        self.max_batch = opts.max_batch
        path, used = bundle.file("tail"), backend  # ort and tensorrt both run the ONNX tail
        if engine is None and backend == "torch":
            if bundle.has("tail_torch"):
                path = bundle.file("tail_torch")
            else:
                # Fall back to ONNX Runtime only where it can honour the options; a GPU or
                # reduced-precision request must not quietly become fp32 on the CPU.
                try:
                    opts.check("ort")
                except EngineError as e:
                    raise EngineError(
                        f"bundle '{bundle.name}' has no tail_torch file for --backend torch, and ONNX "
                        f"Runtime cannot stand in ({e}); export one with 'edgesplit export --torch-tail'"
                    ) from None
                log.warning("bundle '%s' has no tail_torch file; running its ONNX tail with ONNX Runtime", bundle.name)
                used = "ort"
        self.backend = used
        self._bind(create_engine(path, used, opts) if engine is None else engine, RequestCheck(bundle))
        self.wire_shape = self.input_shape = self.requests.wire_shape
        self.modes = self.requests.modes
        self._bufs: dict[int, np.ndarray] = {}

    def _buffer(self, c: int, rows: int) -> np.ndarray:
        """The reusable input batch for requests that send ``c`` channels: ``[n >= rows, C, h, w]``
        float32 whose channels ``c..C-1`` are zero and stay zero (decoding writes ``:c`` only).
        One per channel count, so a wider mode never leaves values where a narrower one needs
        zeros. Only the compute thread uses it, and the engine has returned before it is reused."""
        buf = self._bufs.get(c)
        if buf is None or buf.shape[0] < rows:
            n = 1
            while n < rows:
                n *= 2
            buf = self._bufs[c] = np.zeros((n, *self.wire_shape), np.float32)
        return buf

    def _decode(self, d: dict[str, Any], payload, dst: np.ndarray, mode_id: int) -> None:
        """One validated request tensor -> float32 values in ``dst`` (a view of the batch buffer)."""
        if d["dtype"] != "uint8" or d["codec"] != "raw":
            if d["codec"] == "ans":  # variable-length: decoded with the mode's tables (§4.4)
                ans_codec.decode(d, payload, self.requests.tables[mode_id], out=dst, validate=False)
            else:
                codec.decode(d, payload, out=dst, validate=False)
            return
        codec.dequantize_packed(payload, dst.size, d["bits"], d["scale"], d["zero_point"], dst)

    def run(self, items: list[Item]) -> tuple[np.ndarray, list[int], dict[int, WireError]]:
        """Decode the items into one batch and run the tail. Returns (logits, row offsets, per-item
        decode errors by index); items that failed to decode get no rows."""
        x, offsets, errors = self.prepare(items)
        if x is None:
            return _EMPTY_LOGITS, offsets, errors
        out = self.engine.run({self.input_name: x})[self.output_name]
        return _as_f32(out), offsets, errors

    def prepare(self, items: list[Item]) -> tuple[np.ndarray | None, list[int], dict[int, WireError]]:
        """Decode the items into the batch buffer: (the batch, or None when no item decoded; row
        offsets; per-item decode errors by index). The batch is a view of a buffer the next
        call reuses."""
        if len(items) == 1:  # the common case when idle: no offsets bookkeeping, no stacking
            it = items[0]
            d = it.desc
            c = d["shape"][-3]
            x = self._buffer(c, it.rows)
            try:
                self._decode(d, it.payload, x[0, :c] if it.single else x[: it.rows, :c], it.key[1])
            except WireError as e:
                return None, [-1], {0: e}
            return x[: it.rows], [0], _NO_ERRORS
        rows = sum(it.rows for it in items)
        c = items[0].desc["shape"][-3]
        x = self._buffer(c, rows)
        offsets, errors, r = [], {}, 0
        for i, it in enumerate(items):
            d = it.desc
            dst = x[r, :c] if it.single else x[r : r + it.rows, :c]
            try:
                self._decode(d, it.payload, dst, it.key[1])
            except WireError as e:
                errors[i] = e
                offsets.append(-1)
                continue
            offsets.append(r)
            r += it.rows
        return (x[:r] if r else None), offsets, errors

    def outputs_for(self, shape: tuple) -> list[dict[str, Any]]:
        """The (constant) ``outputs`` list of a result carrying logits of ``shape``: cached per
        shape and never mutated, so the result packer can cache its packed form too."""
        o = self._out_descs.get(shape)
        if o is None:
            n = 4 * math.prod(shape)
            o = self._out_descs[shape] = [
                codec.descriptor(self.output_name, shape, "float32", 32, 1.0, 0, None, "raw", n)
            ]
        return o


_EMPTY_LOGITS = np.empty((0,), np.float32)
_NO_ERRORS: dict[int, WireError] = {}
_F32LE = np.dtype("<f4")


def _as_f32(a) -> np.ndarray:
    """Engine output -> little-endian float32 C-ordered array (what a result frame carries)."""
    if type(a) is np.ndarray and a.dtype == _F32LE and a.flags.c_contiguous:
        return a
    return np.ascontiguousarray(a, dtype=_F32LE)
