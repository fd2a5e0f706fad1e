"""The agent as a long-running service: its extra flags (config file, JSON logs, delivered
results, stop grace), a clean stop on SIGTERM, and the frame loop that honours it.

A clean stop: on SIGTERM the agent reads no new frame; the frames in flight keep their chance of
a server answer for ``stop_grace_s``; those still unanswered then are handed to the local fallback
(``fallback_reason`` ``SHUTDOWN``; with fallback off they end as ``SHUTDOWN`` errors), so every
frame read ends as exactly one result; then the summary, then exit 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from typing import Any, Iterator

from ..logs import LOG_FORMATS, setup_logging
from .agent_core import Agent
from .frame_loop import stream_frames
from .results import FrameResult
from .sdnotify import Notifier

log = logging.getLogger("edgesplit.agent")


def add_service_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("service: config file, logs, delivered results, stop")
    g.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="YAML file of settings: every flag is a key (its name with '_' for '-', e.g. deadline_ms); "
        "flags given here override the file (see deploy/agent.example.yaml)",
    )
    g.add_argument(
        "--log-format",
        default="text",
        choices=LOG_FORMATS,
        help="the agent's own messages on stderr: text, or one JSON object per line (for the journal)",
    )
    g.add_argument(
        "--deliver",
        default=None,
        metavar="URL",
        help="POST every frame's result (JSON lines) to this collector URL, in order; results the collector "
        "cannot take now wait in the spool on disk and are sent after (edgesplit collect is a collector)",
    )
    g.add_argument("--deliver-batch", type=int, default=100, help="most records per POST")
    g.add_argument(
        "--spool-dir",
        default=None,
        metavar="DIR",
        help="where undelivered results wait (unset: $STATE_DIRECTORY/spool under systemd)",
    )
    g.add_argument(
        "--spool-max-bytes", type=int, default=None, help="spool bound in bytes; the oldest go first (64 MiB)"
    )
    g.add_argument(
        "--spool-max-records", type=int, default=None, help="spool bound in records; the oldest go first (1e6)"
    )
    g.add_argument(
        "--stop-grace-s",
        type=float,
        default=2.0,
        help="on SIGTERM: how long frames in flight wait for the server before the local fallback answers them",
    )


class Reporter:
    """The agent's own messages: ``edgesplit agent: ...`` lines, or JSON log records."""

    def __init__(self, fmt: str):
        self.json = fmt == "json"
        if self.json:
            setup_logging("INFO", "json")

    def say(self, msg: str, level: int = logging.WARNING, **fields: Any) -> None:
        if self.json:
            log.log(level, msg, extra=fields)
        else:
            print(f"edgesplit agent: {msg}", file=sys.stderr)


class StopSignal:
    """SIGTERM (what systemd sends) sets a flag the frame loop reads; the handler only sets it."""

    def __init__(self) -> None:
        self.at: float | None = None
        self._old: Any = None

    @property
    def requested(self) -> bool:
        return self.at is not None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.at is None:
            self.at = time.monotonic()

    def __enter__(self) -> StopSignal:
        self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        signal.signal(signal.SIGTERM, self._old)


def run_frames(
    agent: Agent,
    frames: Iterator,
    *,
    fps: float | None,
    stop: StopSignal,
    grace_s: float,
    notifier: Notifier,
) -> Iterator[FrameResult]:
    """:meth:`Agent.run` over ``frames``, and it stops reading frames on SIGTERM, waits for the
    frames in flight at most ``grace_s`` and hands what is left to the fallback; pings the systemd
    watchdog each turn of the loop (a stuck source or engine stops the pings)."""
    return stream_frames(agent, frames, fps=fps, stop=stop, grace_s=grace_s, each_turn=notifier.watchdog)
