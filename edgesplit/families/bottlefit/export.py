"""Export a trained BottleFit split to a bundle: head.onnx, tail.onnx, full.onnx, manifest.json.

- head.onnx: image [N,3,H,W] -> wire tensor ``z`` [N,C,h,w] (float; the codec quantizes it).
- tail.onnx: ``z`` -> logits [N,classes] (decoder + the backbone's remaining stages).
- full.onnx: the unsplit reference model (the teacher) for local fallback and for the
  "send the JPEG instead" baseline.
- tail.pt2 (``torch_tail``): the tail as a torch.export program for the server's torch backend.

Each graph is checked against torch on real images (max abs diff and top-1 agreement go into the
manifest); one mode per calibrated bit depth, or, for a student with a learned entropy bottleneck
(``split.entropy_lambda``), one codec ``"ans"`` mode per quantization step (``split.entropy_steps``,
or ``entropy_steps`` here for a run trained without them) and the tables in ``cdf.json``
(docs/BUNDLE.md section 7.2).
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
    export_torch_tail,
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
from .entropy_steps import CDF_FILE, ans_modes, default_mode_id, remeasure_steps
from .model import load_student


def export_bundle(student_path: str | Path, out_dir: str | Path, options: ExportOptions) -> Bundle:
    """The family's options (``options.family``): ``entropy_steps``, the ans modes' steps of an
    entropy student, when not the ones its run measured (those of its recipe); they are then
    measured here in torch on the recipe's evaluation split (``entropy_limit_per_shard``: its first
    images per shard only), which takes a pass over it per step."""
    extras = options.family_options("bottlefit", entropy_steps=None, entropy_limit_per_shard=None)
    entropy_steps: list[float] | None = extras["entropy_steps"]
    out, model, state, teacher = open_export(load_student, student_path, out_dir, options.teacher_path)
    recipe, results = state["recipe"], state["results"]
    cfg = model.cfg
    entropy = getattr(cfg, "entropy_lambda", None) is not None  # issue 14: ans modes and a cdf file
    if entropy_steps is not None:
        if not entropy:
            raise ValueError("entropy_steps: only a student with an entropy bottleneck has steps")
        remeasure_steps(model, state, entropy_steps, extras["entropy_limit_per_shard"])
    side = cfg.input_size

    ex_img = torch.zeros(2, 3, side, side)
    ex_z = torch.zeros(2, *model.wire_shape)
    head, tail = model.head_module(), model.tail_module()
    export_onnx(head, ex_img, out / "head.onnx", "image", "z")
    export_onnx(tail, ex_z, out / "tail.onnx", "z", "logits")
    export_onnx(teacher, ex_img, out / "full.onnx", "image", "logits")
    if options.weights == "fp16":
        for f in ("head.onnx", "tail.onnx", "full.onnx"):
            store_weights_fp16(out / f)
    files = {
        "head": {"path": "head.onnx"},
        "tail": {"path": "tail.onnx"},
        "full": {"path": "full.onnx", "model": "teacher"},
    }
    if options.torch_tail:
        export_torch_tail(tail, ex_z, out / "tail.pt2")
        files["tail_torch"] = {"path": "tail.pt2"}

    input_spec = input_spec_for(side)
    x, _ = eval_images(recipe["dataset"], recipe["eval_split"], input_spec, options.check_frames)
    head_e, tail_e, full_e = (create_engine(out / f, "ort") for f in ("head.onnx", "tail.onnx", "full.onnx"))
    z = head_e.run1(x)
    checks = {
        "head": check_against_torch("head", head_e, model.encode, x, classify=False),
        "tail": check_against_torch("tail", tail_e, model.decode, z, classify=True),
        "full": check_against_torch("full", full_e, teacher, x, classify=True),
    }
    threads = 1  # one core: the figure an edge device's profile scales from
    head_ms = head_latency_ms(out / "head.onnx", x[:1], threads)

    if entropy:
        modes = ans_modes(out, state, cfg, z, accuracy_source(state), {host_profile_name(): round(head_ms, 4)})
        files["cdf"] = {"path": CDF_FILE}
        return write_bundle(
            out,
            family="bottlefit",
            name=options.name,
            state=state,
            cfg=cfg,
            input_spec=input_spec,
            wire=affine_wire(model.wire_shape, quantization="rounded to integers, entropy-coded (codec ans)"),
            modes=modes,
            default=default_mode_id(modes),
            files=files,
            checks=checks,
            weights=options.weights,
        )
    numel = int(np.prod(model.wire_shape))
    cal = state["calibration"]
    modes = []
    for i, m in enumerate(sorted(results["modes"], key=lambda m: -m["bits"])):
        c = cal[str(m["bits"])]
        modes.append(
            {
                "id": i,
                "name": f"c{cfg.bottleneck_channels}-b{m['bits']}",
                "channels": cfg.bottleneck_channels,
                "bits": m["bits"],
                "quant": affine_quant(c),
                "bytes_per_frame": packed_nbytes(numel, m["bits"]),
                "accuracy": m["accuracy"],
                "accuracy_source": accuracy_source(state),
                "head_ms": {host_profile_name(): round(head_ms, 4)},
            }
        )
    default = next(m["id"] for m in modes if m["bits"] == recipe["default_bits"])
    return write_bundle(
        out,
        family="bottlefit",
        name=options.name,
        state=state,
        cfg=cfg,
        input_spec=input_spec,
        wire=affine_wire(model.wire_shape),
        modes=modes,
        default=default,
        files=files,
        checks=checks,
        weights=options.weights,
    )
