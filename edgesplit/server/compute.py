"""The daemon's compute thread: due batches from the scheduler -> tail runs -> packed replies.

It takes due batches from the scheduler (blocking in C on its queue, GIL released; an idle
server hands a lone request over as a batch of one), lets the scheduler triage the requests whose
deadline the batch would miss, runs the tail once, appends one packed reply per request
(``[identity, header, logits]``, or ``[identity, header]`` for an error) to the reply deque and
then writes one byte to the wake-up line: one wake-up per batch, not one per reply (two threads
trading the GIL on each frame cost more than the work itself). The wake-up line is a plain
socket pair, not a ZeroMQ socket, so no ZeroMQ socket is ever shared: the I/O thread sends.
"""

from __future__ import annotations

import logging
import socket
import time
from collections import deque
from typing import Mapping

from ..wire import protocol as P
from ..wire import scatter_messages as S
from ..wire.errors import ErrorCode, WireError
from ..wire.messages import ErrorReply
from .batcher import Batcher, Item
from .fusion_runner import FusionRunner
from .stats import FOLD_EVERY_BATCHES, ServerStats
from .tail_backend import EncodesAnswers, TailBackend

log = logging.getLogger("edgesplit.server")


class ComputeWorker:
    """The compute thread's loop (:meth:`run`) and everything only that thread touches."""

    def __init__(
        self,
        scheduler: Batcher,
        runners: Mapping[str, TailBackend | FusionRunner],
        stats: ServerStats,
        replies: deque,
        wake: socket.socket | None,
    ):
        self.scheduler = scheduler
        self.runners = runners
        self.stats = stats
        self.replies = replies  # this thread appends, the I/O thread pops
        self.wake = wake  # None until the I/O loop opens the wake-up line, before this thread starts
        self.fold_every = FOLD_EVERY_BATCHES
        self._result_packer = P.ResultPacker()  # one per thread

    def run(self) -> None:
        """Until the scheduler is closed and drained."""
        fold_in = self.fold_every
        try:
            while True:
                batch = self.scheduler.next_batch()  # None: closed and drained
                if batch is None:
                    return
                self.run_batch_guarded(batch)
                fold_in -= 1
                if not fold_in:  # metrics: recorded figures -> histogram counts, off the reply path
                    fold_in = self.fold_every
                    self.stats.fold()
        finally:
            self.wake_io()  # so that the I/O thread sees at once that this thread ended

    def run_batch_guarded(self, batch: list[Item]) -> None:
        """:meth:`run_batch`, a failure answered INTERNAL to each frame of the batch not answered
        yet (never let one batch kill the daemon); then wake the I/O thread for the replies."""
        try:
            self.run_batch(batch)
        except Exception as e:
            log.exception("batch failed")
            for it in batch:
                if not it.answered:
                    self._push_error(it, ErrorCode.INTERNAL, f"{type(e).__name__}: {e}")
        self.wake_io()

    def wake_io(self) -> None:
        assert self.wake is not None, "the I/O loop opens the wake-up line before it starts this thread"
        try:
            self.wake.send(b"\0")
        except (BlockingIOError, InterruptedError):  # the line is full: a wake-up is pending anyway
            pass
        except OSError:  # closed during shutdown
            pass

    def _push_error(self, it: Item, code: ErrorCode, message: str) -> None:
        self.stats.compute.error(code, it.key[0])
        self.replies.append([it.identity, P.pack_header(ErrorReply(it.req_id, code, message).to_header())])
        it.answered = True

    def run_batch(self, batch: list[Item]) -> None:
        t0 = time.perf_counter_ns()
        live, late = self.scheduler.triage(batch, t0)
        for it, refusal in late:  # rare unless overloaded
            self._push_error(it, refusal.code, refusal.message)
        if not live:
            return
        runner = self.runners[live[0].key[0]]
        try:
            logits, offsets, errors = runner.run(live)
        except Exception as e:
            log.exception("tail failed")
            for it in live:
                self._push_error(it, ErrorCode.INTERNAL, f"tail failed: {type(e).__name__}: {e}")
            return
        t1 = time.perf_counter_ns()
        rows = sum(it.rows for i, it in enumerate(live) if i not in errors) if errors else sum(it.rows for it in live)
        if rows:  # a batch refused whole (a remote tail's OVERLOADED) teaches no compute time
            self.scheduler.note_compute(live[0].key, (t1 - t0) / 1e9, rows, t1)
        compute_us = (t1 - t0) / 1e3
        cc = self.stats.compute
        cc.batches += 1
        cc.rows += rows
        replies = self.replies
        pack = self._result_packer.pack
        # Metrics are recorded before each reply is queued: once an agent holds a result, a scrape
        # counts it.
        model = self.stats.models[live[0].key]
        model.batches.append((rows, len(live) - len(errors), compute_us))
        record_queue, record_request = model.queue_us.append, model.request_us.append
        fused = runner.fused
        answer = runner.answer if isinstance(runner, EncodesAnswers) else None
        unanswerable = 0
        for i, it in enumerate(live):
            if errors and i in errors:
                self._push_error(it, errors[i].code, errors[i].message)
                continue
            r = offsets[i]
            out = logits[r] if it.single else logits[r : r + it.rows]
            if answer is None:
                outputs, payload = runner.outputs_for(out.shape), out.tobytes()
            else:
                try:
                    outputs, payload = answer(it, out)
                except WireError as e:
                    self._push_error(it, e.code, e.message)
                    unanswerable += 1
                    continue
            t_reply = time.perf_counter_ns()
            queue_us, server_us = (t0 - it.t_recv_ns) / 1e3, (t_reply - it.t_recv_ns) / 1e3
            if fused:  # a fused request's result also says which sub-models it used (§13.5)
                header = self._fused_header(it, outputs, queue_us, compute_us, rows, server_us)
            else:
                header = pack(
                    it.req_id,
                    outputs,
                    queue_us=queue_us,
                    compute_us=compute_us,
                    batch_size=rows,
                    server_us=server_us,
                    t_send_ns=it.t_send_ns,
                )
            record_queue(queue_us)
            record_request(server_us)
            replies.append([it.identity, header, payload])
            it.answered = True
        cc.results += len(live) - len(errors) - unanswerable

    @staticmethod
    def _fused_header(
        it: Item, outputs: list, queue_us: float, compute_us: float, rows: int, server_us: float
    ) -> bytes:
        h = S.fused_result(
            it.req_id,
            outputs,
            it.desc["submodels"],
            queue_us=queue_us,
            compute_us=compute_us,
            batch_size=rows,
            server_us=server_us,
        )
        if it.t_send_ns is not None:
            h["t_send_ns"] = it.t_send_ns
        return P.pack_header(h)
