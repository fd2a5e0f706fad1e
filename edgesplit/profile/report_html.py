"""The page of ``edgesplit profile report``: one self-contained HTML file.

The plots are embedded as base64 ``data:`` URIs and the style sheet is inline, so the file can be
mailed or attached to an issue on its own; there is no script and nothing is fetched. Every
number drawn is also in a table, every section says where its numbers come from (file or
``--measure``, the machine and date), and a section without input names the command that fills it.
"""

from __future__ import annotations

import base64
import platform
from html import escape
from pathlib import Path
from typing import Any

from ..bundle import Bundle
from .report_plots import compute_p50s, e2e_stages

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:980px;margin:2em auto;
     padding:0 1em;color:#222}
h1{font-size:1.5em} h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em} td,th{border:1px solid #ccc;padding:.25em .6em}
th{background:#f3f3f3;text-align:left} td.n{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;border:1px solid #ddd} code{background:#f5f5f5;padding:.1em .3em}
.missing{background:#fff8e1;border-left:4px solid #f0ad4e;padding:.5em .8em}
.estimate{background:#fdecea;border-left:4px solid #d62728;padding:.5em .8em;font-weight:bold;color:#a00}
"""


def _cell(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return f"<td>{'—' if v is None else escape(str(v))}</td>"
    if isinstance(v, (int, float)):
        return f'<td class="n">{v:.4g}</td>' if isinstance(v, float) else f'<td class="n">{v}</td>'
    return f"<td>{escape(str(v))}</td>"


def table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def image(path: Path | None, alt: str) -> str:
    if path is None:
        return ""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<p><img alt="{escape(alt)}" src="data:image/png;base64,{data}"></p>'


def missing_note(kind: str, missing: dict[str, str], notes: dict[str, str], flag: str) -> str:
    if kind not in missing:
        return ""
    why = f"<br>{escape(notes[kind])}" if kind in notes else ""
    return (
        f'<p class="missing">No {escape(kind)} input. Produce it with <code>{escape(missing[kind])}</code> and '
        f"pass it with <code>{flag}</code> (or use <code>--measure</code> for latency and power).{why}</p>"
    )


def _where(doc: dict | None) -> str:
    if not doc:
        return "—"
    if isinstance(doc.get("runs"), list) and doc["runs"]:
        doc = doc["runs"][0]  # bench files keep several runs; they ran on one machine
    return ", ".join(f"{k} {doc[k]}" for k in ("machine", "cpus", "python", "date") if k in doc) or "not recorded"


def accuracy_section(bundle: Bundle, data: dict, plots: dict, missing: dict, notes: dict) -> str:
    ev = {m["id"]: m for m in (data["eval"] or {}).get("modes", [])}
    grid = (data["eval"] or {}).get("jpeg_baseline") or []
    rows = []
    for m in bundle.modes:
        fits = [g for g in grid if g["bytes_median"] <= m.bytes_per_frame]
        best = max(fits, key=lambda g: g["accuracy"]) if fits else None
        rows.append(
            [
                m.name,
                m.bytes_per_frame,
                None if m.accuracy is None else f"{100 * m.accuracy:.2f}%",
                f"{100 * ev[m.id]['accuracy']:.2f}%" if m.id in ev else None,
                None
                if best is None
                else f"{100 * best['accuracy']:.2f}% ({best['side']} px, q{best['quality']}, "
                f"{best['bytes_median']:.0f} B)",
            ]
        )
    parts = [
        "<h2>Accuracy against bytes per frame</h2>",
        image(plots["accuracy_vs_bytes"], "accuracy against bytes per frame"),
    ]
    if plots["accuracy_vs_bytes"] is None:
        parts.append('<p class="missing">The modes table has no measured accuracy to plot.</p>')
    parts.append(
        table(
            ["mode", "bytes/frame", "accuracy (manifest)", "accuracy (edgesplit eval)", "best JPEG at <= these bytes"],
            rows,
        )
    )
    parts.append(missing_note("eval", missing, notes, "--eval"))
    return "".join(parts)


def latency_section(bundle: Bundle, data: dict, plots: dict, missing: dict, notes: dict) -> str:
    parts = ["<h2>Latency breakdown per stage</h2>", image(plots["latency_breakdown"], "latency breakdown")]
    if data["e2e"] is not None:
        runs = data["e2e"]["runs"]
        stages = [e2e_stages(r) for r in runs]
        names = list(stages[0])
        parts.append("<h3>End to end (edgesplit bench e2e), p50 ms</h3>")
        parts.append(
            table(
                ["run", "bytes/frame", *names, "measured on"],
                [
                    [i + 1, r["bytes_per_frame"], *[s[n] for n in names], _where(r)]
                    for i, (r, s) in enumerate(zip(runs, stages))
                ],
            )
        )
        parts.append(
            "<p>link + runtime = end-to-end p50 minus the other stages: the network and the two ZeroMQ endpoints.</p>"
        )
    parts.append(missing_note("e2e", missing, notes, "--e2e"))
    if data["latency"] is not None:
        lat = data["latency"]
        p50 = compute_p50s(lat)
        parts.append("<h3>Compute per graph (edgesplit profile latency)</h3>")
        parts.append(
            table(
                ["graph", "batch", "threads", "p50 ms", "p95 ms"],
                [[role, v["batch_size"], v["threads"], v["p50_ms"], v["p95_ms"]] for role, v in p50.items()],
            )
        )
        for role, prof in lat.get("per_node", {}).items():
            parts.append(
                f"<p>{escape(role)}: top nodes by median kernel time ({prof.get('runs', '?')} runs, "
                f"run() {prof.get('session_us', 0):.0f} µs)</p>"
            )
            parts.append(
                table(
                    ["node", "op", "median µs"],
                    [[n["name"], n["op"], n["median_us"]] for n in prof.get("nodes", [])[:5]],
                )
            )
    parts.append(missing_note("latency", missing, notes, "--latency"))
    devices = sorted({d for m in bundle.modes for d in m.head_ms})
    if devices:
        parts.append("<h3>Head latency per mode (bundle manifest), ms</h3>")
        parts.append(table(["mode", *devices], [[m.name, *[m.head_ms.get(d) for d in devices]] for m in bundle.modes]))
        measured_on = bundle.manifest.get("measured_on", {})
        parts.append("".join(f"<p>{escape(d)}: {escape(str(measured_on[d]))}</p>" for d in devices if d in measured_on))
    return "".join(parts)


def energy_section(bundle: Bundle, data: dict, plots: dict, missing: dict, notes: dict) -> str:
    parts = ["<h2>Energy per mode</h2>"]
    power = data["power"]
    if power is None:
        parts.append(missing_note("power", missing, notes, "--power"))
        return "".join(parts)
    info = power.get("sampler_info", {})
    if power["estimate"]:
        src = ", ".join(f"{k} {info[k]}" for k in ("profile", "idle_w", "active_w") if k in info)
        parts.append(
            f'<p class="estimate">ESTIMATE: no power sensor was read. These figures are modelled from CPU '
            f"utilisation and a device profile's power figures ({escape(src)}), not measured.</p>"
        )
    parts.append(image(plots["energy_per_mode"], "energy per mode"))
    names = {m.id: m.name for m in bundle.modes}
    rows = [
        [
            names.get(r["mode"], r["mode"]),
            r["joules_per_inference"] * 1e3,
            r.get("gross_joules_per_inference", 0.0) * 1e3,
            r["mean_w"],
            r["inferences"],
            r["seconds"],
        ]
        for r in power["modes"]
    ]
    if power.get("full"):
        f = power["full"]
        rows.append(
            [
                "full model (local)",
                f["joules_per_inference"] * 1e3,
                f.get("gross_joules_per_inference", 0.0) * 1e3,
                f["mean_w"],
                f["inferences"],
                f["seconds"],
            ]
        )
    parts.append(table(["mode", "mJ/inference (net)", "mJ/inference (gross)", "mean W", "inferences", "seconds"], rows))
    parts.append(
        f"<p>sampler <b>{escape(str(power['sampler']))}</b>{' (ESTIMATE)' if power['estimate'] else ''} at "
        f"{power.get('hz', '?')} Hz, idle baseline {power['baseline'].get('watts', '?')} W; "
        f"{escape(str(power.get('note', '')))}</p>"
    )
    return "".join(parts)


def render(
    bundle: Bundle,
    data: dict[str, dict | None],
    origin: dict[str, str],
    plots: dict[str, Path | None],
    missing: dict[str, str],
    notes: dict[str, str],
    here: dict[str, Any],
) -> str:
    from .. import __version__

    m = bundle.manifest
    meta = table(
        ["", ""],
        [
            ["bundle", bundle.name],
            ["bundle hash (sha256 of manifest.json)", bundle.hash],
            ["family", bundle.family],
            ["description", m.get("description", "")],
            ["bundle created", m.get("created")],
            ["report generated", here["date"]],
            [
                "report machine",
                f"{platform.platform()}, {here['machine']}, {here['cpus']} CPUs, Python {here['python']}, "
                f"edgesplit {__version__}",
            ],
        ],
    )
    inputs = table(
        ["input", "from", "measured on"],
        [[k, origin.get(k, "not given"), _where(data[k]) if data[k] else "—"] for k in data],
    )
    modes = table(
        ["id", "name", "channels", "bits", "bytes/frame", "accuracy", "head ms"],
        [
            [
                x.id,
                x.name,
                x.channels,
                x.bits,
                x.bytes_per_frame,
                x.accuracy,
                ", ".join(f"{d} {v:.4g}" for d, v in x.head_ms.items()) or None,
            ]
            for x in bundle.modes
        ],
    )
    body = "".join(
        [
            f"<h1>edgesplit report: {escape(bundle.name)}</h1>",
            meta,
            "<h2>Inputs</h2>",
            inputs,
            "<h2>Modes (bundle manifest)</h2>",
            modes,
            accuracy_section(bundle, data, plots, missing, notes),
            latency_section(bundle, data, plots, missing, notes),
            energy_section(bundle, data, plots, missing, notes),
        ]
    )
    title = escape(f"edgesplit report: {bundle.name}")
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{STYLE}</style></head><body>\n{body}\n</body></html>\n"
    )
