"""The vocabulary of :mod:`edgesplit.wire.fuzz`: what a fuzz case is, what answers it may get,
which socket it goes out on, and the helpers every fault generator builds its messages with.

A case is built from a *valid* message of the target bundle (:meth:`CaseBuilder._full`,
:meth:`CaseBuilder._compact`) with exactly one fault injected.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any, Sequence

import msgpack
import numpy as np

from .codec import ErrorCode
from .kinds import PROTOCOL_VERSION, Limits

E = ErrorCode

# Outcomes a case may expect besides an error code.
RESULT = "result"
PONG = "pong"
ANY_ERROR = "any-error"  # an error reply, whatever its code (random bytes)
ANYTHING = "anything"  # any one reply (bitflips)

# Channels: which socket a case must go out on.
SESSION = "session"  # a DEALER that has said hello and got welcome
NO_SESSION = "nosession"  # a DEALER that never says hello
CHAOS = "chaos"  # a DEALER with a session whose replies are counted, not matched

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
    codec: str = "raw"  # "ans": entropy-coded (PROTOCOL.md §4.4) with ``tables``
    tables: Any = None  # an ans mode's TableSet


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
        modes = tuple(
            ModeSpec(
                int(m.id),
                int(m.channels),
                int(m.bits),
                float(m.scale),
                int(m.zero_point),
                str(getattr(m, "codec", "raw")),
                bundle.tables_for(m) if getattr(m, "codec", "raw") == "ans" else None,
            )
            for m in bundle.modes
        )
        c, h, w = (int(s) for s in spec["shape"])  # the wire tensor is [C, h, w]
        return cls(bundle.hash, spec["name"], (c, h, w), modes, limits)


@dataclass
class FuzzCase:
    cls: str  # the class it came from (a key of CLASSES)
    variant: str  # which fault, in words
    parts: list[bytes]  # the message: header frame, then tensor frames
    expect: frozenset  # acceptable answers: ErrorCode ints, RESULT, PONG, ANY_ERROR, ANYTHING
    reply_id: int | None = None  # the id the answer carries (None: nil, or not an id-carrying answer)
    channel: str = SESSION

    def accepts(self, outcome: int | str) -> bool:
        """Whether one answer (an error code, RESULT or PONG) is one the protocol allows here."""
        if ANYTHING in self.expect or outcome in self.expect:
            return True
        return ANY_ERROR in self.expect and isinstance(outcome, int)


def packb(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def expect_error(*codes: ErrorCode) -> frozenset:
    return frozenset(int(c) for c in codes)


QUEUED = (RESULT, int(E.OVERLOADED))  # a valid request: computed, unless the queue or credits are full


class CaseBuilder:
    """Helpers shared by the fault generators: fresh ids, seeded choices, valid requests of the
    target (full or compact) to inject one fault into, and packing a case."""

    t: FuzzTarget
    rng: np.random.Generator
    replay_ids: int
    _next_id: int
    _payloads: dict[int, list[bytes]]  # mode id -> a few valid packed payloads
    _descs: dict[int, dict[str, Any]]  # mode id -> the descriptor its compact requests imply

    # -- helpers ---------------------------------------------------------------------------
    def _id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _choice(self, seq: Sequence) -> Any:
        return seq[int(self.rng.integers(len(seq)))]

    def _mode(self) -> ModeSpec:
        """A uniform mode: the classes built on packed codes (ans modes have classes of their own)."""
        modes = [m for m in self.t.modes if m.codec == "raw"]
        if not modes:
            raise ValueError("this fuzz class needs a uniform mode; the bundle has only 'ans' modes")
        return self._choice(modes)

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

    def _case(
        self,
        cls: str,
        variant: str,
        header: dict | bytes,
        frames: Sequence[bytes],
        expect: frozenset,
        reply_id: int | None = None,
        channel: str = SESSION,
    ) -> FuzzCase:
        h = header if isinstance(header, (bytes, bytearray)) else packb(header)
        return FuzzCase(cls, variant, [bytes(h), *frames], expect, reply_id, channel)
