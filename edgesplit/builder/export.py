"""``edgesplit export``: a trained split (``student.pt``) -> a bundle directory (the ONNX graphs the
family's serving shape needs, full.onnx, manifest.json), each graph checked against torch on real
images.

The family is read from ``student.pt`` and its exporter looked up in
:mod:`edgesplit.families.registry`; what every exporter shares is in :mod:`.export_common`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from ..bundle import Bundle
from ..families.registry import Family, UnknownFamilyError, get_family
from .export_common import OPSET, ExportOptions, export_onnx, export_torch_tail, store_weights_fp16
from .pipeline import student_family

__all__ = [
    "OPSET",
    "ExportOptions",
    "export_bundle",
    "export_main",
    "export_onnx",
    "export_torch_tail",
    "export_with_options",
    "store_weights_fp16",
]
_export_onnx = export_onnx  # the name earlier callers import


def family_of(student_path: str | Path, torch_tail: bool = False) -> Family:
    """The registered family of a ``student.pt``; raises ValueError when it cannot honour ``torch_tail``."""
    family = get_family(student_family(torch.load(str(student_path), map_location="cpu", weights_only=True)))
    if torch_tail and "tail_torch" not in family.optional_files:
        raise ValueError(f"--torch-tail: the {family.name} family has no torch tail (export the ONNX tail only)")
    return family


def export_bundle(
    student_path: str | Path,
    out_dir: str | Path,
    name: str | None = None,
    check_frames: int = 256,
    weights: str = "fp16",
    teacher_path: str | Path | None = None,
    torch_tail: bool = False,
    **family_options: Any,
) -> Bundle:
    """Export any family's trained split: the exporter of the family ``student.pt`` names, with the
    :class:`ExportOptions` these keywords make. ``family_options``: keywords only that family's
    exporter takes (e.g. BottleFit's ``entropy_steps``); one it does not take is a ValueError
    naming it and the family."""
    options = ExportOptions(
        name=name,
        check_frames=check_frames,
        weights=weights,
        teacher_path=teacher_path,
        torch_tail=torch_tail,
        family=family_options,
    )
    return export_with_options(student_path, out_dir, options)


def export_with_options(student_path: str | Path, out_dir: str | Path, options: ExportOptions) -> Bundle:
    """:func:`export_bundle` with its options already made."""
    exporter = family_of(student_path, options.torch_tail).entry("exporter")
    return exporter(student_path, out_dir, options)


def parse_steps(text: str) -> list[float]:
    """``--entropy-steps 1,1.5,2`` -> [1.0, 1.5, 2.0] (the exporter validates the values)."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated numbers, got {text!r}") from None


def export_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="edgesplit export",
        description="Export a trained split (student.pt from "
        "'edgesplit train') to a bundle directory, checked against torch on real images.",
    )
    p.add_argument("student", help="student.pt written by 'edgesplit train' (teacher.pt is read from beside it)")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--name", default=None, help="bundle name (default: the recipe's)")
    p.add_argument("--teacher", default=None, help="teacher weights (default: teacher.pt beside the student)")
    p.add_argument("--check-frames", type=int, default=256, help="real images used to check ONNX against torch")
    p.add_argument(
        "--weights", choices=("fp16", "fp32"), default="fp16", help="how weights are stored in the ONNX files"
    )
    p.add_argument(
        "--torch-tail", action="store_true", help="also write tail.pt2 (torch.export) for 'serve --backend torch'"
    )
    p.add_argument(
        "--entropy-steps",
        type=parse_steps,
        default=None,
        metavar="S1,S2,...",
        help="an entropy-bottleneck student: one ans mode per quantization step (1.0 among them), "
        "measured here on the recipe's evaluation split (default: the steps its run measured)",
    )
    a = p.parse_args(argv)
    family_options = {} if a.entropy_steps is None else {"entropy_steps": a.entropy_steps}
    try:
        options = ExportOptions(
            name=a.name,
            check_frames=a.check_frames,
            weights=a.weights,
            teacher_path=a.teacher,
            torch_tail=a.torch_tail,
            family=family_options,
        )
        family_of(a.student, a.torch_tail)  # a usage error before any work, not a traceback after
    except (ValueError, UnknownFamilyError) as e:
        p.error(str(e))
    try:
        b = export_with_options(a.student, a.out, options)
    except ValueError as e:
        if not family_options:
            raise
        p.error(f"--entropy-steps: {e}")
    m = b.manifest
    print(
        json.dumps(
            {
                "bundle": str(b.root),
                "hash": b.hash,
                "checks": m["export"]["checks"],
                "modes": [(x["name"], x["bytes_per_frame"], x["accuracy"]) for x in m["modes"]],
            },
            indent=2,
        )
    )
    return 0
