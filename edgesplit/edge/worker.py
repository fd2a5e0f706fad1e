"""``edgesplit worker``: an ED-ViT worker (docs/PROTOCOL.md §13). One ROUTER socket, the sub-models
of one ED-ViT bundle it holds (ONNX Runtime; edge plane, no torch), and one loop:

- receive every message waiting, parse it with the ``scatter`` feature and hand it to the session
  table (:mod:`edgesplit.edge.scatter_table`), which answers the handshake, pings and refusals and
  turns a valid scatter into one queued run per requested sub-model;
- run the oldest queued sub-model and send its ``gather`` at once (one gather per sub-model, as
  soon as it ran), so a frame's fast sub-model is never held back by a slow one;
- deadline triage before each run: a sub-model that cannot finish by the frame's deadline (the
  deadline passed, or its measured run time does not fit) is answered DEADLINE_EXCEEDED without
  running; a sub-model is never started after the deadline;
- SIGTERM (or SIGINT): drain. New scatters and hellos are refused SHUTTING_DOWN, the queued runs
  are answered, then every session gets a ``bye`` and the process exits 0.

The input is decoded once per frame, when its first sub-model runs: a tensor input (float32,
float16 or uint8 codes) with the codec, a JPEG (feature ``scatter_jpeg``) with the bundle's
preprocessing (section 5 of BUNDLE.md, the same code the camera uses), its size checked against
the descriptor before the scan is decoded.
"""

from __future__ import annotations

import argparse
import io
import json
import signal
import sys
import time
from collections import deque
from typing import Any

import numpy as np
import zmq

from ..bundle import BundleError
from ..data.transforms import normalize_chw, resize_center_crop
from ..wire import protocol as P
from ..wire import scatter_messages as S
from ..wire.codec import decode, encode_float, supported_codecs
from ..wire.errors import ErrorCode, ProtocolError, WireError
from ..wire.transport import bind_router, default_agent_name, pending_in, recv_parts, send_parts
from .scatter_bundle import EdvitBundle, SubModelRunner
from .scatter_session import SCATTER_FEATURES
from .scatter_table import Frame, WorkerTable

_NOBLOCK = int(zmq.NOBLOCK)
_TICK_NS = 20_000_000
EWMA = 0.2  # weight of the newest run in a sub-model's run-time estimate


def jpeg_to_tensor(data: Any, desc: dict, input_spec: dict) -> np.ndarray:
    """A JPEG input -> the bundle's input tensor [3, S, S]. Its size (read from the SOF header,
    before the scan is decoded) must be the descriptor's; raises ValueError otherwise or when it
    does not decode completely."""
    from PIL import Image

    h, w = int(desc["shape"][0]), int(desc["shape"][1])
    img: Any = Image.open(io.BytesIO(bytes(data)))
    if img.format != "JPEG" or img.size != (w, h):
        raise ValueError(f"the image is {img.format} {img.size[1]}x{img.size[0]}, the descriptor says JPEG {h}x{w}")
    img.load()
    if img.mode != "RGB":
        img = img.convert("RGB")
    side = int(input_spec["shape"][-1])
    hwc = np.asarray(resize_center_crop(img, int(input_spec.get("resize", side)), side), dtype=np.uint8)
    return normalize_chw(hwc, input_spec["mean"], input_spec["std"])


class Worker:
    """One worker process's state: socket, sessions, queue, sub-model sessions."""

    def __init__(
        self,
        bundle: EdvitBundle,
        bind: str,
        submodels: list[int] | None = None,
        *,
        threads: int = 1,
        credits: int = 8,
        heartbeat_ms: int = 1000,
        queue_limit: int = 64,
        jpeg: bool = True,
        name: str | None = None,
        limits: P.Limits = P.DEFAULT_LIMITS,
    ):
        self.bundle = bundle
        self.runner = SubModelRunner(bundle, submodels, threads)
        self.features_dtype = bundle.features_dtype
        self.estimate_us = {sid: self._warm_up(sid) for sid in self.runner.ids}
        self.limits = limits
        self.table = WorkerTable(
            bundle.hash,
            self.runner.ids,
            self.runner.input_name,
            bundle.input_shape,
            worker_name=name or f"worker@{default_agent_name()}",
            credits=credits,
            heartbeat_ms=heartbeat_ms,
            limits=limits,
            codecs=supported_codecs(),
            jpeg=jpeg,
            queue_limit=queue_limit,
            estimate_us=lambda sid: self.estimate_us.get(sid, 0.0),
        )
        self.queue: deque[tuple[Frame, int]] = deque()
        self.sock, self.endpoint = bind_router(bind, limits=limits)
        self.draining = False
        self.counts = {"frames": 0, "gathers": 0, "deadline_exceeded": 0, "errors": 0, "bad_inputs": 0}

    def _warm_up(self, sid: int) -> float:
        """One run on zeros: loads the graph and measures a first run-time estimate (us)."""
        x = np.zeros(self.bundle.input_shape, np.float32)
        self.runner.run(sid, x)
        t0 = time.perf_counter_ns()
        self.runner.run(sid, x)
        return (time.perf_counter_ns() - t0) / 1e3

    # -- the loop ------------------------------------------------------------------------------
    def serve(self) -> dict:
        """Run until drained (SIGTERM/SIGINT, or :attr:`draining` set). Returns the counts."""
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        next_tick = 0
        while True:
            if pending_in(self.sock) or poller.poll(0 if self.queue else _TICK_NS // 1_000_000):
                while pending_in(self.sock):
                    self._on_message(recv_parts(self.sock, _NOBLOCK))
            now = time.perf_counter_ns()
            if now >= next_tick:
                next_tick = now + _TICK_NS
                for ident, h in self.table.tick(now):
                    self._send(ident, h)
            if self.queue:
                self._run_one()
            elif self.draining:
                for ident, h in self.table.farewell():
                    self._send(ident, h)
                break
        self.sock.close(linger=500)
        return dict(self.counts)

    def _send(self, identity: bytes, header: dict, frames: tuple = ()) -> None:
        try:
            send_parts(self.sock, [identity, *P.pack(header, frames)], _NOBLOCK)
        except zmq.ZMQError:  # the camera is gone (ROUTER_MANDATORY) or not reading: forget it
            self.table.drop(identity)

    def _on_message(self, parts: list) -> None:
        identity, body = parts[0], parts[1:]
        try:
            msg = P.parse(body, self.limits, SCATTER_FEATURES)
        except ProtocolError as e:
            self.counts["errors"] += 1
            self._send(identity, S.scatter_error(e.req_id, e.code, e.message))
            return
        reply, frame = self.table.receive(identity, msg, time.perf_counter_ns(), self.draining)
        if reply is not None:
            if reply["kind"] == "error":
                self.counts["errors"] += 1
            self._send(identity, reply)
        if frame is not None:
            self.counts["frames"] += 1
            self.queue.extend((frame, sid) for sid in frame.submodels)
            self.table.queued = len(self.queue)

    def _answer(self, frame: Frame, sid: int, header: dict, frames: tuple = ()) -> None:
        frame.answered.add(sid)
        self._send(frame.identity, header, frames)
        if len(frame.answered) == len(frame.submodels):
            self.table.settle(frame.identity)

    def _run_one(self) -> None:
        frame, sid = self.queue.popleft()
        self.table.queued = len(self.queue)
        if sid in frame.answered:
            return
        if frame.identity not in self.table.sessions:  # the camera left: nobody to answer
            frame.answered.add(sid)
            return
        start = time.perf_counter_ns()
        if start + self.estimate_us[sid] * 1e3 > frame.deadline_ns:
            self.counts["deadline_exceeded"] += 1
            left = (frame.deadline_ns - start) / 1e6
            msg = f"sub-model {sid} needs about {self.estimate_us[sid] / 1e3:.1f} ms, {max(0.0, left):.1f} ms were left"
            self._answer(frame, sid, S.scatter_error(frame.frame_id, ErrorCode.DEADLINE_EXCEEDED, msg, sid))
            return
        if frame.tensor is None and not self._decode(frame):
            return
        t_run = time.perf_counter_ns()
        try:
            feats = self.runner.run(sid, frame.tensor)
        except Exception as e:  # an engine failure answers this sub-model, never the process
            self._answer(frame, sid, S.scatter_error(frame.frame_id, ErrorCode.INTERNAL, f"{type(e).__name__}", sid))
            return
        t_done = time.perf_counter_ns()
        compute_us = (t_done - t_run) / 1e3
        self.estimate_us[sid] += EWMA * (compute_us - self.estimate_us[sid])
        sub = self.bundle.submodels[sid]
        desc, payload = encode_float(feats, name=sub.feature_name, dtype=self.features_dtype)
        header = S.gather(
            frame.frame_id,
            sid,
            desc,
            queue_us=(start - frame.t_recv_ns) / 1e3,
            decode_us=frame.decode_us,
            compute_us=compute_us,
            batch_size=1,
            worker_us=(time.perf_counter_ns() - frame.t_recv_ns) / 1e3,
        )
        self.counts["gathers"] += 1
        self._answer(frame, sid, header, (payload,))

    def _decode(self, frame: Frame) -> bool:
        """The frame's input -> its tensor. On failure every sub-model of the frame not yet answered
        is answered MALFORMED (the whole scatter, when none has been)."""
        t0 = time.perf_counter_ns()
        d = frame.desc
        try:
            if d["dtype"] == "jpeg":
                frame.tensor = jpeg_to_tensor(frame.payload, d, self.bundle.input_spec)
            else:
                frame.tensor = decode(d, frame.payload, max_bytes=self.limits.max_frame_bytes)
                frame.decode_us = 0.0 if d["dtype"] == "float32" else (time.perf_counter_ns() - t0) / 1e3
                return True
        except (ValueError, OSError, WireError) as e:
            self.counts["bad_inputs"] += 1
            why = f"the input does not decode: {getattr(e, 'message', e)}"
            if not frame.answered:
                frame.answered.update(frame.submodels)
                self._send(frame.identity, S.scatter_error(frame.frame_id, ErrorCode.MALFORMED, why))
                self.table.settle(frame.identity)
            else:
                for s in frame.submodels:
                    if s not in frame.answered:
                        self._answer(frame, s, S.scatter_error(frame.frame_id, ErrorCode.MALFORMED, why, s))
            return False
        frame.decode_us = (time.perf_counter_ns() - t0) / 1e3
        return True


def _ids(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise SystemExit(f"edgesplit worker: --submodels must be comma-separated integers, got {text!r}") from None


def worker_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="edgesplit worker",
        description="Serve sub-models of an ED-ViT bundle to cameras (PROTOCOL.md §13): one ROUTER, one "
        "gather per sub-model per frame, deadlines triaged, SIGTERM drains.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--bundle", required=True, help="the ED-ViT bundle directory")
    p.add_argument("--bind", default="tcp://127.0.0.1:5560", help="ROUTER endpoint (port 0: a free one)")
    p.add_argument("--submodels", default=None, help="sub-model ids to hold, e.g. 0,1 (default: all)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads per sub-model")
    p.add_argument("--credits", type=int, default=8, help="frames outstanding per camera session")
    p.add_argument("--heartbeat-ms", type=int, default=1000)
    p.add_argument("--queue", type=int, default=64, help="sub-model runs waiting, over all cameras")
    p.add_argument("--no-jpeg", action="store_true", help="do not offer scatter_jpeg (tensor inputs only)")
    args = p.parse_args(argv)
    try:
        bundle = EdvitBundle.load(args.bundle)
        w = Worker(
            bundle,
            args.bind,
            _ids(args.submodels),
            threads=args.threads,
            credits=args.credits,
            heartbeat_ms=args.heartbeat_ms,
            queue_limit=args.queue,
            jpeg=not args.no_jpeg,
        )
    except (BundleError, OSError) as e:
        print(f"edgesplit worker: {e}", file=sys.stderr)
        return 2

    def drain(signum: int, _frame: Any) -> None:
        w.draining = True

    signal.signal(signal.SIGTERM, drain)
    signal.signal(signal.SIGINT, drain)
    ready = {"event": "listening", "endpoint": w.endpoint, "bundle": bundle.hash, "submodels": w.runner.ids}
    print(json.dumps(ready), flush=True)
    counts = w.serve()
    print(json.dumps({"event": "drained", **counts}), flush=True)
    return 0
