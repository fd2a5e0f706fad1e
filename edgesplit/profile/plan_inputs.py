"""The split planner's inputs, measured on this machine (``edgesplit plan``, ``bench plan``).

The cost model itself is :mod:`edgesplit.control.planner` (pure). This module measures what it
needs, on real frames of the dataset the model predicts:

- every ONNX graph involved (heads, tails, full model) timed with ONNX Runtime at 1 intra-op
  thread, batch 1 (median of ``runs`` after warm-up), and its FLOPs and memory bytes counted node by
  node from the graph (shapes by ONNX shape inference at batch 1), for scaling to other devices;
- the codec (quantize + pack on the device, unpack + dequantize on the server) per mode, on the real
  head output; JPEG decode + resize + normalise (``preprocess``) per frame;
- the request and reply sizes from the wire protocol's own builders (a compact v1.1 request).

The options: a bundle's modes (plus ``local`` = full.onnx on the device and ``raw`` = send the
frame's JPEG and run everything on the server), or a zoo model's cut points (each exported once
into a cache as a one-mode 8-bit bundle by :mod:`edgesplit.builder.split_bundles`, plus ``local``
and ``raw``). It lives in the profiling plane, not next to the planner: it needs ONNX Runtime, the
codec and (for a zoo model) torch, and the control plane stays numpy-only.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..control.planner import Link, Machine, Option, PlanError, Scenario, Work

HOST_PROFILE = "x86-ci-host"
# The runtime's own cost per request on this host (agent + server software path beyond the model
# halves and the wire): `edgesplit bench e2e` on loopback, docs/BENCHMARKS.md "End to end".
OVERHEAD_MS = 0.5


# -- graphs ------------------------------------------------------------------------------------
def onnx_nodes(path: str | Path) -> tuple[tuple[float, float], ...]:
    """Per node of an ONNX graph at batch 1: ``(flops, bytes)``. Convolutions and matrix products
    count 2 FLOPs per multiply-add, other nodes one per output element; bytes are every input and
    output at 4 bytes an element (weights included: ONNX Runtime holds them as float32). Nodes that
    only transform constants (the fp16 -> fp32 casts of stored weights) are folded away at load time
    and not counted."""
    import onnx
    from onnx import shape_inference

    model = onnx.load(str(path))
    for vi in model.graph.input:
        dims = vi.type.tensor_type.shape.dim
        if dims and not dims[0].dim_value:
            dims[0].dim_value = 1
    g = shape_inference.infer_shapes(model, data_prop=True).graph
    shapes: dict[str, list[int]] = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        shapes[vi.name] = [d.dim_value for d in vi.type.tensor_type.shape.dim]
    for init in g.initializer:
        shapes[init.name] = list(init.dims)
    const = {i.name for i in g.initializer}
    out = []
    for n in g.node:
        if n.op_type == "Constant" or (n.input and all(i in const or not i for i in n.input)):
            const.update(n.output)
            continue
        numel = lambda name: math.prod(shapes.get(name) or [0])  # noqa: E731
        out_numel = sum(numel(o) for o in n.output)
        if n.op_type in ("Conv", "ConvTranspose") and len(n.input) > 1 and shapes.get(n.input[1]):
            w = shapes[n.input[1]]  # Conv: [Cout, Cin/g, kh, kw]; ConvTranspose: [Cin, Cout/g, kh, kw]
            # a multiply-add per output element and weight of its group (Conv), per input element (ConvTranspose)
            flops = 2.0 * (out_numel if n.op_type == "Conv" else numel(n.input[0])) * math.prod(w[1:])
        elif n.op_type in ("Gemm", "MatMul") and shapes.get(n.input[0]):
            flops = 2.0 * out_numel * shapes[n.input[0]][-1]
        else:
            flops = float(out_numel)
        mem = 4.0 * (sum(numel(i) for i in n.input if i) + out_numel)
        out.append((flops, mem))
    return tuple(out)


@dataclass(frozen=True)
class Timing:
    """How the planner's inputs are timed. Each side's steps run in a row as the agent (preprocess,
    head, encode) and the server (decode, tail) run them, one frame at a time with ``pace_ms`` of
    idle time before each frame; per step the median of ``runs`` frames after ``warmup``. Between
    camera frames other work takes the core and its caches, so a paced step can take much longer
    than back to back (docs/BENCHMARKS.md, "Figures behind design choices"), and that cost lands
    on the first step after the gap, as in the deployed agent. ``pace_ms=0``: back to back (a
    saturated pipeline)."""

    runs: int = 30
    pace_ms: float = 20.0
    warmup: int = 3

    def __post_init__(self):
        if self.runs < 1 or self.pace_ms < 0 or self.warmup < 0:
            raise PlanError(f"timing needs runs >= 1, pace_ms >= 0, warmup >= 0 (got {self})")

    def describe(self) -> str:
        return f"median of {self.runs} frames" + (f" {self.pace_ms:g} ms apart" if self.pace_ms else " back to back")


def time_chain(steps: list, t: Timing) -> list[float]:
    """Median ms of each step when the steps run in a row once per frame (each step gets the
    previous one's result)."""

    def once(times: list[list[float]] | None) -> None:
        v = None
        for i, fn in enumerate(steps):
            t0 = time.perf_counter()
            v = fn(v)
            if times is not None:
                times[i].append((time.perf_counter() - t0) * 1e3)

    for _ in range(t.warmup):
        once(None)
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(t.runs):
        if t.pace_ms:
            time.sleep(t.pace_ms / 1e3)
        once(times)
    return [float(np.median(x)) for x in times]


def graph_work(path: str | Path, ms: float, t: Timing, host: str) -> Work:
    nodes = onnx_nodes(path)
    return Work(
        ms,
        sum(f for f, _ in nodes),
        sum(b for _, b in nodes),
        nodes,
        f"measured: ONNX Runtime 1 thread batch 1 on {host}, {t.describe()}; FLOPs/bytes from {Path(path).name}",
    )


def elementwise_work(ms: float, numel: int, what: str, host: str) -> Work:
    # quantize/dequantize and the image transforms stream their tensors once: memory-bound work
    return Work(
        ms, float(numel), 8.0 * numel, ((float(numel), 8.0 * numel),), f"measured: {what} on {host}", cpu_only=True
    )


# -- options -----------------------------------------------------------------------------------
def bundle_frames(bundle, source: str | None, n: int) -> tuple[list[bytes], np.ndarray, str]:
    from ..data.sources import open_source, take
    from ..data.transforms import preprocess
    from .latency import default_source

    src = source or default_source(bundle.classes)
    jpegs = [s.data for s in take(open_source(src), n)]
    if not jpegs:
        raise PlanError(f"no frames in {src}")
    return jpegs, np.stack([preprocess(j, bundle.input_spec) for j in jpegs]), src


def cycle_frames(items: list):
    while True:
        yield from items


def wire_sizes(bundle, mode, logits: np.ndarray) -> tuple[int, int]:
    """``(request header bytes, reply bytes)`` as the agent and the server build them (a compact
    request without a deadline; a result header with the logits as float32). ``mode`` None: a
    bundle without wire modes (a scatter bundle's full model), mode id 0."""
    from ..wire import codec
    from ..wire import protocol as P

    header = len(P.pack_header(P.request(1000, mode.id if mode is not None else 0, None)))
    desc, payload = codec.encode_float(logits[0], name="logits")
    return header, result_bytes(desc, payload)


def result_bytes(desc: dict, payload: bytes) -> int:
    """A result's bytes on the wire: its header with one output descriptor, written with a request
    id and server timings of the sizes a real frame's take, and the payload."""
    from ..wire import protocol as P

    header = P.result(1000, [desc], queue_us=12.5, compute_us=1234.5, batch_size=1, server_us=1300.5)
    return len(P.pack_header(header)) + len(payload)


def bundle_options(
    bundle_path: str | Path,
    *,
    timing: Timing = Timing(),
    source: str | None = None,
    frames: int = 16,
    host: str = HOST_PROFILE,
    extras: bool = True,
) -> tuple[list[Option], dict[str, Any]]:
    """Every mode of a bundle as a split option (plus, with ``extras``, ``local`` and ``raw`` when it
    has full.onnx), measured on real frames: per mode the device chain (JPEG decode + preprocess,
    head, encode) and the server chain (decode, tail)."""
    from ..bundle import Bundle
    from ..data.transforms import preprocess
    from ..engine import create_engine
    from ..wire.mode_codec import decode_any, encode_mode

    bundle = Bundle.load(bundle_path)
    jpegs, x, src = bundle_frames(bundle, source, frames)
    spec, wire = bundle.input_spec, bundle.wire_spec["name"]
    engines = {
        r: create_engine(bundle.file(r), "ort", threads=1) for m in bundle.modes for r in (getattr(m, "head", "head"),)
    }
    tail_e = create_engine(bundle.file("tail"), "ort", threads=1)
    full_channels = int(bundle.wire_spec["shape"][0])
    options, pre_times = [], []
    logits = None
    for m in bundle.modes:
        role = getattr(m, "head", "head")
        head_e, frames_it = engines[role], cycle_frames(jpegs)
        z = head_e.run1(x[:1])
        tables = bundle.tables_for(m) if getattr(m, "entropy_coded", False) else None  # an ans mode's
        desc, payload = encode_mode(z[0], m, tables=tables, name=wire)
        buf = np.zeros((1, full_channels, *desc["shape"][1:]), np.float32)  # the server zero-fills channels not sent

        def decode(_, desc=desc, payload=payload, buf=buf, tables=tables):
            buf[0, : desc["shape"][0]] = decode_any(desc, payload, tables=tables)
            return buf

        pre_ms, head_ms, enc_ms = time_chain(
            [
                lambda _, it=frames_it: preprocess(next(it), spec)[None],
                head_e.run1,
                lambda zz, m=m, tables=tables: encode_mode(zz[0], m, tables=tables, name=wire),
            ],
            timing,
        )
        dec_ms, tail_ms = time_chain([decode, tail_e.run1], timing)
        logits = tail_e.run1(buf) if logits is None else logits
        pre_times.append(pre_ms)
        n = int(np.prod(desc["shape"]))
        header, reply = wire_sizes(bundle, m, logits)
        what = f"real frames, {timing.describe()}"
        options.append(
            Option(
                f"{m.name}",
                "split",
                # ans: the mode's measured mean and 95th percentile (frames vary); else this frame's
                payload_bytes=m.bytes_per_frame if tables is not None else len(payload),
                payload_bytes_p95=m.bytes_p95 if tables is not None else None,
                header_bytes=header,
                reply_bytes=reply,
                preprocess=elementwise_work(pre_ms, int(x[0].size), f"JPEG decode + resize + normalise, {what}", host),
                head=graph_work(bundle.file(role), head_ms, timing, host),
                tail=graph_work(bundle.file("tail"), tail_ms, timing, host),
                encode=elementwise_work(enc_ms, n, f"codec.encode, {what}", host),
                decode=elementwise_work(dec_ms, n, f"codec.decode, {what}", host),
                accuracy=m.accuracy,
                detail={
                    "mode": m.id,
                    "channels": m.channels,
                    "bits": m.bits,
                    "wire_shape": list(desc["shape"]),
                    "head_file": bundle.file(role).name,
                },
            )
        )
    meta = {
        "bundle": bundle.name,
        "path": str(bundle_path),
        "source": src,
        "frames": len(jpegs),
        "jpeg_bytes_median": float(np.median([len(j) for j in jpegs])),
    }
    if extras and bundle.has("full"):
        options += full_options(
            bundle.file("full"), jpegs, spec, logits, bundle, timing, host, bundle.manifest.get("teacher_accuracy")
        )
    return options, meta


def full_options(
    full_path: Path,
    jpegs: list[bytes],
    spec: dict,
    logits: np.ndarray,
    bundle,
    timing: Timing,
    host: str,
    accuracy: float | None,
) -> list[Option]:
    """``local`` (full model on the device) and ``raw`` (the frame's JPEG, median size over the real
    frames, sent as it is; the server decodes it and runs the full model): the chain preprocess,
    full model, timed once (the same host stands for both sides)."""
    from ..data.transforms import preprocess
    from ..engine import create_engine

    full_e, frames_it = create_engine(full_path, "ort", threads=1), cycle_frames(jpegs)
    pre_ms, full_ms = time_chain([lambda _: preprocess(next(frames_it), spec)[None], full_e.run1], timing)
    pre = elementwise_work(
        pre_ms, int(np.prod(spec["shape"])), f"JPEG decode + resize + normalise, {timing.describe()}", host
    )
    full = graph_work(full_path, full_ms, timing, host)
    header, reply = wire_sizes(bundle, bundle.modes[0] if bundle.modes else None, logits)
    jpeg = float(np.median([len(j) for j in jpegs]))
    return [
        Option(
            "local (full.onnx on device)",
            "local",
            preprocess=pre,
            head=full,
            accuracy=accuracy,
            detail={"file": full_path.name},
        ),
        Option(
            "raw (send the JPEG)",
            "raw",
            payload_bytes=jpeg,
            header_bytes=header,
            reply_bytes=reply,
            preprocess=pre,
            tail=full,
            accuracy=accuracy,
            detail={"file": full_path.name, "jpeg_bytes_median": jpeg},
        ),
    ]


def model_options(
    model: str,
    *,
    checkpoint: str | None = None,
    cuts: list[str] | None = None,
    input_size: int | None = None,
    cache: str | Path | None = None,
    timing: Timing | None = None,
    source: str | None = None,
    host: str = HOST_PROFILE,
    progress=None,
) -> tuple[list[Option], dict[str, Any]]:
    """The planner's options for a zoo model: one per cut point (exported once into the cache by the
    build plane, torch needed), plus local and raw."""
    from ..builder.split_bundles import cut_bundles
    from ..bundle import Bundle
    from ..engine import create_engine

    timing = timing or Timing()
    bundles, full, meta = cut_bundles(
        model, checkpoint=checkpoint, cuts=cuts, input_size=input_size, cache=cache, progress=progress
    )
    options = []
    for cut, d in bundles:
        opts, _ = bundle_options(d, timing=timing, source=source, host=host, extras=False)
        o = opts[0]
        options.append(
            replace(o, name=f"cut {cut.name}", detail={**o.detail, "cut": cut.name, "cut_shape": list(cut.shape)})
        )
    first = Bundle.load(bundles[0][1])
    jpegs, x, src = bundle_frames(first, source, 16)
    logits = create_engine(full, "ort", threads=1).run1(x[:1])
    options += full_options(full, jpegs, first.input_spec, logits, first, timing, host, None)
    meta.update(source=src, jpeg_bytes_median=float(np.median([len(j) for j in jpegs])))
    return options, meta


def scenario(device: str, server: str, host: str, link: Link, overhead_ms: float, radio_w: float | None) -> Scenario:
    from .devices import load_profile

    machines = [Machine.from_profile(load_profile(n)) for n in (device, server, host)]
    return Scenario(machines[0], machines[1], machines[2], link, overhead_ms, radio_w)
