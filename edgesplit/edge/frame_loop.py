"""The one frame loop of the agent: window, pacing, submit, drain, and an optional clean stop.

:meth:`Agent.run <edgesplit.edge.agent_core.Agent.run>`, the service loop (SIGTERM, watchdog:
:mod:`edgesplit.edge.service_run`) and the loop across bundle updates
(:class:`edgesplit.edge.ota_loop.UpdateManager`) all run this function over a :class:`FrameTarget`:
an :class:`~edgesplit.edge.agent_core.Agent`, or the update manager that routes to the agent of the
bundle in use. What differs between them is only the target, the stop and what happens each turn.

The next frame is read and its head run only once a window slot is free: a result is then taken
off the socket (and yielded) as soon as it arrives instead of after a head computed in the
meantime, so ``rtt_ms`` is the round trip rather than round trip plus the agent's own busy time
(what link estimation needs), and each frame is as fresh as it can be when sent (what a live
camera needs).
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterable, Iterator, Protocol

from .results import FrameResult

_END = object()  # end of a frame source


class FrameTarget(Protocol):
    """Where frames go and results come from."""

    def poll(self, timeout_s: float) -> Iterable[FrameResult]:
        """Results that ended, waiting up to ``timeout_s`` for the first."""
        ...

    def submit(self, sample: Any) -> Any:
        """Start one frame (server, local or policy: the target decides)."""
        ...

    def window_full(self) -> bool:
        """No request slot is free: the next frame must wait for an answer."""
        ...

    def busy(self) -> bool:
        """Frames are in flight or results are waiting to be taken."""
        ...

    def wait_budget(self) -> float:
        """How long one blocking wait may last before timeouts and heartbeats are re-checked."""
        ...

    def hand_off(self) -> int:
        """Stop waiting for the server: answer each frame in flight locally (or as an error)."""
        ...


class Stop(Protocol):
    """A request to stop reading frames: ``at`` is when it came (``time.monotonic()``), or None."""

    at: float | None


def stream_frames(
    target: FrameTarget,
    frames: Iterator,
    *,
    fps: float | None = None,
    submit: Callable[[Any], Any] | None = None,
    stop: Stop | None = None,
    grace_s: float = math.inf,
    each_turn: Callable[[], None] | None = None,
) -> Iterator[FrameResult]:
    """Send ``frames`` to ``target`` with its window of requests outstanding; yield results as they end.

    ``fps``: pace the frames like a camera, frame *i* no earlier than ``i / fps`` after the first
    (answers are taken in while waiting); unset: as fast as the window allows. ``submit``: how a
    frame is started (default ``target.submit``). ``stop``: once its ``at`` is set no new frame is
    read; the frames in flight keep their chance of a server answer for ``grace_s`` and are then
    handed off, so every frame read ends as exactly one result. ``each_turn``: called once per turn
    of the loop (a watchdog ping: a stuck source or engine stops the pings)."""
    start = submit or target.submit
    turn = each_turn or (lambda: None)

    def stopping() -> bool:
        return stop is not None and stop.at is not None

    t_start, i = time.perf_counter(), 0
    while not stopping():
        turn()
        yield from target.poll(0.0)
        while target.window_full() and not stopping():
            turn()
            yield from target.poll(target.wait_budget())
        if fps:
            while not stopping() and (wait := t_start + i / fps - time.perf_counter()) > 0:
                yield from target.poll(min(wait, target.wait_budget()))
            i += 1
        if stopping():
            break
        sample = next(frames, _END)
        if sample is _END:
            break
        start(sample)
    handed = False
    while target.busy():
        turn()
        if stop is not None and stop.at is not None and not handed and time.monotonic() >= stop.at + grace_s:
            target.hand_off()
            handed = True
        yield from target.poll(target.wait_budget())
