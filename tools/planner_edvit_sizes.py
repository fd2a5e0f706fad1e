"""ED-ViT bundles at the edvit family's sub-model sizes, untrained, for ``edgesplit plan --devices``.

The teacher is the zoo's ``vit_tiny_cifar``; each sub-model keeps 5/16 of its residual channels,
heads and MLP neurons (``edgesplit.families.edvit.sizing.widths_at``, the CPU recipes' keep ratio),
with random weights: the planner needs the graphs' work (timed here with ONNX Runtime, FLOPs and
bytes from the graph), not their accuracy. Classes are split into contiguous blocks (the partition
does not change the cost). full.onnx is the unpruned teacher.

    python tools/planner_edvit_sizes.py OUT_DIR   # writes OUT_DIR/edvit-n{2,3,4}
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from edvit_fixtures import _entry, _export, partition  # noqa: E402

from edgesplit.builder.export_common import input_spec_for  # noqa: E402
from edgesplit.builder.zoo.vit import VIT_CONFIGS, VisionTransformer  # noqa: E402
from edgesplit.data.sources import CLASSES  # noqa: E402
from edgesplit.families.edvit.model import Fusion, SubModel  # noqa: E402
from edgesplit.families.edvit.sizing import sized_config, vit_cost, widths_at  # noqa: E402

KEEP = 5 / 16
FUSION_HIDDEN = 256  # the CPU recipes' fusion_hidden


def build(out: Path, n: int) -> Path:
    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    teacher = VIT_CONFIGS["vit_tiny_cifar"]
    cfg = sized_config(teacher, widths_at(teacher, KEEP))
    classes = CLASSES["cifar10"]
    x = torch.randn(2, 3, 32, 32)
    files, subs = {}, []
    for sid, cls in enumerate(partition(len(classes), n)):
        path = out / f"submodel_{sid}.onnx"
        _export(SubModel(VisionTransformer(cfg, len(cls) + 1)), (x,), path, ["input"], ["features", "logits"])
        files[f"submodel.{sid}"] = _entry(path)
        cost = vit_cost(cfg, len(cls) + 1)
        subs.append(
            {
                "id": sid,
                "role": f"submodel.{sid}",
                "classes": cls,
                "features": {"name": "features", "dim": cfg.dim},
                "logits": {"name": "logits", "dim": len(cls) + 1},
                "params": cost.params,
                "macs": cost.macs,
                "memory_mb": cost.memory_mb,
                "config": cfg.to_dict(),
            }
        )
    fusion = out / "fusion.onnx"
    _export(
        Fusion([cfg.dim] * n, len(classes), FUSION_HIDDEN),
        (torch.randn(2, n * cfg.dim), torch.ones(2, n)),
        fusion,
        ["features", "mask"],
        ["logits"],
    )
    files["fusion"] = _entry(fusion)
    full = out / "full.onnx"
    _export(VisionTransformer(teacher, len(classes)), (x,), full, ["input"], ["logits"])
    files["full"] = _entry(full)
    manifest = {
        "schema_version": 1,
        "family": "edvit",
        "name": f"untrained-vit-tiny-cifar-edvit-n{n}-keep5of16",
        "classes": classes,
        "input": input_spec_for(32),
        "modes": [
            {"id": 0, "name": "f32", "features_dtype": "float32", "bytes_per_frame": 4 * n * cfg.dim, "accuracy": None}
        ],
        "default_mode": 0,
        "files": files,
        "edvit": {
            "submodels": subs,
            "fusion": {"role": "fusion", "features": "features", "mask": "mask", "output": "logits"},
            "partition": {"method": "contiguous", "seed": 0},
            "accuracy": {"full": None, "fused": None, "missing_one": {}, "missing_mean": None},
        },
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return out


if __name__ == "__main__":
    dest = Path(sys.argv[1])
    for n in (2, 3, 4):
        print(build(dest / f"edvit-n{n}", n))
