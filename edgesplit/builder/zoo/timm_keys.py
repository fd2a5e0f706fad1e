"""Load state dicts that use timm's ViT/DeiT parameter names into the zoo's ViT, strictly.

timm's names (``timm/models/vision_transformer.py``): ``cls_token``, ``pos_embed``,
``patch_embed.proj.{weight,bias}``, ``blocks.{i}.norm1``, ``blocks.{i}.attn.qkv`` (one fused
``(3 * dim, dim)`` projection, rows ordered q, k, v and, within each, head by head),
``blocks.{i}.attn.proj``, ``blocks.{i}.norm2``, ``blocks.{i}.mlp.fc1``, ``blocks.{i}.mlp.fc2``,
``norm``, ``head``. The zoo's ViT is the same network with the fused ``qkv`` kept as three
``q``/``k``/``v`` layers (so heads can be pruned one by one): the map renames everything else and
splits ``qkv`` in three. Only linear-patch models have timm counterparts (the conv stem has none).

Strict: a key missing from the file, a key the model has no place for (e.g. DeiT's distillation
token ``dist_token`` / ``head_dist``, or a LayerScale ``ls1.gamma``) or a shape that differs is an
error that lists the keys.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .vit import VisionTransformer

TIMM_MARKERS = ("cls_token", "pos_embed", "patch_embed.proj.weight")
_QKV = re.compile(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")


class TimmKeyError(ValueError):
    pass


def is_timm_vit(sd: dict) -> bool:
    """A timm-named ViT state dict has a fused ``qkv`` and the token parameters."""
    return all(k in sd for k in TIMM_MARKERS) and any(_QKV.match(k) for k in sd)


def timm_to_zoo(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename timm keys to the zoo's (splitting each ``qkv`` into ``q``, ``k``, ``v``); keys the
    zoo's ViT does not name pass through unchanged, so the strict load reports them."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        m = _QKV.match(key)
        if m is None:
            out[key] = value
            continue
        if value.shape[0] % 3:
            raise TimmKeyError(f"{key}: shape {tuple(value.shape)} is not three stacked q, k, v projections")
        q, k, v = value.chunk(3, dim=0)
        block, kind = m.groups()
        for name, part in (("q", q), ("k", k), ("v", v)):
            out[f"blocks.{block}.attn.{name}.{kind}"] = part
    return out


def zoo_to_timm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse: fuse ``q``, ``k``, ``v`` back into timm's ``qkv`` (needs equal q, k, v widths)."""
    out: dict[str, torch.Tensor] = {}
    pattern = re.compile(r"^blocks\.(\d+)\.attn\.([qkv])\.(weight|bias)$")
    for key, value in sd.items():
        m = pattern.match(key)
        if m is None:
            out[key] = value
        elif m.group(2) == "q":
            block, kind = m.group(1), m.group(3)
            parts = [sd[f"blocks.{block}.attn.{n}.{kind}"] for n in "qkv"]
            if len({p.shape for p in parts}) != 1:
                raise TimmKeyError(f"block {block}: q, k, v widths differ; timm's fused qkv cannot hold them")
            out[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)
    return out


def load_timm_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Load a timm-named state dict into a zoo ViT; every mismatch is listed in one error."""
    if not isinstance(model, VisionTransformer):
        raise TimmKeyError(f"{source}: timm ViT keys only load into the zoo's VisionTransformer")
    if model.cfg.stem != "linear":
        raise TimmKeyError(
            f"{source}: timm ViTs have a linear patch embedding; this model has a '{model.cfg.stem}' stem"
        )
    mapped = timm_to_zoo(sd)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(mapped))
    unexpected = sorted(set(mapped) - set(expected))
    shapes = sorted(
        f"{k}: file {tuple(mapped[k].shape)}, model {tuple(expected[k].shape)}"
        for k in set(mapped) & set(expected)
        if mapped[k].shape != expected[k].shape
    )
    problems = []
    if missing:
        problems.append(f"missing keys (timm names): {_timm_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {unexpected}")
    if shapes:
        problems.append(f"shape mismatches (zoo names): {shapes}")
    if problems:
        raise TimmKeyError(f"{source} does not match the model: " + "; ".join(problems))
    model.load_state_dict(mapped, strict=True)


def _timm_names(zoo_keys: list[str]) -> list[str]:
    """Report missing q/k/v parts under the timm name the file should have had."""
    names = []
    for k in zoo_keys:
        m = re.match(r"^blocks\.(\d+)\.attn\.[qkv]\.(weight|bias)$", k)
        names.append(f"blocks.{m.group(1)}.attn.qkv.{m.group(2)}" if m else k)
    return sorted(set(names))
