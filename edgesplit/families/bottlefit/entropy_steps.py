"""The end of a BottleFit run with an entropy bottleneck (recipe key ``split.entropy_lambda``): the
integer tables cut from the learned densities, accuracy with the wire's rounding and clipping
applied, and bytes per frame measured by coding real evaluation frames with codec ``"ans"``.

The run keeps its tables and figures in ``student.pt`` / ``results.json`` (``results.entropy``); the
exporter writes the tables to the bundle's ``cdf.json`` and one ``"ans"`` mode per table set
(:func:`ans_modes`, docs/BUNDLE.md §7.2), its bytes measured again on the exported head's outputs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ...builder.bottleneck import save_student
from ...builder.train import evaluate
from ...wire.ans_codec import ANS_BITS, ANS_CODEC, encode_values, quantize_values
from ...wire.ans_tables import TableSet, parse_tables, tables_document
from .entropy import EntropyQuant, export_tables

CDF_FILE = "cdf.json"

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


def coded_sizes(z: np.ndarray, tables: TableSet) -> np.ndarray:
    """Bytes of each frame of head outputs ``z`` ``[N,C,h,w]`` coded with ``tables`` (scale 1)."""
    return np.array([len(encode_values(quantize_values(f, tables), tables)) for f in z], dtype=np.float64)


def ans_modes(out: Path, state: dict, cfg, z: np.ndarray, acc_source: str, head_ms: dict) -> list[dict]:
    """Write the run's table sets to ``out/cdf.json`` and return one ``"ans"`` mode per set: its
    ``bytes_per_frame`` and ``bytes_p95`` measured by coding ``z`` (the exported head's outputs on
    real images), its accuracy the run's (torch, the wire's rounding and clipping applied). The
    training figures stay in ``training.results.entropy`` without the tables themselves."""
    ent = state["results"]["entropy"]
    doc = ent.pop("tables")
    (out / CDF_FILE).write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    modes = []
    for i, ts in enumerate(parse_tables(doc).values()):
        sizes = coded_sizes(z, ts)
        modes.append(
            {
                "id": i,
                "name": f"c{cfg.bottleneck_channels}-ans-{ts.name}",
                "channels": cfg.bottleneck_channels,
                "bits": ANS_BITS,
                "codec": ANS_CODEC,
                "entropy": {"tables": ts.name, "sha256": ts.digest},
                "quant": {"scale": 1.0, "zero_point": 0},
                "bytes_per_frame": round(float(sizes.mean()), 2),
                "bytes_p95": float(np.percentile(sizes, 95)),
                "bytes_source": f"codec ans on the exported head, {sizes.size} frames of the check images",
                "accuracy": ent["accuracy"],
                "accuracy_source": acc_source,
                "head_ms": head_ms,
            }
        )
    return modes
