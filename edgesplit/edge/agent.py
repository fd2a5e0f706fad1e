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

Every frame ends as exactly one :class:`FrameResult`: a server result (``source="server"``), a
local fallback result (``source="local"``, with ``fallback_reason``), or an error (``error`` set to
the server's error name, or ``TIMEOUT`` / ``DISCONNECTED`` / ``FALLBACK_FAILED`` for failures seen
on the agent side). A late answer to a frame already finished is counted and dropped.

Resilience. libzmq reconnects the TCP link by itself; a socket monitor tells the agent at once when
the connection drops, and a silence deadline (nothing heard for ``min(3 heartbeats, timeout_s)``
with requests outstanding) catches links that hang without dropping. Then the session is lost:
outstanding frames end locally (fallback on) or as ``DISCONNECTED`` / ``TIMEOUT`` errors, and the
agent says ``hello`` again, with exponential backoff and jitter capped at ``reconnect_max_s`` (the
same cap bounds libzmq's reconnect interval), at once when the monitor sees a new connection. With fallback
on (``fallback="auto"`` and a bundle with ``full.onnx``), frames submitted while there is no
session are answered locally, as are frames the server refuses with a "not now" code (OVERLOADED,
DEADLINE_EXCEEDED, SHUTTING_DOWN, INTERNAL, NOT_READY), frames that time out, and, with a
deadline, frames whose recent round trips would not fit it (see ``fallback.RttGuard``). With
fallback off, frames submitted while there is no session wait for the next welcome (up to
``timeout_s``, then ``TIMEOUT``).

Adaptive modes. Given a ``policy`` (:mod:`edgesplit.control.policy`, run through
:class:`~edgesplit.edge.adaptive.ModeController`), each frame's mode is the policy's choice, made
before the head runs (``mode=`` is then ignored), or FALLBACK: the frame is answered by full.onnx
here with fallback_reason ``POLICY``. Every server result feeds the policy's estimators. Switching
modes reloads nothing: a mode is the codec's bits and channels plus, in a slimmable bundle, which
of the heads (one per width, all loaded and warmed at start) runs. The time from decision to
request ready is measured for switches and non-switches (summary ``adapt``).
A policy that can rescue (``Policy.rescue_after_ms``: the deadline-aware one with a local model
fast enough) has every frame it sent answered by full.onnx, fallback_reason ``DEADLINE_RESCUE``,
if the server's answer has not come by then; the late answer is dropped as an answer but still
feeds the policy (summary ``rescues``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import zmq

from ..bundle import Bundle, BundleError, Mode
from ..control.modes import FALLBACK
from ..control.policy import FixedPolicy, Policy, RoundRobinPolicy
from ..engine import EngineError
from ..wire import codec, protocol as P
from ..wire.codec import ErrorCode, WireError
from ..wire.protocol import Kind, ProtocolError
from ..wire.curve import ClientCurve, explain_handshake_failure
from ..wire.transport import connect_dealer, context, default_agent_name, pending_in, recv_parts, send_parts
from . import link
from .adaptive import POLICY, POLICY_KINDS, RESCUE, ModeController, bundle_modes, make_policy, measure_local_ms
from .fallback import FALLBACK_ERROR_CODES, RTT_OVER_DEADLINE, UNREACHABLE, RttGuard, load_fallback
from .link import Backoff, LinkMonitor

# Plain ints: pyzmq's enum constants cost an enum construction per use on the hot path.
_NOBLOCK, _RCVTIMEO = int(zmq.NOBLOCK), int(zmq.RCVTIMEO)
_END = object()  # end of a frame source
# Client-side timeouts and heartbeats are checked at most this often (they are seconds long).
_CHECK_EVERY_NS = 5_000_000
# Longest blocking wait before the link monitor, timeouts and heartbeats are looked at again: it
# bounds how late a dropped connection is noticed while the agent waits for answers.
_LINK_CHECK_S = 0.05

# Agent-side failure names (not wire codes: the server never sends them).
TIMEOUT = "TIMEOUT"
DISCONNECTED = "DISCONNECTED"
FALLBACK_FAILED = "FALLBACK_FAILED"  # the local model itself failed on a frame
# Handshake refusals that a server restart or overload explains: connect() keeps trying through them.
_TRANSIENT_REFUSALS = {ErrorCode.SHUTTING_DOWN.name, ErrorCode.OVERLOADED.name}


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
    error: str | None = None        # error name (ErrorCode name, TIMEOUT, DISCONNECTED or FALLBACK_FAILED)
    error_code: int | None = None   # ErrorCode value when the server sent the error
    error_message: str | None = None
    source: str | None = None           # "server" or "local" (None for an error)
    fallback_reason: str | None = None  # why a local result is local (TIMEOUT, DISCONNECTED, UNREACHABLE, ...)
    local_ms: float | None = None       # time of the local fallback model (plus preprocessing for new frames)
    policy_reason: str | None = None    # with a mode policy: why it chose this frame's mode (or FALLBACK, mode -1)
    predicted_ms: float | None = None   # with a mode policy: its predicted end-to-end latency for the choice

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        def r(v):
            return None if v is None else round(float(v), 4)

        d = {"id": self.id, "key": self.key, "mode": self.mode, "head_ms": r(self.head_ms), "encode_ms": r(self.encode_ms),
             "bytes_sent": self.bytes_sent, "header_bytes": self.header_bytes, "rtt_ms": r(self.rtt_ms),
             "server_queue_ms": r(self.server_queue_ms), "server_compute_ms": r(self.server_compute_ms),
             "server_ms": r(self.server_ms), "batch_size": self.batch_size, "pred": self.pred, "label": self.label,
             "source": self.source, "fallback_reason": self.fallback_reason, "local_ms": r(self.local_ms)}
        if self.policy_reason is not None:
            d.update(policy_reason=self.policy_reason, predicted_ms=r(self.predicted_ms))
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
    fallback_input: np.ndarray | None = None  # the preprocessed image, kept while fallback is on
    rescue_ns: int | None = None     # answer locally at this perf_counter_ns if still unanswered (policy rescue)


class _InFlight:
    """Request ids still on the link as the mode policy sees them: pending, or rescued (answered
    locally) with the server's answer still to come."""

    def __init__(self, agent: "Agent"):
        self.agent = agent

    def __contains__(self, rid: object) -> bool:
        return rid in self.agent._pending or rid in self.agent._rescued


class Agent:
    """One agent session with one server for one bundle."""

    def __init__(self, bundle: Bundle | str | Path, server: str = "tcp://127.0.0.1:5555", *,
                 mode: int | None = None, codec: str = "raw", inflight: int = 8, deadline_ms: float | None = None,
                 threads: int | None = None, name: str | None = None, timeout_s: float = 10.0,
                 load_head: bool = True, ctx: zmq.Context | None = None, fallback: str = "off",
                 reconnect_max_s: float = 0.5, server_key: str | Path | None = None,
                 client_key: str | Path | None = None, policy: Policy | None = None,
                 policy_deadline_ms: float | None = None, base_rtt_ms: float | None = None):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
        # CURVE (edgesplit/wire/curve.py): the server's public key and this agent's secret key.
        if (server_key is None) != (client_key is None):
            raise ValueError("CURVE needs both server_key (the server's public key) and client_key (this agent's secret key)")
        self.curve = None if server_key is None else ClientCurve.load(server_key, client_key)
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
        self.heads: dict = {}  # file role -> engine: every head a mode runs (slimmable: one per width)
        if load_head:
            from ..engine import create_engine

            x0 = np.zeros((1, *self.bundle.input_spec["shape"]), np.float32)
            for role in dict.fromkeys(["head", *self.bundle.head_roles]):
                self.heads[role] = create_engine(self.bundle.file(role), backend="ort", threads=threads)
                # One run now: ORT's first run allocates and plans, which must not land on the
                # first frame after a switch to this width.
                self.heads[role].run1(x0)
            self.head = self.heads["head"]
        # Local fallback: the bundle's full model, or None when off (or the bundle has none).
        self.fallback = load_fallback(self.bundle, fallback, threads)
        self._rtt_guard = RttGuard()
        # Mode policy (edgesplit/control): per frame, which mode to send, or FALLBACK (answered by
        # full.onnx here, fallback_reason POLICY). It replaces the RTT guard: it predicts latency itself.
        if policy is not None and self.fallback is None and not isinstance(policy, (FixedPolicy, RoundRobinPolicy)):
            raise ValueError(f"policy {policy.name} may answer frames locally: it needs fallback='auto' and a bundle "
                             "with full.onnx")
        self.controller = None if policy is None else ModeController(policy, base_rtt_ms)
        # The end-to-end deadline the policy plans for (capture to answer); unset: the request's
        # deadline_ms (which the server enforces from its receipt, a different clock start).
        self.policy_deadline_ms = policy_deadline_ms
        self._probes: set[int] = set()  # ids of link probes the policy asked for: their results only feed it
        if reconnect_max_s <= 0:
            raise ValueError(f"reconnect_max_s must be positive, got {reconnect_max_s}")
        self.reconnect_max_s = float(reconnect_max_s)
        self._hello_backoff = Backoff(min(0.05, self.reconnect_max_s), self.reconnect_max_s)
        self._monitor: LinkMonitor | None = None
        self._link_connected = False  # per the socket monitor (or a welcome)
        self._hello_in_pipe = False   # a hello sent while disconnected: libzmq sends it on connect
        self._next_hello_ns = 0
        self._lost = False            # the session was lost and no welcome has come since
        self.link_losses = 0          # sessions lost: connection dropped, server silent, or bye
        self.reconnects = 0           # sessions re-established after a loss
        self.late_answers = 0         # results/errors for frames already finished (timed out, local)
        self._rescued: dict[int, _Pending] = {}  # rescued frames whose server answer may still come
        self.rescues = 0
        self._next_rescue_ns: int | None = None
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
        self._last_send_ns = 0
        self._last_recv_ns = 0
        self._next_check_ns = 0
        self._ping_nonce = 0
        self.server_bye: str | None = None
        # (name, message) of errors without a request id, the latest ones: a background re-handshake
        # against a server that keeps refusing must not grow memory without bound.
        self.connection_errors: deque[tuple[str, str]] = deque(maxlen=64)
        self._connection_errors_total = 0

    # -- connection ----------------------------------------------------------------------------
    @property
    def window(self) -> int:
        """Requests allowed in flight: the agent's own limit bounded by the server's credits."""
        return max(1, min(self.inflight, self.credits or self.inflight))

    @property
    def in_flight(self) -> int:
        """Frames handed to the server path and not finished yet (sent, or held for a welcome)."""
        return len(self._pending)

    def connect(self, timeout_s: float | None = None) -> "Agent":
        """Open the socket and handshake. Raises AgentError (with the server's code) when the
        server refuses the handshake, and when no welcome arrives within ``timeout_s`` (default:
        the agent's timeout) unless local fallback is on: then it returns without a session, frames
        are answered locally, and the agent keeps saying hello until a server welcomes it."""
        if self._sock is None:
            self._sock = connect_dealer(self.server, ctx=self._ctx, curve=self.curve,
                                        reconnect_ivl_max_ms=max(1, round(self.reconnect_max_s * 1000)))
            self._rcvtimeo = -1
            self._monitor = LinkMonitor(self._sock)
            self._link_connected = False
        self._send_hello()
        wait_s = self.timeout_s if timeout_s is None else timeout_s
        end = time.monotonic() + wait_s
        seen = self._connection_errors_total
        while self._handshaking:
            left = end - time.monotonic()
            if left <= 0:
                if self.fallback is not None:
                    return self
                self.close(bye=False)
                raise AgentError(f"no welcome from {self.server} within {wait_s:.1f} s "
                                 "(is the server running and reachable?)")
            self._pump(min(left, self._wait_budget()))
            new = self._connection_errors_total - seen
            for name, message in list(self.connection_errors)[-new:] if new else ():
                if name not in _TRANSIENT_REFUSALS:
                    self.close(bye=False)
                    code = ErrorCode[name] if name in ErrorCode.__members__ else None
                    raise AgentError(f"server refused the handshake: {name}: {message}", code)
            seen = self._connection_errors_total
        return self

    def _send_hello(self) -> None:
        if not self._handshaking:
            self._hello_backoff.reset()
        self._handshaking = True
        self._raw_send(P.pack(P.hello(self.bundle.hash, self.name, codecs=codec.supported_codecs(),
                                      max_inflight=self.inflight)))
        self._hello_in_pipe = not self._link_connected
        self._next_hello_ns = time.perf_counter_ns() + int(self._hello_backoff.next_delay() * 1e9)

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
            self._give_up(rid, DISCONNECTED, None, "agent closed with the request outstanding", local_ok=False)
        if self._monitor is not None:
            self._monitor.close()
            self._monitor = None
        self._sock.close(linger=200 if bye else 0)
        self._sock = None
        self.welcome = None

    def __enter__(self) -> "Agent":
        return self.connect() if self.welcome is None else self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- frames -> tensors ---------------------------------------------------------------------
    def preprocess(self, data: bytes) -> np.ndarray:
        """Encoded image -> model input ``[1,C,H,W]`` float32 (what the head and the full model take)."""
        from ..data.transforms import preprocess

        return preprocess(data, self.bundle.input_spec)[None]

    def head_for(self, mode: int | None = None):
        """The head engine that mode ``mode`` (default: the agent's mode) runs."""
        if self.head is None:
            raise AgentError("this agent was made with load_head=False")
        m = self.mode if mode is None else self.bundle.mode(mode)
        return self.heads[m.head]

    def head_tensor(self, data: bytes, mode: int | None = None) -> tuple[np.ndarray, float]:
        """Encoded image -> the mode's head output ``[C,h,w]`` float32, and the preprocess+head time in ms."""
        head = self.head_for(mode)
        t0 = time.perf_counter()
        z = head.run1(self.preprocess(data))
        return z[0], (time.perf_counter() - t0) * 1e3

    # -- sending -------------------------------------------------------------------------------
    def _raw_send(self, parts: list) -> None:
        send_parts(self._sock, parts)  # small frames are copied, large ones zero-copy (copy_threshold)
        self._last_send_ns = time.perf_counter_ns()

    def send_tensor(self, z: np.ndarray, *, key: str = "", label: int | None = None, mode: int | None = None,
                    deadline_ms: float | None = None, head_ms: float = 0.0,
                    fallback_input: np.ndarray | None = None) -> int:
        """Encode a head output (``[C,h,w]`` or ``[N,C,h,w]``) and send it, waiting first while the
        window is full. Returns the request id. The result comes from :meth:`poll`/:meth:`results`.
        Without a session (handshake in progress, or the link is down) the request is held and goes
        out after the next welcome, or ends as TIMEOUT. ``fallback_input``: the frame's preprocessed
        image, kept so that the frame can be answered locally if the server does not answer it."""
        if self._sock is None:
            raise AgentError("not connected: call connect() first")
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
        self._pending[rid] = _Pending(res, parts, t_send, compact=compact, desc=desc, deadline_ms=deadline,
                                      fallback_input=fallback_input)
        if handshaking:  # (re-)handshake in progress: the request goes out after welcome
            self._resend_after_welcome.append(rid)
        return rid

    def submit(self, sample, *, mode: int | None = None, deadline_ms: float | None = None) -> int:
        """Run the head on one sample (``Sample``, or encoded image bytes) and send it; or, with
        fallback on, answer it locally at once when there is no session with the server or recent
        round trips are longer than the deadline. Returns the frame's id either way."""
        data, key, label = (sample.data, sample.key, sample.label) if hasattr(sample, "data") else (sample, "", None)
        if self.head is None:
            raise AgentError("this agent was made with load_head=False")
        if self._sock is None:
            raise AgentError("not connected: call connect() first")
        while len(self._pending) >= self.window:  # waiting may change the link's state: route after it
            self._pump(self._wait_budget())
        t0 = time.perf_counter()
        x = self.preprocess(data)
        reason = None if self.fallback is None else self._local_reason(deadline_ms)
        if reason is not None:
            rid = self._next_id
            self._next_id += 1
            res = FrameResult(id=rid, key=key, label=label, mode=self.mode.id if mode is None else self.bundle.mode(mode).id)
            self._answer_locally(res, x, reason, t0)
            return rid
        if self.controller is not None:
            return self._submit_adaptive(x, t0, key, label, deadline_ms)
        z = self.head_for(mode).run1(x)[0]
        head_ms = (time.perf_counter() - t0) * 1e3
        return self.send_tensor(z, key=key, label=label, mode=mode, deadline_ms=deadline_ms, head_ms=head_ms,
                                fallback_input=None if self.fallback is None else x)

    def _submit_adaptive(self, x: np.ndarray, t0: float, key: str, label: int | None,
                         deadline_ms: float | None) -> int:
        """The policy picks the frame's mode before the head (in a slimmable bundle the mode decides
        which head runs): run that head and send, or answer the frame locally (FALLBACK), sending
        the probe mode's head output as a link probe if asked."""
        deadline = self.policy_deadline_ms or (self.deadline_ms if deadline_ms is None else deadline_ms)
        if deadline is None:
            raise AgentError("a mode policy needs a deadline (policy_deadline_ms or deadline_ms)")
        ctl = self.controller
        d = ctl.decide(t0, float(deadline), self._next_id, _InFlight(self))
        if d.mode == FALLBACK:
            head_ms = 0.0
            if d.probe_mode is not None:
                z = self._run_head(d.probe_mode, x)
                head_ms = (time.perf_counter() - t0) * 1e3
                t_decision = time.perf_counter_ns()
                pid = self.send_tensor(z, key=key, mode=d.probe_mode, deadline_ms=deadline_ms, head_ms=head_ms)
                self._probes.add(pid)
                ctl.sent(pid, self._pending[pid].result, self._pending[pid].t_send_ns, t_decision, probe=True)
            rid = self._next_id
            self._next_id += 1
            res = FrameResult(id=rid, key=key, label=label, mode=FALLBACK, head_ms=head_ms, policy_reason=d.reason,
                              predicted_ms=d.predicted_ms)
            self._answer_locally(res, x, POLICY, t0)
            return rid
        z = self._run_head(d.mode, x)
        head_ms = (time.perf_counter() - t0) * 1e3
        t_decision = time.perf_counter_ns()  # switch_ms: head output -> request ready
        rid = self.send_tensor(z, key=key, label=label, mode=d.mode, deadline_ms=deadline_ms, head_ms=head_ms,
                               fallback_input=None if self.fallback is None else x)
        p = self._pending[rid]
        p.result.policy_reason, p.result.predicted_ms = d.reason, d.predicted_ms
        after = None if self.fallback is None else ctl.policy.rescue_after_ms(float(deadline))
        if after is not None:
            p.rescue_ns = int(t0 * 1e9) + int(after * 1e6)
            if self._next_rescue_ns is None or p.rescue_ns < self._next_rescue_ns:
                self._next_rescue_ns = p.rescue_ns
        ctl.sent(rid, p.result, p.t_send_ns, t_decision)
        return rid

    def _run_head(self, mode: int, x: np.ndarray) -> np.ndarray:
        """The mode's head on one preprocessed frame, timed for the controller's switch figures."""
        role = self.bundle.mode(mode).head
        t = time.perf_counter()
        z = self.heads[role].run1(x)[0]
        self.controller.head_ran(role, (time.perf_counter() - t) * 1e3)
        return z

    def _local_reason(self, deadline_ms: float | None) -> str | None:
        """Why a new frame should not go to the server (fallback on), or None."""
        if self.welcome is None:
            return UNREACHABLE
        deadline = self.deadline_ms if deadline_ms is None else deadline_ms
        if deadline is not None and self.controller is None and self._rtt_guard.too_slow(deadline):
            return RTT_OVER_DEADLINE
        return None

    def _answer_locally(self, r: FrameResult, x: np.ndarray, reason: str, t0: float | None = None) -> None:
        """Finish frame ``r`` with the local full model on its preprocessed image ``x``."""
        t0 = time.perf_counter() if t0 is None else t0
        try:
            logits = self.fallback.logits(x)
        except EngineError as e:
            r.error, r.error_message = FALLBACK_FAILED, f"local fallback ({reason}) failed: {e}"
        else:
            r.source, r.fallback_reason, r.logits, r.pred = "local", reason, logits, int(logits.argmax())
        r.local_ms = (time.perf_counter() - t0) * 1e3
        self._done.append(r)

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
        # Pump even when frames are already done (say, answered locally while the link is down):
        # the welcome that ends an outage, and the link checks, come through here.
        self._pump(0.0 if self._done else timeout_s)
        out = list(self._done)
        self._done.clear()
        if self._probes:  # a probe's answer has fed the policy (ModeController.collect): not a frame
            done = {r.id for r in out} & self._probes
            self._probes -= done
            out = [r for r in out if r.id not in done]
        return out

    def drain(self) -> Iterator[FrameResult]:
        """Yield results until nothing is outstanding."""
        while self._pending or self._done:
            yield from self.poll(self._wait_budget())

    def run(self, source: str | Iterable, n: int | None = None, *, mode: int | None = None,
            deadline_ms: float | None = None, fps: float | None = None) -> Iterator[FrameResult]:
        """Stream frames from ``source`` (a source spec such as ``cifar10:test``, or an iterable of
        samples) with up to :attr:`window` requests outstanding; yields results as they complete.

        The next frame is read and its head run only once a window slot is free: a result is then
        taken off the socket (and yielded) as soon as it arrives instead of after a head computed
        in the meantime, so ``rtt_ms`` is the round trip rather than round trip plus the agent's
        own busy time (what link estimation needs), and each frame is as fresh as it can be when
        sent (what a live camera needs).

        ``fps``: pace the frames like a camera, frame *i* no earlier than ``i / fps`` after the
        first (answers are taken in while waiting); unset: as fast as the window allows."""
        from ..data.sources import open_source, take

        it = open_source(source, self.bundle.classes) if isinstance(source, str) else iter(source)
        frames = iter(take(it, n))
        t_start, i = time.perf_counter(), 0
        while True:
            yield from self.poll(0.0)
            while len(self._pending) >= self.window:
                yield from self.poll(self._wait_budget())
            if fps:
                while (wait := t_start + i / fps - time.perf_counter()) > 0:
                    yield from self.poll(min(wait, self._wait_budget()))
                i += 1
            sample = next(frames, _END)
            if sample is _END:
                break
            self.submit(sample, mode=mode, deadline_ms=deadline_ms)
        yield from self.drain()

    # -- receiving -----------------------------------------------------------------------------
    def _wait_budget(self) -> float:
        """How long one blocking wait may last before the link, timeouts and heartbeats are re-checked."""
        hb = self.heartbeat_ms / 1000.0 if self.heartbeat_ms else 1.0
        return max(0.001, min(hb, self.timeout_s, _LINK_CHECK_S))

    def _pump(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for incoming messages, handle all that are there, then check
        client-side timeouts and heartbeats."""
        sock = self._sock
        if sock is None:
            raise AgentError("not connected")
        # A blocking receive with a timeout: returns at once when something is queued (cheaper
        # than asking first and then receiving).
        if self._next_rescue_ns is not None:  # wake up for the next rescue, not after it
            timeout_s = min(timeout_s, max(0.0, (self._next_rescue_ns - time.perf_counter_ns()) / 1e9))
            self._next_check_ns = min(self._next_check_ns, self._next_rescue_ns)
        ms = max(0, int(timeout_s * 1000))
        try:
            if ms == 0:
                if not pending_in(sock):
                    if time.perf_counter_ns() >= self._next_check_ns:
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
        self._last_recv_ns = time.perf_counter_ns()
        try:
            msg = P.parse(parts, self._limits)
        except ProtocolError as e:  # the server sent garbage: note it and keep going
            self._connection_error(e.code.name, f"bad message from server: {e.message}")
            return
        self._dispatch(msg)

    def _connection_error(self, name: str, message: str) -> None:
        self.connection_errors.append((name, message))
        self._connection_errors_total += 1

    def _dispatch(self, msg: P.Message) -> None:
        h = msg.header
        kind = msg.kind
        if kind == Kind.RESULT:
            self._on_result(msg)
        elif kind == Kind.ERROR:
            rid, name = h.get("id"), h["name"]
            if rid is None:
                # Not about a request: a handshake refusal (connect() raises it) or the server's
                # answer to something else we sent. Either way the link is up (the monitor may have
                # missed the first connection, made before it was attached): keep saying hello.
                self._link_connected = True
                self._connection_error(name, h["message"])
                return
            p = self._pending.get(rid)
            if p is None:  # about a frame already finished (timed out, or answered locally)
                self.late_answers += 1
                return
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
            self._give_up(rid, name, h["code"], h["message"])
        elif kind == Kind.WELCOME:
            if h["bundle"] != self.bundle.hash:
                self._connection_error("UNKNOWN_BUNDLE", f"welcome names bundle {h['bundle'][:16]}...")
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
            self._link_connected = True
            self.server_bye = None
            if self._lost:
                self._lost = False
                self.reconnects += 1
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
            self._lose_session(ErrorCode.SHUTTING_DOWN.name, int(ErrorCode.SHUTTING_DOWN),
                               f"server said bye: {self.server_bye}")

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
        if p is None:  # a late answer to a frame already finished (timed out, or answered locally)
            self.late_answers += 1
            self._late_rescued_result(h)
            return
        r = p.result
        r.rtt_ms = (time.perf_counter_ns() - p.t_send_ns) / 1e6
        self._rtt_guard.record(r.rtt_ms)
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
            r.source = "server"
        self._done.append(r)

    def _give_up(self, rid: int, name: str, code: int | None, message: str, local_ok: bool = True) -> None:
        """Finish an outstanding frame the server will not answer: locally when its input was kept
        (fallback on) and the reason is one a local answer fits (an agent-side failure, ``code``
        None, or a "not now" refusal), otherwise as an error."""
        p = self._pending.pop(rid, None)
        if p is None:
            return
        if local_ok and p.fallback_input is not None and (code is None or code in FALLBACK_ERROR_CODES):
            self._answer_locally(p.result, p.fallback_input, name)
            return
        r = p.result
        r.error, r.error_code, r.error_message = name, code, message
        self._done.append(r)

    def _rescue_due(self, now_ns: int) -> None:
        """Answer locally every sent frame past its rescue time (its server answer is due too late)."""
        nxt = None
        for rid, p in list(self._pending.items()):
            if p.rescue_ns is None:
                continue
            if p.rescue_ns <= now_ns and p.fallback_input is not None:
                del self._pending[rid]
                self._rescued[rid] = p
                self.rescues += 1
                self._answer_locally(p.result, p.fallback_input, RESCUE)
            elif nxt is None or p.rescue_ns < nxt:
                nxt = p.rescue_ns
        self._next_rescue_ns = nxt
        limit = int(self.timeout_s * 1e9)
        for rid in [r for r, p in self._rescued.items() if now_ns - p.t_send_ns > limit]:
            del self._rescued[rid]  # its answer will not come: it leaves the policy's outstanding

    def _late_rescued_result(self, h: dict) -> None:
        """A rescued frame's server answer: the frame is finished, but the policy learns the link from it."""
        p = self._rescued.pop(h["id"], None)
        if p is None or self.controller is None:
            return
        t = h["timing"]
        shadow = replace(p.result, error=None, source="server", fallback_reason=None, logits=None, pred=None,
                         rtt_ms=(time.perf_counter_ns() - p.t_send_ns) / 1e6, server_queue_ms=t["queue_us"] / 1e3,
                         server_compute_ms=t["compute_us"] / 1e3, server_ms=t["server_us"] / 1e3)
        self.controller.late_result(h["id"], shadow)

    def _lose_session(self, name: str, code: int | None, message: str) -> None:
        """The session is gone (connection dropped, server silent, or bye): finish every
        outstanding frame now, and say hello again (with backoff) until a welcome comes. Until
        then new frames are answered locally (fallback on) or held (fallback off)."""
        self.welcome = None
        self.link_losses += 1
        self._lost = True
        self._resend_after_welcome = []
        self._rescued.clear()  # their answers will not come
        for rid in list(self._pending):
            self._give_up(rid, name, code, message)
        self._handshaking = True
        self._hello_backoff.reset()
        self._next_hello_ns = time.perf_counter_ns() + int(self._hello_backoff.next_delay() * 1e9)

    def _silence_limit(self) -> tuple[int, str]:
        """Nothing heard for this long (ns) with requests outstanding means the session is lost,
        and the outstanding frames end with the returned reason: three heartbeats (a live server
        answers pings even while its tail is busy) -> DISCONNECTED, or timeout_s when that comes
        first -> TIMEOUT."""
        if self.heartbeat_ms and 3 * self.heartbeat_ms < 1000 * self.timeout_s:
            return 3 * self.heartbeat_ms * 1_000_000, DISCONNECTED
        return int(self.timeout_s * 1e9), TIMEOUT

    def _check_link(self, now_ns: int) -> None:
        """Act on socket-monitor events, the silence deadline and the hello backoff."""
        for event, value in self._monitor.events():
            if event == link.CONNECTED:
                self._link_connected = True
                if self._handshaking and not self._hello_in_pipe:
                    self._send_hello()  # a server is there (again): now, not at the next backoff step
                self._hello_in_pipe = False
            elif event == link.DISCONNECTED:
                self._link_connected = False
                if self.welcome is not None:
                    self._lose_session(DISCONNECTED, None, f"connection to {self.server} dropped")
            elif event == link.CONNECT_FAILED:
                self._link_connected = False
            elif event in link.HANDSHAKE_FAILED:
                self._connection_error("HANDSHAKE_FAILED", f"{link.HANDSHAKE_FAILED[event]} with {self.server}: "
                                       f"{explain_handshake_failure(event, value, self.curve is not None)}")
        if self.welcome is not None and self._pending:
            oldest = next(iter(self._pending.values()))
            limit_ns, reason = self._silence_limit()
            if now_ns - max(self._last_recv_ns, oldest.t_send_ns) > limit_ns:
                self._lose_session(reason, None, f"nothing heard from {self.server} for {limit_ns / 1e9:.1f} s "
                                                 "with requests outstanding")
        elif self._handshaking and self._link_connected and now_ns >= self._next_hello_ns:
            self._send_hello()  # no welcome yet: again, after a longer wait each time

    def _check_timeouts(self) -> None:
        now_ns = time.perf_counter_ns()
        self._next_check_ns = now_ns + _CHECK_EVERY_NS
        if self._monitor is not None:
            self._check_link(now_ns)
        if self._next_rescue_ns is not None and now_ns >= self._next_rescue_ns:
            self._rescue_due(now_ns)
        limit = int(self.timeout_s * 1e9)
        for rid, p in list(self._pending.items()):
            if now_ns - p.t_send_ns > limit:
                self._give_up(rid, TIMEOUT, None, f"no answer from {self.server} within {self.timeout_s:.1f} s")
        if self.heartbeat_ms and self.welcome is not None:
            if now_ns - max(self._last_send_ns, self._last_recv_ns) > self.heartbeat_ms * 1_000_000:
                self._ping_nonce += 1
                self._raw_send(P.pack(P.ping(self._ping_nonce, time.time_ns())))


# ---------------------------------------------------------------------------------------------
# Summary and CLI


def _pct(values: list[float], q: float) -> float | None:
    return None if not values else round(float(np.percentile(np.asarray(values, np.float64), q)), 4)


def summarize(results: list[FrameResult], wall_s: float | None = None, agent: Agent | None = None) -> dict[str, Any]:
    """Aggregate per-frame results: accuracy (server and local answers), how frames ended (server,
    local by reason, errors by name), bytes and latency percentiles of the frames sent, and, given
    the agent, its link history (sessions lost and re-established, late answers dropped)."""
    ok = [r for r in results if r.ok]
    served = [r for r in ok if r.source == "server"]
    local = [r for r in ok if r.source == "local"]
    sent = [r for r in results if r.header_bytes]  # went on the wire (a frame answered locally at once did not)
    labelled = [r for r in ok if r.label is not None and r.pred is not None]
    s: dict[str, Any] = {
        "frames": len(results),
        "ok": len(ok),
        "server": len(served),
        "local": len(local),
        "error_frames": len(results) - len(ok),
        "accuracy": None if not labelled else round(sum(r.pred == r.label for r in labelled) / len(labelled), 4),
        "bytes_per_frame_median": _pct([r.bytes_sent for r in sent], 50),
        "header_bytes_median": _pct([r.header_bytes for r in sent], 50),
        "rtt_ms_p50": _pct([r.rtt_ms for r in served], 50),
        "rtt_ms_p95": _pct([r.rtt_ms for r in served], 95),
        "head_ms_p50": _pct([r.head_ms for r in sent], 50),
        "encode_ms_p50": _pct([r.encode_ms for r in sent], 50),
        "server_queue_ms_p50": _pct([r.server_queue_ms for r in served], 50),
        "server_compute_ms_p50": _pct([r.server_compute_ms for r in served], 50),
        "batch_size_mean": None if not served else round(float(np.mean([r.batch_size for r in served])), 3),
        "local_ms_p50": _pct([r.local_ms for r in local], 50),
        "fallback_reasons": dict(Counter(r.fallback_reason for r in local)),
        "errors": dict(Counter(r.error for r in results if not r.ok)),
    }
    if agent is not None:
        s.update(link_losses=agent.link_losses, reconnects=agent.reconnects, late_answers=agent.late_answers,
                 rescues=agent.rescues)
        if agent.controller is not None:  # frames per mode (-1: the policy's local fallback) and switch times
            s["adapt"] = agent.controller.summary() | {"mode_frames": dict(Counter(r.mode for r in results))}
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
                   help="per-request deadline the server enforces (relative to its receipt); with --adapt, also "
                        "the end-to-end deadline (capture to answer) the policy plans for")
    p.add_argument("--adapt", default=None, choices=POLICY_KINDS,
                   help="choose each frame's mode with a policy from the bundle's modes table (needs --deadline-ms): "
                        "deadline = the deadline-aware controller, assine = Assine et al., fixed = --mode throughout; "
                        "frames that fit no mode are answered locally by full.onnx (fallback_reason POLICY)")
    p.add_argument("--fps", type=float, default=None, help="pace frames like a camera at this rate (unset: as fast as possible)")
    p.add_argument("--local-ms", type=float, default=None,
                   help="with --adapt: latency of full.onnx on this device (unset: measured at start)")
    p.add_argument("--base-rtt-ms", type=float, default=0.0,
                   help="with --adapt: fixed round trip beyond the uplink (propagation both ways), ms")
    p.add_argument("--packet-bytes", type=int, default=None,
                   help="with --adapt deadline*: the uplink serves whole packets of this size per delivery opportunity "
                        "(cellular: 1500), so bytes are counted in whole packets (unset: bytes / rate)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads for the head (unset: ORT's default)")
    p.add_argument("--timeout-s", type=float, default=10.0, help="give up on a request (and the handshake) after this")
    p.add_argument("--fallback", default="auto", choices=("auto", "off"),
                   help="auto: answer a frame with the bundle's full.onnx on this device when the server cannot "
                        "(link down, timeout, overloaded, deadline); off: such frames end as errors")
    p.add_argument("--reconnect-max-s", type=float, default=0.5,
                   help="cap of the reconnect backoff (libzmq's reconnect interval and hello retries): a restarted "
                        "server is found again within about this long")
    p.add_argument("--name", default=None, help="agent name sent in hello (unset: host:pid)")
    p.add_argument("--server-key", default=None, metavar="FILE",
                   help="CURVE: the server's public key (server.key); needs --client-key")
    p.add_argument("--client-key", default=None, metavar="FILE",
                   help="CURVE: this agent's secret key (NAME.key_secret from 'edgesplit keys gen'); its NAME.key "
                        "must be in the server's --allow-keys directory")
    p.add_argument("--json-lines", nargs="?", const="-", default=None, metavar="FILE|-",
                   help="write one JSON line per frame and a final {\"summary\": ...} line to FILE or stdout")
    return p


def agent_main(args_list: list[str] | None = None) -> int:
    """Run the agent CLI. Exit codes: 0 done, 1 could not run (bundle, server, source), 3 every frame failed."""
    args = build_parser().parse_args(args_list)
    out = None
    try:
        bundle = Bundle.load(args.bundle)
        policy = _cli_policy(args, bundle)
        agent = Agent(bundle, args.server, mode=args.mode, codec=args.codec, inflight=args.inflight,
                      deadline_ms=args.deadline_ms, threads=args.threads, name=args.name, timeout_s=args.timeout_s,
                      fallback=args.fallback, reconnect_max_s=args.reconnect_max_s,
                      server_key=args.server_key, client_key=args.client_key, policy=policy,
                      policy_deadline_ms=args.deadline_ms if policy is not None else None)
        agent.connect()
    except (AgentError, BundleError, OSError, ValueError) as e:
        print(f"edgesplit agent: {e}", file=sys.stderr)
        return 1
    if args.fallback == "auto" and agent.fallback is None:
        print(f"edgesplit agent: bundle {agent.bundle.name} has no full model: no local fallback", file=sys.stderr)
    if agent.welcome is None:
        print(f"edgesplit agent: no welcome from {args.server} within {args.timeout_s:.1f} s: answering frames "
              "locally (full.onnx) and retrying in the background", file=sys.stderr)
    if args.json_lines == "-":
        out = sys.stdout
    elif args.json_lines:
        out = open(args.json_lines, "w")
    results: list[FrameResult] = []
    t0 = time.perf_counter()
    try:
        for r in agent.run(args.source, args.frames or None, fps=args.fps):
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
    summary = summarize(results, wall, agent)
    # the edge plane must not pull torch in: report it, so benchmarks and CI can check
    summary["torch_loaded"] = any(m == "torch" or m.startswith("torch.") for m in sys.modules)
    if out is not None:
        out.write(json.dumps({"summary": summary}) + "\n")
        if out is not sys.stdout:
            out.close()
    human = sys.stderr if out is sys.stdout else sys.stdout
    print(_format_summary(summary, agent), file=human)
    return 3 if results and not summary["ok"] else 0


def _cli_policy(args: argparse.Namespace, bundle: Bundle) -> Policy | None:
    """The --adapt policy, from the bundle's modes table; full.onnx is timed here unless --local-ms."""
    if args.adapt is None:
        return None
    if args.deadline_ms is None:
        raise ValueError("--adapt needs --deadline-ms")
    local_ms = args.local_ms
    if local_ms is None and args.fallback == "auto" and bundle.has("full"):
        local_ms = measure_local_ms(load_fallback(bundle, "auto", args.threads), tuple(bundle.input_spec["shape"]))
    return make_policy(args.adapt, bundle_modes(bundle), local_ms=local_ms, base_rtt_ms=args.base_rtt_ms,
                       mode_id=args.mode, packet_bytes=args.packet_bytes)


def _format_summary(s: dict[str, Any], agent: Agent) -> str:
    acc = "n/a" if s["accuracy"] is None else f"{100 * s['accuracy']:.2f}%"
    errs = ", ".join(f"{k}={v}" for k, v in s["errors"].items()) or "none"
    reasons = ", ".join(f"{k}={v}" for k, v in s["fallback_reasons"].items())
    ad = s.get("adapt")
    how = f"mode {agent.mode.id} '{agent.mode.name}'" if ad is None else f"policy {ad['policy']}"
    text = (f"edgesplit agent: {s['frames']} frames ({s['ok']} ok) via {agent.server}, bundle {agent.bundle.name}, "
            f"{how}\n"
            f"  accuracy {acc}; bytes/frame median {s['bytes_per_frame_median']} (+ header {s['header_bytes_median']})\n"
            f"  rtt p50 {s['rtt_ms_p50']} ms, p95 {s['rtt_ms_p95']} ms; head p50 {s['head_ms_p50']} ms; "
            f"server queue p50 {s['server_queue_ms_p50']} ms, compute p50 {s['server_compute_ms_p50']} ms\n"
            f"  {s['server']} answered by the server, {s['local']} locally{f' ({reasons})' if reasons else ''}; "
            f"sessions lost {s.get('link_losses', 0)}, re-established {s.get('reconnects', 0)}\n"
            f"  {s.get('frames_per_s', 'n/a')} frames/s; errors: {errs}")
    if ad is not None:
        text += (f"\n  frames per mode (-1: local by policy) {ad['mode_frames']}; {ad['switches']} switches, "
                 f"decision -> request ready p50 {ad['switch_ms_p50']} ms switching, {ad['same_mode_ms_p50']} ms not")
    return text


if __name__ == "__main__":
    sys.exit(agent_main(sys.argv[1:]))
