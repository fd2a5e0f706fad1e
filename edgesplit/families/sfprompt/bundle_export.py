"""``edgesplit export`` of a tuned SFPrompt student: a U-shaped bundle (docs/BUNDLE.md §7.3) that
the agent and the daemon both load, and, beside it, the body package the body server loads for
split training (:func:`.export.export_body`, written as before).

The bundle's graphs, each checked in ONNX Runtime against the torch part it came from on real
frames (``export.checks``):

- ``head.onnx`` (device): image ``[N,3,S,S]`` -> ``tokens`` ``[N,T,D]``: the patch embedding, the
  tuned prompts after the class token, the head's blocks;
- ``body.onnx`` (server): ``tokens`` -> ``body_out`` ``[N,T,D]``: the frozen body;
- ``tail.onnx`` (device): ``body_out`` -> ``logits`` ``[N,K]``: the tuned tail;
- ``full.onnx`` (device): image -> logits, the three in one graph, the local fallback.

One mode per dtype the tokens may travel in (PROTOCOL.md §15.6): float32, float16 and 8-bit codes
whose range the sender measures per tensor; each mode's ``answer`` (§15.6.1) is the same dtype, so
the body's output comes back as compact as the tokens went up. Each mode's accuracy is measured here
through the codec both ways with the exported graphs in ONNX Runtime, frame by frame as the agent
encodes the tokens and the daemon the body's output, so the manifest's figure is what serving that
mode computes on those frames.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...builder.export_common import (
    ExportOptions,
    check_against_torch,
    eval_images,
    export_onnx,
    head_latency_ms,
    host_profile_name,
    input_spec_for,
    provenance,
    store_weights_fp16,
)
from ...bundle import Bundle, write_manifest
from ...bundle_schema import TOKEN_DTYPES
from ...data.sources import CLASSES
from ...engine import create_engine
from ...wire.split_train import roundtrip
from .export import export_body
from .model import load_student

# The wire modes, in id order: (name, dtype). The default is float16: half the bytes of float32 for
# a difference in the tokens far below what changes a prediction; 8-bit codes halve them again.
TOKEN_MODES = (("f32", "float32"), ("f16", "float16"), ("u8", "uint8"))
DEFAULT_DTYPE = "float16"
WIRE_NAME, RESULT_NAME = "tokens", "body_out"  # the names of PROTOCOL.md §15.3 and §15.6
BODY_PACKAGE_SUFFIX = "-body"


def body_package_dir(bundle_dir: str | Path) -> Path:
    """Where the export of bundle ``bundle_dir`` puts the body package: a sibling directory (a bundle
    is one flat directory, and both have a ``manifest.json``)."""
    d = Path(bundle_dir)
    return d.with_name(d.name + BODY_PACKAGE_SUFFIX)


def export_bundle(student_path: str | Path, out_dir: str | Path, options: ExportOptions) -> Bundle:
    """Write the U-shaped bundle of ``student_path`` to ``out_dir`` and its body package to
    :func:`body_package_dir`. ``options.teacher_path`` is unused: the fallback is the tuned model
    itself."""
    options.family_options("sfprompt")  # it takes none
    if options.torch_tail:
        raise ValueError("--torch-tail: an SFPrompt tail runs on the device (ONNX); there is no server tail")
    student_path, out = Path(student_path), Path(out_dir)
    saved = torch.load(str(student_path), map_location="cpu", weights_only=True)
    recipe, results = saved.get("recipe"), saved.get("results") or {}
    if not recipe:
        raise ValueError(
            f"{student_path} holds no recipe: the bundle needs its dataset (train it with 'edgesplit train')"
        )
    out.mkdir(parents=True, exist_ok=True)
    package = export_body(student_path, body_package_dir(out), name=options.name or recipe["name"])
    model, d = load_student(student_path)
    model.eval()
    side, T, D = int(recipe["input_size"]), int(model.tokens), int(model.cfg.dim)

    ex_img, ex_tok = torch.zeros(2, 3, side, side), torch.zeros(2, T, D)
    export_onnx(model.head, ex_img, out / "head.onnx", "image", WIRE_NAME)
    export_onnx(model.body, ex_tok, out / "body.onnx", WIRE_NAME, RESULT_NAME)
    export_onnx(model.tail, ex_tok, out / "tail.onnx", RESULT_NAME, "logits")
    export_onnx(model, ex_img, out / "full.onnx", "image", "logits")
    roles = ("head", "body", "tail", "full")
    if options.weights == "fp16":
        for role in roles:
            store_weights_fp16(out / f"{role}.onnx")
    files: dict[str, dict[str, Any]] = {role: {"path": f"{role}.onnx"} for role in roles}

    input_spec = input_spec_for(side)
    x, y = eval_images(recipe["dataset"], recipe["eval_split"], input_spec, options.check_frames)
    eng = {role: create_engine(out / f"{role}.onnx", "ort") for role in roles}
    with torch.no_grad():
        tokens = model.head(torch.from_numpy(x)).numpy()
        body_out = model.body(torch.from_numpy(tokens)).numpy()
    checks = {
        "head": check_against_torch("head", eng["head"], model.head, x, classify=False),
        "body": check_against_torch("body", eng["body"], model.body, tokens, classify=False),
        "tail": check_against_torch("tail", eng["tail"], model.tail, body_out, classify=True),
        "full": check_against_torch("full", eng["full"], model, x, classify=True),
    }
    profile = host_profile_name()
    head_ms = round(head_latency_ms(out / "head.onnx", x[:1], 1), 4)
    tail_ms = round(head_latency_ms(out / "tail.onnx", tokens[:1], 1), 4)
    source = f"onnxruntime, {len(x)} frames of {recipe['dataset']}:{recipe['eval_split']} (the export's check frames)"
    z = eng["head"].run1(x)
    modes = []
    for i, (mode_name, dtype) in enumerate(TOKEN_MODES):
        bits = TOKEN_DTYPES[dtype]
        sent = np.stack([roundtrip(frame, bits) for frame in z])  # per frame, as the agent encodes
        answered = np.stack([roundtrip(frame, bits) for frame in eng["body"].run1(sent)])  # as the daemon answers
        logits = eng["tail"].run1(answered)
        modes.append(
            {
                "id": i,
                "name": mode_name,
                "dtype": dtype,
                "bits": bits,
                "bytes_per_frame": T * D * bits // 8,
                "answer": {"dtype": dtype, "bits": bits},  # the body's output comes back in the same dtype
                "bytes_down_per_frame": T * D * bits // 8,
                "accuracy": float(np.mean(logits.argmax(1) == y)),
                "accuracy_source": source,
                "head_ms": {profile: head_ms},
                "tail_ms": {profile: tail_ms},
            }
        )
    manifest = {
        "schema_version": 1,
        "name": options.name or recipe["name"],
        "family": "sfprompt",
        "description": recipe.get("description", ""),
        "classes": list(CLASSES[recipe["dataset"]]),
        "input": input_spec,
        "wire": {
            "name": WIRE_NAME,
            "shape": [T, D],
            "dtype": "float32",
            "quantization": "uint8 modes: affine per tensor, range measured by the sender (PROTOCOL.md §15.3)",
            "result": {"name": RESULT_NAME, "shape": [T, D]},  # its dtype: each mode's answer (§15.6.1)
        },
        "modes": modes,
        "default_mode": next(m["id"] for m in modes if m["dtype"] == DEFAULT_DTYPE),
        "files": files,
        "teacher_accuracy": float(np.mean(eng["full"].run1(x).argmax(1) == y)),
        "model": {
            "arch": recipe["teacher"]["arch"],
            "split_at": f"blocks [{d['head_blocks']}, {d['body_end']})",
            "config": d,
        },
        "sfprompt": {
            "head_blocks": d["head_blocks"],
            "body_end": d["body_end"],
            "prompts": d["prompts"],
            "tokens": [T, D],
            "body_package": package.hash,
        },
        **provenance(recipe, results, checks, options.weights, timed="latency"),
    }
    write_manifest(out, manifest)
    return Bundle.load(out)
