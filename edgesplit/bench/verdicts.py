"""The targets the benchmarks are judged on, as functions of the JSON a run writes.

``bench restart``, ``bench overload`` and ``bench server`` attach their :func:`*_verdict` to their
JSON; ``tools/bench_table.py`` renders the targets tables of docs/BENCHMARKS.md from the
committed JSON (docs/bench/*.json) with the same functions, so neither a verdict nor the "met"
column is ever written by hand. Each verdict holds one boolean per criterion of its target and
``met``, their conjunction.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[2] / "docs" / "bench"


def _met(criteria: dict[str, bool]) -> dict[str, bool]:
    return {**criteria, "met": all(criteria.values())}


def restart_verdict(r: dict) -> dict[str, bool]:
    """kill -9 during a 10k-frame stream: 0 silently lost, resumed <= 1 s after restart."""
    return _met(
        {
            "frames_ge_10k": r["frames_sent"] >= 10_000,
            "every_frame_ended_once": r["silently_lost"] == 0 and r["duplicates"] == 0 and r["unknown_ids"] == 0,
            "resumed_within_1s": r["resume_ms"] is not None and r["resume_ms"] <= 1000.0,
        }
    )


def overload_verdict(r: dict) -> dict[str, bool]:
    """10x overload: server RSS growth <= 50 MB, admitted requests' p99 <= deadline, one answer each."""
    p99 = r["admitted_server_ms_p99"]
    return _met(
        {
            "factor_ge_10": r["factor"] >= 10.0,
            "rss_growth_le_50mb": r["server_rss_growth_mb"] <= 50.0,
            "admitted_p99_within_deadline": p99 is not None and p99 <= r["deadline_ms"],
            "exactly_one_answer_each": bool(r["exactly_one_answer_each"]),
            "no_wrong_results": r["wrong_results"] == 0,
        }
    )


def server_verdict(r: dict) -> dict[str, bool]:
    """At 32 agents the daemon reaches >= 0.9x the engine's own frames/s at the same batch size,
    every answer correct."""
    top = r["at_max_agents"]
    rows = r["batched"] + r["unbatched"]
    return _met(
        {
            "agents_ge_32": top["agents"] >= 32,
            "efficiency_ge_0.9": top["efficiency"] >= 0.9,
            "every_answer_correct": all(
                x["wrong_results"] == 0 and x["unanswered"] == 0 and not x["errors"] for x in rows
            ),
        }
    )


def fuzz_verdict(r: dict) -> dict[str, bool]:
    """>= 100k fuzzed frames: 0 crashes, every answer as PROTOCOL.md says, valid agents' p99 <= 2x."""
    f = r["fuzz"]
    return _met(
        {
            "fuzzed_ge_100k": r["fuzzed_frames"] >= 100_000,
            "no_crash": r["crashes"] == 0 and r["server_alive_at_end"] and r["server_exit_code_on_sigterm"] == 0,
            "answers_as_documented": f["mismatches"] == 0 and f["unanswered"] == 0 and f["internal_errors"] == 0,
            "valid_p99_within_2x": r["valid_p99_ratio"] <= 2.0,
        }
    )


def accuracy_verdict(r: dict, points: float, max_bytes: float) -> dict[str, bool]:
    """The default mode within ``points`` accuracy points of the teacher at <= ``max_bytes``."""
    return _met(
        {
            "within_points": r["teacher_accuracy"] - r["accuracy"] <= points / 100 + 1e-12,
            "within_bytes": r["bytes_per_frame"] <= max_bytes,
        }
    )


# -- the targets tables ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    text: str
    files: tuple[str, ...]  # docs/bench/*.json it is judged on
    verdict: Callable[[dict], dict[str, bool]]
    measured: Callable[[list[dict]], str]


def _load(name: str, bench_dir: Path) -> dict | None:
    p = bench_dir / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else None


def _runs(docs: list[dict]) -> list[dict]:  # e2e files hold several runs
    return [run for d in docs for run in d.get("runs", [d])]


def _span(values, fmt: str = "{:.2f}") -> str:
    lo, hi = min(values), max(values)
    return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)}–{fmt.format(hi)}"


def _acc(d: dict) -> str:
    return (
        f"{d['accuracy']:.4f} vs {d['teacher_accuracy']:.4f} at {d['bytes_per_frame']:.0f} B: "
        f"{(d['accuracy'] - d['teacher_accuracy']) * 100:+.2f}"
    )


def _server_label(d: dict) -> str:
    return f"{d['bundle'].split('-')[0]} {d['threads']}-thread tail"


TABLES: dict[str, list[Target]] = {
    "foundation": [
        Target(
            "CIFAR-10, shared ResNet-56 adapted to JPEG: BottleFit within 1.0 point at ≤ 512 B",
            ("eval-cifar10-sharedteacher-experiment",),
            lambda r: accuracy_verdict(r, 1.0, 512),
            lambda ds: _acc(ds[0]) + " (CPU-sized schedule)",
        ),
        Target(
            "CIFAR-10 shipped bundle (own ResNet-20 teacher): within 1.0 point at ≤ 512 B",
            ("eval-cifar10-resnet20-bottlefit",),
            lambda r: accuracy_verdict(r, 1.0, 512),
            lambda ds: _acc(ds[0]),
        ),
        Target(
            "Imagenette: within 2.0 points of own teacher at ≤ 1,000 B",
            ("eval-imagenette-resnet18-bottlefit",),
            lambda r: accuracy_verdict(r, 2.0, 1000),
            lambda ds: _acc(ds[0]),
        ),
        Target(
            "Imagenette: ≥ 15 points above `jpeg_accuracy_at_bytes`",
            ("eval-imagenette-resnet18-bottlefit",),
            lambda r: _met({"margin_ge_15_points": r["accuracy"] - r["jpeg_accuracy_at_bytes"] >= 0.15}),
            lambda ds: (
                f"{(ds[0]['accuracy'] - ds[0]['jpeg_accuracy_at_bytes']) * 100:+.1f} at "
                f"{ds[0]['bytes_per_frame']:.0f} B ({ds[0]['accuracy']:.4f} vs {ds[0]['jpeg_accuracy_at_bytes']:.4f})"
            ),
        ),
        Target(
            "overhead_ratio ≤ 1.5 on loopback",
            ("e2e-cifar10-resnet20-bottlefit", "e2e-imagenette-resnet18-bottlefit"),
            lambda r: _met({"overhead_ratio_le_1.5": all(x["overhead_ratio"] <= 1.5 for x in _runs([r]))}),
            lambda ds: (
                f"{_span([x['overhead_ratio'] for x in _runs(ds)], '{:.1f}')} (overhead "
                f"{_span([x['overhead_ms_p50'] for x in _runs(ds)])} ms)"
            ),
        ),
        Target(
            "agent RSS ≤ 150 MB, no torch",
            ("e2e-cifar10-resnet20-bottlefit", "e2e-imagenette-resnet18-bottlefit"),
            lambda r: _met(
                {
                    "rss_le_150mb": all(x["agent_rss_mb"] <= 150 for x in _runs([r])),
                    "no_torch": not any(x["agent_torch_loaded"] for x in _runs([r])),
                }
            ),
            lambda ds: (
                f"{_span([x['agent_rss_mb'] for x in _runs(ds)], '{:.0f}')} MB, torch "
                f"{'loaded' if any(x['agent_torch_loaded'] for x in _runs(ds)) else 'never imported'}"
            ),
        ),
    ],
    "fleet": [
        Target(
            "≥ 100k fuzzed frames: 0 crashes, valid agents' p99 ≤ 2x the run without fuzzing",
            ("fuzz-cifar10-resnet20-bottlefit",),
            fuzz_verdict,
            lambda ds: (
                f"{ds[0]['fuzzed_frames']:,} messages; {ds[0]['crashes']} crashes, "
                f"{ds[0]['fuzz']['mismatches']} answers that disagree with PROTOCOL.md, "
                f"{ds[0]['fuzz']['unanswered']} unanswered, {ds[0]['fuzz']['internal_errors']} INTERNAL; "
                f"valid agents p99 {ds[0]['valid_baseline']['latency_ms_p99']:.1f} → "
                f"{ds[0]['valid_under_fuzz']['latency_ms_p99']:.1f} ms (**{ds[0]['valid_p99_ratio']:.2f}x**); "
                f"exit {ds[0]['server_exit_code_on_sigterm']} on SIGTERM"
            ),
        ),
        Target(
            "kill -9 during a 10k-frame stream: 0 silently lost, resumed ≤ 1 s after restart",
            ("restart-cifar10-resnet20-bottlefit",),
            restart_verdict,
            lambda ds: (
                f"{ds[0]['frames_sent']:,} frames: {ds[0]['results_server']:,} server + "
                f"{ds[0]['results_local']:,} local + {ds[0]['errors']} errors, **{ds[0]['silently_lost']} lost**, "
                f"{ds[0]['duplicates']} duplicates; first server result **{ds[0]['resume_ms']:.0f} ms** "
                "after the new server listens"
            ),
        ),
        Target(
            "10x overload: server RSS growth ≤ 50 MB, admitted requests' p99 ≤ deadline",
            ("overload-imagenette-resnet18-bottlefit", "overload-cifar10-resnet20-bottlefit"),
            overload_verdict,
            lambda ds: (
                "; ".join(
                    f"{d['bundle'].split('-')[0]}: +{d['server_rss_growth_mb']:.1f} MB, admitted p99 "
                    f"**{d['admitted_server_ms_p99']:.1f} ms** / {d['deadline_ms']:.0f} ms"
                    for d in ds
                )
                + ("; every request exactly one answer" if all(d["exactly_one_answer_each"] for d in ds) else "")
            ),
        ),
        Target(
            "CPU: at 32 agents the daemon ≥ 0.9x the engine's own frames/s at the same batch size",
            (
                "server-cpu-imagenette-resnet18-bottlefit",
                "server-cpu-cifar10-resnet20-bottlefit",
                "server-cpu-imagenette-resnet18-bottlefit-threads1",
            ),
            server_verdict,
            lambda ds: "; ".join(f"{_server_label(d)}: **{d['at_max_agents']['efficiency']:.3f}**" for d in ds),
        ),
        Target(
            "GPU: batched ≥ 4x unbatched at 32 agents; runtime ≥ 0.9x bare torch",
            ("server-gpu-imagenette-resnet18-bottlefit",),
            lambda r: _met(
                {
                    "batched_ge_4x": r["at_max_agents"]["batched_over_unbatched"] >= 4.0,
                    "runtime_ge_0.9x_bare_torch": r["daemon_over_bare_torch_at_max_agents"] >= 0.9,
                }
            ),
            lambda ds: f"batched / unbatched {ds[0]['at_max_agents']['batched_over_unbatched']:.2f}x",
        ),
    ],
}


def _status(target: Target, docs: list[dict]) -> str:
    met = [target.verdict(d)["met"] for d in docs]
    if all(met):
        return "met"
    if not any(met):
        return "**missed**"
    labels = [_server_label(d) if d.get("bench") == "server" else d.get("bundle", "?") for d in docs]
    ok = ", ".join(label for label, m in zip(labels, met) if m)
    missed = ", ".join(label for label, m in zip(labels, met) if not m)
    return f"met ({ok}); **missed** ({missed})"


def render_table(name: str, bench_dir: Path = BENCH_DIR) -> str:
    """The markdown table of one targets table, every row judged on its committed JSON."""
    lines = ["| target | measured | |", "|---|---|---|"]
    for t in TABLES[name]:
        docs = [_load(f, bench_dir) for f in t.files]
        if any(d is None for d in docs):
            lines.append(f"| {t.text} | not measured (no {', '.join(f + '.json' for f in t.files)}) | open |")
            continue
        lines.append(f"| {t.text} | {t.measured(docs)} | {_status(t, docs)} |")
    return "\n".join(lines)
