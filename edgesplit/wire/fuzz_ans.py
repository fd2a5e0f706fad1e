"""Malformed frames of codec ``"ans"`` (docs/PROTOCOL.md §4.4), for fuzzing a decoder.

Each case is a descriptor and a frame with exactly one fault, built from a valid coding of real
values, and the codes PROTOCOL.md §4.4 owes it (:func:`malformed_ans_frames`).
``tests/test_ans_codec.py`` runs them through the reference decoder. :class:`AnsFaults` turns them
into the server fuzzer's classes (:mod:`edgesplit.wire.fuzz`, one per :data:`ANS_CLASSES` key) for
a bundle's ans modes: sent full or compact, in a request of such a mode, on a session.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from .ans_codec import descriptor as ans_descriptor
from .ans_codec import encode_values, max_payload_bytes
from .ans_tables import TABLE_PRECISION, TAG_BYTES, TableSet, make_table_set
from .errors import ErrorCode
from .fuzz_cases import QUEUED, CaseBuilder, FuzzCase, ModeSpec, expect_error
from .kinds import PROTOCOL_VERSION

E = ErrorCode
DECODES = "decodes"  # garbage that happens to be a valid coding: in-range values, no error

# class -> what its variants break
ANS_CLASSES = {
    "ans_truncated": "words or bytes cut from the end",
    "ans_garbage": "random words behind the right tag",
    "ans_oversized": "longer than any coding of the shape, or a shape over the decoded-size limit",
    "ans_cdf_mismatch": "the tag of other tables, or words coded with other tables behind their tag",
    "ans_trailing_zero": "a zero word appended",
}


@dataclass(frozen=True)
class AnsCase:
    cls: str
    what: str
    descriptor: dict[str, Any]
    payload: bytes
    expect: frozenset  # ErrorCode members, and DECODES where a valid coding is possible


def malformed_ans_frames(
    tables: TableSet, values: np.ndarray, other: TableSet, seed: int = 0, max_bytes: int = 8 << 20
) -> Iterator[AnsCase]:
    """Every class once or more for integer ``values`` (inside ``tables``); ``other`` is another
    table set with as many channels, whose values ``values`` also fit."""
    rng = np.random.default_rng(seed)
    shape = tuple(values.shape)
    good = encode_values(values, tables)
    words = (len(good) - TAG_BYTES) // 4

    def case(cls: str, what: str, payload: bytes, *expect, shape_=shape) -> AnsCase:
        return AnsCase(cls, what, ans_descriptor("z", shape_, 1.0, len(payload)), payload, frozenset(expect))

    if words:
        cut = int(rng.integers(1, words + 1))
        yield case("ans_truncated", f"{cut} of {words} words cut", good[: len(good) - 4 * cut], E.MALFORMED, DECODES)
    yield case("ans_truncated", "one byte cut", good[:-1], E.MALFORMED)
    for _ in range(3):
        k = int(rng.integers(1, 2 * words + 3))
        junk = rng.integers(1, 1 << 32, size=k, dtype=np.uint64).astype("<u4").tobytes()
        yield case("ans_garbage", f"{k} random words", tables.tag + junk, E.MALFORMED, DECODES)
    n = int(np.prod(shape))
    yield case(
        "ans_oversized", "one byte over the bound", tables.tag + b"\x01" * (max_payload_bytes(n) - 1), E.MALFORMED
    )
    huge = (*shape[:-2], 1 << 15, max(1, max_bytes // (4 << 15)) + 1)
    yield case("ans_oversized", f"shape {list(huge)}", good, E.TOO_LARGE, shape_=huge)
    yield case("ans_cdf_mismatch", "another set's tag", other.tag + good[TAG_BYTES:], E.MALFORMED)
    coded_other = encode_values(values, other)
    yield case("ans_cdf_mismatch", "this set's tag on other tables' words", tables.tag + coded_other[TAG_BYTES:],
               E.MALFORMED, DECODES)  # fmt: skip
    yield case("ans_trailing_zero", "a zero word appended", good + bytes(4), E.MALFORMED)


def sample_values(tables: TableSet, shape, rng: np.random.Generator) -> np.ndarray:
    """Integer values of ``shape`` ([c,h,w]) drawn from each channel's table: what a head sends."""
    out = np.empty(shape, dtype=np.int32)
    for c in range(tables.channels):
        p = tables.freqs[c] / float(1 << TABLE_PRECISION)
        out[c] = rng.choice(len(p), size=shape[1:], p=p) + tables.offsets[c]
    return out


def other_tables(tables: TableSet) -> TableSet:
    """A table set over the same values with other (flat) frequencies: another digest, another tag."""
    flat = []
    for f in tables.freqs:
        g = np.full(len(f), (1 << TABLE_PRECISION) // len(f), dtype=np.int64)
        g[: (1 << TABLE_PRECISION) - int(g.sum())] += 1
        flat.append(g)
    return make_table_set(tables.name + "-other", tables.offsets, flat)


class AnsFaults(CaseBuilder):
    """The server fuzzer's classes for ans modes (:data:`ANS_CLASSES`): a request of an ans mode
    whose frame has one §4.4 fault. Faults found when the descriptor is checked are answered at
    once; the others only when the frame is decoded at its batch, so the request is queued first
    (and may meet OVERLOADED); a garbage frame that happens to decode gets a result."""

    _ans: dict[int, tuple[ModeSpec, np.ndarray, TableSet]]  # mode id -> (mode, values, other tables)

    def _init_ans(self) -> None:
        self._ans = {}
        C, h, w = self.t.wire_shape
        for m in self.t.modes:
            if m.codec == "ans" and m.tables is not None:
                self._ans[m.id] = (m, sample_values(m.tables, (m.channels, h, w), self.rng), other_tables(m.tables))

    def _ans_case(self, cls: str) -> FuzzCase:
        if not self._ans:
            raise ValueError(f"fuzz class {cls}: the bundle has no 'ans' mode")
        m, values, other = self._ans[self._choice(sorted(self._ans))]
        seed = int(self.rng.integers(1 << 31))
        cases = list(malformed_ans_frames(m.tables, values, other, seed, self.t.limits.max_frame_bytes))
        ac = self._choice([c for c in cases if c.cls == cls])
        rid = self._id()
        h = {"v": PROTOCOL_VERSION, "kind": "request", "id": rid, "mode": m.id}
        compact = ac.descriptor["shape"] == [m.channels, *self.t.wire_shape[1:]] and self.rng.random() < 0.5
        if not compact:
            h["tensors"] = [dict(ac.descriptor, name=self.t.wire_name, scale=m.scale)]
        at_once = ac.expect - {DECODES}  # answered before queueing when no valid coding is possible
        expect = expect_error(*at_once) | (set(QUEUED) if DECODES in ac.expect else set())
        if DECODES not in ac.expect and ErrorCode.TOO_LARGE not in ac.expect and not _refused_on_length(ac):
            expect = expect | {int(ErrorCode.OVERLOADED)}  # queued, refused when its batch decodes it
        return self._case(cls, ("compact " if compact else "") + ac.what, h, [ac.payload], frozenset(expect), rid)

    def ans_truncated(self) -> FuzzCase:
        return self._ans_case("ans_truncated")

    def ans_garbage(self) -> FuzzCase:
        return self._ans_case("ans_garbage")

    def ans_oversized(self) -> FuzzCase:
        return self._ans_case("ans_oversized")

    def ans_cdf_mismatch(self) -> FuzzCase:
        return self._ans_case("ans_cdf_mismatch")

    def ans_trailing_zero(self) -> FuzzCase:
        return self._ans_case("ans_trailing_zero")


def _refused_on_length(ac: AnsCase) -> bool:
    """A frame whose length alone breaks §4.4 (not 2 + 4k, or over the bound): refused unqueued."""
    n = len(ac.payload)
    return n < TAG_BYTES or (n - TAG_BYTES) % 4 != 0 or n > max_payload_bytes(int(np.prod(ac.descriptor["shape"])))


ANS_FUZZ_WEIGHT = 2.0  # each ans class's default weight in the server fuzzer
