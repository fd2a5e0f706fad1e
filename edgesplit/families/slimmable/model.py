"""Slimmable bottlenecks (Assine et al. 2023; Slimmable Networks / US-Nets, Yu et al.): one
encoder whose transmitted channel count ``c`` is chosen at run time from ``widths``, and whose own
layers slim with it, so head compute falls with the bytes sent.

- **Encoder**: every conv keeps its full-width weight and uses its first ``ceil(w * c / C)``
  output channels at width ``c`` (C = the widest). BatchNorm is **private** per width
  (switchable BN): a slim layer's statistics differ from the wide one's, and sharing them is what
  breaks naively slimmed nets. The last conv emits exactly ``c`` channels: the wire tensor.
- **Wire**: a fake quantizer per width (their ranges differ), calibrated per (width, bits).
- **Decoder + tail**: one for every width, fed the ``c`` channels **zero-filled** to C, which is
  what the server does with a channel subset (``wire.codec.decode(full_channels=C)``). Its
  normalisations are per-channel affines with no batch statistics: a shared BatchNorm would mix
  the statistics of inputs with 3 and with 12 live channels and be right for none of them, while
  an affine is the same function in training and serving for every width. The backbone's stages
  after the split point keep the teacher's BatchNorm statistics (frozen), for the same reason.

Head ``i`` for export is :meth:`SlimmableSplit.head_module` at that width; the tail is shared.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...builder.bottleneck import BottleneckSplit, FakeQuant, load_split
from ...data.sources import CLASSES


@dataclass(kw_only=True)
class SlimmableConfig:
    """What :class:`SlimmableSplit` is built from (saved in student.pt)."""

    arch: str
    num_classes: int
    input_size: int
    split_at: str
    widths: list[int]  # channels sent, ascending; the last is the bottleneck's full width
    encoder_widths: list[int] = field(default_factory=lambda: [32, 64, 96])
    encoder_strides: list[int] = field(default_factory=lambda: [2, 2, 1])
    bottleneck_stride: int = 2
    decoder_widths: list[int] = field(default_factory=lambda: [64, 48])
    train_bits: int = 4

    def __post_init__(self):
        w = list(self.widths)
        if not w or any(not isinstance(c, int) or c < 1 for c in w) or w != sorted(set(w)):
            raise ValueError(f"widths must be distinct positive channel counts in ascending order, got {w}")
        if len(self.encoder_widths) != len(self.encoder_strides):
            raise ValueError("encoder_widths and encoder_strides must have the same length")

    @property
    def bottleneck_channels(self) -> int:
        return self.widths[-1]

    def layer_widths(self, c: int) -> list[int]:
        """The encoder's conv widths when ``c`` channels are sent (they scale with c / C)."""
        return [max(1, math.ceil(w * c / self.bottleneck_channels)) for w in self.encoder_widths]

    def to_dict(self) -> dict:
        return asdict(self)


class SlimConv2d(nn.Conv2d):
    """A conv that runs on the first ``cin`` input and first ``cout`` output channels of its weight."""

    def forward_slim(self, x: torch.Tensor, cout: int) -> torch.Tensor:
        cin = x.shape[1]
        b = None if self.bias is None else self.bias[:cout]
        return F.conv2d(x, self.weight[:cout, :cin], b, self.stride, self.padding)


class SwitchableBN(nn.Module):
    """One BatchNorm per width: private statistics and affine parameters."""

    def __init__(self, channels: list[int]):
        super().__init__()
        self.bns = nn.ModuleList(nn.BatchNorm2d(c) for c in channels)

    def forward(self, x: torch.Tensor, index: int) -> torch.Tensor:
        return self.bns[index](x)


class SlimmableEncoder(nn.Module):
    def __init__(self, cfg: SlimmableConfig):
        super().__init__()
        self.cfg = cfg
        per_width = [cfg.layer_widths(c) for c in cfg.widths]  # [width index][layer]
        self.convs = nn.ModuleList()
        self.bns = nn.ModuleList()
        cin = 3
        for j, (w, s) in enumerate(zip(cfg.encoder_widths, cfg.encoder_strides)):
            self.convs.append(SlimConv2d(cin, w, 3, s, 1, bias=False))
            self.bns.append(SwitchableBN([pw[j] for pw in per_width]))
            cin = w
        self.bottleneck = SlimConv2d(cin, cfg.bottleneck_channels, 3, cfg.bottleneck_stride, 1, bias=True)

    def forward(self, x: torch.Tensor, index: int) -> torch.Tensor:
        widths = self.cfg.layer_widths(self.cfg.widths[index])
        for conv, bn, w in zip(self.convs, self.bns, widths):
            x = F.relu(bn(conv.forward_slim(x, w), index), inplace=True)
        return self.bottleneck.forward_slim(x, self.cfg.widths[index])


class Affine2d(nn.Module):
    """Per-channel scale and shift: a BatchNorm without batch statistics (see the module docstring)."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def _affine_block(conv: nn.Module, cout: int, relu: bool = True) -> list[nn.Module]:
    return [conv, Affine2d(cout)] + ([nn.ReLU(inplace=True)] if relu else [])


class SlimmableSplit(BottleneckSplit):
    cfg: SlimmableConfig

    def __init__(self, cfg: SlimmableConfig, backbone: nn.Module | None = None):
        super().__init__(cfg, backbone)
        self.encoder = SlimmableEncoder(cfg)
        self.quant = nn.ModuleList(FakeQuant(cfg.train_bits) for _ in cfg.widths)
        n_up = self.upsampling_steps()
        dec, cin = [], cfg.bottleneck_channels
        for i, w in enumerate(cfg.decoder_widths):
            conv = nn.ConvTranspose2d(cin, w, 2, 2, bias=False) if i < n_up else nn.Conv2d(cin, w, 3, 1, 1, bias=False)
            dec += _affine_block(conv, w)
            cin = w
        for _ in range(len(cfg.decoder_widths), n_up):
            dec += _affine_block(nn.ConvTranspose2d(cin, cin, 2, 2, bias=False), cin)
        dec += _affine_block(nn.Conv2d(cin, self.split_shape[0], 3, 1, 1, bias=False), self.split_shape[0])
        self.decoder = nn.Sequential(*dec)

    @property
    def widths(self) -> list[int]:
        return list(self.cfg.widths)

    # -- the split (sc2bench-style: encode -> wire tensor -> decode) ----------------------------
    def encode(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Image -> the ``widths[index]`` channels that go on the wire."""
        return self.encoder(x, index)

    def zero_fill(self, z: torch.Tensor) -> torch.Tensor:
        """What the server does with a channel subset: zeros for the channels not sent."""
        return F.pad(z, (0, 0, 0, 0, 0, self.cfg.bottleneck_channels - z.shape[1]))

    def decode(self, z: torch.Tensor, return_features: bool = False):
        """Wire tensor (any width; narrower ones are zero-filled) -> logits."""
        if z.shape[1] != self.cfg.bottleneck_channels:
            z = self.zero_fill(z)
        return self.run_tail(self.decoder(z), return_features)

    def forward(self, x: torch.Tensor, index: int = -1, return_features: bool = False):
        index = index % len(self.cfg.widths)
        return self.decode(self.quant[index](self.encode(x, index)), return_features)

    def head_module(self, index: int) -> nn.Module:
        """The head at ``widths[index]`` as a plain conv stack holding only that width's slices of
        the weights: what a device runs and stores (no unused channels in the file)."""
        index = index % len(self.cfg.widths)
        enc, c = self.encoder, self.cfg.widths[index]
        layers, cin = [], 3
        for conv, sbn, w in zip(enc.convs, enc.bns, self.cfg.layer_widths(c)):
            layers += [_sliced_conv(conv, cin, w), _copy_bn(sbn.bns[index]), nn.ReLU(inplace=True)]
            cin = w
        layers.append(_sliced_conv(enc.bottleneck, cin, c))
        return nn.Sequential(*layers).eval()


def _sliced_conv(conv: SlimConv2d, cin: int, cout: int) -> nn.Conv2d:
    out = nn.Conv2d(cin, cout, conv.kernel_size, conv.stride, conv.padding, bias=conv.bias is not None)
    with torch.no_grad():
        out.weight.copy_(conv.weight[:cout, :cin])
        if conv.bias is not None:
            out.bias.copy_(conv.bias[:cout])
    return out


def _copy_bn(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    out = nn.BatchNorm2d(bn.num_features, eps=bn.eps)
    out.load_state_dict(bn.state_dict(), strict=True)
    return out


def head_macs(cfg: SlimmableConfig, index: int) -> int:
    """Multiply-accumulates of the head at ``widths[index]`` for one frame (convs only)."""
    side, cin, total = cfg.input_size, 3, 0
    c = cfg.widths[index]
    for w, s in zip(cfg.layer_widths(c) + [c], cfg.encoder_strides + [cfg.bottleneck_stride]):
        side = math.ceil(side / s)
        total += side * side * w * cin * 9
        cin = w
    return total


def student_config(r) -> SlimmableConfig:
    """The model config a recipe (``edgesplit.builder.recipe.Recipe``) describes."""
    s = r.split
    return SlimmableConfig(
        arch=r.teacher.arch,
        num_classes=len(CLASSES[r.dataset]),
        input_size=r.input_size,
        split_at=s.split_at,
        widths=list(s.widths),
        encoder_widths=list(s.encoder_widths),
        encoder_strides=list(s.encoder_strides),
        bottleneck_stride=s.bottleneck_stride,
        decoder_widths=list(s.decoder_widths),
        train_bits=s.train_bits,
    )


def build_model(r, backbone: nn.Module | None = None) -> SlimmableSplit:
    """The untrained split a recipe describes (on ``backbone``, else a fresh one)."""
    return SlimmableSplit(student_config(r), backbone)


def load_student(path: str | Path, device: str | torch.device = "cpu") -> tuple[SlimmableSplit, dict]:
    """Rebuild a trained slimmable split from ``student.pt`` (strict: every key must match)."""

    def build(state: dict) -> SlimmableSplit:
        if state.get("family") != "slimmable":
            raise ValueError(f"{path}: not a slimmable student (family {state.get('family', 'bottlefit')!r})")
        return SlimmableSplit(SlimmableConfig(**state["config"]))

    return load_split(path, device, build)
