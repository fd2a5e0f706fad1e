"""``edgesplit export``: a trained split -> a bundle (head.onnx, tail.onnx, full.onnx, manifest.json).

- head.onnx: image [N,3,H,W] -> wire tensor ``z`` [N,C,h,w] (float; the codec quantizes it).
- tail.onnx: ``z`` -> logits [N,classes] (decoder + the backbone's remaining stages).
- full.onnx: the unsplit reference model (the teacher) for local fallback and for the
  "send the JPEG instead" baseline.

Each graph is checked against torch on real images (max abs diff and top-1 agreement go into the
manifest). Weights are stored as float16 with a Cast to float32 in front (``--weights fp16``):
half the bytes on disk and on the wire to the device, and ONNX Runtime folds the Cast at load
time so compute stays float32.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..bundle import Bundle, write_manifest
from ..data.sources import open_source, take
from ..data.transforms import preprocess
from ..engine import create_engine
from ..wire.codec import packed_nbytes
from .families.bottlefit import BottleFitSplit
from .pipeline import MEAN, STD, load_student
from .zoo import create_model

OPSET = 18


def _export_onnx(module: torch.nn.Module, example: torch.Tensor, path: Path, in_name: str, out_name: str) -> None:
    module = module.eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        prog = torch.onnx.export(module, (example,), dynamo=True, opset_version=OPSET, input_names=[in_name],
                                 output_names=[out_name], dynamic_shapes=({0: batch},), optimize=True, verbose=False)
    prog.save(str(path))


def store_weights_fp16(path: Path, min_elements: int = 256) -> None:
    """Rewrite large float32 initializers as float16 + Cast(to=float32)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    g = model.graph
    keep, casts = [], []
    for init in g.initializer:
        if init.data_type == TensorProto.FLOAT and int(np.prod(init.dims)) >= min_elements:
            arr = numpy_helper.to_array(init)
            half = numpy_helper.from_array(arr.astype(np.float16), init.name + "__fp16")
            keep.append(half)
            casts.append(helper.make_node("Cast", [half.name], [init.name], to=TensorProto.FLOAT, name=init.name + "__cast"))
        else:
            keep.append(init)
    del g.initializer[:]
    g.initializer.extend(keep)
    nodes = list(g.node)
    del g.node[:]
    g.node.extend(casts + nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _eval_images(dataset: str, split: str, input_spec: dict, n: int) -> tuple[np.ndarray, np.ndarray]:
    samples = list(take(open_source(f"{dataset}:{split}"), n))
    x = np.stack([preprocess(s.data, input_spec) for s in samples])
    y = np.asarray([s.label for s in samples])
    return x, y


def _check(name: str, engine, torch_fn, x: np.ndarray, classify: bool) -> dict:
    with torch.no_grad():
        ref = torch_fn(torch.from_numpy(x)).float().numpy()
    out = engine.run1(x)
    diff = float(np.max(np.abs(out - ref)))
    # Relative to the output's range: float16-stored weights give ~1e-3 here whatever the scale.
    rec = {"max_abs_diff": diff, "max_rel_diff": diff / max(1e-12, float(np.max(np.abs(ref)))), "frames": int(len(x))}
    if classify:
        rec["top1_agreement"] = float(np.mean(out.argmax(1) == ref.argmax(1)))
    return rec


def _head_latency_ms(path: Path, x1: np.ndarray, threads: int, runs: int = 60) -> float:
    eng = create_engine(path, "ort", threads=threads)
    for _ in range(5):
        eng.run1(x1)
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        eng.run1(x1)
        ts.append((time.perf_counter() - t) * 1e3)
    return float(np.median(ts))


def host_profile_name() -> str:
    return f"{platform.machine()}-cpu"


def export_torch_tail(tail: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    """Save the tail as a torch.export program (graph + weights, no pickled code) for the server's
    torch backend; the batch axis stays dynamic."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    prog = torch.export.export(tail.eval(), (example,), dynamic_shapes=({0: batch},))
    torch.export.save(prog, str(path))


def load_teacher(cfg, student_path: Path, teacher_path: str | Path | None) -> torch.nn.Module:
    """The split's full model (``teacher.pt`` beside the student unless given), strictly loaded."""
    teacher = create_model(cfg.arch, cfg.num_classes)
    tpath = Path(teacher_path) if teacher_path else student_path.parent / "teacher.pt"
    teacher.load_state_dict(torch.load(str(tpath), map_location="cpu", weights_only=True), strict=True)
    return teacher.eval()


def input_spec_for(side: int) -> dict:
    return {"shape": [3, side, side], "layout": "NCHW", "dtype": "float32", "color": "RGB",
            "resize": side, "mean": list(MEAN), "std": list(STD)}


def bundle_manifest(*, family: str, name: str | None, state: dict, cfg, input_spec: dict, wire: dict, modes: list[dict],
                    default: int, files: dict, checks: dict, weights: str) -> dict:
    """The manifest fields every family writes the same way around its own wire, modes and files."""
    recipe, results = state["recipe"], state["results"]
    return {
        "schema_version": 1,
        "name": name or recipe["name"],
        "family": family,
        "description": recipe.get("description", ""),
        "classes": list(state["classes"]),
        "input": input_spec,
        "wire": wire,
        "modes": modes,
        "default_mode": default,
        "files": files,
        "model": {"arch": cfg.arch, "split_at": cfg.split_at, "config": cfg.to_dict()},
        "teacher_accuracy": results["teacher_accuracy"],
        "export": {"opset": OPSET, "weights": weights, "checks": checks, "check_source": f"{recipe['dataset']}:{recipe['eval_split']}"},
        "training": {"recipe": recipe["name"], "results": results},
        "tools": {"edgesplit": __version__, "torch": torch.__version__, "onnx": _version("onnx"),
                  "onnxruntime": _version("onnxruntime"), "python": platform.python_version()},
        "measured_on": {host_profile_name(): f"{platform.processor() or platform.machine()}, head latency with 1 thread, batch 1"},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def export_bundle(student_path: str | Path, out_dir: str | Path, name: str | None = None,
                  check_frames: int = 256, weights: str = "fp16", teacher_path: str | Path | None = None,
                  torch_tail: bool = False) -> Bundle:
    student_path = Path(student_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, state = load_student(student_path)
    model: BottleFitSplit
    recipe, results = state["recipe"], state["results"]
    cfg = model.cfg
    side = cfg.input_size
    teacher = load_teacher(cfg, student_path, teacher_path)

    ex_img = torch.zeros(2, 3, side, side)
    ex_z = torch.zeros(2, *model.wire_shape)
    head, tail = model.head_module(), model.tail_module()
    _export_onnx(head, ex_img, out / "head.onnx", "image", "z")
    _export_onnx(tail, ex_z, out / "tail.onnx", "z", "logits")
    _export_onnx(teacher, ex_img, out / "full.onnx", "image", "logits")
    if weights == "fp16":
        for f in ("head.onnx", "tail.onnx", "full.onnx"):
            store_weights_fp16(out / f)
    files = {"head": {"path": "head.onnx"}, "tail": {"path": "tail.onnx"}, "full": {"path": "full.onnx", "model": "teacher"}}
    if torch_tail:
        export_torch_tail(tail, ex_z, out / "tail.pt2")
        files["tail_torch"] = {"path": "tail.pt2"}

    input_spec = input_spec_for(side)
    x, _ = _eval_images(recipe["dataset"], recipe["eval_split"], input_spec, check_frames)
    head_e, tail_e, full_e = (create_engine(out / f, "ort") for f in ("head.onnx", "tail.onnx", "full.onnx"))
    z = head_e.run1(x)
    checks = {
        "head": _check("head", head_e, model.encode, x, classify=False),
        "tail": _check("tail", tail_e, model.decode, z, classify=True),
        "full": _check("full", full_e, teacher, x, classify=True),
    }
    threads = 1  # one core: the figure an edge device's profile scales from
    head_ms = _head_latency_ms(out / "head.onnx", x[:1], threads)

    numel = int(np.prod(model.wire_shape))
    cal = state["calibration"]
    modes = []
    for i, m in enumerate(sorted(results["modes"], key=lambda m: -m["bits"])):
        c = cal[str(m["bits"])]
        modes.append({
            "id": i, "name": f"c{cfg.bottleneck_channels}-b{m['bits']}", "channels": cfg.bottleneck_channels,
            "bits": m["bits"], "quant": {"scheme": "affine-per-tensor", "scale": c["scale"], "zero_point": c["zero_point"],
                                          "clip_percentile": c["clip_percentile"]},
            "bytes_per_frame": packed_nbytes(numel, m["bits"]),
            "accuracy": m["accuracy"], "accuracy_source": f"torch, {results['eval_frames']} frames of {recipe['dataset']}:{recipe['eval_split']}",
            "head_ms": {host_profile_name(): round(head_ms, 4)},
        })
    default = next(m["id"] for m in modes if m["bits"] == recipe["default_bits"])
    wire = {"name": "z", "shape": list(model.wire_shape), "dtype": "float32",
            "quantization": "affine per tensor, parameters per mode"}
    manifest = bundle_manifest(family="bottlefit", name=name, state=state, cfg=cfg, input_spec=input_spec, wire=wire,
                               modes=modes, default=default, files=files, checks=checks, weights=weights)
    write_manifest(out, manifest)
    return Bundle.load(out)


def _version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return "absent"


def export_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="edgesplit export", description="Export a trained split (student.pt from "
                                "'edgesplit train') to a bundle directory, checked against torch on real images.")
    p.add_argument("student", help="student.pt written by 'edgesplit train' (teacher.pt is read from beside it)")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--name", default=None, help="bundle name (default: the recipe's)")
    p.add_argument("--teacher", default=None, help="teacher weights (default: teacher.pt beside the student)")
    p.add_argument("--check-frames", type=int, default=256, help="real images used to check ONNX against torch")
    p.add_argument("--weights", choices=("fp16", "fp32"), default="fp16", help="how weights are stored in the ONNX files")
    p.add_argument("--torch-tail", action="store_true", help="also write tail.pt2 (torch.export) for 'serve --backend torch'")
    a = p.parse_args(argv)
    family = torch.load(a.student, map_location="cpu", weights_only=True).get("family", "bottlefit")
    if family == "slimmable":
        from .export_slimmable import export_slimmable_bundle

        if a.torch_tail:
            p.error("--torch-tail: not available for slimmable bundles yet (export the ONNX tail only)")
        b = export_slimmable_bundle(a.student, a.out, a.name, a.check_frames, a.weights, a.teacher)
    else:
        b = export_bundle(a.student, a.out, a.name, a.check_frames, a.weights, a.teacher, a.torch_tail)
    m = b.manifest
    print(json.dumps({"bundle": str(b.root), "hash": b.hash, "checks": m["export"]["checks"],
                      "modes": [(x["name"], x["bytes_per_frame"], x["accuracy"]) for x in m["modes"]]}, indent=2))
    return 0
