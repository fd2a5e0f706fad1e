"""The split planner's cost model (Neurosurgeon-style): predict, for every way of running one frame,
its end-to-end latency and the device's energy, and rank the options.

An **option** is one way to answer a frame: a cut point (and, for a bundle, a width/bits mode) whose
head runs on the device and tail on the server, the whole model on the device (``local``), or the
encoded frame sent as it is and everything run on the server (``raw``). Its predicted latency is

    device:  preprocess + head + encode              (device profile)
    link:    request + reply bytes on the wire / bandwidth, minus a token bucket's burst, + RTT
    server:  decode + tail + runtime overhead          (server profile)

An entropy-coded mode's frames vary in length: its option carries the expected (mean) payload,
which the ranking uses, and the 95th percentile, whose latency is reported beside it
(``latency_p95_ms``: the same prediction with the tail-sized request).

**Compute.** Every part of the model is a :class:`Work`: its time measured on a reference host
(ONNX Runtime, 1 thread, batch 1) and its FLOPs and memory bytes counted node by node from its ONNX
graph. On the reference host itself the measured time is used as it is. On another CPU the
measured time is scaled by the ratio of roofline times, ``sum_i max(F_i/G, B_i/BW)`` at the target's
figures over the same at the host's: a convolution-heavy part scales with GFLOPS, an elementwise or
copy part with memory bandwidth. On a GPU (Jetson, server) the roofline time plus a fixed launch
cost per node is used directly (no GPU was measured: labelled an estimate).

**Link.** A message of ``B`` bytes travels in TCP segments of ``mss`` bytes, each with
``per_segment_bytes`` of TCP/IP/link headers. Where the ACKs share the bottleneck (a shaped
loopback), the receiver's ACKs, one per two segments, take their ``ack_bytes`` of it while the
request is still going out, except the last one, which is delayed and rides on the reply; the
reply's own ACK is sent after the answer has arrived and costs the frame nothing. The reply (result
header and logits) comes back the same way. A token-bucket shaper (``burst_bytes``) that the frame
finds full lets the request's first bytes through at once; the tokens it has left, plus those that
come back at the rate while the server computes, let the reply through (capped at the bucket).
This accounting was checked with a plain ZeroMQ echo over the shaped loopback; counting every ACK,
the last one and the reply's included, over-predicts (docs/BENCHMARKS.md, "Figures behind design
choices").

**Energy** (device side, per frame): ``(preprocess + head + encode) x active power + link time x
radio power``. Profiles give idle and active watts; none gives a radio figure, so the radio power is
the caller's ``radio_w`` or else the idle power (the device waits for its bytes): every energy
figure built on a figure whose source is ``estimate:`` or on the idle stand-in is marked
``estimate``.

Pure Python: no torch, no ONNX Runtime; the costs are gathered by :mod:`edgesplit.profile.plan_inputs`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from .plan_report import breakdown, format_plan, why

__all__ = [
    "OBJECTIVES",
    "Link",
    "Machine",
    "Option",
    "PlanError",
    "Prediction",
    "Scenario",
    "Work",
    "format_plan",
    "plan",
    "predict",
]

OBJECTIVES = ("latency", "energy")
GPU_LAUNCH_US = 8.0  # estimate per node, from the batch-1 GPU tail figure in DESIGN.md (docs/BENCHMARKS.md)


class PlanError(ValueError):
    """Bad planner input (a bandwidth that is not positive, a profile without the figures needed)."""


@dataclass(frozen=True)
class Work:
    """One part of the model (or a codec step): time on the reference host, FLOPs and memory bytes
    per frame, and per-node ``(flops, bytes)`` for the roofline."""

    host_ms: float
    flops: float = 0.0
    mem_bytes: float = 0.0
    nodes: tuple[tuple[float, float], ...] = ()
    source: str = ""
    cpu_only: bool = False  # numpy/Pillow steps (codec, JPEG decode): run on the CPU even where a GPU runs the model

    def __post_init__(self):
        if not (math.isfinite(self.host_ms) and self.host_ms >= 0):
            raise PlanError(f"a measured time must be finite and >= 0, got {self.host_ms}")

    def roofline_s(self, gflops: float, mem_gbps: float) -> float:
        nodes = self.nodes or ((self.flops, self.mem_bytes),)
        return sum(max(f / (gflops * 1e9), b / (mem_gbps * 1e9)) for f, b in nodes)


ZERO = Work(0.0, source="none")


@dataclass(frozen=True)
class Machine:
    """What the planner needs of a device profile: compute and memory figures, power."""

    name: str
    gflops: float
    mem_gbps: float
    gpu: bool = False
    active_w: float | None = None
    idle_w: float | None = None
    estimated: tuple[str, ...] = ()  # figures whose source is an estimate

    @classmethod
    def from_profile(cls, profile) -> "Machine":
        """From a :class:`edgesplit.profile.devices.DeviceProfile`: the CPU figures where it has them
        (CPU devices and hosts), else the GPU's (Jetsons run the head on the GPU; servers the tail)."""
        figs = profile.figures
        if "cpu_fp32_gflops" in figs:
            keys, gflops, gpu = ("cpu_fp32_gflops",), float(profile.value("cpu_fp32_gflops")), False
        elif "gpu_fp32_tflops" in figs:
            keys, gflops, gpu = ("gpu_fp32_tflops",), 1e3 * float(profile.value("gpu_fp32_tflops")), True
        else:
            raise PlanError(
                f"device profile '{profile.name}' has neither cpu_fp32_gflops nor gpu_fp32_tflops: "
                "the planner cannot model its compute"
            )
        if "memory_bandwidth_gbps" not in figs:
            raise PlanError(f"device profile '{profile.name}' has no memory_bandwidth_gbps")
        keys += ("memory_bandwidth_gbps",)
        active_key = "power_active_w" if "power_active_w" in figs else "power_max_w"
        active = float(profile.value(active_key)) if active_key in figs else None
        idle = float(profile.value("power_idle_w")) if "power_idle_w" in figs else None
        keys += tuple(k for k in (active_key, "power_idle_w") if k in figs)
        est = tuple(k for k in keys if figs[k].estimated)
        return cls(profile.name, gflops, float(profile.value("memory_bandwidth_gbps")), gpu, active, idle, est)

    def time_ms(self, work: Work, host: "Machine") -> tuple[float, str]:
        """Predicted time of ``work`` here, and how it was obtained."""
        if work.host_ms == 0 and not work.nodes and work.flops == 0:
            return 0.0, "none"
        if self.name == host.name:
            return work.host_ms, "measured"
        if self.gpu and work.cpu_only:
            # GPU profiles carry no CPU figure: the step is taken at the measuring host's speed
            return work.host_ms, f"estimate: CPU step at {host.name} speed"
        if self.gpu:
            ms = 1e3 * work.roofline_s(self.gflops, self.mem_gbps) + len(work.nodes) * GPU_LAUNCH_US / 1e3
            return ms, "estimate: GPU roofline + launch per node"
        ref = work.roofline_s(host.gflops, host.mem_gbps)
        if ref <= 0:
            return work.host_ms, "measured (no FLOPs to scale by)"
        return work.host_ms * work.roofline_s(self.gflops, self.mem_gbps) / ref, f"scaled from {host.name} by roofline"


@dataclass(frozen=True)
class Link:
    """The uplink (and the reply's way back). ``mbps`` is the bottleneck rate."""

    mbps: float
    rtt_ms: float = 0.0
    mss: int = 1448  # TCP payload per segment at a 1500-byte MTU with timestamps
    per_segment_bytes: int = 66  # TCP (32, with timestamps) + IPv4 (20) + link header (14)
    ack_bytes: int = 0  # per two data segments, when the ACKs share the bottleneck (66 on a shaped loopback)
    burst_bytes: int = 0  # a token bucket's depth: bytes that pass at once when the link was idle
    framing_bytes: int = 20  # ZeroMQ frame headers of a two-frame message

    def __post_init__(self):
        if not (isinstance(self.mbps, (int, float)) and math.isfinite(self.mbps) and self.mbps > 0):
            raise PlanError(f"bandwidth must be a positive number of Mbit/s, got {self.mbps!r}")
        if not (math.isfinite(self.rtt_ms) and self.rtt_ms >= 0):
            raise PlanError(f"RTT must be >= 0 ms, got {self.rtt_ms!r}")
        if self.mss <= 0 or min(self.per_segment_bytes, self.ack_bytes, self.burst_bytes, self.framing_bytes) < 0:
            raise PlanError("link sizes must be >= 0 (mss > 0)")

    def wire_bytes(self, message_bytes: float, acked: bool = True) -> float:
        """Bytes the bottleneck carries for one message before it has arrived: its segments with
        their headers and, with ``acked``, the ACKs sent while it is in flight (see the module)."""
        m = message_bytes + self.framing_bytes
        segments = max(1, math.ceil(m / self.mss))
        acks = math.ceil(segments / 2) - 1 if acked else 0
        return m + segments * self.per_segment_bytes + acks * self.ack_bytes

    def transfer_ms(self, request_bytes: float, reply_bytes: float, server_ms: float = 0.0) -> float:
        """Time on the link: each message's wire bytes beyond the tokens it finds, at the rate, plus
        the RTT. The bucket is full when the request starts; it refills during ``server_ms``."""
        rate = self.mbps * 1e3 / 8  # bytes per ms
        request = self.wire_bytes(request_bytes)
        tokens = min(self.burst_bytes, max(0.0, self.burst_bytes - request) + server_ms * rate)
        reply = self.wire_bytes(reply_bytes, acked=False)
        return (max(0.0, request - self.burst_bytes) + max(0.0, reply - tokens)) / rate + self.rtt_ms


KINDS = ("split", "local", "raw", "u-shaped")


@dataclass(frozen=True)
class Option:
    """One way to answer a frame. ``kind``: ``split`` (head on the device, tail on the server),
    ``local`` (the whole model on the device), ``raw`` (the encoded frame sent, everything on the
    server) or ``u-shaped`` (head on the device, the body on the server, the tail on the device
    again: the answer comes back to be finished). ``head``/``encode`` run on the device,
    ``decode``/``tail`` on the server (a U-shaped option's ``tail`` is the server's body); a
    U-shaped option's ``answer_encode`` runs on the server, ``answer_decode`` and ``device_tail``
    on the device after the reply."""

    name: str
    kind: str
    payload_bytes: float = 0.0  # a variable-length (ans) mode: the expected (mean) payload
    header_bytes: float = 0.0
    reply_bytes: float = 0.0
    payload_bytes_p95: float | None = None  # a variable-length mode: the payloads' 95th percentile
    preprocess: Work = ZERO
    head: Work = ZERO
    encode: Work = ZERO
    decode: Work = ZERO
    tail: Work = ZERO
    answer_encode: Work = ZERO
    answer_decode: Work = ZERO
    device_tail: Work = ZERO
    accuracy: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise PlanError(f"option kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind != "u-shaped" and any(
            w is not ZERO for w in (self.answer_encode, self.answer_decode, self.device_tail)
        ):
            raise PlanError(f"option {self.name!r}: only a u-shaped option has answer and device-tail work")


@dataclass
class Prediction:
    option: str
    kind: str
    latency_ms: float
    device_ms: float
    link_ms: float
    server_ms: float
    parts_ms: dict[str, float]
    request_bytes: float
    energy_mj: float | None
    energy_estimate: bool
    bound: str
    accuracy: float | None
    sources: dict[str, str]
    detail: dict[str, Any]
    reason: str = ""
    rank: int = 0
    latency_p95_ms: float | None = None  # variable-length payloads: the latency of a tail-sized frame

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("latency_ms", "device_ms", "link_ms", "server_ms", "energy_mj", "latency_p95_ms"):
            if d[k] is not None:
                d[k] = round(d[k], 4)
        d["parts_ms"] = {k: round(v, 4) for k, v in self.parts_ms.items()}
        return d


@dataclass(frozen=True)
class Scenario:
    device: Machine
    server: Machine
    host: Machine  # where the Work times were measured
    link: Link
    overhead_ms: float = 0.5  # the runtime's own cost per request (agent + server software path)
    radio_w: float | None = None

    def __post_init__(self):
        if not (math.isfinite(self.overhead_ms) and self.overhead_ms >= 0):
            raise PlanError(f"runtime overhead must be >= 0 ms, got {self.overhead_ms!r}")
        if self.radio_w is not None and not (math.isfinite(self.radio_w) and self.radio_w >= 0):
            raise PlanError(f"radio power must be >= 0 W, got {self.radio_w!r}")


# Where each part runs, and the name it is reported under. The server part of a U-shaped option
# sits in ``tail`` and is reported as the ``body``.
DEVICE_PARTS = ("preprocess", "head", "encode", "answer decode", "device tail")
SERVER_PARTS = ("decode", "tail", "body", "answer encode", "overhead")


def predict(opt: Option, sc: Scenario) -> Prediction:
    dev, srv = sc.device, sc.server
    parts: dict[str, float] = {}
    sources: dict[str, str] = {}
    u_shaped = opt.kind == "u-shaped"
    for key, work, where in (
        ("preprocess", opt.preprocess, dev if opt.kind != "raw" else srv),
        ("head", opt.head, dev),
        ("encode", opt.encode, dev),
        ("decode", opt.decode, srv),
        ("body" if u_shaped else "tail", opt.tail, srv),
        ("answer encode", opt.answer_encode, srv),
        ("answer decode", opt.answer_decode, dev),
        ("device tail", opt.device_tail, dev),
    ):
        ms, how = where.time_ms(work, sc.host)
        if ms or work is not ZERO:
            parts[key] = ms
            sources[key] = f"{where.name}: {how}"
    remote = opt.kind != "local"
    request = opt.payload_bytes + opt.header_bytes
    if remote:
        parts["overhead"] = sc.overhead_ms
    on_device = tuple(k for k in DEVICE_PARTS if k != "preprocess" or opt.kind != "raw")
    device_ms = sum(parts.get(k, 0.0) for k in on_device)
    server_ms = sum(parts.get(k, 0.0) for k in SERVER_PARTS) + (
        parts.get("preprocess", 0.0) if opt.kind == "raw" else 0.0
    )
    link_ms = sc.link.transfer_ms(request, opt.reply_bytes, server_ms) if remote else 0.0
    if remote:
        parts["link"] = link_ms
    latency = device_ms + link_ms + server_ms
    energy, est = None, False
    if dev.active_w is not None:
        radio = sc.radio_w if sc.radio_w is not None else dev.idle_w
        if radio is not None or not remote:
            energy = device_ms * dev.active_w + (link_ms * radio if remote else 0.0)  # ms x W = mJ
            est = (
                bool(dev.estimated)
                or (remote and sc.radio_w is None)
                or any(sources[k].split(": ", 1)[1].startswith("estimate") for k in on_device if k in sources)
            )
    p95 = None
    if remote and opt.payload_bytes_p95 is not None:
        tail_req = opt.payload_bytes_p95 + opt.header_bytes
        p95 = device_ms + sc.link.transfer_ms(tail_req, opt.reply_bytes, server_ms) + server_ms
    shares = {"device": device_ms, "link": link_ms, "server": server_ms}
    bound = max(shares, key=shares.get)
    return Prediction(
        opt.name,
        opt.kind,
        latency,
        device_ms,
        link_ms,
        server_ms,
        parts,
        request,
        energy,
        est,
        f"{'link' if bound == 'link' else 'compute'}-bound ({bound} {shares[bound] / max(latency, 1e-12):.0%})",
        opt.accuracy,
        sources,
        dict(opt.detail),
        latency_p95_ms=p95,
    )


def plan(options: Sequence[Option], sc: Scenario, objective: str = "latency") -> list[Prediction]:
    """Predict every option and rank them by the objective (ties broken by latency). Each
    prediction's ``reason`` holds its breakdown, what bounds it and why it wins or loses."""
    if objective not in OBJECTIVES:
        raise PlanError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if not options:
        raise PlanError("nothing to plan: no options")
    preds = [predict(o, sc) for o in options]
    if objective == "energy":
        if any(p.energy_mj is None for p in preds):
            raise PlanError(
                f"device profile '{sc.device.name}' has no power figures (power_idle_w and "
                "power_active_w/power_max_w): plan for --objective latency, or give a device with them"
            )
        preds.sort(key=lambda p: (p.energy_mj, p.latency_ms))
    else:
        preds.sort(key=lambda p: p.latency_ms)
    for i, p in enumerate(preds, 1):
        p.rank = i
        energy = "" if p.energy_mj is None else f"; {p.energy_mj:.2f} mJ{' (estimate)' if p.energy_estimate else ''}"
        p.reason = f"{breakdown(p, sc.link)}; {p.bound}{energy}; {why(p, preds[0], objective)}"
    return preds
