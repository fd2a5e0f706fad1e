"""Delivered results (``edgesplit agent --deliver URL``): every frame's result, as a JSON record,
is POSTed to a collector over HTTP, in order, and kept on disk (:class:`~.spool.Spool`) while the
collector cannot take it.

"Delivered" means: the collector answered a POST holding the record with a 2xx status. A record
is ``{"agent", "run", "seq", "t", ...the frame's --json-lines fields}``: ``run`` names one run of
the agent (a new one each start), ``seq`` counts the run's records from 1, ``t`` is the Unix time
the result was made. Delivery is at least once: a POST whose answer is lost is sent again, so a
collector drops a record whose (``agent``, ``run``, ``seq``) it has seen (``edgesplit collect``
does); a gap in ``seq`` is a record the full spool dropped. The body is JSON lines
(``application/x-ndjson``), up to ``deliver_batch`` records. A 4xx other than 408 and 429 is a
refusal of those records, not an outage: they are dropped and counted, as retrying cannot help.

Records wait in memory while the collector keeps up; they go to the spool when a POST fails (the
ones in memory with them, so that the spool always holds the older records and order is kept),
or when memory holds more than ``memory_records``. The spool is replayed before anything newer.
At exit, :meth:`Deliverer.close` tries for ``flush_s`` more and leaves the rest in the spool,
which the next run of the agent delivers first.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import deque
from pathlib import Path
from typing import Any

from .spool import Spool

log = logging.getLogger("edgesplit.agent")

_BACKOFF_MIN_S, _BACKOFF_MAX_S = 0.1, 5.0


class Deliverer:
    """A background thread that POSTs records to ``url`` and spools them while it cannot."""

    def __init__(
        self,
        url: str,
        spool_dir: str | Path,
        *,
        agent: str,
        max_bytes: int = 64 * 2**20,
        max_records: int = 1_000_000,
        batch: int = 100,
        timeout_s: float = 5.0,
        memory_records: int = 1000,
    ):
        self.url = url
        self.agent = agent
        self.run_id = uuid.uuid4().hex
        self.batch = int(batch)
        self.timeout_s = float(timeout_s)
        self.memory_records = int(memory_records)
        self.spool = Spool(spool_dir, max_bytes, max_records)
        self._mem: deque[dict[str, Any]] = deque()
        self._lock = threading.Condition()
        self._closing = False
        self._seq = 0
        self._gen = 0  # bumped when memory is moved to the spool
        self.delivered = 0
        self.rejected = 0
        self.failures = 0
        self.spooled = 0  # records that went through the spool
        self.replayed_from_start = self.spool.records  # left by an earlier run
        self._thread = threading.Thread(target=self._loop, name="edgesplit-deliver", daemon=True)
        self._thread.start()

    def put(self, result: dict[str, Any]) -> None:
        """Queue one result (a frame's JSON fields) for delivery. Never blocks on the network."""
        with self._lock:
            self._seq += 1
            self._mem.append({"agent": self.agent, "run": self.run_id, "seq": self._seq, "t": time.time(), **result})
            if len(self._mem) > self.memory_records:
                self._to_spool()
            self._lock.notify()

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._mem) + self.spool.records

    def _to_spool(self) -> None:
        """Memory -> the end of the spool (the lock is held)."""
        if self._mem:
            self.spooled += len(self._mem)
            self.spool.append(list(self._mem))
            self._mem.clear()
            self._gen += 1

    def _loop(self) -> None:
        backoff = _BACKOFF_MIN_S
        while True:
            with self._lock:
                while not self._mem and not self.spool.records and not self._closing:
                    self._lock.wait(0.5)
                if self._closing and not self._mem and not self.spool.records:
                    return
                from_spool = self.spool.records > 0
                batch = self.spool.peek(self.batch) if from_spool else list(self._mem)[: self.batch]
                gen = self._gen
            status = self._post(batch)
            with self._lock:
                if status == "ok" or status == "refused":
                    if status == "ok":
                        self.delivered += len(batch)
                    else:
                        self.rejected += len(batch)
                    if from_spool:
                        self.spool.commit(len(batch))
                    elif gen == self._gen:
                        for _ in batch:
                            self._mem.popleft()
                    # else: memory went to the spool while this batch was out: it is sent again
                    # from there (at least once; the collector drops the repeat by seq)
                    backoff = _BACKOFF_MIN_S
                    continue
                self.failures += 1
                self._to_spool()  # keep order: the spool holds everything older than memory
                if self._closing:
                    return
                self._lock.wait(backoff)
            backoff = min(_BACKOFF_MAX_S, backoff * 2)

    def _post(self, records: list[dict[str, Any]]) -> str:
        body = b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in records)
        req = urllib.request.Request(
            self.url, data=body, method="POST", headers={"Content-Type": "application/x-ndjson"}
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                resp.read()
            return "ok"
        except urllib.error.HTTPError as e:
            if 400 <= e.code < 500 and e.code not in (408, 429):
                log.warning(
                    "collector %s refused %d records: HTTP %d",
                    self.url,
                    len(records),
                    e.code,
                    extra={"event": "deliver_refused", "records": len(records), "status": e.code},
                )
                return "refused"
            return "failed"
        except (urllib.error.URLError, OSError, ValueError):
            return "failed"

    def close(self, flush_s: float = 5.0) -> None:
        """Stop taking records; deliver for up to ``flush_s`` more; what is left stays in the spool."""
        end = time.monotonic() + flush_s
        with self._lock:
            self._lock.notify()
        while self.pending and time.monotonic() < end and self._thread.is_alive():
            time.sleep(0.02)
        with self._lock:
            self._closing = True
            self._lock.notify()
        self._thread.join(self.timeout_s + 1.0)
        with self._lock:
            self._to_spool()

    def summary(self) -> dict[str, Any]:
        with self._lock:
            return {
                "url": self.url,
                "run": self.run_id,
                "records": self._seq,
                "delivered": self.delivered,
                "rejected": self.rejected,
                "post_failures": self.failures,
                "spooled": self.spooled,
                "left_in_spool": self.spool.records + len(self._mem),
                "dropped_total": self.spool.dropped,
                "from_earlier_runs": self.replayed_from_start,
            }
