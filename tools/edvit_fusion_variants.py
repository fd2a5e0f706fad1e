"""ED-ViT fusion-head variants on a finished run's frozen sub-models (docs/BENCHMARKS.md, "ED-ViT
fusion head"): the recipe's old head (features of the un-augmented training images, drop 0.5, 256
hidden) against fewer drops, mirror views and a wider head, each trained by the family's own
``train_fusion`` on one thread and measured on the whole test split; plus a training-free product
of the sub-models' own experts for reference. Features are cached in /tmp/edx. One JSON line per
variant.

    OMP_NUM_THREADS=1 python tools/edvit_fusion_variants.py runs/cifar10-edvit-n2-cpu
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edgesplit.builder.data import MEAN, STD, DeviceLoader, load_split
from edgesplit.builder.zoo import create_model
from edgesplit.families.edvit.model import Fusion, load_student, mask_features
from edgesplit.families.edvit.train import train_fusion

# name, drop_prob, hidden units, with mirror views
VARIANTS = [
    ("recipe-before", 0.5, 256, False),
    ("drop0.25", 0.25, 256, False),
    ("mirror", 0.5, 256, True),
    ("mirror-drop0.3", 0.3, 256, True),
    ("mirror-h512", 0.5, 512, True),
]
CACHE = Path("/tmp/edx")


def features(run: Path, ens) -> dict:
    """Sub-model features and logits, teacher logits, labels: train (+ mirrors) and test."""
    CACHE.mkdir(exist_ok=True)
    path = CACHE / f"{run.name}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    teacher = create_model("vit_tiny_cifar", 10)
    teacher.load_state_dict(torch.load(run / "teacher.pt", weights_only=True))
    teacher.eval()
    out = {}
    for split, views in (("train", (False, True)), ("test", (False,))):
        x, y = load_split("cifar10", split, 32, Path("runs/cache"))
        fs, ls, ts = [], [], []
        with torch.no_grad():
            for mirror in views:
                for xb, _ in DeviceLoader(x, y, 250, torch.device("cpu"), MEAN, STD):
                    xb = xb.flip(3) if mirror else xb
                    o = [s(xb) for s in ens.submodels]
                    fs.append(torch.cat([a[0] for a in o], 1))
                    ls.append(torch.cat([a[1] for a in o], 1))
                    ts.append(teacher(xb))
        labels = torch.as_tensor(np.concatenate([y] * len(views))).long()
        out[split] = {"f": torch.cat(fs), "l": torch.cat(ls), "t": torch.cat(ts), "y": labels}
    torch.save(out, path)
    return out


def product_of_experts(logits: torch.Tensor, mask: torch.Tensor, groups: list[list[int]], nc: int) -> torch.Tensor:
    """Each class scored by its sub-model's log-probability plus every other sub-model's "other"."""
    off, score = 0, torch.zeros(len(logits), nc)
    for i, g in enumerate(groups):
        lp = F.log_softmax(logits[:, off : off + len(g) + 1], 1)
        off += len(g) + 1
        s = lp[:, -1:].expand(-1, nc).clone()
        s[:, g] = lp[:, : len(g)]
        score += s * mask[:, i : i + 1]
    return score


def main(run: Path) -> None:
    torch.set_num_threads(1)
    ens, state = load_student(run / "student.pt")
    ens.eval()
    d = features(run, ens)
    groups, dims, nc = ens.partition, [s.dim for s in ens.submodels], 10
    te, n = d["test"], len(ens.partition)
    ones = torch.ones(len(te["y"]), n)
    masks = {"fused": ones} | {f"missing_{i}": ones.clone().index_fill_(1, torch.tensor([i]), 0.0) for i in range(n)}

    def acc(scores: torch.Tensor) -> float:
        return float((scores.argmax(1) == te["y"]).float().mean())

    print(
        json.dumps(
            {
                "variant": "product-of-experts",
                **{k: acc(product_of_experts(te["l"], m, groups, nc)) for k, m in masks.items()},
            }
        )
    )
    parts = list(te["f"].split(dims, 1))
    for name, drop, hidden, mirror in VARIANTS:
        tr = d["train"]
        k = len(tr["y"]) if mirror else len(tr["y"]) // 2  # the first half: un-mirrored images
        torch.manual_seed(0)
        fusion = Fusion(dims, nc, hidden)
        out_dir = CACHE / f"{run.name}-{name}"
        out_dir.mkdir(exist_ok=True)
        for f in out_dir.glob("*"):
            f.unlink()
        t0 = time.time()
        cfg = dict(state["recipe"]["stage2"])
        train_fusion(
            fusion, tr["f"][:k], tr["t"][:k], tr["y"][:k], cfg, drop, torch.device("cpu"), out_dir, lambda e: None, 0
        )
        fusion.eval()
        with torch.no_grad():
            res = {key: acc(fusion(mask_features(parts, m), m)) for key, m in masks.items()}
        print(
            json.dumps(
                {
                    "variant": name,
                    "drop_prob": drop,
                    "hidden": hidden,
                    "mirror": mirror,
                    **res,
                    "sec": round(time.time() - t0),
                }
            )
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
