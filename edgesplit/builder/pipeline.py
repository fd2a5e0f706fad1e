"""``edgesplit train RECIPE``: a recipe's whole pipeline as resumable steps in a run directory.

:func:`prepare` (data, teacher: train from scratch, load + adapt, or reuse another run's) is shared;
then the family's steps: BottleFit here (stage 1 -> stage 2 -> calibrate -> evaluate), slimmable in
``pipeline_slimmable.py``.
Each step leaves an artefact (``teacher.pt``, ``stage1.pt``, ``stage2.pt``, optional ``stage3.pt``,
``student.pt``, ``results.json``);
a rerun skips finished steps and resumes unfinished ones from their per-epoch checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import torch

from ..data.sources import CLASSES, data_root
from .data import DeviceLoader, load_split
from .families.bottlefit import BottleFitConfig, BottleFitSplit, BottleneckSpec
from .recipe import Recipe
from .train import calibrate, collect_wire, distill_stage1, evaluate, finetune_stage2, train_classifier, write_log
from .zoo import create_model, load_pretrained

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def student_config(r: Recipe) -> BottleFitConfig:
    spec = {f.name: getattr(r.split, f.name) for f in fields(BottleneckSpec)}
    return BottleFitConfig(arch=r.teacher.arch, num_classes=len(CLASSES[r.dataset]), input_size=r.input_size, **spec)


def load_student(path: str | Path, device: str | torch.device = "cpu") -> tuple[BottleFitSplit, dict]:
    """Rebuild a trained split from ``student.pt`` (config + weights + calibration)."""
    state = torch.load(str(path), map_location=device, weights_only=True)
    cfg = BottleFitConfig(**state["config"])
    model = BottleFitSplit(cfg)
    model.load_state_dict(state["model"], strict=True)
    return model.eval(), state


@dataclass
class Prepared:
    """What every family's steps start from: data, the trained teacher, logging, the results so far."""

    dev: torch.device
    log: Callable[[dict], None]
    xtr: torch.Tensor
    ytr: torch.Tensor
    eval_loader: DeviceLoader
    teacher: torch.nn.Module
    results: dict
    t0: float
    num_classes: int
    train_loader: Callable[[int], DeviceLoader]


def resolve_teacher_weights(r: Recipe, run_dir: Path) -> Path:
    """``pretrained``: relative to the shared data root; ``run``: relative to the runs folder (a
    teacher that another recipe of this project trained, e.g. ``imagenette-resnet18-bottlefit/teacher.pt``)."""
    w = Path(r.teacher.weights)
    if w.is_absolute():
        return w
    return (run_dir.parent / w) if r.teacher.init == "run" else (data_root() / w)


def prepare(r: Recipe, run_dir: Path, device: str | None = None, limit_per_shard: int | None = None,
            workers: int | None = None) -> Prepared:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(r.seed)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.json").write_text(json.dumps(r.to_dict(), indent=2))
    log = write_log(run_dir / "log.jsonl")
    workers = workers if workers is not None else min(16, os.cpu_count() or 1)
    cache = run_dir.parent / "cache"
    t0 = time.time()
    xtr, ytr = load_split(r.dataset, r.train_split, r.input_size, cache, limit_per_shard, workers)
    xte, yte = load_split(r.dataset, r.eval_split, r.input_size, cache, limit_per_shard, workers)
    log({"event": "data", "train": len(xtr), "eval": len(xte), "sec": round(time.time() - t0, 1), "device": str(dev)})
    nc = len(CLASSES[r.dataset])

    def train_loader(batch: int) -> DeviceLoader:
        return DeviceLoader(xtr, ytr, batch, dev, MEAN, STD, r.augment, shuffle=True, seed=r.seed, drop_last=True)

    eval_loader = DeviceLoader(xte, yte, 500, dev, MEAN, STD)
    results: dict = {"recipe": r.name, "device": str(dev)}

    # 1. Teacher.
    teacher_path = run_dir / "teacher.pt"
    if r.teacher.init in ("pretrained", "run"):
        wpath = resolve_teacher_weights(r, run_dir)
        teacher = load_pretrained(r.teacher.arch, wpath, nc).to(dev).to(memory_format=torch.channels_last)
        results["teacher_pretrained_accuracy"] = evaluate(teacher.eval(), eval_loader, dev)
        log({"event": "teacher_loaded", "path": str(wpath), "accuracy": results["teacher_pretrained_accuracy"]})
    else:
        teacher = create_model(r.teacher.arch, nc).to(dev).to(memory_format=torch.channels_last)
    if teacher_path.exists():
        teacher.load_state_dict(torch.load(teacher_path, map_location=dev, weights_only=True))
    else:
        if r.teacher.train is not None:
            tc = vars(r.teacher.train)
            train_classifier(teacher, tc, train_loader(tc["batch"]), dev, run_dir, log,
                             lambda: evaluate(teacher.eval(), eval_loader, dev))
        # Always leave teacher.pt, also for a pretrained teacher used as it is: export reads it.
        torch.save(teacher.state_dict(), teacher_path)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    results["teacher_accuracy"] = evaluate(teacher, eval_loader, dev)
    log({"event": "teacher", "accuracy": results["teacher_accuracy"]})
    return Prepared(dev, log, xtr, ytr, eval_loader, teacher, results, t0, nc, train_loader)


def run_recipe(r: Recipe, run_dir: Path, device: str | None = None, limit_per_shard: int | None = None,
               workers: int | None = None) -> dict:
    """Run a recipe's steps in ``run_dir`` (resuming finished ones) and return its results."""
    p = prepare(r, run_dir, device, limit_per_shard, workers)
    if r.split.family == "slimmable":
        from .pipeline_slimmable import run_slimmable

        return run_slimmable(r, run_dir, p)
    return run_bottlefit(r, run_dir, p)


def run_bottlefit(r: Recipe, run_dir: Path, p: Prepared) -> dict:
    dev, log, teacher, results, eval_loader, nc = p.dev, p.log, p.teacher, p.results, p.eval_loader, p.num_classes
    xtr, ytr, t0 = p.xtr, p.ytr, p.t0

    # 2. BottleFit student: backbone initialised from the teacher (the tail starts as the teacher's).
    cfg = student_config(r)
    backbone = create_model(r.teacher.arch, nc)
    backbone.load_state_dict({k: v.cpu() for k, v in teacher.state_dict().items()})
    student = BottleFitSplit(cfg, backbone).to(dev).to(memory_format=torch.channels_last)
    fwd = lambda x: student(x)  # noqa: E731
    s1_path = run_dir / "stage1.pt"
    if s1_path.exists():
        student.load_state_dict(torch.load(s1_path, map_location=dev, weights_only=True))
    else:
        c1 = vars(r.stage1)
        distill_stage1(student, teacher, c1, p.train_loader(c1["batch"]), dev, run_dir, log,
                       lambda: evaluate(lambda x: student.eval()(x), eval_loader, dev))
        torch.save(student.state_dict(), s1_path)
    results["stage1_accuracy"] = evaluate(student.eval(), eval_loader, dev)
    out_path = run_dir / "student.pt"
    if out_path.exists():
        student.load_state_dict(torch.load(out_path, map_location=dev, weights_only=True)["model"])
    else:
        # Stage 2, then the optional stage 3: the same KD fine-tune continued at a lower bit depth
        # (``stage3.bits``), so that the smallest modes keep their accuracy. Each leaves its artefact.
        steps = [("stage2", r.stage2, r.split.train_bits)]
        if r.stage3 is not None:
            steps.append(("stage3", r.stage3, r.stage3_bits))
        for name, cfg_k, bits in steps:
            art = run_dir / f"{name}.pt"
            if art.exists():
                student.load_state_dict(torch.load(art, map_location=dev, weights_only=True))
                continue
            student.quant.bits = bits
            ck = vars(cfg_k)
            finetune_stage2(student, teacher, ck, p.train_loader(ck["batch"]), dev, run_dir, log,
                            lambda: evaluate(lambda x: student.eval()(x), eval_loader, dev), name=name)
            torch.save(student.state_dict(), art)

    # 3. Calibrate the wire quantization on training data, then evaluate every mode with it applied.
    z = collect_wire(student, DeviceLoader(xtr, ytr, 500, dev, MEAN, STD), max_batches=20)
    calib = {str(b): calibrate(z, b) for b in r.mode_bits}
    student.eval()
    results["float_accuracy"] = evaluate(fwd, eval_loader, dev)  # quantizer off: no fixed params yet
    modes = []
    for b in r.mode_bits:
        c = calib[str(b)]
        student.quant.set_params(c["scale"], c["zero_point"], b)
        acc = evaluate(fwd, eval_loader, dev)
        modes.append({"bits": b, "accuracy": acc, **c})
    student.quant.fixed = None
    results["modes"] = modes
    results["eval_frames"] = int(len(eval_loader.x))
    results["wall_sec"] = round(time.time() - t0, 1)
    torch.save({"config": cfg.to_dict(), "model": student.state_dict(), "calibration": calib,
                "classes": CLASSES[r.dataset], "results": json.loads(json.dumps(results)),
                "recipe": r.to_dict()}, out_path)
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    log({"event": "done", **{k: v for k, v in results.items() if k != "modes"}, "modes": modes})
    return results
