"""The server daemon: one ROUTER socket, many agents, dynamic batching, one tail engine per bundle.

:class:`Server` composes the parts and runs them in two threads (a pyzmq socket never leaves the
thread that made it):

==========================  =====================================================================
part                        what it does
==========================  =====================================================================
``SessionTable``            sessions, credits, heartbeats, every refusal (:mod:`.sessions`)
``Batcher``                 the scheduler: admission, deadline triage, batches (:mod:`.batcher`)
``TailRunner``              one per bundle: requests -> batch buffer -> tail (:mod:`.tail_runner`);
                            an ED-ViT bundle's fusion head instead (:mod:`.fusion_runner`), a
                            U-shaped bundle's body (:mod:`.ushaped_runner`, PROTOCOL.md §15.6)
``IoLoop``                  I/O thread: the ROUTER, parse, answer, forward replies (:mod:`.io_loop`)
``ComputeWorker``           compute thread: due batches -> tail runs -> replies (:mod:`.compute`)
``ServerStats``             what both threads count, read by /metrics (:mod:`.stats`, :mod:`.metrics`)
``HttpEndpoints``           /metrics, /health/live, /health/ready when asked for (:mod:`.httpd`)
``BundleDistributor``      fleet groups' signed bundles offered and sent in chunks (:mod:`.ota`)
==========================  =====================================================================

Every failure is answered with an error message carrying a code; nothing a peer sends can stop
the daemon. SIGINT/SIGTERM (or :meth:`Server.stop`) drain: new requests get SHUTTING_DOWN,
queued ones are computed and answered, every session gets ``bye``, sockets close, exit 0.

In-process use (tests, benchmarks, ``edgesplit demo``)::

    with Server([bundle], "tcp://127.0.0.1:0") as srv:   # port 0: any free port
        agent = Agent(bundle, srv.endpoint).connect()

The command line is :mod:`.cli` (``edgesplit serve``, ``python -m edgesplit.server.daemon``).
"""

from __future__ import annotations

import logging
import os
import socket as _socket
import sys
import threading
import time
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from ..bundle import Bundle
from ..engine import EngineOptions  # numpy only: backends load lazily
from ..wire.curve import ServerCurve
from ..wire.mode_codec import tail_codecs
from ..wire.ota import FEATURE_BUNDLE_UPDATES
from ..wire.protocol import SERVER_FEATURES, Limits
from .batcher import Batcher
from .cli import build_parser, serve  # build_parser: re-exported (edgesplit.server.daemon.build_parser)
from .compute import ComputeWorker
from .fusion_runner import FusionRunner, check_for, runner_for
from .io_loop import IoLoop
from .ota import DEFAULT_CHUNK_BYTES, BundleDistributor
from .sessions import Session, SessionTable
from .stats import ServerStats
from .tail_backend import TailBackend, close_backend, health_of
from .tail_runner import TailRunner
from .ushaped_runner import U_SHAPED, UShapedCheck, UShapedRunner

if TYPE_CHECKING:  # both are imported when first used: an HTTP port or a scrape
    from prometheus_client import CollectorRegistry

    from .httpd import HttpEndpoints

__all__ = ["Server", "Session", "TailRunner", "build_parser", "serve_main"]

log = logging.getLogger("edgesplit.server")

# /health/live fails when the I/O loop (which turns at least every 0.5 s) has not for this long.
IO_STALL_S = 10.0


class Server:
    """The daemon, usable in-process: ``start()`` runs it in background threads, ``stop()`` drains."""

    def __init__(
        self,
        bundles: Iterable[Bundle | str | Path],
        bind: str = "tcp://127.0.0.1:5555",
        *,
        backend: str = "ort",
        threads: int | None = None,
        max_batch: int = 32,
        max_queue_delay_us: float = 2000.0,
        max_queue: int = 1024,
        credits: int = 64,
        preferred_batch_sizes: Sequence[int] = (),
        heartbeat_ms: int = 5000,
        limits: Limits | None = None,
        name: str | None = None,
        curve: ServerCurve | None = None,
        http_port: int | None = None,
        http_host: str = "127.0.0.1",
        engine_options: EngineOptions | None = None,
        ota_groups: Mapping[str, str | Path] | None = None,
        ota_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        ota_max_kbps: float | None = None,
        ota_cache_dir: str | Path | None = None,
        ota_fault: str = "",
        triton_url: str | None = None,
        triton_prefix: str | None = None,
        ray_app: str | None = None,
        ray_address: str | None = None,
        remote_inflight: int = 1,
    ):
        self.bundles: dict[str, Bundle] = {}
        for b in bundles:
            b = b if isinstance(b, Bundle) else Bundle.load(b)
            self.bundles[b.hash] = b
        if not self.bundles:
            raise ValueError("the server needs at least one bundle")
        # v1.3 bundle updates: each group's signed bundle is offered and served (PROTOCOL.md §14)
        self.ota: BundleDistributor | None = None
        if ota_groups:
            self.ota, extra = BundleDistributor.prepare(
                ota_groups,
                self.bundles,
                ota_cache_dir,
                chunk_bytes=ota_chunk_bytes,
                max_kbps=ota_max_kbps,
                fault=ota_fault,
            )
            self.bundles.update((b.hash, b) for b in extra)
        self.backend, self.threads = backend, threads
        u_shaped = [b.name for b in self.bundles.values() if b.serving == U_SHAPED]
        if u_shaped and (triton_url is not None or ray_app is not None):
            raise ValueError(f"U-shaped bundles ({', '.join(u_shaped)}) run their body in the daemon, not remotely")
        if (backend == "triton") != (triton_url is not None):
            raise ValueError("--backend triton and --triton-url go together")
        if (backend == "ray") != (ray_app is not None):
            raise ValueError("--backend ray and --ray-app go together")
        # the gateway's remote tails (server/tail_backend.py)
        self.triton_url, self.triton_prefix = triton_url, triton_prefix
        self.ray_app, self.ray_address = ray_app, ray_address
        # The tail engines are sized for the batches this server makes (TensorRT profile, CUDA graphs).
        self.engine_options = EngineOptions.make(engine_options, max_batch=int(max_batch))
        self.name = name or f"{_socket.gethostname()}:{os.getpid()}"
        self.batcher = Batcher(max_batch, max_queue_delay_us, max_queue, preferred=preferred_batch_sizes)
        self.runners: dict[str, TailBackend | FusionRunner] = {}  # loaded by start(); ED-ViT: the fusion head
        # The advertised per-request row limit is the server's batch size: a request never splits.
        limits = replace(limits or Limits(), max_batch=int(max_batch))
        if self.ota is not None and self.ota.chunk_bytes > limits.max_frame_bytes:
            raise ValueError(
                f"--ota-chunk-bytes {self.ota.chunk_bytes} is over --max-frame-bytes {limits.max_frame_bytes}"
            )
        # What both threads count (typed), read by /metrics and stats()
        self.figures = ServerStats.for_bundles(
            self.bundles, self.batcher.max_batch, sessions={}, queue_depth=self.batcher.__len__
        )
        self.table = SessionTable(
            {h: UShapedCheck(b) if b.serving == U_SHAPED else check_for(b) for h, b in self.bundles.items()},
            self.batcher,
            self.figures.io,
            server_name=self.name,
            credits=credits,
            heartbeat_ms=heartbeat_ms,
            limits=limits,
            codecs=tail_codecs(),  # with the entropy extra: 'ans' too (PROTOCOL.md §4.4)
            features=SERVER_FEATURES + ((FEATURE_BUNDLE_UPDATES,) if self.ota is not None else ()),
        )
        # the live sessions (read-only outside the I/O thread)
        self.sessions: dict[bytes, Session] = self.table.sessions
        self.figures.sessions = self.sessions
        replies: deque[list] = deque()  # compute thread appends, I/O thread pops
        self.compute: ComputeWorker
        if (ray_app is not None or triton_url is not None) and remote_inflight > 1:  # batches out at once
            from .pipelined import PipelinedCompute

            self.compute = PipelinedCompute(
                self.batcher, self.runners, self.figures, replies, wake=None, inflight=remote_inflight
            )
        else:
            self.compute = ComputeWorker(self.batcher, self.runners, self.figures, replies, wake=None)
        self._stop = threading.Event()
        self.io = IoLoop(
            bind, self.table, self.batcher, self.compute, self.figures, replies, self._stop, curve=curve, ota=self.ota
        )
        self._io_thread: threading.Thread | None = None
        self.http_port, self.http_host = http_port, http_host  # None: no HTTP endpoints
        self.http: HttpEndpoints | None = None  # once started
        self._registry: CollectorRegistry | None = None  # made at the first scrape

    @property
    def endpoint(self) -> str | None:
        """The bound endpoint, port resolved (None before start)."""
        return self.io.endpoint

    @property
    def failed(self) -> bool:
        """A server thread died of a bug (serve_main then exits 1)."""
        return self.io.failed

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> "Server":
        """Load the tail engines, bind, and start the I/O and compute threads. Returns self once
        the socket is bound (``self.endpoint`` is the actual endpoint, port resolved). With
        ``http_port`` set, the HTTP endpoints come up first, so that /health/ready answers 503
        while the tails load."""
        if self.http_port is not None and self.http is None:
            from .httpd import HttpEndpoints

            self.http = HttpEndpoints(
                self.http_host, self.http_port, metrics=self.metrics_text, live=self.live, ready=self.ready
            ).start()
            log.info("metrics and health on %s", self.http.url, extra={"event": "http", "url": self.http.url})
        try:
            for h, b in self.bundles.items():
                if h not in self.runners:
                    r = self._runner(b)
                    r.warmup()
                    self.runners[h] = r
            self._io_thread = threading.Thread(target=self.io.run, name="edgesplit-io", daemon=True)
            self._io_thread.start()
            if not self.io.ready.wait(timeout):
                raise RuntimeError("server I/O thread did not start")
            if self.io.startup_error is not None:
                raise self.io.startup_error
        except BaseException:
            self._stop_http()
            raise
        log.info("serving %s on %s", ", ".join(f"{b.name}@{h[:12]}" for h, b in self.bundles.items()), self.endpoint)
        return self

    def _runner(self, b: Bundle) -> TailBackend | FusionRunner:
        """The tail backend for a bundle (server/tail_backend.py): in-process, on Triton or on Ray; a
        U-shaped bundle's body, in-process."""
        if b.serving == U_SHAPED:
            return UShapedRunner(b, self.backend, self.threads, self.engine_options)
        if self.triton_url is not None:
            from .triton_tail import TritonTail

            return TritonTail(b, self.triton_url, self.engine_options, prefix=self.triton_prefix)
        if self.ray_app is not None:
            from .ray_tail import RayTail

            return RayTail(b, self.ray_app, address=self.ray_address, max_batch=self.engine_options.max_batch)
        return runner_for(b, self.backend, self.threads, self.engine_options)

    def request_stop(self) -> None:
        """Ask for a drain and exit; safe from a signal handler; returns at once."""
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the server threads to finish; True when they have."""
        if self._io_thread is None:
            return True
        self._io_thread.join(timeout)
        return not self._io_thread.is_alive()

    def stop(self, timeout: float = 30.0) -> None:
        """Drain (finish queued requests, answer them, say bye) and close the sockets."""
        self.request_stop()
        if not self.wait(timeout):
            log.error("server did not stop within %.0f s", timeout)
        for r in self.runners.values():
            close_backend(r)
        self._stop_http()

    def _stop_http(self) -> None:
        if self.http is not None:
            self.http.stop()
            self.http = None

    # -- health and metrics (called from the HTTP thread) -------------------------------------
    def live(self) -> tuple[bool, str]:
        """Liveness: no daemon thread has died, and the I/O loop keeps turning."""
        if self.failed:
            return False, "a daemon thread died (see the log)"
        io = self._io_thread
        stalled = time.monotonic() - self.io.turned
        if io is not None and io.is_alive() and stalled > IO_STALL_S:
            return False, f"the I/O loop has not turned for {stalled:.0f} s"
        return True, ""

    def ready(self) -> tuple[bool, str]:
        """Readiness: tails loaded, socket bound, not draining, and live."""
        if self.io.startup_error is not None:
            return False, f"startup failed: {self.io.startup_error}"
        if not self.io.ready.is_set():
            return False, "starting: loading tails and binding the socket"
        if self._stop.is_set():
            return False, "draining: finishing queued requests before exit"
        ok, why = self.live()
        if not ok:
            return False, why
        for r in list(self.runners.values()):  # a remote tail (Triton) that is down: not ready
            ok, why = health_of(r)
            if not ok:
                return False, why
        return True, ""

    def metrics_text(self) -> bytes:
        """The Prometheus text exposition of this server (what GET /metrics returns)."""
        if self._registry is None:
            from prometheus_client import CollectorRegistry, ProcessCollector

            from .metrics import ServerCollector

            reg = CollectorRegistry(auto_describe=False)
            reg.register(ServerCollector(self.figures))
            ProcessCollector(registry=reg)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
            self._registry = reg
        from prometheus_client import generate_latest

        return generate_latest(self._registry)

    def __enter__(self) -> "Server":
        return self.start() if self._io_thread is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stats(self) -> dict[str, Any]:
        """A flat summary: sessions and queue now, every counter above zero (ServerStats.as_dict)."""
        out: dict[str, Any] = dict(self.figures.as_dict())
        if self.ota is not None:
            out["ota"] = self.ota.figures.as_dict()
        return out


# ---------------------------------------------------------------------------------------------
# CLI entry: `edgesplit serve ...` and `python -m edgesplit.server.daemon ...` (edgesplit/server/cli.py)


def serve_main(args_list: list[str] | None = None) -> int:
    """Run the daemon until SIGINT/SIGTERM. Returns the process exit code."""
    return serve(args_list, Server)


if __name__ == "__main__":
    sys.exit(serve_main(sys.argv[1:]))
