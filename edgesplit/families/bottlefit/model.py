"""BottleFit (Matsubara et al. 2022): replace a CNN's early stages with an encoder that ends in a
narrow bottleneck and a decoder that restores the tensor the remaining stages expect.

``BottleFitSplit`` owns the encoder (the device head), a fake-quantizer on the wire tensor, the
decoder and the backbone's stages after the split point (together the server tail). The stages
before the split point are dropped from the backbone, so the checkpoint holds only what runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ...builder.bottleneck import BottleneckSplit, FakeQuant, conv_bn_relu, load_split
from ...data.sources import CLASSES
from .config import CNN_ONLY_KEYS, BottleneckSpec, is_vit_arch, resolve_spec
from .entropy import EntropyQuant
from .tokens import TokenBottleFitSplit


@dataclass(kw_only=True)
class BottleFitConfig(BottleneckSpec):
    """A spec bound to a backbone: what :class:`BottleFitSplit` is built from (saved in student.pt)."""

    arch: str
    num_classes: int
    input_size: int

    def to_dict(self) -> dict:
        d = asdict(self)
        # Each kind saves only the keys it uses (a CNN split's config stays what it was before token bottlenecks).
        for key in CNN_ONLY_KEYS if is_vit_arch(self.arch) else ("token_pool",):
            del d[key]
        if d["entropy_lambda"] is None:  # a uniform split's config stays what it was before issue 14
            del d["entropy_lambda"]
        return d


class BottleFitSplit(BottleneckSplit):
    cfg: BottleFitConfig

    def __init__(self, cfg: BottleFitConfig, backbone: nn.Module | None = None):
        super().__init__(cfg, backbone)
        layers, cin = [], 3
        for w, s in zip(cfg.encoder_widths, cfg.encoder_strides):
            layers.append(conv_bn_relu(cin, w, s))
            cin = w
        layers.append(nn.Conv2d(cin, cfg.bottleneck_channels, 3, cfg.bottleneck_stride, 1))
        self.encoder = nn.Sequential(*layers)
        self.quant: FakeQuant | EntropyQuant = (
            FakeQuant(cfg.train_bits) if cfg.entropy_lambda is None else EntropyQuant(cfg.bottleneck_channels)
        )

        n_up = self.upsampling_steps()
        dec, cin = [], cfg.bottleneck_channels
        for i, w in enumerate(cfg.decoder_widths):
            if i < n_up:  # learnable upsampling first, while the tensor is still small
                dec += [nn.ConvTranspose2d(cin, w, 2, 2, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            else:
                dec.append(conv_bn_relu(cin, w))
            cin = w
        for _ in range(len(cfg.decoder_widths), n_up):
            dec += [nn.ConvTranspose2d(cin, cin, 2, 2, bias=False), nn.BatchNorm2d(cin), nn.ReLU(inplace=True)]
        dec += [nn.Conv2d(cin, self.split_shape[0], 3, 1, 1, bias=False), nn.BatchNorm2d(self.split_shape[0])]
        if cfg.decoder_final_relu:
            dec.append(nn.ReLU(inplace=True))
        self.decoder = nn.Sequential(*dec)

    # -- the split ---------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode(self, z: torch.Tensor, return_features: bool = False):
        return self.run_tail(self.decoder(z), return_features)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        return self.decode(self.quant(self.encode(x)), return_features)

    def head_module(self) -> nn.Module:
        return _Head(self)


class _Head(nn.Module):
    def __init__(self, split: BottleFitSplit):
        super().__init__()
        self.encoder = split.encoder

    def forward(self, x):
        return self.encoder(x)


def student_config(r) -> BottleFitConfig:
    """The model config a recipe (``edgesplit.builder.recipe.Recipe``) describes."""
    spec = resolve_spec(r.split, r.teacher.arch)
    return BottleFitConfig(arch=r.teacher.arch, num_classes=len(CLASSES[r.dataset]), input_size=r.input_size, **spec)


def split_for(cfg: BottleFitConfig, backbone: nn.Module | None = None) -> BottleFitSplit | TokenBottleFitSplit:
    """A ViT's split is a token bottleneck (``tokens.py``), a CNN's the convolutional one."""
    return TokenBottleFitSplit(cfg, backbone) if is_vit_arch(cfg.arch) else BottleFitSplit(cfg, backbone)


def build_model(r, backbone: nn.Module | None = None) -> BottleFitSplit | TokenBottleFitSplit:
    """The untrained split a recipe describes (on ``backbone``, else a fresh one)."""
    return split_for(student_config(r), backbone)


def load_student(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[BottleFitSplit | TokenBottleFitSplit, dict]:
    """Rebuild a trained split from ``student.pt`` (config + weights + calibration)."""
    return load_split(path, device, lambda state: split_for(BottleFitConfig(**state["config"])))
