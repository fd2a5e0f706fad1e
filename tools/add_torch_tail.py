"""Add ``tail.pt2`` (the torch backend's tail) to a copy of a bundle, from the student it was
exported from; the manifest is rewritten with the new file's hash.

    python tools/add_torch_tail.py BUNDLE_DIR STUDENT.pt

The GPU scripts run this on the GPU machine itself: a torch.export file is tied to the torch
version that wrote it, and the GPU image's torch is not the pinned CPU wheel.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    import torch

    from edgesplit.builder.export import export_torch_tail
    from edgesplit.builder.pipeline import load_student
    from edgesplit.bundle import Bundle, write_manifest

    root, student = Path(argv[0]), argv[1]
    model, _ = load_student(student)
    m = json.loads((root / "manifest.json").read_text())
    export_torch_tail(model.tail_module(), torch.zeros(2, *m["wire"]["shape"]), root / "tail.pt2")
    m["files"]["tail_torch"] = {"path": "tail.pt2"}
    write_manifest(root, m)
    print(Bundle.load(root).name, "+ tail.pt2")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
