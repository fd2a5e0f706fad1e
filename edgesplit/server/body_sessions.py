"""The body server's sessions, without sockets (docs/PROTOCOL.md §15): the protocol's session
lifecycle (:class:`~edgesplit.server.session_lifecycle.SessionTableBase`, the one the daemon uses
too) with the body server's hello, welcome and work.

- ``hello``: refused UNKNOWN_BUNDLE for another package and UNSUPPORTED for an agent that is not
  U-shaped (§15.2); the ``welcome`` lists ``"split_training"`` and ``"u_shaped"`` and carries the
  ``train`` terms;
- work: ``train_fwd``, ``train_bwd`` and U-shaped ``request`` messages, each computed in place by
  the :class:`~edgesplit.server.body_runner.BodyRunner` and answered at once;
- heartbeats and expiry as every session (§8), where a session with a pending step (its
  ``train_bwd`` awaited) counts as busy and does not expire; a session that ends (bye, expiry, a
  peer gone) takes its steps with it.

Credits are granted as §15.2 says and checked on every work message; computed in place, a
session never has more than one message in flight, so the check only bites once the runner moves
to a compute thread of its own. :meth:`BodySessionTable.handle` takes a message's raw parts and the
clock (``now_ns``) and returns the reply; the body server owns the socket and the loop.
"""

from __future__ import annotations

from typing import Any, Callable

from ..wire import protocol as P
from ..wire import split_train as S
from ..wire.errors import ErrorCode, ProtocolError
from ..wire.protocol import Kind, Message
from .body_runner import BodyRunner, Reply
from .session_lifecycle import Header, HelloTerms, Session, SessionTableBase, log
from .stats import IoCounters

FEATURES = (S.FEATURE_SPLIT_TRAINING, S.FEATURE_U_SHAPED)
WORK_KINDS = frozenset({S.TRAIN_FWD, S.TRAIN_BWD, Kind.REQUEST})


class BodySessionTable(SessionTableBase):
    """Every client session of one body server, and the body's work for them."""

    def __init__(
        self,
        runner: BodyRunner,
        counters: IoCounters | None = None,
        *,
        server_name: str = "edgesplit-body",
        credits: int = 4,
        heartbeat_ms: int = 5000,
        limits: P.Limits = P.DEFAULT_LIMITS,
        wall_clock_ns: Callable[[], int] | None = None,
    ):
        kwargs: dict[str, Any] = {} if wall_clock_ns is None else {"wall_clock_ns": wall_clock_ns}
        super().__init__(
            counters if counters is not None else IoCounters(),
            server_name=server_name,
            credits=credits,
            heartbeat_ms=heartbeat_ms,
            limits=limits,
            codecs=("raw",),
            bits=(8,),
            features=FEATURES,
            **kwargs,
        )
        self.runner = runner
        self.package = runner.package

    # -- one message -------------------------------------------------------------------------------
    def handle(self, identity: bytes, parts: list, now_ns: int) -> Reply | None:
        """One message as received (header and frames) from ``identity`` -> the reply to send, if
        any. Never raises for anything a peer sends."""
        nbytes = sum(len(p) for p in parts)
        self.counters.messages += 1
        try:
            msg = S.parse(parts, self.limits, FEATURES)
        except ProtocolError as e:
            return self.refuse(identity, e), []
        if msg.kind not in WORK_KINDS:
            header = self.receive(identity, msg, now_ns, nbytes)
            return None if header is None else (header, [])
        session = self.seen(identity, now_ns, nbytes)
        rid = msg.header["id"]
        try:
            return self._compute(identity, self.require_session(session, rid, False), msg, now_ns)
        except ProtocolError as e:
            return self.refuse(identity, e), []
        except Exception as e:  # a bug: answer INTERNAL and keep serving
            log.exception("failed to handle a message")
            return self.refuse(identity, ProtocolError(ErrorCode.INTERNAL, f"{type(e).__name__}: {e}", rid)), []

    def _compute(self, identity: bytes, session: Session, msg: Message, now_ns: int) -> Reply:
        self.check_credit(session, msg.header["id"])
        session.inflight += 1
        try:
            h, frame = msg.header, msg.frames[0]
            if msg.kind == S.TRAIN_FWD:
                reply = self.runner.train_fwd(identity, h, frame, now_ns)
            elif msg.kind == S.TRAIN_BWD:
                reply = self.runner.train_bwd(identity, h, frame, now_ns)
            else:
                reply = self.runner.infer(h, frame)
        finally:
            self.settle(identity, error=False)  # answered in place: the credit comes back at once
        session.requests += 1
        self.counters.requests += 1
        return reply

    # -- what the lifecycle asks of this server --------------------------------------------------------
    def _accept(self, h: Header) -> HelloTerms:
        pkg = self.package
        if h["bundle"] != pkg.hash:
            raise ProtocolError(
                ErrorCode.UNKNOWN_BUNDLE,
                f"body package {h['bundle'][:16]}... is not loaded here (loaded: {pkg.name}={pkg.hash[:16]}...)",
            )
        serving = h.get("serving") or "head-tail"
        if serving != "u-shaped":
            raise ProtocolError(
                ErrorCode.UNSUPPORTED,
                f"'{pkg.name}' is served U-shaped (the server answers with the body's output, the agent "
                f"runs the tail); this agent's model is '{serving}'",
            )
        return HelloTerms(pkg.hash, pkg.name, FEATURES, frozenset(FEATURES))

    def _welcome(self, terms: HelloTerms, credits: int) -> Header:
        w = super()._welcome(terms, credits)
        w["train"] = self.runner.train_terms()
        return w

    def _busy(self, identity: bytes, session: Session) -> bool:
        return session.inflight > 0 or self.runner.pending(identity) > 0

    def _ended(self, identity: bytes) -> None:
        self.runner.forget(identity)

    def tick(self, now_ns: int) -> list[tuple[bytes, Header]]:
        """Pending steps past their ``ttl_ms`` dropped, then the heartbeats: expiry and the pings to send."""
        self.runner.expire(now_ns)
        return super().tick(now_ns)
