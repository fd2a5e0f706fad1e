"""``edgesplit bench``: benchmarks with ``--json`` output. Results go to docs/BENCHMARKS.md."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path


def _machine() -> dict:
    import os

    return {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def bench_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="edgesplit bench", description="Benchmarks (JSON with --json).")
    sub = p.add_subparsers(dest="which", required=True)
    e = sub.add_parser("e2e", help="one frame at a time through agent -> server -> agent, against raw pyzmq")
    e.add_argument("--bundle", default=None, help="bundle (default: the shipped CIFAR-10 bundle)")
    e.add_argument("--frames", type=int, default=500)
    e.add_argument("--source", default=None)
    e.add_argument("--mode", type=int, default=None)
    e.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads for head and tail")
    e.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.which == "e2e":
        from ..demo import DEFAULT_BUNDLE
        from .e2e import bench_e2e

        res = {**bench_e2e(Path(a.bundle or DEFAULT_BUNDLE), a.frames, a.source, a.mode, a.threads), **_machine()}
    if a.json:
        json.dump(res, sys.stdout, indent=2)
        print()
    else:
        for k, v in res.items():
            print(f"{k:<22} {v}")
    return 0
