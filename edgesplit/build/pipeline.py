"""``edgesplit train RECIPE``: the whole BottleFit pipeline as resumable steps in a run directory.

teacher (train from scratch, or load + adapt) -> stage 1 -> stage 2 -> calibrate -> evaluate.
Each step leaves an artefact (``teacher.pt``, ``stage1.pt``, ``stage2.pt``, optional ``stage3.pt``,
``student.pt``, ``results.json``);
a rerun skips finished steps and resumes unfinished ones from their per-epoch checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import fields
from pathlib import Path

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


def run_recipe(r: Recipe, run_dir: Path, device: str | None = None, limit_per_shard: int | None = None,
               workers: int | None = None) -> dict:
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

    def loader(cfg_batch: int, train: bool) -> DeviceLoader:
        if train:
            return DeviceLoader(xtr, ytr, cfg_batch, dev, MEAN, STD, r.augment, shuffle=True, seed=r.seed, drop_last=True)
        return DeviceLoader(xte, yte, 500, dev, MEAN, STD)

    eval_loader = loader(500, False)
    results: dict = {"recipe": r.name, "device": str(dev)}

    # 1. Teacher.
    teacher_path = run_dir / "teacher.pt"
    if r.teacher.init == "pretrained":
        wpath = Path(r.teacher.weights)
        wpath = wpath if wpath.is_absolute() else data_root() / wpath
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
            train_classifier(teacher, tc, loader(tc["batch"], True), dev, run_dir, log,
                             lambda: evaluate(teacher.eval(), eval_loader, dev))
        # Always leave teacher.pt, also for a pretrained teacher used as it is: export reads it.
        torch.save(teacher.state_dict(), teacher_path)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    results["teacher_accuracy"] = evaluate(teacher, eval_loader, dev)
    log({"event": "teacher", "accuracy": results["teacher_accuracy"]})

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
        distill_stage1(student, teacher, c1, loader(c1["batch"], True), dev, run_dir, log,
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
            finetune_stage2(student, teacher, ck, loader(ck["batch"], True), dev, run_dir, log,
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
    results["eval_frames"] = int(len(xte))
    results["wall_sec"] = round(time.time() - t0, 1)
    torch.save({"config": cfg.to_dict(), "model": student.state_dict(), "calibration": calib,
                "classes": CLASSES[r.dataset], "results": json.loads(json.dumps(results)),
                "recipe": r.to_dict()}, out_path)
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    log({"event": "done", **{k: v for k, v in results.items() if k != "modes"}, "modes": modes})
    return results
