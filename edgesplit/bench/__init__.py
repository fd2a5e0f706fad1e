"""``edgesplit bench``: benchmarks with ``--json`` output. Results go to docs/BENCHMARKS.md.

Each scenario lives in its own module that defines ``add_arguments(parser)`` and
``run(args) -> dict``; :data:`SCENARIOS` names them (module path, one-line help). Adding a
scenario is one line here plus its module, and no scenario imports another's dependencies.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
from datetime import datetime, timezone

# name -> (module, help). Modules are imported only when their scenario runs (or for --help).
SCENARIOS: dict[str, tuple[str, str]] = {
    "e2e": ("edgesplit.bench.e2e", "one frame at a time through agent -> server -> agent, against raw pyzmq"),
    "restart": ("edgesplit.bench.restart", "kill -9 the server mid-stream and restart it: every frame accounted for, resume time"),
    "engine": ("edgesplit.bench.engine", "tail engine alone per batch size (frames/s, latency), optionally against bare torch"),
    "server": ("edgesplit.bench.server", "daemon frames/s and latency at 1..32 agents, batched and unbatched, next to the engine alone"),
    "fuzz": ("edgesplit.bench.fuzz", "malformed frames at the server while valid agents stream: no crash, every answer as documented"),
    "overload": ("edgesplit.bench.overload", "offer N x capacity with deadlines: bounded memory, one answer per request, admitted p99"),
    "adapt": ("edgesplit.bench.adapt", "the adaptive controller vs fixed modes, Assine's policy and an oracle on a real trace (--sim | --live)"),
}


def machine_info() -> dict:
    """Where a benchmark ran: recorded next to every result."""
    import os

    return {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def bench_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="edgesplit bench", description="Benchmarks (JSON with --json).")
    sub = p.add_subparsers(dest="which", required=True)
    which = argv[0] if argv and argv[0] in SCENARIOS else None
    for name, (module, text) in SCENARIOS.items():
        sp = sub.add_parser(name, help=text, description=text)
        sp.add_argument("--json", action="store_true", help="print the result as JSON")
        # Only the chosen scenario's module is imported: the others may need extras not installed.
        if which is None or which == name:
            importlib.import_module(module).add_arguments(sp)
    a = p.parse_args(argv)
    res = {**importlib.import_module(SCENARIOS[a.which][0]).run(a), **machine_info()}
    if a.json:
        json.dump(res, sys.stdout, indent=2)
        print()
    else:
        for k, v in res.items():
            print(f"{k:<22} {v}")
    return 0
