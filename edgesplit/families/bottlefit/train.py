"""BottleFit's training stages: stage 1 (head-network distillation), stage 2 (KD fine-tuning),
and the wire values the calibration reads."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...builder.bottleneck import kd_kl, teacher_features, wire_values
from ...builder.train import EpochRunner, freeze
from .entropy import rate_loss
from .model import BottleFitSplit


def distill_stage1(
    student: BottleFitSplit, teacher: nn.Module, cfg, loader, device, run_dir, log, eval_fn=None
) -> None:
    """Head-network distillation: teacher and tail frozen; MSE at the decoder output and at every
    later stage, summed. Only encoder and decoder learn."""
    teacher.eval()
    freeze(student, True)
    freeze(student.encoder, False)
    freeze(student.decoder, False)
    freeze(student.quant, False)  # an entropy bottleneck's density learns with them
    q_bits, student.quant.bits = student.quant.bits, 0  # observe the range, do not quantize yet

    def set_mode():
        student.eval()  # frozen tail keeps its BN statistics
        student.encoder.train(), student.decoder.train(), student.quant.train()

    def step(x, y):
        with torch.no_grad():
            _, t_feats = teacher_features(teacher, x, student.cfg.split_at)
        _, s_feats = student(x, return_features=True)
        distortion = sum(F.mse_loss(s.float(), t.float()) for s, t in zip(s_feats, t_feats))
        return distortion + rate_loss(student.quant, student.cfg.entropy_lambda)

    # The quantizer's own parameters: the entropy bottleneck's density (none for the uniform one).
    params = [*student.encoder.parameters(), *student.decoder.parameters(), *student.quant.parameters()]
    EpochRunner("stage1", student, params, cfg, loader, device, run_dir, log).run(step, set_mode, eval_fn)
    student.quant.bits = q_bits
    freeze(student, False)


def finetune_stage2(
    student: BottleFitSplit, teacher: nn.Module, cfg, loader, device, run_dir, log, eval_fn=None, name: str = "stage2"
) -> None:
    """KD fine-tuning of decoder + tail: 0.5 CE + 0.5 KL(student || teacher) at temperature T,
    with the wire tensor fake-quantized at the recipe's training bit depth."""
    teacher.eval()
    freeze_enc = cfg.get("freeze_encoder", True)
    freeze(student, False)
    freeze(student.encoder, freeze_enc)
    T, alpha = cfg.get("temperature", 1.0), cfg.get("alpha", 0.5)

    def set_mode():
        student.train()
        if freeze_enc:
            student.encoder.eval()

    def step(x, y):
        with torch.no_grad():
            t_logits = teacher(x)
        s_logits = student(x)
        task = (1 - alpha) * F.cross_entropy(s_logits, y) + alpha * kd_kl(s_logits, t_logits, T)
        return task + rate_loss(student.quant, student.cfg.entropy_lambda)

    EpochRunner(name, student, student.parameters(), cfg, loader, device, run_dir, log).run(step, set_mode, eval_fn)


def collect_wire(student: BottleFitSplit, loader, max_batches: int) -> np.ndarray:
    return wire_values(student, student.encode, loader, max_batches)
