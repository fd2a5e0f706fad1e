"""BottleFit's steps after :func:`edgesplit.builder.pipeline.prepare`: stage 1 -> stage 2 ->
optional stage 3 -> wire calibration -> accuracy of every mode.

Artefacts in the run directory: ``stage1.pt``, ``stage2.pt``, optional ``stage3.pt``, ``student.pt``
(config, weights, calibration, results), ``results.json``; a rerun resumes from the last one written.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ...builder.bottleneck import save_student, student_on_teacher
from ...builder.data import MEAN, STD, DeviceLoader
from ...builder.train import calibrate, evaluate
from .model import build_model
from .train import collect_wire, distill_stage1, finetune_stage2

if TYPE_CHECKING:
    from ...builder.pipeline import Prepared
    from ...builder.recipe import Recipe


def run(r: Recipe, run_dir: Path, p: Prepared) -> dict:
    dev, log, teacher, results, eval_loader = p.dev, p.log, p.teacher, p.results, p.eval_loader
    xtr, ytr, t0 = p.xtr, p.ytr, p.t0

    # 2. BottleFit student: backbone initialised from the teacher (the tail starts as the teacher's).
    student = student_on_teacher(build_model, r, p)
    fwd = lambda x: student(x)  # noqa: E731
    s1_path = run_dir / "stage1.pt"
    if s1_path.exists():
        student.load_state_dict(torch.load(s1_path, map_location=dev, weights_only=True))
    else:
        c1 = vars(r.stage1)
        distill_stage1(
            student,
            teacher,
            c1,
            p.train_loader(c1["batch"]),
            dev,
            run_dir,
            log,
            lambda: evaluate(lambda x: student.eval()(x), eval_loader, dev),
        )
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
            finetune_stage2(
                student,
                teacher,
                ck,
                p.train_loader(ck["batch"]),
                dev,
                run_dir,
                log,
                lambda: evaluate(lambda x: student.eval()(x), eval_loader, dev),
                name=name,
            )
            torch.save(student.state_dict(), art)

    if student.cfg.entropy_lambda is not None:  # issue 14: tables instead of a calibrated range
        from .entropy_steps import finish

        return finish(r, run_dir, p, student, results)

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
    return save_student(run_dir, "bottlefit", student, calib, r, results, log)
