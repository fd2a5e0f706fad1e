"""The body package: what the body server loads to serve an SFPrompt body (for split training and
for U-shaped inference). A directory with ``manifest.json`` and ``body.pt`` (the body blocks'
state dict, loaded with ``weights_only=True``); its identity is the SHA-256 of the manifest's
bytes, as a bundle's (the client names it in ``hello.bundle``), and the manifest pins the weights
by their SHA-256. The body is frozen: one package serves every round and every client.

Manifest keys: ``schema`` (``"edgesplit-body/1"``), ``family`` (``"sfprompt"``), ``serving``
(``"u-shaped"``), ``name``, ``vit`` (the zoo ViT config the blocks come from), ``blocks`` (the
body's ``[first, end)``), ``tokens`` (``[T, D]``: what enters and leaves the body per sample),
``files`` (``{"body": {"path", "sha256", "bytes"}}``), ``checks`` (max |difference| between the
saved body and the student's on random tokens).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .model import build_body, load_student

SCHEMA = "edgesplit-body/1"


class BodyPackage:
    """What :func:`export_body` wrote (``root``, ``hash``, ``manifest``)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        raw = (self.root / "manifest.json").read_bytes()
        self.hash = hashlib.sha256(raw).hexdigest()
        self.manifest: dict[str, Any] = json.loads(raw)


def export_body(student_path: str | Path, out_dir: str | Path, name: str | None = None) -> BodyPackage:
    """Write the body package of a trained (or untrained) SFPrompt ``student.pt`` (``name``: default
    the run directory's). The body's weights stay float32: the server backpropagates through them.
    Not a family exporter (that is :func:`.bundle_export.export_bundle`, which calls this one), so
    it takes no :class:`~edgesplit.builder.export_common.ExportOptions`: a package has no graphs to
    check on frames, no weight storage to choose and no teacher."""
    model, d = load_student(student_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone() for k, v in model.body.state_dict().items()}
    torch.save(state, out / "body.pt")
    blob = (out / "body.pt").read_bytes()
    body = build_body(d["vit"], d["head_blocks"], d["body_end"])  # the very code the body server runs
    body.load_state_dict(torch.load(str(out / "body.pt"), weights_only=True), strict=True)
    t = torch.randn(2, model.tokens, model.cfg.dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = float((body(t) - model.body(t)).abs().max())
    manifest = {
        "schema": SCHEMA,
        "family": "sfprompt",
        "serving": "u-shaped",
        "name": name or Path(student_path).parent.name,
        "vit": {**asdict(model.cfg), "stem_widths": list(model.cfg.stem_widths)},
        "blocks": [d["head_blocks"], d["body_end"]],
        "tokens": [model.tokens, model.cfg.dim],
        "files": {"body": {"path": "body.pt", "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}},
        "checks": {"max_abs_diff": diff},
        # `edgesplit export` prints these (a body package has no modes)
        "export": {"checks": {"max_abs_diff": diff}},
        "modes": [],
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return BodyPackage(out)
