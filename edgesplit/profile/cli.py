"""``edgesplit profile``: measurements of models and devices, each a subcommand with ``--json``.

Like ``edgesplit bench``, each subcommand lives in a module that defines ``add_arguments(parser)``
and ``run(args) -> dict`` (and optionally ``summarize(result) -> str`` for the human-readable
view); :data:`SUBCOMMANDS` names them. Adding one is one line here plus its module, and only the
chosen subcommand's module is imported, so none needs another's dependencies.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

# name -> (module, help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "latency": ("edgesplit.profile.latency", ("per-node latency of head, tail and full (ONNX Runtime / torch profilers) "
                                              "and whole-model latency per batch size and thread count")),
    "power": ("edgesplit.profile.power.measure", "joules per inference of a bundle's head per mode (and full.onnx) from this device's power sensor, or a labelled estimate"),
    "calibrate": ("edgesplit.profile.calibrate", "measure this machine (cores, sgemm GFLOPS, memory bandwidth, ORT reference latency) and write its device profile"),
}


def profile_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="edgesplit profile", description="Profiling (JSON with --json).")
    sub = p.add_subparsers(dest="which", required=True)
    which = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    for name, (module, text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=text, description=text)
        sp.add_argument("--json", action="store_true", help="print the result as JSON")
        if which is None or which == name:
            importlib.import_module(module).add_arguments(sp)
    a = p.parse_args(argv)
    from ..bench import machine_info

    mod = importlib.import_module(SUBCOMMANDS[a.which][0])
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
