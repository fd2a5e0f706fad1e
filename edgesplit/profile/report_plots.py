"""The three plots of ``edgesplit profile report``, drawn with matplotlib (Agg: files only).

Each plot is drawn from whatever inputs exist and is skipped (None) when none of its inputs does;
the page then says which command would fill it. Stage colours are the same in every panel, so
"head" in the end-to-end bar and "head" in the compute bar read as the same thing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..bundle import Bundle
from .report_inputs import ReportError

STAGE_COLOURS = {
    "head": "#1f77b4",
    "encode": "#17becf",
    "link + runtime": "#ff7f0e",
    "server queue": "#bcbd22",
    "server compute (tail)": "#2ca02c",
    "tail": "#2ca02c",
    "full": "#9467bd",
}
PNG_NAMES = {
    "latency_breakdown": "latency_breakdown.png",
    "energy_per_mode": "energy_per_mode.png",
    "accuracy_vs_bytes": "accuracy_vs_bytes.png",
}


def e2e_stages(run: dict[str, Any]) -> dict[str, float]:
    """One ``bench e2e`` run as stages that add up to its end-to-end p50. The link's share is what
    is left once the measured stages are taken off (p50s of different stages need not add up
    exactly, so it is floored at zero)."""
    head, enc = float(run["head_ms_p50"]), float(run["encode_ms_p50"])
    queue, tail = float(run["server_queue_ms_p50"]), float(run["tail_ms_p50"])
    total = float(run["e2e_ms_p50"])
    return {
        "head": head,
        "encode": enc,
        "link + runtime": max(0.0, total - head - enc - queue - tail),
        "server queue": queue,
        "server compute (tail)": tail,
        "e2e": total,
    }


def compute_p50s(latency: dict[str, Any]) -> dict[str, dict[str, float]]:
    """p50 per graph at the smallest batch size, on the first thread count profiled."""
    out = {}
    first_threads = (latency.get("threads") or [None])[0]
    for role, rows in latency.get("distributions", {}).items():
        rows = [r for r in rows if first_threads is None or r["threads"] == first_threads] or rows
        if rows:
            r = min(rows, key=lambda r: r["batch_size"])
            out[role] = {
                "p50_ms": float(r["p50_ms"]),
                "p95_ms": float(r["p95_ms"]),
                "batch_size": int(r["batch_size"]),
                "threads": int(r["threads"]),
            }
    return out


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ReportError("matplotlib is not installed: pip install 'edgesplit[profile]'") from None
    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    return plt


def _stacked(ax, labels: list[str], bars: list[dict[str, float]], title: str) -> None:
    """Horizontal stacked bars, one per label, with the total written after each bar."""
    seen = set()
    for y, stages in enumerate(bars):
        left = 0.0
        for stage, ms in stages.items():
            ax.barh(
                y,
                ms,
                left=left,
                color=STAGE_COLOURS.get(stage, "#7f7f7f"),
                label=None if stage in seen else stage,
                edgecolor="white",
                linewidth=0.5,
            )
            seen.add(stage)
            left += ms
        ax.text(left, y, f" {left:.3g} ms", va="center", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms (p50)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never over a bar
    ax.margins(x=0.15)


def plot_latency(bundle: Bundle, data: dict[str, dict | None], path: Path) -> Path | None:
    panels = []
    if data["e2e"] is not None:
        runs = data["e2e"]["runs"]
        labels = [f"run {i + 1}: {r['bytes_per_frame']:.0f} B/frame" for i, r in enumerate(runs)]
        bars = [{k: v for k, v in e2e_stages(r).items() if k != "e2e"} for r in runs]
        panels.append((labels, bars, "end to end, one frame at a time (edgesplit bench e2e)"))
    if data["latency"] is not None:
        p50 = compute_p50s(data["latency"])
        labels, bars = [], []
        if "head" in p50 and "tail" in p50:
            labels.append("split: head + tail")
            bars.append({"head": p50["head"]["p50_ms"], "tail": p50["tail"]["p50_ms"]})
        if "full" in p50:
            labels.append("local: full model")
            bars.append({"full": p50["full"]["p50_ms"]})
        if bars:
            any_row = next(iter(p50.values()))
            panels.append(
                (
                    labels,
                    bars,
                    f"compute per graph, batch {any_row['batch_size']}, {any_row['threads']} "
                    "thread(s) (edgesplit profile latency)",
                )
            )
    devices = sorted({d for m in bundle.modes for d in m.head_ms})
    plt = _pyplot()
    n = len(panels) + (1 if devices else 0)
    if n == 0:
        return None
    fig, axes = plt.subplots(n, 1, figsize=(10, 0.9 + 1.9 * n), squeeze=False)
    for ax, (labels, bars, title) in zip(axes[:, 0], panels):
        _stacked(ax, labels, bars, title)
    if devices:
        ax = axes[-1, 0]
        height = 0.8 / len(devices)
        for j, dev in enumerate(devices):
            ys = [i + j * height for i in range(len(bundle.modes))]
            ms = [m.head_ms.get(dev, 0.0) for m in bundle.modes]
            ax.barh(ys, ms, height=height, label=dev, color=STAGE_COLOURS["head"], alpha=1.0 - 0.5 * j / len(devices))
            for y, v in zip(ys, ms):
                ax.text(v, y, f" {v:.3g} ms", va="center", fontsize=8)
        ax.set_yticks(
            [i + 0.4 - height / 2 for i in range(len(bundle.modes))], [m.name for m in bundle.modes], fontsize=8
        )
        ax.invert_yaxis()
        ax.set_xlabel("head ms per frame (manifest head_ms)")
        ax.set_title("head latency per mode and device profile (bundle manifest)", fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.margins(x=0.15)
    fig.suptitle(f"{bundle.name}: latency breakdown", fontsize=10)
    fig.tight_layout()
    fig.savefig(str(path), format="png", dpi=100)
    plt.close(fig)
    return path


def plot_energy(bundle: Bundle, power: dict | None, path: Path) -> Path | None:
    if power is None:
        return None
    plt = _pyplot()
    names = {m.id: m.name for m in bundle.modes}
    rows = [(names.get(m["mode"], str(m["mode"])), m) for m in power["modes"]]
    if power.get("full"):
        rows.append(("full model (local)", power["full"]))
    fig, ax = plt.subplots(figsize=(8, 1.6 + 0.45 * len(rows)))
    mj = [r["joules_per_inference"] * 1e3 for _, r in rows]
    colours = [STAGE_COLOURS["full"] if label.startswith("full") else STAGE_COLOURS["head"] for label, _ in rows]
    ax.barh(range(len(rows)), mj, color=colours, hatch="//" if power["estimate"] else None, edgecolor="white")
    for y, (v, (_, r)) in enumerate(zip(mj, rows)):
        ax.text(max(v, 0.0), y, f" {v:.3g} mJ ({r['mean_w']:.2f} W)", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("mJ per inference, idle baseline subtracted (modes: head + encode)")
    ax.margins(x=0.25)
    title = f"{bundle.name}: energy per inference, sampler {power['sampler']}"
    if power["estimate"]:
        title = "ESTIMATE: no power sensor, modelled from CPU use\n" + title
        ax.text(
            0.98,
            0.95,
            "ESTIMATE",
            transform=ax.transAxes,
            ha="right",
            va="top",
            fontsize=22,
            color="#d62728",
            alpha=0.35,
            fontweight="bold",
        )
    ax.set_title(title, fontsize=9, color="#d62728" if power["estimate"] else "black")
    fig.tight_layout()
    fig.savefig(str(path), format="png", dpi=100)
    plt.close(fig)
    return path


def plot_accuracy(bundle: Bundle, manifest: dict, evaluation: dict | None, path: Path) -> Path | None:
    points = [(m.bytes_per_frame, m.accuracy, m.name) for m in bundle.modes if m.accuracy is not None]
    if not points and evaluation is None:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8))
    if evaluation is not None:
        grid = evaluation.get("jpeg_baseline") or []
        styles = [(":", "v"), ("-.", "^"), ("--", "D"), ("-", "o")]
        sides = sorted({g["side"] for g in grid})
        for i, side in enumerate(sides):
            sel = sorted((g for g in grid if g["side"] == side), key=lambda g: g["bytes_median"])
            ls, marker = styles[max(0, len(styles) - len(sides) + i) % len(styles)]  # the largest side: solid
            ax.plot(
                [g["bytes_median"] for g in sel],
                [100 * g["accuracy"] for g in sel],
                ls=ls,
                marker=marker,
                ms=3,
                lw=0.9,
                color="#7f7f7f",
                label=f"send the JPEG, {side} px (quality sweep)",
            )
        ev = sorted(evaluation["modes"], key=lambda m: m["bytes_per_frame"])
        ax.plot(
            [m["bytes_per_frame"] for m in ev],
            [100 * m["accuracy"] for m in ev],
            marker="s",
            mfc="none",
            ls="none",
            color="#2ca02c",
            ms=9,
            label="split modes, edgesplit eval",
        )
    if points:
        points.sort()
        ax.plot(
            [p[0] for p in points],
            [100 * p[1] for p in points],
            marker="o",
            color=STAGE_COLOURS["head"],
            label="split modes, manifest accuracy",
        )
        for b, acc, name in points:
            ax.annotate(name, (b, 100 * acc), textcoords="offset points", xytext=(5, -12), fontsize=8)
    teacher = (evaluation or {}).get("teacher_accuracy", manifest.get("teacher_accuracy"))
    if teacher is not None:
        ax.axhline(
            100 * float(teacher), ls="--", color="#d62728", lw=1, label=f"full model {100 * float(teacher):.2f}%"
        )
    ax.set_xscale("log")
    _byte_ticks(ax)
    ax.set_xlabel("bytes per frame on the wire (log)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"{bundle.name}: accuracy against bytes per frame", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(str(path), format="png", dpi=100)
    plt.close(fig)
    return path


def _byte_ticks(ax) -> None:
    """Plain byte counts on the log axis (200, 500, 1000) instead of powers of ten."""
    from matplotlib.ticker import NullFormatter

    lo, hi = ax.get_xlim()
    ticks = [m * 10**e for e in range(0, 8) for m in (1, 2, 3, 5) if lo <= m * 10**e <= hi]
    if len(ticks) >= 2:
        ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())


def write_plots(bundle: Bundle, data: dict[str, dict | None], out: Path) -> dict[str, Path | None]:
    try:
        plots = {
            "latency_breakdown": plot_latency(bundle, data, out / PNG_NAMES["latency_breakdown"]),
            "energy_per_mode": plot_energy(bundle, data["power"], out / PNG_NAMES["energy_per_mode"]),
            "accuracy_vs_bytes": plot_accuracy(
                bundle, bundle.manifest, data["eval"], out / PNG_NAMES["accuracy_vs_bytes"]
            ),
        }
        for name, path in plots.items():
            stale = out / PNG_NAMES[name]
            if path is None and stale.exists():
                stale.unlink()  # a plot from an earlier report would look like this one's
        return plots
    except OSError as e:
        raise ReportError(f"--out {out}: cannot write a plot ({e.strerror or e})") from None
