"""``edgesplit serve`` as a child process, as deployed: what every benchmark and process-level
test starts its daemon with.

- The daemon binds the given port, or a free one (port 0); the endpoint is read back from its
  ``listening on`` line, and ``ready_at`` (``time.monotonic()``) records when that line came, from
  a watcher thread, so a caller can keep streaming while a restart is in progress.
- Its log goes to a file, not a pipe: a pipe nobody reads would stall a chatty daemon.
- ``kill9()`` then ``start()`` restarts it on the same endpoint (what ``bench restart`` needs).
- :func:`daemon_args`: the batching, admission and engine options the benchmarks pass it.
- :func:`start_in_namespace`: the daemon inside a shaped network namespace (``bench plan``,
  ``bench adapt --live``), with one tail thread and no queue delay.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence


def stop_process(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM (the daemon drains and exits), then SIGKILL if it does not within ``timeout``."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def daemon_args(
    *,
    max_batch: int,
    queue_delay_us: float,
    credits: int,
    max_queue: int,
    threads: int | None = None,
    backend: str | None = None,
    precision: str | None = None,
    accel: str | None = None,
    device: str | None = None,
) -> list[str]:
    """``edgesplit serve`` options: batching and admission always; the engine's backend,
    precision, accelerator, device and tail threads where given (else the daemon's defaults)."""
    args: list[str] = []
    for flag, value in (("--backend", backend), ("--precision", precision), ("--accel", accel)):
        if value is not None:
            args += [flag, value]
    args += ["--max-batch", str(max_batch), "--max-queue-delay-us", str(queue_delay_us)]
    args += ["--credits", str(credits), "--max-queue", str(max_queue)]
    if device:
        args += ["--device", device]
    if threads:
        args += ["--threads", str(threads)]
    return args


def start_in_namespace(
    ns: Any, bundles: Sequence[str | Path], log_path: Path, port: int
) -> tuple[subprocess.Popen, str]:
    """Start the daemon inside ``ns`` (a :class:`~edgesplit.control.netns.ShapedNamespace`) on
    ``port``, one tail thread, no queue delay, its log in ``log_path``; returns once it listens:
    ``(process, endpoint)``. Stop it with :func:`stop_process`."""
    endpoint = f"tcp://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "edgesplit", "serve", "--bind", endpoint, "--threads", "1"]
    cmd += ["--max-queue-delay-us", "0", "--log-level", "WARNING"]
    for b in bundles:
        cmd += ["--bundle", str(b)]
    with open(log_path, "w") as log:  # the child keeps its own descriptor
        proc = ns.popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in proc.stdout:
        if "listening on " in line:
            # keep reading what the daemon prints, so that a full pipe never stalls it
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc, endpoint
    proc.wait()
    raise RuntimeError(f"server did not start ({proc.returncode}): {Path(log_path).read_text()[-2000:]}")


class ServerProcess:
    def __init__(
        self, bundles: Sequence[str | Path], args: Sequence[str] = (), *, port: int = 0, log_level: str = "WARNING"
    ):
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self._bundles = [str(b) for b in bundles]
        self._args = list(args)
        self._log_level = log_level
        self.log_path = tempfile.mkstemp(prefix="edgesplit-serve-", suffix=".log")[1]
        self.proc: subprocess.Popen | None = None
        self.ready_at: float | None = None
        self.exit_code: int | None = None
        self._ready = threading.Event()

    def start(self, wait_s: float | None = 60.0) -> ServerProcess:
        """Start the daemon (again, on the endpoint it had, after a kill); with ``wait_s``, wait
        until it listens (RuntimeError with its log if it does not)."""
        self.ready_at = None
        self.exit_code = None
        self._ready.clear()
        cmd = [sys.executable, "-m", "edgesplit", "serve", "--bind", self.endpoint, "--log-level", self._log_level]
        for b in self._bundles:
            cmd += ["--bundle", b]
        with open(self.log_path, "a") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(cmd + self._args, stdout=subprocess.PIPE, stderr=log, text=True)
        threading.Thread(target=self._watch, args=(self.proc,), daemon=True).start()
        if wait_s is not None:
            self.wait_ready(wait_s)
        return self

    def _watch(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            if "listening on " in line:
                self.endpoint = line.split("listening on ", 1)[1].strip()  # port 0 resolved
                self.ready_at = time.monotonic()
                self._ready.set()
        proc.stdout.close()

    def wait_ready(self, timeout_s: float) -> float:
        if not self._ready.wait(timeout_s):
            raise RuntimeError(
                f"server at {self.endpoint} did not start listening within {timeout_s} s "
                f"(exit {self.proc.poll()}): {self.log_text()[-2000:] or '(no output)'}"
            )
        return self.ready_at

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_mb(self) -> float:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss / 2**20

    def kill9(self) -> None:
        """SIGKILL: the daemon gets no chance to say bye or drain."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (the daemon drains and exits 0); SIGKILL if it has not exited in time (-9).
        Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            stop_process(self.proc, timeout_s)
        self.exit_code = self.proc.returncode
        return self.exit_code

    def log_text(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def __enter__(self) -> ServerProcess:
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
