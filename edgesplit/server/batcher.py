"""The server's scheduler: admission, deadline triage and dynamic batching, in one place because
all three read the same batch-time estimates (as Triton's dynamic batching scheduler does).

- :meth:`Batcher.admit` (I/O thread) queues a request or refuses it at once: SHUTTING_DOWN once
  closed, OVERLOADED when ``max_queue`` requests wait, DEADLINE_EXCEEDED when the queue ahead plus
  its own batch are expected to take longer than its deadline allows.
- :meth:`Batcher.triage` (compute thread) takes the requests out of a due batch whose deadline
  falls before the batch is expected to finish: they are answered, not computed.
- :meth:`Batcher.next_batch` (compute thread) forms the batches.

Requests are grouped by key ``(bundle hash, mode id)``: a batch only ever holds requests that run
the same tail on tensors of the same shape. A key's batch is *due* when

- its queued rows reach ``max_batch``, or
- its queued rows can form one of the ``preferred`` batch sizes (Triton's ``preferred_batch_size``:
  a batch of a preferred size runs at once, the largest one that can be formed), or
- ``max_delay_us`` has passed since its oldest request arrived, or
- waiting any longer would miss the earliest deadline in it (deadline minus the key's expected
  compute time for that many rows, minus a 2 ms margin), or
- the batcher is closing (drain: everything is due at once).

The I/O thread calls :meth:`Batcher.admit` (or :meth:`Batcher.put`; never blocks); the compute
thread calls :meth:`Batcher.next_batch` (blocks until a batch is due). With ``max_delay_us == 0`` a
request that arrives at an idle batcher is handed over as a batch of one without touching the
per-key queues; requests that arrive while the tail is busy still batch up.

Every time here is ``time.perf_counter_ns()``; the methods that read the clock take ``now_ns`` so
that a test can drive them with its own.

Batch composition follows Triton's dynamic batcher: requests join in arrival order; when a
preferred size can be formed the batch is the largest preferred size that fits (so a tail tuned or
CUDA-graph-captured for those sizes gets them), otherwise everything queued up to ``max_batch``.
A request is never split across batches, so with multi-row requests a batch may stop short of the
preferred size it aimed at.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Hashable, NamedTuple, Sequence

from ..wire.errors import ErrorCode

INF = float("inf")
# A batch holding a deadline is flushed this long before (deadline - expected compute time), to
# absorb thread wake-up jitter.
DEADLINE_MARGIN_NS = 2_000_000
# A batch-time estimate not refreshed for this long is not used. Estimates learn only from
# batches that run, so one inflated by a slow spell (a CPU shared with other work) would
# otherwise keep refusing, for good, the very batches that would correct it.
ESTIMATE_TTL_NS = 1_000_000_000
_CLOSE = object()  # close marker in the inbox


def _bucket(rows: int) -> int:
    """The power of two >= rows: batch sizes whose compute times are averaged together."""
    return 1 << max(0, int(rows) - 1).bit_length()


@dataclass(eq=False, slots=True)
class Item:
    """One queued request."""

    key: tuple[str, int]  # (bundle hash, mode id)
    identity: bytes  # ROUTER identity of the agent
    req_id: int
    desc: dict[str, Any]  # validated tensor descriptor
    payload: Any  # the tensor frame (bytes / buffer)
    rows: int  # leading-axis rows (1 for a [C,h,w] tensor)
    single: bool  # the request tensor had no batch axis: reply logits [K], not [n,K]
    t_recv_ns: int  # time.perf_counter_ns() when the I/O thread received it
    deadline_ns: int | None = None
    t_send_ns: int | None = None
    deadline_ms: float | None = None  # as the request gave it (quoted in a refusal)
    answered: bool = False  # set by the compute thread once a reply is queued


class Refusal(NamedTuple):
    """Why a request is answered with an error instead of being computed."""

    code: ErrorCode
    message: str


class _KeyQueue:
    __slots__ = ("items", "rows", "min_deadline")

    def __init__(self) -> None:
        self.items: deque[Item] = deque()
        self.rows = 0
        self.min_deadline: float = INF


class Batcher:
    """Dynamic batcher: any number of producers call :meth:`put`, **one** consumer thread calls
    :meth:`next_batch`.

    Hand-off: ``put`` drops the item into a ``queue.SimpleQueue`` (C code: no Python-level lock or
    condition variable, and the consumer blocks in C with the GIL released). Only the consumer
    touches the per-key queues, so grouping and due-time bookkeeping need no lock. The queue size
    is ``puts - takes``, each counter written by one side only.
    """

    def __init__(
        self,
        max_batch: int = 32,
        max_delay_us: float = 2000.0,
        max_queue: int = 1024,
        preferred: Sequence[int] = (),
    ):
        if max_batch < 1 or max_queue < 1 or max_delay_us < 0:
            raise ValueError("max_batch and max_queue must be >= 1, max_delay_us >= 0")
        bad = [p for p in preferred if not 1 <= int(p) <= max_batch]
        if bad:
            raise ValueError(f"preferred batch sizes must lie in 1..max_batch ({max_batch}), got {bad}")
        self.max_batch = int(max_batch)
        self.preferred = tuple(sorted({int(p) for p in preferred}))
        # rows at which a key becomes due at once: the smallest preferred size, else max_batch
        self._due_rows = self.preferred[0] if self.preferred else self.max_batch
        self.max_delay_ns = int(max_delay_us * 1000)
        self.max_queue = int(max_queue)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # producers -> consumer: items, _CLOSE
        self._put_lock = threading.Lock()  # orders put() against close(), never held while blocking
        self._queues: OrderedDict[Hashable, _KeyQueue] = OrderedDict()  # consumer-owned
        self._held = 0  # items moved from the inbox into _queues, not yet taken (consumer-owned)
        self._n_put = 0  # written under _put_lock
        self._n_taken = 0  # written by the consumer only
        self._closed = False  # set by close()
        self._draining = False  # the consumer has seen the close marker: everything is due
        # (key, rows bucket) -> [mean ns, mean deviation ns, perf_counter_ns of the last update]
        self._compute_ns: dict[tuple[Hashable, int], list] = {}
        self._top_bucket = _bucket(self.max_batch)
        self.estimate_ttl_ns = ESTIMATE_TTL_NS

    # -- producer side (I/O thread) ------------------------------------------------------------
    def admit(self, item: Item, now_ns: int) -> Refusal | None:
        """Queue a request, or say why not (None: queued). Never blocks.

        A request with a deadline is refused now rather than answered late when the queue ahead
        plus its own batch are expected to take longer than the deadline allows. This keeps the
        queue as short as the deadlines need under overload (a full queue is seconds of work;
        without this check it filled with requests that could only expire)."""
        if item.deadline_ns is not None:
            wait = self.expected_wait_ns(item.key, item.rows, now_ns)
            if now_ns + wait >= item.deadline_ns:
                return Refusal(
                    ErrorCode.DEADLINE_EXCEEDED,
                    f"deadline {item.deadline_ms} ms cannot be met: the {len(self)} requests queued and "
                    f"its own batch need about {wait / 1e6:.1f} ms; not queued",
                )
        if not self.put(item):
            if self._closed:
                return Refusal(ErrorCode.SHUTTING_DOWN, "server is shutting down")
            return Refusal(ErrorCode.OVERLOADED, f"server queue full ({self.max_queue} requests waiting)")
        return None

    def put(self, item: Item) -> bool:
        """Queue a request; False when the queue is full or the batcher is closed. Never blocks."""
        with self._put_lock:
            if self._closed or self._n_put - self._n_taken >= self.max_queue:
                return False
            self._n_put += 1
            self._inbox.put(item)
        return True

    def close(self) -> None:
        """Stop accepting; everything already queued becomes due at once."""
        with self._put_lock:
            if not self._closed:
                self._closed = True
                self._inbox.put(_CLOSE)  # after every accepted item: the consumer sees them all first

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        return self._n_put - self._n_taken

    # -- consumer side (compute thread) --------------------------------------------------------
    def note_compute(self, key: Hashable, seconds: float, rows: int = 1, now_ns: int | None = None) -> None:
        """Record a batch's compute time (feeds the deadline-aware flush, admission and triage).

        Kept per power-of-two bucket of rows: on a CPU a 32-row batch takes many times a 1-row
        one, and one mean over both misjudged either (under overload, small leftover batches pulled
        the mean down and admitted requests finished after their deadlines). Each bucket keeps
        a smoothed mean and mean deviation, as TCP does for its retransmission timeout
        (RFC 6298: gains 1/8 and 1/4); the estimate is mean + 4 deviations, so a tail whose
        time varies (a CPU shared with other work) is planned for its slow batches."""
        k = (key, _bucket(rows))
        ns = seconds * 1e9
        now_ns = time.perf_counter_ns() if now_ns is None else now_ns
        est = self._compute_ns.get(k)
        if est is None:
            self._compute_ns[k] = [ns, ns / 2, now_ns]
        else:
            est[1] += (abs(ns - est[0]) - est[1]) / 4
            est[0] += (ns - est[0]) / 8
            est[2] = now_ns

    def expected_compute_ns(self, key: Hashable, rows: int, now_ns: int | None = None) -> float:
        """Expected compute time (mean + 4 deviations) of a ``rows``-row batch of ``key``: from
        its bucket, else the nearest larger bucket (more rows never run faster), else the
        nearest smaller one scaled up linearly, counting only estimates refreshed within
        ``estimate_ttl_ns``; 0 when there is none (the batch runs, and teaches one)."""
        b = _bucket(rows)
        fresh_since = (time.perf_counter_ns() if now_ns is None else now_ns) - self.estimate_ttl_ns
        x = b
        while x <= self._top_bucket:
            est = self._compute_ns.get((key, x))
            if est is not None and est[2] >= fresh_since:
                return est[0] + 4 * est[1]
            x *= 2
        x = b // 2
        while x >= 1:
            est = self._compute_ns.get((key, x))
            if est is not None and est[2] >= fresh_since:
                return (est[0] + 4 * est[1]) * b / x
            x //= 2
        return 0.0

    def expected_wait_ns(self, key: Hashable, rows: int, now_ns: int | None = None) -> float:
        """From now until a ``rows``-row request of ``key`` queued now would be computed: the
        full batches queued ahead of it, then its own batch (the requests ahead, of any key,
        timed as this key's; one compute thread runs them all). Safe to call from the I/O thread
        (it reads the estimates the compute thread writes; a stale read only shifts a guess)."""
        ahead = len(self)
        full, part = divmod(ahead, self.max_batch)
        return full * self.expected_compute_ns(key, self.max_batch, now_ns) + self.expected_compute_ns(
            key, min(part + rows, self.max_batch), now_ns
        )

    def triage(self, batch: list[Item], now_ns: int) -> tuple[list[Item], list[tuple[Item, Refusal]]]:
        """Split a due batch into (the requests to compute, the ones to answer DEADLINE_EXCEEDED):
        a request whose deadline falls before this batch can finish (now + the expected time of a
        batch this size) is not computed. Under overload the queue's head holds the oldest
        requests: computing them answers them late and lets the fresher ones behind them age
        (``edgesplit bench overload`` showed most results late when only deadlines already
        passed were refused)."""
        expected = self.expected_compute_ns(batch[0].key, sum(it.rows for it in batch), now_ns)
        finish = now_ns + expected
        for it in batch:
            if it.deadline_ns is not None and finish >= it.deadline_ns:
                break
        else:
            return batch, []  # the common case: every deadline can be met
        live, late = [], []
        for it in batch:
            if it.deadline_ns is not None and finish >= it.deadline_ns:
                queued = (now_ns - it.t_recv_ns) / 1e6
                if now_ns >= it.deadline_ns:
                    why = f"deadline passed {(now_ns - it.deadline_ns) / 1e6:.3f} ms before compute could start"
                else:
                    why = (
                        f"deadline is {(it.deadline_ns - now_ns) / 1e6:.3f} ms away, less than the tail's recent "
                        f"batch time {expected / 1e6:.3f} ms"
                    )
                late.append((it, Refusal(ErrorCode.DEADLINE_EXCEEDED, f"{why} (queued {queued:.3f} ms); not computed")))
            else:
                live.append(it)
        return live, late

    def _due_ns(self, key: Hashable, q: _KeyQueue) -> float:
        due: float = q.items[0].t_recv_ns + self.max_delay_ns
        if q.min_deadline < INF:
            due = min(
                due, q.min_deadline - self.expected_compute_ns(key, min(q.rows, self.max_batch)) - DEADLINE_MARGIN_NS
            )
        return due

    def _hold(self, item) -> None:
        """Move one inbox entry into its key's queue (or note the close marker)."""
        if item is _CLOSE:
            self._draining = True
            return
        q = self._queues.get(item.key)
        if q is None:
            q = self._queues[item.key] = _KeyQueue()
        q.items.append(item)
        q.rows += item.rows
        if item.deadline_ns is not None and item.deadline_ns < q.min_deadline:
            q.min_deadline = item.deadline_ns
        self._held += 1

    def _drain_inbox(self) -> None:
        inbox = self._inbox
        while not inbox.empty():
            self._hold(inbox.get_nowait())

    def next_batch(self, timeout: float | None = None) -> list[Item] | None:
        """Block until a batch is due and return it (at most ``max_batch`` rows, at least one
        request). Returns None when closed and empty, or when ``timeout`` seconds pass first.
        Call from one consumer thread only."""
        end = None if timeout is None else time.perf_counter_ns() + timeout * 1e9
        inbox = self._inbox
        while True:
            self._drain_inbox()
            if self._held == 0 and not self._draining:
                # Idle: block in C until an item (or the close marker) arrives.
                if end is None:
                    item = inbox.get()
                else:
                    left = (end - time.perf_counter_ns()) / 1e9
                    if left <= 0:
                        return None
                    try:
                        item = inbox.get(timeout=left)
                    except queue.Empty:
                        return None
                if item is not _CLOSE and inbox.empty() and (self.max_delay_ns == 0 or item.rows >= self.max_batch):
                    # Fast path: the only request, due at once (no delay, or a full batch by itself).
                    self._n_taken += 1
                    return [item]
                self._hold(item)
                continue
            now = time.perf_counter_ns()
            best_key, best_t, wake = None, INF, INF
            for key, q in self._queues.items():
                if not q.items:
                    continue
                head_t = q.items[0].t_recv_ns
                if self._draining or q.rows >= self._due_rows:
                    due = -INF
                else:
                    due = self._due_ns(key, q)
                if due <= now:
                    if head_t < best_t:
                        best_key, best_t = key, head_t
                elif due < wake:
                    wake = due
            if best_key is not None:
                return self._pop(best_key)
            if self._draining and self._held == 0:
                return None
            if end is not None:
                if now >= end:
                    return None
                wake = min(wake, end)
            # Wait for the earliest due time, or for a new item (which may change it).
            try:
                item = inbox.get(timeout=None if wake == INF else max(1e-6, (wake - now) / 1e9))
            except queue.Empty:
                continue
            self._hold(item)

    def _batch_rows(self, queued: int) -> int:
        """How many rows the next batch of a key with ``queued`` rows aims at."""
        limit = self.max_batch
        for p in self.preferred:  # ascending: the last one that fits is the largest
            if p <= queued:
                limit = p
        return limit

    def _pop(self, key: Hashable) -> list[Item]:
        q = self._queues[key]
        out: list[Item] = []
        rows = 0
        limit = self._batch_rows(q.rows) if self.preferred else self.max_batch
        while q.items and (not out or rows + q.items[0].rows <= limit):
            it = q.items.popleft()
            out.append(it)
            rows += it.rows
        q.rows -= rows
        self._held -= len(out)
        self._n_taken += len(out)
        if q.items:
            q.min_deadline = min((i.deadline_ns for i in q.items if i.deadline_ns is not None), default=INF)
        else:
            q.min_deadline = INF
            # keep the key's position fair: a drained key goes to the back
            self._queues.move_to_end(key)
        return out
