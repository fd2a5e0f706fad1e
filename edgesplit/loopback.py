"""What a whole runtime on one machine needs (``edgesplit demo``, the benchmarks, process-level
tests): the bundles the repository ships, a default frame source per dataset, a free loopback port.

Its own module so the demo and the benchmarks share it without importing each other.
"""

from __future__ import annotations

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
