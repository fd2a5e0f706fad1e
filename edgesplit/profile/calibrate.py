"""``edgesplit profile calibrate``: measure this machine and write its device profile (kind ``host``).

Every figure is measured here and sourced ``"measured: edgesplit profile calibrate DATE, METHOD"``:
cores, fp32 GFLOPS (numpy sgemm at a few sizes, the median of each size's best run), memory size,
memory bandwidth (numpy copy of a large array, read + write bytes), and the ONNX Runtime latency
of a reference model (the shipped CIFAR-10 bundle's ``full.onnx``, 1 thread, batch 1). Power figures
are written only when this machine has a power sensor (idle, and under the sgemm load); without
one they are left out, never invented. The CPU model goes into the description.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from .devices import ProfileError, parse_profile, profiles_dir

REFERENCE_BUNDLE = profiles_dir().parent / "models" / "cifar10-resnet20-bottlefit"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model", "Hardware")) and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sgemm_gflops(sizes: tuple[int, ...] = (256, 512, 1024), repeats: int = 3) -> float:
    """Median over sizes of the best-of-``repeats`` fp32 matmul rate (2 n^3 FLOP per product)."""
    rng = np.random.default_rng(0)
    rates = []
    for n in sizes:
        a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
        a @ b  # warm-up: BLAS thread pool and page faults
        best = min(_timed(lambda a=a, b=b: a @ b) for _ in range(repeats))
        rates.append(2 * n**3 / best / 1e9)
    return statistics.median(rates)


def copy_bandwidth_gbps(mib: int = 256, repeats: int = 3) -> float:
    """Best-of-``repeats`` rate of copying a ``mib`` MiB array, counting the bytes read and written."""
    src = np.ones(mib * 2**20 // 8, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # first touch of dst's pages happens here, not in the timed runs
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeats))
    return 2 * src.nbytes / best / 1e9


def ort_reference_ms(bundle_dir: Path = REFERENCE_BUNDLE, runs: int = 200) -> tuple[float, str]:
    """Median latency (ms) of the reference bundle's full model, 1 thread, batch 1; and its sha256."""
    from ..bundle import Bundle
    from ..engine import create_engine

    bundle = Bundle.load(bundle_dir)
    engine = create_engine(bundle.file("full"), backend="ort", threads=1)
    x = np.random.default_rng(0).standard_normal((1, *bundle.input_spec["shape"]), dtype=np.float32)
    for _ in range(10):
        engine.run1(x)
    times = [_timed(lambda: engine.run1(x)) for _ in range(runs)]
    return statistics.median(times) * 1e3, bundle.manifest["files"]["full"]["sha256"]


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _power_figures(sampler: str, note, seconds: float, sizes: tuple[int, ...]) -> dict[str, Any]:
    """Idle watts, and watts while sgemm keeps every core busy, from this machine's sensor."""
    from .power.measure import resolve_sampler
    from .power.sampling import SamplingProcess

    name, options, _ = resolve_sampler(sampler, None)
    with SamplingProcess(name, hz=20, **options) as proc:
        i0 = time.monotonic()
        time.sleep(seconds)
        i1 = time.monotonic()
        while time.monotonic() - i1 < seconds:
            sgemm_gflops(sizes, repeats=1)
        a1 = time.monotonic()
        time.sleep(0.2)
    s = proc.series
    return {
        "power_idle_w": {
            "value": round(s.mean_w(i0, i1), 2),
            "source": note(f"{name} sampler, mean over {seconds:g} s idle"),
        },
        "power_active_w": {
            "value": round(s.mean_w(i1, a1), 2),
            "source": note(f"{name} sampler, mean over {seconds:g} s of sgemm on all cores"),
        },
    }


def calibrate(
    name: str,
    *,
    sizes: tuple[int, ...] = (256, 512, 1024),
    bandwidth_mib: int = 256,
    ort_runs: int = 200,
    power_seconds: float = 3.0,
    reference: Path = REFERENCE_BUNDLE,
    root: str = "/",
) -> dict[str, Any]:
    """Measure this machine; returns the profile as data (validated by ``parse_profile``)."""
    from .power.samplers import detect_sampler

    today = dt.date.today().isoformat()

    def note(method: str) -> str:
        return f"measured: edgesplit profile calibrate {today}, {method}"

    import psutil

    cores = os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or cores
    mem_gb = psutil.virtual_memory().total / 2**30
    ort_ms, ort_sha = ort_reference_ms(reference, ort_runs)
    figures: dict[str, Any] = {
        "cpu_cores": {"value": cores, "source": note("os.cpu_count (logical CPUs)")},
        "cpu_physical_cores": {"value": physical, "source": note("psutil.cpu_count(logical=False)")},
        "cpu_fp32_gflops": {
            "value": round(sgemm_gflops(sizes), 1),
            "source": note(
                f"numpy sgemm n={'/'.join(map(str, sizes))}, best of 3, median over sizes; "
                f"BLAS threads per OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
            ),
        },
        "memory_gb": {"value": round(mem_gb, 1), "source": note("psutil.virtual_memory().total, GiB")},
        "memory_bandwidth_gbps": {
            "value": round(copy_bandwidth_gbps(bandwidth_mib), 1),
            "source": note(f"numpy copy of {bandwidth_mib} MiB, read + write bytes, best of 3"),
        },
        "ort_reference_ms": {
            "value": round(ort_ms, 4),
            "source": note(
                f"ONNX Runtime, {reference.name}/full.onnx (sha256 {ort_sha[:12]}), "
                f"1 thread, batch 1, median of {ort_runs}"
            ),
        },
    }
    sampler, _ = detect_sampler(root)
    if sampler is not None:
        figures.update(_power_figures(sampler, note, power_seconds, sizes))
    profile = {
        "schema": 1,
        "name": name,
        "kind": "host",
        "description": f"{cpu_model()}, {cores} CPUs, {mem_gb:.0f} GiB ({platform.system()} {platform.machine()}); "
        f"measured by edgesplit profile calibrate",
        "samplers": [sampler] if sampler else [],
        "figures": figures,
    }
    parse_profile(profile)  # what we write must load
    return profile


def profile_yaml(profile: dict[str, Any]) -> str:
    """The profile in the hand-written layout of device_profiles/ (one figure per line)."""
    q = json.dumps  # a JSON string is a valid YAML scalar, quoted the same way
    lines = [
        f"# {profile['name']}: this machine, measured by `edgesplit profile calibrate`. Rerun it to refresh.",
        "schema: 1",
        f"name: {profile['name']}",
        f"kind: {profile['kind']}",
        f"description: {q(profile['description'])}",
        f"samplers: [{', '.join(profile['samplers'])}]",
        "figures:",
    ]
    lines += [f"  {k}: {{value: {f['value']}, source: {q(f['source'])}}}" for k, f in profile["figures"].items()]
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="where to write the profile (device_profiles/NAME.yaml)")
    p.add_argument("--name", default=None, help="profile name (default: the file name's stem)")
    p.add_argument("--sizes", default="256,512,1024", help="sgemm matrix sizes, comma-separated")
    p.add_argument("--bandwidth-mib", type=int, default=256, help="array size for the copy bandwidth")
    p.add_argument("--ort-runs", type=int, default=200, help="timed runs of the reference model")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")


def run(a: argparse.Namespace) -> dict[str, Any]:
    """``edgesplit profile calibrate``: writes the profile; returns it (and where it went)."""
    out = Path(a.out)
    if out.exists() and not a.force:
        raise SystemExit(f"edgesplit profile calibrate: {out} exists (--force to overwrite)")
    try:
        sizes = tuple(int(s) for s in a.sizes.split(","))
        profile = calibrate(a.name or out.stem, sizes=sizes, bandwidth_mib=a.bandwidth_mib, ort_runs=a.ort_runs)
    except (ValueError, ProfileError) as e:
        raise SystemExit(f"edgesplit profile calibrate: {e}") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(profile_yaml(profile))
    return {"written": str(out), "profile": profile}


def summarize(res: dict[str, Any]) -> str:
    return profile_yaml(res["profile"]) + f"written: {res['written']}"
