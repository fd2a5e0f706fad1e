"""The deploy agent: frames -> preprocess -> head (ONNX Runtime) -> encode -> server -> logits.

This module runs on the device and must never import torch (a test checks it in a fresh
interpreter). It uses one DEALER socket from one thread; ``Agent`` is not thread-safe.

In-process use::

    agent = Agent(bundle, "tcp://127.0.0.1:5555", inflight=8).connect()
    r = agent.infer(sample)                 # one frame, synchronous -> FrameResult
    for r in agent.run("cifar10:test", 100):  # streaming, up to `inflight` requests outstanding
        print(r.to_json())
    agent.close()

Requests go out **compact** (protocol v1.1: header ``{v, kind, id, mode[, deadline_ms]}``, no
tensor descriptor, 27-31 bytes instead of ~130) when the server's welcome lists
``"compact_requests"`` and the frame is the mode's default encoding (raw codec, all the mode's
channels, one row); otherwise, and to v1.0 servers, as full requests.

Every frame ends as exactly one :class:`FrameResult`: with ``pred`` set, or with ``error`` set to
the server's error name (or ``TIMEOUT`` / ``DISCONNECTED`` for failures seen on the agent side).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import zmq

from ..bundle import Bundle, BundleError, Mode
from ..wire import codec, protocol as P
from ..wire.codec import ErrorCode, WireError
from ..wire.protocol import Kind, ProtocolError
from ..wire.transport import connect_dealer, context, default_agent_name, pending_in, recv_parts, send_parts

# Plain ints: pyzmq's enum constants cost an enum construction per use on the hot path.
_NOBLOCK, _RCVTIMEO = int(zmq.NOBLOCK), int(zmq.RCVTIMEO)
_END = object()  # end of a frame source
# Client-side timeouts and heartbeats are checked at most this often (they are seconds long).
_CHECK_EVERY_NS = 5_000_000

# Agent-side failure names (not wire codes: the server never sends them).
TIMEOUT = "TIMEOUT"
DISCONNECTED = "DISCONNECTED"


class AgentError(Exception):
    """The agent cannot work at all (handshake refused, no server, bad bundle). ``code`` is the
    server's ErrorCode when the server said so, else None."""

    def __init__(self, message: str, code: ErrorCode | None = None):
        super().__init__(message)
        self.code = code


@dataclass
class FrameResult:
    id: int
    key: str
    label: int | None = None
    mode: int = 0
    head_ms: float = 0.0
    encode_ms: float = 0.0
    bytes_sent: int = 0          # tensor payload bytes on the wire
    header_bytes: int = 0        # msgpack header bytes of the request
    rtt_ms: float | None = None  # send -> result received (includes server time)
    server_queue_ms: float | None = None
    server_compute_ms: float | None = None
    server_ms: float | None = None  # server receive -> reply sent
    batch_size: int | None = None
    pred: int | None = None
    logits: np.ndarray | None = field(default=None, repr=False)
    error: str | None = None        # error name (ErrorCode name, TIMEOUT or DISCONNECTED)
    error_code: int | None = None   # ErrorCode value when the server sent the error
    error_message: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        def r(v):
            return None if v is None else round(float(v), 4)

        d = {"id": self.id, "key": self.key, "mode": self.mode, "head_ms": r(self.head_ms), "encode_ms": r(self.encode_ms),
             "bytes_sent": self.bytes_sent, "header_bytes": self.header_bytes, "rtt_ms": r(self.rtt_ms),
             "server_queue_ms": r(self.server_queue_ms), "server_compute_ms": r(self.server_compute_ms),
             "server_ms": r(self.server_ms), "batch_size": self.batch_size, "pred": self.pred, "label": self.label}
        if self.error is not None:
            d.update(error=self.error, error_code=self.error_code, error_message=self.error_message)
        return d


@dataclass
class _Pending:
    result: FrameResult
    parts: list          # the request as sent (header bytes + payload), kept for one resend
    t_send_ns: int
    resent: bool = False
    compact: bool = False            # sent as a v1.1 compact request (no 'tensors' in the header)
    desc: dict | None = None         # its descriptor, to rebuild a full request for a resend
    deadline_ms: float | int | None = None


class Agent:
    """One agent session with one server for one bundle."""

    def __init__(self, bundle: Bundle | str | Path, server: str = "tcp://127.0.0.1:5555", *,
                 mode: int | None = None, codec: str = "raw", inflight: int = 8, deadline_ms: float | None = None,
                 threads: int | None = None, name: str | None = None, timeout_s: float = 10.0,
                 load_head: bool = True, ctx: zmq.Context | None = None):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
        self.server = server
        self.mode: Mode = self.bundle.default_mode if mode is None else self.bundle.mode(mode)
        if codec not in ("raw", "zstd", "auto"):
            raise ValueError(f"codec must be raw, zstd or auto, got {codec!r}")
        self.codec = codec
        self.inflight = max(1, int(inflight))
        self.deadline_ms = deadline_ms
        self.timeout_s = float(timeout_s)
        self.name = name or default_agent_name()
        self.wire_name = self.bundle.wire_spec["name"]
        # v1.1: the descriptor each mode implies in a compact request. A frame whose descriptor
        # equals it (raw codec, all the mode's channels, one row) goes out compact when the
        # server's welcome allows it; anything else goes out as a full request.
        self._implicit = {m.id: P.compact_descriptor(self.wire_name, self.bundle.wire_spec["shape"], m)
                          for m in self.bundle.modes}
        # What a full request's header costs over a compact one's: the "tensors" key and its
        # descriptor. With --codec auto and compact requests, zstd must save more than this.
        self._full_extra = {mid: len(P.pack_header({"tensors": [dict(d, codec="zstd")]})) - 1
                            for mid, d in self._implicit.items()}
        self.compact_requests = False  # the server's latest welcome listed "compact_requests"
        self.head = None
        if load_head:
            from ..engine import create_engine

            self.head = create_engine(self.bundle.file("head"), backend="ort", threads=threads)
        self._ctx = ctx or context()
        self._sock: zmq.Socket | None = None
        self._rcvtimeo = -1
        self._limits = P.DEFAULT_LIMITS
        self.welcome: dict[str, Any] | None = None
        self.credits = 0
        self.heartbeat_ms = 0
        self._next_id = 1
        self._pending: dict[int, _Pending] = {}
        self._done: deque[FrameResult] = deque()
        self._resend_after_welcome: list[int] = []
        self._handshaking = False
        self._last_send = 0.0
        self._last_recv = 0.0
        self._next_check_ns = 0
        self._ping_nonce = 0
        self.server_bye: str | None = None
        self.connection_errors: list[tuple[str, str]] = []  # (name, message) of errors without a request id

    # -- connection ----------------------------------------------------------------------------
    @property
    def window(self) -> int:
        """Requests allowed in flight: the agent's own limit bounded by the server's credits."""
        return max(1, min(self.inflight, self.credits or self.inflight))

    def connect(self, timeout_s: float | None = None) -> "Agent":
        """Open the socket and handshake. Raises AgentError (with the server's code) on refusal or
        when no welcome arrives within ``timeout_s`` (default: the agent's timeout)."""
        if self._sock is None:
            self._sock = connect_dealer(self.server, ctx=self._ctx)
            self._rcvtimeo = -1
        self._send_hello()
        end = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        n_err = len(self.connection_errors)
        while self._handshaking:
            left = end - time.monotonic()
            if left <= 0:
                self.close(bye=False)
                raise AgentError(f"no welcome from {self.server} within {timeout_s or self.timeout_s:.1f} s "
                                 "(is the server running and reachable?)")
            self._pump(left)
            if len(self.connection_errors) > n_err:
                name, message = self.connection_errors[-1]
                self.close(bye=False)
                code = ErrorCode[name] if name in ErrorCode.__members__ else None
                raise AgentError(f"server refused the handshake: {name}: {message}", code)
        return self

    def _send_hello(self) -> None:
        self._handshaking = True
        self._raw_send(P.pack(P.hello(self.bundle.hash, self.name, codecs=codec.supported_codecs(),
                                      max_inflight=self.inflight)))

    def close(self, bye: bool = True) -> None:
        """Say bye (when connected) and close the socket. Outstanding requests are failed."""
        if self._sock is None:
            return
        if bye and self.welcome is not None:
            try:
                self._sock.send_multipart(P.pack(P.bye("agent closing")), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        for rid in list(self._pending):
            self._fail(rid, DISCONNECTED, None, "agent closed with the request outstanding")
        self._sock.close(linger=200 if bye else 0)
        self._sock = None
        self.welcome = None

    def __enter__(self) -> "Agent":
        return self.connect() if self.welcome is None else self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- frames -> tensors ---------------------------------------------------------------------
    def head_tensor(self, data: bytes) -> tuple[np.ndarray, float]:
        """Encoded image -> head output ``[C,h,w]`` float32, and the preprocess+head time in ms."""
        from ..data.transforms import preprocess

        if self.head is None:
            raise AgentError("this agent was made with load_head=False")
        t0 = time.perf_counter()
        x = preprocess(data, self.bundle.input_spec)[None]
        z = self.head.run1(x)
        return z[0], (time.perf_counter() - t0) * 1e3

    # -- sending -------------------------------------------------------------------------------
    def _raw_send(self, parts: list) -> None:
        send_parts(self._sock, parts)  # small frames are copied, large ones zero-copy (copy_threshold)
        self._last_send = time.monotonic()

    def send_tensor(self, z: np.ndarray, *, key: str = "", label: int | None = None, mode: int | None = None,
                    deadline_ms: float | None = None, head_ms: float = 0.0) -> int:
        """Encode a head output (``[C,h,w]`` or ``[N,C,h,w]``) and send it, waiting first while the
        window is full. Returns the request id. The result comes from :meth:`poll`/:meth:`results`."""
        if self._sock is None:
            raise AgentError("not connected: call connect() first")
        if self.welcome is None and not self._handshaking:
            # The server said bye (restart, shutdown): handshake again; this request goes out
            # after welcome, or ends as TIMEOUT if no server answers.
            self._send_hello()
        while len(self._pending) >= self.window:
            self._pump(self._wait_budget())
        m = self.mode if mode is None else self.bundle.mode(mode)
        t0 = time.perf_counter()
        margin = self._full_extra.get(m.id, 0) if self.compact_requests and self.codec == "auto" else 0
        desc, payload = codec.encode(z, m, codec=self.codec, name=self.wire_name, auto_margin=margin)
        encode_ms = (time.perf_counter() - t0) * 1e3
        rid = self._next_id
        self._next_id += 1
        deadline = P.wire_number(self.deadline_ms if deadline_ms is None else deadline_ms)
        # Compact (v1.1) when the server accepts it and the frame is the mode's default encoding.
        # No t_send_ns: the agent keeps its send time in _Pending, the echo would carry nothing.
        compact = self.compact_requests and desc == self._implicit.get(m.id)
        header = P.pack_header(P.request(rid, m.id, None if compact else [desc], deadline_ms=deadline))
        parts = [header, payload]
        handshaking = self._handshaking
        t_send = time.perf_counter_ns()
        if not handshaking:
            self._raw_send(parts)  # first, so the bookkeeping below overlaps the round trip
        res = FrameResult(id=rid, key=key, label=label, mode=m.id, head_ms=head_ms, encode_ms=encode_ms,
                          bytes_sent=len(payload), header_bytes=len(header))
        self._pending[rid] = _Pending(res, parts, t_send, compact=compact, desc=desc, deadline_ms=deadline)
        if handshaking:  # re-handshake in progress: the request goes out after welcome
            self._resend_after_welcome.append(rid)
        return rid

    def submit(self, sample, *, mode: int | None = None, deadline_ms: float | None = None) -> int:
        """Run the head on one sample (``Sample``, or encoded image bytes) and send it."""
        data, key, label = (sample.data, sample.key, sample.label) if hasattr(sample, "data") else (sample, "", None)
        z, head_ms = self.head_tensor(data)
        return self.send_tensor(z, key=key, label=label, mode=mode, deadline_ms=deadline_ms, head_ms=head_ms)

    def infer(self, sample, *, mode: int | None = None, deadline_ms: float | None = None) -> FrameResult:
        """One frame, synchronously: head, send, wait for its result (or error, or timeout)."""
        rid = self.submit(sample, mode=mode, deadline_ms=deadline_ms)
        return self.wait_for(rid)

    def wait_for(self, rid: int) -> FrameResult:
        while True:
            for i, r in enumerate(self._done):
                if r.id == rid:
                    del self._done[i]
                    return r
            if rid not in self._pending:
                raise KeyError(f"request {rid} is not outstanding")
            self._pump(self._wait_budget())

    def poll(self, timeout_s: float = 0.0) -> list[FrameResult]:
        """Process what has arrived (waiting up to ``timeout_s`` for something) and return the
        frames completed since the last call."""
        if not self._done:
            self._pump(timeout_s)
        out = list(self._done)
        self._done.clear()
        return out

    def drain(self) -> Iterator[FrameResult]:
        """Yield results until nothing is outstanding."""
        while self._pending or self._done:
            yield from self.poll(self._wait_budget())

    def run(self, source: str | Iterable, n: int | None = None, *, mode: int | None = None,
            deadline_ms: float | None = None) -> Iterator[FrameResult]:
        """Stream frames from ``source`` (a source spec such as ``cifar10:test``, or an iterable of
        samples) with up to :attr:`window` requests outstanding; yields results as they complete.

        The next frame is read and its head run only once a window slot is free: a result is then
        taken off the socket (and yielded) as soon as it arrives instead of after a head computed
        in the meantime, so ``rtt_ms`` is the round trip rather than round trip plus the agent's
        own busy time (what link estimation needs), and each frame is as fresh as it can be when
        sent (what a live camera needs)."""
        from ..data.sources import open_source, take

        it = open_source(source, self.bundle.classes) if isinstance(source, str) else iter(source)
        frames = iter(take(it, n))
        while True:
            yield from self.poll(0.0)
            while len(self._pending) >= self.window:
                yield from self.poll(self._wait_budget())
            sample = next(frames, _END)
            if sample is _END:
                break
            self.submit(sample, mode=mode, deadline_ms=deadline_ms)
        yield from self.drain()

    # -- receiving -----------------------------------------------------------------------------
    def _wait_budget(self) -> float:
        """How long one blocking wait may last before timeouts and heartbeats are re-checked."""
        hb = self.heartbeat_ms / 1000.0 if self.heartbeat_ms else 1.0
        return max(0.001, min(hb, self.timeout_s, 1.0))

    def _pump(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for incoming messages, handle all that are there, then check
        client-side timeouts and heartbeats."""
        sock = self._sock
        if sock is None:
            raise AgentError("not connected")
        # A blocking receive with a timeout: returns at once when something is queued (cheaper
        # than asking first and then receiving).
        ms = max(0, int(timeout_s * 1000))
        try:
            if ms == 0:
                if not pending_in(sock):
                    self._check_timeouts()
                    return
                parts = recv_parts(sock, _NOBLOCK)
            else:
                if ms != self._rcvtimeo:
                    sock.setsockopt(_RCVTIMEO, ms)
                    self._rcvtimeo = ms
                parts = recv_parts(sock)
        except zmq.Again:
            self._check_timeouts()
            return
        self._handle(parts)
        while pending_in(sock):
            self._handle(recv_parts(sock, _NOBLOCK))
        if time.perf_counter_ns() >= self._next_check_ns:
            self._check_timeouts()

    def _handle(self, parts: list) -> None:
        self._last_recv = time.monotonic()
        try:
            msg = P.parse(parts, self._limits)
        except ProtocolError as e:  # the server sent garbage: note it and keep going
            self.connection_errors.append((e.code.name, f"bad message from server: {e.message}"))
            return
        self._dispatch(msg)

    def _dispatch(self, msg: P.Message) -> None:
        h = msg.header
        kind = msg.kind
        if kind == Kind.RESULT:
            self._on_result(msg)
        elif kind == Kind.ERROR:
            rid, name = h.get("id"), h["name"]
            if rid is None or rid not in self._pending:
                # Not about a request we hold: a handshake refusal (connect() raises it) or the
                # server's answer to something else we sent.
                self.connection_errors.append((name, h["message"]))
                return
            p = self._pending[rid]
            if h["code"] == ErrorCode.NOT_READY and not p.resent:
                # The server lost our session (restart, reconnect, expiry): handshake again and
                # resend the request once.
                p.resent = True
                self._resend_after_welcome.append(rid)
                if not self._handshaking:
                    self._send_hello()
                return
            if h["code"] == ErrorCode.MALFORMED and p.compact:
                # A compact request refused as malformed: the peer does not take compact requests
                # after all (e.g. a v1.0 server took over the endpoint without a bye, and v1.0
                # wants 'tensors' before it even looks at the session). Stop sending compact ones
                # until a welcome offers them again, and resend this one once in full.
                self.compact_requests = False
                self._make_full(p)
                if self._handshaking:
                    self._resend_after_welcome.append(rid)
                else:
                    p.t_send_ns = time.perf_counter_ns()
                    self._raw_send(p.parts)
                return
            self._fail(rid, name, h["code"], h["message"])
        elif kind == Kind.WELCOME:
            if h["bundle"] != self.bundle.hash:
                self.connection_errors.append(("UNKNOWN_BUNDLE", f"welcome names bundle {h['bundle'][:16]}..."))
                return
            self.welcome = h
            self.compact_requests = P.FEATURE_COMPACT_REQUESTS in (h.get("features") or ())
            self.credits = h["credits"]
            self.heartbeat_ms = h["heartbeat_ms"]
            lim = h["limits"]
            self._limits = P.Limits(max_header_bytes=max(lim["max_header_bytes"], P.DEFAULT_LIMITS.max_header_bytes),
                                    max_frame_bytes=max(lim["max_frame_bytes"], P.DEFAULT_LIMITS.max_frame_bytes),
                                    max_frames=max(lim["max_frames"], P.DEFAULT_LIMITS.max_frames),
                                    max_batch=lim["max_batch"])
            self._handshaking = False
            self.server_bye = None
            resend, self._resend_after_welcome = self._resend_after_welcome, []
            for rid in resend:
                p = self._pending.get(rid)
                if p is not None:
                    if p.compact and not self.compact_requests:
                        # Built as compact for a server that no longer offers it (say, an older
                        # server came back on this endpoint): send the full form instead.
                        self._make_full(p)
                    p.t_send_ns = time.perf_counter_ns()
                    self._raw_send(p.parts)
        elif kind == Kind.PING:
            self._raw_send(P.pack(P.pong(h["nonce"], time.time_ns())))
        elif kind == Kind.PONG:
            pass
        elif kind == Kind.BYE:
            self.server_bye = h.get("reason") or "bye"
            self.welcome = None
            for rid in list(self._pending):
                self._fail(rid, ErrorCode.SHUTTING_DOWN.name, int(ErrorCode.SHUTTING_DOWN), f"server said bye: {self.server_bye}")

    @staticmethod
    def _make_full(p: _Pending) -> None:
        """Turn a pending compact request into the equivalent full request (same id, payload)."""
        header = P.pack_header(P.request(p.result.id, p.result.mode, [p.desc], deadline_ms=p.deadline_ms))
        p.parts = [header, *p.parts[1:]]
        p.compact = False
        p.result.header_bytes = len(header)

    def _on_result(self, msg: P.Message) -> None:
        h = msg.header
        p = self._pending.pop(h["id"], None)
        if p is None:  # a late answer to a request we already gave up on
            return
        r = p.result
        r.rtt_ms = (time.perf_counter_ns() - p.t_send_ns) / 1e6
        t = h["timing"]
        r.server_queue_ms = t["queue_us"] / 1e3
        r.server_compute_ms = t["compute_us"] / 1e3
        r.server_ms = t["server_us"] / 1e3
        r.batch_size = t["batch_size"]
        try:
            # parse() has checked the descriptor against its frame already
            logits = codec.decode(h["outputs"][0], msg.frames[0], validate=False)
        except (WireError, IndexError, KeyError, TypeError, ValueError) as e:
            r.error, r.error_code, r.error_message = "MALFORMED", int(ErrorCode.MALFORMED), f"result undecodable: {e}"
        else:
            r.logits = logits
            r.pred = int(logits.argmax()) if logits.ndim == 1 else None
        self._done.append(r)

    def _fail(self, rid: int, name: str, code: int | None, message: str) -> None:
        p = self._pending.pop(rid, None)
        if p is None:
            return
        r = p.result
        r.error, r.error_code, r.error_message = name, code, message
        self._done.append(r)

    def _check_timeouts(self) -> None:
        now_ns = time.perf_counter_ns()
        self._next_check_ns = now_ns + _CHECK_EVERY_NS
        limit = int(self.timeout_s * 1e9)
        for rid, p in list(self._pending.items()):
            if now_ns - p.t_send_ns > limit:
                self._fail(rid, TIMEOUT, None, f"no answer from {self.server} within {self.timeout_s:.1f} s")
        if self.heartbeat_ms and self.welcome is not None:
            now = time.monotonic()
            if now - max(self._last_send, self._last_recv) > self.heartbeat_ms / 1000.0:
                self._ping_nonce += 1
                self._raw_send(P.pack(P.ping(self._ping_nonce, time.time_ns())))


# ---------------------------------------------------------------------------------------------
# Summary and CLI


def _pct(values: list[float], q: float) -> float | None:
    return None if not values else round(float(np.percentile(np.asarray(values, np.float64), q)), 4)


def summarize(results: list[FrameResult], wall_s: float | None = None) -> dict[str, Any]:
    """Aggregate per-frame results: accuracy, bytes, latency percentiles, errors by name."""
    ok = [r for r in results if r.ok]
    labelled = [r for r in ok if r.label is not None and r.pred is not None]
    s: dict[str, Any] = {
        "frames": len(results),
        "ok": len(ok),
        "accuracy": None if not labelled else round(sum(r.pred == r.label for r in labelled) / len(labelled), 4),
        "bytes_per_frame_median": _pct([r.bytes_sent for r in results], 50),
        "header_bytes_median": _pct([r.header_bytes for r in results], 50),
        "rtt_ms_p50": _pct([r.rtt_ms for r in ok], 50),
        "rtt_ms_p95": _pct([r.rtt_ms for r in ok], 95),
        "head_ms_p50": _pct([r.head_ms for r in results], 50),
        "encode_ms_p50": _pct([r.encode_ms for r in results], 50),
        "server_queue_ms_p50": _pct([r.server_queue_ms for r in ok], 50),
        "server_compute_ms_p50": _pct([r.server_compute_ms for r in ok], 50),
        "batch_size_mean": None if not ok else round(float(np.mean([r.batch_size for r in ok])), 3),
        "errors": dict(Counter(r.error for r in results if not r.ok)),
    }
    if wall_s:
        s["wall_s"] = round(wall_s, 3)
        s["frames_per_s"] = round(len(results) / wall_s, 2)
    return s


def build_parser(prog: str = "edgesplit agent") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Run the edge agent: read frames, run the bundle's head with ONNX Runtime, quantize and "
                    "send the wire tensor to a server daemon, and report one JSON line per frame plus a summary.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--bundle", required=True, metavar="PATH", help="bundle directory or tar (the same one the server loads)")
    p.add_argument("--server", default="tcp://127.0.0.1:5555", help="server endpoint")
    p.add_argument("--source", default="cifar10:test",
                   help="frames: dataset:split, shard file/glob, image folder, image, video, camera:N")
    p.add_argument("--frames", type=int, default=100, help="frames to process (0: the whole source)")
    p.add_argument("--mode", type=int, default=None, help="bundle mode id (unset: the bundle's default mode)")
    p.add_argument("--codec", default="raw", choices=("raw", "zstd", "auto"),
                   help="lossless stage after packing (auto: zstd only when it is smaller)")
    p.add_argument("--inflight", type=int, default=8, help="most requests outstanding (also bounded by server credits)")
    p.add_argument("--deadline-ms", type=float, default=None,
                   help="per-request deadline the server enforces (relative to its receipt)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads for the head (unset: ORT's default)")
    p.add_argument("--timeout-s", type=float, default=10.0, help="give up on a request (and the handshake) after this")
    p.add_argument("--name", default=None, help="agent name sent in hello (unset: host:pid)")
    p.add_argument("--json-lines", nargs="?", const="-", default=None, metavar="FILE|-",
                   help="write one JSON line per frame and a final {\"summary\": ...} line to FILE or stdout")
    return p


def agent_main(args_list: list[str] | None = None) -> int:
    """Run the agent CLI. Exit codes: 0 done, 1 could not run (bundle, server, source), 3 every frame failed."""
    args = build_parser().parse_args(args_list)
    out = None
    try:
        agent = Agent(args.bundle, args.server, mode=args.mode, codec=args.codec, inflight=args.inflight,
                      deadline_ms=args.deadline_ms, threads=args.threads, name=args.name, timeout_s=args.timeout_s)
        agent.connect()
    except (AgentError, BundleError, OSError, ValueError) as e:
        print(f"edgesplit agent: {e}", file=sys.stderr)
        return 1
    if args.json_lines == "-":
        out = sys.stdout
    elif args.json_lines:
        out = open(args.json_lines, "w")
    results: list[FrameResult] = []
    t0 = time.perf_counter()
    try:
        for r in agent.run(args.source, args.frames or None):
            results.append(r)
            if out is not None:
                out.write(json.dumps(r.to_json()) + "\n")
    except KeyboardInterrupt:
        print("edgesplit agent: interrupted", file=sys.stderr)
    except Exception as e:
        print(f"edgesplit agent: {type(e).__name__}: {e}", file=sys.stderr)
        agent.close()
        return 1
    wall = time.perf_counter() - t0
    agent.close()
    summary = summarize(results, wall)
    # the edge plane must not pull torch in: report it, so benchmarks and CI can check
    summary["torch_loaded"] = any(m == "torch" or m.startswith("torch.") for m in sys.modules)
    if out is not None:
        out.write(json.dumps({"summary": summary}) + "\n")
        if out is not sys.stdout:
            out.close()
    human = sys.stderr if out is sys.stdout else sys.stdout
    print(_format_summary(summary, agent), file=human)
    return 3 if results and not summary["ok"] else 0


def _format_summary(s: dict[str, Any], agent: Agent) -> str:
    acc = "n/a" if s["accuracy"] is None else f"{100 * s['accuracy']:.2f}%"
    errs = ", ".join(f"{k}={v}" for k, v in s["errors"].items()) or "none"
    return (f"edgesplit agent: {s['frames']} frames ({s['ok']} ok) via {agent.server}, bundle {agent.bundle.name}, "
            f"mode {agent.mode.id} '{agent.mode.name}'\n"
            f"  accuracy {acc}; bytes/frame median {s['bytes_per_frame_median']} (+ header {s['header_bytes_median']})\n"
            f"  rtt p50 {s['rtt_ms_p50']} ms, p95 {s['rtt_ms_p95']} ms; head p50 {s['head_ms_p50']} ms; "
            f"server queue p50 {s['server_queue_ms_p50']} ms, compute p50 {s['server_compute_ms_p50']} ms\n"
            f"  {s.get('frames_per_s', 'n/a')} frames/s; errors: {errs}")


if __name__ == "__main__":
    sys.exit(agent_main(sys.argv[1:]))
