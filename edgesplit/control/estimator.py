"""Bandwidth estimation from per-frame link times.

A sample is ``(nbytes, link_seconds)``: the payload of one request and the time its bytes spent
on the uplink. The agent gets it from its own clock and the server's timings (the server reports
its queue and compute time, so ``rtt - server_time`` is link time, PROTOCOL.md §3.4);
:class:`LinkSampler` turns those per-frame reports into transmission times (it removes the fixed
round-trip term and the time a request waited behind the previous one on the uplink).

Estimators (all behind :class:`BandwidthEstimator`, so any policy accepts any of them):

* :class:`EwmaEstimator` — ``est = alpha * sample + (1 - alpha) * est`` on throughput samples.
* :class:`HarmonicMeanEstimator` — harmonic mean of the last ``window`` throughput samples, the
  robust predictor of MPC-style ABR (Yin et al., SIGCOMM 2015): one slow sample pulls it down at
  once, one fast outlier barely moves it.

Guards: a link time that is not finite is rejected (counted in ``rejected``); a link time below
``min_seconds`` (clock granularity, or a server time larger than the measured RTT) is raised to
``min_seconds`` (counted in ``clamped``), so the throughput of one sample never exceeds
``nbytes * 8 / min_seconds``; the estimate is capped at ``max_bps``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import deque

DEFAULT_MIN_SECONDS = 1e-4  # 0.1 ms: below the resolution of the timings the agent can trust
DEFAULT_MAX_BPS = 10e9  # 10 Gbit/s: nothing an edge uplink does


class BandwidthEstimator(ABC):
    """Fed with ``update(nbytes, link_seconds)``; ``estimate_bps()`` is bits/s, or None before
    the first accepted sample."""

    def __init__(self, min_seconds: float = DEFAULT_MIN_SECONDS, max_bps: float = DEFAULT_MAX_BPS):
        if min_seconds <= 0 or max_bps <= 0:
            raise ValueError("min_seconds and max_bps must be > 0")
        self.min_seconds = float(min_seconds)
        self.max_bps = float(max_bps)
        self.samples = 0
        self.clamped = 0
        self.rejected = 0

    def update(self, nbytes: float, seconds: float) -> bool:
        """Add one sample; returns False when it was rejected (non-finite or no bytes)."""
        if not (math.isfinite(nbytes) and math.isfinite(seconds)) or nbytes <= 0:
            self.rejected += 1
            return False
        if seconds < self.min_seconds:
            seconds = self.min_seconds
            self.clamped += 1
        self.samples += 1
        self._add(min(nbytes * 8.0 / seconds, self.max_bps))
        return True

    @abstractmethod
    def _add(self, bps: float) -> None: ...

    @abstractmethod
    def estimate_bps(self) -> float | None: ...

    def reset(self) -> None:
        self.samples = self.clamped = self.rejected = 0

    @property
    def name(self) -> str:
        return type(self).__name__


class EwmaEstimator(BandwidthEstimator):
    """Exponentially weighted moving average of throughput; ``alpha`` is the new sample's weight
    (the first sample initialises it)."""

    def __init__(self, alpha: float = 0.4, **kw):
        super().__init__(**kw)
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = float(alpha)
        self._est: float | None = None

    def _add(self, bps: float) -> None:
        self._est = bps if self._est is None else self.alpha * bps + (1 - self.alpha) * self._est

    def estimate_bps(self) -> float | None:
        return self._est

    def reset(self) -> None:
        super().reset()
        self._est = None

    @property
    def name(self) -> str:
        return f"ewma({self.alpha:g})"


class HarmonicMeanEstimator(BandwidthEstimator):
    """Harmonic mean of the last ``window`` throughput samples: ``n / sum(1 / x_i)``."""

    def __init__(self, window: int = 5, **kw):
        super().__init__(**kw)
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = int(window)
        self._inv: deque[float] = deque(maxlen=self.window)  # 1 / throughput of each kept sample
        self._est: float | None = None

    def _add(self, bps: float) -> None:
        self._inv.append(1.0 / bps)
        self._est = min(len(self._inv) / sum(self._inv), self.max_bps)

    def estimate_bps(self) -> float | None:
        return self._est

    def reset(self) -> None:
        super().reset()
        self._inv.clear()
        self._est = None

    @property
    def name(self) -> str:
        return f"harmonic({self.window})"


class ScalarEwma:
    """EWMA of a plain number (server queue+compute ms, encode ms); ``value`` is ``initial`` until
    the first sample. Non-finite or negative samples are ignored."""

    def __init__(self, alpha: float = 0.2, initial: float = 0.0):
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = float(alpha)
        self.initial = float(initial)
        self.value = float(initial)
        self.n = 0

    def update(self, x: float) -> None:
        if x is None or not math.isfinite(x) or x < 0:
            return
        self.value = x if self.n == 0 else self.alpha * x + (1 - self.alpha) * self.value
        self.n += 1

    def reset(self) -> None:
        self.value, self.n = self.initial, 0


class LinkSampler:
    """Turns per-request reports into uplink transmission times.

    For request *i* sent at ``t_send`` whose result came back at ``t_result`` after ``server_s``
    of server time, ``u_i = t_result - server_s`` is when the result would have arrived with a
    server that takes no time: the uplink finish plus the fixed round-trip term ``base_rtt_s``
    (propagation both ways and the small result's return). The uplink is a FIFO, so request *i*
    could not start before request *i-1* had finished, which it did at ``u_{i-1} - base_rtt_s``:

        transmit_i = min(u_i - base_rtt_s - t_send_i,  u_i - u_{i-1})

    The first term is the whole link time (for a request that found the uplink idle); the second
    is the time between two uplink completions (for a request that queued behind the previous
    one). Reports must be fed in the order the results arrive (FIFO: the order sent).
    """

    def __init__(self):
        self._prev_u: float | None = None

    def transmit_seconds(self, t_send_s: float, t_result_s: float, server_s: float, base_rtt_s: float) -> float:
        u = t_result_s - max(server_s, 0.0)
        link = u - base_rtt_s - t_send_s
        if self._prev_u is not None and u - self._prev_u < link:
            link = u - self._prev_u
        self._prev_u = u if self._prev_u is None else max(self._prev_u, u)
        return link

    def reset(self) -> None:
        self._prev_u = None
