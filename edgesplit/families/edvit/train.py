"""ED-ViT's training pieces: the teacher's soft confusion, a sub-model's distillation to its subset
plus "other", features for the fusion head, the fusion head trained with random sub-models
dropped, and the accuracies (full, fused, each one missing)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...builder.bottleneck import kd_kl
from ...builder.data import MEAN, STD, DeviceLoader
from ...builder.train import EpochRunner
from .model import EdvitEnsemble, Fusion, SubModel, mask_features


@torch.no_grad()
def teacher_probs(teacher, x: np.ndarray, y: np.ndarray, dev, limit: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's softmax on up to ``limit`` training images (a seeded sample, un-augmented)."""
    idx = np.sort(np.random.default_rng(seed).permutation(len(x))[:limit])
    out = [F.softmax(teacher(xb).float(), 1).cpu() for xb, _ in DeviceLoader(x[idx], y[idx], 250, dev, MEAN, STD)]
    return torch.cat(out).numpy(), y[idx]


def subset_images(x: np.ndarray, y: np.ndarray, classes: list[int], limit: int, seed: int) -> np.ndarray:
    """Indices of up to ``limit`` training images of ``classes`` (seeded sample)."""
    idx = np.flatnonzero(np.isin(y, classes))
    return np.sort(np.random.default_rng(seed).permutation(idx)[:limit])


def subset_targets(logits: torch.Tensor, y: torch.Tensor, classes: list[int], temperature: float):
    """The teacher's distribution restricted to ``classes`` plus the pooled rest ("other"), at
    ``temperature``, and the hard label mapped the same way."""
    cls = torch.tensor(classes, device=logits.device)
    p = F.softmax(logits.float() / temperature, 1)
    inside = p[:, cls]
    soft = torch.cat([inside, (1 - inside.sum(1, keepdim=True)).clamp_min(0)], 1)
    return soft, subset_labels(y, classes, logits.shape[1])


def subset_labels(y: torch.Tensor, classes: list[int], num_classes: int) -> torch.Tensor:
    """A class's index within ``classes``, or ``len(classes)`` ("other") for the rest."""
    remap = torch.full((num_classes,), len(classes), dtype=torch.long, device=y.device)
    remap[torch.tensor(classes, device=y.device)] = torch.arange(len(classes), device=y.device)
    return remap[y]


def finetune_submodels(
    subs: list[SubModel], teacher, groups: list[list[int]], cfg: dict, loader, dev, run_dir: Path, log, name: str
):
    """Distil the teacher into every sub-model of ``subs`` (classes ``groups[i]``) on every training
    image: soft targets = the teacher's subset probabilities + pooled "other"; loss per sub-model =
    (1 - alpha) CE + alpha T^2 KL, summed. The sub-models share no parameter, so the sum trains each
    exactly as alone on the same batches; what they share is the teacher's forward pass, once per
    batch instead of once per sub-model (the larger part of a step: the teacher is several times
    each sub-model's size)."""
    T, alpha = float(cfg.get("temperature", 1.0)), float(cfg.get("alpha", 0.5))
    joint = nn.ModuleList(subs)
    runner = EpochRunner(name, joint, joint.parameters(), cfg, loader, dev, run_dir, log)

    def step_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t = teacher(x)
        total = torch.zeros((), device=x.device)
        for sub, classes in zip(subs, groups):
            soft, hard = subset_targets(t, y, classes, T)
            logits = sub(x)[1].float()
            kd = F.kl_div(F.log_softmax(logits / T, 1), soft, reduction="batchmean") * T * T
            total = total + (1 - alpha) * F.cross_entropy(logits, hard) + alpha * kd
        return total

    runner.run(step_loss, joint.train)


@torch.no_grad()
def features_of(
    ens: EdvitEnsemble, teacher, x: np.ndarray, y: np.ndarray, dev
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every sub-model's features (concatenated), the teacher's logits and the labels, for each
    training image and its mirror image. The sub-models were fine-tuned on these very images, so
    their features of them are cleaner than of any new frame; the mirror views (stage 1 trained
    with flips, so they are in-distribution) give the fusion head twice the variety to fit
    (docs/BENCHMARKS.md, "ED-ViT fusion head": on N = 2, +0.6 and +0.9 points with one sub-model
    missing)."""
    ens.eval()
    feats, logits = [], []
    for mirror in (False, True):
        for xb, _ in DeviceLoader(x, y, 250, dev, MEAN, STD):
            xb = xb.flip(3) if mirror else xb
            feats.append(torch.cat(ens.features(xb), 1).float())
            logits.append(teacher(xb).float())
    labels = torch.as_tensor(np.concatenate([y, y]), device=dev)
    return torch.cat(feats), torch.cat(logits), labels


def random_mask(n: int, batch: int, drop_prob: float, gen: torch.Generator) -> torch.Tensor:
    """Per sample: with probability ``drop_prob`` drop 1..N-1 sub-models chosen at random (never all)."""
    mask = torch.ones(batch, n)
    if n < 2:
        return mask
    drop = torch.rand(batch, generator=gen) < drop_prob
    counts = torch.randint(1, n, (batch,), generator=gen)
    order = torch.rand(batch, n, generator=gen).argsort(1)
    for i in torch.nonzero(drop).flatten().tolist():
        mask[i, order[i, : counts[i]]] = 0.0
    return mask


class _FeatureLoader:
    """Shuffled batches of (features ++ teacher logits, labels), precomputed: the sub-models are frozen."""

    def __init__(self, packed: torch.Tensor, y: torch.Tensor, batch: int, seed: int):
        self.packed, self.y, self.batch = packed, y, batch
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return max(1, len(self.y) // self.batch)

    def __iter__(self):
        order = torch.randperm(len(self.y), generator=self.gen)
        for i in range(len(self)):
            idx = order[i * self.batch : (i + 1) * self.batch]
            yield self.packed[idx], self.y[idx]


def train_fusion(fusion: Fusion, feats, t_logits, y, cfg: dict, drop_prob: float, dev, run_dir: Path, log, seed: int):
    """Fusion head on frozen features; each sample may lose random sub-models (zeros + mask 0)."""
    T, alpha = float(cfg.get("temperature", 1.0)), float(cfg.get("alpha", 0.5))
    n, width = len(fusion.dims), sum(fusion.dims)
    loader = _FeatureLoader(torch.cat([feats, t_logits], 1), torch.as_tensor(y), int(cfg["batch"]), seed)
    runner = EpochRunner("stage2_fusion", fusion, fusion.parameters(), cfg, loader, dev, run_dir, log)
    gen = torch.Generator().manual_seed(seed + 1)
    splits = np.cumsum([0, *fusion.dims])

    def step_loss(packed: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        f, t = packed[:, :width], packed[:, width:]
        mask = random_mask(n, len(yb), drop_prob, gen).to(f.device)
        parts = [f[:, splits[i] : splits[i + 1]] for i in range(n)]
        logits = fusion(mask_features(parts, mask), mask).float()
        return (1 - alpha) * F.cross_entropy(logits, yb) + alpha * kd_kl(logits, t, T)

    runner.run(step_loss, fusion.train)


@torch.no_grad()
def accuracies(ens: EdvitEnsemble, teacher, loader, dev) -> dict:
    """Full teacher, fused (all present), fused with each sub-model missing, and each sub-model's
    own accuracy on its subset + "other" task, on the eval loader."""
    ens.eval()
    n = len(ens.submodels)
    hits = {"full": 0, "fused": 0, **{f"missing_{i}": 0 for i in range(n)}, **{f"own_{i}": 0 for i in range(n)}}
    total = 0
    for x, y in loader:
        outs = [s(x) for s in ens.submodels]
        feats = [o[0] for o in outs]
        ones = torch.ones(len(y), n, device=x.device)
        hits["full"] += int((teacher(x).argmax(1) == y).sum())
        hits["fused"] += int((ens.fusion(mask_features(feats, ones), ones).argmax(1) == y).sum())
        for i in range(n):
            m = ones.clone()
            m[:, i] = 0
            hits[f"missing_{i}"] += int((ens.fusion(mask_features(feats, m), m).argmax(1) == y).sum())
            hard = subset_labels(y, ens.partition[i], ens.fusion.mlp[-1].out_features)
            hits[f"own_{i}"] += int((outs[i][1].argmax(1) == hard).sum())
        total += len(y)
    acc = {k: v / max(1, total) for k, v in hits.items()}
    missing = {str(i): acc[f"missing_{i}"] for i in range(n)}
    return {
        "full": acc["full"],
        "fused": acc["fused"],
        "missing_one": missing,
        "missing_mean": float(np.mean(list(missing.values()))),
        "submodel_own": [acc[f"own_{i}"] for i in range(n)],
        "frames": total,
    }


LogFn = Callable[[dict], None]
