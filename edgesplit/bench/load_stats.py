"""What one run of a load generator driver saw (:mod:`edgesplit.bench.loadgen`): counts, answers
by kind, latencies, and the summary the server benchmarks report."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np


@dataclass
class LoadStats:
    """What one run of a driver saw. Latencies are per result, in ms."""

    sent: int = 0
    results: int = 0
    results_in_window: int = 0  # results that arrived before the sending window closed
    window_s: float = 0.0
    errors: Counter = field(default_factory=Counter)
    rtt_ms: list[float] = field(default_factory=list)
    server_ms: list[float] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    deadline_ms: float | None = None
    wrong: int = 0  # results whose logits differ from the expected ones
    max_abs_err: float = 0.0
    unexpected: int = 0  # answers to no outstanding request (duplicates, foreign ids)
    unanswered: int = 0  # requests still without an answer when the driver gave up
    send_refused: int = 0  # sends the client's own socket refused (its queue full)
    no_session: int = 0  # requests not sent: their session was lost (bye) and not welcomed again
    server_bye: bool = False

    def merge(self, other: "LoadStats") -> None:
        """Add another run's counts and samples to this one (windows add up)."""
        self.sent += other.sent
        self.results += other.results
        self.results_in_window += other.results_in_window
        self.window_s += other.window_s
        self.errors.update(other.errors)
        self.rtt_ms += other.rtt_ms
        self.server_ms += other.server_ms
        self.batch_sizes += other.batch_sizes
        self.wrong += other.wrong
        self.max_abs_err = max(self.max_abs_err, other.max_abs_err)
        self.unexpected += other.unexpected
        self.unanswered += other.unanswered
        self.send_refused += other.send_refused
        self.no_session += other.no_session
        self.server_bye = self.server_bye or other.server_bye

    @property
    def answered(self) -> int:
        return self.results + sum(self.errors.values())

    def summary(self) -> dict:
        rtt = np.asarray(self.rtt_ms, np.float64)
        srv = np.asarray(self.server_ms, np.float64)
        bs = np.asarray(self.batch_sizes, np.int64)

        def pct(a: np.ndarray, q: float) -> float | None:
            return None if a.size == 0 else round(float(np.percentile(a, q)), 3)

        s = {
            "sent": self.sent,
            "results": self.results,
            "errors": dict(self.errors),
            "unanswered": self.unanswered,
            "unexpected": self.unexpected,
            "wrong_results": self.wrong,
            "frames_per_s": round(self.results_in_window / self.window_s, 1) if self.window_s else None,
            "offered_per_s": round(self.sent / self.window_s, 1) if self.window_s else None,
            "latency_ms_p50": pct(rtt, 50),
            "latency_ms_p99": pct(rtt, 99),
            "latency_ms_max": pct(rtt, 100),
            "server_ms_p50": pct(srv, 50),
            "server_ms_p99": pct(srv, 99),
            "server_ms_max": pct(srv, 100),
            "batch_size_mean": None if bs.size == 0 else round(float(bs.mean()), 2),
            "batch_size_p50": None if bs.size == 0 else int(np.median(bs)),
        }
        if self.send_refused:
            s["send_refused"] = self.send_refused
        if self.no_session:
            s["no_session"] = self.no_session
        if self.server_bye:
            s["server_bye"] = True
        if self.deadline_ms is not None:
            s["deadline_ms"] = self.deadline_ms
            s["late_results"] = int((srv > self.deadline_ms).sum())
        return s

    def row(self, agents: int) -> dict:
        """One row of the per-agent-count tables of ``bench server`` and ``bench gateway``."""
        s = self.summary()
        return {
            "agents": agents,
            "frames_per_s": s["frames_per_s"],
            "latency_ms_p50": s["latency_ms_p50"],
            "latency_ms_p99": s["latency_ms_p99"],
            "server_ms_p50": s["server_ms_p50"],
            "batch_size_mean": s["batch_size_mean"],
            "batch_size_p50": s["batch_size_p50"],
            "requests": self.sent,
            "errors": s["errors"],
            "unanswered": self.unanswered,
            "wrong_results": self.wrong,
            "max_abs_err": self.max_abs_err,
        }
