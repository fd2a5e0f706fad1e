"""The ED-ViT camera (docs/PROTOCOL.md §13): per frame, preprocess once, scatter to every live
worker, fuse what arrived by the frame's cut-off with the bundle's fusion head and the presence
mask, and answer. Edge plane: ONNX Runtime, no torch.

One DEALER and one :class:`~edgesplit.edge.scatter_session.ScatterSession` per worker (each with
its own handshake, credits, heartbeats and link monitor, :class:`~edgesplit.edge.connection.
ServerConnection` moving the bytes), all polled from one thread. Frames go one at a time: a frame
is scattered, its gathers awaited until every scattered sub-model is answered or its cut-off
``T = capture + budget_ms`` passes (never later), then fused; what arrives for it afterwards is
late (counted, dropped).

Each sub-model is asked of the first live worker (in ``--workers`` order) whose welcome lists it;
a sub-model no live worker holds is missing from the frame at once. Every frame gets exactly one
answer (:class:`EdvitAnswer`): the fused logits and ``used``; with no sub-model present, the
bundle's ``full.onnx`` run on the camera (``fallback="local"``, the default when the bundle has
it: a frame is worth more answered than not) or an answer without logits (``fallback="none"``).

The input of each scatter is chosen per frame (``scatter_input``): ``tensor`` (the preprocessed
tensor, float32 or float16), ``jpeg`` (the camera's encoded frame as it came, to workers that offer
``scatter_jpeg``; others get the tensor), or ``auto`` (the JPEG when it is at most a quarter of
the tensor's bytes: then the link, not the worker's decode, is what the JPEG saves).

With ``server`` (fusion on the server, §13.5), the gather cut-off is ``T`` less the estimated round
trip of a fused request; the features present then go to the server as one fused request
(:class:`~edgesplit.edge.server_fusion.ServerFusion`), and its logits and ``used`` answer the
frame. A fused request that fails or has no answer by ``T`` leaves the frame to the camera's own
fusion head (§13.6 item 3): still exactly one answer per frame.
"""

from __future__ import annotations

import io
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from ..data.sources import Sample
from ..data.transforms import preprocess
from ..wire import scatter_messages as S
from ..wire.codec import encode_float
from ..wire.scatter import JPEG_SOI
from ..wire.session_events import (
    BadGather,
    Gathered,
    LateGather,
    Lost,
    Refused,
    ScatterRefused,
    TimedOut,
    Welcomed,
)
from ..wire.transport import context, default_agent_name
from .connection import HandshakeFailed, ServerConnection
from .scatter_bundle import EdvitBundle, Fusion, OrtExecution, ort_session
from .scatter_session import ScatterSession
from .server_fusion import ServerFusion

SCATTER_INPUTS = ("tensor", "jpeg", "auto")
AUTO_JPEG_RATIO = 4  # auto: send the JPEG when the tensor is at least this many times larger
RETURN_EWMA = 0.2


@dataclass
class WorkerLink:
    """One worker as the camera sees it."""

    endpoint: str
    session: ScatterSession
    conn: ServerConnection
    state: str = "handshaking"  # handshaking | live | refused
    refusal: str | None = None
    return_ms: float = 0.5  # estimate of a gather's trip back (half the round trip beyond the worker)
    gathers: int = 0
    errors: Counter = field(default_factory=Counter)
    bad: Counter = field(default_factory=Counter)


@dataclass
class EdvitAnswer:
    """One frame's answer."""

    frame: int
    key: str
    label: int | None
    logits: np.ndarray | None
    used: list[int]
    missing: list[int]
    fallback: str | None  # None (fused), "local" (full.onnx, nothing present) or "none" (no logits)
    fused_on: str | None  # "server", "camera" (fused here: no server fusion, or it failed), None
    inputs: dict[str, str]  # worker -> "tensor" | "jpeg"
    bytes_out: int
    bytes_in: int
    stages_ms: dict[str, float]
    workers: dict[str, dict[str, float]]  # worker -> its timings (us) for this frame

    @property
    def top1(self) -> int | None:
        return None if self.logits is None else int(np.argmax(self.logits))

    def to_json(self) -> dict[str, Any]:
        return {
            "frame": self.frame,
            "key": self.key,
            "label": self.label,
            "top1": self.top1,
            "used": self.used,
            "missing": self.missing,
            "fallback": self.fallback,
            "fused_on": self.fused_on,
            "inputs": self.inputs,
            "bytes_out": self.bytes_out,
            "bytes_in": self.bytes_in,
            "stages_ms": {k: round(v, 3) for k, v in self.stages_ms.items()},
            "workers": self.workers,
        }


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) of a JPEG from its header, or None when ``data`` is not a JPEG."""
    if data[:3] != JPEG_SOI:
        return None
    from PIL import Image

    try:
        w, h = Image.open(io.BytesIO(data)).size
    except Exception:
        return None
    return h, w


class ScatterCamera:
    """The camera side of ED-ViT for one bundle and a list of worker endpoints. One thread."""

    def __init__(
        self,
        bundle: EdvitBundle,
        workers: list[str],
        *,
        budget_ms: float = 100.0,
        scatter_input: str = "tensor",
        tensor_dtype: str = "float32",
        fallback: str = "local",
        name: str | None = None,
        threads: int | OrtExecution = 1,
        inflight: int = 4,
        timeout_s: float = 10.0,
        reconnect_max_s: float = 0.5,
        server: str | None = None,
        curve: Any = None,
    ):
        if scatter_input not in SCATTER_INPUTS:
            raise ValueError(f"scatter_input must be one of {SCATTER_INPUTS}, got {scatter_input!r}")
        if fallback not in ("local", "none"):
            raise ValueError(f"fallback must be 'local' or 'none', got {fallback!r}")
        if not workers:
            raise ValueError("an ED-ViT camera needs at least one worker endpoint")
        self.bundle = bundle
        self.budget_ms = float(budget_ms)
        self.scatter_input = scatter_input
        self.tensor_dtype = tensor_dtype
        self.fusion = Fusion(bundle, threads)
        self.local = ort_session(bundle.full_path, threads) if fallback == "local" and bundle.full_path else None
        self.fallback = fallback
        self.input_name = "input"
        expected = {sid: (s.feature_name, s.dim) for sid, s in bundle.submodels.items()}
        ctx = context()
        camera = name or f"camera@{default_agent_name()}"
        self.links = []
        for ep in workers:
            sess = ScatterSession(
                bundle.hash,
                camera,
                expected,
                max_inflight=inflight,
                timeout_s=timeout_s,
                reconnect_max_s=reconnect_max_s,
                peer=f"worker {ep}",
            )
            self.links.append(WorkerLink(ep, sess, ServerConnection(sess, ep, ctx, reconnect_max_s=reconnect_max_s)))
        self.server = (
            None
            if server is None
            else ServerFusion(bundle, server, camera, timeout_s=timeout_s, reconnect_max_s=reconnect_max_s, curve=curve)
        )
        self._next_frame = 1
        self.refusals: list[dict[str, str]] = []  # every handshake refusal, as reported
        self.late_gathers = 0
        self.bad_gathers: list[dict[str, Any]] = []  # the first few, with worker and reason
        self._current: dict[str, Any] | None = None

    # -- connection ----------------------------------------------------------------------------
    def connect(self, wait_s: float = 5.0) -> ScatterCamera:
        """Open every worker's socket and say hello; wait up to ``wait_s`` for each to be welcomed
        or refused (the rest keep handshaking in the background)."""
        for link in self.links:
            link.conn.open()
            link.conn.hello()
        if self.server is not None:
            self.server.open()
        end = time.perf_counter() + wait_s
        while time.perf_counter() < end and (
            any(link.state == "handshaking" for link in self.links)
            or (self.server is not None and self.server.session.handshaking and self.server.refusal is None)
        ):
            self._pump(0.01)
        return self

    def close(self) -> None:
        for link in self.links:
            link.conn.close()
        if self.server is not None:
            self.server.close()

    def _pump(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for any worker's message, then let every connection read what is
        there and check its deadlines; handle the events."""
        poller = zmq.Poller()
        for link in self.links:
            if link.conn.socket is not None:
                poller.register(link.conn.socket, zmq.POLLIN)
        if self.server is not None and self.server.socket is not None:
            poller.register(self.server.socket, zmq.POLLIN)
        poller.poll(max(0, int(timeout_s * 1000)))
        if self.server is not None:
            self.server.pump(0)  # its pings answered and its session kept while frames gather
        for link in self.links:
            if link.conn.socket is not None:
                for ev in link.conn.pump(0):
                    self._on_event(link, ev)

    # -- events --------------------------------------------------------------------------------
    def _on_event(self, link: WorkerLink, ev: Any) -> None:
        cur = self._current
        t = type(ev)
        if t is Gathered:
            link.gathers += 1
            if cur is not None and ev.frame_id == cur["id"]:
                cur["features"][ev.submodel] = ev.features
                cur["waiting"][link.endpoint].discard(ev.submodel)
                tm = ev.timings
                cur["workers"].setdefault(link.endpoint, {}).update(
                    {f"compute_us.{ev.submodel}": tm.compute_us, "decode_us": tm.decode_us, "worker_us": tm.worker_us}
                )
                elapsed_ms = (time.perf_counter_ns() - cur["t_sent"][link.endpoint]) / 1e6
                back = max(0.0, (elapsed_ms - tm.worker_us / 1e3) / 2)
                link.return_ms += RETURN_EWMA * (back - link.return_ms)
                cur["t_gathered"] = time.perf_counter_ns()
        elif t is ScatterRefused:
            link.errors[ev.code.name] += len(ev.submodels)
            if cur is not None and ev.frame_id == cur["id"]:
                cur["waiting"][link.endpoint].difference_update(ev.submodels)
        elif t is BadGather:
            link.bad[ev.kind] += 1
            if len(self.bad_gathers) < 100:
                self.bad_gathers.append({"worker": link.endpoint, "kind": ev.kind, "reason": ev.reason})
            if cur is not None and ev.frame_id == cur["id"] and ev.submodel is not None:
                cur["waiting"][link.endpoint].discard(ev.submodel)
        elif t is LateGather:
            self.late_gathers += 1
        elif t is Welcomed:
            link.state, link.refusal = "live", None
        elif t is Refused and ev.rid is None or t is HandshakeFailed:
            msg = ev.message if t is HandshakeFailed else f"{ev.code.name}: {ev.message}"
            if link.refusal != msg:
                self.refusals.append({"worker": link.endpoint, "message": msg})
            link.state, link.refusal = "refused", msg
        elif t is Lost or t is TimedOut:
            if t is Lost:
                link.state = "handshaking"
            if cur is not None:
                ids = [r.rid for r in ev.requests] if t is Lost else [ev.rid]
                if cur["id"] in ids:
                    cur["waiting"][link.endpoint] = set()

    # -- frames --------------------------------------------------------------------------------
    def _input_for(self, link: WorkerLink, frame: dict) -> tuple[str, dict, Any]:
        use_jpeg = frame["jpeg_hw"] is not None and link.session.scatter_jpeg
        if use_jpeg and self.scatter_input == "auto":
            tensor_bytes = int(np.prod(self.bundle.input_shape)) * (2 if self.tensor_dtype == "float16" else 4)
            use_jpeg = len(frame["data"]) * AUTO_JPEG_RATIO <= tensor_bytes
        if use_jpeg:
            h, w = frame["jpeg_hw"]
            return "jpeg", S.jpeg_descriptor(len(frame["data"]), h, w), frame["data"]
        if frame["tensor_msg"] is None:
            x = self._tensor(frame)
            frame["tensor_msg"] = encode_float(x, name=self.input_name, dtype=self.tensor_dtype)
        desc, payload = frame["tensor_msg"]
        return "tensor", desc, payload

    def _tensor(self, frame: dict) -> np.ndarray:
        if frame["x"] is None:
            frame["x"] = preprocess(frame["data"], self.bundle.input_spec)
        return frame["x"]

    def infer(self, sample: Sample) -> EdvitAnswer:
        """Scatter one frame, gather until done or its cut-off, fuse, answer."""
        t0 = time.perf_counter_ns()
        deadline = t0 + int(self.budget_ms * 1e6)  # T
        # the gather cut-off: T, less the fused request's round trip when the server fuses
        fused_rtt_ms = 0.0 if self.server is None or not self.server.live else self.server.rtt_ms
        cutoff = deadline - int(min(fused_rtt_ms, self.budget_ms / 2) * 1e6)
        fid = self._next_frame
        self._next_frame += 1
        data = sample.data
        jpeg_hw = jpeg_size(data) if self.scatter_input != "tensor" else None
        frame: dict[str, Any] = {"data": data, "jpeg_hw": jpeg_hw, "x": None, "tensor_msg": None}
        plan: dict[str, list[int]] = {}
        for sid in sorted(self.bundle.submodels):
            for link in self.links:
                if link.session.live and sid in link.session.worker_submodels:
                    plan.setdefault(link.endpoint, []).append(sid)
                    break
        cur: dict[str, Any] = {"id": fid, "features": {}, "waiting": {}, "t_sent": {}, "workers": {}}
        self._current = cur
        inputs: dict[str, str] = {}
        bytes_out = 0
        for link in self.links:
            sids = plan.get(link.endpoint)
            if not sids:
                continue
            how, desc, payload = self._input_for(link, frame)
            now = time.perf_counter_ns()
            deadline_ms = max(0.0, (cutoff - now) / 1e6 - link.return_ms)
            parts = link.session.scatter(fid, deadline_ms, sids, desc, payload, now)
            link.conn.send(parts)
            bytes_out += sum(memoryview(p).nbytes for p in parts)
            inputs[link.endpoint] = how
            cur["waiting"][link.endpoint] = set(sids)
            cur["t_sent"][link.endpoint] = time.perf_counter_ns()
        t_scattered = time.perf_counter_ns()
        while any(cur["waiting"].values()):
            left = (cutoff - time.perf_counter_ns()) / 1e9
            if left <= 0:
                break
            self._pump(min(left, 0.005))
        for link in self.links:
            if cur["waiting"].get(link.endpoint):
                link.session.abandon(fid)
        self._current = None
        t_fuse = time.perf_counter_ns()
        feats = cur["features"]
        used = sorted(feats)
        fallback, fused_on = None, None
        by_server = self.server.fuse(feats, deadline) if feats and self.server is not None else None
        logits: np.ndarray | None
        if by_server is not None:
            (logits, used), fused_on = by_server, "server"
        elif feats:
            logits, fused_on = self.fusion(feats), "camera"
        elif self.local is not None:
            logits, fallback = np.asarray(self.local.run(None, {"input": self._tensor(frame)[None]})[0][0]), "local"
        else:
            logits, fallback = None, "none"
        t_end = time.perf_counter_ns()
        return EdvitAnswer(
            frame=fid,
            key=sample.key,
            label=sample.label,
            logits=logits,
            used=used,
            missing=[s for s in sorted(self.bundle.submodels) if s not in used],
            fallback=fallback,
            fused_on=fused_on,
            inputs=inputs,
            bytes_out=bytes_out,
            bytes_in=sum(f.size for f in feats.values()) * (2 if self.bundle.features_dtype == "float16" else 4),
            stages_ms={
                "scatter": (t_scattered - t0) / 1e6,
                "gather": (cur.get("t_gathered", t_fuse) - t_scattered) / 1e6,
                "fusion": (t_end - t_fuse) / 1e6,
                "e2e": (t_end - t0) / 1e6,
            },
            workers=cur["workers"],
        )

    def worker_report(self) -> list[dict[str, Any]]:
        """Per worker: state, refusal, gathers, errors by code, bad gathers by kind, late gathers."""
        return [
            {
                "worker": link.endpoint,
                "state": link.state,
                "refusal": link.refusal,
                "submodels": list(link.session.worker_submodels),
                "gathers": link.gathers,
                "errors": dict(link.errors),
                "bad_gathers": dict(link.bad),
                "late_gathers": link.session.late_gathers,
                "link_losses": link.session.link_losses,
            }
            for link in self.links
        ]
