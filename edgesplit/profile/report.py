"""``edgesplit profile report``: one bundle's numbers as three PNG plots and one HTML page.

The inputs are the JSON results of the other tools, each optional:

- the bundle's manifest (always): its modes table -- bytes per frame, accuracy, head latency per
  device -- gives accuracy against bytes and head time per mode;
- ``edgesplit profile latency`` (``--latency``): head, tail and full compute per graph;
- ``edgesplit profile power`` (``--power``): joules per inference per mode, measured or estimated;
- ``edgesplit bench e2e`` (``--e2e``): the end-to-end time per stage (head, encode, link, server);
- ``edgesplit eval`` (``--eval``): measured accuracy per mode and the "send the JPEG" baseline.

``--measure`` runs the latency and power profilers here, at a small N, for whichever of the two
was not given, so that one command gives the whole report. Every input file is checked before it
is used: its kind (a power result passed as ``--latency`` is refused, naming the flag it belongs
to), its keys, and that it was measured on this bundle (name, and hash where the file records
one). A section without its input says which command produces it instead of vanishing.

The inputs are checked in :mod:`.report_inputs`, the plots are in :mod:`.report_plots`, the page in
:mod:`.report_html`.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from ..bundle import Bundle, BundleError
from ..subcommands import machine_info
from . import report_html, report_plots
from .report_inputs import FLAGS, PRODUCERS, ReportError, load_input
from .report_plots import compute_p50s, e2e_stages


def measure_latency(bundle_path: str, runs: int, source: str | None) -> dict:
    """Per-node profiles and p50s of head, tail and full at batch 1 on one thread: the manifest's
    head_ms is measured that way too, so the two can be set side by side."""
    from .latency import profile_bundle

    res = profile_bundle(bundle_path, [1], [1], runs, source)
    return {"batch_sizes": [1], "threads": [1], "runs": runs, **res, **machine_info()}


def measure_energy(bundle: Bundle, profile: str | None, sampler: str, min_seconds: float, source: str | None) -> dict:
    from .power.measure import measure_power

    res = measure_power(
        bundle,
        sampler=sampler,
        profile=profile,
        hz=50.0,
        frames=16,
        min_seconds=min_seconds,
        baseline_seconds=min_seconds,
        source=source,
    )
    return {**res, **machine_info()}


def prepare_out(out: str | Path) -> Path:
    """Create the output folder and prove it writable now, before anything slow runs."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".edgesplit-report-"):
            pass
    except OSError as e:
        raise ReportError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    return out


def build_report(
    bundle_path: str | Path,
    out: str | Path,
    inputs: dict[str, str | None],
    measure: bool = False,
    profile: str | None = None,
    sampler: str = "auto",
    runs: int = 30,
    min_seconds: float = 0.5,
    source: str | None = None,
) -> dict[str, Any]:
    """Load and check every input, measure what ``measure`` asks for, write the plots and the page."""
    try:
        bundle = Bundle.load(bundle_path)
    except BundleError as e:
        raise ReportError(str(e)) from None
    data: dict[str, dict | None] = {}
    origin: dict[str, str] = {}
    for kind in FLAGS:
        data[kind] = load_input(inputs[kind], kind, bundle) if inputs.get(kind) else None
        if data[kind] is not None:
            origin[kind] = str(inputs[kind])
    out = prepare_out(out)
    notes: dict[str, str] = {}
    if measure and data["latency"] is None:
        data["latency"], origin["latency"] = measure_latency(str(bundle_path), runs, source), "measured by --measure"
    if measure and data["power"] is None:
        from .devices import ProfileError
        from .power.readings import PowerError

        try:
            data["power"], origin["power"] = (
                measure_energy(bundle, profile, sampler, min_seconds, source),
                "measured by --measure",
            )
        except (PowerError, ProfileError) as e:
            # The rest of the report stands; the energy section says why it is empty.
            notes["power"] = f"--measure could not measure power: {e}"
    missing = {k: PRODUCERS[k].format(bundle=bundle_path) for k in FLAGS if data[k] is None}

    plots = report_plots.write_plots(bundle, data, out)
    page = report_html.render(bundle, data, origin, plots, missing, notes, machine_info())
    html_path = out / "report.html"
    try:
        html_path.write_text(page, encoding="utf-8")
    except OSError as e:
        raise ReportError(f"--out {out}: cannot write report.html ({e.strerror or e})") from None
    return {
        "bundle": bundle.name,
        "bundle_hash": bundle.hash,
        "out": str(out),
        "html": str(html_path),
        "plots": {k: (str(v) if v else None) for k, v in plots.items()},
        "inputs": origin,
        "missing": missing,
        "notes": notes,
        "summary": summary_numbers(bundle, data),
    }


def summary_numbers(bundle: Bundle, data: dict[str, dict | None]) -> dict[str, Any]:
    """The headline figures per mode and per stage, for ``--json`` readers."""
    power = {m["mode"]: m["joules_per_inference"] for m in (data["power"] or {}).get("modes", [])}
    evals = {m["id"]: m["accuracy"] for m in (data["eval"] or {}).get("modes", [])}
    modes = [
        {
            "id": m.id,
            "name": m.name,
            "bytes_per_frame": m.bytes_per_frame,
            "accuracy": m.accuracy,
            "accuracy_eval": evals.get(m.id),
            "head_ms": m.head_ms,
            "joules_per_inference": power.get(m.id),
        }
        for m in bundle.modes
    ]
    out: dict[str, Any] = {"modes": modes}
    if data["power"] is not None:
        out["power_estimate"] = bool(data["power"]["estimate"])
        out["power_sampler"] = data["power"]["sampler"]
    if data["e2e"] is not None:
        out["e2e_stages_ms_p50"] = [e2e_stages(r) for r in data["e2e"]["runs"]]
    if data["latency"] is not None:
        out["compute_ms_p50"] = compute_p50s(data["latency"])
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, help="bundle directory (or tar): its modes table is always plotted")
    p.add_argument("--out", required=True, help="folder for the PNG files and report.html (created if absent)")
    p.add_argument("--latency", default=None, help="JSON of `edgesplit profile latency --bundle B --json`")
    p.add_argument("--power", default=None, help="JSON of `edgesplit profile power --bundle B --json`")
    p.add_argument("--e2e", default=None, help="JSON of `edgesplit bench e2e --bundle B --json`")
    p.add_argument("--eval", default=None, help="JSON of `edgesplit eval --bundle B --json` (JPEG baseline)")
    p.add_argument(
        "--measure",
        action="store_true",
        help="run the latency and power profilers here (small N) for whichever was not given",
    )
    p.add_argument(
        "--profile",
        default=None,
        help="with --measure: device profile for the power estimate when this machine has no sensor",
    )
    p.add_argument("--sampler", default="auto", help="with --measure: power sampler (default auto)")
    p.add_argument("--runs", type=int, default=30, help="with --measure: timed runs per graph (default 30)")
    p.add_argument("--min-seconds", type=float, default=0.5, help="with --measure: shortest power phase per mode")
    p.add_argument("--source", default=None, help="with --measure: frame source (default: the bundle's dataset)")


def run(a: argparse.Namespace) -> dict[str, Any]:
    if a.runs < 1 or a.min_seconds <= 0:
        raise SystemExit("edgesplit profile report: --runs must be at least 1 and --min-seconds positive")
    try:
        return build_report(
            a.bundle,
            a.out,
            {k: getattr(a, k) for k in FLAGS},
            a.measure,
            a.profile,
            a.sampler,
            a.runs,
            a.min_seconds,
            a.source,
        )
    except ReportError as e:
        raise SystemExit(f"edgesplit profile report: {e}") from None


def summarize(res: dict[str, Any]) -> str:
    lines = [f"{res['bundle']} ({res['bundle_hash'][:12]}): {res['html']}"]
    lines += [f"  {name:<18} {path or 'not drawn (no data)'}" for name, path in res["plots"].items()]
    for kind, command in res["missing"].items():
        lines.append(f"  no {kind} input: {command}")
    lines += [f"  note: {n}" for n in res["notes"].values()]
    if res["summary"].get("power_estimate"):
        lines.append("  power figures are an ESTIMATE (no sensor), labelled so in the report")
    return "\n".join(lines)
