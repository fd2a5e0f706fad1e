"""``edgesplit eval``: a bundle's accuracy and bytes per frame, measured the way the runtime runs it
(ONNX Runtime head -> wire codec -> ONNX Runtime tail), against the "send the JPEG instead"
baseline: the reference model (full.onnx) on the input re-encoded over a grid of sizes and qualities.

Every mode's bytes are those of the real frames it sends: uniform modes' packed codes (and zstd),
entropy-coded (``"ans"``) modes' variable-length frames, whose mean, 95th percentile and bits per
frame are reported with the mode's quantization step (several steps of one learned model are
several ans modes); each mode sits next to the best JPEG at its bytes. A U-shaped bundle's token
modes (head -> body on the server -> tail) are measured by :mod:`.evaluate_ushaped`, with the bytes
each way; there the JPEG stands against the bytes up.

No torch: this runs wherever the agent runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Iterable

import numpy as np

from ..bundle import Bundle
from ..data.sources import Sample, open_source, take
from ..data.transforms import preprocess, reencode_jpeg
from ..engine import Engine, create_engine
from ..wire import codec
from ..wire.mode_codec import decode_any, encode_mode
from .evaluate_ushaped import ROLES as U_SHAPED_ROLES
from .evaluate_ushaped import U_SHAPED, describe_mode, u_shaped_accuracy

# Default re-encoding grids: sides (px) and JPEG qualities. Sides above the input are pointless.
SIDES = (16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224)
QUALITIES = (5, 10, 20, 30, 50, 75, 90)


def _batches(items: list, n: int) -> Iterable[list]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def classify(engine: Engine, images: list[bytes], input_spec: dict, batch: int = 64) -> np.ndarray:
    preds = []
    for chunk in _batches(images, batch):
        x = np.stack([preprocess(b, input_spec) for b in chunk])
        preds.append(engine.run1(x).argmax(1))
    return np.concatenate(preds) if preds else np.zeros(0, np.int64)


def split_accuracy(
    bundle: Bundle, heads: dict[str, Engine], tail: Engine, samples: list[Sample], batch: int = 64
) -> dict:
    """Per-mode accuracy and encoded bytes, through the real codec (raw and zstd; an ans mode's own
    coder and tables): each mode's head (``heads`` by file role), its quantization, the server's
    zero-fill of channels not sent, the tail."""
    per_mode = {m.id: {"correct": 0, "raw": [], "zstd": []} for m in bundle.modes}
    C = int(bundle.wire_spec["shape"][0])
    for chunk in _batches(samples, batch):
        x = np.stack([preprocess(s.data, bundle.input_spec) for s in chunk])
        y = np.asarray([s.label for s in chunk])
        zs = {role: heads[role].run1(x) for role in bundle.head_roles}
        for m in bundle.modes:
            z = zs[m.head]
            zhat = np.empty((len(z), C, *z.shape[2:]), np.float32)
            tables = bundle.tables_for(m) if m.entropy_coded else None
            for i in range(len(z)):  # frame by frame: the wire carries one frame per request
                desc, payload = encode_mode(z[i], m, tables=tables, codec="raw")
                per_mode[m.id]["raw"].append(len(payload))
                if tables is None and codec.zstd_available():
                    per_mode[m.id]["zstd"].append(len(codec.encode(z[i], m, codec="zstd")[1]))
                zhat[i] = decode_any(desc, payload, tables=tables, full_channels=C)
            per_mode[m.id]["correct"] += int((tail.run1(zhat).argmax(1) == y).sum())
    out = []
    for m in bundle.modes:
        r = per_mode[m.id]
        sizes = np.asarray(r["raw"], dtype=np.float64)
        out.append(
            {
                "id": m.id,
                "name": m.name,
                "codec": m.codec,
                "channels": m.channels,
                "bits": m.bits,
                "step": m.scale if m.entropy_coded else None,  # an ans mode's quantization step (§4.4 scale)
                "accuracy": r["correct"] / max(1, len(samples)),
                # uniform: every frame the same; ans: the mean, as the manifest's bytes_per_frame
                "bytes_per_frame": float(sizes.mean() if m.entropy_coded else np.median(sizes)),
                "bytes_p95": float(np.percentile(sizes, 95)),
                "bits_per_frame": float(8 * sizes.mean()),
                "bytes_per_frame_zstd": float(np.median(r["zstd"])) if r["zstd"] else None,
            }
        )
    return {"modes": out}


def jpeg_baseline(
    full: Engine, samples: list[Sample], input_spec: dict, sides=SIDES, qualities=QUALITIES
) -> list[dict]:
    labels = np.asarray([s.label for s in samples])
    side_in = int(input_spec["shape"][-1])
    grid = []
    for side in (s for s in sides if s <= max(side_in, 32)):
        for q in qualities:
            enc = [reencode_jpeg(s.data, side, q) for s in samples]
            acc = float(np.mean(classify(full, enc, input_spec) == labels))
            grid.append(
                {"side": side, "quality": q, "bytes_median": float(np.median([len(b) for b in enc])), "accuracy": acc}
            )
    return grid


def best_at_bytes(grid: list[dict], budget: float) -> dict | None:
    fits = [g for g in grid if g["bytes_median"] <= budget]
    return max(fits, key=lambda g: g["accuracy"]) if fits else None


def evaluate_bundle(
    bundle: Bundle,
    source: str,
    frames: int | None,
    jpeg_frames: int | None,
    threads: int | None = None,
    jpeg_grid: bool = True,
) -> dict:
    samples = [s for s in take(open_source(source, bundle.classes), frames) if s.label is not None]
    if not samples:
        raise SystemExit(f"edgesplit eval: no labelled frames in {source!r}")
    full = create_engine(bundle.file("full"), "ort", threads=threads)
    if bundle.serving == U_SHAPED:
        engines = {role: create_engine(bundle.file(role), "ort", threads=threads) for role in U_SHAPED_ROLES}
        split = u_shaped_accuracy(bundle, engines, samples)
    else:
        heads = {role: create_engine(bundle.file(role), "ort", threads=threads) for role in bundle.head_roles}
        tail = create_engine(bundle.file("tail"), "ort", threads=threads)
        split = split_accuracy(bundle, heads, tail, samples)
    default = next(m for m in split["modes"] if m["id"] == bundle.default_mode.id)
    labels = np.asarray([s.label for s in samples])
    teacher_acc = float(np.mean(classify(full, [s.data for s in samples], bundle.input_spec) == labels))
    result = {
        "bundle": bundle.name,
        "bundle_hash": bundle.hash,
        "serving": bundle.serving,
        "source": source,
        "frames": len(samples),
        "mode": default["name"],
        "accuracy": default["accuracy"],
        "teacher_accuracy": teacher_acc,
        "bytes_per_frame": default["bytes_per_frame"],
        "bytes_per_frame_zstd": default["bytes_per_frame_zstd"],
        "input_jpeg_bytes_median": float(np.median([len(s.data) for s in samples])),
        "modes": split["modes"],
    }
    if "bytes_down_per_frame" in default:  # U-shaped: the body's output comes back to the device
        result["bytes_down_per_frame"] = default["bytes_down_per_frame"]
    if jpeg_grid:
        jsamples = samples[:jpeg_frames] if jpeg_frames else samples
        grid = jpeg_baseline(full, jsamples, bundle.input_spec)
        best = best_at_bytes(grid, default["bytes_per_frame"])
        for m in result["modes"]:  # every mode next to the best JPEG at its bytes
            at = best_at_bytes(grid, m["bytes_per_frame"])
            m["jpeg_accuracy_at_bytes"] = None if at is None else at["accuracy"]
        result.update(
            {
                "jpeg_frames": len(jsamples),
                "jpeg_baseline": grid,
                "jpeg_accuracy_at_bytes": None if best is None else best["accuracy"],
                "jpeg_best_at_bytes": best,
                "jpeg_min_bytes": min(g["bytes_median"] for g in grid),
            }
        )
    return result


def eval_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="edgesplit eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True, help="bundle directory or tar")
    p.add_argument(
        "--data", required=True, help="labelled frames: dataset:split (e.g. cifar10:test), shard glob or folder"
    )
    p.add_argument("--frames", type=int, default=None, help="evaluate the first N frames (default all)")
    p.add_argument(
        "--jpeg-frames",
        type=int,
        default=2000,
        help="frames for the JPEG re-encoding grid (it runs the reference model once per grid point); 0 = all",
    )
    p.add_argument("--no-jpeg", action="store_true", help="skip the JPEG baseline")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    a = p.parse_args(argv)
    b = Bundle.load(a.bundle)
    res = evaluate_bundle(b, a.data, a.frames, a.jpeg_frames or None, a.threads, not a.no_jpeg)
    if a.json:
        json.dump(res, sys.stdout, indent=2)
        print()
        return 0
    print(f"{b.name} on {res['frames']} frames of {a.data}")
    print(f"  reference model (full.onnx): {res['teacher_accuracy']:.4f}")
    for m in res["modes"]:
        j = m.get("jpeg_accuracy_at_bytes", "-")
        j = f"  JPEG at its bytes {j:.4f}" if isinstance(j, float) else ("  no JPEG fits" if j is None else "")
        if "bytes_down_per_frame" in m:
            print(describe_mode(m) + j)
            continue
        z = f", zstd {m['bytes_per_frame_zstd']:.0f}" if m["bytes_per_frame_zstd"] else ""
        if m["codec"] == "ans":
            z = f" (mean; p95 {m['bytes_p95']:.0f}, {m['bits_per_frame']:.0f} bits/frame, codec ans, step {m['step']:g})"
        print(f"  mode {m['name']:<8} accuracy {m['accuracy']:.4f}  bytes/frame {m['bytes_per_frame']:.0f}{z}{j}")
    print(f"  input JPEG median {res['input_jpeg_bytes_median']:.0f} B")
    if "jpeg_baseline" in res:
        best = res["jpeg_best_at_bytes"]
        at = (
            "none fits"
            if best is None
            else f"{best['accuracy']:.4f} ({best['side']}px q{best['quality']}, {best['bytes_median']:.0f} B)"
        )
        print(
            f"  send-the-JPEG at <= {res['bytes_per_frame']:.0f} B: {at}; smallest JPEG {res['jpeg_min_bytes']:.0f} B"
        )
    return 0
