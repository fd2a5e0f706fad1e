"""The inputs of ``edgesplit profile report`` (:mod:`.report`): which tool wrote a JSON file, and
whether its keys are there and it was measured on this bundle. ``ReportError`` lives here, below
the report, its plots and its page, so all of them raise it without importing each other.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..bundle import Bundle

# kind -> the command that produces it ({bundle} is filled in); what the report says when it is missing
PRODUCERS = {
    "latency": "edgesplit profile latency --bundle {bundle} --batch-sizes 1 --threads 1 --json > latency.json",
    "power": "edgesplit profile power --bundle {bundle} --json > power.json "
    "(no sensor: add --sampler estimate --profile DEVICE)",
    "e2e": "edgesplit bench e2e --bundle {bundle} --json > e2e.json",
    "eval": "edgesplit eval --bundle {bundle} --data DATASET:SPLIT --json > eval.json",
}
FLAGS = {"latency": "--latency", "power": "--power", "e2e": "--e2e", "eval": "--eval"}
TOOLS = {
    "latency": "edgesplit profile latency",
    "power": "edgesplit profile power",
    "e2e": "edgesplit bench e2e",
    "eval": "edgesplit eval",
}
E2E_KEYS = (
    "e2e_ms_p50",
    "head_ms_p50",
    "encode_ms_p50",
    "tail_ms_p50",
    "rtt_ms_p50",
    "server_queue_ms_p50",
    "bytes_per_frame",
)


class ReportError(Exception):
    """An input the report cannot use, or an output it cannot write (the message says which)."""


def detect_kind(doc: Any) -> str | None:
    """Which tool wrote this JSON: ``latency``, ``power``, ``e2e``, ``eval``, ``bench NAME``,
    ``manifest``, or None when none of them."""
    if not isinstance(doc, dict):
        return None
    runs = doc.get("runs")
    if isinstance(runs, list) and runs and all(isinstance(r, dict) for r in runs) and "bench" in runs[0]:
        doc = runs[0]  # docs/bench files keep several runs of one benchmark
    if "bench" in doc:
        return "e2e" if doc["bench"] == "e2e" else f"bench {doc['bench']}"
    if "per_node" in doc or ("torch" in doc and "distributions" in doc.get("torch", {})):
        return "latency"
    if "sampler" in doc and "baseline" in doc:
        return "power"
    if "schema_version" in doc and "files" in doc and "modes" in doc:
        return "manifest"
    if "teacher_accuracy" in doc and "modes" in doc and "bundle" in doc:
        return "eval"
    return None


def _need(doc: dict, keys: tuple[str, ...] | list[str], what: str) -> None:
    missing = [k for k in keys if k not in doc]
    if missing:
        raise ReportError(
            f"{what} lacks {', '.join(repr(k) for k in missing)}: it is incomplete or from an "
            "older edgesplit; produce it again"
        )


def _same_bundle(doc: dict, bundle: Bundle, what: str, kind: str) -> None:
    """Refuse numbers measured on another bundle, or on another build of this one."""
    again = PRODUCERS[kind].format(bundle=bundle.root)
    if doc.get("bundle") != bundle.name:
        raise ReportError(
            f"{what} was measured on bundle {doc.get('bundle')!r}, not {bundle.name!r}: "
            f"give this bundle's result, e.g. {again}"
        )
    h = doc.get("bundle_hash")
    if h is not None and h != bundle.hash:
        raise ReportError(
            f"{what} was measured on another build of {bundle.name} (hash {str(h)[:12]}, this bundle "
            f"is {bundle.hash[:12]}): its numbers may not hold; measure again: {again}"
        )


def validate(doc: Any, kind: str, bundle: Bundle, what: str) -> dict:
    """Check one input of the given kind; return it normalised (e2e: always ``{"runs": [...]}``)."""
    found = detect_kind(doc)
    if found != kind:
        if found in FLAGS:
            raise ReportError(
                f"{what} is an `{TOOLS[found]}` result, not an `{TOOLS[kind]}` one: pass it with {FLAGS[found]}"
            )
        known = {
            "manifest": "a bundle's manifest.json",
            None: "not a result of any edgesplit profiler or benchmark",
        }.get(found, f"an `edgesplit {found}` result")
        raise ReportError(f"{what} is {known}; {FLAGS[kind]} takes the JSON of: {PRODUCERS[kind].format(bundle='B')}")
    if kind == "e2e":
        runs = doc["runs"] if "runs" in doc else [doc]
        for i, r in enumerate(runs):
            _need(r, ("bundle",) + E2E_KEYS, f"{what} (run {i})" if len(runs) > 1 else what)
            _same_bundle(r, bundle, what, kind)
        return {"runs": runs, **{k: v for k, v in doc.items() if k != "runs"}}
    if kind == "latency":
        if "bundle" not in doc:
            raise ReportError(
                f"{what} profiles a torch model (--model), not a bundle: "
                f"{PRODUCERS['latency'].format(bundle=bundle.root)}"
            )
        _need(doc, ("bundle", "per_node", "distributions"), what)
    elif kind == "power":
        _need(doc, ("bundle", "sampler", "estimate", "baseline", "modes"), what)
        for m in doc["modes"]:
            _need(m, ("mode", "joules_per_inference", "mean_w", "inferences", "seconds"), f"{what} (a mode)")
    elif kind == "eval":
        _need(doc, ("bundle", "teacher_accuracy", "modes"), what)
        for m in doc["modes"]:
            _need(m, ("id", "accuracy", "bytes_per_frame"), f"{what} (a mode)")
    _same_bundle(doc, bundle, what, kind)
    if kind in ("power", "eval"):
        ids = {m.id for m in bundle.modes}
        key = "mode" if kind == "power" else "id"
        unknown = [m[key] for m in doc["modes"] if m[key] not in ids]
        if unknown:
            raise ReportError(f"{what} has modes {unknown} that bundle {bundle.name} does not have")
    return doc


def load_input(path: str | Path, kind: str, bundle: Bundle) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ReportError(
            f"{FLAGS[kind]} {p}: no such file (it is written by: {PRODUCERS[kind].format(bundle=bundle.root)})"
        )
    try:
        doc = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportError(f"{FLAGS[kind]} {p}: not a JSON file ({e})") from None
    return validate(doc, kind, bundle, f"{FLAGS[kind]} {p}")
