"""ResNet-18-style network for 224x224 input (He et al. 2016, ImageNet variant), from scratch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .staged import StagedModel


class Block(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(StagedModel):
    stage_names = ("stem", "layer1", "layer2", "layer3", "layer4", "classifier")

    def __init__(self, layers=(2, 2, 2, 2), num_classes: int = 1000, width: int = 64):
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(3, w, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.layer1 = self._stage(w, w, layers[0], 1)
        self.layer2 = self._stage(w, 2 * w, layers[1], 2)
        self.layer3 = self._stage(2 * w, 4 * w, layers[2], 2)
        self.layer4 = self._stage(4 * w, 8 * w, layers[3], 2)
        self.fc = nn.Linear(8 * w, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():  # zero-init the last BN of each block: a known stabiliser
            if isinstance(m, Block):
                nn.init.zeros_(m.bn2.weight)

    @staticmethod
    def _stage(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        return nn.Sequential(Block(in_planes, planes, stride), *[Block(planes, planes) for _ in range(n - 1)])

    def run_stage(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if name == "stem":
            return F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        if name == "classifier":
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        return getattr(self, name)(x)
