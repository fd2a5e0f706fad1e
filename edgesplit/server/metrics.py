"""Prometheus metrics of the daemon, named after NVIDIA Triton's so that dashboards carry over.

The request path pays for metrics only with a few list appends and integer increments: the
daemon's threads record into the typed :class:`~edgesplit.server.stats.ServerStats` it owns, and
:class:`ServerCollector` reads that object, and nothing else of the daemon, when Prometheus scrapes
(``/metrics``, see :mod:`edgesplit.server.httpd`). A scrape may see a batch half recorded (the next
scrape sees all of it), never a torn number.

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

from collections import defaultdict
from typing import Iterator

from .stats import ServerStats, SessionFigures

MAX_AGENT_SERIES = 200
OTHER_AGENTS = "_other"
UNKNOWN_MODEL = "unknown"  # a request refused before it had a session, hence a bundle


class ServerCollector:
    """A prometheus_client collector that reads a daemon's :class:`ServerStats` at scrape time."""

    def __init__(self, stats: ServerStats):
        self.stats = stats

    def collect(self) -> Iterator:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        srv = self.stats
        labels = ["model", "version", "mode"]
        stats = [([s.model, s.version, s.mode], s.totals()) for s in srv.models.values()]

        def counter(name: str, doc: str, value) -> CounterMetricFamily:
            f = CounterMetricFamily(f"edgesplit_{name}", doc, labels=labels)
            for lab, t in stats:
                f.add_metric(lab, value(t))
            return f

        yield counter(
            "inference_request_success",
            "Requests answered with a result (Triton: nv_inference_request_success)",
            lambda s: s.success,
        )
        yield counter(
            "inference_count",
            "Frames run through the tail; a batch of n counts n (Triton: nv_inference_count)",
            lambda s: s.inferences,
        )
        yield counter(
            "inference_exec_count", "Tail runs, i.e. batches (Triton: nv_inference_exec_count)", lambda s: s.executions
        )
        yield counter(
            "inference_request_duration_us",
            "Cumulative receipt-to-reply time of answered requests, us (Triton: nv_inference_request_duration_us)",
            lambda s: s.request.total,
        )
        yield counter(
            "inference_queue_duration_us",
            "Cumulative time requests waited for compute, us (Triton: nv_inference_queue_duration_us)",
            lambda s: s.queue.total,
        )
        yield counter(
            "inference_compute_infer_duration_us",
            "Cumulative compute time (decode + tail) per request, us (Triton: nv_inference_compute_infer_duration_us)",
            lambda s: s.compute_infer_us,
        )

        def histogram(name: str, doc: str, pick) -> HistogramMetricFamily:
            f = HistogramMetricFamily(f"edgesplit_{name}", doc, labels=labels)
            for lab, t in stats:
                h = pick(t)
                f.add_metric(lab, h.buckets(), h.total)
            return f

        yield histogram("inference_batch_size", "Rows per tail run", lambda s: s.batch_size)
        yield histogram(
            "inference_queue_histogram_us",
            "Per-request queue time, us (Triton: nv_inference_queue_summary_us)",
            lambda s: s.queue,
        )
        yield histogram(
            "inference_compute_infer_histogram_us",
            "Per-batch compute time (decode + tail), us (Triton: nv_inference_compute_infer_summary_us)",
            lambda s: s.compute,
        )
        yield histogram(
            "inference_request_histogram_us",
            "Per-request receipt-to-reply time, us (Triton: nv_inference_request_summary_us)",
            lambda s: s.request,
        )

        names = srv.bundle_labels
        f = CounterMetricFamily(
            "edgesplit_inference_request_failure",
            "Requests answered with an error, by wire error code (Triton: nv_inference_request_failure)",
            labels=["model", "version", "reason"],
        )
        failures = sorted(srv.failure_counts().items(), key=lambda kv: (kv[0][0] or "", kv[0][1].name))
        for (bundle, code), n in failures:
            # bundle is None for a failure before any bundle was named (e.g. a malformed hello)
            model, version = (UNKNOWN_MODEL, "") if bundle is None else names.get(bundle, (UNKNOWN_MODEL, ""))
            f.add_metric([model, version, code.name], n)
        yield f

        yield GaugeMetricFamily(
            "edgesplit_inference_pending_request_count",
            "Requests queued for compute (Triton: nv_inference_pending_request_count)",
            value=srv.queue_depth(),
        )
        sessions = list(srv.sessions.values())
        yield GaugeMetricFamily("edgesplit_sessions", "Agent sessions open", value=len(sessions))
        yield GaugeMetricFamily(
            "edgesplit_inflight_requests",
            "Requests accepted and not yet answered",
            value=sum(s.inflight for s in sessions),
        )

        f = CounterMetricFamily(
            "edgesplit_auth_failure",
            "Connections refused during the security handshake "
            "(CURVE key not allowed, plaintext client at a CURVE server, wrong server key, ...)",
            labels=["reason"],
        )
        for reason, n in sorted(dict(srv.io.auth_failed).items()):  # dict(): one step while the I/O thread adds keys
            f.add_metric([reason], n)
        yield f
        f = CounterMetricFamily(
            "edgesplit_replies_dropped",
            "Replies that could not be delivered (unreachable: the agent is gone; full: its pipe was full)",
            labels=["reason"],
        )
        f.add_metric(["unreachable"], srv.io.dropped_unreachable)
        f.add_metric(["full"], srv.io.dropped_full)
        yield f

        yield from _agent_families(sessions)


def _agent_families(sessions: list[SessionFigures]) -> Iterator:
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
        for n in names[MAX_AGENT_SERIES - 1 :]:
            a = per_name.pop(n)
            other[0] += a[0]
            other[1] += a[1]
            other[2] += a[2]
        per_name[OTHER_AGENTS] = other
    fams = [
        CounterMetricFamily("edgesplit_agent_requests", "Requests accepted from the agent", labels=["agent"]),
        CounterMetricFamily(
            "edgesplit_agent_received_bytes",
            "Message bytes received from the agent (headers and tensors, after its session started)",
            labels=["agent"],
        ),
        CounterMetricFamily("edgesplit_agent_errors", "Error replies sent to the agent", labels=["agent"]),
    ]
    rtt = GaugeMetricFamily(
        "edgesplit_agent_heartbeat_rtt_us", "Last server ping -> agent pong round trip, us", labels=["agent"]
    )
    for name in sorted(per_name):
        a = per_name[name]
        for f, v in zip(fams, a):
            f.add_metric([name], v)
        if a[3] is not None:
            rtt.add_metric([name], a[3])
    yield from fams
    yield rtt
