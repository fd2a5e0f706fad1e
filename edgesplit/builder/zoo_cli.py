"""``edgesplit zoo``: list the architectures, or report a checkpoint's accuracy on real data.

``edgesplit zoo eval resnet56_cifar --weights teachers/resnet56-4bfd9763.th --data cifar10:test``
loads the weights strictly (``module.`` prefix removed) and prints top-1 on the given frames.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from ..data.sources import data_root, open_source, take
from ..data.transforms import preprocess
from .data import MEAN, STD
from .zoo import INPUT_SIZE, MODELS, create_model, load_pretrained


def zoo_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="edgesplit zoo", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="architectures, their stages (split points) and parameter counts")
    e = sub.add_parser("eval", help="top-1 of a checkpoint on labelled frames")
    e.add_argument("arch", choices=sorted(MODELS))
    e.add_argument("--weights", required=True, help="state dict file; relative paths resolve against the data root too")
    e.add_argument("--data", required=True, help="labelled frames, e.g. cifar10:test")
    e.add_argument("--classes", type=int, default=10)
    e.add_argument("--frames", type=int, default=None)
    e.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.cmd == "list":
        for name in sorted(MODELS):
            m = create_model(name, 10)
            n = sum(p.numel() for p in m.parameters())
            print(
                f"{name:<16} input {INPUT_SIZE[name]:>3}px  {n / 1e6:6.2f} M params  stages: {', '.join(m.stage_names)}"
            )
        return 0
    w = Path(a.weights)
    if not w.exists() and (data_root() / w).exists():
        w = data_root() / w
    model = load_pretrained(a.arch, w, a.classes).eval()
    side = INPUT_SIZE[a.arch]
    spec = {"shape": [3, side, side], "resize": side, "mean": MEAN, "std": STD}
    correct = total = 0
    batch: list = []

    def flush() -> None:
        nonlocal correct, total, batch
        if batch:
            x = torch.from_numpy(np.stack([preprocess(s.data, spec) for s in batch]))
            with torch.no_grad():
                pred = model(x).argmax(1).numpy()
            correct += int((pred == np.asarray([s.label for s in batch])).sum())
            total += len(batch)
            batch = []

    for s in take(open_source(a.data), a.frames):
        batch.append(s)
        if len(batch) == 256:
            flush()
    flush()
    res = {"arch": a.arch, "weights": str(w), "data": a.data, "frames": total, "accuracy": correct / max(1, total)}
    print(
        json.dumps(res) if a.json else f"{a.arch} ({w.name}) on {total} frames of {a.data}: top-1 {res['accuracy']:.4f}"
    )
    return 0
