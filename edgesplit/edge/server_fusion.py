"""Fusion on the server for the ED-ViT camera (docs/PROTOCOL.md §13.5, §13.6 item 3): the
camera's session with a server that offers ``"fused_requests"`` and the link that sends one fused
request per frame and waits for its answer until the frame's deadline.

:class:`FusedSession` is a :class:`~edgesplit.wire.client_session.ClientSession` (handshake,
credits, heartbeats, silence, bye) that also builds fused requests and validates their results'
``used``. :class:`ServerFusion` drives it over a
:class:`~edgesplit.edge.connection.ServerConnection` for :class:`~edgesplit.edge.scatter_camera.
ScatterCamera`: :meth:`ServerFusion.fuse` sends the features present in a frame and returns the
server's logits and ``used``, or None when the request failed, the session is not up, or no answer
came by the deadline; the camera then fuses the frame itself. It keeps a smoothed estimate of the
fused request's round trip, which the camera subtracts from the frame's deadline to get its
gather cut-off.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..wire import protocol as P
from ..wire import scatter_messages as S
from ..wire.client_session import ClientSession
from ..wire.codec import decode, encode_float
from ..wire.curve import ClientCurve
from ..wire.errors import ErrorCode, ProtocolError, WireError
from ..wire.kinds import FEATURE_FUSED_REQUESTS, Kind
from ..wire.session_events import Answered, BadMessage, Event, Lost, Outstanding, Refused, TimedOut, Welcomed
from ..wire.transport import context
from .connection import HandshakeFailed, ServerConnection
from .scatter_bundle import EdvitBundle

FUSED_FEATURES = frozenset({FEATURE_FUSED_REQUESTS})
INITIAL_RTT_MS = 2.0  # the round trip assumed until a fused request has measured one


class FusedSession(ClientSession):
    """One camera session with one server, for one ED-ViT bundle."""

    def __init__(self, bundle_hash: str, camera_name: str, **kwargs: Any):
        kwargs.setdefault("retry_not_ready", False)  # a frame is never resent: it has a deadline
        super().__init__(bundle_hash, camera_name, **kwargs)

    @property
    def live(self) -> bool:
        """A session that offers fused requests is up and a credit is free."""
        w = self.welcome
        return (
            w is not None
            and not self.handshaking
            and FEATURE_FUSED_REQUESTS in w.features
            and len(self.outstanding) < self.window
        )

    def fused_request(
        self, mode: int, submodels: list[int], descs: list[dict], payloads: list, now_ns: int, deadline_ms: float
    ) -> tuple[int, list]:
        """The id and parts of one frame's fused request, to send now (the driver checked :attr:`live`)."""
        rid = self.take_id()
        deadline = P.wire_number(deadline_ms)
        parts = [P.pack_header(S.fused_request(rid, mode, submodels, descs, deadline_ms=deadline)), *payloads]
        self.outstanding[rid] = Outstanding(rid, mode, parts, now_ns, False, {"submodels": submodels}, deadline)
        self.last_send_ns = now_ns
        return rid, parts

    def receive(self, parts: list, now_ns: int) -> list[Event]:
        try:  # a result's `used` is checked only with the feature on
            msg = P.parse(parts, self.limits, FUSED_FEATURES)
        except ProtocolError:
            return super().receive(parts, now_ns)  # reported as the client session does
        if msg.kind == Kind.RESULT and msg.header.get("used") is None and msg.header["id"] in self.outstanding:
            self.last_recv_ns = now_ns
            return [BadMessage(ErrorCode.MALFORMED, "a fused request's result lacks 'used'")]
        return super().receive(parts, now_ns)

    def lost_session(self, now_ns: int) -> list:
        """The server answered NOT_READY (it lost this session: restart, expiry): say hello again."""
        self.welcome = None
        return self.hello(now_ns)


class ServerFusion:
    """The camera's link to a fusing server (one DEALER, one thread: the camera's)."""

    def __init__(
        self,
        bundle: EdvitBundle,
        server: str,
        camera: str,
        *,
        timeout_s: float = 10.0,
        reconnect_max_s: float = 0.5,
        curve: ClientCurve | None = None,
    ):
        self.bundle = bundle
        self.endpoint = server
        self.session = FusedSession(
            bundle.hash, camera, max_inflight=2, timeout_s=timeout_s, reconnect_max_s=reconnect_max_s, peer=server
        )
        self.conn = ServerConnection(self.session, server, context(), curve=curve, reconnect_max_s=reconnect_max_s)
        # smoothed round trip and its mean deviation, as TCP keeps them (RFC 6298: gains 1/8, 1/4)
        self.srtt_ms, self.rttvar_ms = INITIAL_RTT_MS, INITIAL_RTT_MS / 2
        self.names = {sid: s.feature_name for sid, s in bundle.submodels.items()}
        self.answered = 0  # frames the server fused
        self.failures: dict[str, int] = {}  # why a frame was not fused on the server -> count
        self.refusal: str | None = None  # the latest handshake refusal
        self._waiting: int | None = None
        self._reply: tuple[np.ndarray, list[int]] | str | None = None

    # -- connection ----------------------------------------------------------------------------
    def open(self) -> ServerFusion:
        self.conn.open()
        self.conn.hello()
        return self

    def close(self) -> None:
        self.conn.close()

    @property
    def socket(self):
        return self.conn.socket

    @property
    def live(self) -> bool:
        return self.session.live

    @property
    def rtt_ms(self) -> float:
        """The estimate of a fused request's round trip the camera plans with: the smoothed mean
        plus four deviations (a slow spell on a shared CPU is planned for, not averaged away)."""
        return self.srtt_ms + 4 * self.rttvar_ms

    def pump(self, timeout_s: float = 0.0) -> None:
        """Read what the server sent, answer its pings, check the session's deadlines."""
        if self.conn.socket is not None:
            for ev in self.conn.pump(timeout_s):
                self._on_event(ev)

    def _fail(self, why: str) -> None:
        self.failures[why] = self.failures.get(why, 0) + 1

    def _on_event(self, ev: Any) -> None:
        t = type(ev)
        if t is Answered and ev.rid == self._waiting:
            try:
                (logits,) = (decode(d, f) for d, f in zip(ev.header["outputs"], ev.frames))
            except (WireError, ValueError) as e:
                self._reply = f"undecodable result: {e}"
                return
            self._reply = (np.asarray(logits, np.float32).reshape(-1), list(ev.header["used"]))
        elif t is Refused and ev.rid is not None:
            if ev.rid == self._waiting:
                self._reply = ev.code.name
            if ev.code == ErrorCode.NOT_READY and not self.session.handshaking:
                self.conn.send(self.session.lost_session(time.perf_counter_ns()))
        elif t is Refused or t is HandshakeFailed:
            self.refusal = ev.message if t is HandshakeFailed else f"{ev.code.name}: {ev.message}"
        elif t is Welcomed:
            self.refusal = None
        elif t is Lost or t is TimedOut:
            ids = [r.rid for r in ev.requests] if t is Lost else [ev.rid]
            if self._waiting in ids:
                self._reply = "LOST" if t is Lost else "TIMEOUT"
        elif t is BadMessage and self._waiting is not None:
            self._reply = f"bad result: {ev.message}"

    # -- one frame -----------------------------------------------------------------------------
    def fuse(self, frame_features: dict[int, np.ndarray], deadline_ns: int) -> tuple[np.ndarray, list[int]] | None:
        """Send the features present in one frame as a fused request and wait for its answer until
        ``deadline_ns`` (the frame's T, perf_counter_ns). Returns (logits, used), or None: the
        session is not up, the request was refused or lost, or no answer came in time (counted in
        :attr:`failures` by reason)."""
        self.pump(0)
        if not self.live:
            self._fail("not_live")
            return None
        subs = sorted(frame_features)
        descs, payloads = [], []
        for s in subs:
            d, p = encode_float(frame_features[s], name=self.names[s], dtype=self.bundle.features_dtype)
            descs.append(d)
            payloads.append(p)
        now = time.perf_counter_ns()
        deadline_ms = max(0.0, (deadline_ns - now) / 1e6 - self.srtt_ms / 2)  # less the result's trip back
        rid, parts = self.session.fused_request(self.bundle.mode_id, subs, descs, payloads, now, deadline_ms)
        self._waiting, self._reply = rid, None
        self.conn.send(parts)
        while self._reply is None:
            left = (deadline_ns - time.perf_counter_ns()) / 1e9
            if left <= 0:
                break
            self.pump(min(left, 0.005))
        reply, self._waiting, self._reply = self._reply, None, None
        if reply is None:
            self.session.abandon(rid)
            self._fail("DEADLINE")
            return None
        if isinstance(reply, str):
            self._fail(reply.split(":")[0])
            return None
        took_ms = (time.perf_counter_ns() - now) / 1e6
        self.rttvar_ms += (abs(took_ms - self.srtt_ms) - self.rttvar_ms) / 4
        self.srtt_ms += (took_ms - self.srtt_ms) / 8
        self.answered += 1
        return reply

    def report(self) -> dict[str, Any]:
        return {
            "server": self.endpoint,
            "live": self.live,
            "refusal": self.refusal,
            "answered": self.answered,
            "failures": dict(self.failures),
            "rtt_ms": round(self.rtt_ms, 3),
            "late_answers": self.session.late_answers,
            "link_losses": self.session.link_losses,
        }
