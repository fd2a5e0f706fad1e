"""Shared fixtures: a small real bundle (torch-exported ONNX head/tail) and real CIFAR-10 JPEGs."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

from edgesplit.bundle import Bundle, write_manifest

DATA = Path(os.environ.get("EDGESPLIT_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
CIFAR_TEST = DATA / "cifar10-jpeg" / "test-00000.tar.gz"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def build_tiny_bundle(root: Path) -> Bundle:
    """Export a small randomly initialised conv split (3x32x32 -> wire 8x8x8 -> 10 logits) into
    ``root`` and return the loaded bundle. The one place that builds the test bundle: it can be
    replaced by the project's real export (edgesplit.builder.export) without changing its callers."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    head = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 8, 3, stride=2, padding=1),
        nn.ReLU(),  # bottleneck: 8x8x8, non-negative
    ).eval()
    tail = nn.Sequential(
        nn.Conv2d(8, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    ).eval()
    full = nn.Sequential(head, tail).eval()

    root.mkdir(parents=True, exist_ok=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter announces its retirement
        z = head(x)
        for name, module, inp, in_name, out_name in (
            ("head.onnx", head, x, "image", "z"),
            ("tail.onnx", tail, z, "z", "logits"),
            ("full.onnx", full, x, "image", "logits"),
        ):
            torch.onnx.export(
                module,
                (inp,),
                str(root / name),
                dynamo=False,
                opset_version=17,
                input_names=[in_name],
                output_names=[out_name],
                dynamic_axes={in_name: {0: "batch"}, out_name: {0: "batch"}},
            )
        # Quantization range from real activations: [0, max] over a few random inputs.
        zmax = float(head(torch.randn(64, 3, 32, 32)).max())
    scale = max(zmax, 1e-3) / 255.0
    manifest = {
        "name": "tiny-test",
        "family": "bottlefit",
        "classes": list(CIFAR10_CLASSES),
        "input": {"shape": [3, 32, 32], "resize": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        "wire": {"name": "z", "shape": [8, 8, 8], "dtype": "float32"},
        "modes": [
            {
                "id": 0,
                "name": "c8-b8",
                "channels": 8,
                "bits": 8,
                "quant": {"scale": scale, "zero_point": 0},
                "bytes_per_frame": 512,
                "accuracy": None,
                "head_ms": {},
            },
        ],
        "files": {"head": {"path": "head.onnx"}, "tail": {"path": "tail.onnx"}, "full": {"path": "full.onnx"}},
    }
    write_manifest(root, manifest)
    return Bundle.load(root)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Bundle:
    return build_tiny_bundle(tmp_path_factory.mktemp("tiny-bundle"))


@pytest.fixture(scope="session")
def cifar_samples():
    """The first 32 real CIFAR-10 test JPEGs (Sample objects with labels)."""
    from edgesplit.data.sources import iter_tar_shards, take

    if not CIFAR_TEST.is_file():
        pytest.fail(f"shared CIFAR-10 data not found at {CIFAR_TEST} (set EDGESPLIT_DATA)")
    return list(take(iter_tar_shards([CIFAR_TEST]), 32))
