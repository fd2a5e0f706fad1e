"""Real link-capacity traces behind one interface.

Two formats, both found in ``../shared/data/traces`` (see that folder's README):

* **HSDPA / Norway 3G** (Riiser et al., MMSys 2013): one sample a line,
  ``time_seconds<TAB>throughput_Mbit_per_s``, irregularly spaced (about 1 s). Read as a
  piecewise-constant **rate**: sample *i* holds on ``[t_i, t_{i+1})`` (the convention of the
  Pensieve/MPC simulators that distribute this pre-processing); the last sample holds for the
  median sample spacing, and the trace then loops.
* **Mahimahi** (Winstein et al., NSDI 2013): one integer a line, the millisecond of one
  *delivery opportunity* for 1500 bytes; repeated values are several opportunities in that
  millisecond. The trace loops with period = its last timestamp (as ``mm-link`` does).
  Opportunities are kept exactly, and served the way ``mm-link`` serves them: an opportunity at
  time τ carries up to 1500 bytes of whatever is queued at τ (bytes of several small packets, or
  part of a larger one); bytes of an opportunity that finds the queue empty are lost.

Both are presented as a **cumulative service curve**: ``level_at(t)`` is the number of bytes the
link could have delivered in ``[0, t)``, and ``time_at_level(L)`` is the first time by which it has
delivered ``L`` bytes. A FIFO pipe is then exact for both kinds (see
:meth:`Trace.transmit`): a message of ``B`` bytes sent at ``t`` behind earlier messages whose last
byte sits at level ``E`` starts at level ``max(E, level_at(t))`` and finishes at
``time_at_level(start + B)``. For Mahimahi this reproduces mm-link's byte accounting (leftover
bytes of an opportunity serve the next message only if it was already queued at that
opportunity).

Times are seconds from the start of the trace; capacities are bytes (levels) or Mbit/s.
"""

from __future__ import annotations

import math
import os
from bisect import bisect_left, bisect_right
from pathlib import Path
from typing import Iterable

import numpy as np

MAHIMAHI_PACKET_BYTES = 1500


class TraceError(ValueError):
    """A trace file is missing, empty or malformed."""


class Trace:
    """Link capacity as a function of time (looping), one of two kinds:

    * ``"packets"``: exact delivery opportunities (Mahimahi), ``opportunity_times_s`` available;
    * ``"rate"``: piecewise-constant Mbit/s (HSDPA, synthetic steps).

    Build with :func:`read_trace`, :meth:`from_mahimahi`, :meth:`from_rates` or :meth:`constant`.
    """

    def __init__(self, name: str, kind: str, period_s: float):
        self.name = name
        self.kind = kind
        self.period_s = float(period_s)

    # -- constructors ---------------------------------------------------------------------------
    @classmethod
    def from_mahimahi(
        cls, opportunities_ms: Iterable[int], name: str = "mahimahi", packet_bytes: int = MAHIMAHI_PACKET_BYTES
    ) -> "Trace":
        ms = np.asarray(list(opportunities_ms) if not isinstance(opportunities_ms, np.ndarray) else opportunities_ms)
        if ms.size == 0:
            raise TraceError(f"{name}: no delivery opportunities")
        if ms.ndim != 1 or np.any(ms < 0) or np.any(np.diff(ms) < 0):
            raise TraceError(f"{name}: opportunities must be non-negative, non-decreasing milliseconds")
        if ms[-1] <= 0:
            raise TraceError(f"{name}: the last timestamp (the loop period) must be > 0 ms")
        return _PacketTrace(name, ms.astype(np.int64), int(packet_bytes))

    @classmethod
    def from_rates(
        cls, times_s: Iterable[float], mbps: Iterable[float], name: str = "rate", period_s: float | None = None
    ) -> "Trace":
        """Piecewise-constant rate: ``mbps[i]`` on ``[times_s[i], times_s[i+1])``; the last value
        holds until ``period_s`` (default: last time + median spacing, or +1 s for one sample)."""
        t = np.asarray(list(times_s), dtype=np.float64)
        r = np.asarray(list(mbps), dtype=np.float64)
        if t.size == 0 or t.size != r.size:
            raise TraceError(f"{name}: need as many times as rates, at least one")
        if not (np.all(np.isfinite(t)) and np.all(np.isfinite(r))) or np.any(r < 0):
            raise TraceError(f"{name}: times and rates must be finite, rates >= 0")
        if np.any(np.diff(t) <= 0):
            raise TraceError(f"{name}: sample times must increase")
        t = t - t[0]
        if period_s is None:
            period_s = t[-1] + (float(np.median(np.diff(t))) if t.size > 1 else 1.0)
        if period_s <= t[-1]:
            raise TraceError(f"{name}: period {period_s} s must be after the last sample ({t[-1]} s)")
        return _RateTrace(name, t, r, float(period_s))

    @classmethod
    def constant(cls, mbps: float, name: str | None = None) -> "Trace":
        return cls.from_rates([0.0], [mbps], name=name or f"constant-{mbps:g}Mbps", period_s=1.0)

    # -- the service curve (implemented by the kinds) --------------------------------------------
    def level_at(self, t: float) -> float:
        """Bytes the link can deliver in ``[0, t)`` (opportunities at exactly ``t`` not included)."""
        raise NotImplementedError

    def time_at_level(self, level: float) -> float:
        """First time at which ``level`` bytes have been delivered (``level > 0``)."""
        raise NotImplementedError

    def capacity_between(self, t0: float, t1: float) -> float:
        """Bytes the link offers in ``[t0, t1]`` (both ends included)."""
        raise NotImplementedError

    # -- derived ---------------------------------------------------------------------------------
    def transmit(self, t_send: float, nbytes: float, busy_until_level: float = 0.0) -> tuple[float, float, float]:
        """Send ``nbytes`` at ``t_send`` through a FIFO pipe whose earlier messages end at level
        ``busy_until_level``. Returns ``(start_level, end_level, finish_time)``: the message's
        last byte is delivered at ``finish_time``; pass ``end_level`` to the next call."""
        start = max(busy_until_level, self.level_at(t_send))
        if nbytes <= 0:
            raise ValueError(f"transmit: nbytes must be > 0, got {nbytes}")
        end = start + float(nbytes)
        return start, end, self.time_at_level(end)

    def finish_time(self, t_send: float, nbytes: float) -> float:
        """When a message of ``nbytes`` sent at ``t_send`` on an idle link is delivered."""
        return self.transmit(t_send, nbytes)[2]

    def mbps_between(self, t0: float, t1: float) -> float:
        """Mean capacity over ``[t0, t1)`` in Mbit/s."""
        return (self.level_at(t1) - self.level_at(t0)) * 8 / 1e6 / (t1 - t0)

    def per_second_mbps(self, seconds: int | None = None) -> np.ndarray:
        """Capacity of each 1-second slot ``[k, k+1)`` in Mbit/s, for ``seconds`` slots (looping).
        Default: one period, rounded up; for Mahimahi ``floor(last_ms / 1000) + 1`` slots of one
        pass over the file without looping, which is how the data README counts them (the last
        millisecond of a file opens a slot of its own)."""
        n = self.default_seconds() if seconds is None else int(seconds)
        edges = [self.level_at(float(k)) for k in range(n + 1)]
        return np.diff(np.asarray(edges)) * 8 / 1e6

    def default_seconds(self) -> int:
        return int(math.ceil(self.period_s))

    def __repr__(self) -> str:
        return f"Trace({self.name!r}, kind={self.kind}, period={self.period_s:g} s)"


class _PacketTrace(Trace):
    def __init__(self, name: str, ms: np.ndarray, packet_bytes: int):
        super().__init__(name, "packets", float(ms[-1]) / 1000.0)
        self.packet_bytes = packet_bytes
        self._ms = ms
        self._ms_list = [int(v) for v in ms]  # bisect on a list: fast scalar look-ups
        self._n = len(self._ms_list)
        self._period_ms = int(ms[-1])

    @property
    def opportunity_ms(self) -> np.ndarray:
        """The raw delivery-opportunity times of one period, in ms (read-only copy)."""
        return self._ms.copy()

    def opportunity_times_s(self, t0: float, t1: float) -> np.ndarray:
        """Every opportunity time in ``[t0, t1]`` (seconds), looping as needed."""
        k0 = max(int(math.floor(t0 * 1000 / self._period_ms)) - 1, 0)
        k1 = int(math.floor(t1 * 1000 / self._period_ms)) + 1
        out = np.concatenate([self._ms + k * self._period_ms for k in range(k0, k1 + 1)]) / 1000.0
        return out[(out >= t0) & (out <= t1)]

    def _count_before(self, ms: float) -> int:
        """Opportunities strictly before ``ms`` (looping)."""
        if ms <= 0:
            return bisect_left(self._ms_list, ms)
        k = int(math.ceil(ms / self._period_ms)) - 1  # so that 0 < r <= period
        r = ms - k * self._period_ms
        return k * self._n + bisect_left(self._ms_list, r)

    def _count_through(self, ms: float) -> int:
        """Opportunities at or before ``ms`` (looping)."""
        if ms < 0:
            return 0
        k = int(math.floor(ms / self._period_ms))  # 0 <= r < period
        r = ms - k * self._period_ms
        return k * self._n + bisect_right(self._ms_list, r)

    def level_at(self, t: float) -> float:
        return float(self._count_before(t * 1000.0) * self.packet_bytes)

    def time_at_level(self, level: float) -> float:
        if level <= 0:
            return 0.0
        m = int(math.ceil(level / self.packet_bytes - 1e-9)) - 1  # 0-based index of the opportunity
        k, j = divmod(m, self._n)
        return (self._ms_list[j] + k * self._period_ms) / 1000.0

    def capacity_between(self, t0: float, t1: float) -> float:
        return float((self._count_through(t1 * 1000.0) - self._count_before(t0 * 1000.0)) * self.packet_bytes)

    def default_seconds(self) -> int:
        return self._period_ms // 1000 + 1

    def per_second_mbps(self, seconds: int | None = None) -> np.ndarray:
        if seconds is None:  # one pass over the file, not looped: the data README's statistics
            n = self.default_seconds()
            return np.bincount(self._ms // 1000, minlength=n)[:n] * self.packet_bytes * 8 / 1e6
        return super().per_second_mbps(seconds)


class _RateTrace(Trace):
    def __init__(self, name: str, t: np.ndarray, mbps: np.ndarray, period_s: float):
        super().__init__(name, "rate", period_s)
        self.times_s = t
        self.mbps = mbps  # the samples as read (their plain median is what the data README quotes)
        rate = mbps * 1e6 / 8  # bytes/s
        cum = np.concatenate([[0.0], np.cumsum(rate * np.diff(np.append(t, period_s)))])
        if cum[-1] <= 0:
            raise TraceError(f"{name}: the trace has no capacity at all")
        self._t = [float(v) for v in t]
        self._rate = [float(v) for v in rate]
        self._cum = [float(v) for v in cum[:-1]]
        self._per_period = float(cum[-1])

    def level_at(self, t: float) -> float:
        if t <= 0:
            return 0.0
        k = int(math.floor(t / self.period_s))
        r = t - k * self.period_s
        i = bisect_right(self._t, r) - 1
        return k * self._per_period + self._cum[i] + self._rate[i] * (r - self._t[i])

    def time_at_level(self, level: float) -> float:
        if level <= 0:
            return 0.0
        k = int(math.floor(level / self._per_period))
        rem = level - k * self._per_period
        if rem <= 0:  # exactly a whole number of periods: the end of period k-1
            k, rem = k - 1, self._per_period
        j = bisect_left(self._cum, rem)  # first breakpoint whose level >= rem
        if j < len(self._cum) and self._cum[j] == rem:
            t = self._t[j]
        else:
            i = j - 1
            t = self._t[i] + (rem - self._cum[i]) / self._rate[i]
        return k * self.period_s + t

    def capacity_between(self, t0: float, t1: float) -> float:
        return self.level_at(t1) - self.level_at(t0)


# -- readers ----------------------------------------------------------------------------------------
def read_mahimahi(path: str | Path) -> Trace:
    p = Path(path)
    try:
        raw = p.read_text().split()
        ms = np.asarray([int(v) for v in raw], dtype=np.int64)
    except (OSError, ValueError) as e:
        raise TraceError(f"{p}: not a Mahimahi trace (one integer millisecond a line): {e}") from None
    return Trace.from_mahimahi(ms, name=p.name)


def read_hsdpa(path: str | Path) -> Trace:
    p = Path(path)
    try:
        rows = [line.split() for line in p.read_text().splitlines() if line.strip()]
        t = [float(r[0]) for r in rows]
        v = [float(r[1]) for r in rows]
    except (OSError, ValueError, IndexError) as e:
        raise TraceError(f"{p}: not an HSDPA trace (time_s<TAB>Mbit/s a line): {e}") from None
    return Trace.from_rates(t, v, name=p.name)


def read_trace(path: str | Path) -> Trace:
    """Read either format: ``.up``/``.down`` (or a file of bare integers) is Mahimahi, two columns
    is HSDPA."""
    p = Path(path)
    if p.suffix in (".up", ".down"):
        return read_mahimahi(p)
    try:
        first = next(line for line in p.read_text().splitlines() if line.strip())
    except (OSError, StopIteration) as e:
        raise TraceError(f"{p}: empty or unreadable trace: {e}") from None
    return read_hsdpa(p) if len(first.split()) >= 2 else read_mahimahi(p)


def traces_dir() -> Path:
    """``$EDGESPLIT_DATA/traces``, default ``../shared/data/traces`` beside the project."""
    data = os.environ.get("EDGESPLIT_DATA")
    base = Path(data) if data else Path(__file__).resolve().parents[3] / "shared" / "data"
    return base / "traces"


def hsdpa_paths(root: str | Path | None = None) -> list[Path]:
    d = Path(root) if root else traces_dir() / "hsdpa-norway-3g"
    return sorted(p for p in d.glob("norway_*") if p.is_file())
