"""The end of a BottleFit run with an entropy bottleneck (recipe key ``split.entropy_lambda``): the
integer tables cut from the learned densities, accuracy with the wire's rounding and clipping
applied, and bytes per frame measured by coding real evaluation frames with codec ``"ans"``.

**Several rates from one model.** ``split.entropy_steps`` (default ``[1.0]``) lists quantization
steps; each gets its own table set, cut from the same learned density over intervals of that width
(:func:`export_tables`), and its own accuracy and coded bytes, measured with the wire's
``rint(y / step)``, clipping and reconstruction ``k·step`` applied (PROTOCOL.md §4.4's ``scale``).
A coarser step saves bytes and costs accuracy; nothing is retrained. The set of step 1 is ``main``,
the others ``s<step>`` (``s1.5``, ``s2``).

The run keeps its tables and figures in ``student.pt`` / ``results.json`` (``results.entropy``: the
step-1 figures at its top level as before, every step's in ``steps``); the exporter writes the
tables to the bundle's ``cdf.json`` and one ``"ans"`` mode per step (:func:`ans_modes`, docs/BUNDLE.md
§7.2), its bytes measured again on the exported head's outputs. An exporter asked for steps the run
did not measure measures them all again (:func:`remeasure_steps`) on the recipe's evaluation split.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch

from ...builder.bottleneck import save_student
from ...builder.train import evaluate
from ...wire.ans_codec import ANS_BITS, ANS_CODEC, encode_values, quantize_values
from ...wire.ans_tables import MAX_ALPHABET, TableSet, make_table_set, parse_tables, quantize_pmf, tables_document
from .entropy import EntropyQuant

CDF_FILE = "cdf.json"
MAIN_TABLES = "main"  # the table set of step 1, the step the model trained at
TAIL_MASS = 1e-6  # probability left outside a channel's table (values there are clipped to its ends)

if TYPE_CHECKING:
    from ...builder.pipeline import Prepared
    from ...builder.recipe import Recipe


def tables_name(step: float) -> str:
    """The table set of a step: ``main`` for 1.0, else ``s<step>`` (``s1.5``, ``s2``, ``s0.75``)."""
    return MAIN_TABLES if step == 1.0 else f"s{step:g}"


@contextmanager
def at_step(quant: EntropyQuant, tables: TableSet, step: float) -> Iterator[None]:
    """Evaluate ``quant`` as a mode of ``step`` with ``tables`` sends (its clipping and step), then
    put back its clipping and step 1, the step it trains and is saved at."""
    lo, hi = quant.lo.clone(), quant.hi.clone()
    quant.clip_to(tables)
    quant.step = step
    try:
        yield
    finally:
        quant.lo.copy_(lo)
        quant.hi.copy_(hi)
        quant.step = 1.0


def export_tables(
    quant: EntropyQuant,
    name: str = "main",
    tail_mass: float = TAIL_MASS,
    limit: int = MAX_ALPHABET // 2 - 1,
    step: float = 1.0,
) -> TableSet:
    """The learned densities as integer tables for quantization step ``step``: per channel, the
    integers ``lo..hi`` (value ``k`` standing for ``k·step``) outside of which the density leaves at
    most ``tail_mass``, each given the probability of its interval ``[(k - ½)step, (k + ½)step]``;
    the two end entries also take the tails beyond them (the encoder clips values there), and the
    probabilities are rounded to 16-bit integer frequencies."""
    # edges (k - 0.5)·step for k = -limit .. limit + 1
    grid = (np.arange(-limit, limit + 2, dtype=np.float64) - 0.5) * step
    cdf = quant.prior.cdf_at(grid)
    offsets, freqs = [], []
    for c in range(cdf.shape[0]):
        edges = np.maximum.accumulate(cdf[c])  # monotone by construction; guards rounding
        # lowest lo with P(v <= lo) > tail/2, highest hi with P(v >= hi) > tail/2 (at least 2 entries)
        lo_i = int(np.argmax(edges[1:] > tail_mass / 2))
        above = np.nonzero(edges[:-1] < 1.0 - tail_mass / 2)[0]
        hi_i = int(above[-1]) if above.size else lo_i + 1
        hi_i = max(hi_i, lo_i + 1)
        cut = edges[lo_i + 1 : hi_i + 1]  # interior edges between lo and hi
        pmf = np.diff(np.concatenate([[0.0], cut, [1.0]]))
        offsets.append(lo_i - limit)
        freqs.append(quantize_pmf(np.maximum(pmf, 0.0)))
    return make_table_set(name, offsets, freqs)


@torch.no_grad()
def measure_rate(student, loader, tables: TableSet, max_batches: int = 20, step: float = 1.0) -> dict:
    """Code real frames through the wire codec at ``step``: measured bytes per frame (the tag and
    every word counted), against the tables' ideal code length and the learned density's estimate.
    ``student.quant`` must already be at that step (:func:`at_step`)."""
    student.eval()
    coded, ideal, model = [], [], []
    for b, (x, _) in enumerate(loader):
        if b >= max_batches:
            break
        y = student.encode(x).float()
        zq = student.quant(y)  # eval: rounded and clipped, as the wire sends it
        model.extend((student.quant.last_bits / 8).cpu().tolist())
        for frame in y.cpu().numpy():
            values = quantize_values(frame, tables, step)
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


def measure_steps(student, loader, device: torch.device, steps: list[float]) -> tuple[list[dict], list[TableSet]]:
    """Per step: its table set, and the accuracy and coded bytes of the student sending at that step
    (``loader``: real evaluation frames). Returns the figures (no tables) and the sets, step order."""
    quant = student.quant
    assert isinstance(quant, EntropyQuant)
    student.eval()
    figures, sets = [], []
    for step in steps:
        tables = export_tables(quant, tables_name(step), step=step)
        with at_step(quant, tables, step):
            acc = evaluate(lambda x: student(x), loader, device)
            rate = measure_rate(student, loader, tables, step=step)
        figures.append({"step": step, "tables": tables.name, "accuracy": acc, **rate})
        sets.append(tables)
    return figures, sets


def entropy_results(lam: float | None, figures: list[dict], sets: list[TableSet]) -> dict:
    """``results.entropy``: step 1's figures at the top level (as a one-step run has them), every
    step's in ``steps``, and the tables document."""
    main = next(f for f in figures if f["step"] == 1.0)
    top = {k: v for k, v in main.items() if k not in ("step", "tables")}
    return {"lambda": lam, **top, "steps": figures, "tables": tables_document(sets)}


def finish(r: Recipe, run_dir: Path, p: Prepared, student, results: dict) -> dict:
    quant = student.quant
    assert isinstance(quant, EntropyQuant)
    # Checked when the recipe was loaded. getattr: a recipe object from before the key existed (a
    # run already under way when it was added) finishes with step 1 alone.
    steps = sorted(float(s) for s in getattr(r.split, "entropy_steps", None) or [1.0])
    figures, sets = measure_steps(student, p.eval_loader, p.dev, steps)
    quant.clip_to(sets[steps.index(1.0)])  # the saved student sends what the main mode sends
    results["entropy"] = entropy_results(student.cfg.entropy_lambda, figures, sets)
    results["modes"] = []
    results["eval_frames"] = int(len(p.eval_loader.x))
    results["wall_sec"] = round(time.time() - p.t0, 1)
    return save_student(run_dir, "bottlefit", student, {}, r, results, p.log)


def remeasure_steps(student, state: dict, steps: list[float], limit_per_shard: int | None = None) -> None:
    """An export asked for ``steps``: when the run measured exactly those, nothing to do; otherwise
    measure every one of them again (step 1 too, so that all come from one measurement) on the
    recipe's evaluation split, in torch on the CPU (``limit_per_shard``: the first images of each
    shard only, as ``edgesplit train --limit-per-shard``), and put the figures and tables into
    ``state["results"]`` as the run would have (``eval_frames`` updated)."""
    from ...builder.data import MEAN, STD, DeviceLoader, load_split
    from .config import check_entropy_steps

    steps = check_entropy_steps(steps, "entropy steps")
    results = state["results"]
    ent = results["entropy"]
    if [f["step"] for f in ent.get("steps", [{"step": 1.0}])] == steps:
        return
    recipe = state["recipe"]
    x, y = load_split(recipe["dataset"], recipe["eval_split"], recipe["input_size"], None, limit_per_shard)
    dev = torch.device("cpu")
    figures, sets = measure_steps(student, DeviceLoader(x, y, 500, dev, MEAN, STD), dev, steps)
    results["entropy"] = {**entropy_results(ent["lambda"], figures, sets), "measured": "at export"}
    results["eval_frames"] = int(len(x))


def coded_sizes(z: np.ndarray, tables: TableSet, step: float = 1.0) -> np.ndarray:
    """Bytes of each frame of head outputs ``z`` ``[N,C,h,w]`` coded with ``tables`` at ``step``."""
    return np.array([len(encode_values(quantize_values(f, tables, step), tables)) for f in z], dtype=np.float64)


def run_steps(ent: dict[str, Any]) -> list[dict]:
    """A run's per-step figures (``step``, ``tables``, ``accuracy``), step order; a run from before
    ``entropy_steps`` measured step 1 only, at the top level of ``results.entropy``."""
    steps = ent.get("steps") or [{"step": 1.0, "tables": MAIN_TABLES, "accuracy": ent["accuracy"]}]
    return sorted(steps, key=lambda f: f["step"])


def ans_modes(out: Path, state: dict, cfg, z: np.ndarray, acc_source: str, head_ms: dict) -> list[dict]:
    """Write the run's table sets to ``out/cdf.json`` and return one ``"ans"`` mode per step, finest
    first (most bytes first, as the uniform modes go from most bits down): ``quant.scale`` is the
    step, ``bytes_per_frame`` and ``bytes_p95`` are measured by coding ``z`` (the exported head's
    outputs on real images) at that step, the accuracy is the run's (torch, the wire's rounding,
    clipping and step applied). The training figures stay in ``training.results.entropy`` without
    the tables themselves."""
    ent = state["results"]["entropy"]
    doc = ent.pop("tables")
    (out / CDF_FILE).write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    sets = parse_tables(doc)
    modes = []
    for i, fig in enumerate(run_steps(ent)):
        ts, step = sets[fig["tables"]], float(fig["step"])
        sizes = coded_sizes(z, ts, step)
        modes.append(
            {
                "id": i,
                "name": f"c{cfg.bottleneck_channels}-ans-{ts.name}",
                "channels": cfg.bottleneck_channels,
                "bits": ANS_BITS,
                "codec": ANS_CODEC,
                "entropy": {"tables": ts.name, "sha256": ts.digest},
                "quant": {"scale": step, "zero_point": 0},
                "bytes_per_frame": round(float(sizes.mean()), 2),
                "bytes_p95": float(np.percentile(sizes, 95)),
                "bytes_source": f"codec ans on the exported head, {sizes.size} frames of the check images",
                "accuracy": fig["accuracy"],
                "accuracy_source": acc_source,
                "head_ms": head_ms,
            }
        )
    return modes


def default_mode_id(modes: list[dict]) -> int:
    """The mode of step 1 (the step the model trained at)."""
    return next(m["id"] for m in modes if m["quant"]["scale"] == 1.0)
