"""How the planner words its predictions: one line per option (``breakdown``: every part's time,
the bytes on the link), why an option loses to the best (``why``), the ranked table
(``format_plan``). Duck-typed on :class:`edgesplit.control.planner.Prediction` and ``Scenario`` so
that the cost model imports this module and not the other way round.
"""

from __future__ import annotations

from typing import Any, Sequence

# Parts in the order a frame meets them (a U-shaped frame comes back to the device: its ``answer
# decode`` and device ``tail`` follow the server's ``body``).
PART_ORDER = (
    "preprocess",
    "head",
    "encode",
    "link",
    "decode",
    "tail",
    "body",
    "answer encode",
    "answer decode",
    "device tail",
    "overhead",
)


def _fmt_bytes(b: float) -> str:
    return f"{b:.0f} B" if b < 10_000 else f"{b / 1e3:.1f} kB"


def breakdown(p: Any, link: Any) -> str:
    """``head 3.1 ms + link 12.0 ms (784 B @ 0.5 Mbit/s) + tail 1.2 ms ...``"""
    terms = []
    for k in PART_ORDER:
        if k not in p.parts_ms:
            continue
        t = f"{k} {p.parts_ms[k]:.2f} ms"
        if k == "link":
            t += f" ({_fmt_bytes(p.request_bytes)} @ {link.mbps:g} Mbit/s" + (
                f", RTT {link.rtt_ms:g} ms)" if link.rtt_ms else ")"
            )
        terms.append(t)
    return " + ".join(terms) + f" = {p.latency_ms:.2f} ms"


def why(p: Any, best: Any, objective: str) -> str:
    if p is best:
        return "best"
    if objective == "energy" and p.energy_mj is not None and best.energy_mj is not None:
        gap = f"+{p.energy_mj - best.energy_mj:.2f} mJ vs best"
    else:
        gap = f"+{p.latency_ms - best.latency_ms:.2f} ms vs best"
    # Name the term that costs the most more than the winner's.
    diffs = {
        "device compute": p.device_ms - best.device_ms,
        "link": p.link_ms - best.link_ms,
        "server compute": p.server_ms - best.server_ms,
    }
    worst = max(diffs, key=diffs.get)
    what = {
        "link": f"sends {_fmt_bytes(p.request_bytes)} vs {_fmt_bytes(best.request_bytes)}",
        "device compute": f"device {p.device_ms:.2f} ms vs {best.device_ms:.2f} ms",
        "server compute": f"server {p.server_ms:.2f} ms vs {best.server_ms:.2f} ms",
    }[worst]
    return f"{gap}: loses on {worst} ({what})"


def format_plan(preds: Sequence[Any], sc: Any, objective: str) -> str:
    lines = [
        f"plan for {sc.device.name} -> {sc.link.mbps:g} Mbit/s (RTT {sc.link.rtt_ms:g} ms) -> {sc.server.name}, "
        f"objective {objective}; times measured on {sc.host.name}",
        f"{'#':>2} {'option':<28} {'latency ms':>10} {'energy mJ':>10} {'bytes':>9} {'acc':>6}  reason",
    ]
    for p in preds:
        e = "-" if p.energy_mj is None else f"{p.energy_mj:.2f}" + ("*" if p.energy_estimate else "")
        acc = "-" if p.accuracy is None else f"{p.accuracy:.3f}"
        lines.append(
            f"{p.rank:>2} {p.option:<28} {p.latency_ms:>10.2f} {e:>10} {_fmt_bytes(p.request_bytes) if p.kind != 'local' else '-':>9} "
            f"{acc:>6}  {p.reason}"
        )
    if any(p.energy_estimate for p in preds):
        lines.append("* energy is an estimate (a profile figure marked estimate, or no radio power: idle power used)")
    return "\n".join(lines)
