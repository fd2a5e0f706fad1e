"""``edgesplit bench rate-bound``: could a hyperprior pay for its side bytes on an ans bundle?

A hyperprior (Ballé et al. 2018) sends a little side information per frame so that the coder can
use a density fitted to *that* frame instead of the one factorized density every frame shares.
Whether that pays depends on how much frames differ from each other at the bottleneck, which can
be measured without training one. This scenario codes real frames' symbols (the ans mode's own
quantization of the exported head's output) under the bundle's shipped tables and under three
per-frame oracles that a hyperprior could at best approach, each given its side information free:

- ``empirical``: each channel of each frame coded with that channel's own histogram in that frame
  (the shortest code any per-frame, per-channel model can give; no real side channel is this cheap);
- ``laplace_channel``: a discretized Laplace per channel per frame (median, mean absolute deviation);
- ``laplace_quadrant``: the same per channel and per spatial quadrant (4x the scales: a coarse
  spatially varying scale, what a hyperprior's ``z`` buys).

It then charges the scales a hyperprior would have to send at ``--side-bits`` each (default 4: a
16-level log-scale code, cheaper than any learned ``z`` we could code) and reports the net saving.
Negative: no hyperprior of that form can pay at these sizes; positive: the most one could save.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def add_arguments(p) -> None:
    p.add_argument("--bundle", required=True, help="a bundle with ans modes (e.g. models/cifar10-resnet20-entropy)")
    p.add_argument("--data", required=True, help="frames: dataset:split (e.g. cifar10:test), shard glob or folder")
    p.add_argument("--mode", type=int, default=None, help="the ans mode id (default: the bundle's default mode)")
    p.add_argument("--frames", type=int, default=1000, help="frames to code")
    p.add_argument("--side-bits", type=float, default=4.0, help="bits charged per side-information scale")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads for the head")


def _laplace_bits(v: np.ndarray) -> float:
    """Bits of integer symbols ``v`` under a discretized Laplace fitted to ``v`` (ML: median, MAD)."""
    mu = float(np.median(v))
    b = max(float(np.mean(np.abs(v - mu))), 0.05)

    def cdf(t: np.ndarray) -> np.ndarray:
        return np.where(t < mu, 0.5 * np.exp((t - mu) / b), 1.0 - 0.5 * np.exp(-(t - mu) / b))

    p = cdf(v + 0.5) - cdf(v - 0.5)
    return float(-np.log2(np.maximum(p, 1e-12)).sum())


def _empirical_bits(v: np.ndarray) -> float:
    _, counts = np.unique(v, return_counts=True)
    return float(-(counts * np.log2(counts / counts.sum())).sum())


def frame_bits(k: np.ndarray, offsets: tuple[int, ...], freqs: tuple[np.ndarray, ...]) -> dict[str, float]:
    """One frame's symbols ``k`` ([C, H, W] integers) under the shipped tables and each oracle."""
    C, H, W = k.shape
    shipped = 0.0
    for c in range(C):
        p = freqs[c].astype(np.float64) / float(freqs[c].sum())
        shipped += float(-np.log2(np.maximum(p[k[c].ravel() - offsets[c]], 1e-12)).sum())
    h, w = max(1, H // 2), max(1, W // 2)
    quads = [k[c, i : i + h, j : j + w].ravel() for c in range(C) for i in range(0, H, h) for j in range(0, W, w)]
    return {
        "shipped": shipped,
        "empirical": sum(_empirical_bits(k[c].ravel()) for c in range(C)),
        "laplace_channel": sum(_laplace_bits(k[c].ravel().astype(np.float64)) for c in range(C)),
        "laplace_quadrant": sum(_laplace_bits(q.astype(np.float64)) for q in quads),
        "quadrants": float(len(quads)),
    }


def run(a) -> dict[str, Any]:
    from ..bundle import Bundle
    from ..data.sources import open_source, take
    from ..data.transforms import preprocess
    from ..engine import create_engine
    from ..wire.ans_codec import quantize_values

    bundle = Bundle.load(a.bundle)
    mode = bundle.mode(a.mode) if a.mode is not None else bundle.default_mode
    if not mode.entropy_coded:
        ans = [m.id for m in bundle.modes if m.entropy_coded]
        raise SystemExit(f"rate-bound: mode {mode.id} of {bundle.name} is not an ans mode (ans modes: {ans or 'none'})")
    tables = bundle.tables_for(mode)
    head = create_engine(bundle.file(mode.head), "ort", threads=a.threads)
    samples = list(take(open_source(a.data, bundle.classes), a.frames))
    per: dict[str, list[float]] = {}
    shape: tuple[int, ...] = ()
    for i in range(0, len(samples), 64):
        x = np.stack([preprocess(s.data, bundle.input_spec) for s in samples[i : i + 64]])
        for z in head.run1(x):
            k = quantize_values(z[: mode.channels], tables, mode.scale).astype(np.int64)
            shape = k.shape
            for key, bits in frame_bits(k, tables.offsets, tables.freqs).items():
                per.setdefault(key, []).append(bits)
    C = int(mode.channels)
    mean_bytes = {key: float(np.mean(v)) / 8 for key, v in per.items() if key != "quadrants"}
    scales = {"empirical": None, "laplace_channel": C, "laplace_quadrant": int(per["quadrants"][0])}
    oracles = {}
    for name, n in scales.items():
        gain = mean_bytes["shipped"] - mean_bytes[name]
        side = None if n is None else n * a.side_bits / 8
        oracles[name] = {
            "bytes_mean": mean_bytes[name],
            "gain_before_side_bytes": gain,
            "side_scales": n,
            "side_bytes": side,
            "net_saving_bytes": None if side is None else gain - side,
        }
    best = max(o["net_saving_bytes"] for o in oracles.values() if o["net_saving_bytes"] is not None)
    return {
        "bundle": bundle.name,
        "mode": mode.name,
        "step": mode.scale,
        "frames": len(per["shipped"]),
        "symbols_per_frame": int(np.prod(shape)),
        "side_bits_per_scale": a.side_bits,
        "shipped_tables_bytes_mean": mean_bytes["shipped"],
        "oracles": oracles,
        "best_net_saving_bytes": best,
        "best_net_saving_percent": 100.0 * best / mean_bytes["shipped"],
        "verdict": (
            "a hyperprior cannot pay here"
            if best <= 0
            else f"at most {best:.1f} B ({100.0 * best / mean_bytes['shipped']:.1f} %) a frame: an upper bound, "
            "a trained hyperprior saves less"
        ),
    }
