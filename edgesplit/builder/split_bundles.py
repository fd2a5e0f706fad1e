"""Every cut point of the generic split (:mod:`edgesplit.builder.split`) as a small bundle that the
real agent and server can run, for the split planner (``edgesplit plan --model``) and its
validation benchmark (``edgesplit bench plan``).

Each bundle holds ``head.onnx`` and ``tail.onnx`` of one cut and one mode: the crossing tensor
quantized to 8 bits (per-tensor affine, range from the head's output on real frames), as the wire
codec sends it. The server's wire tensor is ``[C, h, w]``; a cut whose tensor has another rank
(after ``flatten``) is carried as ``[numel, 1, 1]``: the head reshapes after the cut and the tail
before it, which moves no data. The bundles carry no accuracy (the weights may be random: they are
for timing) and are written once into a cache keyed by model, checkpoint and input size.

The manifest says ``family: bottlefit`` because the bundle contract knows no generic-split family
yet; ``split.generic: true`` and the description say what it really is.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..bundle import Bundle, BundleError, write_manifest
from .split import Cut, candidate_cuts, export_split, split_at, trace
from .split_onnx_bundle import quant_8bit

SEED = 0


class _Flat3d(torch.nn.Module):
    """The head with its output as ``[N, numel, 1, 1]``."""

    def __init__(self, head: torch.nn.Module):
        super().__init__()
        self.head = head

    def forward(self, x):
        z = self.head(x)
        return z.reshape(z.shape[0], -1, 1, 1)


class _Unflat(torch.nn.Module):
    """The tail taking ``[N, numel, 1, 1]`` back to the cut tensor's shape."""

    def __init__(self, tail: torch.nn.Module, shape: tuple[int, ...]):
        super().__init__()
        self.tail, self.shape = tail, tuple(shape)

    def forward(self, z):
        return self.tail(z.reshape(z.shape[0], *self.shape))


def _dataset(side: int) -> str:
    return "cifar10" if side == 32 else "imagenette"


def _input_spec(side: int) -> dict[str, Any]:
    from .export_common import input_spec_for  # imports torch: only when a bundle is built

    return input_spec_for(side)


def _real_frames(side: int, n: int) -> np.ndarray:
    from ..data.sources import open_source, take
    from ..data.transforms import preprocess

    src = f"{_dataset(side)}:{'test' if side == 32 else 'val'}"
    return np.stack([preprocess(s.data, _input_spec(side)) for s in take(open_source(src), n)])


def export_cut_bundle(
    gm, cut: Cut, frames: np.ndarray, out: Path, *, model: str, classes: list[str], side: int
) -> Bundle:
    head, tail = split_at(gm, None, cut.name)
    shape = tuple(cut.shape)
    if len(shape) != 3:
        head, tail = _Flat3d(head), _Unflat(tail, shape)
        shape = (int(np.prod(shape)), 1, 1)
    x = torch.from_numpy(frames)
    with torch.no_grad():
        z = head(x).numpy()
    checks = export_split(head, tail, x[:8], out)
    numel = int(np.prod(shape))
    mode = {
        "id": 0,
        "name": f"c{shape[0]}-b8",
        "channels": shape[0],
        "bits": 8,
        "quant": quant_8bit(z),
        "bytes_per_frame": numel,
        "accuracy": None,
        "head_ms": {},
    }
    manifest = {
        "schema_version": 1,
        "name": f"{model}-cut-{cut.name}",
        "family": "bottlefit",
        "description": f"generic split of {model} after node {cut.name} ({cut.op}), no bottleneck: for planning and timing",
        "classes": classes,
        "input": _input_spec(side),
        "wire": {"name": "z", "shape": list(shape), "dtype": "float32", "quantization": "affine per tensor, 8 bits"},
        "modes": [mode],
        "default_mode": 0,
        "files": {"head": {"path": "head.onnx"}, "tail": {"path": "tail.onnx"}},
        "split": {
            "generic": True,
            "model": model,
            "cut": cut.name,
            "op": cut.op,
            "module": cut.module,
            "cut_shape": list(cut.shape),
            "export_checks": checks,
        },
    }
    write_manifest(out, manifest)
    return Bundle.load(out)


def _load_model(model: str, checkpoint: str | None, classes: int):
    from .zoo import create_model, load_pretrained

    torch.manual_seed(SEED)  # random init is for timing only, but the same cache must mean the same weights
    m = load_pretrained(model, checkpoint, classes) if checkpoint else create_model(model, classes)
    return m.eval()


def cache_dir(model: str, checkpoint: str | None, side: int, cache: str | Path | None) -> Path:
    key = hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()[:12] if checkpoint else f"random{SEED}"
    return Path(cache or "runs/cache/plan") / f"{model}-{key}-{side}px"


def cut_bundles(
    model: str,
    *,
    checkpoint: str | None = None,
    cuts: list[str] | None = None,
    input_size: int | None = None,
    cache: str | Path | None = None,
    progress=None,
) -> tuple[list[tuple[Cut, Path]], Path, dict[str, Any]]:
    """``[(cut, bundle dir)]`` for the chosen cut points (all by default), exported on first use,
    and the full model's ONNX (for the local and raw options)."""
    from ..data.sources import CLASSES
    from .export_common import export_onnx, store_weights_fp16
    from .zoo import INPUT_SIZE

    if model not in INPUT_SIZE:
        raise KeyError(f"unknown zoo model '{model}' (known: {', '.join(sorted(INPUT_SIZE))})")
    side = int(input_size or INPUT_SIZE[model])
    classes = CLASSES[_dataset(side)]
    root = cache_dir(model, checkpoint, side, cache)
    net = _load_model(model, checkpoint, len(classes))
    gm = trace(net, torch.zeros(2, 3, side, side))
    all_cuts = candidate_cuts(gm)
    by_name = {c.name: c for c in all_cuts}
    unknown = [c for c in (cuts or []) if c not in by_name]
    if unknown:
        raise ValueError(f"no cut point {', '.join(unknown)} in {model} (cut points: {', '.join(by_name)})")
    chosen = [by_name[c] for c in cuts] if cuts else all_cuts
    frames = _real_frames(side, 16)
    out = []
    for cut in chosen:
        d = root / cut.name
        try:
            Bundle.load(d)
        except BundleError:
            if progress:
                progress(f"exporting {model} cut {cut.name}")
            export_cut_bundle(gm, cut, frames, d, model=model, classes=classes, side=side)
        out.append((cut, d))
    full = root / "full.onnx"
    if not full.is_file():
        root.mkdir(parents=True, exist_ok=True)
        export_onnx(net, torch.from_numpy(frames[:2]), full, "image", "logits")
        store_weights_fp16(full)
    meta = {
        "model": model,
        "checkpoint": checkpoint,
        "input_size": side,
        "cache": str(root),
        "cut_points": len(all_cuts),
        "planned_cuts": [c.name for c, _ in out],
    }
    return out, full, meta
