"""Vision Transformers (ViT, Dosovitskiy et al. 2021; DeiT sizes, Touvron et al. 2021), written
from the papers' description, with the zoo's stage API.

Stages: ``stem`` (patch embedding + class token + position embedding: image -> tokens
``(B, 1 + P, dim)``), ``block0`` .. ``block{depth-1}`` (pre-norm transformer blocks, tokens ->
tokens of the same shape, so every block boundary is a single-tensor cut point), ``classifier``
(final LayerNorm, the class token, the linear classifier). The names match the CNNs' first and last
stage so that tools which treat ``stem``/``classifier`` specially work unchanged.

Patch embedding, two kinds:

* ``linear``: the paper's ``patch x patch`` non-overlapping patches, each projected linearly
  (a ``Conv2d`` with kernel = stride = patch, the same map written as one operator). DeiT-tiny and
  DeiT-small at 224 px use it with patch 16 (196 tokens).
* ``conv``: a small convolutional stem (Xiao et al. 2021, "Early convolutions help transformers
  see better": a stack of stride-2 3x3 convolutions with BatchNorm + ReLU, then a 1x1 projection
  to ``dim``), here two stride-2 convolutions, i.e. the token grid of patch 4. The CIFAR model
  uses it: on 50 000 32-px images and a short schedule, the convolutions supply the locality
  prior a plain ViT must otherwise learn from data, which that paper shows makes optimisation
  faster and more stable and lifts accuracy at equal compute; it costs a few percent of the MACs.

Pruning (structured, per head and per neuron): attention keeps ``q``, ``k`` and ``v`` as three
separate ``nn.Linear`` layers. Head ``h`` owns rows ``h*qk_dim:(h+1)*qk_dim`` of ``q`` and ``k``,
rows ``h*v_dim:(h+1)*v_dim`` of ``v`` and the matching input columns of ``proj``; ``qk_dim`` and
``v_dim`` are separate per-head widths, so the query/key width can be cut independently of the
value width. An MLP neuron ``j`` is row ``j`` of ``fc1`` and column ``j`` of ``fc2``. Every block
takes its own head count, widths and MLP width (``heads``, ``qk_dim``, ``v_dim`` and
``mlp_hidden`` accept one value or one per block), so a pruned model is just a smaller config.

Attention is written as MatMul -> scale -> Softmax -> MatMul, so the ONNX exporter emits plain
``MatMul``/``Softmax`` nodes that any ONNX Runtime build runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .staged import StagedModel

PerBlock = int | Sequence[int]


def per_block(value: PerBlock, depth: int, name: str) -> list[int]:
    if isinstance(value, int):
        return [value] * depth
    values = [int(v) for v in value]
    if len(values) != depth:
        raise ValueError(f"{name}: {len(values)} values given for {depth} blocks")
    return values


@dataclass
class ViTConfig:
    img_size: int = 224
    patch: int = 16  # linear stem: patch side; conv stem: the product of its strides (4)
    stem: str = "linear"  # "linear" | "conv"
    stem_widths: tuple[int, ...] = (32, 64)  # conv stem: one stride-2 3x3 conv per width
    dim: int = 192
    depth: int = 12
    heads: PerBlock = 3
    qk_dim: PerBlock = 64  # per head
    v_dim: PerBlock = 64  # per head
    mlp_hidden: PerBlock = 768
    dropout: float = 0.0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qk_dim: int, v_dim: int):
        super().__init__()
        self.heads, self.qk_dim, self.v_dim = heads, qk_dim, v_dim
        self.scale = qk_dim**-0.5
        self.q = nn.Linear(dim, heads * qk_dim)
        self.k = nn.Linear(dim, heads * qk_dim)
        self.v = nn.Linear(dim, heads * v_dim)
        self.proj = nn.Linear(heads * v_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # unflatten/flatten instead of reshape(b, n, ...): no batch size is read from the tensor, so
        # the traced graph carries no size value across blocks and every block boundary stays a
        # single-tensor cut point for the generic splitter.
        q = self.q(x).unflatten(-1, (self.heads, self.qk_dim)).transpose(1, 2)  # B,H,N,dqk
        k = self.k(x).unflatten(-1, (self.heads, self.qk_dim)).transpose(1, 2)
        v = self.v(x).unflatten(-1, (self.heads, self.v_dim)).transpose(1, 2)  # B,H,N,dv
        attn = torch.softmax((q * self.scale) @ k.transpose(-2, -1), dim=-1)
        out = (attn @ v).transpose(1, 2).flatten(2)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, heads: int, qk_dim: int, v_dim: int, mlp_hidden: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, qk_dim, v_dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_hidden, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class LinearPatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class ConvStem(nn.Module):
    def __init__(self, widths: Sequence[int], dim: int):
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            c = w
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Conv2d(c, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.convs(x))


class VisionTransformer(StagedModel):
    def __init__(self, cfg: ViTConfig, num_classes: int = 1000):
        super().__init__()
        self.cfg = cfg
        if cfg.stem == "linear":
            self.patch_embed: nn.Module = LinearPatchEmbed(cfg.patch, cfg.dim)
            stride = cfg.patch
        elif cfg.stem == "conv":
            self.patch_embed = ConvStem(cfg.stem_widths, cfg.dim)
            stride = 2 ** len(cfg.stem_widths)
        else:
            raise ValueError(f"stem: unknown kind '{cfg.stem}' (known: conv, linear)")
        if cfg.img_size % stride:
            raise ValueError(f"img_size {cfg.img_size} is not a multiple of the patch stride {stride}")
        self.grid = cfg.img_size // stride
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid**2, cfg.dim))
        heads = per_block(cfg.heads, cfg.depth, "heads")
        qk = per_block(cfg.qk_dim, cfg.depth, "qk_dim")
        v = per_block(cfg.v_dim, cfg.depth, "v_dim")
        hidden = per_block(cfg.mlp_hidden, cfg.depth, "mlp_hidden")
        self.blocks = nn.ModuleList(
            Block(cfg.dim, heads[i], qk[i], v[i], hidden[i], cfg.dropout) for i in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.head = nn.Linear(cfg.dim, num_classes)
        self.stage_names = ("stem", *(f"block{i}" for i in range(cfg.depth)), "classifier")
        self._block_index = {f"block{i}": i for i in range(cfg.depth)}
        self._init_weights()

    def _init_weights(self) -> None:
        # DeiT's initialisation: truncated normal (std 0.02) for tokens and linear weights.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # B, P, dim
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1) + self.pos_embed

    def run_stage(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if name == "stem":
            return self.embed(x)
        if name == "classifier":
            return self.head(self.norm(x)[:, 0])
        if name in self._block_index:
            return self.blocks[self._block_index[name]](x)
        raise KeyError(f"unknown stage '{name}' (known: {', '.join(self.stage_names)})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])


# The registered sizes. DeiT-tiny/small: the DeiT paper's table 1 (dim 192/384, 3/6 heads of 64,
# depth 12, MLP ratio 4, patch 16 at 224 px).
VIT_CONFIGS: dict[str, ViTConfig] = {
    "deit_tiny_patch16_224": ViTConfig(224, 16, "linear", dim=192, depth=12, heads=3, mlp_hidden=768),
    "deit_small_patch16_224": ViTConfig(224, 16, "linear", dim=384, depth=12, heads=6, mlp_hidden=1536),
    # CPU-trainable CIFAR ViT: conv stem to an 8x8 token grid (64 tokens + class token).
    "vit_tiny_cifar": ViTConfig(
        32, 4, "conv", stem_widths=(32, 64), dim=128, depth=6, heads=4, qk_dim=32, v_dim=32, mlp_hidden=256
    ),
    # GPU-sized CIFAR ViT: ViT-Lite-7/4's width and depth (Hassani et al. 2021: dim 256, 7 blocks,
    # 4 heads, MLP 512) with the conv stem; see models/recipes/cifar10-vit-gpu.yaml.
    "vit_small_cifar": ViTConfig(
        32, 4, "conv", stem_widths=(64, 128), dim=256, depth=7, heads=4, qk_dim=64, v_dim=64, mlp_hidden=512
    ),
}


def vit(name: str, num_classes: int) -> VisionTransformer:
    return VisionTransformer(VIT_CONFIGS[name], num_classes)
