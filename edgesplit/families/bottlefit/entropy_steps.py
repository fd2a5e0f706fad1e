"""The end of a BottleFit run with an entropy bottleneck (recipe key ``split.entropy_lambda``): the
integer tables cut from the learned densities, accuracy with the wire's rounding and clipping
applied, and bytes per frame measured by coding real evaluation frames with codec ``"ans"``.

The bundle schema has no ``"ans"`` modes yet (docs/BUNDLE.md §7.2 says what they will hold), so the
run keeps its tables and figures in ``student.pt`` / ``results.json`` (``results.entropy``) and the
exporter refuses such a student with a message that says so.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ...builder.bottleneck import save_student
from ...builder.train import evaluate
from ...wire.ans_codec import encode_values, quantize_values
from ...wire.ans_tables import TableSet, tables_document
from .entropy import EntropyQuant, export_tables

if TYPE_CHECKING:
    from ...builder.pipeline import Prepared
    from ...builder.recipe import Recipe


@torch.no_grad()
def measure_rate(student, loader, tables: TableSet, max_batches: int = 20) -> dict:
    """Code real frames through the wire codec: measured bytes per frame (the tag and every word
    counted), against the tables' ideal code length and the learned density's estimate."""
    student.eval()
    coded, ideal, model = [], [], []
    for b, (x, _) in enumerate(loader):
        if b >= max_batches:
            break
        y = student.encode(x).float()
        zq = student.quant(y)  # eval: rounded and clipped, as the wire sends it
        model.extend((student.quant.last_bits / 8).cpu().tolist())
        for frame in y.cpu().numpy():
            values = quantize_values(frame, tables)
            coded.append(len(encode_values(values, tables)))
            ideal.append(tables.bits(values) / 8)
        assert zq.shape == y.shape
    c = np.array(coded, dtype=np.float64)
    return {
        "frames": int(c.size),
        "bytes_mean": float(c.mean()),
        "bytes_p95": float(np.percentile(c, 95)),
        "ideal_bytes_mean": float(np.mean(ideal)),
        "model_bytes_mean": float(np.mean(model)),
    }


def finish(r: Recipe, run_dir: Path, p: Prepared, student, results: dict) -> dict:
    quant = student.quant
    assert isinstance(quant, EntropyQuant)
    student.eval()
    tables = export_tables(quant)
    quant.clip_to(tables)
    results["entropy"] = {
        "lambda": student.cfg.entropy_lambda,
        "accuracy": evaluate(lambda x: student(x), p.eval_loader, p.dev),
        **measure_rate(student, p.eval_loader, tables),
        "tables": tables_document([tables]),
    }
    results["modes"] = []
    results["eval_frames"] = int(len(p.eval_loader.x))
    results["wall_sec"] = round(time.time() - p.t0, 1)
    return save_student(run_dir, "bottlefit", student, {}, r, results, p.log)
