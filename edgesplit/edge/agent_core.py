"""The :class:`Agent`: decides, per frame, server or local or what the policy says, and composes
the pieces that do the work (the package docstring of :mod:`edgesplit.edge.agent` tells the
behaviour; this module is its implementation):

- :class:`~edgesplit.wire.client_session.ClientSession` (protocol: handshake, credits, heartbeats,
  deadlines, reconnects, resends, request forms), driven through
  :class:`~edgesplit.edge.connection.ServerConnection` (the socket and its link monitor);
- :class:`~edgesplit.edge.heads.HeadRunner` (preprocessing and the bundle's heads);
- the local fallback (:mod:`edgesplit.edge.fallback`: full.onnx and the round-trip guard);
- the mode policy (:class:`~edgesplit.edge.adaptive.ModeController`);
- a U-shaped bundle's part (:class:`~edgesplit.edge.ushaped.UShapedPart`: tokens out, tail here).

Each frame ends as exactly one :class:`~edgesplit.edge.results.FrameResult`, whatever the session
reports about it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import zmq

from ..bundle import Bundle, Mode
from ..control.policy import FixedPolicy, Policy, RoundRobinPolicy
from ..wire import protocol as P
from ..wire.errors import ErrorCode
from ..wire.mode_codec import encode_mode
from ..wire.transport import context, default_agent_name
from .adaptive import ModeController
from .connection import ServerConnection, endpoints, load_curve
from .fallback import RTT_OVER_DEADLINE, SHUTDOWN, UNREACHABLE, load_fallback
from .frame_loop import stream_frames
from .heads import HeadRunner, OrtExecution, preprocess_image
from .outcomes import Frame, Outcomes
from .policy_frames import submit_with_policy
from .results import DISCONNECTED, FALLBACK_FAILED, TIMEOUT, AgentError, FrameResult
from .ushaped import session_for, u_shaped_part

__all__ = ["Agent", "AgentError", "FrameResult", "TIMEOUT", "DISCONNECTED", "FALLBACK_FAILED"]

# Longest blocking wait before the link, timeouts and heartbeats are looked at again: it bounds
# how late a dropped connection is noticed while the agent waits for answers.
_LINK_CHECK_S = 0.05
# Handshake refusals that a server restart or overload explains: connect() keeps trying through them.
_TRANSIENT_REFUSALS = {ErrorCode.SHUTTING_DOWN.name, ErrorCode.OVERLOADED.name}


class Agent:
    """One agent session with one server for one bundle (``server``: an endpoint, or several to
    fail over between, as a list or comma-separated: see :mod:`.connection`)."""

    def __init__(
        self,
        bundle: Bundle | str | Path,
        server: str | Sequence[str] = "tcp://127.0.0.1:5555",
        *,
        mode: int | None = None,
        codec: str = "raw",
        inflight: int = 8,
        deadline_ms: float | None = None,
        threads: int | OrtExecution | None = None,  # OrtExecution: providers and threads of every session
        name: str | None = None,
        timeout_s: float = 10.0,
        load_head: bool = True,
        ctx: zmq.Context | None = None,
        fallback: str = "off",
        reconnect_max_s: float = 0.5,
        server_key: str | Path | None = None,
        client_key: str | Path | None = None,
        policy: Policy | None = None,
        policy_deadline_ms: float | None = None,
        base_rtt_ms: float | None = None,
    ):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
        self.curve = load_curve(server_key, client_key)
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
        self.ushaped = u_shaped_part(self.bundle, threads, policy, codec)  # None unless U-shaped
        # v1.1: the descriptor each mode implies in a compact request; the session sends a frame
        # compact when its descriptor equals it and the server's welcome allows it.
        modes = self.bundle.modes if self.ushaped is None else ()  # a U-shaped request is never compact
        implicit = {m.id: P.compact_descriptor(self.wire_name, self.bundle.wire_spec["shape"], m) for m in modes}
        # What a full request's header costs over a compact one's: the "tensors" key and its
        # descriptor. With --codec auto and compact requests, zstd must save more than this.
        self._full_extra = {
            mid: len(P.pack_header({"tensors": [dict(d, codec="zstd")]})) - 1 for mid, d in implicit.items()
        }
        self._tables = {m.id: self.bundle.tables_for(m) for m in self.bundle.modes if m.entropy_coded}
        self.reconnect_max_s = float(reconnect_max_s)
        self.session = session_for(self.bundle, server)(
            self.bundle.hash,
            self.name,
            max_inflight=self.inflight,
            timeout_s=self.timeout_s,
            reconnect_max_s=reconnect_max_s,
            implicit=implicit,
            link_up=False,
            peer=endpoints(server)[0],
        )
        self.runner = HeadRunner(self.bundle, threads) if load_head else None
        self.heads: dict = {} if self.runner is None else self.runner.heads  # file role -> engine
        self.head = self.heads.get("head")
        # Local fallback: the bundle's full model, or None when off (or the bundle has none).
        self.fallback = load_fallback(self.bundle, fallback, threads)
        # Mode policy (edgesplit/control): per frame, which mode to send, or FALLBACK (answered by
        # full.onnx here, fallback_reason POLICY). It replaces the RTT guard: it predicts latency itself.
        if policy is not None and self.fallback is None and not isinstance(policy, (FixedPolicy, RoundRobinPolicy)):
            raise ValueError(
                f"policy {policy.name} may answer frames locally: it needs fallback='auto' and a bundle with full.onnx"
            )
        self.controller = None if policy is None else ModeController(policy, base_rtt_ms)
        # The end-to-end deadline the policy plans for (capture to answer); unset: the request's
        # deadline_ms (which the server enforces from its receipt, a different clock start).
        self.policy_deadline_ms = policy_deadline_ms
        self._probes: set[int] = set()  # ids of link probes the policy asked for: their results only feed it
        self.conn = ServerConnection(
            self.session, server, ctx or context(), curve=self.curve, reconnect_max_s=self.reconnect_max_s
        )
        finish = None if self.ushaped is None else self.ushaped.finish  # U-shaped: the tail runs here
        self.outcomes = Outcomes(self.session, self.fallback, self.controller, self.timeout_s, finish)

    # -- the session's state, as the agent's (see ClientSession) --------------------------------
    welcome = property(lambda self: self.session.welcome)
    credits = property(lambda self: self.session.credits)
    heartbeat_ms = property(lambda self: self.session.heartbeat_ms)
    compact_requests = property(lambda self: self.session.compact_requests)
    server_bye = property(lambda self: self.session.server_bye)
    link_losses = property(lambda self: self.session.link_losses)
    reconnects = property(lambda self: self.session.reconnects)
    late_answers = property(lambda self: self.session.late_answers)
    window = property(lambda self: self.session.window)  # own limit bounded by the server's credits
    _pending = property(lambda self: self.session.outstanding)
    rescues = property(lambda self: self.outcomes.rescues)  # sent frames the policy answered locally
    connection_errors = property(lambda self: self.outcomes.connection_errors)  # errors not tied to a frame

    @property
    def in_flight(self) -> int:
        """Frames handed to the server path and not finished yet (sent, or held for a welcome)."""
        return len(self.session.outstanding)

    # -- connection ----------------------------------------------------------------------------
    def connect(self, timeout_s: float | None = None) -> "Agent":
        """Open the socket and handshake. Raises AgentError (with the server's code) when the
        server refuses the handshake, and when no welcome arrives within ``timeout_s`` (default:
        the agent's timeout) unless local fallback is on: then it returns without a session, frames
        are answered locally, and the agent keeps saying hello until a server welcomes it."""
        self.conn.open()
        self.conn.hello()
        wait_s = self.timeout_s if timeout_s is None else timeout_s
        end = time.monotonic() + wait_s
        seen = self.outcomes.connection_errors_total
        while self.session.handshaking:
            left = end - time.monotonic()
            if left <= 0:
                if self.fallback is not None:
                    return self
                self.close(bye=False)
                raise AgentError(
                    f"no welcome from {self.server} within {wait_s:.1f} s (is the server running and reachable?)"
                )
            self._pump(min(left, self.wait_budget()))
            new = self.outcomes.connection_errors_total - seen
            for name, message in list(self.connection_errors)[-new:] if new else ():
                if name not in _TRANSIENT_REFUSALS:
                    self.close(bye=False)
                    code = ErrorCode[name] if name in ErrorCode.__members__ else None
                    raise AgentError(f"server refused the handshake: {name}: {message}", code)
            seen = self.outcomes.connection_errors_total
        return self

    def close(self, bye: bool = True) -> None:
        """Say bye (when connected) and close the socket. Outstanding requests are failed."""
        for req in self.conn.close(bye):
            self.outcomes.give_up(req, DISCONNECTED, None, "agent closed with the request outstanding", local_ok=False)

    def __enter__(self) -> "Agent":
        return self.connect() if self.welcome is None else self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- frames -> tensors ---------------------------------------------------------------------
    def preprocess(self, data: bytes) -> np.ndarray:
        """Encoded image -> model input ``[1,C,H,W]`` float32 (what the head and the full model take)."""
        return preprocess_image(data, self.bundle)

    def head_for(self, mode: int | None = None):
        """The head engine that mode ``mode`` (default: the agent's mode) runs."""
        if self.runner is None:
            raise AgentError("this agent was made with load_head=False")
        return self.runner.engine(self.mode if mode is None else self.bundle.mode(mode))

    def head_tensor(self, data: bytes, mode: int | None = None) -> tuple[np.ndarray, float]:
        """Encoded image -> the mode's head output ``[C,h,w]`` float32, and the preprocess+head time in ms."""
        head = self.head_for(mode)
        t0 = time.perf_counter()
        z = head.run1(self.preprocess(data))
        return z[0], (time.perf_counter() - t0) * 1e3

    # -- sending -------------------------------------------------------------------------------
    def send_tensor(
        self,
        z: np.ndarray,
        *,
        key: str = "",
        label: int | None = None,
        mode: int | None = None,
        deadline_ms: float | None = None,
        head_ms: float = 0.0,
        fallback_input: np.ndarray | None = None,
    ) -> int:
        """Encode a head output (``[C,h,w]`` or ``[N,C,h,w]``) and send it, waiting first while the
        window is full. Returns the request id. The result comes from :meth:`poll`/:meth:`results`.
        Without a session (handshake in progress, or the link is down) the request is held and goes
        out after the next welcome, or ends as TIMEOUT. ``fallback_input``: the frame's preprocessed
        image, kept so that the frame can be answered locally if the server does not answer it."""
        if not self.conn.is_open:
            raise AgentError("not connected: call connect() first")
        while len(self.session.outstanding) >= self.session.window:
            self._pump(self.wait_budget())
        m = self.mode if mode is None else self.bundle.mode(mode)
        t0 = time.perf_counter()
        margin = self._full_extra.get(m.id, 0) if self.session.compact_requests and self.codec == "auto" else 0
        tables = self._tables.get(m.id)  # an ans mode's table set (PROTOCOL.md §4.4), else None
        encode = encode_mode if self.ushaped is None else self.ushaped.encode
        desc, payload = encode(z, m, tables=tables, codec=self.codec, name=self.wire_name, auto_margin=margin)
        encode_ms = (time.perf_counter() - t0) * 1e3
        # No t_send_ns in the header: the session keeps the send time, the echo would carry nothing.
        req, parts = self.session.request(
            m.id,
            desc,
            payload,
            time.perf_counter_ns(),
            deadline_ms=self.deadline_ms if deadline_ms is None else deadline_ms,
        )
        if parts is not None:
            self.conn.send(parts)  # first, so the bookkeeping below overlaps the round trip
        res = FrameResult(
            id=req.rid,
            key=key,
            label=label,
            mode=m.id,
            head_ms=head_ms,
            encode_ms=encode_ms,
            bytes_sent=len(payload),
            header_bytes=req.header_bytes,
        )
        req.tag = Frame(res, fallback_input)
        return req.rid

    def submit(self, sample, *, mode: int | None = None, deadline_ms: float | None = None) -> int:
        """Run the head on one sample (``Sample``, or encoded image bytes) and send it; or, with
        fallback on, answer it locally at once when there is no session with the server or recent
        round trips are longer than the deadline. Returns the frame's id either way."""
        data, key, label = (sample.data, sample.key, sample.label) if hasattr(sample, "data") else (sample, "", None)
        if self.runner is None:
            raise AgentError("this agent was made with load_head=False")
        if not self.conn.is_open:
            raise AgentError("not connected: call connect() first")
        while len(self.session.outstanding) >= self.session.window:  # waiting may change the link: route after it
            self._pump(self.wait_budget())
        t0 = time.perf_counter()
        x = self.preprocess(data)
        reason = None if self.fallback is None else self._local_reason(deadline_ms)
        if reason is not None:
            res = FrameResult(
                id=self.session.take_id(),
                key=key,
                label=label,
                mode=self.mode.id if mode is None else self.bundle.mode(mode).id,
            )
            self.outcomes.local(res, x, reason, t0)
            return res.id
        if self.controller is not None:
            return submit_with_policy(self, x, t0, key, label, deadline_ms)
        z = self.head_for(mode).run1(x)[0]
        head_ms = (time.perf_counter() - t0) * 1e3
        return self.send_tensor(
            z,
            key=key,
            label=label,
            mode=mode,
            deadline_ms=deadline_ms,
            head_ms=head_ms,
            fallback_input=None if self.fallback is None else x,
        )

    def _local_reason(self, deadline_ms: float | None) -> str | None:
        """Why a new frame should not go to the server (fallback on), or None."""
        if self.session.welcome is None:
            return UNREACHABLE
        deadline = self.deadline_ms if deadline_ms is None else deadline_ms
        if deadline is not None and self.controller is None and self.outcomes.rtt_guard.too_slow(deadline):
            return RTT_OVER_DEADLINE
        return None

    # -- results -------------------------------------------------------------------------------
    def infer(self, sample, *, mode: int | None = None, deadline_ms: float | None = None) -> FrameResult:
        """One frame, synchronously: head, send, wait for its result (or error, or timeout)."""
        rid = self.submit(sample, mode=mode, deadline_ms=deadline_ms)
        return self.wait_for(rid)

    def wait_for(self, rid: int) -> FrameResult:
        while True:
            done = self.outcomes.done
            for i, r in enumerate(done):
                if r.id == rid:
                    del done[i]
                    return r
            if rid not in self.session.outstanding:
                raise KeyError(f"request {rid} is not outstanding")
            self._pump(self.wait_budget())

    def poll(self, timeout_s: float = 0.0) -> list[FrameResult]:
        """Process what has arrived (waiting up to ``timeout_s`` for something) and return the
        frames completed since the last call."""
        # Pump even when frames are already done (say, answered locally while the link is down):
        # the welcome that ends an outage, and the link checks, come through here.
        done = self.outcomes.done
        self._pump(0.0 if done else timeout_s)
        out = list(done)
        done.clear()
        if self._probes:  # a probe's answer has fed the policy (ModeController.collect): not a frame
            probes = {r.id for r in out} & self._probes
            self._probes -= probes
            out = [r for r in out if r.id not in probes]
        return out

    def drain(self) -> Iterator[FrameResult]:
        """Yield results until nothing is outstanding."""
        while self.busy():
            yield from self.poll(self.wait_budget())

    def run(
        self,
        source: str | Iterable,
        n: int | None = None,
        *,
        mode: int | None = None,
        deadline_ms: float | None = None,
        fps: float | None = None,
    ) -> Iterator[FrameResult]:
        """Stream frames from ``source`` (a source spec such as ``cifar10:test``, or an iterable of
        samples) with up to :attr:`window` requests outstanding; yields results as they complete
        (:func:`~edgesplit.edge.frame_loop.stream_frames`: when frames are read, and ``fps`` pacing)."""
        from ..data.sources import open_source, take

        it = open_source(source, self.bundle.classes) if isinstance(source, str) else iter(source)
        yield from stream_frames(
            self, iter(take(it, n)), fps=fps, submit=lambda s: self.submit(s, mode=mode, deadline_ms=deadline_ms)
        )

    # -- the frame loop's view (edgesplit.edge.frame_loop.FrameTarget) ----------------------------
    def window_full(self) -> bool:
        return len(self.session.outstanding) >= self.session.window

    def busy(self) -> bool:
        return bool(self.session.outstanding or self.outcomes.done)

    def hand_off(self) -> int:
        """Stop waiting for the server: each frame in flight is answered locally (or ends as a
        ``SHUTDOWN`` error without fallback). Returns how many there were."""
        reqs = list(self.session.outstanding.items())
        for rid, req in reqs:
            self.session.abandon(rid)
            self.outcomes.give_up(req, SHUTDOWN, None, "agent stopping: no server answer within stop_grace_s")
        return len(reqs)

    # -- receiving -----------------------------------------------------------------------------
    def wait_budget(self) -> float:
        """How long one blocking wait may last before the link, timeouts and heartbeats are re-checked."""
        hb = self.session.heartbeat_ms / 1000.0 if self.session.heartbeat_ms else 1.0
        return max(0.001, min(hb, self.timeout_s, _LINK_CHECK_S))

    def _pump(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for what the server sends (waking for the next policy rescue,
        not after it), let the session check its deadlines, and finish the frames that ended."""
        outcomes = self.outcomes
        if outcomes.next_rescue_ns is not None:
            timeout_s = min(timeout_s, max(0.0, (outcomes.next_rescue_ns - time.perf_counter_ns()) / 1e9))
        events = self.conn.pump(timeout_s)
        if events:
            outcomes.handle(events)
        if outcomes.next_rescue_ns is not None and (now := time.perf_counter_ns()) >= outcomes.next_rescue_ns:
            outcomes.rescue_due(now)
