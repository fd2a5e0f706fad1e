"""The BottleFit recipe's ``split`` section (torch-free: the recipe loader reads it).

On a CNN teacher the split is a convolutional encoder/decoder (``encoder_strides`` and
``bottleneck_stride`` give the wire tensor's side). On a ViT teacher it is a token bottleneck
(``tokens.py``): the ViT's own stages up to ``split_at``, then a per-token projection to
``bottleneck_channels``; there are no strides, and ``token_pool`` optionally pools the patch-token
grid before the projection. The keys that only one kind takes are refused on the other."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..registry import SplitSection

WIRE_BITS = (2, 4, 6, 8)  # bit depths a recipe may train and ship modes at
TOKEN_POOLS = (1, 2, 4)  # token bottleneck: side of the patch-token squares pooled into one token
# CNN encoder keys and their values when a recipe leaves them out (the recipe schema keeps them
# None so that a ViT recipe which sets one can be told it has no meaning there).
CNN_DEFAULTS: dict[str, Any] = {
    "encoder_widths": [32, 64],
    "encoder_strides": [1, 2],
    "bottleneck_stride": 2,
    "decoder_widths": [64, 64],
    "decoder_final_relu": True,
}
CNN_ONLY_KEYS = ("encoder_strides", "bottleneck_stride", "decoder_final_relu")
_VIT_SPLIT = re.compile(r"^(stem|block\d+)$")
# Issue 14: quantization steps of an entropy bottleneck's ans modes (docs/BUNDLE.md §7.2). 1.0 is
# the step the model trained at; the bounds keep every step's tables inside the coder's alphabet.
ENTROPY_STEP_RANGE = (0.25, 16.0)
MAX_ENTROPY_STEPS = 16


def is_vit_arch(arch: str) -> bool:
    """Whether a zoo architecture name is a Vision Transformer (``edgesplit/builder/zoo/vit.py``)."""
    return arch.startswith(("vit", "deit"))


@dataclass(kw_only=True)
class BottleneckSpec:
    """A bottleneck's architecture: the recipe's ``split`` section less ``family``.

    CNN: ``encoder_widths``/``encoder_strides`` are 3x3 conv layers, ``decoder_widths`` the
    decoder's. ViT (token bottleneck): ``encoder_widths`` and ``decoder_widths`` are the hidden
    widths of the per-token MLPs (empty: one linear layer), ``token_pool`` the pooling of the
    patch-token grid; the strides and ``decoder_final_relu`` are not used."""

    split_at: str  # name of the last stage that the encoder/decoder replaces (ViT: that the head runs)
    bottleneck_channels: int
    encoder_widths: list[int] = field(default_factory=lambda: [32, 64])
    encoder_strides: list[int] = field(default_factory=lambda: [1, 2])
    bottleneck_stride: int = 2
    decoder_widths: list[int] = field(default_factory=lambda: [64, 64])
    decoder_final_relu: bool = True
    train_bits: int = 8
    token_pool: int = 1
    # Issue 14: a learned entropy bottleneck (``entropy.py``) instead of the uniform quantizer, its
    # rate weighted by this many loss units per bit per frame. None: the uniform quantizer.
    entropy_lambda: float | None = None


def check_train_bits(bits: int) -> None:
    if bits not in WIRE_BITS:
        raise ValueError(f"split.train_bits: must be one of {', '.join(map(str, WIRE_BITS))} (got {bits})")


@dataclass(kw_only=True)
class BottleFitSplitCfg(SplitSection):
    """``split:`` of a BottleFit recipe (the keys of :class:`BottleneckSpec`; None: the default for
    the teacher's kind, see :func:`resolve_spec`)."""

    split_at: str
    bottleneck_channels: int
    encoder_widths: list[int] | None = None
    encoder_strides: list[int] | None = None
    bottleneck_stride: int | None = None
    decoder_widths: list[int] | None = None
    decoder_final_relu: bool | None = None
    train_bits: int = 8
    token_pool: int | None = None
    entropy_lambda: float | None = None
    # One ans mode per quantization step, each with its own tables cut from the one learned density
    # (None: [1.0], the model's own step). Only with entropy_lambda.
    entropy_steps: list[float] | None = None

    def check_recipe(self, recipe: Any) -> None:
        check_train_bits(self.train_bits)
        if self.entropy_steps is not None:
            if self.entropy_lambda is None:
                raise ValueError("split.entropy_steps: only an entropy bottleneck (split.entropy_lambda) has steps")
            check_entropy_steps(self.entropy_steps, "split.entropy_steps")
        if self.entropy_lambda is not None:
            lam = self.entropy_lambda
            if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 < lam < 1e3:
                raise ValueError(f"split.entropy_lambda: a number of loss units per bit in (0, 1000) (got {lam!r})")
            if is_vit_arch(recipe.teacher.arch):
                raise ValueError("split.entropy_lambda: the entropy bottleneck is built for CNN splits only so far")
        if self.bottleneck_channels < 1:
            raise ValueError(f"split.bottleneck_channels: must be >= 1 (got {self.bottleneck_channels})")
        if not is_vit_arch(recipe.teacher.arch):
            if self.token_pool not in (None, 1):
                raise ValueError(
                    f"split.token_pool: only a ViT teacher's token bottleneck pools tokens "
                    f"(teacher.arch is '{recipe.teacher.arch}')"
                )
            return
        for key in CNN_ONLY_KEYS:
            if getattr(self, key) is not None:
                raise ValueError(
                    f"split.{key}: a CNN encoder key; the token bottleneck of a ViT teacher "
                    f"('{recipe.teacher.arch}') has no strides or final ReLU: leave it out"
                )
        if not _VIT_SPLIT.match(self.split_at):
            raise ValueError(f"split.split_at: a ViT splits after 'stem' or 'block<i>', got '{self.split_at}'")
        if self.token_pool is not None and self.token_pool not in TOKEN_POOLS:
            raise ValueError(
                f"split.token_pool: must be one of {', '.join(map(str, TOKEN_POOLS))} (got {self.token_pool})"
            )
        for key in ("encoder_widths", "decoder_widths"):
            widths = getattr(self, key)
            if widths is not None and any(w < 1 for w in widths):
                raise ValueError(f"split.{key}: widths must be >= 1 (got {widths})")


def check_entropy_steps(steps: Any, where: str) -> list[float]:
    """The steps of an entropy bottleneck's ans modes, sorted: 1 to 16 distinct numbers in
    [0.25, 16], multiples of 0.001 (their table-set names, ``s<step>``, then differ), 1.0 among
    them (the step the model trained at, the bundle's default mode). Raises ValueError."""
    lo, hi = ENTROPY_STEP_RANGE
    ok = isinstance(steps, (list, tuple)) and 1 <= len(steps) <= MAX_ENTROPY_STEPS
    ok = ok and all(not isinstance(s, bool) and isinstance(s, (int, float)) and lo <= s <= hi for s in steps)
    if not ok:
        raise ValueError(f"{where}: 1 to {MAX_ENTROPY_STEPS} numbers in [{lo:g}, {hi:g}] (got {steps!r})")
    out = sorted(float(s) for s in steps)
    if any(round(s, 3) != s for s in out) or len(set(out)) != len(out) or 1.0 not in out:
        raise ValueError(f"{where}: distinct multiples of 0.001, 1.0 among them (got {steps!r})")
    return out


def resolve_spec(split: BottleFitSplitCfg, arch: str) -> dict[str, Any]:
    """The :class:`BottleneckSpec` keys of a recipe's ``split``, defaults filled for the teacher's
    kind: a CNN gets :data:`CNN_DEFAULTS`; a ViT gets one-layer token projections, no pooling."""
    spec = {
        "split_at": split.split_at,
        "bottleneck_channels": split.bottleneck_channels,
        "train_bits": split.train_bits,
        "token_pool": split.token_pool or 1,
        "entropy_lambda": None if split.entropy_lambda is None else float(split.entropy_lambda),
    }
    defaults = dict(CNN_DEFAULTS)
    if is_vit_arch(arch):
        defaults.update(encoder_widths=[], decoder_widths=[])
    for key, default in defaults.items():
        value = getattr(split, key)
        spec[key] = default if value is None else value
    return spec
