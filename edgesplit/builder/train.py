"""Training machinery every family shares: the epoch loop with resume, classifier training,
evaluation, wire-tensor quantization calibration and the run log. A family's own stages live in
its subpackage (``edgesplit/families/<name>/train.py``).

Each loop resumes from ``ckpt_path`` (model + optimizer + epoch), saved after every epoch, so a
stopped job loses at most one epoch. Loads use ``weights_only=True``.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def progress(it, total: int, desc: str):
    try:
        from tqdm import tqdm

        return tqdm(it, total=total, desc=desc, leave=False, mininterval=2.0)
    except ImportError:  # tqdm is in the build extra; stay usable without it
        return it


def warmup_cosine(opt: torch.optim.Optimizer, total_steps: int, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        p = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, p)))

    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def make_optimizer(params, cfg: dict) -> torch.optim.Optimizer:
    """``cfg``'s optimizer over ``params``: tensors, or param groups (dicts) whose own keys (an
    ``lr``) override ``cfg``'s for that group."""
    params = list(params)
    if params and isinstance(params[0], dict):
        params = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in params]
    else:
        params = [p for p in params if p.requires_grad]
    if cfg.get("optimizer", "sgd") == "adam":
        return torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg.get("weight_decay", 0.0))
    return torch.optim.SGD(
        params, lr=cfg["lr"], momentum=0.9, nesterov=True, weight_decay=cfg.get("weight_decay", 5e-4)
    )


@torch.no_grad()
def evaluate(forward: Callable[[torch.Tensor], torch.Tensor], loader: Iterable, device: torch.device) -> float:
    correct = total = 0
    for x, y in loader:
        with autocast(device):
            logits = forward(x)
        correct += (logits.argmax(1) == y).sum().item()
        total += y.numel()
    return correct / max(1, total)


class EpochRunner:
    """Shared skeleton: epochs with resume, a per-step loss function, logging and checkpoints."""

    def __init__(
        self,
        name: str,
        model: nn.Module,
        params,
        cfg: dict,
        loader,
        device: torch.device,
        run_dir: Path,
        log: Callable[[dict], None],
    ):
        self.name, self.model, self.cfg, self.loader, self.device, self.log = name, model, cfg, loader, device, log
        self.opt = make_optimizer(params, cfg)
        steps = cfg["epochs"] * len(loader)
        self.sched = warmup_cosine(self.opt, steps, int(cfg.get("warmup_epochs", 1) * len(loader)))
        self.ckpt = run_dir / f"{name}.ckpt"
        self.start_epoch = 0
        if self.ckpt.exists():
            state = torch.load(self.ckpt, map_location=device, weights_only=True)
            model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["opt"])
            self.sched.load_state_dict(state["sched"])
            self.start_epoch = state["epoch"] + 1
            log({"event": "resume", "stage": name, "epoch": self.start_epoch})

    def run(
        self,
        step_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        set_train_mode: Callable[[], None],
        eval_fn: Callable[[], float] | None = None,
    ) -> None:
        for epoch in range(self.start_epoch, self.cfg["epochs"]):
            set_train_mode()
            t0, tot, n = time.time(), 0.0, 0
            for x, y in progress(self.loader, len(self.loader), f"{self.name} {epoch + 1}/{self.cfg['epochs']}"):
                with autocast(self.device):
                    loss = step_loss(x, y)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
                self.sched.step()
                tot += loss.detach().float().item() if n % 20 == 0 else 0.0
                n += 1
            rec = {
                "stage": self.name,
                "epoch": epoch + 1,
                "loss_sampled": tot / max(1, math.ceil(n / 20)),
                "lr": self.sched.get_last_lr()[0],
                "sec": round(time.time() - t0, 2),
            }
            last = epoch + 1 == self.cfg["epochs"]
            if eval_fn is not None and (last or (epoch + 1) % self.cfg.get("eval_every", 5) == 0):
                rec["eval_accuracy"] = eval_fn()
            self.log(rec)
            torch.save(
                {
                    "model": self.model.state_dict(),
                    "opt": self.opt.state_dict(),
                    "sched": self.sched.state_dict(),
                    "epoch": epoch,
                },
                self.ckpt,
            )


def train_classifier(model, cfg, loader, device, run_dir, log, eval_fn=None, eval_loader=None) -> None:
    """Cross-entropy training; with ``cfg["distill"]`` (a :class:`~.recipe.DistillCfg`), knowledge
    distillation from that bundle's ``full.onnx`` on the same augmented batch (see :mod:`.distill`)."""
    runner = EpochRunner("teacher", model, model.parameters(), cfg, loader, device, run_dir, log)
    ls = cfg.get("label_smoothing", 0.0)
    distill = cfg.get("distill")
    if distill is None:
        runner.run(lambda x, y: F.cross_entropy(model(x), y, label_smoothing=ls), model.train, eval_fn)
        return
    from .distill import OnnxTeacher, kd_loss
    from .recipe import resolve_bundle_dir

    kd_teacher = OnnxTeacher(resolve_bundle_dir(distill.bundle))
    if eval_loader is not None and runner.start_epoch == 0:
        log(
            {
                "event": "distill_teacher",
                "bundle": str(kd_teacher.path),
                "accuracy": evaluate(kd_teacher, eval_loader, device),
            }
        )

    def step_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return kd_loss(model(x), kd_teacher(x), y, distill.alpha, distill.temperature, ls)

    runner.run(step_loss, model.train, eval_fn)


def freeze(module: nn.Module, frozen: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(not frozen)


def calibrate(z: np.ndarray, bits: int) -> dict:
    """Choose the affine range for ``bits`` by minimising reconstruction MSE over clip percentiles
    of real wire values (the min/max range wastes levels on rare outliers at low bit depths)."""
    levels = 2**bits - 1
    sample = z if z.size <= 2_000_000 else np.random.default_rng(0).choice(z, 2_000_000, replace=False)
    best = None
    for pct in (100.0, 99.999, 99.99, 99.9, 99.5, 99.0, 98.0, 96.0):
        lo, hi = np.percentile(sample, [100 - pct, pct]) if pct < 100 else (sample.min(), sample.max())
        lo, hi = min(float(lo), 0.0), max(float(hi), 1e-6)  # keep 0 representable exactly
        scale = (hi - lo) / levels
        zp = int(round(-lo / scale))
        q = np.clip(np.round(sample / scale) + zp, 0, levels)
        mse = float(np.mean(((q - zp) * scale - sample) ** 2))
        if best is None or mse < best["mse"]:
            best = {"bits": bits, "scale": float(scale), "zero_point": zp, "clip_percentile": pct, "mse": mse}
    return best


def write_log(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)

    def log(rec: dict) -> None:
        rec = {"t": round(time.time(), 1), **rec}
        print(json.dumps(rec), flush=True)
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    return log
