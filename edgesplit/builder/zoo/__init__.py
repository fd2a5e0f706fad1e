"""The model zoo: every architecture edgesplit can split, by name.

Every model exposes ``stage_names`` and ``run_stage(name, x)``: running the stages in order is the
forward pass, and a split point is a stage name. ``create_model`` raises on an unknown name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .mobilenetv2 import MobileNetV2
from .resnet import ResNet
from .resnet_cifar import CifarResNet
from .timm_keys import is_timm_vit, load_timm_state_dict
from .vit import VIT_CONFIGS, vit


def _cifar_resnet(depth: int) -> Callable[..., nn.Module]:
    return lambda num_classes=10: CifarResNet(depth, num_classes)


def _vit(name: str) -> Callable[..., nn.Module]:
    default_classes = 10 if name.endswith("_cifar") else 1000
    return lambda num_classes=default_classes: vit(name, num_classes)


MODELS: dict[str, Callable[..., nn.Module]] = {
    **{f"resnet{d}_cifar": _cifar_resnet(d) for d in (20, 32, 44, 56, 110)},
    "resnet18": lambda num_classes=1000: ResNet((2, 2, 2, 2), num_classes),
    # Narrow ResNet-18s (32..256 / 24..192 channels): 1/4 and 1/7 of the weights, so shipped bundles stay small.
    "resnet18_w32": lambda num_classes=1000: ResNet((2, 2, 2, 2), num_classes, width=32),
    "resnet18_w24": lambda num_classes=1000: ResNet((2, 2, 2, 2), num_classes, width=24),
    "mobilenetv2": lambda num_classes=1000: MobileNetV2(num_classes),
    # Vision Transformers (vit.py): DeiT-tiny/small at 224 px, a conv-stem ViT for 32-px CIFAR.
    **{name: _vit(name) for name in VIT_CONFIGS},
}
# Input side each model family is built for (used by tests and by recipes' defaults).
INPUT_SIZE = {name: (32 if name.endswith("_cifar") else 224) for name in MODELS}


def create_model(name: str, num_classes: int) -> nn.Module:
    try:
        factory = MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model '{name}' (known: {', '.join(sorted(MODELS))})") from None
    return factory(num_classes=num_classes)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load weights safely (``weights_only=True``), unwrap ``{'state_dict': ...}`` (and DeiT's
    ``{'model': ...}``) and strip the ``module.`` prefix that DataParallel checkpoints carry."""
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in obj.items()}


def load_pretrained(name: str, path: str | Path, num_classes: int) -> nn.Module:
    """Create ``name`` and load ``path`` with strict key checking; a mismatch is an error listing keys.
    A ViT state dict with timm's names goes through the key map (:mod:`.timm_keys`)."""
    model = create_model(name, num_classes)
    sd = load_state_dict_file(path)
    if is_timm_vit(sd):
        load_timm_state_dict(model, sd, str(path))
        return model
    # Checkpoints older than torch 0.4.1 carry no BatchNorm ``num_batches_tracked`` counters: they
    # are bookkeeping, not weights, so fill them in and keep the load strict for everything else.
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in sd:
            sd[key] = torch.zeros_like(value)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path} does not match '{name}': {e}") from None
    return model
