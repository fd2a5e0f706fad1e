"""What a whole runtime on one machine needs (``edgesplit demo``, the benchmarks, process-level
tests): the bundles the repository ships, a default frame source per dataset, a free loopback port,
ED-ViT worker processes.

Its own module so the demo and the benchmarks share it without importing each other.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
DEFAULT_BUNDLE = MODELS_DIR / "cifar10-resnet20-bottlefit"
DEFAULT_SOURCES = {"cifar10": "cifar10:test", "imagenette": "imagenette:val"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (bound and released by ZeroMQ)."""
    import zmq  # here, so the paths above cost no pyzmq import

    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.ROUTER)
    try:
        return s.bind_to_random_port("tcp://127.0.0.1")
    finally:
        s.close(0)


def start_workers(
    bundle: str | Path, n: int, n_sub: int, threads: int = 1
) -> list[tuple[subprocess.Popen, str, list[int]]]:
    """``n`` ``edgesplit worker`` processes on loopback ports, sub-model ``s`` on worker ``s mod n``;
    each returns once its worker listens: (process, endpoint, sub-model ids). The caller stops them."""
    out: list[tuple[subprocess.Popen, str, list[int]]] = []
    try:
        for w in range(n):
            subs = [s for s in range(n_sub) if s % n == w]
            cmd = [sys.executable, "-m", "edgesplit", "worker", "--bundle", str(bundle), "--bind", "tcp://127.0.0.1:0"]
            cmd += ["--submodels", ",".join(map(str, subs)), "--threads", str(threads)]
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            out.append((p, "", subs))
            line = json.loads(p.stdout.readline() or "{}") if p.stdout else {}
            if line.get("event") != "listening":
                raise RuntimeError(f"ED-ViT worker {w} (sub-models {subs}) did not start: {line or 'no output'}")
            out[-1] = (p, line["endpoint"], subs)
    except BaseException:
        stop_workers(out)
        raise
    return out


def stop_workers(workers: list[tuple[subprocess.Popen, str, list[int]]]) -> None:
    """SIGTERM (a worker drains, then exits) and wait; SIGKILL what does not exit in 10 s."""
    for p, _, _ in workers:
        if p.poll() is None:
            p.terminate()
    for p, _, _ in workers:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
