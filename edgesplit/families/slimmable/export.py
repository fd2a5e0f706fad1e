"""Export a trained slimmable split to a bundle: one head per width, one shared tail, full.onnx.

- ``head.onnx``: the widest width's head (the default mode's, so tools that read one head still
  work); ``head_c<N>.onnx`` (role ``head.c<N>``): the head at width N, whose convs are the slim
  ones (compute falls with the width). Each emits exactly N channels.
- ``tail.onnx``: takes the full-width tensor; the server zero-fills a narrower mode's channels,
  exactly as training did.
- The modes table has every (width, bits): bytes per frame, accuracy measured in training (the
  codec's quantization applied, zero-fill as the server does it), the head's latency measured
  here, and its multiply-accumulates.

Every head is checked against torch on real images, and the tail on every width's zero-filled
head output (max abs diff, top-1 agreement), into ``export.checks``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ...builder.export_common import (
    ExportOptions,
    accuracy_source,
    affine_quant,
    affine_wire,
    check_against_torch,
    eval_images,
    export_onnx,
    head_latency_ms,
    host_profile_name,
    input_spec_for,
    open_export,
    store_weights_fp16,
    write_bundle,
)
from ...bundle import Bundle
from ...engine import create_engine
from ...wire.codec import packed_nbytes
from .model import load_student


def head_file(width: int, widest: int) -> tuple[str, str]:
    """(role, file name) of the head at ``width``."""
    return ("head", "head.onnx") if width == widest else (f"head.c{width}", f"head_c{width}.onnx")


def export_bundle(student_path: str | Path, out_dir: str | Path, options: ExportOptions) -> Bundle:
    options.family_options("slimmable")  # it takes none
    if options.torch_tail:
        raise ValueError("torch_tail: the slimmable family has no torch tail yet (export the ONNX tail only)")
    out, model, state, teacher = open_export(load_student, student_path, out_dir, options.teacher_path)
    recipe, results, cfg = state["recipe"], state["results"], model.cfg
    side, widths, C = cfg.input_size, cfg.widths, cfg.bottleneck_channels

    ex_img = torch.zeros(2, 3, side, side)
    files: dict[str, dict] = {}
    for i, c in enumerate(widths):
        role, fname = head_file(c, C)
        export_onnx(model.head_module(i), ex_img, out / fname, "image", "z")
        files[role] = {"path": fname}
    export_onnx(model.tail_module(), torch.zeros(2, *model.wire_shape), out / "tail.onnx", "z", "logits")
    export_onnx(teacher, ex_img, out / "full.onnx", "image", "logits")
    files["tail"] = {"path": "tail.onnx"}
    files["full"] = {"path": "full.onnx", "model": "teacher"}
    if options.weights == "fp16":
        for entry in files.values():
            store_weights_fp16(out / entry["path"])

    input_spec = input_spec_for(side)
    x, _ = eval_images(recipe["dataset"], recipe["eval_split"], input_spec, options.check_frames)
    tail_e = create_engine(out / "tail.onnx", "ort")
    checks: dict[str, dict] = {}
    head_ms: dict[int, float] = {}
    for i, c in enumerate(widths):
        role, fname = head_file(c, C)
        head_e = create_engine(out / fname, "ort")
        checks[role] = check_against_torch(role, head_e, lambda t, i=i: model.encode(t, i), x, classify=False)
        z = head_e.run1(x)
        zf = np.zeros((len(z), *model.wire_shape), np.float32)
        zf[:, :c] = z  # what the server's decode(full_channels=C) builds
        checks[f"tail@c{c}"] = check_against_torch("tail", tail_e, model.decode, zf, classify=True)
        head_ms[c] = head_latency_ms(out / fname, x[:1], threads=1)
    checks["full"] = check_against_torch("full", create_engine(out / "full.onnx", "ort"), teacher, x, classify=True)

    hw = model.wire_shape[1] * model.wire_shape[2]
    by_key = {(m["width"], m["bits"]): m for m in results["modes"]}
    modes = []
    for c in sorted(widths, reverse=True):
        for b in sorted(recipe["mode_bits"], reverse=True):
            m, k = by_key[(c, b)], state["calibration"][f"{c}/{b}"]
            modes.append(
                {
                    "id": len(modes),
                    "name": f"c{c}-b{b}",
                    "channels": c,
                    "bits": b,
                    "head": head_file(c, C)[0],
                    "quant": affine_quant(k),
                    "bytes_per_frame": packed_nbytes(c * hw, b),
                    "accuracy": m["accuracy"],
                    "accuracy_source": accuracy_source(state),
                    "head_ms": {host_profile_name(): round(head_ms[c], 4)},
                    "head_macs": m["head_macs"],
                }
            )
    default = next(m["id"] for m in modes if m["channels"] == C and m["bits"] == recipe["default_bits"])
    return write_bundle(
        out,
        family="slimmable",
        name=options.name,
        state=state,
        cfg=cfg,
        input_spec=input_spec,
        wire=affine_wire(
            model.wire_shape, channels="a mode sends its first N channels; the server zero-fills the rest"
        ),
        modes=modes,
        default=default,
        files=files,
        checks=checks,
        weights=options.weights,
    )
