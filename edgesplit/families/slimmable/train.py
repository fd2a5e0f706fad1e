"""Training a slimmable split: sandwich-rule steps, in-place distillation, per-width BN calibration.

Every step runs the **widest** width, the **narrowest** and ``n_random`` others drawn at random
(Yu & Huang's sandwich rule: the extremes bound every width between them), and sums their losses
before one optimizer step, so all widths share one set of weights.

- Stage 1 (head-network distillation): each width's decoder output is regressed (MSE) onto the
  teacher's features at the split point. Teacher and tail are frozen; only encoder and decoder learn.
- Stage 2 (KD with the wire fake-quantized at each width's range calibrated after stage 1, held
  fixed: :func:`hold_wire_ranges`): the widest learns from labels and the teacher
  (0.5 CE + 0.5 KL); every narrower width learns from the widest's own predictions, detached
  (**in-place distillation**), which is softer and closer to what a narrow head can reach than
  hard labels. The tail stays frozen (it is shared by every width and keeps the teacher's BN).
- Calibration: each width's private BatchNorm statistics are recomputed on training images at that
  width (cumulative averages, no momentum), because the running averages gathered while widths
  alternated are noisy; then the wire range is calibrated per (width, bits).

A model with one width is a bottleneck "trained alone" at that width by the same code: the
baseline the slimmable one is compared against.
"""

from __future__ import annotations

import random
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...builder.bottleneck import kd_kl, teacher_features, wire_values
from ...builder.train import EpochRunner, autocast, calibrate
from .model import SlimmableSplit


def sandwich(n_widths: int, n_random: int, rng: random.Random) -> list[int]:
    """Width indices for one step: widest first (its output teaches the others), then narrowest,
    then ``n_random`` distinct others."""
    if n_widths == 1:
        return [0]
    middle = list(range(1, n_widths - 1))
    return [n_widths - 1, 0] + rng.sample(middle, min(n_random, len(middle)))


def _freeze_all_but(student: SlimmableSplit, *trainable: nn.Module) -> list[nn.Parameter]:
    for p in student.parameters():
        p.requires_grad_(False)
    params = []
    for m in trainable:
        for p in m.parameters():
            p.requires_grad_(True)
            params.append(p)
    return params


def _set_train_mode(student: SlimmableSplit) -> None:
    student.eval()  # the frozen tail keeps its BN statistics
    student.encoder.train()
    student.decoder.train()
    student.quant.train()


def distill_stage1(
    student: SlimmableSplit,
    teacher: nn.Module,
    cfg: dict,
    loader,
    device,
    run_dir,
    log,
    eval_fn=None,
    n_random: int = 1,
    seed: int = 0,
) -> None:
    teacher.eval()
    params = _freeze_all_but(student, student.encoder, student.decoder)
    rng = random.Random(seed)
    saved = [q.bits for q in student.quant]
    for q in student.quant:
        q.bits = 0  # observe each width's range, do not quantize yet

    def step(x, y):
        with torch.no_grad():
            _, t_feats = teacher_features(teacher, x, student.cfg.split_at)
        target = t_feats[0].float()
        loss = 0.0
        for i in sandwich(len(student.widths), n_random, rng):
            feat = student.decoder(student.zero_fill(student.quant[i](student.encode(x, i))))
            loss = loss + F.mse_loss(feat.float(), target)
        return loss

    EpochRunner("stage1", student, params, cfg, loader, device, run_dir, log).run(
        step, lambda: _set_train_mode(student), eval_fn
    )
    for q, b in zip(student.quant, saved):
        q.bits = b


def hold_wire_ranges(student: SlimmableSplit, loader, bits: int, max_batches: int = 20) -> dict:
    """Fix each width's fake-quantization range for stage 2 at its MSE-optimal clip for ``bits``
    on training images. Tracking min/max instead lets quantization-aware training widen the range
    with the outliers it produces, and every width loses accuracy (docs/BENCHMARKS.md, "Figures
    behind design choices")."""
    ranges = {}
    for i, c in enumerate(student.widths):
        k = calibrate(collect_wire(student, i, loader, max_batches), bits)
        student.quant[i].set_params(k["scale"], k["zero_point"], bits)
        student.quant[i].hold_range = True
        ranges[c] = k
    return ranges


def finetune_stage2(
    student: SlimmableSplit,
    teacher: nn.Module,
    cfg: dict,
    loader,
    device,
    run_dir,
    log,
    eval_fn=None,
    n_random: int = 1,
    seed: int = 0,
) -> None:
    teacher.eval()
    params = _freeze_all_but(student, student.encoder, student.decoder)
    rng = random.Random(seed + 1)
    T, alpha = cfg.get("temperature", 1.0), cfg.get("alpha", 0.5)

    def kl(s_logits, t_logits):
        return kd_kl(s_logits, t_logits, T)

    def step(x, y):
        order = sandwich(len(student.widths), n_random, rng)
        with torch.no_grad():
            t_logits = teacher(x)
        wide = student(x, order[0])
        loss = (1 - alpha) * F.cross_entropy(wide, y) + alpha * kl(wide, t_logits)
        soft = wide.detach()
        for i in order[1:]:
            loss = loss + kl(student(x, i), soft)
        return loss

    EpochRunner("stage2", student, params, cfg, loader, device, run_dir, log).run(
        step, lambda: _set_train_mode(student), eval_fn
    )


@torch.no_grad()
def calibrate_bn(student: SlimmableSplit, loader, device, max_batches: int = 40) -> None:
    """Recompute every width's private BN statistics on training images at that width."""
    for i in range(len(student.widths)):
        bns = [sbn.bns[i] for sbn in student.encoder.bns]
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the calibration batches
        student.eval()
        for bn in bns:
            bn.train()
        for b, (x, _) in enumerate(loader):
            if b >= max_batches:
                break
            with autocast(device):
                student.encode(x, i)
        for bn in bns:
            bn.momentum = 0.1
    student.eval()


def collect_wire(student: SlimmableSplit, index: int, loader, max_batches: int) -> np.ndarray:
    return wire_values(student, lambda x: student.encode(x, index), loader, max_batches)


@torch.no_grad()
def evaluate_modes(
    student: SlimmableSplit,
    calib: dict,
    bits_list: list[int],
    loader,
    device,
    log: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Accuracy of every (width, bits) on the evaluation set, the wire quantized as the codec does
    it (calibrated scale and zero point), the narrower widths zero-filled as the server does."""
    student.eval()
    out = []
    for i, c in enumerate(student.widths):
        correct = {b: 0 for b in bits_list}
        total = 0
        for x, y in loader:
            with autocast(device):
                z = student.encode(x, i).float()
            for b in bits_list:
                k = calib[f"{c}/{b}"]
                levels = 2**b - 1
                q = torch.clamp(torch.round(z / k["scale"]) + k["zero_point"], 0, levels)
                with autocast(device):
                    logits = student.decode((q - k["zero_point"]) * k["scale"])
                correct[b] += (logits.argmax(1) == y).sum().item()
            total += y.numel()
        for b in bits_list:
            rec = {"width": c, "bits": b, "accuracy": correct[b] / max(1, total)}
            out.append(rec)
            if log:
                log({"event": "mode_eval", **rec})
    return out


def calibrate_wire(student: SlimmableSplit, loader, bits_list: list[int], max_batches: int = 20) -> dict:
    """(scale, zero_point) per "width/bits", from each width's own wire values."""
    calib = {}
    for i, c in enumerate(student.widths):
        z = collect_wire(student, i, loader, max_batches)
        for b in bits_list:
            calib[f"{c}/{b}"] = calibrate(z, b)
    return calib
