"""The BottleFit recipe's ``split`` section (torch-free: the recipe loader reads it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..registry import SplitSection

WIRE_BITS = (2, 4, 6, 8)  # bit depths a recipe may train and ship modes at


@dataclass(kw_only=True)
class BottleneckSpec:
    """A bottleneck's architecture: the recipe's ``split`` section less ``family``."""

    split_at: str  # name of the last stage that the encoder/decoder replaces
    bottleneck_channels: int
    encoder_widths: list[int] = field(default_factory=lambda: [32, 64])
    encoder_strides: list[int] = field(default_factory=lambda: [1, 2])
    bottleneck_stride: int = 2
    decoder_widths: list[int] = field(default_factory=lambda: [64, 64])
    decoder_final_relu: bool = True
    train_bits: int = 8


def check_train_bits(bits: int) -> None:
    if bits not in WIRE_BITS:
        raise ValueError(f"split.train_bits: must be one of {', '.join(map(str, WIRE_BITS))} (got {bits})")


@dataclass(kw_only=True)
class BottleFitSplitCfg(BottleneckSpec, SplitSection):
    """``split:`` of a BottleFit recipe."""

    def check_recipe(self, recipe: Any) -> None:
        check_train_bits(self.train_bits)
