"""The zoo's uniform model API: a forward pass is its named stages run in order."""

from __future__ import annotations

import torch
from torch import nn


class StagedModel(nn.Module):
    """Subclasses define ``stage_names`` and ``run_stage(name, x)``; a split point is a stage name,
    and head-network distillation reads stage outputs without touching ``forward``."""

    stage_names: tuple[str, ...] = ()

    def run_stage(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, name)(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for s in self.stage_names:
            x = self.run_stage(s, x)
        return x
