"""What the compute thread runs a formed batch on: the :class:`TailBackend` interface.

The daemon's I/O thread, sessions, admission and scheduler stay where they are whatever runs the
tail; what crosses to a backend is a *formed batch* (the scheduler's list of queued requests),
never a single frame, so that a remote tail pays one hand-off per batch. Backends:

- :class:`~.tail_runner.TailRunner`: the bundle's tail in this process (ONNX Runtime, torch,
  TensorRT), the default; its hot path is the daemon's as it always was.
- :class:`~.triton_tail.TritonTail`: the same decoding into one float32 batch, then one gRPC
  inference request to a Triton server holding the tail (``edgesplit serve --backend triton``).

``run`` returns ``(logits, row offsets, per-item errors by index)``: an item whose error is set
is answered with that error's code (so a backend can answer a whole batch OVERLOADED when its
remote queue is full), every other item with its rows of ``logits``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from ..wire.errors import WireError
    from .batcher import Item


@dataclass(frozen=True)
class Capacity:
    """What a backend can take at once: the largest batch one call runs, how many batches it
    runs side by side (Triton: the model's instance count), and where it runs (for logs/stats)."""

    max_batch: int
    instances: int
    where: str


@runtime_checkable
class TailBackend(Protocol):
    fused: bool  # results carry sub-model use (ED-ViT fusion) as well as logits

    def warmup(self) -> None: ...

    def run(self, items: list[Item]) -> tuple[np.ndarray, list[int], dict[int, WireError]]: ...

    def outputs_for(self, shape: tuple) -> list[dict[str, Any]]: ...

    def health(self) -> tuple[bool, str]: ...

    def capacity(self) -> Capacity: ...

    def close(self) -> None: ...


@runtime_checkable
class EncodesAnswers(Protocol):
    """A backend whose results are not float32 arrays sent as they are: it encodes each one itself
    (a U-shaped body's output in its mode's answer dtype, PROTOCOL.md §15.6.1) and may refuse one."""

    def answer(self, it: Item, out: np.ndarray) -> tuple[list[dict[str, Any]], bytes]: ...


def health_of(backend: Any) -> tuple[bool, str]:
    """A backend's health; one without a health check (the ED-ViT fusion runner) is as healthy as
    the daemon."""
    check = getattr(backend, "health", None)
    return (True, "") if check is None else check()


def close_backend(backend: Any) -> None:
    """Close a backend at the daemon's stop (the fusion runner: its engine)."""
    close = getattr(backend, "close", None)
    (close or backend.engine.close)()
