"""The ED-ViT recipe's ``split`` section (torch-free: the recipe loader reads it).

``stage1`` of the recipe fine-tunes each pruned sub-model (distillation from the teacher),
``stage2`` trains the fusion head with the sub-models frozen."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..registry import SplitSection

PARTITIONS = ("confusion", "contiguous")
MAX_SUBMODELS = 16


@dataclass
class BudgetCfg:
    """What one sub-model may cost on the sizing device: memory (weights + peak activations at
    batch 1) and latency (the planner's roofline on the device's profile). Either may be left out."""

    memory_mb: float | None = None
    latency_ms: float | None = None


@dataclass(kw_only=True)
class EdvitSplitCfg(SplitSection):
    """``split:`` of an ED-ViT recipe (on top of a ViT teacher)."""

    submodels: int  # N: the number of class subsets, one sub-model each
    device: str  # the device profile the sub-models are sized for (device_profiles/<device>.yaml)
    budget: BudgetCfg = field(default_factory=BudgetCfg)
    partition: str = "confusion"  # how classes are grouped (see partition.py)
    prune_embedding: bool = True  # prune residual-stream channels too, not only heads and MLP neurons
    importance_images: int = 256  # per subset: training images the Taylor importance is measured on
    fusion_hidden: int = 128
    drop_prob: float = 0.5  # per training sample: chance that random sub-models are dropped
    placement_devices: list[str] = field(default_factory=list)  # empty: N copies of ``device``

    def check_recipe(self, recipe: Any) -> None:
        from ...data.sources import CLASSES

        if not recipe.teacher.arch.startswith(("vit", "deit")):
            raise ValueError(f"teacher.arch: ED-ViT prunes a ViT, got '{recipe.teacher.arch}'")
        classes = len(CLASSES.get(recipe.dataset, ()))
        if not 2 <= self.submodels <= min(MAX_SUBMODELS, classes or MAX_SUBMODELS):
            raise ValueError(
                f"split.submodels: must be in [2, {min(MAX_SUBMODELS, classes or MAX_SUBMODELS)}] "
                f"(at most one sub-model per class), got {self.submodels}"
            )
        if self.partition not in PARTITIONS:
            raise ValueError(f"split.partition: must be one of {', '.join(PARTITIONS)}, got '{self.partition}'")
        if self.budget.memory_mb is None and self.budget.latency_ms is None:
            raise ValueError("split.budget: give memory_mb, latency_ms or both (what one sub-model may cost)")
        for key in ("memory_mb", "latency_ms"):
            v = getattr(self.budget, key)
            if v is not None and v <= 0:
                raise ValueError(f"split.budget.{key}: must be > 0, got {v}")
        if not 0.0 <= self.drop_prob < 1.0:
            raise ValueError(f"split.drop_prob: must be in [0, 1), got {self.drop_prob}")
        if self.importance_images < 1 or self.fusion_hidden < 1:
            raise ValueError("split.importance_images and split.fusion_hidden: must be >= 1")
