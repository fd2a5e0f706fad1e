"""BottleFit on a ViT teacher: a token bottleneck.

The head is the ViT's own stages up to ``split_at`` (patch embedding, class and position tokens,
the first blocks), then a per-token projection ``dim -> bottleneck_channels`` (LayerNorm, the
``encoder_widths`` hidden layers with GELU, a linear layer), fake-quantized on the wire. The
decoder is a per-token MLP ``bottleneck_channels -> dim`` (``decoder_widths`` hidden layers)
restoring the token tensor the next block expects; the tail runs the ViT's remaining blocks and
classifier. The wire tensor is ``[c, N, 1]`` for ``N`` tokens (BUNDLE.md section 7).

``token_pool = k > 1`` averages each ``k x k`` square of the patch-token grid into one token
before the projection (the class token passes as it is): ``k^2`` times fewer bytes at equal
channels. The decoder then maps each wire token to its square's ``k^2`` tokens (one linear layer
to ``k^2 * dim`` channels, rearranged in pixel-shuffle order), so it must re-create detail that
pooling averaged away: the price is accuracy, which the recipe's modes measure.

The same two stages train it as on a CNN (``train.py``): stage 1 distils the head (the ViT stages
it runs, initialised from the teacher, and the projection) and the decoder, with the tail frozen,
to the teacher's tokens at the split and after every later block; stage 2 fine-tunes decoder and
tail by KD with the head frozen.
"""

from __future__ import annotations

import torch
from torch import nn

from ...builder.bottleneck import (
    FakeQuant,
    ViTHeadStages,
    pool_tokens,
    run_tail,
    split_tail,
    take_vit_head,
    tokens_to_wire,
    unpool_tokens,
    wire_to_tokens,
)
from ...builder.zoo import create_model


def token_mlp(cin: int, widths: list[int], cout: int) -> tuple[nn.Sequential, nn.Linear]:
    """Hidden layers (linear + GELU per width) and the output layer of a per-token MLP."""
    hidden: list[nn.Module] = []
    for w in widths:
        hidden += [nn.Linear(cin, w), nn.GELU()]
        cin = w
    return nn.Sequential(*hidden), nn.Linear(cin, cout)


class TokenEncoder(nn.Module):
    """Image -> wire tensor ``(B, c, N, 1)``: the ViT's head stages, optional pooling, projection."""

    def __init__(self, vit_head: ViTHeadStages, grid: int, dim: int, pool: int, widths: list[int], channels: int):
        super().__init__()
        self.vit = vit_head
        self.grid, self.pool = grid, pool
        self.norm = nn.LayerNorm(dim, eps=1e-6)  # the residual stream is not normalised; the wire range is
        self.hidden, self.proj = token_mlp(dim, widths, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.vit(x)
        if self.pool > 1:
            t = pool_tokens(t, self.grid, self.pool)
        return tokens_to_wire(self.proj(self.hidden(self.norm(t))))


class TokenDecoder(nn.Module):
    """Wire tensor ``(B, c, N, 1)`` -> the ViT's tokens ``(B, 1 + grid^2, dim)`` at the split."""

    def __init__(self, channels: int, widths: list[int], dim: int, grid: int, pool: int):
        super().__init__()
        self.grid, self.pool = grid, pool
        self.hidden, self.out = token_mlp(channels, widths, dim)
        # Pooled: each patch token on the wire stands for pool^2 tokens, produced by its own layer.
        self.patch_out = nn.Linear(self.out.in_features, dim * pool * pool) if pool > 1 else None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.hidden(wire_to_tokens(z))
        if self.patch_out is None:
            return self.out(h)
        patches = unpool_tokens(self.patch_out(h[:, 1:]), self.grid // self.pool, self.pool)
        return torch.cat([self.out(h[:, :1]), patches], 1)


class TokenBottleFitSplit(nn.Module):
    """The BottleFit split of a ViT: ``encoder`` (the device head), ``quant``, ``decoder`` and the
    backbone's remaining blocks and classifier (with the decoder, the server tail)."""

    def __init__(self, cfg, backbone: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        backbone = backbone if backbone is not None else create_model(cfg.arch, cfg.num_classes)
        vit_head, self.tail_stages, grid, dim = take_vit_head(backbone, cfg.split_at, cfg.arch)
        pool = cfg.token_pool
        if pool < 1 or grid % pool:
            raise ValueError(f"split.token_pool: {pool} does not divide the {grid}x{grid} token grid of {cfg.arch}")
        self.backbone = backbone
        self.split_shape = (1 + grid * grid, dim)
        self.wire_shape = (cfg.bottleneck_channels, 1 + (grid // pool) ** 2, 1)
        self.encoder = TokenEncoder(vit_head, grid, dim, pool, cfg.encoder_widths, cfg.bottleneck_channels)
        self.quant = FakeQuant(cfg.train_bits)
        self.decoder = TokenDecoder(cfg.bottleneck_channels, cfg.decoder_widths, dim, grid, pool)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode(self, z: torch.Tensor, return_features: bool = False):
        return run_tail(self.backbone, self.tail_stages, self.decoder(z), return_features)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        return self.decode(self.quant(self.encode(x)), return_features)

    def head_module(self) -> nn.Module:
        return self.encoder

    def tail_module(self) -> nn.Module:
        return split_tail(self)
