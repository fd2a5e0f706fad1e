"""A sampler in its own process at a fixed rate, and energy from its samples.

The sampling process is started with ``spawn`` (a fresh interpreter: it inherits no ONNX Runtime
threads or locks from the measured process) and builds its sampler from a name and plain
options. It records ``(t, watts)`` on ``time.monotonic()``, a clock shared by all processes, so
the parent can cut the series at its own inference timestamps. Samples come back as raw float64
bytes over a pipe when sampling stops, with the process's CPU time: the sampler's overhead.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing as mp
import time
from array import array
from dataclasses import dataclass
from typing import Any

from .readings import PowerError
from .samplers import make_sampler

MIN_HZ, MAX_HZ = 1.0, 200.0
START_TIMEOUT_S = 60.0  # a cold spawn imports psutil/yaml; on a loaded 2-core box that takes seconds


def _sampling_loop(name: str, options: dict, hz: float, conn, stop) -> None:
    try:
        sampler = make_sampler(name, **options)
    except Exception as e:  # noqa: BLE001 - any failure to start is reported to the parent, which raises it
        conn.send_bytes(json.dumps({"error": f"{type(e).__name__}: {e}"}).encode())
        return
    samples = array("d")
    period = 1.0 / hz
    ready, error = False, None
    wall0, cpu0 = time.monotonic(), time.process_time()
    next_t = wall0
    try:
        while not stop.is_set():
            watts = sampler.read()
            if watts is not None:
                samples.extend((time.monotonic(), watts))
                if not ready:  # "ready" once a sample exists: the series covers everything after it
                    conn.send_bytes(
                        json.dumps(
                            {"ready": True, "estimate": sampler.estimate, "describe": sampler.describe()}
                        ).encode()
                    )
                    ready = True
            next_t += period
            delay = next_t - time.monotonic()
            if delay > 0:
                stop.wait(delay)  # wakes at once when the parent stops us
            else:
                next_t = time.monotonic()  # fell behind (a slow read): keep the rate, do not burst
    except Exception as e:  # noqa: BLE001 - a sensor failing mid-run is reported, with the samples so far
        error = f"{type(e).__name__}: {e}"
    cpu_s, wall_s = time.process_time() - cpu0, time.monotonic() - wall0
    sampler.close()
    if not ready:
        conn.send_bytes(json.dumps({"error": error or "stopped before the first sample"}).encode())
        return
    conn.send_bytes(json.dumps({"cpu_s": cpu_s, "wall_s": wall_s, "error": error}).encode())
    conn.send_bytes(samples.tobytes())


@dataclass
class SampleSeries:
    """What a sampling run recorded."""

    sampler: str
    estimate: bool
    describe: dict[str, Any]
    hz: float
    t: list[float]
    watts: list[float]
    cpu_s: float  # CPU time of the sampling loop (the sampler's overhead)
    wall_s: float

    @property
    def cpu_percent(self) -> float:
        """The sampling process's CPU use, in % of one core."""
        return 100.0 * self.cpu_s / self.wall_s if self.wall_s > 0 else 0.0

    def energy_j(self, t0: float, t1: float) -> float:
        return energy_j(self.t, self.watts, t0, t1)

    def mean_w(self, t0: float, t1: float) -> float:
        return self.energy_j(t0, t1) / (t1 - t0)

    def count(self, t0: float, t1: float) -> int:
        return sum(1 for t in self.t if t0 <= t <= t1)


def _interp(t: list[float], w: list[float], x: float) -> float:
    """Watts at time x, linear between the two samples around it (t is increasing)."""
    lo, hi = 0, len(t) - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if t[mid] <= x:
            lo = mid
        else:
            hi = mid
    if t[hi] == t[lo]:
        return w[lo]
    return w[lo] + (w[hi] - w[lo]) * (x - t[lo]) / (t[hi] - t[lo])


def energy_j(t: list[float], watts: list[float], t0: float, t1: float) -> float:
    """Joules between t0 and t1: the trapezoid rule over the samples inside, with the power at the
    window's edges interpolated from the samples either side. The window must lie within the
    samples: extrapolating power past the last sample would be a guess."""
    if t1 <= t0:
        raise PowerError(f"empty interval [{t0}, {t1}]")
    if len(t) < 2 or t0 < t[0] or t1 > t[-1]:
        span = f"[{t[0]:.3f}, {t[-1]:.3f}]" if t else "none"
        raise PowerError(
            f"interval [{t0:.3f}, {t1:.3f}] is not covered by the samples ({span}): sample longer or faster"
        )
    pts = (
        [(t0, _interp(t, watts, t0))]
        + [(x, y) for x, y in zip(t, watts) if t0 < x < t1]
        + [(t1, _interp(t, watts, t1))]
    )
    return sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in itertools.pairwise(pts))


class SamplingProcess:
    """``with SamplingProcess("rapl", hz=50) as s: ...`` then ``s.series``; or start()/stop()."""

    def __init__(self, sampler: str, hz: float = 50.0, **options: Any):
        if not MIN_HZ <= hz <= MAX_HZ:
            raise PowerError(f"sampling rate {hz} Hz is outside [{MIN_HZ:g}, {MAX_HZ:g}]")
        self.sampler, self.hz, self.options = sampler, float(hz), options
        self.info: dict[str, Any] = {}
        self.series: SampleSeries | None = None
        self._proc = None

    def start(self) -> SamplingProcess:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe(duplex=False)
        self._stop = ctx.Event()
        self._proc = ctx.Process(
            target=_sampling_loop,
            args=(self.sampler, self.options, self.hz, child, self._stop),
            name=f"power-{self.sampler}",
            daemon=True,
        )
        self._proc.start()
        child.close()
        if not self._conn.poll(START_TIMEOUT_S):
            self._kill()
            raise PowerError(f"the {self.sampler} sampling process did not start within {START_TIMEOUT_S:g} s")
        self.info = json.loads(self._conn.recv_bytes())
        if "error" in self.info:
            self._proc.join(5)
            raise PowerError(f"sampler {self.sampler!r} cannot start: {self.info['error']}")
        return self

    def stop(self) -> SampleSeries:
        self._stop.set()
        try:
            end = json.loads(self._conn.recv_bytes())
            raw = array("d")
            raw.frombytes(self._conn.recv_bytes())
        except EOFError:
            raise PowerError(f"the {self.sampler} sampling process died (exit code {self._proc.exitcode})") from None
        finally:
            self._proc.join(5)
            self._kill()
        if end.get("error"):
            raise PowerError(f"sampler {self.sampler!r} failed while sampling: {end['error']}")
        self.series = SampleSeries(
            self.sampler,
            bool(self.info["estimate"]),
            self.info["describe"],
            self.hz,
            list(raw[0::2]),
            list(raw[1::2]),
            end["cpu_s"],
            end["wall_s"],
        )
        return self.series

    def _kill(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)

    def __enter__(self) -> SamplingProcess:
        return self.start()

    def __exit__(self, exc_type, *_) -> None:
        if self.series is None:
            if exc_type is None:
                self.stop()
            else:
                self._kill()
