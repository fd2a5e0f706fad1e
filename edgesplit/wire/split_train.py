"""Split training and U-shaped serving (protocol v1.4, docs/PROTOCOL.md §15; SFPrompt).

Two features a body server offers in ``welcome.features``:

- ``"split_training"``: the kinds ``train_fwd`` (the head's tokens in, the body's output back, in a
  ``result``) and ``train_bwd`` (the gradient at the body's output in, the gradient at its input
  back), paired by a step id; a retransmitted step is answered again, never applied twice.
- ``"u_shaped"``: a ``request`` carries the head's tokens and its ``result`` the body's output
  (not logits); the agent runs the tail. A ``hello`` says the agent's serving shape with the key
  ``serving``, and a server refuses a mismatch. With ``"u_shaped_answers"`` (the daemon) the
  body's output comes back in the encoding the request's mode states (§15.6.1), else float32.

This module holds the validators of both kinds (behind the feature: without it they stay
reserved, UNSUPPORTED), the builders, and the tensor encoding of activations and gradients
(float32, float16, or 8-bit codes whose range is measured per tensor). Numpy only.
"""

from __future__ import annotations

import math
from typing import Any, Collection, Sequence

import numpy as np

from . import codec
from . import protocol as P
from .errors import ErrorCode, ProtocolError
from .validate import UINT64_MAX, _descriptors, _int, unpack_header

FEATURE_SPLIT_TRAINING = "split_training"
FEATURE_U_SHAPED = "u_shaped"
FEATURE_U_SHAPED_ANSWERS = "u_shaped_answers"  # §15.6.1: results in each mode's answer encoding
TRAIN_FWD = "train_fwd"
TRAIN_BWD = "train_bwd"
TRAIN_KINDS = (TRAIN_FWD, TRAIN_BWD)
SERVING_SHAPES = ("head-tail", "scatter", "u-shaped")
TENSOR_NAMES = {TRAIN_FWD: "tokens", TRAIN_BWD: "grad_out"}
REPLY_NAMES = {TRAIN_FWD: "body_out", TRAIN_BWD: "grad_in"}
WIRE_BITS = (32, 16, 8)  # float32, float16, uint8 codes
M = ErrorCode.MALFORMED


# -- validation ------------------------------------------------------------------------------------


def check_train(h: dict, frames: list, limits: P.Limits) -> None:
    """§15.3/15.4 field checks of ``train_fwd``/``train_bwd`` (the receiver offers the feature)."""
    kind = h["kind"]
    rid = h.get("id")
    if type(rid) is not int or not 0 <= rid <= UINT64_MAX:
        rid = _int(h, "id", kind)
    if kind == TRAIN_FWD:
        g = h.get("grad")
        if type(g) is not bool:
            raise ProtocolError(M, "train_fwd: 'grad' must be a bool (will a train_bwd follow?)", rid)
    if len(frames) != 1:
        raise ProtocolError(M, f"{kind}: carries exactly one tensor frame, got {len(frames)}", rid)
    (d,) = _descriptors(h, "tensors", kind, frames, limits, rid)
    check_tensor(kind, d, limits, rid)


def check_tensor(kind: str, d: dict, limits: P.Limits, rid: int | None) -> None:
    """A token tensor (or its gradient): ``[n, T, D]``, n in [1, max_batch], float32, float16 or
    8-bit codes, no channel axis, named for its kind."""
    name = TENSOR_NAMES.get(kind, "tokens")
    if d["name"] != name:
        raise ProtocolError(M, f"{kind}: the tensor is named {d['name']!r}, expected {name!r}", rid)
    shape = d["shape"]
    if len(shape) != 3 or min(shape) < 1:
        raise ProtocolError(M, f"{kind}: the tensor's shape must be [n, T, D] with every size >= 1, got {shape}", rid)
    if shape[0] > limits.max_batch:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"{kind}: {shape[0]} rows, over max_batch={limits.max_batch}", rid)
    if d["channels"] is not None:
        raise ProtocolError(M, f"{kind}: a token tensor has no channel axis ('channels' must be nil)", rid)
    if d["dtype"] == "uint8" and d["bits"] != 8:
        raise ProtocolError(ErrorCode.UNSUPPORTED, f"{kind}: codes travel at 8 bits only, got {d['bits']}", rid)


def parse(parts: Sequence, limits: P.Limits = P.DEFAULT_LIMITS, features: Collection[str] = ()) -> P.Message:
    """:func:`edgesplit.wire.protocol.parse`, plus ``train_fwd``/``train_bwd`` when ``features``
    holds ``"split_training"`` and the v1.4 ``hello.serving`` key. The common checks come first,
    from :func:`~edgesplit.wire.protocol.parse` itself: a training kind is first parsed as the
    reserved kind it is there, and only its UNSUPPORTED answer is replaced by this validation."""
    others = [f for f in features if f not in (FEATURE_SPLIT_TRAINING, FEATURE_U_SHAPED)]
    try:
        msg = P.parse(parts, limits, others)
    except ProtocolError as e:
        if e.code != ErrorCode.UNSUPPORTED or FEATURE_SPLIT_TRAINING not in features:
            raise
        h = unpack_header(parts[0], limits)
        if h.get("kind") not in TRAIN_KINDS:
            raise
        frames = list(parts[1:])
        check_train(h, frames, limits)
        return P.Message(h["kind"], h, frames)
    if msg.kind == P.Kind.HELLO and msg.header.get("serving") is not None:
        s = msg.header["serving"]
        if type(s) is not str or len(s) > 32:
            raise ProtocolError(M, "hello: 'serving' must be a string of at most 32 characters")
    return msg


# -- builders --------------------------------------------------------------------------------------


def train_fwd(step: int, desc: dict[str, Any], grad: bool) -> dict[str, Any]:
    return {"v": P.PROTOCOL_VERSION, "kind": TRAIN_FWD, "id": int(step), "grad": bool(grad), "tensors": [desc]}


def train_bwd(step: int, desc: dict[str, Any]) -> dict[str, Any]:
    return {"v": P.PROTOCOL_VERSION, "kind": TRAIN_BWD, "id": int(step), "tensors": [desc]}


def hello(bundle: str, agent: str, serving: str, max_inflight: int = 4) -> dict[str, Any]:
    h = P.hello(bundle, agent, max_inflight=max_inflight)
    h["serving"] = serving
    return h


# -- tensors ---------------------------------------------------------------------------------------


def affine_params(x: np.ndarray, bits: int = 8) -> tuple[float, int]:
    """Scale and zero point covering [min(x, 0), max(x, 0)] with 2^bits codes, 0 exactly
    representable (a zero gradient stays zero); the scale is a float32 value (§4.1)."""
    lo = min(float(x.min(initial=0.0)), 0.0)
    hi = max(float(x.max(initial=0.0)), 0.0)
    levels = (1 << bits) - 1
    scale = float(np.float32((hi - lo) / levels)) if hi > lo else 1.0
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError("tensor range is not finite")
    return scale, int(np.clip(round(-lo / scale), 0, levels))


def encode(x: np.ndarray, bits: int, name: str) -> tuple[dict[str, Any], bytes]:
    """A float32 array -> (descriptor, payload): float32 (32), float16 (16) or 8-bit codes (8)."""
    x = np.ascontiguousarray(x, np.float32)
    if bits == 32:
        return codec.encode_float(x, name=name)
    if bits == 16:
        return codec.encode_float(x, name=name, dtype="float16")
    if bits != 8:
        raise ValueError(f"wire bits must be one of {WIRE_BITS}, got {bits}")
    scale, zp = affine_params(x, bits)
    payload = codec.pack_bits(codec.quantize(x, bits, scale, zp), bits)
    return codec.descriptor(name, x.shape, "uint8", bits, scale, zp, None, "raw", len(payload)), payload


def bits_of(d: dict[str, Any]) -> int:
    """The wire bits of a descriptor of :func:`encode` (a reply uses its request's)."""
    return int(d["bits"])


def decode(d: dict[str, Any], payload, rid: int | None = None) -> np.ndarray:
    """A validated tensor -> float32; a float tensor holding NaN or infinity is MALFORMED."""
    try:
        a = codec.decode(d, payload, validate=False)
    except codec.WireError as e:
        raise ProtocolError(e.code, e.message, rid) from None
    if d["dtype"] != "uint8" and not np.all(np.isfinite(a)):
        raise ProtocolError(M, f"tensor {d['name']!r} holds NaN or infinity", rid)
    return a


def roundtrip(x: np.ndarray, bits: int) -> np.ndarray:
    """What the receiver of ``x`` sent at ``bits`` decodes (float32, always a new array)."""
    x = np.ascontiguousarray(x, np.float32)
    if bits == 32:
        return x.copy()
    d, p = encode(x, bits, "t")
    return codec.decode(d, p)
