"""``edgesplit profile latency``: where the time goes in a bundle's head, tail and full model.

Two views, both on real frames:

- **per node**: ONNX Runtime's own profiler (``SessionOptions.enable_profiling``) writes a Chrome
  trace; every ``Node`` event carries its kernel time in µs, and every ``model_run`` event one
  whole ``run()``. Node times are grouped by run (a node belongs to the run whose span holds it),
  then the median over runs is taken per node and per op type. For a torch model (zoo name and
  optional checkpoint) ``torch.profiler`` gives the same per aten op and per leaf module.
- **whole model**: wall-clock latency distributions (p50/p95/p99/mean) per batch size and thread
  count, timed outside any profiler so that its overhead is not in them.

The per-node numbers come from one batch size and thread count (the first of each list): the one
a device runs.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROLES = ("head", "tail", "full")


def parse_ort_trace(events: list[dict]) -> list[dict[str, Any]]:
    """ONNX Runtime profile events -> one record per ``run()``: its duration and its nodes' kernel
    times (``{"run_us": 812, "nodes": {name: (op, us)}}``), in time order."""
    runs = sorted(
        (e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"), key=lambda e: e["ts"]
    )
    records = [{"run_us": float(r["dur"]), "start": r["ts"], "end": r["ts"] + r["dur"], "nodes": {}} for r in runs]
    for e in events:
        # Newer releases also emit fence_before/fence_after events per node; only the kernel counts.
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        name = e["name"][: -len("_kernel_time")]
        for rec in records:
            if rec["start"] <= e["ts"] <= rec["end"]:
                op, us = rec["nodes"].get(name, (e.get("args", {}).get("op_name", "?"), 0.0))
                rec["nodes"][name] = (op, us + float(e["dur"]))
                break
    for rec in records:
        del rec["start"], rec["end"]
    return records


def summarize_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median per node and per op type over runs, next to the median session time."""
    if not runs:
        raise ValueError("the ONNX Runtime trace has no model_run events")
    names = {n: op for rec in runs for n, (op, _) in rec["nodes"].items()}
    nodes = []
    for name, op in names.items():
        us = [rec["nodes"].get(name, (op, 0.0))[1] for rec in runs]
        nodes.append({"name": name, "op": op, "median_us": float(np.median(us)), "mean_us": float(np.mean(us))})
    nodes.sort(key=lambda n: -n["median_us"])
    per_op: dict[str, list[float]] = {}
    for op in sorted(set(names.values())):
        per_op[op] = [sum(us for o, us in rec["nodes"].values() if o == op) for rec in runs]
    ops = sorted(
        (
            {"op": op, "median_us": float(np.median(v)), "nodes": sum(1 for o in names.values() if o == op)}
            for op, v in per_op.items()
        ),
        key=lambda o: -o["median_us"],
    )
    node_sums = [sum(us for _, us in rec["nodes"].values()) for rec in runs]
    session = [rec["run_us"] for rec in runs]
    return {
        "runs": len(runs),
        "session_us": float(np.median(session)),
        "nodes_sum_us": float(np.median(node_sums)),
        # Kernel time as a share of run(): the rest is ONNX Runtime's own overhead.
        "kernel_share": float(np.median([s / max(r, 1e-9) for s, r in zip(node_sums, session)])),
        "nodes": nodes,
        "ops": ops,
    }


def profile_onnx_nodes(path: str | Path, x: np.ndarray, threads: int, runs: int, warmup: int = 3) -> dict[str, Any]:
    """Per-node latency of one ONNX graph from ONNX Runtime's profiler."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="edgesplit-ortprof-") as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # as OrtEngine runs it
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "ort")
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: x}
        for _ in range(warmup):
            sess.run(None, feed)
        # The trace holds every run since the session started; drop the warm-up ones below.
        for _ in range(runs):
            sess.run(None, feed)
        trace = json.loads(Path(sess.end_profiling()).read_text())
    return {
        "file": Path(path).name,
        "batch_size": int(x.shape[0]),
        "threads": int(threads),
        **summarize_runs(parse_ort_trace(trace)[warmup:]),
    }


def percentiles(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {
        "p50_ms": float(np.percentile(a, 50)),
        "p95_ms": float(np.percentile(a, 95)),
        "p99_ms": float(np.percentile(a, 99)),
        "mean_ms": float(a.mean()),
        "runs": int(a.size),
    }


def time_calls(fn: Callable[[], Any], runs: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def onnx_distributions(
    path: str | Path, frames: np.ndarray, batch_sizes: list[int], threads: list[int], runs: int
) -> list[dict[str, Any]]:
    """Whole-graph latency per (threads, batch size) through the engine the agent and server use."""
    from ..engine import create_engine

    rows = []
    for t in threads:
        engine = create_engine(path, "ort", threads=t)
        for b in batch_sizes:
            x = batch_of(frames, b)
            ms = time_calls(lambda e=engine, x=x: e.run1(x), runs)
            rows.append(
                {"batch_size": b, "threads": t, **percentiles(ms), "frames_per_s": b * 1e3 / float(np.median(ms))}
            )
    return rows


def batch_of(frames: np.ndarray, n: int) -> np.ndarray:
    """``n`` frames, repeating the real ones when fewer were read."""
    reps = -(-n // len(frames))
    return np.ascontiguousarray(np.concatenate([frames] * reps)[:n])


def real_frames(input_spec: dict, source: str, n: int) -> np.ndarray:
    from ..data.sources import open_source, take
    from ..data.transforms import preprocess

    frames = [preprocess(s.data, input_spec) for s in take(open_source(source), n)]
    if not frames:
        raise ValueError(f"no frames in {source}")
    return np.stack(frames)


def default_source(classes: list[str]) -> str:
    """The shared dataset whose classes the model predicts (its eval split), else CIFAR-10 test."""
    from ..data.sources import CLASSES

    for name, names in CLASSES.items():
        if list(classes) == names:
            return f"{name}:{'test' if name == 'cifar10' else 'val'}"
    return "cifar10:test"


def profile_bundle(
    bundle_path: str | Path, batch_sizes: list[int], threads: list[int], runs: int, source: str | None = None
) -> dict[str, Any]:
    """Per-node profiles and latency distributions of a bundle's head, tail and (if present) full."""
    from ..bundle import Bundle
    from ..engine import create_engine

    bundle = Bundle.load(bundle_path)
    source = source or default_source(bundle.classes)
    images = real_frames(bundle.input_spec, source, max(batch_sizes))
    # The tail's input is the head's real output on those frames, as the server would receive it.
    wire = create_engine(bundle.file("head"), "ort").run1(images)
    inputs = {"head": images, "tail": wire, "full": images}
    roles = [r for r in ROLES if bundle.has(r)]
    nodes = {
        r: profile_onnx_nodes(bundle.file(r), batch_of(inputs[r], batch_sizes[0]), threads[0], runs) for r in roles
    }
    dists = {r: onnx_distributions(bundle.file(r), inputs[r], batch_sizes, threads, runs) for r in roles}
    return {
        "bundle": bundle.name,
        "path": str(bundle_path),
        "source": source,
        "engine": "ort",
        "per_node": nodes,
        "distributions": dists,
    }


def profile_torch_model(
    model, frames: np.ndarray, batch_sizes: list[int], threads: list[int], runs: int
) -> dict[str, Any]:
    """torch.profiler per aten op and per leaf module (module spans are marked with
    ``record_function`` from forward hooks), and latency distributions under ``torch.set_num_threads``."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    model = model.eval()
    spans: dict[torch.nn.Module, Any] = {}
    leaves = {m: name for name, m in model.named_modules() if name and not list(m.children())}

    def enter(m, _inputs):
        spans[m] = record_function(f"module::{leaves[m]}")
        spans[m].__enter__()

    def leave(m, _inputs, _output):
        spans.pop(m).__exit__(None, None, None)

    hooks = [h for m in leaves for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    previous_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads[0])
        x = torch.from_numpy(batch_of(frames, batch_sizes[0]))
        with torch.no_grad():
            for _ in range(3):
                model(x)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(runs):
                    model(x)
    finally:
        for h in hooks:
            h.remove()
    modules, ops = [], []
    for ev in prof.key_averages():
        if ev.key.startswith("module::"):
            # The profiler aggregates over runs, so a mean per run is what it can give.
            modules.append(
                {
                    "name": ev.key[len("module::") :],
                    "mean_us": ev.cpu_time_total / runs,
                    "calls_per_run": ev.count / runs,
                }
            )
        elif ev.key.startswith("aten::"):
            ops.append(
                {"op": ev.key, "self_us_per_run": ev.self_cpu_time_total / runs, "calls_per_run": ev.count / runs}
            )
    modules.sort(key=lambda m: -m["mean_us"])
    ops.sort(key=lambda o: -o["self_us_per_run"])

    rows = []
    try:
        with torch.no_grad():
            for t in threads:
                torch.set_num_threads(t)
                for b in batch_sizes:
                    xb = torch.from_numpy(batch_of(frames, b))
                    ms = time_calls(lambda xb=xb: model(xb), runs)
                    rows.append(
                        {
                            "batch_size": b,
                            "threads": t,
                            **percentiles(ms),
                            "frames_per_s": b * 1e3 / float(np.median(ms)),
                        }
                    )
    finally:
        torch.set_num_threads(previous_threads)
    return {
        "engine": "torch",
        "batch_size": batch_sizes[0],
        "threads": threads[0],
        "runs": runs,
        "modules": modules,
        "ops": ops,
        "distributions": rows,
    }


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"expected positive integers, got {text!r}")
    return values


def add_arguments(p) -> None:
    p.add_argument("--bundle", help="bundle directory or tar: head, tail and full through ONNX Runtime")
    p.add_argument("--model", help="zoo model name: the whole model through torch.profiler")
    p.add_argument("--checkpoint", help="state dict for --model (weights_only); default: random init")
    p.add_argument("--num-classes", type=int, default=None, help="for --model (default: 10 for *_cifar, else 1000)")
    p.add_argument("--batch-sizes", default="1,8,32", help="comma-separated; the first is the per-node profile's")
    p.add_argument(
        "--threads", default="1,2", help="intra-op threads, comma-separated; the first is the per-node profile's"
    )
    p.add_argument("--runs", type=int, default=50, help="timed runs per measurement (after 3 warm-up runs)")
    p.add_argument("--data", default=None, help="frame source (default: the dataset matching the classes)")
    p.add_argument("--plot", default=None, help="write a PNG here (needs matplotlib: pip install 'edgesplit[profile]')")


def run(a) -> dict[str, Any]:
    if not a.bundle and not a.model:
        raise SystemExit("edgesplit profile latency: give --bundle, --model or both")
    if a.runs < 1:
        raise SystemExit("edgesplit profile latency: --runs must be at least 1")
    try:
        batch_sizes, threads = _int_list(a.batch_sizes), _int_list(a.threads)
    except ValueError as e:
        raise SystemExit(f"edgesplit profile latency: {e}") from None
    result: dict[str, Any] = {"batch_sizes": batch_sizes, "threads": threads, "runs": a.runs}
    if a.bundle:
        result.update(profile_bundle(a.bundle, batch_sizes, threads, a.runs, a.data))
    if a.model:
        from ..builder.data import MEAN, STD
        from ..builder.zoo import INPUT_SIZE, create_model, load_pretrained

        classes = a.num_classes or (10 if a.model.endswith("_cifar") else 1000)
        model = load_pretrained(a.model, a.checkpoint, classes) if a.checkpoint else create_model(a.model, classes)
        side = INPUT_SIZE.get(a.model, 224)
        spec = {"shape": [3, side, side], "resize": side, "mean": list(MEAN), "std": list(STD)}
        source = a.data or ("cifar10:test" if side == 32 else "imagenette:val")
        result["torch"] = {
            "model": a.model,
            "checkpoint": a.checkpoint,
            "source": source,
            **profile_torch_model(model, real_frames(spec, source, max(batch_sizes)), batch_sizes, threads, a.runs),
        }
    if a.plot:
        try:
            from .latency_plot import plot

            plot(result, a.plot)
            result["plot"] = str(a.plot)
        except ImportError:
            result["plot"] = None
            print(
                "edgesplit profile latency: matplotlib is not installed, no plot written "
                "(pip install 'edgesplit[profile]')",
                file=sys.stderr,
            )
    return result


def summarize(result: dict[str, Any]) -> str:
    lines = []
    for role, prof in result.get("per_node", {}).items():
        lines.append(
            f"{role} ({prof['file']}, batch {prof['batch_size']}, {prof['threads']} thr): run() {prof['session_us']:.0f} µs, "
            f"kernels {prof['nodes_sum_us']:.0f} µs ({prof['kernel_share']:.0%})"
        )
        for n in prof["nodes"][:5]:
            lines.append(f"    {n['median_us']:>9.0f} µs  {n['op']:<18} {n['name']}")
    dists = dict(result.get("distributions", {}))
    if "torch" in result:
        dists[f"torch {result['torch']['model']}"] = result["torch"]["distributions"]
    for role, rows in dists.items():
        for r in rows:
            lines.append(
                f"{role:<8} batch {r['batch_size']:>4} threads {r['threads']:>2}: p50 {r['p50_ms']:8.3f} ms  "
                f"p95 {r['p95_ms']:8.3f}  p99 {r['p99_ms']:8.3f}  mean {r['mean_ms']:8.3f}  {r['frames_per_s']:9.1f} frames/s"
            )
    if result.get("plot"):
        lines.append(f"plot: {result['plot']}")
    return "\n".join(lines)
