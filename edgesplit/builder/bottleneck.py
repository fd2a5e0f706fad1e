"""What every bottleneck split shares: the split's skeleton (:class:`BottleneckSplit`: the backbone
cut at a stage, the wire tensor's shape, the tail), the wire tensor's fake quantizer, the teacher's
features (the targets of head-network distillation), the distillation loss, the wire values that
calibration reads, and ``student.pt`` (the split started on the teacher's weights, written, loaded). Used by the BottleFit and slimmable families.

Token bottlenecks (ViT teachers): :func:`take_vit_head` moves a ViT's stages up to the split off
the backbone into a module of their own (the device's head runs them), and the token sequence
``(B, N, c)`` travels as the wire tensor ``[c, N, 1]`` (:func:`tokens_to_wire`): channels first, as
for a CNN, one token per row, the class token first (BUNDLE.md section 7)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.sources import CLASSES
from .zoo import create_model
from .zoo.vit import VisionTransformer

SplitT = TypeVar("SplitT", bound=nn.Module)


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class FakeQuant(nn.Module):
    """Per-tensor affine fake quantization with a straight-through gradient.

    During training it tracks the wire tensor's range (EMA of batch min/max) so that the range is
    known before calibration; ``set_params`` fixes the calibrated (scale, zero_point) used at eval.
    ``bits = 0`` disables it.
    """

    def __init__(self, bits: int = 8, momentum: float = 0.05):
        super().__init__()
        self.bits = bits
        self.momentum = momentum
        self.register_buffer("lo", torch.tensor(0.0))
        self.register_buffer("hi", torch.tensor(0.0))
        self.register_buffer("initialised", torch.tensor(False))
        self.fixed: tuple[float, int, int] | None = None  # (scale, zero_point, bits) at eval
        # Train with ``fixed`` too instead of the running min/max: the range then cannot grow with
        # the outliers that quantization-aware training itself produces (see the slimmable family's training).
        self.hold_range = False

    def observe(self, z: torch.Tensor) -> None:
        lo, hi = z.detach().min().float(), z.detach().max().float()
        if not bool(self.initialised):
            self.lo.copy_(lo), self.hi.copy_(hi), self.initialised.fill_(True)
        else:
            self.lo.lerp_(lo, self.momentum), self.hi.lerp_(hi, self.momentum)

    def set_params(self, scale: float, zero_point: int, bits: int) -> None:
        self.fixed = (scale, zero_point, bits)

    def forward(self, z_in: torch.Tensor) -> torch.Tensor:
        # float32 even under bf16 autocast: bf16 cannot hold the integers 0..255 exactly.
        z = z_in.float()
        if self.training and self.hold_range and self.fixed is not None and self.bits > 0:
            s, zpi, bits = self.fixed
            levels = 2**bits - 1
            scale, zp = torch.tensor(s, device=z.device), torch.tensor(float(zpi), device=z.device)
        elif self.training:
            self.observe(z)
            if self.bits <= 0:
                return z_in
            levels = 2**self.bits - 1
            scale = ((self.hi - self.lo) / levels).clamp_min(1e-8)
            zp = torch.round(-self.lo / scale)
        elif self.fixed is not None:
            s, zpi, bits = self.fixed
            levels = 2**bits - 1
            scale, zp = torch.tensor(s, device=z.device), torch.tensor(float(zpi), device=z.device)
        else:
            return z_in
        q = torch.clamp(torch.round(z / scale) + zp, 0, levels)
        zq = (q - zp) * scale
        return (z + (zq - z).detach()).to(z_in.dtype)  # straight-through estimator


def cut_backbone(backbone: nn.Module, arch: str, split_at: str, input_size: int) -> tuple[list[str], tuple[int, ...]]:
    """Prepare a zoo backbone to be a split's tail: returns the stages after ``split_at`` and the
    shape of the backbone's own output at ``split_at`` (what a decoder must produce), and removes
    the stages up to ``split_at`` (the encoder replaces them; the checkpoint keeps only what runs)."""
    names = list(backbone.stage_names)
    if split_at not in names[:-1]:
        raise ValueError(f"split point '{split_at}' is not a stage of {arch} (stages: {names[:-1]})")
    head_stages = names[: names.index(split_at) + 1]
    with torch.no_grad():
        was = backbone.training
        backbone.eval()
        x = torch.zeros(1, 3, input_size, input_size)
        for s in head_stages:
            x = backbone.run_stage(s, x)
        backbone.train(was)
    for s in head_stages:
        if s == "stem":
            for attr in ("conv1", "bn1", "stem"):
                if hasattr(backbone, attr):
                    setattr(backbone, attr, nn.Identity())
        else:
            setattr(backbone, s, nn.Identity())
    return names[len(head_stages) :], tuple(x.shape[1:])


def upsampling_steps(z_side: int, split_side: int) -> int:
    """How many 2x upsamplings map a ``z_side`` bottleneck to the ``split_side`` split tensor."""
    up = split_side / z_side
    if up < 1 or up != int(up) or (int(up) & (int(up) - 1)):
        raise ValueError(f"decoder cannot map a {z_side}px bottleneck to the {split_side}px split tensor")
    return int(math.log2(up))


def run_tail(backbone: nn.Module, stages: list[str], x: torch.Tensor, return_features: bool = False):
    """The backbone's stages after the split on the decoder's output; with ``return_features``
    also each stage's input (the decoder output first), the targets of head-network distillation."""
    feats = [x]
    for s in stages:
        x = backbone.run_stage(s, x)
        feats.append(x)
    return (x, feats[:-1]) if return_features else x


def teacher_features(teacher: nn.Module, x: torch.Tensor, split_at: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run the teacher, returning logits and its outputs at the split point and each later stage
    (excluding the classifier) — the targets of head-network distillation."""
    names = list(teacher.stage_names)
    start = names.index(split_at)
    feats = []
    for i, s in enumerate(names):
        x = teacher.run_stage(s, x)
        if start <= i < len(names) - 1:
            feats.append(x)
    return x, feats


class BottleneckSplit(nn.Module):
    """The skeleton of a bottleneck split: the backbone (a fresh ``cfg.arch`` unless given) cut at
    ``cfg.split_at``, its remaining stages being the tail, and the wire tensor's shape that the
    encoder's strides give. A family builds its encoder, quantizer and decoder after this and
    defines ``decode(z)``, which the exported tail runs."""

    def __init__(self, cfg, backbone: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        backbone = backbone if backbone is not None else create_model(cfg.arch, cfg.num_classes)
        self.tail_stages, self.split_shape = cut_backbone(backbone, cfg.arch, cfg.split_at, cfg.input_size)
        self.backbone = backbone
        z_side = cfg.input_size // (math.prod(cfg.encoder_strides) * cfg.bottleneck_stride)
        self.wire_shape = (cfg.bottleneck_channels, z_side, z_side)

    def upsampling_steps(self) -> int:
        """How many 2x upsamplings the decoder needs to reach the split tensor's side."""
        return upsampling_steps(self.wire_shape[-1], self.split_shape[-1])

    def run_tail(self, decoded: torch.Tensor, return_features: bool = False):
        return run_tail(self.backbone, self.tail_stages, decoded, return_features)

    def tail_module(self) -> nn.Module:
        """The server's graph: wire tensor -> logits."""
        return _Tail(self)


class _Tail(nn.Module):
    def __init__(self, split: BottleneckSplit):
        super().__init__()
        self.split = split

    def forward(self, z):
        return self.split.decode(z)


def load_split(path: str | Path, device: str | torch.device, build: Callable[[dict], SplitT]) -> tuple[SplitT, dict]:
    """A trained split from ``student.pt``: ``build(state)`` makes the untrained one from the saved
    config (raising on a checkpoint it cannot take), then the weights load strictly (every key
    must match). Returns ``(model in eval mode, saved state)``."""
    state = torch.load(str(path), map_location=device, weights_only=True)
    model = build(state)
    model.load_state_dict(state["model"], strict=True)
    return model.eval(), state


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Knowledge-distillation term: KL from the teacher's to the student's distribution, both
    softened by ``temperature``, times its square (so the gradient keeps its size at any T)."""
    T = temperature
    return (
        F.kl_div(
            F.log_softmax(student_logits.float() / T, 1),
            F.softmax(teacher_logits.float() / T, 1),
            reduction="batchmean",
        )
        * T
        * T
    )


@torch.no_grad()
def wire_values(
    split: nn.Module, encode: Callable[[torch.Tensor], torch.Tensor], loader, max_batches: int
) -> np.ndarray:
    """The wire tensor's values (``encode`` of the first ``max_batches`` batches, flattened, float32),
    with ``split`` in eval mode: what the wire calibration reads."""
    split.eval()
    zs = []
    for b, (x, _) in enumerate(loader):
        if b >= max_batches:
            break
        zs.append(encode(x).float().flatten().cpu())
    return torch.cat(zs).numpy()


def student_on_teacher(build_model: Callable, r, p) -> nn.Module:
    """The untrained split of recipe ``r`` on a backbone initialised from the prepared teacher
    (``p``: :class:`edgesplit.builder.pipeline.Prepared`), so the tail starts as the teacher's;
    on the run's device, channels-last."""
    backbone = create_model(r.teacher.arch, p.num_classes)
    backbone.load_state_dict({k: v.cpu() for k, v in p.teacher.state_dict().items()})
    return build_model(r, backbone).to(p.dev).to(memory_format=torch.channels_last)


def save_student(
    run_dir: Path, family: str, student: nn.Module, calibration: dict, r, results: dict, log: Callable[[dict], None]
) -> dict:
    """A finished run's artefacts: ``student.pt`` (family, config, weights, calibration, classes,
    results, recipe), ``results.json``, and the ``done`` log event. Returns ``results``."""
    torch.save(
        {
            "family": family,
            "config": student.cfg.to_dict(),
            "model": student.state_dict(),
            "calibration": calibration,
            "classes": CLASSES[r.dataset],
            "results": json.loads(json.dumps(results)),
            "recipe": r.to_dict(),
        },
        run_dir / "student.pt",
    )
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    done = {k: v for k, v in results.items() if k != "modes"}
    if isinstance(done.get("entropy"), dict):  # its integer tables belong in results.json, not in a log line
        done["entropy"] = {k: v for k, v in done["entropy"].items() if k != "tables"}
    log({"event": "done", **done, "modes": results["modes"]})
    return results


# -- token bottlenecks (ViT teachers) -------------------------------------------------------------


class ViTHeadStages(nn.Module):
    """A ViT's stages up to and including the split point, taken off the backbone: the patch
    embedding with the class and position tokens (``stem``), then ``blocks``: image -> tokens."""

    def __init__(self, vit: nn.Module, n_blocks: int):
        super().__init__()
        self.patch_embed, self.cls_token, self.pos_embed = vit.patch_embed, vit.cls_token, vit.pos_embed
        self.blocks = nn.ModuleList(vit.blocks[i] for i in range(n_blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = VisionTransformer.embed(self, x)  # type: ignore[arg-type]  (it reads these three attributes only)
        for blk in self.blocks:
            x = blk(x)
        return x


def take_vit_head(vit: nn.Module, split_at: str, arch: str) -> tuple[ViTHeadStages, list[str], int, int]:
    """Move a zoo ViT's stages up to ``split_at`` into a :class:`ViTHeadStages` and leave the
    backbone holding only the stages after it (so a checkpoint holds each weight once). Returns
    ``(head, tail stage names, token grid side, token width)``."""
    names = list(getattr(vit, "stage_names", ()))
    if not (hasattr(vit, "blocks") and hasattr(vit, "pos_embed")):
        raise ValueError(f"{arch} is not a ViT: a token bottleneck needs a ViT teacher")
    if split_at not in names[:-1]:
        raise ValueError(f"split point '{split_at}' is not a stage of {arch} (stages: {names[:-1]})")
    n_blocks = names.index(split_at)  # stem is stage 0, so blockK is preceded by K+1 stages
    head = ViTHeadStages(vit, n_blocks)
    vit.patch_embed = nn.Identity()
    vit.cls_token = None  # type: ignore[assignment]  (a registered parameter set to None leaves the state dict)
    vit.pos_embed = None  # type: ignore[assignment]
    for i in range(n_blocks):
        vit.blocks[i] = nn.Identity()
    return head, names[n_blocks + 1 :], int(vit.grid), int(vit.cfg.dim)


def tokens_to_wire(tokens: torch.Tensor) -> torch.Tensor:
    """Tokens ``(B, N, c)`` -> the wire tensor ``(B, c, N, 1)``: channels first, one token per row."""
    return tokens.transpose(1, 2).unsqueeze(-1)


def wire_to_tokens(z: torch.Tensor) -> torch.Tensor:
    """The wire tensor ``(B, c, N, 1)`` -> tokens ``(B, N, c)``."""
    return z.squeeze(-1).transpose(1, 2)


def pool_tokens(tokens: torch.Tensor, grid: int, k: int) -> torch.Tensor:
    """Average each ``k x k`` square of the ``grid x grid`` patch tokens into one token; the class
    token (first) passes unchanged: ``(B, 1 + grid^2, d)`` -> ``(B, 1 + (grid/k)^2, d)``."""
    patches = tokens[:, 1:].transpose(1, 2).unflatten(2, (grid, grid))
    pooled = F.avg_pool2d(patches, k).flatten(2).transpose(1, 2)
    return torch.cat([tokens[:, :1], pooled], 1)


def unpool_tokens(patches: torch.Tensor, grid: int, k: int) -> torch.Tensor:
    """``(B, grid^2, d * k^2)`` pooled-grid tokens, each holding its ``k x k`` square's tokens as
    ``d * k^2`` channels (pixel-shuffle order) -> ``(B, (grid * k)^2, d)`` tokens, row-major."""
    x = patches.transpose(1, 2).unflatten(2, (grid, grid))
    return F.pixel_shuffle(x, k).flatten(2).transpose(1, 2)


def split_tail(split: nn.Module) -> nn.Module:
    """The server's graph of any split that defines ``decode(z)``: wire tensor -> logits."""
    return _Tail(split)
