"""The server side of protocol sessions, without sockets: hello/welcome, credits, heartbeats,
expiry after silence, bye, and every refusal a message can earn.

:class:`SessionTable` takes parsed messages (:func:`edgesplit.wire.protocol.parse` output) and the
clock as arguments and returns the header to answer with; a valid request becomes an
:class:`~edgesplit.server.batcher.Item` that it hands to the scheduler's
:meth:`~edgesplit.server.batcher.Batcher.admit`. The daemon's I/O thread owns the ROUTER socket,
parses, sends what the table returns, and is the table's only caller; a test drives the table
with a fake clock. ``now_ns`` is ``time.perf_counter_ns()`` in the daemon: the clock the
scheduler's deadlines and estimates use too.

Checks on a request, in order (docs/PROTOCOL.md): a session (NOT_READY), not draining
(SHUTTING_DOWN), the tensor against the session's bundle and mode (MALFORMED, UNKNOWN_MODE,
UNSUPPORTED codec, TOO_LARGE rows), credits (OVERLOADED), then the scheduler's admission
(DEADLINE_EXCEEDED, OVERLOADED). A session on an ED-ViT bundle is offered ``"fused_requests"``
(and nothing else): its messages are parsed with that feature (:attr:`Session.parse_features`,
read by the I/O thread) and its requests checked as fused requests (§13.5,
:class:`~edgesplit.server.fusion_runner.FusionCheck`) in place of the tensor checks.

A U-shaped bundle (SFPrompt, §15.6) is served the same way, with its own checks
(:class:`~edgesplit.server.ushaped_runner.UShapedCheck`: a token tensor in its mode's dtype, full
form only); its sessions are offered ``"u_shaped"`` instead of ``"compact_requests"``. The hello's
``serving`` (§15.2) must match the bundle's shape both ways, else UNSUPPORTED: an agent expecting
logits never gets a body's output, and a U-shaped agent never runs its tail on logits.

The session lifecycle itself (hello bookkeeping, ping/pong, bye, expiry, refusals) is
:class:`~edgesplit.server.session_lifecycle.SessionTableBase`, shared with the SFPrompt body server
(:mod:`edgesplit.server.body_sessions`); this module adds the daemon's bundles and its requests.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Mapping

from ..wire import protocol as P
from ..wire.errors import ErrorCode, ProtocolError
from ..wire.protocol import Kind, Limits, Message
from .batcher import Batcher, Item
from .fusion_runner import FUSED_FEATURES, FusionCheck
from .session_lifecycle import EXPIRY_INTERVALS, Header, HelloTerms, Session, SessionTableBase
from .stats import IoCounters
from .tail_runner import RequestCheck
from .ushaped_runner import U_SHAPED, U_SHAPED_FEATURES, UShapedCheck

__all__ = ["EXPIRY_INTERVALS", "Header", "HelloTerms", "Session", "SessionTable", "SessionTableBase"]


class SessionTable(SessionTableBase):
    """Every agent session of one daemon: the lifecycle, plus the request checks and admission."""

    def __init__(
        self,
        checks: Mapping[str, RequestCheck | FusionCheck | UShapedCheck],
        scheduler: Batcher,
        counters: IoCounters,
        *,
        server_name: str,
        credits: int,
        heartbeat_ms: int,
        limits: Limits,
        codecs: Iterable[str],
        features: Iterable[str] = P.SERVER_FEATURES,
        wall_clock_ns: Callable[[], int] = time.time_ns,
    ):
        super().__init__(
            counters,
            server_name=server_name,
            credits=credits,
            heartbeat_ms=heartbeat_ms,
            limits=limits,
            codecs=codecs,
            features=features,
            wall_clock_ns=wall_clock_ns,
        )
        self.checks = checks  # bundle hash -> its request checks: the bundles served
        self.scheduler = scheduler

    def _accept(self, h: Header) -> HelloTerms:
        check = self.checks.get(h["bundle"])
        if check is None:
            raise ProtocolError(
                ErrorCode.UNKNOWN_BUNDLE,
                f"bundle {h['bundle'][:16]}... is not loaded here (loaded: "
                f"{', '.join(f'{c.bundle.name}={k[:16]}...' for k, c in self.checks.items())})",
            )
        bundle = check.bundle
        serving = h.get("serving")  # v1.4 (§15.2): the agent's serving shape; absent: head-tail
        if serving is not None and (type(serving) is not str or len(serving) > 32):
            raise ProtocolError(ErrorCode.MALFORMED, "hello: 'serving' must be a string of at most 32 characters")
        serving = serving or "head-tail"
        if (serving == U_SHAPED) != (bundle.serving == U_SHAPED):
            if bundle.serving == U_SHAPED:
                why = "the server answers with the body's output and the agent runs the tail"
            else:
                why = "the server answers with logits, not a body's output"
            raise ProtocolError(
                ErrorCode.UNSUPPORTED,
                f"bundle '{bundle.name}' is served {bundle.serving} ({why}); this agent's model is '{serving}'",
            )
        if check.fused:
            return HelloTerms(bundle.hash, bundle.name, tuple(FUSED_FEATURES), frozenset(FUSED_FEATURES))
        if bundle.serving == U_SHAPED:  # full requests only: no compact_requests
            features = (*(f for f in self.features if f != P.FEATURE_COMPACT_REQUESTS), *U_SHAPED_FEATURES)
            return HelloTerms(bundle.hash, bundle.name, features, self.parse_features)
        return HelloTerms(bundle.hash, bundle.name, self.features, self.parse_features)

    def _work(
        self, identity: bytes, session: Session | None, msg: Message, now_ns: int, draining: bool
    ) -> Header | None:
        if msg.kind != Kind.REQUEST:
            return super()._work(identity, session, msg, now_ns, draining)
        self._request(identity, session, msg, now_ns, draining)
        return None

    def _request(self, identity: bytes, session: Session | None, msg: Message, now_ns: int, draining: bool) -> None:
        h = msg.header
        rid = h["id"]
        session = self.require_session(session, rid, draining)
        check = self.checks[session.bundle]
        tensors = h.get("tensors")
        payload = msg.frames[0]
        if isinstance(check, FusionCheck):  # §13.5: steps 6-7 become the fused request's checks; one row each
            d = check.check_fused(h, rid)
            rows, single, payload = 1, True, msg.frames
        elif tensors is None:  # v1.1 compact request: parse() saw exactly one frame; one row, raw
            d = check.check_compact(h["mode"], msg.frames[0], rid)
            rows, single = 1, True
        else:
            if len(msg.frames) != 1:
                raise ProtocolError(
                    ErrorCode.MALFORMED, f"a v1 request carries exactly one tensor, got {len(msg.frames)}", rid
                )
            d = tensors[0]
            if d["codec"] not in self.codecs:
                raise ProtocolError(ErrorCode.UNSUPPORTED, f"codec '{d['codec']}' is not available on this server", rid)
            rows, single = check.check(h["mode"], d, rid)
            if rows > self.scheduler.max_batch:
                raise ProtocolError(
                    ErrorCode.TOO_LARGE, f"{rows} rows in one request, over max batch {self.scheduler.max_batch}", rid
                )
        self.check_credit(session, rid)
        deadline = h.get("deadline_ms")
        item = Item(
            key=(session.bundle, h["mode"]),
            identity=identity,
            req_id=rid,
            desc=d,
            payload=payload,
            rows=rows,
            single=single,
            t_recv_ns=now_ns,
            deadline_ns=None if deadline is None else now_ns + int(deadline * 1e6),
            t_send_ns=h.get("t_send_ns"),
            deadline_ms=deadline,
        )
        refusal = self.scheduler.admit(item, now_ns)
        if refusal is not None:
            raise ProtocolError(refusal.code, refusal.message, rid)
        session.inflight += 1
        session.requests += 1
        self.counters.requests += 1
