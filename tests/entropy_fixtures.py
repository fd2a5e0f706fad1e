"""The trained and exported entropy bundle that tests/test_entropy_serving.py serves, and what it
checks answers against: tests/recipes/tiny-bottlefit-entropy.yaml trained by ``edgesplit train`` on
a slice of the real CIFAR-10 shards and exported by ``edgesplit export``; frames coded and run here,
component by component, at a mode's step.

    from entropy_fixtures import FRAMES, STEPS, bundle, local_run, samples  # noqa: F401  (fixture by name)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from build_fixtures import require_cifar

from edgesplit.bundle import Bundle
from edgesplit.wire import ans_codec as A

RECIPE = Path(__file__).resolve().parent / "recipes" / "tiny-bottlefit-entropy.yaml"
LIMIT_PER_SHARD = 16  # 5 train shards x 16 = 80 training images, 16 test images
FRAMES = 16
STEPS = [1.0, 2.0]  # the recipe's split.entropy_steps


def edgesplit_cli(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "edgesplit", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Bundle:
    require_cifar()
    work = tmp_path_factory.mktemp("entropy")
    train = edgesplit_cli(
        ["train", str(RECIPE), "--device", "cpu", "--workers", "1", "--limit-per-shard", str(LIMIT_PER_SHARD)], work
    )
    assert train.returncode == 0, train.stderr[-3000:]
    export = edgesplit_cli(
        ["export", "runs/tiny-bottlefit-entropy/student.pt", "--out", "bundle", "--check-frames", str(FRAMES)], work
    )
    assert export.returncode == 0, export.stderr[-3000:]
    return Bundle.load(work / "bundle")


def samples(n: int = FRAMES):
    from edgesplit.data.sources import open_source, take

    return list(take(open_source("cifar10:test"), n))


def local_run(b: Bundle, frames, mode=None) -> tuple[np.ndarray, list[int]]:
    """What the server must answer in ``mode`` (default: the bundle's), computed here: head -> ans
    values at the mode's step -> coded frame -> decoded -> tail, each in its own real component;
    and each frame's coded size."""
    from edgesplit.data.transforms import preprocess
    from edgesplit.engine import create_engine

    m = b.default_mode if mode is None else mode
    tables = b.tables_for(m)
    head, tail = create_engine(b.file("head"), threads=1), create_engine(b.file("tail"), threads=1)
    logits, sizes = [], []
    for s in frames:
        z = head.run1(preprocess(s.data, b.input_spec)[None])[0]
        d, payload = A.encode(z, tables, scale=m.scale, name=b.wire_spec["name"])
        sizes.append(len(payload))
        logits.append(tail.run1(A.decode(d, payload, tables)[None])[0])
    return np.stack(logits), sizes
