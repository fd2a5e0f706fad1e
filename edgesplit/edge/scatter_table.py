"""The worker side of ED-ViT sessions (docs/PROTOCOL.md §13), without sockets: hello/welcome
with the sub-models held, credits, heartbeats, expiry, bye, and the checks a ``scatter`` gets, in
§13.6's order, before it becomes queued work.

Why a table of its own rather than the server's: ``edgesplit/server`` may not be imported from the
edge plane, and the server's table is built around its batcher and tail checks; a worker's
sessions differ in what they admit (frames for sub-models, not requests for a mode) and share
only the handshake, credit and heartbeat rules, which are short. The worker's I/O loop
(:mod:`edgesplit.edge.worker`) owns the ROUTER socket, parses with the ``scatter`` feature, sends
what this table returns and is its only caller; tests drive it with a fake clock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..wire import protocol as P
from ..wire import scatter_messages as S
from ..wire.errors import ErrorCode, ProtocolError
from ..wire.kinds import FEATURE_SCATTER, FEATURE_SCATTER_JPEG, Kind, Limits
from ..wire.protocol import Message
from ..wire.scatter import JPEG_DTYPE

log = logging.getLogger("edgesplit.worker")

Header = dict[str, Any]
EXPIRY_INTERVALS = 3  # silence longer than this many heartbeats ends an idle session
INPUT_DTYPES = ("float32", "float16", "uint8")  # what a tensor input may be (§13.3)


@dataclass
class WorkerSession:
    identity: bytes
    camera: str
    credits: int
    inflight: int = 0  # frames accepted and not yet fully answered
    last_seen: int = 0
    last_ping: int = 0
    ping_nonce: int = -1
    frames: int = 0
    rtt_us: float | None = None


@dataclass(eq=False)
class Frame:
    """One accepted scatter: its input and the sub-models still to answer."""

    identity: bytes
    frame_id: int
    submodels: list[int]
    desc: dict
    payload: Any
    t_recv_ns: int
    deadline_ns: int
    tensor: Any = None  # the bundle's input tensor, made once for all of the frame's sub-models
    decode_us: float = 0.0
    failed: str | None = None  # the input could not be turned into a tensor (why)
    answered: set[int] = field(default_factory=set)


class WorkerTable:
    """Every camera session of one worker, keyed by ROUTER identity. Single-threaded."""

    def __init__(
        self,
        bundle_hash: str,
        held: Iterable[int],
        input_name: str,
        input_shape: tuple[int, ...],
        *,
        worker_name: str,
        credits: int,
        heartbeat_ms: int,
        limits: Limits,
        codecs: Iterable[str],
        jpeg: bool,
        queue_limit: int,
        estimate_us: Callable[[int], float],
        wall_clock_ns: Callable[[], int] = time.time_ns,
    ):
        """``estimate_us(sid)``: the expected run time of sub-model ``sid`` (deadline triage)."""
        self.bundle_hash = bundle_hash
        self.held = tuple(sorted(held))
        self.input_name = input_name
        self.input_shape = list(input_shape)
        self.worker_name = worker_name
        self.credits = int(credits)
        self.heartbeat_ms = int(heartbeat_ms)
        self.limits = limits
        self.codecs = tuple(codecs)
        self.features = (FEATURE_SCATTER, FEATURE_SCATTER_JPEG) if jpeg else (FEATURE_SCATTER,)
        self.queue_limit = int(queue_limit)
        self.estimate_us = estimate_us
        self.wall_clock_ns = wall_clock_ns
        self.sessions: dict[bytes, WorkerSession] = {}
        self.queued = 0  # sub-model runs waiting, over every session (the driver keeps it)

    # -- incoming ----------------------------------------------------------------------------------
    def receive(self, identity: bytes, msg: Message, now_ns: int, draining: bool) -> tuple[Header | None, Frame | None]:
        """One parsed message -> (the header to answer with, a frame to queue). Never raises for
        anything a peer sends."""
        s = self.sessions.get(identity)
        if s is not None:
            s.last_seen = now_ns
        h = msg.header
        try:
            if msg.kind == Kind.SCATTER:
                return None, self._scatter(identity, s, h, msg.frames, now_ns, draining)
            if msg.kind == Kind.HELLO:
                return self._hello(identity, h, now_ns, draining), None
            if msg.kind == Kind.PING:
                return P.pong(h["nonce"], self.wall_clock_ns()), None
            if msg.kind == Kind.PONG:
                if s is not None and h["nonce"] == s.ping_nonce:
                    s.rtt_us = now_ns / 1e3 - s.ping_nonce
                return None, None
            if msg.kind == Kind.BYE:
                self.sessions.pop(identity, None)
                return None, None
            if msg.kind == Kind.ERROR:
                log.info("camera %r reported %s: %s", identity, h.get("name"), h.get("message"))
                return None, None
            if msg.kind == Kind.REQUEST:
                raise ProtocolError(ErrorCode.UNSUPPORTED, "this worker serves scatters only (no requests)", h["id"])
            raise ProtocolError(ErrorCode.MALFORMED, f"'{msg.kind}' is not a message a camera sends a worker", msg.id)
        except ProtocolError as e:
            return S.scatter_error(e.req_id, e.code, e.message), None

    def _hello(self, identity: bytes, h: Header, now_ns: int, draining: bool) -> Header:
        if draining:
            raise ProtocolError(ErrorCode.SHUTTING_DOWN, "worker is shutting down")
        if h["bundle"] != self.bundle_hash:
            raise ProtocolError(
                ErrorCode.UNKNOWN_BUNDLE,
                f"bundle {h['bundle'][:16]}... is not served here (this worker serves {self.bundle_hash[:16]}...)",
            )
        lacking = sorted(set(h.get("submodels") or ()) - set(self.held))
        if lacking:
            raise ProtocolError(
                ErrorCode.UNKNOWN_SUBMODEL, f"sub-model(s) {lacking} are not held here (held: {list(self.held)})"
            )
        credits = max(1, min(self.credits, h["caps"]["max_inflight"]))
        old = self.sessions.get(identity)
        s = WorkerSession(identity, h["agent"], credits, last_seen=now_ns, last_ping=now_ns)
        if old is not None:  # a re-handshake keeps the frames in flight
            s.inflight, s.frames = old.inflight, old.frames
        self.sessions[identity] = s
        log.info("hello from %s (%s): %d credits", h["agent"], identity.hex(), credits)
        return S.worker_welcome(
            self.bundle_hash,
            self.worker_name,
            self.held,
            credits=credits,
            limits=self.limits,
            heartbeat_ms=self.heartbeat_ms,
            codecs=self.codecs,
            features=self.features,
        )

    def _scatter(
        self, identity: bytes, s: WorkerSession | None, h: Header, frames: list, now_ns: int, draining: bool
    ) -> Frame:
        """§13.6's checks after the message's own (parse): the first failing one is the answer."""
        fid = h["id"]
        if s is None:
            raise ProtocolError(ErrorCode.NOT_READY, "no session: send hello first (or again, after a reconnect)", fid)
        if draining:
            raise ProtocolError(ErrorCode.SHUTTING_DOWN, "worker is shutting down", fid)
        unknown = [x for x in h["submodels"] if x not in self.held]
        if unknown:
            raise ProtocolError(
                ErrorCode.UNKNOWN_SUBMODEL, f"sub-model(s) {unknown} are not held here (held: {list(self.held)})", fid
            )
        d = h["tensors"][0]
        if d["dtype"] == JPEG_DTYPE:
            if FEATURE_SCATTER_JPEG not in self.features:
                raise ProtocolError(ErrorCode.UNSUPPORTED, "this worker does not decode jpeg inputs", fid)
        else:
            if d["name"] != self.input_name or list(d["shape"]) != self.input_shape:
                raise ProtocolError(
                    ErrorCode.MALFORMED,
                    f"input {d['name']!r} {list(d['shape'])} is not the bundle's input {self.input_name!r} "
                    f"{self.input_shape}",
                    fid,
                )
            if d["dtype"] not in INPUT_DTYPES:
                raise ProtocolError(ErrorCode.UNSUPPORTED, f"input dtype {d['dtype']!r} is not decoded here", fid)
            if d["codec"] not in self.codecs:
                raise ProtocolError(ErrorCode.UNSUPPORTED, f"codec {d['codec']!r} is not decoded here", fid)
        if s.inflight >= s.credits:
            raise ProtocolError(
                ErrorCode.OVERLOADED, f"credits exceeded: {s.inflight} frames in flight, {s.credits} allowed", fid
            )
        if self.queued + len(h["submodels"]) > self.queue_limit:
            raise ProtocolError(ErrorCode.OVERLOADED, f"worker queue full ({self.queued} runs waiting)", fid)
        deadline_ns = now_ns + int(h["deadline_ms"] * 1e6)
        if h["deadline_ms"] == 0 or now_ns + min(self.estimate_us(x) for x in h["submodels"]) * 1e3 > deadline_ns:
            raise ProtocolError(
                ErrorCode.DEADLINE_EXCEEDED, f"no sub-model can finish within {h['deadline_ms']} ms", fid
            )
        s.inflight += 1
        s.frames += 1
        return Frame(identity, fid, list(h["submodels"]), d, frames[0], now_ns, deadline_ns)

    # -- replies, time, departures -----------------------------------------------------------------
    def settle(self, identity: bytes) -> None:
        """A frame of ``identity`` is fully answered: one credit back."""
        s = self.sessions.get(identity)
        if s is not None and s.inflight > 0:
            s.inflight -= 1

    def drop(self, identity: bytes) -> None:
        self.sessions.pop(identity, None)

    def tick(self, now_ns: int) -> list[tuple[bytes, Header]]:
        """Expire idle sessions silent for :data:`EXPIRY_INTERVALS` heartbeats; ping each session
        once per heartbeat. Returns the pings to send."""
        hb = self.heartbeat_ms * 1_000_000
        if hb <= 0:
            return []
        pings = []
        for ident, s in list(self.sessions.items()):
            if now_ns - s.last_seen > EXPIRY_INTERVALS * hb and s.inflight == 0:
                log.info("session %s (%s) expired after silence", s.camera, ident.hex())
                del self.sessions[ident]
            elif now_ns - s.last_ping > hb:
                s.last_ping = now_ns
                s.ping_nonce = now_ns // 1000
                pings.append((ident, P.ping(s.ping_nonce, self.wall_clock_ns())))
        return pings

    def farewell(self, reason: str = "worker shutting down") -> list[tuple[bytes, Header]]:
        return [(ident, P.bye(reason)) for ident in list(self.sessions)]
