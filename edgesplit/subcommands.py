"""One runner for the command groups whose subcommands each live in their own module
(``edgesplit bench ...``, ``edgesplit profile ...``).

A registry maps a subcommand name to ``(module, one-line help)``; the module defines
``add_arguments(parser)`` and ``run(args) -> dict`` and may define ``summarize(result) -> str``
for the human-readable view. Only the chosen subcommand's module is imported (the others may
need extras that are not installed). Every result carries where it ran (:func:`machine_info`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
from datetime import datetime, timezone


def machine_info() -> dict:
    """Where a measurement ran: recorded next to every result."""
    return {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def run_subcommand(prog: str, description: str, registry: dict[str, tuple[str, str]], argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=prog, description=description)
    sub = p.add_subparsers(dest="which", required=True)
    which = argv[0] if argv and argv[0] in registry else None
    for name, (module, text) in registry.items():
        sp = sub.add_parser(name, help=text, description=text)
        sp.add_argument("--json", action="store_true", help="print the result as JSON")
        if which is None or which == name:
            importlib.import_module(module).add_arguments(sp)
    a = p.parse_args(argv)
    mod = importlib.import_module(registry[a.which][0])
    res = {**mod.run(a), **machine_info()}
    if a.json:
        json.dump(res, sys.stdout, indent=2)
        print()
    elif hasattr(mod, "summarize"):
        print(mod.summarize(res))
    else:
        for k, v in res.items():
            print(f"{k:<22} {v}")
    return 0
