"""Prometheus metrics of the daemon, named after NVIDIA Triton's so that dashboards carry over.

The request path pays for metrics only with a few list appends and integer increments. The daemon
records where it already works: the compute thread appends each batch's and each request's
figures to :class:`ModelStats` lists and folds them into histogram counts with numpy every few
hundred batches, after the replies are on their way; the I/O thread counts failures and
per-session figures. :class:`ServerCollector` reads all of it when Prometheus scrapes
(``/metrics``, see :mod:`edgesplit.server.httpd`). A scrape may see a batch half recorded (the next
scrape sees all of it), never a torn number. Measured on the project's 2-core CI box: about 0.2 us
per request on the I/O thread, 0.3 us on the compute thread before the reply is queued, and 0.45 us
per batch for the fold after it (a bucket lookup per value, the obvious design, cost 1.9 us per
request before the reply).

Labels: ``model`` (bundle name), ``version`` (first 12 hex digits of the bundle hash: two builds of
one bundle name differ), ``mode`` (bundle mode id) - all bounded by the bundles served. Failures
carry ``reason`` (the wire ErrorCode name) and no mode: a refused request's mode may be anything a
client made up. Per-agent series carry ``agent`` (the name the agent sent in hello), only for
sessions alive at scrape time and at most :data:`MAX_AGENT_SERIES` names (the rest add up under
``agent="_other"``), so a stream of short-lived agents cannot grow the series count without bound.

Durations are microseconds, as Triton's are. Prometheus' client adds ``_total`` to counter names
(Triton's exporter does not): ``edgesplit_X_total`` here is ``nv_X`` there.

=============================================================  =========================================
edgesplit metric                                               Triton metric it mirrors
=============================================================  =========================================
``edgesplit_inference_request_success_total``                  ``nv_inference_request_success``
``edgesplit_inference_request_failure_total{reason}``          ``nv_inference_request_failure{reason}``
``edgesplit_inference_count_total`` (frames run)               ``nv_inference_count``
``edgesplit_inference_exec_count_total`` (tail runs, batches)  ``nv_inference_exec_count``
``edgesplit_inference_request_duration_us_total``              ``nv_inference_request_duration_us``
``edgesplit_inference_queue_duration_us_total``                ``nv_inference_queue_duration_us``
``edgesplit_inference_compute_infer_duration_us_total``        ``nv_inference_compute_infer_duration_us``
``edgesplit_inference_pending_request_count``                  ``nv_inference_pending_request_count``
``edgesplit_inference_request_histogram_us``                   ``nv_inference_request_summary_us``
``edgesplit_inference_queue_histogram_us``                     ``nv_inference_queue_summary_us``
``edgesplit_inference_compute_infer_histogram_us``             ``nv_inference_compute_infer_summary_us``
``edgesplit_inference_batch_size``                             (none: Triton has no batch-size metric)
=============================================================  =========================================

Triton exports summaries (quantiles computed in the server); histograms are used here instead,
because they aggregate across servers (quantiles do not). As in
Triton, a request's compute time is its batch's (so the compute total adds the batch time once per
request in it) and includes decoding the tensors into the batch buffer (Triton's separate
``compute_input`` step). Request duration is server receipt -> reply queued.

edgesplit's own: ``edgesplit_sessions``, ``edgesplit_inflight_requests``,
``edgesplit_auth_failure_total{reason}`` (connections refused in the CURVE/ZMTP handshake, see
:mod:`edgesplit.wire.curve`), ``edgesplit_replies_dropped_total{reason}``, and per agent
``edgesplit_agent_requests_total``, ``edgesplit_agent_received_bytes_total``,
``edgesplit_agent_errors_total`` (error replies sent to it) and ``edgesplit_agent_heartbeat_rtt_us``
(the last server ping -> pong round trip). Per-agent counters belong to the session: they carry
over a re-handshake on the same connection and start again after an expiry (Prometheus reads
that as a counter reset).
"""

from __future__ import annotations

import threading
from collections import defaultdict
from itertools import chain
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .daemon import Server

MAX_AGENT_SERIES = 200
FOLD_EVERY_BATCHES = 256  # the compute thread folds recorded values into counts this often
OTHER_AGENTS = "_other"
UNKNOWN_MODEL = "unknown"  # a request refused before it had a session, hence a bundle
# Server.counters keys of refused handshakes: AUTH_FAILED_PREFIX + reason (edgesplit.wire.curve).
AUTH_FAILED_PREFIX = "auth_failed_"

# Microsecond buckets from a fast CPU tail (~50 us) to a request that waited a second.
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
        self.success = 0             # requests answered with a result
        self.inferences = 0          # frames (rows) run through the tail
        self.executions = 0          # tail runs (batches)
        self.compute_infer_us = 0.0  # batch compute time, once per request in the batch (Triton's rule)
        self.batch_size = Histogram(batch_buckets(max_batch))  # per batch: rows
        self.compute = Histogram(DURATION_BUCKETS_US)          # per batch: decode + tail
        self.queue = Histogram(DURATION_BUCKETS_US)            # per request: receipt -> compute start
        self.request = Histogram(DURATION_BUCKETS_US)          # per request: receipt -> reply queued

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
    :attr:`request_us` (a list append, ~0.05 us; a bucket lookup per value would cost ~0.3 us on
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


class ServerCollector:
    """A prometheus_client collector that reads a :class:`~edgesplit.server.daemon.Server`'s own
    counters at scrape time."""

    def __init__(self, server: "Server"):
        self.server = server

    def collect(self) -> Iterator:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        srv = self.server
        labels = ["model", "version", "mode"]
        stats = [([s.model, s.version, s.mode], s.totals()) for s in srv.model_stats.values()]

        def counter(name: str, doc: str, value) -> CounterMetricFamily:
            f = CounterMetricFamily(f"edgesplit_{name}", doc, labels=labels)
            for lab, t in stats:
                f.add_metric(lab, value(t))
            return f

        yield counter("inference_request_success", "Requests answered with a result (Triton: nv_inference_request_success)",
                      lambda s: s.success)
        yield counter("inference_count", "Frames run through the tail; a batch of n counts n (Triton: nv_inference_count)",
                      lambda s: s.inferences)
        yield counter("inference_exec_count", "Tail runs, i.e. batches (Triton: nv_inference_exec_count)",
                      lambda s: s.executions)
        yield counter("inference_request_duration_us", "Cumulative receipt-to-reply time of answered requests, us "
                      "(Triton: nv_inference_request_duration_us)", lambda s: s.request.total)
        yield counter("inference_queue_duration_us", "Cumulative time requests waited for compute, us "
                      "(Triton: nv_inference_queue_duration_us)", lambda s: s.queue.total)
        yield counter("inference_compute_infer_duration_us", "Cumulative compute time (decode + tail) per request, us "
                      "(Triton: nv_inference_compute_infer_duration_us)", lambda s: s.compute_infer_us)

        def histogram(name: str, doc: str, pick) -> HistogramMetricFamily:
            f = HistogramMetricFamily(f"edgesplit_{name}", doc, labels=labels)
            for lab, t in stats:
                h = pick(t)
                f.add_metric(lab, h.buckets(), h.total)
            return f

        yield histogram("inference_batch_size", "Rows per tail run", lambda s: s.batch_size)
        yield histogram("inference_queue_histogram_us", "Per-request queue time, us (Triton: nv_inference_queue_summary_us)",
                        lambda s: s.queue)
        yield histogram("inference_compute_infer_histogram_us", "Per-batch compute time (decode + tail), us "
                        "(Triton: nv_inference_compute_infer_summary_us)", lambda s: s.compute)
        yield histogram("inference_request_histogram_us", "Per-request receipt-to-reply time, us "
                        "(Triton: nv_inference_request_summary_us)", lambda s: s.request)

        names = {h: (b.name, h[:12]) for h, b in srv.bundles.items()}
        f = CounterMetricFamily("edgesplit_inference_request_failure",
                                "Requests answered with an error, by wire error code (Triton: nv_inference_request_failure)",
                                labels=["model", "version", "reason"])
        for (bundle, reason), n in sorted(srv.failure_counts().items(), key=lambda kv: (kv[0][0] or "", kv[0][1])):
            model, version = names.get(bundle, (UNKNOWN_MODEL, ""))
            f.add_metric([model, version, reason], n)
        yield f

        yield GaugeMetricFamily("edgesplit_inference_pending_request_count", "Requests queued for compute "
                                "(Triton: nv_inference_pending_request_count)", value=len(srv.batcher))
        sessions = list(srv.sessions.values())
        yield GaugeMetricFamily("edgesplit_sessions", "Agent sessions open", value=len(sessions))
        yield GaugeMetricFamily("edgesplit_inflight_requests", "Requests accepted and not yet answered",
                                value=sum(s.inflight for s in sessions))

        counters = dict(srv.counters)  # one C-level copy: safe while the I/O thread adds keys
        f = CounterMetricFamily("edgesplit_auth_failure", "Connections refused during the security handshake "
                                "(CURVE key not allowed, plaintext client at a CURVE server, wrong server key, ...)",
                                labels=["reason"])
        for k in sorted(counters):
            if k.startswith(AUTH_FAILED_PREFIX):
                f.add_metric([k[len(AUTH_FAILED_PREFIX):]], counters[k])
        yield f
        f = CounterMetricFamily("edgesplit_replies_dropped", "Replies that could not be delivered "
                                "(unreachable: the agent is gone; full: its pipe was full)", labels=["reason"])
        for reason in ("unreachable", "full"):
            f.add_metric([reason], counters.get(f"dropped_{reason}", 0))
        yield f

        yield from _agent_families(sessions)


def _agent_families(sessions: list) -> Iterator:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    per_name: dict[str, list] = defaultdict(lambda: [0, 0, 0, None])  # requests, bytes, errors, rtt
    for s in sessions:
        a = per_name[s.agent]
        a[0] += s.requests
        a[1] += s.bytes_in
        a[2] += s.errors
        if s.rtt_us is not None:
            a[3] = s.rtt_us if a[3] is None else max(a[3], s.rtt_us)
    names = sorted(per_name)
    if len(names) > MAX_AGENT_SERIES:
        other = [0, 0, 0, None]
        for n in names[MAX_AGENT_SERIES - 1:]:
            a = per_name.pop(n)
            other[0] += a[0]
            other[1] += a[1]
            other[2] += a[2]
        per_name[OTHER_AGENTS] = other
    fams = [
        CounterMetricFamily("edgesplit_agent_requests", "Requests accepted from the agent", labels=["agent"]),
        CounterMetricFamily("edgesplit_agent_received_bytes", "Message bytes received from the agent (headers and "
                            "tensors, after its session started)", labels=["agent"]),
        CounterMetricFamily("edgesplit_agent_errors", "Error replies sent to the agent", labels=["agent"]),
    ]
    rtt = GaugeMetricFamily("edgesplit_agent_heartbeat_rtt_us", "Last server ping -> agent pong round trip, us",
                            labels=["agent"])
    for name in sorted(per_name):
        a = per_name[name]
        for f, v in zip(fams, a):
            f.add_metric([name], v)
        if a[3] is not None:
            rtt.add_metric([name], a[3])
    yield from fams
    yield rtt
