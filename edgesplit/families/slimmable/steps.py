"""The slimmable family's steps after :func:`edgesplit.builder.pipeline.prepare`: stage 1 ->
stage 2 -> per-width BN calibration -> wire calibration per (width, bits) -> accuracy of every
(width, bits) mode.

Artefacts in the run directory: ``stage1.pt``, ``stage2.pt``, ``student.pt`` (config, weights,
calibration, results), ``results.json``; a rerun resumes from the last one written.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ...builder.bottleneck import save_student, student_on_teacher
from ...builder.data import MEAN, STD, DeviceLoader
from ...builder.train import evaluate
from .model import build_model, head_macs
from .train import calibrate_bn, calibrate_wire, distill_stage1, evaluate_modes, finetune_stage2, hold_wire_ranges

if TYPE_CHECKING:
    from ...builder.pipeline import Prepared
    from ...builder.recipe import Recipe


def run(r: Recipe, run_dir: Path, p: Prepared) -> dict:
    dev, log, teacher, results, eval_loader = p.dev, p.log, p.teacher, p.results, p.eval_loader
    student = student_on_teacher(build_model, r, p)
    cfg = student.cfg
    n_random = r.split.sandwich_random

    def eval_widest() -> float:
        return evaluate(lambda x: student.eval()(x, -1), eval_loader, dev)

    calib_loader = DeviceLoader(p.xtr, p.ytr, 250, dev, MEAN, STD)
    for name, stage, fn in (("stage1", r.stage1, distill_stage1), ("stage2", r.stage2, finetune_stage2)):
        art = run_dir / f"{name}.pt"
        if art.exists():
            student.load_state_dict(torch.load(art, map_location=dev, weights_only=True))
            continue
        if name == "stage2":
            held = hold_wire_ranges(student, calib_loader, r.split.train_bits)
            log(
                {
                    "event": "stage2_wire_ranges",
                    "bits": r.split.train_bits,
                    "ranges": {str(c): {"scale": k["scale"], "zero_point": k["zero_point"]} for c, k in held.items()},
                }
            )
        c = vars(stage)
        fn(
            student,
            teacher,
            c,
            p.train_loader(c["batch"]),
            dev,
            run_dir,
            log,
            eval_widest,
            n_random=n_random,
            seed=r.seed,
        )
        torch.save(student.state_dict(), art)
    for q in student.quant:
        q.hold_range, q.fixed = False, None

    calibrate_bn(student, calib_loader, dev)
    calib = calibrate_wire(student, calib_loader, r.mode_bits)
    modes = evaluate_modes(student, calib, r.mode_bits, eval_loader, dev, log)
    for m in modes:
        m.update({k: v for k, v in calib[f"{m['width']}/{m['bits']}"].items() if k != "bits"})
        m["head_macs"] = head_macs(cfg, cfg.widths.index(m["width"]))
    results["float_accuracy"] = eval_widest()
    results["modes"] = modes
    results["eval_frames"] = int(len(eval_loader.x))
    results["wall_sec"] = round(time.time() - p.t0, 1)
    return save_student(run_dir, "slimmable", student, calib, r, results, log)
