"""The compute thread for remote tails that take several batches at once (``serve --backend
triton|ray --remote-inflight K``): up to K formed batches are in flight to the remote tail while
the next ones form, so the hop is not paid once per batch in series and several replicas (or
Triton instances) work at once for one gateway. That pays only where the remote side has
capacity the gateway would leave idle; on a CPU it shares with the gateway it does not (bench
gateway), hence the default of one.

Everything stays on the one compute thread, as in :class:`~.compute.ComputeWorker`: a due batch
is triaged and *submitted* (the backend's ``submit(items)`` returns a handle at once); when K are
in flight, or no batch falls due within ``--max-queue-delay-us`` (the longest a request waits to be
batched anyway), the oldest is *finished*: its result is taken and its replies are
made by :meth:`ComputeWorker.run_batch` itself (through a stand-in runner that hands over that
result), so replies, metrics and errors are exactly the daemon's. A backend without ``submit``
runs its batches as the plain compute thread does. Batch times fed to the scheduler run from the
finish's start, so with K in flight they are the gateway's time per batch, not one batch's trip.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from .compute import ComputeWorker


class _Handed:
    """Stands in for a runner in :meth:`ComputeWorker.run_batch`: its ``run`` gives the result of
    the batch submitted earlier (``pending``); the rest is the real runner's."""

    def __init__(self, runner: Any):
        self.runner = runner
        self.pending: Any = None

    def run(self, items):
        pending, self.pending = self.pending, None
        return pending.result()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.runner, name)


class PipelinedCompute(ComputeWorker):
    def __init__(self, *args: Any, inflight: int = 2, **kw: Any):
        super().__init__(*args, **kw)
        if inflight < 1:
            raise ValueError("inflight must be >= 1")
        self.inflight = int(inflight)
        self.max_pending = 0  # the most batches that were in flight at once
        self._real = self.runners

    def run(self) -> None:
        """Until the scheduler is closed and drained and nothing is in flight."""
        handed = {h: _Handed(r) for h, r in self._real.items()}
        pending: deque = deque()  # (live items, bundle hash), oldest first, in submit order
        fold_in = self.fold_every
        sched = self.scheduler
        # With batches in flight, wait this long for the next one to fall due before taking the
        # oldest's result: no longer than a request may wait to be batched anyway.
        wait_s = sched.max_delay_ns / 1e9
        try:
            while True:
                batch = sched.next_batch(wait_s if pending else None)  # None: nothing due / closed and drained
                if batch is None:
                    if not pending:
                        return
                    self._finish(pending.popleft(), handed)
                else:
                    h = batch[0].key[0]
                    submit = getattr(self._real[h], "submit", None)
                    if submit is None:
                        self.runners = self._real
                        self.run_batch_guarded(batch)
                    else:
                        live, late = sched.triage(batch, _now())
                        for it, refusal in late:
                            self._push_error(it, refusal.code, refusal.message)
                        if live:
                            pending.append((live, h, submit(live)))
                            self.max_pending = max(self.max_pending, len(pending))
                        if late:
                            self.wake_io()
                        if len(pending) < self.inflight:
                            continue
                        self._finish(pending.popleft(), handed)
                fold_in -= 1
                if fold_in <= 0:
                    fold_in = self.fold_every
                    self.stats.fold()
        finally:
            self.runners = self._real
            self.wake_io()

    def _finish(self, entry, handed: dict) -> None:
        live, h, result = entry
        stand_in = handed[h]
        stand_in.pending = result
        self.runners = handed
        try:
            self.run_batch_guarded(live)
        finally:
            self.runners = self._real


def _now() -> int:
    import time

    return time.perf_counter_ns()
