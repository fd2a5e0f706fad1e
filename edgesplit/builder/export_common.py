"""What every family's exporter shares: its options (:class:`ExportOptions`), ONNX writing (dynamo, opset 18, dynamic batch), float16
weight storage, checks of each graph against torch on real images, the head's latency, the
teacher loader, the input spec and the manifest fields every bundle writes the same way.

Weights are stored as float16 with a Cast to float32 in front (``weights="fp16"``): half the bytes
on disk and on the wire to the device, and ONNX Runtime folds the Cast at load time so compute
stays float32.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..bundle import Bundle, write_manifest
from ..data.sources import open_source, take
from ..data.transforms import preprocess
from ..engine import create_engine
from .data import MEAN, STD
from .zoo import create_model

OPSET = 18
WEIGHT_STORAGE = ("fp16", "fp32")


@dataclass(frozen=True)
class ExportOptions:
    """How to export a trained split; every family's exporter is
    ``exporter(student_path, out_dir, options: ExportOptions) -> Bundle``.

    ``name``: the bundle's name (default: the recipe's). ``check_frames``: real images each graph is
    checked against torch on. ``weights``: ``"fp16"`` stores large weights as float16 (see above),
    ``"fp32"`` as they are. ``teacher_path``: the teacher behind ``full.onnx`` (default:
    ``teacher.pt`` beside the student). ``torch_tail``: also write ``tail.pt2`` (families with a
    server tail only). ``family``: options only one family's exporter takes, e.g. BottleFit's
    ``{"entropy_steps": [1.0, 2.0]}``; the exporter reads them with :meth:`family_options`, which
    refuses one it does not take."""

    name: str | None = None
    check_frames: int = 256
    weights: str = "fp16"
    teacher_path: str | Path | None = None
    torch_tail: bool = False
    family: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.weights not in WEIGHT_STORAGE:
            raise ValueError(f"weights must be one of {', '.join(WEIGHT_STORAGE)}, got {self.weights!r}")
        if isinstance(self.check_frames, bool) or not isinstance(self.check_frames, int) or self.check_frames < 1:
            raise ValueError(f"check_frames must be a positive integer, got {self.check_frames!r}")
        # A read-only copy: the options stay what they were when made, whoever held the dict.
        object.__setattr__(self, "family", MappingProxyType(dict(self.family)))

    def family_options(self, family: str, **accepted: Any) -> dict[str, Any]:
        """The options of ``family``'s exporter: ``accepted`` names every one it takes, with its
        default, and the given ones replace those defaults. A family with none calls it bare, so
        that an option meant for another family is refused there too. Raises ValueError naming the
        first option ``family`` does not take (as the command line spells it), before any work."""
        for key in self.family:
            if key not in accepted:
                raise ValueError(f"the {family} family's exporter takes no {key.replace('_', '-')}")
        return {**accepted, **self.family}


def export_onnx(module: torch.nn.Module, example: torch.Tensor, path: Path, in_name: str, out_name: str) -> None:
    module = module.eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        prog = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            opset_version=OPSET,
            input_names=[in_name],
            output_names=[out_name],
            dynamic_shapes=({0: batch},),
            optimize=True,
            verbose=False,
        )
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
            casts.append(
                helper.make_node("Cast", [half.name], [init.name], to=TensorProto.FLOAT, name=init.name + "__cast")
            )
        else:
            keep.append(init)
    del g.initializer[:]
    g.initializer.extend(keep)
    nodes = list(g.node)
    del g.node[:]
    g.node.extend(casts + nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def eval_images(dataset: str, split: str, input_spec: dict, n: int) -> tuple[np.ndarray, np.ndarray]:
    samples = list(take(open_source(f"{dataset}:{split}"), n))
    x = np.stack([preprocess(s.data, input_spec) for s in samples])
    y = np.asarray([s.label for s in samples])
    return x, y


def check_against_torch(name: str, engine, torch_fn, x: np.ndarray, classify: bool) -> dict:
    with torch.no_grad():
        ref = torch_fn(torch.from_numpy(x)).float().numpy()
    out = engine.run1(x)
    diff = float(np.max(np.abs(out - ref)))
    # Relative to the output's range, so one tolerance fits float16-stored weights at any scale.
    rec = {"max_abs_diff": diff, "max_rel_diff": diff / max(1e-12, float(np.max(np.abs(ref)))), "frames": int(len(x))}
    if classify:
        rec["top1_agreement"] = float(np.mean(out.argmax(1) == ref.argmax(1)))
    return rec


def head_latency_ms(path: Path, x1: np.ndarray, threads: int, runs: int = 60) -> float:
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


def open_export(
    load_student, student_path: str | Path, out_dir: str | Path, teacher_path: str | Path | None
) -> tuple[Path, torch.nn.Module, dict, torch.nn.Module]:
    """An exporter's start: the bundle directory (created), the trained split and its ``student.pt``
    state (read by the family's ``load_student``), and the teacher behind ``full.onnx``."""
    student_path = Path(student_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, state = load_student(student_path)
    return out, model, state, load_teacher(model.cfg, student_path, teacher_path)


def load_teacher(cfg, student_path: Path, teacher_path: str | Path | None) -> torch.nn.Module:
    """The split's full model (``teacher.pt`` beside the student unless given), strictly loaded."""
    teacher = create_model(cfg.arch, cfg.num_classes)
    tpath = Path(teacher_path) if teacher_path else student_path.parent / "teacher.pt"
    teacher.load_state_dict(torch.load(str(tpath), map_location="cpu", weights_only=True), strict=True)
    return teacher.eval()


def input_spec_for(side: int) -> dict:
    return {
        "shape": [3, side, side],
        "layout": "NCHW",
        "dtype": "float32",
        "color": "RGB",
        "resize": side,
        "mean": list(MEAN),
        "std": list(STD),
    }


def affine_wire(shape, **notes: str) -> dict:
    """The manifest's ``wire`` entry of a float tensor ``z`` that the codec quantizes per tensor
    with each mode's own parameters; ``notes`` add family-specific lines."""
    return {
        "name": "z",
        "shape": list(shape),
        "dtype": "float32",
        "quantization": "affine per tensor, parameters per mode",
        **notes,
    }


def affine_quant(calibration: dict) -> dict:
    """A mode's ``quant`` entry from the calibration record of its (width, bits)."""
    return {
        "scheme": "affine-per-tensor",
        "scale": calibration["scale"],
        "zero_point": calibration["zero_point"],
        "clip_percentile": calibration["clip_percentile"],
    }


def accuracy_source(state: dict) -> str:
    """Where a mode's accuracy was measured: training's evaluation frames, in torch."""
    recipe = state["recipe"]
    return f"torch, {state['results']['eval_frames']} frames of {recipe['dataset']}:{recipe['eval_split']}"


def write_bundle(out: Path, **fields) -> Bundle:
    """Write ``manifest.json`` (:func:`bundle_manifest` of ``fields``) beside the exported files and
    load the bundle back, which validates it."""
    write_manifest(out, bundle_manifest(**fields))
    return Bundle.load(out)


def bundle_manifest(
    *,
    family: str,
    name: str | None,
    state: dict,
    cfg,
    input_spec: dict,
    wire: dict,
    modes: list[dict],
    default: int,
    files: dict,
    checks: dict,
    weights: str,
) -> dict:
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
        **provenance(recipe, results, checks, weights, timed="head latency"),
    }


def provenance(recipe: dict, results: dict, checks: dict, weights: str, *, timed: str) -> dict:
    """The manifest keys that say where a bundle came from, the same for every family: the export
    (opset, weights, checks against torch), the training run, the tools' versions, the host its
    ``timed`` figures (e.g. "head latency") were measured on, and when."""
    return {
        "export": {
            "opset": OPSET,
            "weights": weights,
            "checks": checks,
            "check_source": f"{recipe['dataset']}:{recipe['eval_split']}",
        },
        "training": {"recipe": recipe["name"], "results": results},
        "tools": {
            "edgesplit": __version__,
            "torch": torch.__version__,
            "onnx": tool_version("onnx"),
            "onnxruntime": tool_version("onnxruntime"),
            "python": platform.python_version(),
        },
        "measured_on": {
            host_profile_name(): f"{platform.processor() or platform.machine()}, {timed} with 1 thread, batch 1"
        },
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def tool_version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return "absent"
