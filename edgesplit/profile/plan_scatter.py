"""``edgesplit plan`` for a scatter bundle (ED-ViT, docs/BUNDLE.md section 7.1): sub-models on a set
of devices sharing a LAN, against the full model on one of them, and against the JPEG to a server.

Measured here, on real frames of the dataset the bundle predicts (as :mod:`.plan_inputs` measures
heads and tails): each sub-model's graph and the fusion graph timed with ONNX Runtime at 1 thread,
batch 1, with FLOPs and bytes counted node by node for the roofline; JPEG decode + preprocess; the
full model (``local`` and ``raw``, :func:`.plan_inputs.full_options`). Message sizes come from the
wire's own builders: a ``scatter`` with the preprocessed tensor or the JPEG, a ``gather`` with a
sub-model's features in the feature mode's dtype.

The devices: the first listed is the camera. It preprocesses the frame (tensor input), runs the
sub-models placed on it in-process, and fuses; the others are workers reached over the LAN. A
device's memory budget for sub-models is half its RAM (the rest for the OS, the runtime and its
buffers). ``local`` runs full.onnx on the camera; ``raw`` sends the JPEG over the uplink to the
server (only with an uplink).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..control.placement import Device, SubModel, Verdict, edvit_verdict, rank_verdicts
from ..control.planner import Link, Machine, Option, PlanError, Scenario, Work, predict
from .plan_inputs import HOST_PROFILE, Timing, bundle_frames, full_options, graph_work, time_chain

MEMORY_SHARE = 0.5  # of a device's RAM that its sub-models may use


@dataclass(frozen=True)
class ScatterInputs:
    subs: list[SubModel]
    fusion: Work
    preprocess: Work  # JPEG decode + resize + normalise, measured here
    tensor_bytes: int  # one scatter message with the preprocessed tensor
    jpeg_bytes: int  # one scatter message with the frame's JPEG (median size)
    local: Option
    raw: Option
    meta: dict[str, Any]


def scatter_inputs(
    bundle_path: str | Path,
    *,
    timing: Timing | None = None,
    source: str | None = None,
    frames: int = 16,
    host: str = HOST_PROFILE,
) -> ScatterInputs:
    from ..bundle import Bundle
    from ..engine import create_engine
    from ..wire import codec
    from ..wire import protocol as P
    from ..wire import scatter_messages as S

    timing = timing or Timing()
    bundle = Bundle.load(bundle_path)
    if bundle.serving != "scatter":
        raise PlanError(
            f"bundle '{bundle.name}' ({bundle.family}) is not a scatter bundle: --devices plans ED-ViT "
            "sub-models; plan a head-tail bundle with --device"
        )
    if not bundle.has("full"):
        raise PlanError(f"bundle '{bundle.name}' has no full.onnx: nothing to judge its sub-models against")
    jpegs, x, src = bundle_frames(bundle, source, frames)
    x1 = x[:1]
    fm = bundle.feature_mode()
    subs = []
    for s in bundle.submodels:
        path = bundle.file(s.role)
        engine = create_engine(path, "ort", threads=1)
        (ms,) = time_chain([lambda _, e=engine: e.run1(x1)], timing)
        desc, payload = codec.encode_float(
            np.zeros(s.features_dim, np.float32), name=s.features, dtype=fm.features_dtype
        )
        header = S.gather(
            1000, s.id, desc, queue_us=12.5, decode_us=0.0, compute_us=1234.5, batch_size=1, worker_us=1300.5
        )
        subs.append(
            SubModel(s.role, graph_work(path, ms, timing, host), s.memory_mb, len(P.pack_header(header)) + len(payload))
        )
    assert bundle.fusion is not None
    fusion_path = bundle.file(bundle.fusion.role)
    fusion_e = create_engine(fusion_path, "ort", threads=1)
    feeds = {
        bundle.fusion.features: np.zeros((1, sum(s.features_dim for s in bundle.submodels)), np.float32),
        bundle.fusion.mask: np.ones((1, len(bundle.submodels)), np.float32),
    }
    (fusion_ms,) = time_chain([lambda _: fusion_e.run(feeds)], timing)
    full_path = bundle.file("full")
    logits = create_engine(full_path, "ort", threads=1).run1(x1)
    accuracy = (bundle.manifest.get("edvit", {}).get("accuracy") or {}).get("full")
    local, raw = full_options(full_path, jpegs, bundle.input_spec, logits, bundle, timing, host, accuracy)
    tdesc, tpayload = codec.encode_float(x[0], name="input")
    jpeg = int(np.median([len(j) for j in jpegs]))
    side = bundle.input_spec["shape"][-1]
    jdesc = S.jpeg_descriptor(jpeg, side, side)
    return ScatterInputs(
        subs,
        graph_work(fusion_path, fusion_ms, timing, host),
        local.preprocess,
        len(P.pack_header(S.scatter(1000, 50.0, [0], tdesc))) + len(tpayload),
        len(P.pack_header(S.scatter(1000, 50.0, [0], jdesc))) + jpeg,
        local,
        raw,
        {
            "bundle": bundle.name,
            "path": str(bundle_path),
            "source": src,
            "frames": len(jpegs),
            "jpeg_bytes_median": jpeg,
            "feature_mode": fm.features_dtype,
            "fused_accuracy": fm.accuracy,
        },
    )


def device_set(names: list[str]) -> list[Device]:
    from .devices import load_profile

    out = []
    for n in names:
        profile = load_profile(n)
        if "memory_gb" not in profile.figures:
            raise PlanError(f"device profile '{n}' has no memory_gb: sub-models cannot be placed on it")
        out.append(Device(Machine.from_profile(profile), MEMORY_SHARE * 1024 * float(profile.value("memory_gb"))))
    return out


def _from_prediction(name: str, kind: str, p, detail: dict) -> Verdict:
    return Verdict(name, kind, p.latency_ms, {k: v for k, v in p.parts_ms.items()}, {**detail, "sources": p.sources})


def plan_scatter(
    inputs: ScatterInputs,
    devices: list[Device],
    host: Machine,
    lan: Link,
    *,
    server: Machine | None = None,
    uplink: Link | None = None,
    overhead_ms: float = 0.5,
) -> list[Verdict]:
    """Rank ED-ViT (tensor input and JPEG input, greedy placement, the optimum alongside) against
    the full model on the camera and, with a server and an uplink, the JPEG to the server."""
    if not devices:
        raise PlanError("--devices lists no device")
    verdicts = [
        edvit_verdict(
            f"edvit (tensor input, {len(devices)} devices)",
            inputs.subs,
            devices,
            host,
            lan,
            inputs.tensor_bytes,
            camera_pre=inputs.preprocess,
            worker_pre=None,
            fusion=inputs.fusion,
        ),
        edvit_verdict(
            f"edvit (JPEG input, {len(devices)} devices)",
            inputs.subs,
            devices,
            host,
            lan,
            inputs.jpeg_bytes,
            camera_pre=inputs.preprocess,
            worker_pre=inputs.preprocess,
            fusion=inputs.fusion,
        ),
    ]
    camera = devices[0].machine
    on_camera = Scenario(camera, camera, host, lan, overhead_ms)
    verdicts.append(
        _from_prediction(f"local (full.onnx on {camera.name})", "local", predict(inputs.local, on_camera), {})
    )
    if server is not None and uplink is not None:
        p = predict(inputs.raw, Scenario(camera, server, host, uplink, overhead_ms))
        verdicts.append(
            _from_prediction(
                f"raw (JPEG to {server.name})", "raw", p, {"uplink_mbps": uplink.mbps, "rtt_ms": uplink.rtt_ms}
            )
        )
    return rank_verdicts(verdicts)


def format_scatter(ranked: list[Verdict], devices: list[Device], lan: Link, host: Machine) -> str:
    names = ", ".join(d.name for d in devices)
    lines = [
        f"scatter plan on [{names}] (camera {devices[0].name}) over a {lan.mbps:g} Mbit/s LAN "
        f"(RTT {lan.rtt_ms:g} ms); times measured on {host.name}, other devices predicted by roofline",
        f"{'#':>2} {'option':<40} {'latency ms':>10}  reason",
    ]
    for v in ranked:
        lines.append(f"{v.rank:>2} {v.name:<40} {v.latency_ms:>10.2f}  {v.reason}")
        if v.kind == "edvit":
            opt = v.detail["optimal"]
            best = f"{opt['latency_ms']:.2f} ms" if "latency_ms" in opt else opt["error"]
            lines.append(f"{'':>3} placement (greedy) {v.detail['placement']}; exact optimum {best}")
    return "\n".join(lines)
