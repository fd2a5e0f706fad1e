"""A small but real ED-ViT bundle (docs/BUNDLE.md section 7.1) for the runtime's tests.

Tiny ViTs from the zoo's ``vit_tiny_cifar`` configuration (narrowed so they export in seconds), one
per class subset, each exported to ONNX with the project's export settings (dynamo, opset 18,
dynamic batch axis) with its two outputs ``features`` and ``logits``; a fusion MLP over the
concatenated features and the presence mask; and the unpartitioned ViT as ``full``. The weights are
random (seeded): the runtime's tests compare the runtime against running the same graphs locally,
which needs real graphs, not trained ones; accuracy figures come from the edvit family's bundles.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from edgesplit.builder.export_common import input_spec_for
from edgesplit.builder.zoo.vit import VIT_CONFIGS, VisionTransformer
from edgesplit.bundle import sha256_file
from edgesplit.data.sources import CLASSES
from edgesplit.families.edvit.export import export_graph

SIDE = 32
TINY = dataclasses.replace(
    VIT_CONFIGS["vit_tiny_cifar"], stem_widths=(8, 16), dim=32, depth=1, heads=2, qk_dim=16, v_dim=16, mlp_hidden=64
)


class SubModelNet(nn.Module):
    """A class-subset ViT: the class token after the final norm is the features, then its head."""

    def __init__(self, n_logits: int):
        super().__init__()
        self.vit = VisionTransformer(TINY, n_logits)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.vit.embed(x)
        for blk in self.vit.blocks:
            t = blk(t)
        f = self.vit.norm(t)[:, 0]
        return f, self.vit.head(f)


class FusionNet(nn.Module):
    """MLP over [masked features, mask] -> logits of every class."""

    def __init__(self, total_dim: int, n: int, k: int, hidden: int = 48):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(total_dim + n, hidden), nn.ReLU(), nn.Linear(hidden, k))

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([features, mask], dim=1))


def partition(n_classes: int, n: int) -> list[list[int]]:
    """Contiguous class blocks, as even as possible."""
    bounds = [round(i * n_classes / n) for i in range(n + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(n)]


def _entry(path: Path) -> dict:
    return {"path": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size}


def build_edvit_bundle(out: Path, n: int = 2, seed: int = 0, with_full: bool = True) -> Path:
    """Write an ED-ViT bundle of ``n`` sub-models over CIFAR-10's classes to ``out``."""
    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    classes = CLASSES["cifar10"]
    x = torch.randn(2, 3, SIDE, SIDE)
    files: dict[str, dict] = {}
    subs = []
    for sid, cls in enumerate(partition(len(classes), n)):
        path = out / f"submodel_{sid}.onnx"
        export_graph(SubModelNet(len(cls) + 1), (x,), path, ["input"], ["features", "logits"])
        files[f"submodel.{sid}"] = _entry(path)
        subs.append(
            {
                "id": sid,
                "role": f"submodel.{sid}",
                "classes": cls,
                "features": {"name": "features", "dim": TINY.dim},
                "logits": {"name": "logits", "dim": len(cls) + 1},
                "params": 0,
                "macs": 0,
                "memory_mb": 1.0,
                "config": TINY.to_dict(),
            }
        )
    fusion = out / "fusion.onnx"
    export_graph(
        FusionNet(n * TINY.dim, n, len(classes)),
        (torch.randn(2, n * TINY.dim), torch.ones(2, n)),
        fusion,
        ["features", "mask"],
        ["logits"],
    )
    files["fusion"] = _entry(fusion)
    if with_full:
        full = out / "full.onnx"
        export_graph(VisionTransformer(TINY, len(classes)), (x,), full, ["input"], ["logits"])
        files["full"] = _entry(full)
    manifest = {
        "schema_version": 1,
        "family": "edvit",
        "name": f"test-edvit-n{n}-s{seed}",
        "classes": classes,
        "input": input_spec_for(SIDE),
        "modes": [
            {"id": 0, "name": "f32", "features_dtype": "float32", "bytes_per_frame": 4 * n * TINY.dim, "accuracy": None}
        ],
        "default_mode": 0,
        "files": files,
        "edvit": {
            "submodels": subs,
            "fusion": {"role": "fusion", "features": "features", "mask": "mask", "output": "logits"},
            "partition": {"method": "contiguous", "seed": seed},
            "accuracy": {"full": None, "fused": None, "missing_one": {}, "missing_mean": None},
        },
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return out


def renamed_copy(src: Path, dst: Path, name: str) -> Path:
    """The same graphs under another manifest (another bundle hash): "the wrong bundle"."""
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    m["name"] = name
    (dst / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
    return dst


class Workers:
    """`edgesplit worker` subprocesses on free loopback ports."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def start(self, bundle_dir: Path, submodels: str | None = None, *extra: str) -> tuple[subprocess.Popen, str]:
        cmd = [sys.executable, "-m", "edgesplit", "worker", "--bundle", str(bundle_dir), "--bind", "tcp://127.0.0.1:0"]
        if submodels:
            cmd += ["--submodels", submodels]
        p = subprocess.Popen([*cmd, *extra], stdout=subprocess.PIPE, text=True)
        self.procs.append(p)
        line = json.loads(p.stdout.readline())
        assert line["event"] == "listening"
        return p, line["endpoint"]

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
