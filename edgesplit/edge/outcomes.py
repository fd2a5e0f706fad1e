"""How each frame on the agent's server path ends: what the client session reports (answered,
refused, timed out, lost) turned into exactly one :class:`~edgesplit.edge.results.FrameResult`
per frame, a server answer, a local answer (fallback), or an error.

The rule for a frame the server will not answer: locally, when fallback is on and the reason is
one a local answer fits (an agent-side failure, or a "not now" refusal:
:data:`~edgesplit.edge.fallback.FALLBACK_ERROR_CODES`), otherwise as an error. A policy rescue
answers a sent frame locally when its server answer is due too late; that answer, if it comes
later, still feeds the policy.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from ..engine import EngineError
from ..wire import codec
from ..wire.client_session import Answered, BadMessage, ClientSession, LateAnswer, Lost, Outstanding, Refused, TimedOut
from ..wire.errors import ErrorCode, WireError
from .adaptive import RESCUE, ModeController
from .connection import HandshakeFailed
from .fallback import FALLBACK_ERROR_CODES, LocalModel, RttGuard
from .results import FALLBACK_FAILED, TIMEOUT, FrameResult


@dataclass(slots=True)
class Frame:
    """What the agent keeps about a frame on the server path (the session request's ``tag``)."""

    result: FrameResult
    fallback_input: np.ndarray | None = None  # the preprocessed image, kept while fallback is on
    rescue_ns: int | None = None  # answer locally at this perf_counter_ns if still unanswered (policy rescue)


class Outcomes:
    """Finishes frames; ``done`` holds the finished ones until the agent hands them out."""

    def __init__(
        self,
        session: ClientSession,
        fallback: LocalModel | None,
        controller: ModeController | None,
        timeout_s: float,
        finish: Callable[[FrameResult, np.ndarray], np.ndarray] | None = None,
    ):
        """``finish``: what turns a result's tensor into the frame's logits (a U-shaped bundle's
        tail, :meth:`~edgesplit.edge.ushaped.UShapedPart.finish`); None: the tensor is the logits."""
        self.session = session
        self.finish = finish
        self.fallback = fallback
        self.controller = controller
        self.timeout_ns = int(timeout_s * 1e9)
        self.rtt_guard = RttGuard()
        self.done: deque[FrameResult] = deque()
        self.rescued: dict[int, Outstanding] = {}  # rescued frames whose server answer may still come
        self.rescues = 0
        self.next_rescue_ns: int | None = None
        # (name, message) of errors without a request id, the latest ones: a background re-handshake
        # against a server that keeps refusing must not grow memory without bound.
        self.connection_errors: deque[tuple[str, str]] = deque(maxlen=64)
        self.connection_errors_total = 0

    def connection_error(self, name: str, message: str) -> None:
        self.connection_errors.append((name, message))
        self.connection_errors_total += 1

    def handle(self, events: list) -> None:
        """What the session (and the connection) reported, in order."""
        for ev in events:
            t = type(ev)
            if t is Answered:
                self._answered(ev)
            elif t is Refused:
                if ev.request is None:  # the handshake, or nothing tied to a request
                    self.connection_error(ev.code.name, ev.message)
                else:
                    self.give_up(ev.request, ev.code.name, int(ev.code), ev.message)
            elif t is TimedOut:
                self.give_up(ev.request, TIMEOUT, None, ev.message)
            elif t is Lost:
                self.rescued.clear()  # their answers will not come
                code = None if ev.code is None else int(ev.code)
                for req in ev.requests:
                    self.give_up(req, ev.reason, code, ev.message)
            elif t is LateAnswer:
                if ev.timings is not None:
                    self._late_result(ev)
            elif t is BadMessage:
                self.connection_error(ev.code.name, ev.message)
            elif t is HandshakeFailed:
                self.connection_error("HANDSHAKE_FAILED", ev.message)

    def local(self, r: FrameResult, x: np.ndarray, reason: str, t0: float | None = None) -> None:
        """Finish frame ``r`` with the local full model on its preprocessed image ``x``."""
        t0 = time.perf_counter() if t0 is None else t0
        assert self.fallback is not None, "a frame goes local only with fallback on"
        try:
            logits = self.fallback.logits(x)
        except EngineError as e:
            r.error, r.error_message = FALLBACK_FAILED, f"local fallback ({reason}) failed: {e}"
        else:
            r.source, r.fallback_reason, r.logits, r.pred = "local", reason, logits, int(logits.argmax())
        r.local_ms = (time.perf_counter() - t0) * 1e3
        self.done.append(r)

    def give_up(self, req: Outstanding, name: str, code: int | None, message: str, local_ok: bool = True) -> None:
        """Finish a frame the server will not answer: locally when its input was kept and the
        reason fits (``code`` None, or a "not now" refusal), otherwise as an error."""
        f: Frame = req.tag
        r = f.result
        r.header_bytes = req.header_bytes  # a resend may have changed its form
        if local_ok and f.fallback_input is not None and (code is None or code in FALLBACK_ERROR_CODES):
            self.local(r, f.fallback_input, name)
            return
        r.error, r.error_code, r.error_message = name, code, message
        self.done.append(r)

    def _answered(self, ev: Answered) -> None:
        req = ev.request
        r = req.tag.result
        r.header_bytes = req.header_bytes
        r.rtt_ms = (time.perf_counter_ns() - req.t_send_ns) / 1e6
        self.rtt_guard.record(r.rtt_ms)
        t = ev.timings
        r.server_queue_ms = t.queue_us / 1e3
        r.server_compute_ms = t.compute_us / 1e3
        r.server_ms = t.server_us / 1e3
        r.batch_size = t.batch_size
        try:
            # parse() has checked the descriptor against its frame already
            r.bytes_received = memoryview(ev.frames[0]).nbytes
            logits = codec.decode(ev.header["outputs"][0], ev.frames[0], validate=False)
            if self.finish is not None:
                logits = self.finish(r, logits)
        except (WireError, EngineError, IndexError, KeyError, TypeError, ValueError) as e:
            r.error, r.error_code, r.error_message = "MALFORMED", int(ErrorCode.MALFORMED), f"result undecodable: {e}"
        else:
            r.logits = logits
            r.pred = int(logits.argmax()) if logits.ndim == 1 else None
            r.source = "server"
        self.done.append(r)

    # -- policy rescues ------------------------------------------------------------------------
    def schedule_rescue(self, frame: Frame, rescue_ns: int) -> None:
        frame.rescue_ns = rescue_ns
        if self.next_rescue_ns is None or rescue_ns < self.next_rescue_ns:
            self.next_rescue_ns = rescue_ns

    def rescue_due(self, now_ns: int) -> None:
        """Answer locally every sent frame past its rescue time (its server answer is due too late)."""
        nxt = None
        for rid, req in list(self.session.outstanding.items()):
            f: Frame = req.tag
            if f.rescue_ns is None:
                continue
            if f.rescue_ns <= now_ns and f.fallback_input is not None:
                self.session.abandon(rid)
                self.rescued[rid] = req
                self.rescues += 1
                req.tag.result.header_bytes = req.header_bytes
                self.local(f.result, f.fallback_input, RESCUE)
            elif nxt is None or f.rescue_ns < nxt:
                nxt = f.rescue_ns
        self.next_rescue_ns = nxt
        for rid in [r for r, req in self.rescued.items() if now_ns - req.t_send_ns > self.timeout_ns]:
            del self.rescued[rid]  # its answer will not come: it leaves the policy's outstanding

    def _late_result(self, ev: LateAnswer) -> None:
        """A rescued frame's server answer: the frame is finished, but the policy learns the link from it."""
        req = self.rescued.pop(ev.rid, None)
        t = ev.timings
        if req is None or self.controller is None or t is None:
            return
        shadow = replace(
            req.tag.result,
            error=None,
            source="server",
            fallback_reason=None,
            logits=None,
            pred=None,
            rtt_ms=(time.perf_counter_ns() - req.t_send_ns) / 1e6,
            server_queue_ms=t.queue_us / 1e3,
            server_compute_ms=t.compute_us / 1e3,
            server_ms=t.server_us / 1e3,
        )
        self.controller.late_result(ev.rid, shadow)
