"""A bundle from any ONNX graph cut at one tensor, and the ``edgesplit split model.onnx`` command.

    edgesplit split model.onnx --list
    edgesplit split model.onnx --at relu_6 --out models/my-split --dataset cifar10

The bundle has one mode: the cut tensor quantized to 8 bits per tensor, its range calibrated on the
head's output for real frames of the dataset's training split (``--calib-frames``). The checks and
accuracies run in ONNX Runtime on frames of its evaluation split (``--frames``): head-then-tail
against the whole graph in float, the 8-bit mode's top-1 accuracy and agreement with the whole
graph, and the whole graph's own accuracy (``teacher_accuracy``). ``full.onnx`` is the source graph
(pruned to its scores output) for the agent's local fallback.

Around the graph's own tensors every file gets the bundle's names and shapes (see
:func:`~edgesplit.builder.split_onnx_io.with_io`): the input is an ``[N, 3, S, S]`` image (a
``Transpose`` in front for an NHWC graph, a ``Reshape`` for a flat one); the wire tensor is
``[C, h, w]``, and a cut tensor of another rank travels as ``[numel, 1, 1]`` (a ``Reshape`` after
the head and before the tail, which moves no data).

An ONNX file does not say how its input was preprocessed: ``--input-size`` (default: read from the
graph input), ``--mean``/``--std`` (default: the ImageNet statistics the zoo uses), ``--resize``
(default: the input size) and ``--dataset`` (classes and frames; default cifar10 at 32 px, else
imagenette) say it, and the command prints what it used. The manifest is written by the exporters'
builder (:func:`~edgesplit.builder.export_common.bundle_manifest`); like the planner's cut bundles
it says ``family: bottlefit`` with ``split.generic: true``, since the bundle contract has no
generic-split family.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from .split_onnx import (
    OnnxCut,
    OnnxSplitError,
    cut_points,
    load_graph,
    require_cut_points,
    run1,
    session,
    split_graph,
    verify_split,
)
from .split_onnx_io import IMAGE_NAME, WIRE_NAME, image_side, input_adapter, with_io

EVAL_SPLIT = {"cifar10": "test", "imagenette": "val"}


@dataclass(frozen=True)
class OnnxSplitConfig:
    """The split as the manifest's ``model.config`` records it."""

    arch: str  # "onnx:<file name>"
    split_at: str  # the cut tensor
    source_sha256: str
    output: str  # the graph output taken as the scores
    input_adapter: str  # how an [N,3,S,S] image feeds the graph: "none", "Transpose" or "Reshape"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def quant_8bit(z: np.ndarray) -> dict[str, Any]:
    """Per-tensor affine 8-bit parameters covering the values seen (and 0)."""
    lo, hi = float(min(0.0, z.min())), float(max(0.0, z.max()))
    scale = (hi - lo) / 255 if hi > lo else 1.0
    return {"scheme": "affine-per-tensor", "scale": scale, "zero_point": int(np.clip(round(-lo / scale), 0, 255))}


def _fresh(model: onnx.ModelProto, want: str) -> str:
    """``want``, or ``want_<k>`` when the graph already uses the name."""
    g = model.graph
    used = {x for n in g.node for x in (*n.input, *n.output)} | {t.name for t in g.initializer}
    used |= {v.name for v in (*g.input, *g.output)}
    name, k = want, 1
    while name in used:
        name, k = f"{want}_{k}", k + 1
    return name


def _input_spec(side: int, mean, std, resize: int | None) -> dict[str, Any]:
    return {
        "shape": [3, side, side],
        "layout": "NCHW",
        "dtype": "float32",
        "color": "RGB",
        "resize": int(resize or side),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
    }


def real_frames(source: str, spec: dict, n: int) -> tuple[np.ndarray, np.ndarray]:
    from ..data.sources import open_source, take
    from ..data.transforms import preprocess

    samples = list(take(open_source(source), n))
    return np.stack([preprocess(s.data, spec) for s in samples]), np.asarray([s.label for s in samples])


@dataclass(frozen=True)
class BundleGraphs:
    full: onnx.ModelProto  # image -> logits
    head: onnx.ModelProto  # image -> z  [N, C, h, w]
    tail: onnx.ModelProto  # z -> logits
    wire_shape: tuple[int, int, int]
    cut: OnnxCut
    adapter: tuple[str, list[int]] | None


def bundle_graphs(graph: onnx.ModelProto, tensor: str, side: int) -> BundleGraphs:
    """The three graphs of the bundle, with the bundle's input, wire and output conventions."""
    adapter = input_adapter(graph, side)
    scores = graph.graph.output[0]
    if scores.type.tensor_type.elem_type != TensorProto.FLOAT or len(scores.type.tensor_type.shape.dim) != 2:
        raise OnnxSplitError(f"the graph output '{scores.name}' is not float32 scores [N, K]: name them with --output")
    head, tail = split_graph(graph, tensor)
    cut = next(c for c in cut_points(graph) if c.name == tensor)
    frame = cut.frame_shape
    numel = int(np.prod(frame))
    wire: tuple[int, int, int] = (frame[0], frame[1], frame[2]) if len(frame) == 3 else (numel, 1, 1)
    reshape = None if len(frame) == 3 else [-1, *wire]
    unshape = None if len(frame) == 3 else ("Reshape", [-1, *frame])
    out_dims = graph.graph.output[0].type.tensor_type.shape.dim
    k = out_dims[1].dim_value if len(out_dims) == 2 and out_dims[1].HasField("dim_value") else "classes"
    image = (_fresh(graph, IMAGE_NAME), ["batch", 3, side, side], adapter)
    logits = (_fresh(graph, "logits"), ["batch", k], None)
    z = _fresh(graph, WIRE_NAME)
    return BundleGraphs(
        full=with_io(graph, new_input=image, new_output=logits),
        head=with_io(head, new_input=image, new_output=(z, ["batch", *wire], reshape)),
        tail=with_io(tail, new_input=(z, ["batch", *wire], unshape), new_output=logits),
        wire_shape=wire,
        cut=cut,
        adapter=adapter,
    )


def _quantized(z: np.ndarray, quant: dict) -> np.ndarray:
    """What the server's tail receives: the codec's 8-bit quantize-dequantize (docs/PROTOCOL.md §4.1)."""
    from ..wire.quantize import dequantize, quantize

    q = quantize(z, 8, quant["scale"], quant["zero_point"])
    return dequantize(q, quant["scale"], quant["zero_point"]).reshape(z.shape)


def build_onnx_bundle(
    path: str | Path,
    tensor: str,
    out: str | Path,
    *,
    output: str | None = None,
    input_size: int | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    resize: int | None = None,
    dataset: str | None = None,
    frames: int = 64,
    calib_frames: int = 256,
    name: str | None = None,
):
    """Cut the ONNX graph at ``tensor`` and write a one-mode 8-bit bundle to ``out``; returns the
    loaded :class:`~edgesplit.bundle.Bundle` and the checks."""
    from ..bundle import Bundle, write_manifest
    from ..data.sources import CLASSES
    from .data import MEAN, STD
    from .export_common import bundle_manifest, head_latency_ms, host_profile_name

    src = Path(path)
    graph = load_graph(src, output)
    side = input_size or image_side(graph)
    if side is None:
        raise OnnxSplitError(f"the input size cannot be read from {src.name}'s input: give --input-size S")
    data = dataset or ("cifar10" if side == 32 else "imagenette")
    if data not in CLASSES:
        raise OnnxSplitError(f"unknown --dataset '{data}' (known: {', '.join(CLASSES)})")
    classes = CLASSES[data]
    g = bundle_graphs(graph, tensor, side)
    k = g.full.graph.output[0].type.tensor_type.shape.dim[1]
    if k.HasField("dim_value") and k.dim_value != len(classes):
        raise OnnxSplitError(
            f"the graph outputs {k.dim_value} scores but --dataset {data}"
            f"{'' if dataset else f' (the default at {side} px)'} has {len(classes)} classes: give --dataset"
        )
    spec = _input_spec(side, mean or MEAN, std or STD, resize)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    for role, m in (("head", g.head), ("tail", g.tail), ("full", g.full)):
        onnx.save(m, str(root / f"{role}.onnx"))

    calib, _ = real_frames(f"{data}:train", spec, calib_frames)
    quant = quant_8bit(run1(session(g.head), calib))
    x, y = real_frames(f"{data}:{EVAL_SPLIT[data]}", spec, frames)
    whole = run1(session(g.full), x)
    served = run1(session(g.tail), _quantized(run1(session(g.head), x), quant))
    checks = {
        "head_then_tail": verify_split(g.full, g.head, g.tail, x),
        "8bit_vs_full": {"frames": len(x), "top1_agreement": float(np.mean(served.argmax(1) == whole.argmax(1)))},
    }
    teacher_acc, mode_acc = float(np.mean(whole.argmax(1) == y)), float(np.mean(served.argmax(1) == y))
    C, h, w = g.wire_shape
    mode = {
        "id": 0,
        "name": f"c{C}-b8",
        "channels": C,
        "bits": 8,
        "quant": quant,
        "bytes_per_frame": C * h * w,
        "accuracy": mode_acc,
        "accuracy_source": f"onnxruntime, {len(x)} frames of {data}:{EVAL_SPLIT[data]}",
        "head_ms": {host_profile_name(): head_latency_ms(root / "head.onnx", x[:1], threads=1)},
    }
    source_sha = hashlib.sha256(src.read_bytes()).hexdigest()
    cfg = OnnxSplitConfig(
        arch=f"onnx:{src.name}",
        split_at=tensor,
        source_sha256=source_sha,
        output=graph.graph.output[0].name,
        input_adapter=g.adapter[0] if g.adapter else "none",
    )
    bundle_name = name or f"{src.stem}-cut-{tensor}"
    state = {
        "recipe": {
            "name": bundle_name,
            "description": f"{src.name} (ONNX) cut at tensor {tensor} ({g.cut.op}), 8-bit wire",
            "dataset": data,
            "eval_split": EVAL_SPLIT[data],
        },
        "results": {"teacher_accuracy": teacher_acc},
        "classes": classes,
    }
    fp16 = any(t.data_type == TensorProto.FLOAT16 for t in g.full.graph.initializer)
    manifest = bundle_manifest(
        family="bottlefit",
        name=bundle_name,
        state=state,
        cfg=cfg,
        input_spec=spec,
        wire={
            "name": g.head.graph.output[0].name,
            "shape": list(g.wire_shape),
            "dtype": "float32",
            "quantization": "affine per tensor, 8 bits",
        },
        modes=[mode],
        default=0,
        files={r: {"path": f"{r}.onnx"} for r in ("head", "tail", "full")},
        checks=checks,
        weights="fp16" if fp16 else "fp32",
    )
    manifest.pop("training")  # nothing was trained here
    manifest["split"] = {
        "generic": True,
        "source": "onnx",
        "source_file": src.name,
        "source_sha256": source_sha,
        "cut": tensor,
        "op": g.cut.op,
        "cut_shape": list(g.cut.shape),
    }
    write_manifest(root, manifest)
    return Bundle.load(root), {
        "cut": asdict(g.cut),
        "checks": checks,
        "teacher_accuracy": teacher_acc,
        "mode_accuracy": mode_acc,
        "input": spec,
        "dataset": data,
    }


def onnx_split_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="edgesplit split", description="cut an ONNX graph at a tensor into a bundle (head, 8-bit wire, tail)"
    )
    p.add_argument("model", help="an .onnx file exported by any framework")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--list", action="store_true", help="list the single-tensor cut points with their sizes")
    what.add_argument("--at", metavar="TENSOR", help="tensor to cut at (a name from --list)")
    p.add_argument("--out", help="bundle directory (with --at)")
    p.add_argument("--output", help="the graph output holding the scores (default: its only [N,K] float output)")
    p.add_argument("--input-size", type=int, help="image side S (default: read from the graph input)")
    p.add_argument("--mean", type=float, nargs=3, help="per-channel mean on [0,1] (default: ImageNet's)")
    p.add_argument("--std", type=float, nargs=3, help="per-channel std on [0,1] (default: ImageNet's)")
    p.add_argument("--resize", type=int, help="shorter side before the centre crop (default: the input size)")
    p.add_argument("--dataset", help="classes and frames: cifar10 or imagenette (default: cifar10 at 32 px)")
    p.add_argument("--frames", type=int, default=64, help="evaluation frames for the checks")
    p.add_argument("--calib-frames", type=int, default=256, help="training frames calibrating the 8-bit range")
    p.add_argument("--name", help="bundle name (default: <file>-cut-<tensor>)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    a = p.parse_args(argv)
    if a.at and not a.out:
        p.error("--at needs --out DIR")
    try:
        if a.list:
            cuts = require_cut_points(load_graph(a.model, a.output))
            if a.json:
                print(json.dumps([asdict(c) for c in cuts], indent=2))
            else:
                print(f"{'tensor':<28} {'op':<16} {'shape':<20} {'fp32/frame':>11}  {'8-bit':>11}")
                print("\n".join(c.describe() for c in cuts))
            return 0
        bundle, result = build_onnx_bundle(
            a.model,
            a.at,
            a.out,
            output=a.output,
            input_size=a.input_size,
            mean=a.mean,
            std=a.std,
            resize=a.resize,
            dataset=a.dataset,
            frames=a.frames,
            calib_frames=a.calib_frames,
            name=a.name,
        )
    except OnnxSplitError as e:
        print(f"edgesplit split: {e}", file=sys.stderr)
        return 2
    result["bundle"] = {"path": str(a.out), "hash": bundle.hash}
    if a.json:
        print(json.dumps(result, indent=2))
        return 0
    chk, spec = result["checks"]["head_then_tail"], result["input"]
    print(
        f"cut at {a.at}: {result['cut']['bytes_per_frame_8bit']} B/frame at 8 bits; head-then-tail vs the graph: "
        f"max abs diff {chk['max_abs_diff']:.2e}, top-1 agreement {chk.get('top1_agreement', float('nan')):.3f}; "
        f"8-bit accuracy {result['mode_accuracy']:.3f} (graph {result['teacher_accuracy']:.3f}) on "
        f"{chk['frames']} frames of {result['dataset']}\ninput: {spec['shape']}, resize {spec['resize']}, "
        f"mean {spec['mean']}, std {spec['std']} (--input-size/--resize/--mean/--std to change)\n"
        f"wrote {a.out} (bundle {bundle.hash[:12]})"
    )
    return 0
