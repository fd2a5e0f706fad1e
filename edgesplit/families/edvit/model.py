"""ED-ViT's modules: a class-wise pruned ViT sub-model, the fusion head, and the ensemble of both.

Pruning is structured and exact for what it removes inside a block: a sub-model keeps, per block,
a subset of the teacher's attention heads (their rows of ``q``/``k``/``v`` and columns of ``proj``)
and of its MLP neurons (rows of ``fc1``, columns of ``fc2``), and a subset of the residual-stream
channels everywhere (the stem's projection, class token, position embedding, every LayerNorm and
every layer reading or writing the stream). Dropping heads or neurons gives exactly the teacher
with those parts zeroed; dropping stream channels also changes what the LayerNorms average over,
so that part is approximate until fine-tuning (tests/test_edvit_family.py checks both).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ...builder.zoo.vit import VisionTransformer, ViTConfig, per_block


@dataclass
class Keep:
    """What a sub-model keeps of the teacher: residual channels, and per block heads and neurons
    (indices into the teacher's, sorted)."""

    channels: list[int]
    heads: list[list[int]]
    neurons: list[list[int]]

    def to_dict(self) -> dict:
        return {"channels": self.channels, "heads": self.heads, "neurons": self.neurons}


def pruned_config(cfg: ViTConfig, keep: Keep) -> ViTConfig:
    return replace(
        cfg,
        dim=len(keep.channels),
        heads=[len(h) for h in keep.heads],
        mlp_hidden=[len(n) for n in keep.neurons],
        qk_dim=per_block(cfg.qk_dim, cfg.depth, "qk_dim"),
        v_dim=per_block(cfg.v_dim, cfg.depth, "v_dim"),
        extra={},
    )


def _rows(idx: list[int], width: int) -> torch.Tensor:
    """The rows of a per-head weight: head h owns rows h*width .. (h+1)*width - 1."""
    return torch.tensor([h * width + j for h in idx for j in range(width)], dtype=torch.long)


@torch.no_grad()
def prune_vit(teacher: VisionTransformer, keep: Keep, classes: list[int]) -> VisionTransformer:
    """A smaller ViT holding the kept parts of ``teacher``'s weights, with ``len(classes) + 1``
    outputs: the teacher's classifier rows for ``classes``, then "other" (the mean of the rest)."""
    cfg = teacher.cfg
    sub = VisionTransformer(pruned_config(cfg, keep), num_classes=len(classes) + 1)
    ch = torch.tensor(keep.channels, dtype=torch.long)
    src, dst = teacher.state_dict(), sub.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name, w in src.items():
        if name.startswith("patch_embed.") and not name.startswith("patch_embed.proj."):
            out[name] = w  # the conv stem's inner layers are shared, only its projection is pruned
    out["patch_embed.proj.weight"] = src["patch_embed.proj.weight"][ch]
    out["patch_embed.proj.bias"] = src["patch_embed.proj.bias"][ch]
    out["cls_token"], out["pos_embed"] = src["cls_token"][..., ch], src["pos_embed"][..., ch]
    qk = per_block(cfg.qk_dim, cfg.depth, "qk_dim")
    vd = per_block(cfg.v_dim, cfg.depth, "v_dim")
    for b in range(cfg.depth):
        p = f"blocks.{b}."
        hq, hv = _rows(keep.heads[b], qk[b]), _rows(keep.heads[b], vd[b])
        nn_ = torch.tensor(keep.neurons[b], dtype=torch.long)
        for norm in ("norm1", "norm2"):
            out[p + norm + ".weight"], out[p + norm + ".bias"] = (
                src[p + norm + ".weight"][ch],
                src[p + norm + ".bias"][ch],
            )
        for lin, rows in (("q", hq), ("k", hq), ("v", hv)):
            out[f"{p}attn.{lin}.weight"] = src[f"{p}attn.{lin}.weight"][rows][:, ch]
            out[f"{p}attn.{lin}.bias"] = src[f"{p}attn.{lin}.bias"][rows]
        out[p + "attn.proj.weight"] = src[p + "attn.proj.weight"][ch][:, hv]
        out[p + "attn.proj.bias"] = src[p + "attn.proj.bias"][ch]
        out[p + "mlp.fc1.weight"] = src[p + "mlp.fc1.weight"][nn_][:, ch]
        out[p + "mlp.fc1.bias"] = src[p + "mlp.fc1.bias"][nn_]
        out[p + "mlp.fc2.weight"] = src[p + "mlp.fc2.weight"][ch][:, nn_]
        out[p + "mlp.fc2.bias"] = src[p + "mlp.fc2.bias"][ch]
    out["norm.weight"], out["norm.bias"] = src["norm.weight"][ch], src["norm.bias"][ch]
    head_w, head_b = src["head.weight"][:, ch], src["head.bias"]
    rest = [c for c in range(head_w.shape[0]) if c not in set(classes)]
    out["head.weight"] = torch.cat([head_w[classes], head_w[rest].mean(0, keepdim=True)])
    out["head.bias"] = torch.cat([head_b[classes], head_b[rest].mean(0, keepdim=True)])
    missing = set(dst) - set(out)
    if missing:
        raise RuntimeError(f"prune_vit: no pruned weights for {sorted(missing)}")
    sub.load_state_dict(out)
    return sub


class SubModel(nn.Module):
    """One sub-model: image -> (features [B, D], logits [B, |classes| + 1]); features are the
    final-normed class token, what the fusion head reads."""

    def __init__(self, vit: VisionTransformer):
        super().__init__()
        self.vit = vit

    @property
    def dim(self) -> int:
        return self.vit.cfg.dim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.vit.embed(x)
        for blk in self.vit.blocks:
            t = blk(t)
        f = self.vit.norm(t)[:, 0]
        return f, self.vit.head(f)


class Fusion(nn.Module):
    """The fusion MLP: (features of every sub-model concatenated, zeros where one is missing;
    the presence mask) -> logits of every class."""

    def __init__(self, dims: list[int], num_classes: int, hidden: int):
        super().__init__()
        self.dims = list(dims)
        self.mlp = nn.Sequential(
            nn.LayerNorm(sum(dims) + len(dims)),
            nn.Linear(sum(dims) + len(dims), hidden),
            nn.GELU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([features, mask], dim=1))


def mask_features(feats: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Concatenate per-sub-model features, zeroing the parts whose mask is 0."""
    return torch.cat([f * mask[:, i : i + 1] for i, f in enumerate(feats)], dim=1)


class EdvitEnsemble(nn.Module):
    """Every sub-model and the fusion head: ``forward(x, mask=None)`` -> fused logits."""

    def __init__(self, submodels: list[SubModel], fusion: Fusion, partition: list[list[int]]):
        super().__init__()
        self.submodels = nn.ModuleList(submodels)
        self.fusion = fusion
        self.partition = partition

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [s(x)[0] for s in self.submodels]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        feats = self.features(x)
        if mask is None:
            mask = torch.ones(x.shape[0], len(feats), device=x.device)
        return self.fusion(mask_features(feats, mask), mask)


def first_keep(cfg: ViTConfig, width: dict) -> Keep:
    """The first ``width`` channels/heads/neurons: the untrained shape of a budget size."""
    return Keep(
        list(range(width["dim"])),
        [list(range(h)) for h in width["heads"]],
        [list(range(m)) for m in width["mlp_hidden"]],
    )


def ensemble_from_state(state: dict) -> EdvitEnsemble:
    """Rebuild a trained ensemble from ``student.pt``'s ``config`` and weights."""
    cfg = state["config"]
    subs = []
    for sc in cfg["submodels"]:
        vc = dict(sc["vit"])
        vc["stem_widths"] = tuple(vc["stem_widths"])
        subs.append(SubModel(VisionTransformer(ViTConfig(**vc), num_classes=len(sc["classes"]) + 1)))
    fusion = Fusion([s.dim for s in subs], len(state["classes"]), cfg["fusion_hidden"])
    model = EdvitEnsemble(subs, fusion, [sc["classes"] for sc in cfg["submodels"]])
    model.load_state_dict(state["model"])
    return model.eval()


def build_model(recipe) -> EdvitEnsemble:
    """The recipe's ensemble before training: sub-models at the budget's size, classes split into
    contiguous groups (the trained partition comes from data, see partition.py)."""
    from ...builder.zoo import create_model
    from ...data.sources import CLASSES
    from .partition import contiguous_partition
    from .sizing import size_for_budget

    nc = len(CLASSES[recipe.dataset])
    teacher = create_model(recipe.teacher.arch, nc)
    size = size_for_budget(teacher.cfg, recipe.split, nc)
    parts = contiguous_partition(nc, recipe.split.submodels)
    subs = [SubModel(prune_vit(teacher, first_keep(teacher.cfg, size.width), part)) for part in parts]
    return EdvitEnsemble(subs, Fusion([s.dim for s in subs], nc, recipe.split.fusion_hidden), parts)


def load_student(path: str | Path, device: str | torch.device = "cpu") -> tuple[EdvitEnsemble, dict]:
    state = torch.load(str(path), map_location=device, weights_only=True)
    if state.get("family") != "edvit":
        raise ValueError(f"{path}: not an ED-ViT student (family {state.get('family')!r})")
    return ensemble_from_state(state).to(device), state
