"""The slimmable recipe's ``split`` section (torch-free: the recipe loader reads it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..bottlefit.config import check_train_bits
from ..registry import SplitSection


@dataclass(kw_only=True)
class SlimmableSplitCfg(SplitSection):
    """``split:`` of a slimmable recipe: the bottleneck, and the widths that can be sent."""

    split_at: str  # name of the last stage that the encoder/decoder replaces
    bottleneck_channels: int  # the widest width; equals widths[-1]
    # the channel counts that can be sent, ascending, the last = bottleneck_channels
    widths: list[int] = field(default_factory=list)
    encoder_widths: list[int] = field(default_factory=lambda: [32, 64])
    encoder_strides: list[int] = field(default_factory=lambda: [1, 2])
    bottleneck_stride: int = 2
    decoder_widths: list[int] = field(default_factory=lambda: [64, 64])
    train_bits: int = 8
    sandwich_random: int = 1  # random middle widths each sandwich-rule step adds to the widest and narrowest

    def check_recipe(self, recipe: Any) -> None:
        w = self.widths
        if not w or w != sorted(set(w)) or w[0] < 1 or w[-1] != self.bottleneck_channels:
            raise ValueError(
                f"split.widths: must be distinct ascending channel counts ending at bottleneck_channels "
                f"({self.bottleneck_channels}), got {w}"
            )
        if self.sandwich_random < 0:
            raise ValueError(f"split.sandwich_random: must be 0 or more, got {self.sandwich_random}")
        check_train_bits(self.train_bits)
        if recipe.stage3 is not None:
            raise ValueError("stage3: not used by the slimmable family (every width trains at split.train_bits)")
