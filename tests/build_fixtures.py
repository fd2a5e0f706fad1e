"""A real, very short build: the CIFAR-10 ResNet-20 CPU recipe run end to end on a tiny slice of the
real shards (every stage forced to one epoch), then exported to a real bundle.

Test modules that need a trained split or a real exported bundle import the fixtures from here::

    from build_fixtures import one_torch_thread, short_build  # noqa: F401  (pytest finds fixtures by name)

The build runs once per test session (``scope="session"``) whichever modules use it, and costs
about half a minute on two busy CPU cores. It needs the shared data (``edgesplit.data.sources.
data_root()``); without it the dependent tests fail, naming the folder they looked in
(``require_cifar``): the data is part of the install, not optional hardware.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CPU_RECIPE = ROOT / "models" / "recipes" / "cifar10-resnet20-bottlefit-cpu.yaml"
LIMIT_PER_SHARD = 40  # 5 train shards x 40 = 200 training images, 40 test images
CHECK_FRAMES = 32  # real images export uses to check ONNX against torch


@contextmanager
def torch_threads(n: int):
    """Run torch with ``n`` intra-op threads, then restore. On two cores already busy with a
    background training job, two spinning OpenMP threads make small convolutions up to 100x
    slower than one thread does, so the tests' own torch work runs single-threaded."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Autouse in every test module that imports it: that module's torch work uses one thread."""
    with torch_threads(1):
        yield


def require_cifar() -> Path:
    """The shared CIFAR-10 shard folder, or fail the calling test with the reason (as conftest does)."""
    from edgesplit.data.sources import data_root

    d = data_root() / "cifar10-jpeg"
    if not (d / "test-00000.tar.gz").is_file():
        pytest.fail(f"shared CIFAR-10 shards not found under {data_root()} (set EDGESPLIT_DATA)")
    return d


def short_recipe():
    """The CPU recipe with every training stage forced to a single epoch."""
    from edgesplit.builder.recipe import load_recipe

    r = load_recipe(CPU_RECIPE)
    for c in (r.stage1, r.stage2, r.teacher.train):
        if c is not None:
            c.epochs = 1
            c.eval_every = 1
    return r


@dataclass
class ShortBuild:
    recipe: object  # edgesplit.builder.recipe.Recipe
    run_dir: Path
    results: dict
    build_sec: float  # wall time of the first run_recipe call
    bundle_dir: Path
    bundle: object  # edgesplit.bundle.Bundle
    export_sec: float

    @property
    def student_path(self) -> Path:
        return self.run_dir / "student.pt"

    def results_file(self) -> dict:
        return json.loads((self.run_dir / "results.json").read_text())


def build_short(base: Path) -> ShortBuild:
    from edgesplit.builder.export import export_bundle
    from edgesplit.builder.pipeline import run_recipe

    require_cifar()
    r = short_recipe()
    run_dir = base / "run"
    with torch_threads(1):
        t0 = time.perf_counter()
        results = run_recipe(r, run_dir, device="cpu", limit_per_shard=LIMIT_PER_SHARD, workers=1)
        build_sec = time.perf_counter() - t0
        t0 = time.perf_counter()
        bundle = export_bundle(run_dir / "student.pt", base / "bundle", check_frames=CHECK_FRAMES)
        export_sec = time.perf_counter() - t0
    return ShortBuild(r, run_dir, results, build_sec, base / "bundle", bundle, export_sec)


_BUILDS: dict[Path, ShortBuild] = {}


@pytest.fixture(scope="session")
def short_build(tmp_path_factory) -> ShortBuild:
    """One tiny real pipeline + export per test session, shared by every module that imports it.

    Each importing module registers its own copy of this fixture, and pytest caches a session
    fixture per registration, so the build itself is memoised here, per session base directory."""
    key = tmp_path_factory.getbasetemp()
    if key not in _BUILDS:
        _BUILDS[key] = build_short(tmp_path_factory.mktemp("short-build"))
    return _BUILDS[key]
