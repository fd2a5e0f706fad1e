"""MobileNetV2-style network for 224x224 input (Sandler et al. 2018), written from the paper's table."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .staged import StagedModel


def conv_bn(cin: int, cout: int, k: int, stride: int, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else [conv_bn(cin, hidden, 1, 1)]
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden), conv_bn(hidden, cout, 1, 1, act=False)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y


# (expansion t, output channels c, repeats n, first stride s), grouped into named stages.
_STAGES = {
    "layer1": [(1, 16, 1, 1), (6, 24, 2, 2)],  # 112 -> 56
    "layer2": [(6, 32, 3, 2)],  # -> 28
    "layer3": [(6, 64, 4, 2), (6, 96, 3, 1)],  # -> 14
    "layer4": [(6, 160, 3, 2), (6, 320, 1, 1)],  # -> 7
}


class MobileNetV2(StagedModel):
    stage_names = ("stem", "layer1", "layer2", "layer3", "layer4", "classifier")

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0):
        super().__init__()
        ch = lambda c: max(8, int(round(c * width_mult / 8)) * 8)  # noqa: E731 - tiny local helper
        cin = ch(32)
        self.stem = conv_bn(3, cin, 3, 2)
        for name, cfg in _STAGES.items():
            blocks = []
            for t, c, n, s in cfg:
                for i in range(n):
                    blocks.append(InvertedResidual(cin, ch(c), s if i == 0 else 1, t))
                    cin = ch(c)
            setattr(self, name, nn.Sequential(*blocks))
        self.last = conv_bn(cin, 1280, 1, 1)
        self.fc = nn.Linear(1280, num_classes)
        self.dropout = nn.Dropout(0.2)

    def run_stage(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if name == "classifier":
            x = F.adaptive_avg_pool2d(self.last(x), 1)
            return self.fc(self.dropout(torch.flatten(x, 1)))
        return getattr(self, name)(x)
