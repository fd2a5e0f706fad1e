"""``edgesplit collect``: a minimal collector for delivered agent results (``agent --deliver``).

It takes ``POST`` bodies of JSON lines (see :mod:`edgesplit.edge.delivery` for the record),
appends each record whose (``agent``, ``run``, ``seq``) it has not seen to ``--out`` (one JSON
object per line, in arrival order) and answers ``200 {"accepted": N, "duplicates": M}``; a body
that is not JSON lines of objects with those keys gets ``400``. Records already in ``--out`` are
read back at start, so a restarted collector still drops repeats. It is the reference receiver of
the delivery contract and the one the tests kill; a deployment may put its own service behind the
same URL.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

_MAX_BODY = 64 * 2**20


def _key(rec: Any) -> tuple[str, str, int] | None:
    if not isinstance(rec, dict):
        return None
    a, r, s = rec.get("agent"), rec.get("run"), rec.get("seq")
    if not (isinstance(a, str) and isinstance(r, str) and isinstance(s, int) and not isinstance(s, bool)):
        return None
    return a, r, s


class Collector:
    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.seen: set[tuple[str, str, int]] = set()
        if self.out.exists():
            for line in self.out.read_text().splitlines():
                try:
                    k = _key(json.loads(line))
                except ValueError:
                    continue  # a line cut off by a kill: its record comes again
                if k is not None:
                    self.seen.add(k)
        self._lock = threading.Lock()
        self._f = open(self.out, "a")

    def take(self, body: bytes) -> tuple[int, int]:
        recs = []
        for line in body.splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            k = _key(rec)
            if k is None:
                raise ValueError("each line must be a JSON object with string agent, string run and integer seq")
            recs.append((k, rec))
        accepted = dup = 0
        with self._lock:
            for k, rec in recs:
                if k in self.seen:
                    dup += 1
                    continue
                self.seen.add(k)
                self._f.write(json.dumps(rec, separators=(",", ":")) + "\n")
                accepted += 1
            self._f.flush()
        return accepted, dup


def _handler(collector: Collector) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            n = int(self.headers.get("Content-Length") or 0)
            if n > _MAX_BODY:
                return self._reply(413, {"error": f"body over {_MAX_BODY} bytes"})
            try:
                accepted, dup = collector.take(self.rfile.read(n))
            except (ValueError, UnicodeDecodeError) as e:
                return self._reply(400, {"error": str(e)})
            self._reply(200, {"accepted": accepted, "duplicates": dup})

        def _reply(self, status: int, obj: dict) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:  # quiet: one line per POST is noise
            pass

    return Handler


def collect_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edgesplit collect", description=__doc__.splitlines()[0])
    p.add_argument("--bind", default="127.0.0.1:8780", help="HOST:PORT to listen on (port 0: a free one)")
    p.add_argument("--out", required=True, help="JSON-lines file the records are appended to")
    a = p.parse_args(argv)
    host, _, port = a.bind.rpartition(":")
    httpd = ThreadingHTTPServer((host or "127.0.0.1", int(port)), _handler(Collector(a.out)))
    h, pt = httpd.server_address[:2]
    print(f"edgesplit collect: listening on http://{h}:{pt}/results", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(collect_main(sys.argv[1:]))
