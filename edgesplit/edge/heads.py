"""The bundle's heads on this device: every head a mode runs, loaded and warmed at start.

A mode names its head by file role (``head``; in a slimmable bundle one per width, ``head.c4``
...). Loading them all up front makes a mode switch cost nothing but choosing another engine.
"""

from __future__ import annotations

import time

import numpy as np

from ..bundle import Bundle, Mode
from ..engine.providers import OrtExecution, as_execution


class HeadRunner:
    """Preprocessing and the heads of one bundle (ONNX Runtime)."""

    def __init__(self, bundle: Bundle, threads: int | OrtExecution | None = None):
        from ..engine import create_engine

        execution = as_execution(threads)  # providers, threads: the agent's execution settings
        self.bundle = bundle
        self.heads: dict = {}  # file role -> engine
        x0 = np.zeros((1, *bundle.input_spec["shape"]), np.float32)
        for role in dict.fromkeys(["head", *bundle.head_roles]):
            self.heads[role] = create_engine(bundle.file(role), backend="ort", execution=execution)
            # One run now: ORT's first run allocates and plans, which must not land on the first
            # frame after a switch to this width.
            self.heads[role].run1(x0)

    def preprocess(self, data: bytes) -> np.ndarray:
        """Encoded image -> model input ``[1,C,H,W]`` float32 (what the heads and the full model take)."""
        return preprocess_image(data, self.bundle)

    def engine(self, mode: Mode):
        """The head engine that ``mode`` runs."""
        return self.heads[mode.head]

    def run(self, mode: Mode, x: np.ndarray) -> tuple[np.ndarray, float]:
        """The mode's head on one preprocessed frame: its output ``[C,h,w]`` and the run time in ms."""
        t = time.perf_counter()
        z = self.heads[mode.head].run1(x)[0]
        return z, (time.perf_counter() - t) * 1e3


def preprocess_image(data: bytes, bundle: Bundle) -> np.ndarray:
    """Encoded image -> the bundle's model input ``[1,C,H,W]`` float32."""
    from ..data.transforms import preprocess

    return preprocess(data, bundle.input_spec)[None]
