"""Prometheus metrics of the daemon, named after NVIDIA Triton's so that dashboards carry over.

Nothing here runs per message on the I/O thread. The daemon keeps plain counters where it already
works (:class:`ModelStats` per bundle mode, updated once per item and once per batch by the
compute thread; failure and session counts by the I/O thread), and :class:`ServerCollector`
reads them when Prometheus scrapes (``/metrics``, see :mod:`edgesplit.server.httpd`). Reads are
unlocked: every value is a Python int/float written by one thread, and a scrape may see a batch
half counted (the next scrape sees all of it), never a torn number.

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
because they aggregate across servers and cost one bucket increment per observation. As in
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

from bisect import bisect_left
from collections import defaultdict
from typing import TYPE_CHECKING, Iterable, Iterator

if TYPE_CHECKING:  # pragma: no cover
    from .daemon import Server

MAX_AGENT_SERIES = 200
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
    """Bucket counts of one histogram series, written by one thread (``observe``: a bisect and
    two additions, no lock) and read by the scraper."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Iterable[float]):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last bucket is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # bucket i holds bounds[i-1] < v <= bounds[i]
        self.total += value

    def snapshot(self) -> tuple[list[tuple[str, int]], float]:
        """Cumulative ``(le, count)`` buckets ending with ``+Inf`` (= the count), and the sum."""
        counts, total = list(self.counts), self.total  # list() copies in one step under the GIL
        out, acc = [], 0
        for bound, n in zip((*self.bounds, float("inf")), counts):
            acc += n
            out.append(("+Inf" if bound == float("inf") else _num(bound), acc))
        return out, total


def _num(v: float) -> str:
    return str(float(v))


class ModelStats:
    """Counters and histograms of one (bundle, mode), written by the compute thread only."""

    __slots__ = ("model", "version", "mode", "success", "inferences", "executions", "compute_infer_us",
                 "batch_size", "queue", "compute", "request")

    def __init__(self, model: str, version: str, mode: int, max_batch: int):
        self.model, self.version, self.mode = model, version, str(mode)
        self.success = 0            # requests answered with a result
        self.inferences = 0         # frames (rows) run through the tail
        self.executions = 0         # tail runs (batches)
        self.compute_infer_us = 0.0  # batch compute time, once per request in the batch (Triton's rule)
        self.batch_size = Histogram(batch_buckets(max_batch))
        self.queue = Histogram(DURATION_BUCKETS_US)    # per request: receipt -> compute start
        self.compute = Histogram(DURATION_BUCKETS_US)  # per batch: decode + tail
        self.request = Histogram(DURATION_BUCKETS_US)  # per request: receipt -> reply queued

    def batch_done(self, rows: int, results: int, compute_us: float) -> None:
        """One tail run of ``rows`` rows that produced ``results`` results (its requests' queue and
        request durations are observed one by one)."""
        self.executions += 1
        self.inferences += rows
        self.success += results
        self.compute_infer_us += compute_us * results
        self.batch_size.observe(rows)
        self.compute.observe(compute_us)


class ServerCollector:
    """A prometheus_client collector that reads a :class:`~edgesplit.server.daemon.Server`'s own
    counters at scrape time."""

    def __init__(self, server: "Server"):
        self.server = server

    def collect(self) -> Iterator:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        srv = self.server
        labels = ["model", "version", "mode"]
        stats = list(srv.model_stats.values())

        def counter(name: str, doc: str, value) -> CounterMetricFamily:
            f = CounterMetricFamily(f"edgesplit_{name}", doc, labels=labels)
            for s in stats:
                f.add_metric([s.model, s.version, s.mode], value(s))
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
            for s in stats:
                buckets, total = pick(s).snapshot()
                f.add_metric([s.model, s.version, s.mode], buckets, total)
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
