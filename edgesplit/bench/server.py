"""``edgesplit bench server``: the daemon's frames/s and latency at 1..32 agents, with and without
batching, next to the tail engine's own frames/s at the batch sizes the daemon formed.

Design, and why: the server runs as its own process (``edgesplit serve``), as deployed. The
agents are one client process driving N DEALER sockets from one thread
(:class:`~edgesplit.bench.loadgen.LoadClient`): N sessions, each closed-loop with ``--window``
requests outstanding, sending precomputed wire tensors of real images (the head ran once,
before the clock starts). The default window is 2, as an agent that sends the next frame while
the last one's answer travels: with one request per agent, the whole batch waits for the slowest
round trip before the next batch can form and the tail idles meanwhile (docs/BENCHMARKS.md,
"Figures behind design choices"), which is the client's cadence, not the daemon's overhead. N agent processes running heads would, on a 2-core box, measure the
heads and the scheduler; the one-thread client spends a few tens of microseconds per frame, so
the server is what limits the figure. Every answer is checked (one per request, logits equal
to the local tail's), so a fast wrong server cannot score.

Two servers are measured one after the other: **batched** (``--max-batch``, default 32, with
``--max-queue-delay-us`` of queueing allowed) and **unbatched** (``--max-batch 1``). The same
engine (backend, device, precision, threads) is loaded in this process and timed alone with
:func:`~edgesplit.bench.engine.measure_engine` at the median batch the point's warm-up formed
(batch 1 unbatched), while the server sits idle, in ``--pairs`` turns with the daemon: on a
shared machine the load from other work comes and goes within a minute, so each daemon stretch
is divided by the engine figure taken right after it, and ``efficiency`` is the median of
those ratios. At the end the engine is also timed at every size seen plus 1 and max batch
(``engine``). ``--bare-torch`` adds the
exported program called directly on device tensors
(:func:`~edgesplit.bench.engine.measure_bare_torch`), the GPU comparison. ``verdict`` judges the
run on the CPU target (:func:`~edgesplit.bench.verdicts.server_verdict`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..bundle import Bundle
from .verdicts import server_verdict


def bench_server(
    bundle_path: Path,
    agent_counts: list[int],
    *,
    backend: str = "ort",
    device: str | None = None,
    precision: str = "fp32",
    accel: str = "none",
    threads: int | None = 2,
    seconds: float = 5.0,
    warmup_s: float = 2.0,
    window: int = 2,
    max_batch: int = 32,
    queue_delay_us: float = 2000.0,
    images: int = 64,
    engine_seconds: float = 2.0,
    bare_torch: bool = False,
    tolerance: float = 1e-3,
    pairs: int = 3,
) -> dict:
    from ..engine import EngineOptions, create_engine
    from .engine import measure_bare_torch, measure_engine
    from .loadgen import LoadClient, LoadStats, head_workload
    from .serverproc import ServerProcess, daemon_args

    bundle = Bundle.load(bundle_path)
    workload = head_workload(bundle, images)
    graph = bundle.file("tail_torch") if backend == "torch" else bundle.file("tail")
    opts = EngineOptions(device=device, precision=precision, accel=accel, max_batch=max_batch, threads=threads)
    engine = create_engine(graph, backend, opts)
    frame = tuple(int(s) for s in bundle.wire_spec["shape"])
    most = max(agent_counts) * window
    configs = {"batched": (max_batch, queue_delay_us), "unbatched": (1, 0.0)}
    points: dict[str, list[dict]] = {}
    exit_codes = {}
    for name, (mb, delay) in configs.items():
        server = ServerProcess(
            [str(bundle_path)],
            daemon_args(
                backend=backend,
                precision=precision,
                accel=accel,
                device=device,
                threads=threads,
                max_batch=mb,
                queue_delay_us=delay,
                credits=max(64, window),
                max_queue=max(1024, 2 * most),
            ),
        ).start()
        rows = []
        try:
            for n in agent_counts:
                st, ratios, alone = LoadStats(), [], []
                with LoadClient(server.endpoint, bundle, n, workload, tolerance=tolerance, name=f"bench-{n}") as client:
                    b = client.closed_loop(warmup_s, window=window).summary()["batch_size_p50"] or 1
                    for _ in range(pairs):  # daemon, then the engine alone, in turns
                        part = client.closed_loop(seconds / pairs, window=window)
                        st.merge(part)
                        e = measure_engine(engine, frame, [b], engine_seconds / pairs)[0]["frames_per_s"]
                        alone.append(e)
                        ratios.append(part.results_in_window / part.window_s / e)
                rows.append(
                    {
                        **st.row(n),
                        "engine_batch": b,
                        "engine_frames_per_s_at_batch": round(float(np.median(alone)), 1),
                        "efficiency": round(float(np.median(ratios)), 3),
                        "efficiency_per_turn": [round(x, 3) for x in ratios],
                    }
                )
        finally:
            exit_codes[name] = server.stop()
        points[name] = rows

    # The engine alone at every batch size seen, with the servers gone.
    sizes = sorted({1, max_batch, *(r["batch_size_p50"] for r in points["batched"] if r["batch_size_p50"])})
    engine_rows = measure_engine(engine, frame, sizes, engine_seconds)
    engine.close()
    engine_fps = {r["batch"]: r["frames_per_s"] for r in engine_rows}
    best = max(engine_fps.values())
    for rows in points.values():
        for r in rows:
            r["efficiency_vs_engine_best"] = round(r["frames_per_s"] / best, 3) if r["frames_per_s"] else None
    res = {
        "bench": "server",
        "bundle": bundle.name,
        "backend": backend,
        "device": device or str(getattr(engine, "device", "cpu")),
        "precision": precision,
        "accel": accel,
        "threads": threads,
        "window": window,
        "seconds_per_point": seconds,
        "max_batch": max_batch,
        "max_queue_delay_us": queue_delay_us,
        "batched": points["batched"],
        "unbatched": points["unbatched"],
        "engine": engine_rows,
        "engine_best_frames_per_s": round(best, 1),
        "server_exit_codes": exit_codes,
    }
    top = max(agent_counts)
    tb = next(r for r in points["batched"] if r["agents"] == top)
    tu = next(r for r in points["unbatched"] if r["agents"] == top)
    res["at_max_agents"] = {
        "agents": top,
        "batched_frames_per_s": tb["frames_per_s"],
        "unbatched_frames_per_s": tu["frames_per_s"],
        "batched_over_unbatched": round(tb["frames_per_s"] / tu["frames_per_s"], 3) if tu["frames_per_s"] else None,
        "efficiency": tb["efficiency"],
        "batch_size_p50": tb["batch_size_p50"],
    }
    if bare_torch:
        if not bundle.has("tail_torch"):
            raise SystemExit(
                f"--bare-torch needs the bundle's tail_torch file; '{bundle.name}' has none "
                "(edgesplit export STUDENT --out DIR --torch-tail)"
            )
        res["bare_torch"] = measure_bare_torch(
            bundle.file("tail_torch"), frame, sizes, res["device"], precision, engine_seconds
        )
        bare = {r["batch"]: r["frames_per_s"] for r in res["bare_torch"]}
        res["engine_over_bare_torch"] = {b: round(engine_fps[b] / bare[b], 3) for b in sizes}
        res["daemon_over_bare_torch_at_max_agents"] = round(tb["frames_per_s"] / bare[tb["batch_size_p50"] or 1], 3)
    res["verdict"] = server_verdict(res)
    return res


def _int_list(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"expected comma-separated integers, got '{text}'") from None
    if not out or min(out) < 1:
        raise SystemExit(f"expected integers >= 1, got '{text}'")
    return out


def add_arguments(p) -> None:
    from ..engine import ACCELERATIONS, BACKENDS, PRECISIONS

    p.add_argument(
        "--bundle",
        default=None,
        help="bundle (default: the shipped Imagenette ResNet-18 bundle, the issue's "
        "reference tail; the torch backend needs a tail_torch file)",
    )
    p.add_argument("--agents", default="1,4,16,32", help="comma-separated agent (session) counts")
    p.add_argument("--backend", default="ort", choices=BACKENDS)
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the backend's own choice)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS)
    p.add_argument("--accel", default="none", choices=ACCELERATIONS, help="torch only: torch.compile or CUDA graphs")
    p.add_argument("--threads", type=int, default=2, help="tail engine intra-op CPU threads (server and engine alone)")
    p.add_argument("--seconds", type=float, default=5.0, help="measured seconds per point (after --warmup-s)")
    p.add_argument("--warmup-s", type=float, default=2.0)
    p.add_argument("--window", type=int, default=2, help="requests each agent keeps outstanding")
    p.add_argument("--max-batch", type=int, default=32, help="the batched server's max batch")
    p.add_argument("--max-queue-delay-us", type=float, default=2000.0, help="the batched server's queue delay")
    p.add_argument("--images", type=int, default=64, help="distinct real frames cycled through")
    p.add_argument(
        "--engine-seconds",
        type=float,
        default=2.0,
        help="engine-alone seconds per point (split over the turns) and per batch size in the final table",
    )
    p.add_argument("--bare-torch", action="store_true", help="also time the bare torch program at the same batch sizes")
    p.add_argument("--pairs", type=int, default=3, help="turns of daemon and engine-alone timing per point")
    p.add_argument(
        "--tolerance",
        type=float,
        default=1e-3,
        help="largest logit difference (relative to the largest logit) still counted as a correct result",
    )


def run(a) -> dict:
    from ..loopback import MODELS_DIR

    return bench_server(
        Path(a.bundle or MODELS_DIR / "imagenette-resnet18-bottlefit"),
        _int_list(a.agents),
        backend=a.backend,
        device=a.device,
        precision=a.precision,
        accel=a.accel,
        threads=a.threads,
        seconds=a.seconds,
        warmup_s=a.warmup_s,
        window=a.window,
        max_batch=a.max_batch,
        queue_delay_us=a.max_queue_delay_us,
        images=a.images,
        engine_seconds=a.engine_seconds,
        bare_torch=a.bare_torch,
        tolerance=a.tolerance,
        pairs=a.pairs,
    )
