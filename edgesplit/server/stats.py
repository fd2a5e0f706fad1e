"""The daemon's figures, typed: what its threads count and record, and what the metrics
collector (:mod:`edgesplit.server.metrics`) and ``Server.stats()`` read.

Each counter has one writer: :class:`IoCounters` the I/O thread (sessions, refusals, delivery),
:class:`ComputeCounters` and every :class:`ModelStats` the compute thread. Readers on other threads
(a Prometheus scrape, a test) read ints that are never torn and copy dicts in one C-level step, so
no lock sits on the request path; a scrape may see a batch half recorded, and the next one sees
all of it.

Per (bundle, mode), the compute thread appends each batch's and each request's figures to
:class:`ModelStats` lists and folds them into histogram counts with numpy every
:data:`FOLD_EVERY_BATCHES` batches, after the replies are on their way (tools/bench_hotpath.py
measures what that costs per request; a bucket lookup per value, the obvious design, cost several
times more before the reply).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from itertools import chain
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Protocol

import numpy as np

from ..wire.errors import ErrorCode

if TYPE_CHECKING:  # pragma: no cover
    from ..bundle import Bundle

FOLD_EVERY_BATCHES = 256  # the compute thread folds recorded values into counts this often

# Microsecond buckets from a fast CPU tail to a request that waited a second.
DURATION_BUCKETS_US = (50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000)


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """Powers of two up to ``max_batch``, and ``max_batch`` itself."""
    b, out = 1, []
    while b < max_batch:
        out.append(b)
        b *= 2
    out.append(max_batch)
    return tuple(out)


class Histogram:
    """Bucket counts and sum of one histogram series (folded in batches of values with numpy)."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Iterable[float]):
        self.bounds = np.asarray(tuple(bounds), np.float64)
        self.counts = np.zeros(len(self.bounds) + 1, np.int64)  # the last bucket is +Inf
        self.total = 0.0

    def add(self, values) -> None:
        """Count ``values``: bucket i holds bounds[i-1] < v <= bounds[i], as Prometheus' ``le``."""
        if len(values):
            v = np.asarray(values, np.float64)
            self.counts += np.bincount(np.searchsorted(self.bounds, v, side="left"), minlength=len(self.counts))
            self.total += float(v.sum())

    def copy(self) -> "Histogram":
        h = Histogram.__new__(Histogram)
        h.bounds, h.counts, h.total = self.bounds, self.counts.copy(), self.total
        return h

    def buckets(self) -> list[tuple[str, int]]:
        """Cumulative ``(le, count)`` pairs ending with ``+Inf`` (whose count is the total)."""
        cum = np.cumsum(self.counts)
        return [*((str(float(b)), int(c)) for b, c in zip(self.bounds, cum)), ("+Inf", int(cum[-1]))]


class Totals:
    """Everything a scrape reports for one (bundle, mode)."""

    __slots__ = ("success", "inferences", "executions", "compute_infer_us", "batch_size", "queue", "compute", "request")

    def __init__(self, max_batch: int):
        self.success = 0  # requests answered with a result
        self.inferences = 0  # frames (rows) run through the tail
        self.executions = 0  # tail runs (batches)
        self.compute_infer_us = 0.0  # batch compute time, once per request in the batch (Triton's rule)
        self.batch_size = Histogram(batch_buckets(max_batch))  # per batch: rows
        self.compute = Histogram(DURATION_BUCKETS_US)  # per batch: decode + tail
        self.queue = Histogram(DURATION_BUCKETS_US)  # per request: receipt -> compute start
        self.request = Histogram(DURATION_BUCKETS_US)  # per request: receipt -> reply queued

    def add(self, batches: list[tuple[int, int, float]], queue_us: list[float], request_us: list[float]) -> None:
        if batches:
            # columns: rows, results, compute_us (fromiter over the flattened tuples: half the time
            # of np.asarray on a list of tuples)
            b = np.fromiter(chain.from_iterable(batches), np.float64, 3 * len(batches)).reshape(-1, 3)
            self.executions += len(b)
            self.inferences += int(b[:, 0].sum())
            self.success += int(b[:, 1].sum())
            self.compute_infer_us += float((b[:, 2] * b[:, 1]).sum())
            self.batch_size.add(b[:, 0])
            self.compute.add(b[:, 2])
        self.queue.add(queue_us)
        self.request.add(request_us)

    def copy(self) -> "Totals":
        t = Totals.__new__(Totals)
        for k in ("success", "inferences", "executions", "compute_infer_us"):
            setattr(t, k, getattr(self, k))
        for k in ("batch_size", "queue", "compute", "request"):
            setattr(t, k, getattr(self, k).copy())
        return t


class ModelStats:
    """The figures of one (bundle, mode), recorded by the compute thread as cheaply as Python
    allows: per batch one tuple ``(rows, results, compute_us)`` appended to :attr:`batches`, per
    answered request its queue and receipt-to-reply times appended to :attr:`queue_us` and
    :attr:`request_us` (a list append: a bucket lookup per value would cost several times more on
    the request's path). :meth:`fold` (compute thread, every :data:`FOLD_EVERY_BATCHES` batches,
    after the batch's replies are on their way) turns them into counts with numpy; a scrape adds
    what is not folded yet (:meth:`totals`)."""

    __slots__ = ("model", "version", "mode", "batches", "queue_us", "request_us", "_folded", "_lock")

    def __init__(self, model: str, version: str, mode: int, max_batch: int):
        self.model, self.version, self.mode = model, version, str(mode)
        self.batches: list[tuple[int, int, float]] = []
        self.queue_us: list[float] = []
        self.request_us: list[float] = []
        self._folded = Totals(max_batch)
        self._lock = threading.Lock()  # fold vs. scrape; never taken per request

    def fold(self) -> None:
        """Compute thread only: move the recorded values into the totals."""
        if not self.batches and not self.queue_us:
            return
        with self._lock:
            batches, self.batches = self.batches, []
            queue, self.queue_us = self.queue_us, []
            request, self.request_us = self.request_us, []
            self._folded.add(batches, queue, request)

    def totals(self) -> Totals:
        """Any thread: the totals including values not folded yet."""
        with self._lock:  # list() copies in one step under the GIL, while the compute thread appends
            t = self._folded.copy()
            pending = list(self.batches), list(self.queue_us), list(self.request_us)
        t.add(*pending)
        return t


# -- counters -----------------------------------------------------------------------------------
# Failures of inference requests, by (bundle hash, or None before a session named one; code).
FailureKey = tuple["str | None", ErrorCode]


@dataclass(eq=False)
class IoCounters:
    """Written by the I/O thread only."""

    messages: int = 0  # messages received (valid or not)
    requests: int = 0  # requests queued for compute
    sessions_opened: int = 0  # hellos answered with welcome (a re-handshake counts again)
    sessions_expired: int = 0  # sessions dropped after three heartbeat intervals of silence
    dropped_unreachable: int = 0  # replies to a peer that is gone
    dropped_full: int = 0  # replies to a peer whose pipe was full
    errors: dict[ErrorCode, int] = field(default_factory=dict)  # error replies sent, by code
    failures: dict[FailureKey, int] = field(default_factory=dict)  # of them, those naming a request
    auth_failed: dict[str, int] = field(default_factory=dict)  # handshakes refused, by reason

    def error(self, code: ErrorCode, bundle: str | None, request: bool) -> None:
        """Count one error reply (``request``: it answers an inference request)."""
        _count_error(self.errors, self.failures, code, bundle, request)


@dataclass(eq=False)
class ComputeCounters:
    """Written by the compute thread only."""

    batches: int = 0  # tail runs
    rows: int = 0  # frames run through the tail
    results: int = 0  # requests answered with logits
    errors: dict[ErrorCode, int] = field(default_factory=dict)  # requests answered with an error
    failures: dict[FailureKey, int] = field(default_factory=dict)

    def error(self, code: ErrorCode, bundle: str | None) -> None:
        _count_error(self.errors, self.failures, code, bundle, True)


def _count_error(errors: dict, failures: dict, code: ErrorCode, bundle: str | None, request: bool) -> None:
    errors[code] = errors.get(code, 0) + 1
    if request:
        key = (bundle, code)
        failures[key] = failures.get(key, 0) + 1


class SessionFigures(Protocol):
    """What the metrics read of one agent session (:class:`edgesplit.server.sessions.Session`)."""

    agent: str
    inflight: int
    requests: int
    bytes_in: int
    errors: int
    rtt_us: float | None


@dataclass(eq=False)
class ServerStats:
    """Everything the daemon counts, owned by it and read at scrape time."""

    models: dict[tuple[str, int], ModelStats]  # (bundle hash, mode id) -> its figures
    bundle_labels: dict[str, tuple[str, str]]  # bundle hash -> (model, version) labels
    sessions: Mapping[bytes, SessionFigures]  # the session table's own map (live sessions)
    queue_depth: Callable[[], int]  # requests queued for compute now
    io: IoCounters = field(default_factory=IoCounters)
    compute: ComputeCounters = field(default_factory=ComputeCounters)

    @classmethod
    def for_bundles(cls, bundles: Mapping[str, "Bundle"], max_batch: int, **kw) -> ServerStats:
        """One :class:`ModelStats` per (bundle, mode) served (an ED-ViT bundle's feature modes);
        labels from the bundle names."""
        labels = {h: (b.name, h[:12]) for h, b in bundles.items()}
        models = {
            (h, m): ModelStats(b.name, h[:12], m, max_batch)
            for h, b in bundles.items()
            for m in [*(x.id for x in b.modes), *(x.id for x in b.feature_modes)]
        }
        return cls(models=models, bundle_labels=labels, **kw)

    def fold(self) -> None:
        """Compute thread: recorded figures -> histogram counts."""
        for m in self.models.values():
            m.fold()

    def failure_counts(self) -> dict[FailureKey, int]:
        """Requests answered with an error, both threads together."""
        out = dict(self.io.failures)  # dict() copies in one step: safe while the owner thread writes
        for k, n in dict(self.compute.failures).items():
            out[k] = out.get(k, 0) + n
        return out

    def as_dict(self) -> dict[str, int]:
        """A flat summary (``Server.stats()``, the daemon's last log line): sessions and queue now,
        then every counter above zero, errors as ``error_<CODE>`` and refused handshakes as
        ``auth_failed_<reason>``."""
        io, c = self.io, self.compute
        flat: dict[str, int] = {
            "messages": io.messages,
            "requests": io.requests,
            "sessions_opened": io.sessions_opened,
            "sessions_expired": io.sessions_expired,
            "dropped_unreachable": io.dropped_unreachable,
            "dropped_full": io.dropped_full,
            "batches": c.batches,
            "rows": c.rows,
            "results": c.results,
        }
        for reason, n in dict(io.auth_failed).items():
            flat[f"auth_failed_{reason}"] = n
        for code, n in chain(dict(io.errors).items(), dict(c.errors).items()):
            flat[f"error_{code.name}"] = flat.get(f"error_{code.name}", 0) + n
        return {
            "sessions": len(self.sessions),
            "queued": self.queue_depth(),
            **{k: v for k, v in flat.items() if v > 0},
        }
