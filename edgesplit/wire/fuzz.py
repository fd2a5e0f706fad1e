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
- codec ``ans`` (§4.4, bundles with ans modes; :mod:`edgesplit.wire.fuzz_ans`): truncated, garbage,
  oversized and CDF-mismatched frames, a trailing zero word, sent full or compact;
- session: valid requests without a session (NOT_READY), ``deadline_ms: 0``, replays of other
  agents' ids, valid messages with unknown keys;
- other kinds: bad ``hello`` (unknown bundle, bad caps), ``ping``, ``bye`` and ``error``;
- ``bitflip``: a valid request header with a few flipped bits. Any single answer is correct
  (the flips may leave it valid, or change its id), so it goes out on its own channel.

The case types and shared helpers are in :mod:`edgesplit.wire.fuzz_cases`, the faults inside
a request (fields, tensors, descriptors, compact frames) in :mod:`edgesplit.wire.fuzz_requests`,
the rest here. Everything is deterministic from the seed. No sockets here (see ``edgesplit.bench.fuzz``), no
torch (this is the wire plane).
"""

from __future__ import annotations

from typing import Callable, Sequence

import msgpack
import numpy as np

from .fuzz_ans import ANS_CLASSES, ANS_FUZZ_WEIGHT, AnsFaults
from .fuzz_cases import (
    ANY_ERROR,
    ANYTHING,
    CHAOS,
    FUZZ_ID_BASE,
    NO_SESSION,
    PONG,
    QUEUED,
    RESULT,
    SESSION,
    E,
    FuzzCase,
    FuzzTarget,
    ModeSpec,
    expect_error,
    packb,
)
from .fuzz_requests import RequestFaults
from .protocol import PROTOCOL_VERSION, RESERVED_KINDS, compact_descriptor
from .quantize import pack_bits

# re-exported: callers import the case types and channel names from here
__all__ = ["ANY_ERROR", "CHAOS", "NO_SESSION", "PONG", "RESULT", "SESSION", "FuzzCase", "FuzzTarget", "ModeSpec"]


class FuzzGenerator(RequestFaults, AnsFaults):
    """Deterministic stream of :class:`FuzzCase` for one target. ``next()`` draws a class by
    weight; ``case(cls)`` makes one of a given class. The framing, header and session faults are
    here; the faults inside a request (its fields, tensors and descriptors) come from
    :class:`~edgesplit.wire.fuzz_requests.RequestFaults`."""

    def __init__(
        self,
        target: FuzzTarget,
        seed: int = 0,
        *,
        classes: Sequence[str] | None = None,
        replay_ids: int = 1000,
        weights: dict[str, float] | None = None,
    ):
        self.t = target
        self.rng = np.random.default_rng(seed)
        self.replay_ids = int(replay_ids)
        self._next_id = FUZZ_ID_BASE
        names = list(classes) if classes is not None else default_classes(target)
        unknown = [n for n in names if n not in CLASSES]
        if unknown:
            raise ValueError(f"unknown fuzz classes {unknown} (known: {', '.join(CLASSES)})")
        w = np.array([(weights or {}).get(n, CLASSES[n][1]) for n in names], np.float64)
        self._names = names
        self._p = w / w.sum()
        C, h, w_ = target.wire_shape
        # A few valid payloads per mode (random codes, zero padding bits), reused by every case.
        self._payloads = {
            m.id: [
                pack_bits(self.rng.integers(0, 1 << m.bits, m.channels * h * w_, dtype=np.uint8), m.bits)
                for _ in range(4)
            ]
            for m in target.modes
            if m.codec == "raw"
        }
        self._descs = {m.id: compact_descriptor(target.wire_name, target.wire_shape, m) for m in target.modes}
        self._init_ans()

    # -- drawing ---------------------------------------------------------------------------
    def next(self) -> FuzzCase:
        name = self._names[int(self.rng.choice(len(self._names), p=self._p))]
        return self.case(name)

    def case(self, cls: str) -> FuzzCase:
        return CLASSES[cls][0](self)

    # -- framing -------------------------------------------------------------------------------
    def truncated_header(self) -> FuzzCase:
        h, p, _ = self._full(self._id())
        raw = packb(h)
        cut = int(self.rng.integers(0, len(raw)))  # 0: an empty header frame
        return self._case("truncated_header", f"cut at {cut}/{len(raw)}", raw[:cut], [p], expect_error(E.MALFORMED))

    def oversized_header(self) -> FuzzCase:
        over = int(self.rng.integers(1, 4097))
        # A well-formed ping but for its size: the size check comes before unpacking.
        h = {"v": PROTOCOL_VERSION, "kind": "ping", "nonce": 1, "pad": "x" * (self.t.limits.max_header_bytes + over)}
        return self._case("oversized_header", f"{over} bytes over", h, [], expect_error(E.TOO_LARGE))

    def not_a_map(self) -> FuzzCase:
        values = [[1, "request"], 7, "request", None, 1.5, True, [], -3]
        v = self._choice(values)
        if self.rng.random() < 0.15:
            return self._case("not_a_map", "empty frame", b"", [], expect_error(E.MALFORMED))
        return self._case("not_a_map", f"{type(v).__name__} {v!r}", packb(v), [], expect_error(E.MALFORMED))

    def trailing_bytes(self) -> FuzzCase:
        raw = packb({"v": PROTOCOL_VERSION, "kind": "ping", "nonce": 3}) + self._random_bytes(1, 8)
        return self._case("trailing_bytes", "ping + junk", raw, [], expect_error(E.MALFORMED))

    def forbidden_types(self) -> FuzzCase:
        base = {"v": PROTOCOL_VERSION, "kind": "ping", "nonce": 5}
        k = int(self.rng.integers(5))
        if k == 0:
            raw, what = packb({**base, "blob": self._random_bytes(1, 32)}), "bin value"
        elif k == 1:
            raw, what = packb({**base, "x": msgpack.ExtType(int(self.rng.integers(0, 128)), b"ab")}), "ext value"
        elif k == 2:
            raw, what = packb({**base, 7: 1}), "integer key"
        elif k == 3:
            raw, what = packb({**base, "list": [0] * 4097}), "array of 4097"
        else:
            raw, what = packb({**base, **{f"k{i}": i for i in range(65)}}), "map of 68 keys"
        return self._case("forbidden_types", what, raw, [], expect_error(E.MALFORMED))

    def random_bytes(self) -> FuzzCase:
        frames = [self._random_bytes(0, 64) for _ in range(int(self.rng.integers(0, 3)))]
        return self._case("random_bytes", "random header", self._random_bytes(1, 512), frames, frozenset([ANY_ERROR]))

    # -- version and kind --------------------------------------------------------------------
    def wrong_version(self) -> FuzzCase:
        rid = self._id()
        h, p = self._valid_request(rid)
        if self.rng.random() < 0.5:
            v = self._choice([0, 2, 3, 255, 65535, -1, 1 << 32])
            return self._case("wrong_version", f"v={v}", {**h, "v": v}, [p], expect_error(E.UNSUPPORTED_VERSION), rid)
        v = self._choice(["1", 1.0, True, None, [1], "missing"])
        h = {k: x for k, x in h.items() if k != "v"} if v == "missing" else {**h, "v": v}
        return self._case("wrong_version", f"v={v!r}", h, [p], expect_error(E.MALFORMED), rid)

    def unknown_kind(self) -> FuzzCase:
        rid = self._id()
        h, p = self._valid_request(rid)
        k = int(self.rng.integers(5))
        if k == 0:
            kind = self._random_word()
            known = {"hello", "welcome", "request", "result", "error", "ping", "pong", "bye", *RESERVED_KINDS}
            if kind in known:
                kind += "?"
            return self._case(
                "unknown_kind", f"kind {kind!r}", {**h, "kind": kind}, [p], expect_error(E.MALFORMED), rid
            )
        if k == 1:
            kind = self._choice(RESERVED_KINDS)
            return self._case(
                "unknown_kind", f"reserved {kind!r}", {**h, "kind": kind}, [p], expect_error(E.UNSUPPORTED), rid
            )
        if k == 2:
            kind = self._choice([7, None, ["request"], True, 1.5])
            return self._case(
                "unknown_kind", f"kind {kind!r}", {**h, "kind": kind}, [p], expect_error(E.MALFORMED), rid
            )
        if k == 3:  # a server-to-agent kind, sent to the server
            h = {
                "v": PROTOCOL_VERSION,
                "kind": "result",
                "id": rid,
                "outputs": [],
                "timing": {"queue_us": 0, "compute_us": 0, "server_us": 0, "batch_size": 1},
            }
            return self._case("unknown_kind", "result to server", h, [], expect_error(E.MALFORMED), rid)
        return self._case(
            "unknown_kind",
            "welcome to server",
            {"v": PROTOCOL_VERSION, "kind": "welcome"},
            [],
            expect_error(E.MALFORMED),
        )

    def too_many_frames(self) -> FuzzCase:
        rid = self._id()
        h, p, _ = self._full(rid)
        n = self.t.limits.max_frames + 1 + int(self.rng.integers(0, 8))
        return self._case("too_many_frames", f"{n} frames", h, [p] * n, expect_error(E.TOO_LARGE), rid)

    # -- sessions, deadlines, replays ---------------------------------------------------------
    def no_session(self) -> FuzzCase:
        rid = self._id()
        h, p = self._valid_request(rid)
        return self._case("no_session", "valid request, no hello", h, [p], expect_error(E.NOT_READY), rid, NO_SESSION)

    def deadline_zero(self) -> FuzzCase:
        rid = self._id()
        h, p = self._valid_request(rid)
        dl = self._choice([0, 0.0])
        return self._case(
            "deadline_zero",
            f"deadline_ms={dl!r}",
            {**h, "deadline_ms": dl},
            [p],
            expect_error(E.DEADLINE_EXCEEDED, E.OVERLOADED),
            rid,
        )

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
            return self._case("bad_hello", "unknown bundle", {**h, "bundle": other}, [], expect_error(E.UNKNOWN_BUNDLE))
        if k == 1:
            key, v = self._choice(
                [
                    ("bundle", 5),
                    ("bundle", "a" * 200),
                    ("agent", "n" * 300),
                    ("agent", None),
                    ("caps", "all"),
                    ("caps", None),
                ]
            )
            return self._case("bad_hello", f"{key}={str(v)[:10]!r}", {**h, key: v}, [], expect_error(E.MALFORMED))
        if k == 2:
            key, v = self._choice(
                [
                    ("codecs", "raw"),
                    ("codecs", [1]),
                    ("bits", ["8"]),
                    ("bits", [8] * 17),
                    ("max_inflight", 0),
                    ("max_inflight", -1),
                    ("max_inflight", 1 << 21),
                    ("max_inflight", 2.0),
                    ("max_inflight", "missing"),
                ]
            )
            c = {k2: x for k2, x in caps.items() if k2 != key} if v == "missing" else {**caps, key: v}
            return self._case(
                "bad_hello", f"caps.{key}={str(v)[:10]!r}", {**h, "caps": c}, [], expect_error(E.MALFORMED)
            )
        return self._case("bad_hello", "hello with a frame", h, [b"x"], expect_error(E.MALFORMED))

    def bad_control(self) -> FuzzCase:
        """Malformed ping, bye and error messages (a valid bye would end the session, a valid
        error is only logged: neither is sent)."""
        k = int(self.rng.integers(6))
        if k == 0:
            v = self._choice([-1, "1", 1.5, None, "missing"])
            h = {"v": PROTOCOL_VERSION, "kind": "ping"}
            if v != "missing":
                h["nonce"] = v
            return self._case("bad_control", f"ping nonce={v!r}", h, [], expect_error(E.MALFORMED))
        if k == 1:
            return self._case(
                "bad_control",
                "ping with a frame",
                {"v": PROTOCOL_VERSION, "kind": "ping", "nonce": 1},
                [b"x"],
                expect_error(E.MALFORMED),
            )
        if k == 2:
            return self._case(
                "bad_control",
                "ping t_ns=-1",
                {"v": PROTOCOL_VERSION, "kind": "ping", "nonce": 1, "t_ns": -1},
                [],
                expect_error(E.MALFORMED),
            )
        if k == 3:
            r = self._choice([5, ["x"], "r" * 5000])
            return self._case(
                "bad_control",
                f"bye reason {str(r)[:8]!r}",
                {"v": PROTOCOL_VERSION, "kind": "bye", "reason": r},
                [],
                expect_error(E.MALFORMED),
            )
        if k == 4:
            return self._case(
                "bad_control",
                "bye with a frame",
                {"v": PROTOCOL_VERSION, "kind": "bye"},
                [b"x"],
                expect_error(E.MALFORMED),
            )
        h = {"v": PROTOCOL_VERSION, "kind": "error", "code": self._choice(["x", -1, None]), "name": "N", "message": "m"}
        return self._case("bad_control", f"error code={h['code']!r}", h, [], expect_error(E.MALFORMED))

    # -- chaos ---------------------------------------------------------------------------------
    def bitflip(self) -> FuzzCase:
        h, p = self._valid_request(self._id())
        raw = bytearray(packb(h))
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
    **{n: (getattr(FuzzGenerator, n), ANS_FUZZ_WEIGHT) for n in ANS_CLASSES},  # PROTOCOL.md §4.4: ans modes only
}


def default_classes(target: FuzzTarget) -> list[str]:
    """The classes a target's modes can build: the uniform ones with a uniform mode, the ans ones
    with an ans mode."""
    uniform, ans = (any(m.codec == k for m in target.modes) for k in ("raw", "ans"))
    return [n for n in CLASSES if (ans if n in ANS_CLASSES else uniform)]
