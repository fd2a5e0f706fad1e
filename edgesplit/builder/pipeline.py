"""``edgesplit train RECIPE``: a recipe's whole pipeline as resumable steps in a run directory.

:func:`prepare` (data, teacher: train from scratch, load + adapt, or reuse another run's) is shared;
then the steps of the recipe's split family, looked up in :mod:`edgesplit.families.registry`
(e.g. BottleFit: stage 1 -> stage 2 -> calibrate -> evaluate, in ``families/bottlefit/steps.py``).
Each step leaves an artefact (``teacher.pt``, then the family's: ``stage1.pt``, ``stage2.pt``...,
always ending with ``student.pt`` and ``results.json``); a rerun skips finished steps (a finished
run entirely) and resumes unfinished ones from their per-epoch checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..data.sources import CLASSES, data_root
from ..families.registry import get_family
from .data import MEAN, STD, DeviceLoader, load_split
from .recipe import Recipe
from .train import evaluate, train_classifier, write_log
from .zoo import create_model, load_pretrained

__all__ = ["MEAN", "STD", "Prepared", "prepare", "run_recipe", "load_student", "student_family"]


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


BN_CALIBRATION_IMAGES = 512  # training images whose statistics re-parametrise a rebuilt teacher's BNs


def rebuilt_teacher(r: Recipe, xtr, ytr, num_classes: int) -> torch.nn.Module:
    """``teacher.init: bundle``: the recipe's architecture rebuilt from a bundle's full.onnx, its
    BatchNorms calibrated on a fixed sample of un-augmented training images, normalised as the
    training batches are."""
    from .recipe import resolve_bundle_dir
    from .teacher_from_bundle import teacher_from_bundle

    g = torch.Generator().manual_seed(r.seed)
    idx = torch.randperm(len(xtr), generator=g)[:BN_CALIBRATION_IMAGES].sort().values.numpy()
    (x, _), *_ = DeviceLoader(xtr[idx], ytr[idx], len(idx), torch.device("cpu"), MEAN, STD)
    return teacher_from_bundle(r.teacher.arch, resolve_bundle_dir(str(r.teacher.weights)), num_classes, x)


def prepare(
    r: Recipe, run_dir: Path, device: str | None = None, limit_per_shard: int | None = None, workers: int | None = None
) -> Prepared:
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
    if r.teacher.init == "bundle":
        teacher = rebuilt_teacher(r, xtr, ytr, nc).to(dev).to(memory_format=torch.channels_last)
        results["teacher_bundle_accuracy"] = evaluate(teacher.eval(), eval_loader, dev)
        log({"event": "teacher_rebuilt", "bundle": r.teacher.weights, "accuracy": results["teacher_bundle_accuracy"]})
    elif r.teacher.init in ("pretrained", "run"):
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
            train_classifier(
                teacher,
                tc,
                train_loader(tc["batch"]),
                dev,
                run_dir,
                log,
                lambda: evaluate(teacher.eval(), eval_loader, dev),
                eval_loader,
            )
        # Always leave teacher.pt, also for a pretrained teacher used as it is: export reads it.
        torch.save(teacher.state_dict(), teacher_path)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    results["teacher_accuracy"] = evaluate(teacher, eval_loader, dev)
    log({"event": "teacher", "accuracy": results["teacher_accuracy"]})
    return Prepared(dev, log, xtr, ytr, eval_loader, teacher, results, t0, nc, train_loader)


def run_recipe(
    r: Recipe, run_dir: Path, device: str | None = None, limit_per_shard: int | None = None, workers: int | None = None
) -> dict:
    """Run a recipe's steps in ``run_dir`` (resuming unfinished ones) and return its results.
    A recipe without a ``split`` section trains its teacher only (``teacher.pt`` + ``results.json``)."""
    if r.split is None:
        results_path = run_dir / "results.json"
        if results_path.is_file() and (run_dir / "teacher.pt").is_file():
            write_log(run_dir / "log.jsonl")({"event": "finished_already", "teacher": str(run_dir / "teacher.pt")})
            return json.loads(results_path.read_text())
        p = prepare(r, run_dir, device, limit_per_shard, workers)
        p.results["sec"] = round(time.time() - p.t0, 1)
        results_path.write_text(json.dumps(p.results, indent=2))
        return p.results
    family = get_family(r.split.family)
    results_path, student_path = run_dir / "results.json", run_dir / "student.pt"
    if results_path.is_file() and student_path.is_file():
        # Finished: every artefact is there; nothing is recomputed or rewritten.
        write_log(run_dir / "log.jsonl")({"event": "finished_already", "student": str(student_path)})
        return json.loads(results_path.read_text())
    p = prepare(r, run_dir, device, limit_per_shard, workers)
    return family.entry("steps")(r, run_dir, p)


def student_family(state: dict) -> str:
    """The family a loaded ``student.pt`` belongs to (older BottleFit ones name it only in their recipe)."""
    return state.get("family") or state["recipe"]["split"]["family"]


def load_student(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild any family's trained split from ``student.pt``: ``(model in eval mode, saved state)``."""
    state = torch.load(str(path), map_location=device, weights_only=True)
    return get_family(student_family(state)).entry("load_student")(path, device)
