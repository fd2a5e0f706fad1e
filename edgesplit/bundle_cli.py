"""``edgesplit inspect BUNDLE``: verify a bundle (every file against its manifest hash) and print
what it holds: identity, input spec, wire tensor, the modes table, files and export checks.

Exit status 0 when the bundle verifies, 1 (with the reason, no traceback) when it does not.
Edge plane: imports neither torch nor onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
from typing import Any

from .bundle import Bundle, BundleError, Mode
from .bundle_schema import U_SHAPED


def summarize(b: Bundle) -> dict[str, Any]:
    """The facts ``inspect`` reports, as plain JSON-able data."""
    m = b.manifest
    files = []
    for role, entry in m["files"].items():
        path = b.root / entry["path"]
        files.append({"role": role, "path": entry["path"], "bytes": path.stat().st_size, "sha256": entry["sha256"]})
    if b.serving == "scatter":
        return _summarize_scatter(b, files)
    modes = []
    default_id = b.default_mode.id
    for mode, raw in zip(b.modes, m["modes"]):
        if b.serving == U_SHAPED:
            modes.append(_token_mode(b, mode, raw, mode.id == default_id))
            continue
        modes.append(
            {
                "id": mode.id,
                "name": mode.name,
                "channels": mode.channels,
                "bits": mode.bits,
                "bytes_per_frame": mode.bytes_per_frame,
                "accuracy": mode.accuracy,
                "head_ms": dict(mode.head_ms),
                "scale": mode.scale,
                "zero_point": mode.zero_point,
                "default": mode.id == default_id,
                **({"accuracy_source": raw["accuracy_source"]} if "accuracy_source" in raw else {}),
            }
        )
    return {
        "bundle": str(b.root),
        "verified": True,
        "name": b.name,
        "family": b.family,
        "serving": b.serving,
        "hash": b.hash,
        "schema_version": m["schema_version"],
        "description": m.get("description", ""),
        "classes": len(b.classes),
        "input": b.input_spec,
        "wire": b.wire_spec,
        "default_mode": default_id,
        "modes": modes,
        "files": files,
        "total_bytes": sum(f["bytes"] for f in files),
        "export_checks": m.get("export", {}).get("checks", {}),
        "teacher_accuracy": m.get("teacher_accuracy"),
        "tools": m.get("tools", {}),
    }


def _token_mode(b: Bundle, mode: Mode, raw: dict[str, Any], default: bool) -> dict[str, Any]:
    """A U-shaped bundle's mode (BUNDLE.md 7.3): the dtype the head's tokens ``[T, D]`` travel in,
    every row of them, the encoding the body's output comes back in (``answer``, PROTOCOL.md
    §15.6.1) and the bytes each way. The manifest's byte figures are optional: without them they
    follow from the tokens (up: the mode's dtype; down: its answer's)."""
    T, D = (int(s) for s in b.wire_spec["shape"])
    return {
        "id": mode.id,
        "name": mode.name,
        "dtype": mode.dtype,
        "bits": mode.bits,
        "tokens": [T, D],
        "bytes_per_frame": mode.bytes_per_frame or T * D * mode.bits // 8,
        "answer": {"dtype": mode.answer_dtype, "bits": mode.answer_bits},
        "bytes_down_per_frame": raw.get("bytes_down_per_frame", T * D * int(mode.answer_bits or 32) // 8),
        "accuracy": mode.accuracy,
        "head_ms": dict(mode.head_ms),
        "tail_ms": dict(raw.get("tail_ms", {})),
        "default": default,
        **({"accuracy_source": raw["accuracy_source"]} if "accuracy_source" in raw else {}),
    }


def _summarize_scatter(b: Bundle, files: list[dict]) -> dict[str, Any]:
    """An ED-ViT bundle (BUNDLE.md section 7.1): feature modes, sub-models, fused accuracies."""
    m, default = b.manifest, b.feature_mode()
    return {
        "bundle": str(b.root),
        "verified": True,
        "name": b.name,
        "family": b.family,
        "hash": b.hash,
        "schema_version": m["schema_version"],
        "classes": len(b.classes),
        "input": b.input_spec,
        "default_mode": default.id,
        "modes": [{**vars(fm), "default": fm.id == default.id} for fm in b.feature_modes],
        "submodels": [
            {"id": s.id, "classes": list(s.classes), "features_dim": s.features_dim, "params": s.params, "macs": s.macs}
            for s in b.submodels
        ],
        "accuracy": m["edvit"]["accuracy"],
        "files": files,
        "total_bytes": sum(f["bytes"] for f in files),
        "export_checks": m.get("export", {}).get("checks", {}),
        "tools": m.get("tools", {}),
    }


def _render_scatter(s: dict[str, Any]) -> str:
    acc = s["accuracy"]
    lines = [
        f"bundle   {s['bundle']}  (verified: every file matches its sha256)",
        f"name     {s['name']}",
        f"family   {s['family']}",
        f"hash     {s['hash']}",
        f"classes  {s['classes']}",
        f"input    shape {s['input'].get('shape')}  resize {s['input'].get('resize')}",
        f"accuracy full {_fmt(acc.get('full'), '.4f')}  fused {_fmt(acc.get('fused'), '.4f')}  "
        f"one missing (mean) {_fmt(acc.get('missing_mean'), '.4f')}",
        "",
        "sub-models",
    ]
    for sm in s["submodels"]:
        lines.append(
            f"  {sm['id']:>3}  classes {sm['classes']}  features {sm['features_dim']}  "
            f"params {sm['params']}  MACs {sm['macs']}"
        )
    lines += ["", "feature modes"]
    for md in s["modes"]:
        mark = " *" if md["default"] else ""
        lines.append(
            f"  {md['id']:>3}  {md['features_dtype'] + mark:<10} {md['bytes_per_frame']:>6} B/frame  "
            f"accuracy {_fmt(md['accuracy'], '.4f')}"
        )
    lines += ["", "files"]
    for f in s["files"]:
        lines.append(f"  {f['role']:<12} {f['path']:<18} {f['bytes']:>10} B  ({_size(f['bytes'])})")
    return "\n".join(lines)


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover - the loop always returns


def _ms(per_profile: dict[str, float]) -> str:
    return ", ".join(f"{v:.3f} ({k})" for k, v in per_profile.items()) or "-"


def _wire_modes(s: dict[str, Any]) -> list[str]:
    lines = [
        "modes",
        f"  {'id':>3}  {'name':<12} {'channels':>8} {'bits':>4} {'bytes/frame':>11} {'accuracy':>8}  head ms",
    ]
    for md in s["modes"]:
        mark = " *" if md["default"] else ""
        lines.append(
            f"  {md['id']:>3}  {md['name'] + mark:<12} {md['channels']:>8} {md['bits']:>4} "
            f"{md['bytes_per_frame']:>11.0f} {_fmt(md['accuracy'], '8.4f'):>8}  {_ms(md['head_ms'])}"
        )
    return lines


def _token_modes(s: dict[str, Any]) -> list[str]:
    """U-shaped modes: the tokens' dtype, shape, the answer's dtype and the bytes each way (the body
    runs on the server)."""
    res = s["wire"].get("result", {})
    lines = [
        f"modes (U-shaped: head -> '{s['wire'].get('name')}' up -> body on the server -> "
        f"'{res.get('name', 'body_out')}' down in the mode's answer dtype -> tail on the device)",
        f"  {'id':>3}  {'name':<8} {'dtype':<8} {'bits':>4} {'tokens':<10} {'up B/frame':>10} {'down B/frame':>12} "
        f"{'answer':<8} {'accuracy':>8}  head ms / tail ms",
    ]
    for md in s["modes"]:
        mark = " *" if md["default"] else ""
        tokens = "x".join(str(n) for n in md["tokens"])
        lines.append(
            f"  {md['id']:>3}  {md['name'] + mark:<8} {md['dtype']:<8} {md['bits']:>4} {tokens:<10} "
            f"{md['bytes_per_frame']:>10.0f} {md['bytes_down_per_frame']:>12.0f} {md['answer']['dtype']:<8} "
            f"{_fmt(md['accuracy'], '8.4f'):>8}  {_ms(md['head_ms'])} / {_ms(md['tail_ms'])}"
        )
    return lines


def render(s: dict[str, Any]) -> str:
    if "submodels" in s:
        return _render_scatter(s)
    inp, wire = s["input"], s["wire"]
    lines = [
        f"bundle   {s['bundle']}  (verified: every file matches its sha256)",
        f"name     {s['name']}",
        f"family   {s['family']}",
        f"serving  {s.get('serving', 'head-tail')}",
        f"hash     {s['hash']}",
        f"classes  {s['classes']}",
        f"input    shape {inp.get('shape')}  resize {inp.get('resize')}  mean {inp.get('mean')}  std {inp.get('std')}",
        f"wire     '{wire.get('name')}' shape {wire.get('shape')} {wire.get('dtype', '')}".rstrip(),
    ]
    if s.get("teacher_accuracy") is not None:
        lines.append(f"teacher  accuracy {s['teacher_accuracy']:.4f} (reference model, full.onnx)")
    lines += ["", *(_token_modes(s) if s.get("serving") == U_SHAPED else _wire_modes(s))]
    lines.append("  (* = default mode)")
    lines += ["", "files"]
    for f in s["files"]:
        lines.append(
            f"  {f['role']:<10} {f['path']:<16} {f['bytes']:>10} B  ({_size(f['bytes'])})  sha256 {f['sha256'][:16]}..."
        )
    lines.append(f"  {'total':<10} {'':<16} {s['total_bytes']:>10} B  ({_size(s['total_bytes'])})")
    lines += ["", "export checks (ONNX Runtime vs torch)"]
    if not s["export_checks"]:
        lines.append("  none recorded")
    for graph, c in s["export_checks"].items():
        agree = f"  top1_agreement {c['top1_agreement']:.4f}" if "top1_agreement" in c else ""
        lines.append(
            f"  {graph:<5} max_abs_diff {_fmt(c.get('max_abs_diff'), '.3g')}  max_rel_diff "
            f"{_fmt(c.get('max_rel_diff'), '.3g')}{agree}  frames {c.get('frames', '-')}"
        )
    return "\n".join(lines)


def inspect_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="edgesplit inspect",
        description="Verify a bundle (sha256 of every file) "
        "and print its manifest summary. Exit status 1 when verification fails.",
    )
    p.add_argument("bundle", help="bundle directory, or a .tar / .tar.gz of one")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    a = p.parse_args(argv)
    try:
        b = Bundle.load(a.bundle, verify=True)
        s = summarize(b)
    except BundleError as e:
        print(f"edgesplit inspect: {e}", file=sys.stderr)
        return 1
    except (OSError, tarfile.TarError, EOFError) as e:  # an unreadable path or a truncated tar
        print(f"edgesplit inspect: cannot read bundle {a.bundle}: {e}", file=sys.stderr)
        return 1
    if a.json:
        json.dump(s, sys.stdout, indent=2)
        print()
    else:
        print(render(s))
    return 0
