"""Integer probability tables of codec ``"ans"`` (docs/PROTOCOL.md §4.4, docs/BUNDLE.md §7.2).

A **table set** holds one table per channel of the wire tensor: the smallest value the channel
codes (``offset``) and the integer frequencies of the values ``offset .. offset + n - 1``, which
sum to exactly ``2**TABLE_PRECISION``. The bundle stores table sets in its ``cdf`` file (JSON);
this module parses and validates that file, names each set by the SHA-256 of a canonical byte
string (so agent, server and a client in another language check the same thing), and turns each
table into the coder's 24-bit cumulative table by an integer formula (:func:`coder_cdf`).

The entropy coder is constriction's stack ANS coder (``constriction.stream.stack.AnsCoder``: 32-bit
words, 64-bit state, 24-bit probabilities). Its Python API builds a categorical model from
floating-point probabilities; fed the stored integer frequencies as float64 it computes, exactly
and on every platform, the table of :func:`coder_cdf` (every operation is exact in float64; the
test suite checks each boundary of random tables against the library). constriction is optional
(extra ``entropy``): it is imported on first use, with an error that says how to get it.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import ErrorCode, WireError, is_int

TABLE_PRECISION = 16  # stored frequencies of one channel sum to 2**16
CODER_PRECISION = 24  # the coder's probabilities are multiples of 2**-24
MAX_ALPHABET = 4096  # values per channel table
MAX_OFFSET = 1 << 20  # |offset| and |offset + n| stay far inside float32's exact integers
MAX_TABLE_CHANNELS = 4096
MAX_SETS = 64
TAG_BYTES = 2  # leading bytes of a set's digest that every frame carries (PROTOCOL.md §4.4)
FILE_FORMAT = "edgesplit-ans-tables"
FILE_VERSION = 1
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_-.")

_INSTALL_HINT = (
    "codec 'ans' needs the constriction package: pip install 'edgesplit[entropy]' "
    "(PyPI has wheels for Linux x86_64, macOS and Windows only; on Linux aarch64 build it from "
    "its source release with a Rust toolchain and maturin, see docs/PROTOCOL.md section 4.4)"
)


def constriction_module() -> Any:
    """The ``constriction`` module, or WireError(UNSUPPORTED) naming the package and how to get it."""
    try:
        return importlib.import_module("constriction")
    except ImportError:
        raise WireError(ErrorCode.UNSUPPORTED, _INSTALL_HINT) from None


def ans_available() -> bool:
    try:
        constriction_module()
        return True
    except WireError:
        return False


def coder_cdf(freqs: np.ndarray) -> np.ndarray:
    """The coder's cumulative table (``n + 1`` entries, 0 .. 2**24) for stored frequencies ``freqs``
    (``n`` of them, summing to 2**16): ``cdf[i] = (F[i] * (2**24 - n)) >> 16) + i`` with ``F[i]``
    the sum of the first ``i`` frequencies. Every value gets at least 2**-24, zeros included."""
    f = np.asarray(freqs, dtype=np.int64)
    n = f.shape[0]
    cum = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(f, out=cum[1:])
    return ((cum * ((1 << CODER_PRECISION) - n)) >> TABLE_PRECISION) + np.arange(n + 1, dtype=np.int64)


def quantize_pmf(pmf) -> np.ndarray:
    """Integer frequencies summing to 2**16 for a probability vector (>= 2 entries, finite, >= 0,
    positive sum): floors of the scaled probabilities, the rest by largest remainder (ties to the
    lower index). The exporter's step from a learned density to a bundle table."""
    p = np.asarray(pmf, dtype=np.float64)
    if p.ndim != 1 or p.shape[0] < 2 or not np.all(np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
        raise ValueError("pmf: a vector of >= 2 finite non-negative numbers with a positive sum")
    scaled = p / p.sum() * (1 << TABLE_PRECISION)
    f = np.floor(scaled).astype(np.int64)
    short = (1 << TABLE_PRECISION) - int(f.sum())
    if short > 0:
        f[np.argsort(-(scaled - f), kind="stable")[:short]] += 1
    return f


@dataclass(frozen=True, eq=False)
class TableSet:
    """One table per channel: ``offsets[c]`` and ``freqs[c]`` (int64, summing to 2**16)."""

    name: str
    offsets: tuple[int, ...]
    freqs: tuple[np.ndarray, ...]
    digest: str = field(init=False)
    _lock: threading.Lock = field(init=False, repr=False, default_factory=threading.Lock)
    _models: list[Any] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self) -> None:
        object.__setattr__(self, "digest", hashlib.sha256(canonical_bytes(self.offsets, self.freqs)).hexdigest())

    @property
    def channels(self) -> int:
        return len(self.offsets)

    @property
    def tag(self) -> bytes:
        """What a frame carries to say which tables coded it: the digest's first TAG_BYTES bytes."""
        return bytes.fromhex(self.digest[: 2 * TAG_BYTES])

    def sizes(self) -> np.ndarray:
        return np.array([len(f) for f in self.freqs], dtype=np.int64)

    def models(self) -> list[Any]:
        """One constriction categorical model per channel (built once; shared across threads:
        constriction models are immutable)."""
        if not self._models:
            cm = constriction_module().stream.model
            built = [cm.Categorical(f.astype(np.float64), perfect=False) for f in self.freqs]
            with self._lock:
                if not self._models:
                    self._models.extend(built)
        return self._models

    def bits(self, values: np.ndarray) -> float:
        """Ideal code length in bits of integer ``values`` (``[c,h,w]`` or ``[n,c,h,w]``, inside the
        tables' support) under the coder's tables: what the coded frame approaches."""
        v = np.asarray(values, dtype=np.int64)
        total = 0.0
        for c in range(self.channels):
            cdf = coder_cdf(self.freqs[c])
            s = v[..., c, :, :].ravel() - self.offsets[c]
            total += float(np.sum(CODER_PRECISION - np.log2(cdf[s + 1] - cdf[s])))
        return total

    def to_json(self) -> dict[str, Any]:
        return {
            "channels": [{"offset": int(o), "freqs": [int(x) for x in f]} for o, f in zip(self.offsets, self.freqs)],
            "sha256": self.digest,
        }


def canonical_bytes(offsets: tuple[int, ...], freqs: tuple[np.ndarray, ...]) -> bytes:
    """The bytes a set's digest hashes: uint32 LE channel count, then per channel int32 LE offset,
    uint32 LE n, and n uint32 LE frequencies."""
    parts = [np.array([len(offsets)], dtype="<u4").tobytes()]
    for o, f in zip(offsets, freqs):
        parts.append(np.array([o], dtype="<i4").tobytes())
        parts.append(np.array([len(f)], dtype="<u4").tobytes())
        parts.append(np.asarray(f, dtype="<u4").tobytes())
    return b"".join(parts)


def make_table_set(name: str, offsets, freqs) -> TableSet:
    """Build and validate a table set (raises ValueError naming what is wrong)."""
    _check_name(name)
    offs = tuple(int(o) for o in offsets)
    fs = tuple(np.asarray(f, dtype=np.int64).copy() for f in freqs)
    if not 1 <= len(offs) <= MAX_TABLE_CHANNELS or len(offs) != len(fs):
        raise ValueError(f"table set {name!r}: 1 to {MAX_TABLE_CHANNELS} channels, one offset per table")
    for c, (o, f) in enumerate(zip(offs, fs)):
        where = f"table set {name!r} channel {c}"
        if f.ndim != 1 or not 2 <= f.shape[0] <= MAX_ALPHABET:
            raise ValueError(f"{where}: 2 to {MAX_ALPHABET} frequencies")
        if np.any(f < 0) or int(f.sum()) != 1 << TABLE_PRECISION:
            raise ValueError(f"{where}: frequencies must be >= 0 and sum to 2**{TABLE_PRECISION}")
        if not (-MAX_OFFSET <= o and o + f.shape[0] <= MAX_OFFSET):
            raise ValueError(f"{where}: offset {o} out of [-2**20, 2**20 - n]")
    for f in fs:
        f.setflags(write=False)
    return TableSet(name, offs, fs)


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not 1 <= len(name) <= 64 or not set(name) <= _NAME_CHARS:
        raise ValueError(f"table set name {name!r}: 1-64 of a-z 0-9 _ - .")


def tables_document(sets: list[TableSet]) -> dict[str, Any]:
    """The JSON document of a bundle's ``cdf`` file (BUNDLE.md §7.2)."""
    return {
        "format": FILE_FORMAT,
        "version": FILE_VERSION,
        "precision": TABLE_PRECISION,
        "sets": {s.name: s.to_json() for s in sets},
    }


def parse_tables(data: bytes | str | dict[str, Any]) -> dict[str, TableSet]:
    """Parse and validate a ``cdf`` file (bytes, text or the decoded JSON). Every key is checked,
    unknown keys are refused, and each set's recorded ``sha256`` must equal the digest of its
    tables. Raises ValueError naming the key."""
    doc = json.loads(data) if isinstance(data, (bytes, str)) else data
    if not isinstance(doc, dict):
        raise ValueError("ans tables: the document must be a JSON object")
    _only(doc, ("format", "version", "precision", "sets"), "ans tables")
    if doc.get("format") != FILE_FORMAT:
        raise ValueError(f"ans tables: 'format' must be {FILE_FORMAT!r}")
    if doc.get("version") != FILE_VERSION or not is_int(doc.get("version")):
        raise ValueError(f"ans tables: 'version' must be {FILE_VERSION}")
    if doc.get("precision") != TABLE_PRECISION or not is_int(doc.get("precision")):
        raise ValueError(f"ans tables: 'precision' must be {TABLE_PRECISION}")
    sets = doc.get("sets")
    if not isinstance(sets, dict) or not 1 <= len(sets) <= MAX_SETS:
        raise ValueError(f"ans tables: 'sets' must be an object of 1 to {MAX_SETS} table sets")
    out: dict[str, TableSet] = {}
    for name, entry in sets.items():
        where = f"ans tables: sets.{name}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be an object")
        _only(entry, ("channels", "sha256"), where)
        chans = entry.get("channels")
        if not isinstance(chans, list):
            raise ValueError(f"{where}.channels must be a list")
        offsets, freqs = [], []
        for c, ch in enumerate(chans):
            if not isinstance(ch, dict):
                raise ValueError(f"{where}.channels[{c}] must be an object")
            _only(ch, ("offset", "freqs"), f"{where}.channels[{c}]")
            o, f = ch.get("offset"), ch.get("freqs")
            if not is_int(o) or not isinstance(f, list) or not all(is_int(x) for x in f):
                raise ValueError(f"{where}.channels[{c}]: 'offset' an integer, 'freqs' a list of integers")
            offsets.append(o)
            freqs.append(np.array(f, dtype=np.int64) if len(f) <= MAX_ALPHABET else np.zeros(0, np.int64))
        try:
            ts = make_table_set(name, offsets, freqs)
        except ValueError as e:
            raise ValueError(f"ans tables: {e}") from None
        if entry.get("sha256") != ts.digest:
            raise ValueError(f"{where}.sha256 does not match its tables (computed {ts.digest})")
        out[name] = ts
    return out


def _only(d: dict, keys: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(d) - set(keys))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(map(str, unknown))} (known: {', '.join(keys)})")
