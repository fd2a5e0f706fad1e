"""Malformed-message generator for fuzzing a server, written from docs/PROTOCOL.md.

Each :class:`FuzzCase` is one multipart message (frame 0 = header, then tensor frames) built from
a *valid* message of the target bundle with **exactly one** fault injected, together with the
answer the protocol document says the server owes it: the error code (and the request id the
error carries, or nil), or ``result``/``pong`` for messages that are odd but legal (unknown keys,
replayed ids). One fault per message is what makes the expected code unambiguous: the document
lets a receiver check a message's rules in any order, so two faults could legitimately be
answered with either code.

Classes (:data:`CLASSES`), each with several variants:

- framing: truncated and oversized headers, msgpack that is not a map, trailing bytes, bin/ext
  values and non-string keys, containers over the unpacker's bounds, random bytes;
- version and kind: wrong ``v`` (another int: UNSUPPORTED_VERSION; not an int: MALFORMED),
  unknown, reserved and server-only kinds, more tensor frames than ``max_frames``;
- request fields: bad ``id`` / ``mode`` / ``deadline_ms`` / ``t_send_ns`` / ``tensors``;
- descriptors: wrong dtype, shape, bits, channels, quantization, name; ``nbytes`` that lies about
  the frame length; huge declared sizes (and one real frame over ``max_frame_bytes``); unknown
  codecs; zstd frames that do not decode to the declared size;
- v1.1 compact requests of the wrong length, frame count or mode;
- session: valid requests without a session (NOT_READY), ``deadline_ms: 0``, replays of other
  agents' ids, valid messages with unknown keys;
- other kinds: bad ``hello`` (unknown bundle, bad caps), ``ping``, ``bye`` and ``error``;
- ``bitflip``: a valid request header with a few flipped bits. Any single answer is correct
  (the flips may leave it valid, or change its id), so it goes out on its own channel.

Everything is deterministic from the seed. No sockets here (see ``edgesplit.bench.fuzz``), no
torch (this is the wire plane).
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import msgpack
import numpy as np

from .codec import DESCRIPTOR_KEYS, ErrorCode, pack_bits, packed_nbytes
from .protocol import PROTOCOL_VERSION, RESERVED_KINDS, Limits, compact_descriptor

E = ErrorCode

# Outcomes a case may expect besides an error code.
RESULT = "result"
PONG = "pong"
ANY_ERROR = "any-error"   # an error reply, whatever its code (random bytes)
ANYTHING = "anything"     # any one reply (bitflips)

# Channels: which socket a case must go out on.
SESSION = "session"      # a DEALER that has said hello and got welcome
NO_SESSION = "nosession"  # a DEALER that never says hello
CHAOS = "chaos"          # a DEALER with a session whose replies are counted, not matched

# Fuzz-generated request ids start here, far above any id a real agent reaches in a benchmark,
# so that replies can be matched by id; replays deliberately use small ids.
FUZZ_ID_BASE = 1 << 40


@dataclass(frozen=True)
class ModeSpec:
    id: int
    channels: int
    bits: int
    scale: float
    zero_point: int


@dataclass(frozen=True)
class FuzzTarget:
    """What the fuzzer knows of the server: the bundle (hash, wire tensor, modes) and the limits
    from its welcome."""

    bundle_hash: str
    wire_name: str
    wire_shape: tuple[int, int, int]  # (C, h, w)
    modes: tuple[ModeSpec, ...]
    limits: Limits

    @classmethod
    def from_bundle(cls, bundle: Any, limits: Limits) -> "FuzzTarget":
        spec = bundle.wire_spec
        modes = tuple(ModeSpec(int(m.id), int(m.channels), int(m.bits), float(m.scale), int(m.zero_point))
                      for m in bundle.modes)
        return cls(bundle.hash, spec["name"], tuple(int(s) for s in spec["shape"]), modes, limits)


@dataclass
class FuzzCase:
    cls: str                     # the class it came from (a key of CLASSES)
    variant: str                 # which fault, in words
    parts: list[bytes]           # the message: header frame, then tensor frames
    expect: frozenset            # acceptable answers: ErrorCode ints, RESULT, PONG, ANY_ERROR, ANYTHING
    reply_id: int | None = None  # the id the answer carries (None: nil, or not an id-carrying answer)
    channel: str = SESSION

    def accepts(self, outcome: int | str) -> bool:
        """Whether one answer (an error code, RESULT or PONG) is one the protocol allows here."""
        if ANYTHING in self.expect or outcome in self.expect:
            return True
        return ANY_ERROR in self.expect and isinstance(outcome, int)


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _err(*codes: ErrorCode) -> frozenset:
    return frozenset(int(c) for c in codes)


QUEUED = (RESULT, int(E.OVERLOADED))  # a valid request: computed, unless the queue or credits are full


class FuzzGenerator:
    """Deterministic stream of :class:`FuzzCase` for one target. ``next()`` draws a class by
    weight; ``case(cls)`` makes one of a given class."""

    def __init__(self, target: FuzzTarget, seed: int = 0, *, classes: Sequence[str] | None = None,
                 replay_ids: int = 1000, weights: dict[str, float] | None = None):
        self.t = target
        self.rng = np.random.default_rng(seed)
        self.replay_ids = int(replay_ids)
        self._next_id = FUZZ_ID_BASE
        names = list(classes) if classes is not None else list(CLASSES)
        unknown = [n for n in names if n not in CLASSES]
        if unknown:
            raise ValueError(f"unknown fuzz classes {unknown} (known: {', '.join(CLASSES)})")
        w = np.array([(weights or {}).get(n, CLASSES[n][1]) for n in names], np.float64)
        self._names = names
        self._p = w / w.sum()
        C, h, w_ = target.wire_shape
        # A few valid payloads per mode (random codes, zero padding bits), reused by every case.
        self._payloads = {m.id: [pack_bits(self.rng.integers(0, 1 << m.bits, m.channels * h * w_, dtype=np.uint8), m.bits)
                                 for _ in range(4)] for m in target.modes}
        self._descs = {m.id: compact_descriptor(target.wire_name, target.wire_shape, m) for m in target.modes}

    # -- helpers ---------------------------------------------------------------------------
    def _id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _choice(self, seq: Sequence) -> Any:
        return seq[int(self.rng.integers(len(seq)))]

    def _mode(self) -> ModeSpec:
        return self._choice(self.t.modes)

    def _payload(self, m: ModeSpec) -> bytes:
        return self._choice(self._payloads[m.id])

    def _full(self, rid: int, m: ModeSpec | None = None, **desc_changes) -> tuple[dict, bytes, ModeSpec]:
        """A valid full request (header with its descriptor, payload); descriptor keys overridden."""
        m = m or self._mode()
        d = dict(self._descs[m.id], **desc_changes)
        return {"v": PROTOCOL_VERSION, "kind": "request", "id": rid, "mode": m.id, "tensors": [d]}, self._payload(m), m

    def _compact(self, rid: int, m: ModeSpec | None = None) -> tuple[dict, bytes, ModeSpec]:
        m = m or self._mode()
        return {"v": PROTOCOL_VERSION, "kind": "request", "id": rid, "mode": m.id}, self._payload(m), m

    def _valid_request(self, rid: int) -> tuple[dict, bytes]:
        h, p, _ = self._full(rid) if self.rng.random() < 0.5 else self._compact(rid)
        return h, p

    def _random_bytes(self, lo: int, hi: int) -> bytes:
        return self.rng.integers(0, 256, int(self.rng.integers(lo, hi + 1)), dtype=np.uint8).tobytes()

    def _random_word(self) -> str:
        letters = string.ascii_letters + string.digits + "_-"
        return "".join(self._choice(letters) for _ in range(int(self.rng.integers(1, 12))))

    def _case(self, cls: str, variant: str, header: dict | bytes, frames: Sequence[bytes], expect: frozenset,
              reply_id: int | None = None, channel: str = SESSION) -> FuzzCase:
        h = header if isinstance(header, (bytes, bytearray)) else _pack(header)
        return FuzzCase(cls, variant, [bytes(h), *frames], expect, reply_id, channel)

    # -- drawing ---------------------------------------------------------------------------
    def next(self) -> FuzzCase:
        name = self._names[int(self.rng.choice(len(self._names), p=self._p))]
        return self.case(name)

    def case(self, cls: str) -> FuzzCase:
        return CLASSES[cls][0](self)

    # -- framing -------------------------------------------------------------------------------
    def truncated_header(self) -> FuzzCase:
        h, p, _ = self._full(self._id())
        raw = _pack(h)
        cut = int(self.rng.integers(0, len(raw)))  # 0: an empty header frame
        return self._case("truncated_header", f"cut at {cut}/{len(raw)}", raw[:cut], [p], _err(E.MALFORMED))

    def oversized_header(self) -> FuzzCase:
        over = int(self.rng.integers(1, 4097))
        # A well-formed ping but for its size: the size check comes before unpacking.
        h = {"v": PROTOCOL_VERSION, "kind": "ping", "nonce": 1, "pad": "x" * (self.t.limits.max_header_bytes + over)}
        return self._case("oversized_header", f"{over} bytes over", h, [], _err(E.TOO_LARGE))

    def not_a_map(self) -> FuzzCase:
        values = [[1, "request"], 7, "request", None, 1.5, True, [], -3]
        v = self._choice(values)
        if self.rng.random() < 0.15:
            return self._case("not_a_map", "empty frame", b"", [], _err(E.MALFORMED))
        return self._case("not_a_map", f"{type(v).__name__} {v!r}", _pack(v), [], _err(E.MALFORMED))

    def trailing_bytes(self) -> FuzzCase:
        raw = _pack({"v": PROTOCOL_VERSION, "kind": "ping", "nonce": 3}) + self._random_bytes(1, 8)
        return self._case("trailing_bytes", "ping + junk", raw, [], _err(E.MALFORMED))

    def forbidden_types(self) -> FuzzCase:
        base = {"v": PROTOCOL_VERSION, "kind": "ping", "nonce": 5}
        k = int(self.rng.integers(5))
        if k == 0:
            raw, what = _pack({**base, "blob": self._random_bytes(1, 32)}), "bin value"
        elif k == 1:
            raw, what = _pack({**base, "x": msgpack.ExtType(int(self.rng.integers(0, 128)), b"ab")}), "ext value"
        elif k == 2:
            raw, what = _pack({**base, 7: 1}), "integer key"
        elif k == 3:
            raw, what = _pack({**base, "list": [0] * 4097}), "array of 4097"
        else:
            raw, what = _pack({**base, **{f"k{i}": i for i in range(65)}}), "map of 68 keys"
        return self._case("forbidden_types", what, raw, [], _err(E.MALFORMED))

    def random_bytes(self) -> FuzzCase:
        frames = [self._random_bytes(0, 64) for _ in range(int(self.rng.integers(0, 3)))]
        return self._case("random_bytes", "random header", self._random_bytes(1, 512), frames, frozenset([ANY_ERROR]))

    # -- version and kind --------------------------------------------------------------------
    def wrong_version(self) -> FuzzCase:
        rid = self._id()
        h, p = self._valid_request(rid)
        if self.rng.random() < 0.5:
            v = self._choice([0, 2, 3, 255, 65535, -1, 1 << 32])
            return self._case("wrong_version", f"v={v}", {**h, "v": v}, [p], _err(E.UNSUPPORTED_VERSION), rid)
        v = self._choice(["1", 1.0, True, None, [1], "missing"])
        h = {k: x for k, x in h.items() if k != "v"} if v == "missing" else {**h, "v": v}
        return self._case("wrong_version", f"v={v!r}", h, [p], _err(E.MALFORMED), rid)

    def unknown_kind(self) -> FuzzCase:
        rid = self._id()
        h, p = self._valid_request(rid)
        k = int(self.rng.integers(5))
        if k == 0:
            kind = self._random_word()
            known = {"hello", "welcome", "request", "result", "error", "ping", "pong", "bye", *RESERVED_KINDS}
            if kind in known:
                kind += "?"
            return self._case("unknown_kind", f"kind {kind!r}", {**h, "kind": kind}, [p], _err(E.MALFORMED), rid)
        if k == 1:
            kind = self._choice(RESERVED_KINDS)
            return self._case("unknown_kind", f"reserved {kind!r}", {**h, "kind": kind}, [p], _err(E.UNSUPPORTED), rid)
        if k == 2:
            kind = self._choice([7, None, ["request"], True, 1.5])
            return self._case("unknown_kind", f"kind {kind!r}", {**h, "kind": kind}, [p], _err(E.MALFORMED), rid)
        if k == 3:  # a server-to-agent kind, sent to the server
            h = {"v": PROTOCOL_VERSION, "kind": "result", "id": rid, "outputs": [],
                 "timing": {"queue_us": 0, "compute_us": 0, "server_us": 0, "batch_size": 1}}
            return self._case("unknown_kind", "result to server", h, [], _err(E.MALFORMED), rid)
        return self._case("unknown_kind", "welcome to server", {"v": PROTOCOL_VERSION, "kind": "welcome"}, [],
                          _err(E.MALFORMED))

    def too_many_frames(self) -> FuzzCase:
        rid = self._id()
        h, p, _ = self._full(rid)
        n = self.t.limits.max_frames + 1 + int(self.rng.integers(0, 8))
        return self._case("too_many_frames", f"{n} frames", h, [p] * n, _err(E.TOO_LARGE), rid)

    # -- request fields ----------------------------------------------------------------------
    def bad_id(self) -> FuzzCase:
        h, p = self._valid_request(0)
        v = self._choice([-1, -(1 << 63), 1.5, "7", True, None, [1], "missing"])
        h = {k: x for k, x in h.items() if k != "id"} if v == "missing" else {**h, "id": v}
        return self._case("bad_id", f"id={v!r}", h, [p], _err(E.MALFORMED))  # no readable id: nil

    def bad_mode(self) -> FuzzCase:
        rid = self._id()
        h, p = self._valid_request(rid)
        v = self._choice([-1, 1 << 31, 1 << 40, 0.0, "0", True, None, "missing"])
        h = {k: x for k, x in h.items() if k != "mode"} if v == "missing" else {**h, "mode": v}
        return self._case("bad_mode", f"mode={v!r}", h, [p], _err(E.MALFORMED), rid)

    def bad_deadline(self) -> FuzzCase:
        rid = self._id()
        h, p = self._valid_request(rid)
        v = self._choice([-1, -0.001, math.nan, math.inf, -math.inf, "5", True, [5], {}])
        return self._case("bad_deadline", f"deadline_ms={v!r}", {**h, "deadline_ms": v}, [p], _err(E.MALFORMED), rid)

    def bad_t_send(self) -> FuzzCase:
        rid = self._id()
        h, p = self._valid_request(rid)
        v = self._choice([-1, 1.5, "now", True, [0]])
        return self._case("bad_t_send", f"t_send_ns={v!r}", {**h, "t_send_ns": v}, [p], _err(E.MALFORMED), rid)

    def bad_tensors(self) -> FuzzCase:
        rid = self._id()
        h, p, _ = self._full(rid)
        d = h["tensors"][0]
        k = int(self.rng.integers(6))
        if k == 0:
            t, frames, what = self._choice(["z", {}, 5, True]), [p], "not a list"
        elif k == 1:
            t, frames, what = [], [p], "empty list, one frame"
        elif k == 2:
            t, frames, what = [self._choice([1, None, "z", [d]])], [p], "descriptor not a map"
        elif k == 3:
            t, frames, what = [d, d], [p], "two descriptors, one frame"
        elif k == 4:
            t, frames, what = [d], [p, p], "one descriptor, two frames"
        else:  # well-formed message, but v1 requests carry exactly one tensor
            t, frames, what = [d, d], [p, p], "two tensors"
        return self._case("bad_tensors", what, {**h, "tensors": t}, frames, _err(E.MALFORMED), rid)

    def missing_desc_key(self) -> FuzzCase:
        rid = self._id()
        h, p, _ = self._full(rid)
        key = self._choice(DESCRIPTOR_KEYS)
        d = {k: v for k, v in h["tensors"][0].items() if k != key}
        return self._case("missing_desc_key", f"no '{key}'", {**h, "tensors": [d]}, [p], _err(E.MALFORMED), rid)

    # -- descriptors -------------------------------------------------------------------------
    def _consistent(self, rid: int, m: ModeSpec, shape: list[int], bits: int, channels: int | None,
                    dtype: str = "uint8", **extra) -> tuple[dict, bytes]:
        """A full request whose descriptor is self-consistent (nbytes = packed size = frame
        length) for ``shape``/``bits``, so only its fit to the bundle mode is wrong."""
        n = packed_nbytes(math.prod(shape), bits)
        d = {**self._descs[m.id], "shape": list(shape), "bits": bits, "channels": channels, "dtype": dtype,
             "nbytes": n, **extra}
        h = {"v": PROTOCOL_VERSION, "kind": "request", "id": rid, "mode": m.id, "tensors": [d]}
        return h, bytes(n)

    def wrong_dtype(self) -> FuzzCase:
        rid = self._id()
        m = self._mode()
        C, hh, w = self.t.wire_shape
        k = int(self.rng.integers(4))
        if k == 0:
            dt = self._choice(["int8", "float64", "complex64", "", "UINT8", "bfloat16"])
            h, p, _ = self._full(rid, m, dtype=dt)
            return self._case("wrong_dtype", f"dtype {dt!r}", h, [p], _err(E.UNSUPPORTED), rid)
        if k == 1:
            dt = self._choice([8, None, ["uint8"], True])
            h, p, _ = self._full(rid, m, dtype=dt)
            return self._case("wrong_dtype", f"dtype {dt!r}", h, [p], _err(E.MALFORMED), rid)
        if k == 2:  # float32 needs bits=32
            h, p, _ = self._full(rid, m, dtype="float32")
            return self._case("wrong_dtype", f"float32 at {m.bits} bits", h, [p], _err(E.MALFORMED), rid)
        # a well-formed float tensor, but the mode sends packed codes: disagrees with the mode
        dt, bits = self._choice([("float32", 32), ("float16", 16)])
        h, p = self._consistent(rid, m, [m.channels, hh, w], bits, m.channels, dtype=dt, scale=1.0, zero_point=0)
        return self._case("wrong_dtype", f"{dt} tensor for a {m.bits}-bit mode", h, [p], _err(E.UNKNOWN_MODE), rid)

    def wrong_shape(self) -> FuzzCase:
        rid = self._id()
        m = self._mode()
        C, hh, w = self.t.wire_shape
        c = m.channels
        k = int(self.rng.integers(9))
        d = int(self.rng.integers(1, 4))
        if k < 6:
            shape, ch, what = [
                ([c, hh + d, w], c, "taller"),
                ([c, hh, w + d], c, "wider"),
                ([1, 1, c, hh, w], c, "5-d"),
                ([hh, w], None, "2-d"),
                ([c * hh * w], None, "flat"),
                ([0, c, hh, w], c, "zero rows"),
            ][k]
            h, p = self._consistent(rid, m, shape, m.bits, ch)
            return self._case("wrong_shape", what, h, [p], _err(E.MALFORMED), rid)
        if k == 6:  # more channels than the wire tensor has, consistently described
            h, p = self._consistent(rid, m, [C + d, hh, w], m.bits, C + d)
            return self._case("wrong_shape", f"{C + d} channels of {C}", h, [p], _err(E.UNKNOWN_MODE), rid)
        shape = self._choice([[], [1] * 9, [c, -hh, w], [c, float(hh), w], [c, str(hh), w], "8x8"])
        h, p, _ = self._full(rid, m, shape=shape)
        return self._case("wrong_shape", f"shape {shape!r}", h, [p], _err(E.MALFORMED), rid)

    def wrong_bits(self) -> FuzzCase:
        rid = self._id()
        m = self._mode()
        C, hh, w = self.t.wire_shape
        k = int(self.rng.integers(3))
        if k == 0:
            b = self._choice([0, 1, 3, 5, 7, 9, 12, 16, 32])
            h, p, _ = self._full(rid, m, bits=b, zero_point=0)
            return self._case("wrong_bits", f"bits={b}", h, [p], _err(E.UNSUPPORTED), rid)
        if k == 1:
            b = self._choice(["8", 8.0, True, None])
            h, p, _ = self._full(rid, m, bits=b)
            return self._case("wrong_bits", f"bits={b!r}", h, [p], _err(E.MALFORMED), rid)
        b = self._choice([x for x in (2, 4, 6, 8) if x != m.bits])
        h, p = self._consistent(rid, m, [m.channels, hh, w], b, m.channels, zero_point=0)
        return self._case("wrong_bits", f"{b} bits for a {m.bits}-bit mode", h, [p], _err(E.UNKNOWN_MODE), rid)

    def wrong_channels(self) -> FuzzCase:
        rid = self._id()
        m = self._mode()
        C, hh, w = self.t.wire_shape
        k = int(self.rng.integers(3))
        if k == 0 or (k == 2 and m.channels < 2):
            ch = m.channels + self._choice([-1, 1, 5])
            h, p, _ = self._full(rid, m, channels=ch)
            return self._case("wrong_channels", f"channels={ch} for shape[-3]={m.channels}", h, [p], _err(E.MALFORMED), rid)
        if k == 1:
            ch = self._choice([-1, "8", 8.5, True])
            h, p, _ = self._full(rid, m, channels=ch)
            return self._case("wrong_channels", f"channels={ch!r}", h, [p], _err(E.MALFORMED), rid)
        c = int(self.rng.integers(1, m.channels))  # a consistent subset the mode does not send
        h, p = self._consistent(rid, m, [c, hh, w], m.bits, c)
        return self._case("wrong_channels", f"{c} channels for a {m.channels}-channel mode", h, [p], _err(E.UNKNOWN_MODE), rid)

    def bad_quant(self) -> FuzzCase:
        rid = self._id()
        m = self._mode()
        if self.rng.random() < 0.5:
            s = self._choice([0, 0.0, -1.0, math.nan, math.inf, "0.1", None, True])
            h, p, _ = self._full(rid, m, scale=s)
            return self._case("bad_quant", f"scale={s!r}", h, [p], _err(E.MALFORMED), rid)
        zp = self._choice([-1, 1 << m.bits, 1.5, None, "0"])
        h, p, _ = self._full(rid, m, zero_point=zp)
        return self._case("bad_quant", f"zero_point={zp!r} at {m.bits} bits", h, [p], _err(E.MALFORMED), rid)

    def wrong_name(self) -> FuzzCase:
        rid = self._id()
        name = self._choice(["x", "", self.t.wire_name.upper() + "_", "z" * 300, 5, None])
        if name == self.t.wire_name:
            name += "2"
        h, p, _ = self._full(rid, name=name)
        return self._case("wrong_name", f"name={str(name)[:12]!r}", h, [p], _err(E.MALFORMED), rid)

    def lying_nbytes(self) -> FuzzCase:
        rid = self._id()
        m = self._mode()
        h, p, _ = self._full(rid, m)
        n = len(p)
        k = int(self.rng.integers(4))
        if k == 0:  # the descriptor lies about the frame it came with
            lie = max(0, n + self._choice([-1, 1, -n, 7, n, 1 << 20]))
            return self._case("lying_nbytes", f"nbytes={lie}, frame {n}", {**h, "tensors": [{**h["tensors"][0], "nbytes": lie}]},
                              [p], _err(E.MALFORMED), rid)
        if k == 1:  # frame and nbytes agree, but not with the shape
            frame = p[: n - int(self.rng.integers(1, n))] if self.rng.random() < 0.5 else p + self._random_bytes(1, 64)
            return self._case("lying_nbytes", f"frame {len(frame)} for {n}", {**h, "tensors": [{**h["tensors"][0], "nbytes": len(frame)}]},
                              [frame], _err(E.MALFORMED), rid)
        if k == 2:
            v = self._choice([-1, 1.5, str(n), None])
            return self._case("lying_nbytes", f"nbytes={v!r}", {**h, "tensors": [{**h["tensors"][0], "nbytes": v}]},
                              [p], _err(E.MALFORMED), rid)
        return self._case("lying_nbytes", "empty frame", {**h, "tensors": [{**h["tensors"][0], "nbytes": n}]}, [b""],
                          _err(E.MALFORMED), rid)

    def huge_declared(self) -> FuzzCase:
        rid = self._id()
        m = self._mode()
        C, hh, w = self.t.wire_shape
        lim = self.t.limits
        k = int(self.rng.integers(4))
        if k < 2:  # a small frame claiming a tensor far over max_frame_bytes (raw, or zstd)
            rows = self._choice([1 << 20, 1 << 40, (1 << 62) // (m.channels * hh * w)])
            frame = self._payload(m)
            codec = "raw" if k == 0 else "zstd"
            h, _, _ = self._full(rid, m, shape=[rows, m.channels, hh, w], nbytes=len(frame), codec=codec)
            return self._case("huge_declared", f"{rows} rows claimed ({codec})", h, [frame], _err(E.TOO_LARGE), rid)
        if k == 2:  # consistent, but more rows than the server batches
            rows = lim.max_batch + 1 + int(self.rng.integers(0, 4))
            h, p = self._consistent(rid, m, [rows, m.channels, hh, w], m.bits, m.channels)
            if len(p) > lim.max_frame_bytes:
                return self.huge_declared()
            return self._case("huge_declared", f"{rows} rows > max_batch {lim.max_batch}", h, [p], _err(E.TOO_LARGE), rid)
        dims = [1 << 40, 1 << 40, m.channels, hh, w]
        h, _, _ = self._full(rid, m, shape=dims, nbytes=len(self._payload(m)))
        return self._case("huge_declared", "2^80 rows", h, [self._payload(m)], _err(E.TOO_LARGE), rid)

    def oversized_frame(self) -> FuzzCase:
        """A real frame over ``max_frame_bytes`` (but under libzmq's 2x cut-off): expensive, so
        this class has a tiny weight."""
        rid = self._id()
        h, _, _ = self._compact(rid)
        n = self.t.limits.max_frame_bytes + int(self.rng.integers(1, 1025))
        return self._case("oversized_frame", f"{n}-byte frame", h, [bytes(n)], _err(E.TOO_LARGE), rid)

    def unknown_codec(self) -> FuzzCase:
        rid = self._id()
        if self.rng.random() < 0.6:
            c = self._choice(["lz4", "gzip", "", "RAW", "zstd2"])
            h, p, _ = self._full(rid, codec=c)
            return self._case("unknown_codec", f"codec {c!r}", h, [p], _err(E.UNSUPPORTED), rid)
        # not a string at all: a type error (PROTOCOL.md §4: "all keys present with the types above")
        c = self._choice([1, None, ["raw"], True])
        h, p, _ = self._full(rid, codec=c)
        return self._case("unknown_codec", f"codec {c!r}", h, [p], _err(E.MALFORMED), rid)

    def corrupt_zstd(self) -> FuzzCase:
        """Well-formed zstd descriptors whose frame does not decode to the declared size: these
        pass every check up to decoding, so they are queued and refused by the compute thread."""
        rid = self._id()
        m = self._mode()
        p = self._payload(m)
        k = int(self.rng.integers(3))
        frame, what = self._random_bytes(1, 600), "random bytes"
        try:
            import zstandard
        except ImportError:  # the server then has no zstd either: UNSUPPORTED
            h, _, _ = self._full(rid, m, codec="zstd", nbytes=len(frame))
            return self._case("corrupt_zstd", "zstd without zstandard", h, [frame],
                              frozenset({int(E.UNSUPPORTED), int(E.MALFORMED), int(E.OVERLOADED)}), rid)
        if k == 1:
            wrong = p + p[: int(self.rng.integers(1, len(p)))] if self.rng.random() < 0.5 else p[: len(p) // 2]
            frame, what = zstandard.ZstdCompressor(level=1).compress(wrong), f"frame of {len(wrong)} bytes for {len(p)}"
        elif k == 2:
            full = zstandard.ZstdCompressor(level=1).compress(p)
            frame, what = full[: max(1, len(full) - int(self.rng.integers(1, 8)))], "truncated frame"
        h, _, _ = self._full(rid, m, codec="zstd", nbytes=len(frame))
        return self._case("corrupt_zstd", what, h, [frame], _err(E.MALFORMED, E.OVERLOADED), rid)

    # -- compact requests (v1.1) ---------------------------------------------------------------
    def compact_wrong(self) -> FuzzCase:
        rid = self._id()
        h, p, m = self._compact(rid)
        n = len(p)
        k = int(self.rng.integers(5))
        if k == 0:
            frame = p[: n - int(self.rng.integers(1, n + 1))]
            return self._case("compact_wrong", f"frame {len(frame)} of {n}", h, [frame], _err(E.MALFORMED), rid)
        if k == 1:
            frame = p + self._random_bytes(1, 64)
            return self._case("compact_wrong", f"frame {len(frame)} of {n}", {**h, "tensors": None}, [frame], _err(E.MALFORMED), rid)
        if k == 2:
            return self._case("compact_wrong", "two frames", h, [p, p], _err(E.MALFORMED), rid)
        if k == 3:
            return self._case("compact_wrong", "no frame", h, [], _err(E.MALFORMED), rid)
        mode = self._choice([max(x.id for x in self.t.modes) + 1, 97, (1 << 31) - 1])
        return self._case("compact_wrong", f"mode {mode}", {**h, "mode": mode}, [p], _err(E.UNKNOWN_MODE), rid)

    def unknown_mode(self) -> FuzzCase:
        rid = self._id()
        h, p, _ = self._full(rid)
        mode = self._choice([max(x.id for x in self.t.modes) + 1, 64, (1 << 31) - 1])
        return self._case("unknown_mode", f"mode {mode}", {**h, "mode": mode}, [p], _err(E.UNKNOWN_MODE), rid)

    # -- sessions, deadlines, replays ---------------------------------------------------------
    def no_session(self) -> FuzzCase:
        rid = self._id()
        h, p = self._valid_request(rid)
        return self._case("no_session", "valid request, no hello", h, [p], _err(E.NOT_READY), rid, NO_SESSION)

    def deadline_zero(self) -> FuzzCase:
        rid = self._id()
        h, p = self._valid_request(rid)
        dl = self._choice([0, 0.0])
        return self._case("deadline_zero", f"deadline_ms={dl!r}", {**h, "deadline_ms": dl}, [p],
                          _err(E.DEADLINE_EXCEEDED, E.OVERLOADED), rid)

    def replay_id(self) -> FuzzCase:
        rid = int(self.rng.integers(1, self.replay_ids + 1))
        h, p = self._valid_request(rid)
        return self._case("replay_id", f"id {rid}", h, [p], frozenset(QUEUED), rid)

    def unknown_keys(self) -> FuzzCase:
        extra = {self._random_word() + "_x": self._choice([1, "a", None, [1, 2], {"k": 1}, 2.5]) for _ in range(3)}
        if self.rng.random() < 0.7:
            h = {"v": PROTOCOL_VERSION, "kind": "ping", "nonce": int(self.rng.integers(1 << 30)), **extra}
            return self._case("unknown_keys", "ping", h, [], frozenset([PONG]))
        rid = self._id()
        h, p, _ = self._full(rid)
        h["tensors"] = [{**h["tensors"][0], **extra}]
        return self._case("unknown_keys", "request descriptor", {**h, **extra}, [p], frozenset(QUEUED), rid)

    # -- other kinds ---------------------------------------------------------------------------
    def bad_hello(self) -> FuzzCase:
        caps = {"codecs": ["raw"], "bits": [2, 4, 6, 8], "max_inflight": 4}
        h = {"v": PROTOCOL_VERSION, "kind": "hello", "bundle": self.t.bundle_hash, "agent": "fuzz", "caps": caps}
        k = int(self.rng.integers(4))
        if k == 0:  # well-formed, for a bundle the server does not have (never the real one)
            other = "".join(self._choice("0123456789abcdef") for _ in range(64))
            if other == self.t.bundle_hash:
                other = "0" * 64
            return self._case("bad_hello", "unknown bundle", {**h, "bundle": other}, [], _err(E.UNKNOWN_BUNDLE))
        if k == 1:
            key, v = self._choice([("bundle", 5), ("bundle", "a" * 200), ("agent", "n" * 300), ("agent", None),
                                   ("caps", "all"), ("caps", None)])
            return self._case("bad_hello", f"{key}={str(v)[:10]!r}", {**h, key: v}, [], _err(E.MALFORMED))
        if k == 2:
            key, v = self._choice([("codecs", "raw"), ("codecs", [1]), ("bits", ["8"]), ("bits", [8] * 17),
                                   ("max_inflight", 0), ("max_inflight", -1), ("max_inflight", 1 << 21),
                                   ("max_inflight", 2.0), ("max_inflight", "missing")])
            c = {k2: x for k2, x in caps.items() if k2 != key} if v == "missing" else {**caps, key: v}
            return self._case("bad_hello", f"caps.{key}={str(v)[:10]!r}", {**h, "caps": c}, [], _err(E.MALFORMED))
        return self._case("bad_hello", "hello with a frame", h, [b"x"], _err(E.MALFORMED))

    def bad_control(self) -> FuzzCase:
        """Malformed ping, bye and error messages (a valid bye would end the session, a valid
        error is only logged: neither is sent)."""
        k = int(self.rng.integers(6))
        if k == 0:
            v = self._choice([-1, "1", 1.5, None, "missing"])
            h = {"v": PROTOCOL_VERSION, "kind": "ping"}
            if v != "missing":
                h["nonce"] = v
            return self._case("bad_control", f"ping nonce={v!r}", h, [], _err(E.MALFORMED))
        if k == 1:
            return self._case("bad_control", "ping with a frame", {"v": PROTOCOL_VERSION, "kind": "ping", "nonce": 1}, [b"x"],
                              _err(E.MALFORMED))
        if k == 2:
            return self._case("bad_control", "ping t_ns=-1", {"v": PROTOCOL_VERSION, "kind": "ping", "nonce": 1, "t_ns": -1}, [],
                              _err(E.MALFORMED))
        if k == 3:
            r = self._choice([5, ["x"], "r" * 5000])
            return self._case("bad_control", f"bye reason {str(r)[:8]!r}", {"v": PROTOCOL_VERSION, "kind": "bye", "reason": r}, [],
                              _err(E.MALFORMED))
        if k == 4:
            return self._case("bad_control", "bye with a frame", {"v": PROTOCOL_VERSION, "kind": "bye"}, [b"x"], _err(E.MALFORMED))
        h = {"v": PROTOCOL_VERSION, "kind": "error", "code": self._choice(["x", -1, None]), "name": "N", "message": "m"}
        return self._case("bad_control", f"error code={h['code']!r}", h, [], _err(E.MALFORMED))

    # -- chaos ---------------------------------------------------------------------------------
    def bitflip(self) -> FuzzCase:
        h, p = self._valid_request(self._id())
        raw = bytearray(_pack(h))
        kind_at = raw.find(b"request")  # never touch the kind: a flip must not make a bye or a pong
        spots = [i for i in range(len(raw)) if not kind_at - 1 <= i < kind_at + 7]
        for _ in range(int(self.rng.integers(1, 4))):
            raw[self._choice(spots)] ^= 1 << int(self.rng.integers(8))
        return self._case("bitflip", "1-3 bits", bytes(raw), [p], frozenset([ANYTHING]), None, CHAOS)


# name -> (method, default weight). Weights favour the cheap classes; the ones the server must
# queue and compute (replays, unknown keys in requests, corrupt zstd, zero deadlines) and the
# large ones (64 KiB headers, an 8 MiB frame) are rarer, so a fuzz run measures validation,
# not the tail.
CLASSES: dict[str, tuple[Callable[[FuzzGenerator], FuzzCase], float]] = {
    "truncated_header": (FuzzGenerator.truncated_header, 4),
    "oversized_header": (FuzzGenerator.oversized_header, 0.5),
    "not_a_map": (FuzzGenerator.not_a_map, 2),
    "trailing_bytes": (FuzzGenerator.trailing_bytes, 2),
    "forbidden_types": (FuzzGenerator.forbidden_types, 2),
    "random_bytes": (FuzzGenerator.random_bytes, 4),
    "wrong_version": (FuzzGenerator.wrong_version, 3),
    "unknown_kind": (FuzzGenerator.unknown_kind, 3),
    "too_many_frames": (FuzzGenerator.too_many_frames, 1),
    "bad_id": (FuzzGenerator.bad_id, 3),
    "bad_mode": (FuzzGenerator.bad_mode, 3),
    "bad_deadline": (FuzzGenerator.bad_deadline, 3),
    "bad_t_send": (FuzzGenerator.bad_t_send, 2),
    "bad_tensors": (FuzzGenerator.bad_tensors, 3),
    "missing_desc_key": (FuzzGenerator.missing_desc_key, 3),
    "wrong_dtype": (FuzzGenerator.wrong_dtype, 3),
    "wrong_shape": (FuzzGenerator.wrong_shape, 3),
    "wrong_bits": (FuzzGenerator.wrong_bits, 3),
    "wrong_channels": (FuzzGenerator.wrong_channels, 3),
    "bad_quant": (FuzzGenerator.bad_quant, 2),
    "wrong_name": (FuzzGenerator.wrong_name, 2),
    "lying_nbytes": (FuzzGenerator.lying_nbytes, 4),
    "huge_declared": (FuzzGenerator.huge_declared, 3),
    "oversized_frame": (FuzzGenerator.oversized_frame, 0.002),
    "unknown_codec": (FuzzGenerator.unknown_codec, 2),
    "corrupt_zstd": (FuzzGenerator.corrupt_zstd, 1),
    "compact_wrong": (FuzzGenerator.compact_wrong, 4),
    "unknown_mode": (FuzzGenerator.unknown_mode, 2),
    "no_session": (FuzzGenerator.no_session, 2),
    "deadline_zero": (FuzzGenerator.deadline_zero, 1),
    "replay_id": (FuzzGenerator.replay_id, 0.5),
    "unknown_keys": (FuzzGenerator.unknown_keys, 1),
    "bad_hello": (FuzzGenerator.bad_hello, 2),
    "bad_control": (FuzzGenerator.bad_control, 2),
    "bitflip": (FuzzGenerator.bitflip, 2),
}
