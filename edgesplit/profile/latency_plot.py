"""The picture of an ``edgesplit profile latency`` result (``--plot``): the slowest nodes per
graph, and whole-model latency against batch size per thread count. matplotlib is imported only
here, and only when a plot is asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def plot(result: dict[str, Any], path: str | Path, top: int = 12) -> None:
    """Top nodes per graph (bars) and p50 latency vs batch size per thread count (p95 as whiskers)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    graphs = result.get("per_node", {})
    dists = dict(result.get("distributions", {}))
    if "torch" in result:
        dists["torch"] = result["torch"]["distributions"]
    fig, axes = plt.subplots(1, len(graphs) + 1, figsize=(5 * (len(graphs) + 1), 4.5), squeeze=False)
    for ax, (role, prof) in zip(axes[0], graphs.items()):
        nodes = prof["nodes"][:top][::-1]
        ax.barh([f"{n['name'][:22]} ({n['op']})" for n in nodes], [n["median_us"] for n in nodes])
        ax.set_title(f"{role}: top nodes (b={prof['batch_size']}, {prof['threads']} thr)", fontsize=9)
        ax.set_xlabel("median kernel time (µs)")
        ax.tick_params(axis="y", labelsize=7)
    ax = axes[0][-1]
    for role, rows in dists.items():
        for t in sorted({r["threads"] for r in rows}):
            sel = sorted((r for r in rows if r["threads"] == t), key=lambda r: r["batch_size"])
            p50 = np.array([r["p50_ms"] for r in sel])
            p95 = np.array([r["p95_ms"] for r in sel])
            ax.errorbar(
                [r["batch_size"] for r in sel],
                p50,
                yerr=[np.zeros_like(p50), p95 - p50],
                marker="o",
                capsize=3,
                label=f"{role}, {t} thr",
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("latency p50 (ms), whisker p95")
    ax.set_title("whole-model latency", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(str(path), format="png", dpi=110)
    plt.close(fig)
