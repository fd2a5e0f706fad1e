"""The daemon's HTTP side door: ``/metrics`` (Prometheus), ``/health/live`` and ``/health/ready``.

A stdlib ``ThreadingHTTPServer`` in a daemon thread, apart from the ZeroMQ I/O and compute
threads, so a scrape or a probe never touches the hot path (the metrics are read from the
daemon's own counters, see :mod:`edgesplit.server.metrics`). prometheus_client's
``start_http_server`` would serve ``/metrics`` alone; the probes need their own answers (503
with a reason), so one small handler serves all three.

- ``GET /health/live``: 200 while the process and its threads are working (during a drain too),
  503 when a daemon thread died of a bug (an orchestrator should restart the process).
- ``GET /health/ready``: 200 when the tails are loaded, the socket is bound and the daemon is
  not draining; 503 otherwise (an orchestrator should send no new agents).
- ``GET /metrics``: the Prometheus text format.

Each health answer is a small JSON object ``{"status": "ok" | "unavailable", "reason": ...}``.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

log = logging.getLogger("edgesplit.server.http")

# A probe: (ok, reason when not ok).
Probe = Callable[[], "tuple[bool, str]"]


class HttpEndpoints:
    """Serve /metrics, /health/live and /health/ready on ``host:port`` (port 0: any free port)."""

    def __init__(self, host: str, port: int, *, metrics: Callable[[], bytes], live: Probe, ready: Probe):
        try:
            from prometheus_client import CONTENT_TYPE_LATEST
        except ImportError:
            raise RuntimeError("the HTTP endpoints need prometheus-client: pip install 'edgesplit[server]'") from None

        routes = {
            "/metrics": lambda: (200, CONTENT_TYPE_LATEST, metrics()),
            "/health/live": lambda: _probe(live),
            "/health/ready": lambda: _probe(ready),
        }

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (the stdlib's name)
                route = routes.get(self.path.split("?", 1)[0])
                if route is None:
                    status, ctype, body = (
                        404,
                        "application/json",
                        json.dumps({"error": "not found", "paths": sorted(routes)}).encode(),
                    )
                else:
                    try:
                        status, ctype, body = route()
                    except Exception as e:  # a bug in a collector must not kill the endpoint
                        log.exception("HTTP %s failed", self.path)
                        status, ctype, body = (
                            500,
                            "application/json",
                            json.dumps({"error": f"{type(e).__name__}: {e}"}).encode(),
                        )
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format, *args):  # the stdlib writes every request to stderr
                log.debug("http %s", format % args)

        try:
            self._httpd = ThreadingHTTPServer((host, port), Handler)
        except OSError as e:
            raise OSError(f"cannot serve HTTP on {host}:{port}: {e}") from None
        self._httpd.daemon_threads = True
        self.host = host
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="edgesplit-http", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "HttpEndpoints":
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._httpd.shutdown()
        self._httpd.server_close()


def _probe(probe: Probe) -> tuple[int, str, bytes]:
    ok, reason = probe()
    body = {"status": "ok"} if ok else {"status": "unavailable", "reason": reason}
    return (200 if ok else 503), "application/json", json.dumps(body).encode()
