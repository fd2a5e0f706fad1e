"""Malformed frames of codec ``"ans"`` (docs/PROTOCOL.md §4.4), for fuzzing a decoder.

The server fuzzer (:mod:`edgesplit.wire.fuzz`) builds each case from a valid message of the bundle
a live server serves; no server offers ``"ans"`` yet (a request in it is answered UNSUPPORTED, like
any codec the server does not decode), so these classes stand apart until one does: each case is
a descriptor and a frame with exactly one fault, built from a valid coding of real values, and the
codes PROTOCOL.md §4.4 owes it. ``tests/test_ans_codec.py`` runs them through the reference
decoder; the server's fuzz classes can be built from the same function once it decodes ``"ans"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from .ans_codec import descriptor as ans_descriptor
from .ans_codec import encode_values, max_payload_bytes
from .ans_tables import TAG_BYTES, TableSet
from .errors import ErrorCode

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
