"""``edgesplit profile``: measurements of models and devices, each a subcommand with ``--json``.

Like ``edgesplit bench``, each subcommand lives in a module that defines ``add_arguments(parser)``
and ``run(args) -> dict`` (and optionally ``summarize(result) -> str`` for the human-readable
view); :data:`SUBCOMMANDS` names them. Adding one is one line here plus its module, and only the
chosen subcommand's module is imported, so none needs another's dependencies.
"""

from __future__ import annotations

from ..subcommands import run_subcommand

# name -> (module, help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "latency": (
        "edgesplit.profile.latency",
        (
            "per-node latency of head, tail and full (ONNX Runtime / torch profilers) "
            "and whole-model latency per batch size and thread count"
        ),
    ),
    "power": (
        "edgesplit.profile.power.measure",
        "joules per inference of a bundle's head per mode (and full.onnx) from this device's power sensor, or a labelled estimate",
    ),
    "calibrate": (
        "edgesplit.profile.calibrate",
        "measure this machine (cores, sgemm GFLOPS, memory bandwidth, ORT reference latency) and write its device profile",
    ),
    "report": (
        "edgesplit.profile.report",
        "plots (latency per stage, energy per mode, accuracy against bytes) as PNG and one self-contained HTML page",
    ),
}


def profile_main(argv: list[str]) -> int:
    return run_subcommand("edgesplit profile", "Profiling (JSON with --json).", SUBCOMMANDS, argv)
