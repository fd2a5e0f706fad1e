"""``edgesplit bench switch``: what a mode switch costs in the live agent.

A server daemon (its own process) and an agent on loopback; the agent's policy cycles through the
chosen modes frame by frame (:class:`~edgesplit.control.policy.RoundRobinPolicy`), then runs each
of them for a stretch without switching, so both are measured in one run on the same frames:

- **codec part** (``switch_ms`` / ``same_mode_ms``): head output -> encoded request ready to send,
  when the mode changed and when it did not;
- **head part** (slimmable bundles: one head per width, every session loaded and warmed at
  start): each head's run time on the first frame after the agent moved to it from another head,
  against its run time when it follows itself; the difference is the switch cost.

Nothing is reloaded on a switch; the target is a switch cost of at most 1 ms.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def add_arguments(p) -> None:
    p.add_argument("--bundle", default=None, help="bundle (default: the shipped slimmable bundle when present)")
    p.add_argument(
        "--modes",
        default=None,
        help="comma-separated mode ids to cycle (default: one per head, default bits, "
        "plus every bit depth of the default head)",
    )
    p.add_argument(
        "--frames", type=int, default=400, help="frames in the cycling phase (the same again without switching)"
    )
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads for the heads")


def default_modes(bundle) -> list[int]:
    heads = {}
    default_bits = bundle.default_mode.bits
    for m in bundle.modes:  # one mode per head at the default bit depth
        if m.bits == default_bits:
            heads.setdefault(m.head, m.id)
    ids = list(heads.values())
    ids += [m.id for m in bundle.modes if m.head == bundle.default_mode.head and m.id not in ids]
    return ids


def run(a) -> dict[str, Any]:
    from ..bundle import Bundle
    from ..control import RoundRobinPolicy, modes_from_manifest
    from ..data.sources import open_source, take
    from ..edge.agent import Agent
    from ..loopback import DEFAULT_BUNDLE, DEFAULT_SOURCES, free_port
    from .serverproc import ServerProcess

    root = Path(__file__).resolve().parents[2] / "models"
    path = (
        Path(a.bundle)
        if a.bundle
        else (
            root / "imagenette-resnet18-slimmable"
            if (root / "imagenette-resnet18-slimmable").is_dir()
            else Path(DEFAULT_BUNDLE)
        )
    )
    bundle = Bundle.load(path)
    ids = [int(x) for x in a.modes.split(",")] if a.modes else default_modes(bundle)
    for i in ids:
        bundle.mode(i)  # an unknown id is an error naming the bundle's modes
    dataset = next((d for d in DEFAULT_SOURCES if bundle.name.startswith(d)), None)
    if dataset is None:
        raise ValueError(f"no default frame source for bundle '{bundle.name}'")
    samples = list(take(open_source(DEFAULT_SOURCES[dataset], bundle.classes), 64))
    table = modes_from_manifest(bundle.manifest)
    phases: dict[str, Any] = {}
    with ServerProcess([path], ["--threads", "1", "--max-queue-delay-us", "0"], port=free_port()) as srv:
        for phase, orders in (("cycling", [ids]), ("steady", [[i] for i in ids])):
            runs = []
            for order in orders:
                n = a.frames if phase == "cycling" else max(8, a.frames // len(ids))
                with Agent(
                    bundle,
                    srv.endpoint,
                    threads=a.threads,
                    policy=RoundRobinPolicy(table, order),
                    policy_deadline_ms=10_000.0,
                    inflight=1,
                ) as agent:
                    frames = [samples[k % len(samples)] for k in range(n)]
                    results = list(agent.run(iter(frames)))
                    runs.append((agent.controller.summary(), results))
            phases[phase] = runs
    cyc_summary, cyc_results = phases["cycling"][0]
    steady_codec = [s["same_mode_ms_p50"] for s, _ in phases["steady"] if s["same_mode_ms_p50"] is not None]
    heads = {}
    for role, h in cyc_summary["heads"].items():
        steady = [s["heads"][role]["steady_ms_p50"] for s, _ in phases["steady"] if role in s["heads"]]
        heads[role] = {
            "after_switch_ms_p50": h["after_switch_ms_p50"],
            "after_switch_n": h["after_switch_n"],
            "steady_ms_p50": steady[0] if steady else None,
            "switch_cost_ms": None
            if not steady or h["after_switch_ms_p50"] is None
            else round(h["after_switch_ms_p50"] - steady[0], 4),
        }
    costs = [h["switch_cost_ms"] for h in heads.values() if h["switch_cost_ms"] is not None]
    codec_cost = (
        None
        if cyc_summary["switch_ms_p50"] is None or not steady_codec
        else round(cyc_summary["switch_ms_p50"] - float(np.median(steady_codec)), 4)
    )
    worst = max([c for c in costs + [codec_cost] if c is not None], default=None)
    ok = all(r.ok for _, rs in phases["cycling"] + phases["steady"] for r in rs)
    return {
        "bench": "switch",
        "bundle": bundle.name,
        "bundle_hash": bundle.hash,
        "modes": ids,
        "frames_cycling": len(cyc_results),
        "switches": cyc_summary["switches"],
        "all_answered": ok,
        "codec": {
            "switch_ms_p50": cyc_summary["switch_ms_p50"],
            "switch_ms_max": cyc_summary["switch_ms_max"],
            "same_mode_ms_p50": float(np.median(steady_codec)) if steady_codec else None,
            "switch_cost_ms": codec_cost,
        },
        "heads": heads,
        "switch_cost_ms_max": worst,
        "target_ms": 1.0,
        "met": None if worst is None else worst <= 1.0,
    }
