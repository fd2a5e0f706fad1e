"""Real bandwidth shaping in the kernel: a network namespace whose loopback goes through ``tc tbf``.

Server and agent both run inside the namespace and talk over its loopback, so every byte between
them (TCP segments, ACKs, both directions) passes the token bucket. Replaying a trace is one
``tc qdisc change`` per step (default 1 s) with the trace's mean capacity over that step, which is
how the fast simulator (:mod:`edgesplit.control.simulator`) sees a rate trace too; for Mahimahi
traces the per-step mean flattens sub-second bursts, which is the one place the two differ.

Why these parameters (see :class:`Tbf`):

- the loopback MTU is set to 1500 first: with the default 64 KiB MTU one segment can exceed the
  bucket and stall the queue;
- ``burst`` is small (max of 4 KiB and 5 ms of the rate): a large bucket would let short frames
  through at line rate and hide the link from the controller;
- ``latency`` bounds the queue (tbf's ``limit`` = rate x latency + burst): cellular uplinks buffer
  deeply, so the default 1 s only drops packets when a sender overruns a second of capacity.

A zero-capacity step (an outage in the trace) becomes the lowest rate tbf accepts here
(:data:`MIN_MBPS`), which delivers nothing a frame could use in time.

Needs root and iproute2 (``ip``, ``tc``); :func:`shaping_available` says whether this machine can.
netem is not available on the project's machines; tbf is.

Command line: run a command in a namespace whose link replays a trace::

    python -m edgesplit.control.netns --trace ../shared/data/traces/hsdpa-norway-3g/norway_bus_1 -- \\
        sh -c 'edgesplit serve --bundle B & sleep 2; edgesplit agent --bundle B --source cifar10:test'
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Sequence

from .traces import Trace, read_trace

MIN_MBPS = 0.008  # 8 kbit/s: tbf needs a rate > 0; an outage step gets this


class ShapingError(RuntimeError):
    """The namespace or qdisc could not be set up (not root, no iproute2, a tc error)."""


def shaping_available() -> tuple[bool, str]:
    """Whether kernel shaping works here, and if not, why (for test skips and clear errors)."""
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return False, "network namespaces need Linux"
    if os.geteuid() != 0:
        return False, "network namespaces and tc need root"
    missing = [t for t in ("ip", "tc") if shutil.which(t) is None]
    if missing:
        return False, f"iproute2 tools missing: {', '.join(missing)}"
    return True, "ok"


def _run(cmd: Sequence[str]) -> str:
    r = subprocess.run(list(cmd), capture_output=True, text=True)
    if r.returncode != 0:
        raise ShapingError(f"`{' '.join(cmd)}` failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


@dataclass(frozen=True)
class Tbf:
    """One token-bucket setting (see the module docstring for why these defaults)."""

    mbps: float
    latency_ms: float = 1000.0
    burst_bytes: int | None = None  # None: max(4 KiB, 5 ms at the rate)

    def args(self) -> list[str]:
        mbps = max(MIN_MBPS, float(self.mbps))
        rate_bit = int(round(mbps * 1e6))
        burst = self.burst_bytes or max(4096, int(rate_bit / 8 * 0.005))
        return ["rate", f"{rate_bit}bit", "burst", str(int(burst)), "latency", f"{self.latency_ms:g}ms"]


class ShapedNamespace:
    """A throw-away network namespace with a shaped loopback. Use as a context manager; the
    namespace is deleted on exit, also after an exception.

    >>> with ShapedNamespace(mbps=2.0) as ns:                     # doctest: +SKIP
    ...     srv = ns.popen(["edgesplit", "serve", "--bundle", "B"])
    ...     ns.set_rate(0.5)
    """

    def __init__(
        self, mbps: float = 10.0, *, name: str | None = None, latency_ms: float = 1000.0, burst_bytes: int | None = None
    ):
        self.name = name or f"edgesplit-{uuid.uuid4().hex[:8]}"
        self.latency_ms = float(latency_ms)
        self.burst_bytes = burst_bytes
        self.mbps = float(mbps)
        self._up = False

    # -- lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> "ShapedNamespace":
        ok, why = shaping_available()
        if not ok:
            raise ShapingError(f"cannot shape bandwidth here: {why}")
        _run(["ip", "netns", "add", self.name])
        self._up = True
        try:
            _run(["ip", "-n", self.name, "link", "set", "lo", "mtu", "1500"])
            _run(["ip", "-n", self.name, "link", "set", "lo", "up"])
            self._tc("add")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._up:
            self._up = False
            # Deleting the namespace kills its sockets; processes still inside keep running in it
            # until they exit, so callers stop their processes first (see popen()).
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True)

    # -- shaping -------------------------------------------------------------------------------
    def _tc(self, verb: str) -> None:
        tbf = Tbf(self.mbps, self.latency_ms, self.burst_bytes)
        _run(["ip", "netns", "exec", self.name, "tc", "qdisc", verb, "dev", "lo", "root", "tbf", *tbf.args()])

    def set_rate(self, mbps: float) -> None:
        """Change the rate now (``tc qdisc change``: queued packets stay queued)."""
        self.mbps = float(mbps)
        self._tc("change")

    def stats(self) -> dict[str, int]:
        """The qdisc's counters: bytes and packets sent, drops, overlimits."""
        out = _run(["ip", "netns", "exec", self.name, "tc", "-s", "qdisc", "show", "dev", "lo"])
        words = out.replace(",", " ").replace("(", " ").replace(")", " ").split()
        res: dict[str, int] = {}
        for i, w in enumerate(words[:-1]):
            if w == "Sent" and "bytes" not in res:
                res["bytes"] = int(words[i + 1])
                res["packets"] = int(words[i + 3])
            elif w in ("dropped", "overlimits") and w not in res:
                res[w] = int(words[i + 1])
        return res

    # -- processes -----------------------------------------------------------------------------
    def command(self, cmd: Sequence[str]) -> list[str]:
        """``cmd`` wrapped to run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *cmd]

    def popen(self, cmd: Sequence[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(self.command(cmd), **kw)

    def run(self, cmd: Sequence[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(cmd), **kw)


def rate_schedule(
    trace: Trace, seconds: float, step_s: float = 1.0, offset_s: float = 0.0
) -> list[tuple[float, float]]:
    """``[(t, mbps)]``: the trace's mean capacity over each step ``[t, t + step)`` from
    ``offset_s`` on, covering ``seconds`` (looping) — what :class:`TraceReplayer` applies."""
    n = max(1, int(math.ceil(seconds / step_s)))
    out = []
    for k in range(n):
        t0 = offset_s + k * step_s
        out.append((k * step_s, trace.mbps_between(t0, t0 + step_s)))
    return out


class TraceReplayer:
    """Apply a trace to a namespace step by step, in a background thread.

    ``applied`` records ``(seconds since start, mbps)`` of every change actually made, so a live
    run can be compared with a simulation of the very same schedule."""

    def __init__(self, ns: ShapedNamespace, trace: Trace, *, step_s: float = 1.0, offset_s: float = 0.0):
        self.ns = ns
        self.trace = trace
        self.step_s = float(step_s)
        self.offset_s = float(offset_s)
        self.applied: list[tuple[float, float]] = []
        self.t0: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self) -> "TraceReplayer":
        self.t0 = time.monotonic()
        self._thread = threading.Thread(target=self._main, name="edgesplit-trace-replay", daemon=True)
        self._thread.start()
        return self

    def _main(self) -> None:
        k = 0
        try:
            while not self._stop.is_set():
                t = self.offset_s + k * self.step_s
                mbps = self.trace.mbps_between(t, t + self.step_s)
                self.ns.set_rate(mbps)
                self.applied.append((time.monotonic() - self.t0, mbps))
                k += 1
                # Sleep to the next step boundary measured from the start, so tc's own latency
                # does not accumulate as drift.
                self._stop.wait(max(0.0, self.t0 + k * self.step_s - time.monotonic()))
        except BaseException as e:  # reported by stop(); a replay that silently stopped would lie
            self.error = e

    def stop(self) -> list[tuple[float, float]]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self.error is not None:
            raise ShapingError(f"trace replay failed: {self.error}") from self.error
        return self.applied

    def __enter__(self) -> "TraceReplayer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m edgesplit.control.netns",
        description="Run a command in a network namespace whose loopback is shaped with "
        "tc tbf, at a fixed rate or replaying a trace (needs root).",
    )
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--trace", help="HSDPA or Mahimahi trace file")
    g.add_argument("--mbps", type=float, help="fixed rate")
    p.add_argument("--step-s", type=float, default=1.0, help="seconds between rate changes when replaying")
    p.add_argument("--offset-s", type=float, default=0.0, help="start this far into the trace")
    p.add_argument("--latency-ms", type=float, default=1000.0, help="tbf queue bound in time at the current rate")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run inside")
    a = p.parse_args(argv)
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        p.error("give the command to run after --")
    trace = read_trace(a.trace) if a.trace else None
    first = trace.mbps_between(a.offset_s, a.offset_s + a.step_s) if trace else a.mbps
    try:
        with ShapedNamespace(first, latency_ms=a.latency_ms) as ns:
            replay = TraceReplayer(ns, trace, step_s=a.step_s, offset_s=a.offset_s).start() if trace else None
            try:
                return ns.run(cmd).returncode
            finally:
                if replay is not None:
                    replay.stop()
    except ShapingError as e:
        print(f"netns: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
