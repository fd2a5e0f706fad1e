"""BottleFit (Matsubara et al. 2022): replace a CNN's early stages with an encoder that ends in a
narrow bottleneck and a decoder that restores the tensor the remaining stages expect.

``BottleFitSplit`` owns the encoder (the device head), a fake-quantizer on the wire tensor, the
decoder and the backbone's stages after the split point (together the server tail). The stages
before the split point are dropped from the backbone, so the checkpoint holds only what runs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..zoo import create_model


@dataclass(kw_only=True)
class BottleneckSpec:
    """A BottleFit bottleneck's architecture: the recipe's ``split`` section (less ``family``)."""

    split_at: str  # name of the last stage that the encoder/decoder replaces
    bottleneck_channels: int
    encoder_widths: list[int] = field(default_factory=lambda: [32, 64])
    encoder_strides: list[int] = field(default_factory=lambda: [1, 2])
    bottleneck_stride: int = 2
    decoder_widths: list[int] = field(default_factory=lambda: [64, 64])
    decoder_final_relu: bool = True
    train_bits: int = 8


@dataclass(kw_only=True)
class BottleFitConfig(BottleneckSpec):
    """A spec bound to a backbone: what :class:`BottleFitSplit` is built from (saved in student.pt)."""

    arch: str
    num_classes: int
    input_size: int

    def to_dict(self) -> dict:
        return asdict(self)


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class FakeQuant(nn.Module):
    """Per-tensor affine fake quantization with a straight-through gradient.

    During training it tracks the wire tensor's range (EMA of batch min/max) so that the range is
    known before calibration; ``set_params`` fixes the calibrated (scale, zero_point) used at eval.
    ``bits = 0`` disables it.
    """

    def __init__(self, bits: int = 8, momentum: float = 0.05):
        super().__init__()
        self.bits = bits
        self.momentum = momentum
        self.register_buffer("lo", torch.tensor(0.0))
        self.register_buffer("hi", torch.tensor(0.0))
        self.register_buffer("initialised", torch.tensor(False))
        self.fixed: tuple[float, int, int] | None = None  # (scale, zero_point, bits) at eval
        # Train with ``fixed`` too instead of the running min/max: the range then cannot grow with
        # the outliers that quantization-aware training itself produces (see train_slimmable).
        self.hold_range = False

    def observe(self, z: torch.Tensor) -> None:
        lo, hi = z.detach().min().float(), z.detach().max().float()
        if not bool(self.initialised):
            self.lo.copy_(lo), self.hi.copy_(hi), self.initialised.fill_(True)
        else:
            self.lo.lerp_(lo, self.momentum), self.hi.lerp_(hi, self.momentum)

    def set_params(self, scale: float, zero_point: int, bits: int) -> None:
        self.fixed = (scale, zero_point, bits)

    def forward(self, z_in: torch.Tensor) -> torch.Tensor:
        # float32 even under bf16 autocast: bf16 cannot hold the integers 0..255 exactly.
        z = z_in.float()
        if self.training and self.hold_range and self.fixed is not None and self.bits > 0:
            s, zpi, bits = self.fixed
            levels = 2**bits - 1
            scale, zp = torch.tensor(s, device=z.device), torch.tensor(float(zpi), device=z.device)
        elif self.training:
            self.observe(z)
            if self.bits <= 0:
                return z_in
            levels = 2**self.bits - 1
            scale = ((self.hi - self.lo) / levels).clamp_min(1e-8)
            zp = torch.round(-self.lo / scale)
        elif self.fixed is not None:
            s, zpi, bits = self.fixed
            levels = 2**bits - 1
            scale, zp = torch.tensor(s, device=z.device), torch.tensor(float(zpi), device=z.device)
        else:
            return z_in
        q = torch.clamp(torch.round(z / scale) + zp, 0, levels)
        zq = (q - zp) * scale
        return (z + (zq - z).detach()).to(z_in.dtype)  # straight-through estimator


class BottleFitSplit(nn.Module):
    def __init__(self, cfg: BottleFitConfig, backbone: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        backbone = backbone if backbone is not None else create_model(cfg.arch, cfg.num_classes)
        names = list(backbone.stage_names)
        if cfg.split_at not in names[:-1]:
            raise ValueError(f"split point '{cfg.split_at}' is not a stage of {cfg.arch} (stages: {names[:-1]})")
        self.tail_stages = names[names.index(cfg.split_at) + 1 :]
        # Shape the decoder must produce: the backbone's own output at the split point.
        with torch.no_grad():
            was = backbone.training
            backbone.eval()
            x = torch.zeros(1, 3, cfg.input_size, cfg.input_size)
            for s in names[: names.index(cfg.split_at) + 1]:
                x = backbone.run_stage(s, x)
            backbone.train(was)
        self.split_shape = tuple(x.shape[1:])
        self.backbone = backbone
        self._drop_head_stages(names[: names.index(cfg.split_at) + 1])

        layers, cin = [], 3
        for w, s in zip(cfg.encoder_widths, cfg.encoder_strides):
            layers.append(conv_bn_relu(cin, w, s))
            cin = w
        layers.append(nn.Conv2d(cin, cfg.bottleneck_channels, 3, cfg.bottleneck_stride, 1))
        self.encoder = nn.Sequential(*layers)
        self.quant = FakeQuant(cfg.train_bits)

        stride = math.prod(cfg.encoder_strides) * cfg.bottleneck_stride
        z_side = cfg.input_size // stride
        self.wire_shape = (cfg.bottleneck_channels, z_side, z_side)
        up = self.split_shape[-1] / z_side
        if up < 1 or up != int(up) or (int(up) & (int(up) - 1)):
            raise ValueError(f"decoder cannot map a {z_side}px bottleneck to the {self.split_shape[-1]}px split tensor")
        dec, cin = [], cfg.bottleneck_channels
        n_up = int(math.log2(up))
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

    def _drop_head_stages(self, head_stages: list[str]) -> None:
        # The encoder replaces these stages; keep the checkpoint small by removing their weights.
        for s in head_stages:
            if s == "stem":
                for attr in ("conv1", "bn1", "stem"):
                    if hasattr(self.backbone, attr):
                        setattr(self.backbone, attr, nn.Identity())
            else:
                setattr(self.backbone, s, nn.Identity())

    # -- the split ---------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode(self, z: torch.Tensor, return_features: bool = False):
        x = self.decoder(z)
        feats = [x]
        for s in self.tail_stages:
            x = self.backbone.run_stage(s, x)
            feats.append(x)
        return (x, feats[:-1]) if return_features else x

    def forward(self, x: torch.Tensor, return_features: bool = False):
        return self.decode(self.quant(self.encode(x)), return_features)

    def head_module(self) -> nn.Module:
        return _Head(self)

    def tail_module(self) -> nn.Module:
        return _Tail(self)


class _Head(nn.Module):
    def __init__(self, split: BottleFitSplit):
        super().__init__()
        self.encoder = split.encoder

    def forward(self, x):
        return self.encoder(x)


class _Tail(nn.Module):
    def __init__(self, split: BottleFitSplit):
        super().__init__()
        self.split = split

    def forward(self, z):
        return self.split.decode(z)


def teacher_features(teacher: nn.Module, x: torch.Tensor, split_at: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run the teacher, returning logits and its outputs at the split point and each later stage
    (excluding the classifier) — the targets of head-network distillation."""
    names = list(teacher.stage_names)
    start = names.index(split_at)
    feats = []
    for i, s in enumerate(names):
        x = teacher.run_stage(s, x)
        if start <= i < len(names) - 1:
            feats.append(x)
    return x, feats
