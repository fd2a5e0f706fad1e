"""Export a trained ED-ViT (``student.pt``) to a bundle (docs/BUNDLE.md section 7.1).

- ``submodel_<i>.onnx``: ``input`` [B,3,H,W] -> ``features`` [B,D_i], ``logits`` [B,|C_i|+1].
- ``fusion.onnx``: ``features`` [B,sum D] (id order, zeros for a missing one), ``mask`` [B,N] ->
  ``logits`` [B,classes].
- ``full.onnx``: the teacher (``image`` -> ``logits``), local fallback and reference.

Every graph is checked against torch on real frames; the accuracies in the manifest (full, fused,
each one missing, per feature dtype) are measured here with ONNX Runtime on the eval split.
"""

from __future__ import annotations

import platform
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from ... import __version__
from ...builder.export_common import (
    OPSET,
    ExportOptions,
    eval_images,
    export_onnx,
    host_profile_name,
    input_spec_for,
    load_teacher,
    store_weights_fp16,
    tool_version,
)
from ...bundle import Bundle, write_manifest
from .manifest import FEATURE_BYTES
from .model import load_student


class _TeacherRef:
    """What :func:`load_teacher` reads of a split's config."""

    def __init__(self, arch: str, num_classes: int):
        self.arch, self.num_classes = arch, num_classes


def export_graph(module: torch.nn.Module, examples: tuple, path: Path, inputs: list[str], outputs: list[str]) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        prog = torch.onnx.export(
            module.eval(),
            examples,
            dynamo=True,
            opset_version=OPSET,
            input_names=inputs,
            output_names=outputs,
            dynamic_shapes=tuple({0: batch} for _ in examples),
            optimize=True,
            verbose=False,
        )
    prog.save(str(path))


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _diff(out: np.ndarray, ref: np.ndarray) -> dict:
    d = float(np.max(np.abs(out - ref)))
    return {"max_abs_diff": d, "max_rel_diff": d / max(1e-12, float(np.max(np.abs(ref)))), "frames": int(len(out))}


def fused_accuracy(feats: list[np.ndarray], fusion: ort.InferenceSession, y: np.ndarray, dtype: str) -> dict:
    """Fused accuracy in ONNX Runtime with all sub-models present and with each one missing, the
    features passed through ``dtype`` (what a gather carries)."""
    n, b = len(feats), len(y)
    feats = [f.astype(dtype).astype(np.float32) for f in feats]

    def acc(mask: np.ndarray) -> float:
        x = np.concatenate([f * mask[:, i : i + 1] for i, f in enumerate(feats)], 1).astype(np.float32)
        return float(np.mean(fusion.run(None, {"features": x, "mask": mask})[0].argmax(1) == y))

    ones = np.ones((b, n), np.float32)
    missing = {}
    for i in range(n):
        m = ones.copy()
        m[:, i] = 0
        missing[str(i)] = acc(m)
    return {"fused": acc(ones), "missing_one": missing, "missing_mean": float(np.mean(list(missing.values())))}


def export_bundle(student_path: str | Path, out_dir: str | Path, options: ExportOptions) -> Bundle:
    options.family_options("edvit")  # it takes none
    if options.torch_tail:
        raise ValueError("--torch-tail: the edvit family has no tail")
    student_path, out = Path(student_path), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ens, state = load_student(student_path)
    cfg, recipe, results = state["config"], state["recipe"], state["results"]
    teacher = load_teacher(_TeacherRef(cfg["arch"], cfg["num_classes"]), student_path, options.teacher_path)
    side = recipe["input_size"]
    ex = torch.zeros(2, 3, side, side)
    n = len(ens.submodels)
    files: dict = {"full": {"path": "full.onnx", "model": "teacher"}, "fusion": {"path": "fusion.onnx"}}
    for i, sub in enumerate(ens.submodels):
        export_graph(sub, (ex,), out / f"submodel_{i}.onnx", ["input"], ["features", "logits"])
        files[f"submodel.{i}"] = {"path": f"submodel_{i}.onnx"}
    dims = [s.dim for s in ens.submodels]
    export_graph(
        ens.fusion, (torch.zeros(2, sum(dims)), torch.ones(2, n)), out / "fusion.onnx", ["features", "mask"], ["logits"]
    )
    export_onnx(teacher, ex, out / "full.onnx", "image", "logits")
    if options.weights == "fp16":
        for entry in files.values():
            store_weights_fp16(out / entry["path"])

    input_spec = input_spec_for(side)
    x, y = eval_images(recipe["dataset"], recipe["eval_split"], input_spec, options.check_frames)
    xt = torch.from_numpy(x)
    checks, feats = {}, []
    with torch.no_grad():
        for i, sub in enumerate(ens.submodels):
            f_ref, l_ref = (t.numpy() for t in sub(xt))
            f, lg = _session(out / f"submodel_{i}.onnx").run(None, {"input": x})
            checks[f"submodel.{i}"] = {**_diff(f, f_ref), "logits_max_abs_diff": float(np.max(np.abs(lg - l_ref)))}
            feats.append(f)
        fusion = _session(out / "fusion.onnx")
        cat, ones = np.concatenate(feats, 1), np.ones((len(x), n), np.float32)
        ref = ens.fusion(torch.from_numpy(cat), torch.from_numpy(ones)).numpy()
        checks["fusion"] = _diff(fusion.run(None, {"features": cat, "mask": ones})[0], ref)
        full_out = _session(out / "full.onnx").run(None, {"image": x})[0]
        full_ref = teacher(xt).numpy()
        agree = float(np.mean(full_out.argmax(1) == full_ref.argmax(1)))
        checks["full"] = {**_diff(full_out, full_ref), "top1_agreement": agree}
    source = f"onnxruntime, {len(x)} frames of {recipe['dataset']}:{recipe['eval_split']}"
    by_dtype = {dt: fused_accuracy(feats, fusion, y, dt) for dt in FEATURE_BYTES}
    full_acc = float(np.mean(full_out.argmax(1) == y))
    modes = [
        {
            "id": k,
            "name": dt,
            "features_dtype": dt,
            "bytes_per_frame": FEATURE_BYTES[dt] * sum(dims),
            "accuracy": by_dtype[dt]["fused"],
            "accuracy_source": source,
        }
        for k, dt in enumerate(FEATURE_BYTES)
    ]
    submodels = []
    for i, (sub, sc) in enumerate(zip(ens.submodels, cfg["submodels"])):
        cost = sc["cost"]
        submodels.append(
            {
                "id": i,
                "role": f"submodel.{i}",
                "classes": list(sc["classes"]),
                "features": {"name": "features", "dim": sub.dim},
                "logits": {"name": "logits", "dim": len(sc["classes"]) + 1},
                "params": int(cost["params"]),
                "macs": int(cost["macs"]),
                "memory_mb": round(float(cost["memory_mb"]), 4),
                "config": {
                    "dim": sub.dim,
                    "heads": sc["vit"]["heads"],
                    "qk_dim": sc["vit"]["qk_dim"],
                    "v_dim": sc["vit"]["v_dim"],
                    "mlp_hidden": sc["vit"]["mlp_hidden"],
                    "keep_ratio": sc["ratio"],
                },
            }
        )
    edvit = {
        "submodels": submodels,
        "fusion": {"role": "fusion", "features": "features", "mask": "mask", "output": "logits"},
        "partition": {k: results["partition"][k] for k in ("method", "seed")},
        "accuracy": {"full": full_acc, **by_dtype["float32"], "source": source},
        "placement": results["placement"],
        "teacher_cost": results["teacher_cost"],
    }
    manifest = {
        "schema_version": 1,
        "name": options.name or recipe["name"],
        "family": "edvit",
        "description": recipe.get("description", ""),
        "classes": list(state["classes"]),
        "input": input_spec,
        "modes": modes,
        "default_mode": 0,
        "files": files,
        "edvit": edvit,
        "model": {"arch": cfg["arch"], "submodels": n},
        "teacher_accuracy": full_acc,
        "export": {"opset": OPSET, "weights": options.weights, "checks": checks, "check_source": source},
        "training": {"recipe": recipe["name"], "results": results},
        "tools": {
            "edgesplit": __version__,
            "torch": torch.__version__,
            "onnx": tool_version("onnx"),
            "onnxruntime": tool_version("onnxruntime"),
            "python": platform.python_version(),
        },
        "measured_on": {host_profile_name(): "accuracies in ONNX Runtime, 1 thread"},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_manifest(out, manifest)
    return Bundle.load(out)
