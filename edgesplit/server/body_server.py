"""The body server (``edgesplit body-serve``): serves one SFPrompt body package for split training
and U-shaped inference over the wire protocol (docs/PROTOCOL.md §15).

One ROUTER socket, one thread: every message is validated (:func:`edgesplit.wire.split_train.parse`
with the features ``"split_training"`` and ``"u_shaped"``), answered, and a training step computed
in place (:class:`~edgesplit.server.body_runner.BodyRunner`). Sessions as §6-§8: ``hello``
(refused UNKNOWN_BUNDLE for another package, UNSUPPORTED for an agent that is not U-shaped),
``ping``/``pong``, ``bye``, expiry after three silent heartbeat intervals with no pending step.
Single-threaded on purpose for now: a client's steps are sequential (each waits for its answer),
so there is nothing to batch within a session; batching steps across clients is what moving this
runner into :class:`~edgesplit.server.daemon.Server`'s compute thread would add.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from typing import Any

import zmq

from ..wire import protocol as P
from ..wire import split_train as S
from ..wire import transport
from ..wire.curve import ServerCurve
from ..wire.errors import ErrorCode, ProtocolError
from ..wire.messages import ErrorReply
from .body_runner import BodyPackage, BodyRunner, Reply

log = logging.getLogger("edgesplit.server")
FEATURES = (S.FEATURE_SPLIT_TRAINING, S.FEATURE_U_SHAPED)
EXPIRY_INTERVALS = 3


class BodyServer:
    def __init__(
        self,
        package: BodyPackage,
        bind: str = "tcp://127.0.0.1:0",
        *,
        credits: int = 4,
        heartbeat_ms: int = 5000,
        limits: P.Limits = P.DEFAULT_LIMITS,
        max_pending: int = 8,
        replay: int = 32,
        ttl_ms: int = 60_000,
        name: str = "edgesplit-body",
        curve: ServerCurve | None = None,
    ):
        self.runner = BodyRunner(package, max_pending=max_pending, replay=replay, ttl_ms=ttl_ms)
        self.package, self.credits, self.heartbeat_ms, self.limits, self.name = (
            package,
            credits,
            heartbeat_ms,
            limits,
            name,
        )
        # CURVE: its own context, with the ZAP handler started before the bind (PROTOCOL.md §1)
        self.ctx = zmq.Context() if curve is not None else None
        self.auth = curve.start_authenticator(self.ctx) if curve is not None and self.ctx is not None else None
        self.sock, self.endpoint = transport.bind_router(bind, limits=limits, ctx=self.ctx, curve=curve)
        self.sessions: dict[bytes, dict[str, Any]] = {}
        self.stop_event = threading.Event()
        self.errors = 0

    # -- one message ---------------------------------------------------------------------------------
    def handle(self, identity: bytes, parts: list, now: float) -> Reply | None:
        try:
            msg = S.parse(parts, self.limits, FEATURES)
        except ProtocolError as e:
            return self._refuse(e)
        s = self.sessions.get(identity)
        if s is not None:
            s["last_seen"] = now
        h, kind = msg.header, msg.kind
        try:
            if kind == P.Kind.HELLO:
                return self._hello(identity, h, now), []
            if kind == P.Kind.PING:
                return P.pong(h["nonce"], time.time_ns()), []
            if kind in (P.Kind.PONG, P.Kind.ERROR):
                return None
            if kind == P.Kind.BYE:
                self.sessions.pop(identity, None)
                self.runner.forget(identity)
                return None
            if kind not in (S.TRAIN_FWD, S.TRAIN_BWD, P.Kind.REQUEST):
                raise ProtocolError(ErrorCode.MALFORMED, f"'{kind}' is not a message a client sends", msg.id)
            if s is None:
                raise ProtocolError(ErrorCode.NOT_READY, "no session: send hello first", h["id"])
            frame = msg.frames[0]
            if kind == S.TRAIN_FWD:
                return self.runner.train_fwd(identity, h, frame, now)
            if kind == S.TRAIN_BWD:
                return self.runner.train_bwd(identity, h, frame, now)
            return self.runner.infer(h, frame)
        except ProtocolError as e:
            return self._refuse(e)
        except Exception as e:  # a bug: answer INTERNAL and keep serving
            log.exception("failed to handle a message")
            rid = h.get("id") if kind in (S.TRAIN_FWD, S.TRAIN_BWD, P.Kind.REQUEST) else None
            return self._refuse(ProtocolError(ErrorCode.INTERNAL, f"{type(e).__name__}: {e}", rid))

    def _refuse(self, e: ProtocolError) -> Reply:
        self.errors += 1
        return ErrorReply(e.req_id, e.code, e.message).to_header(), []

    def _hello(self, identity: bytes, h: dict[str, Any], now: float) -> dict[str, Any]:
        if h["bundle"] != self.package.hash:
            raise ProtocolError(
                ErrorCode.UNKNOWN_BUNDLE,
                f"body package {h['bundle'][:16]}... is not loaded here (loaded: {self.package.name}="
                f"{self.package.hash[:16]}...)",
            )
        serving = h.get("serving") or "head-tail"
        if serving != "u-shaped":
            raise ProtocolError(
                ErrorCode.UNSUPPORTED,
                f"'{self.package.name}' is served U-shaped (the server answers with the body's output, the agent "
                f"runs the tail); this agent's model is '{serving}'",
            )
        credits = max(1, min(self.credits, h["caps"]["max_inflight"]))
        self.sessions[identity] = {"agent": h["agent"], "last_seen": now}
        w = P.welcome(
            self.package.hash,
            self.name,
            credits=credits,
            limits=self.limits,
            heartbeat_ms=self.heartbeat_ms,
            codecs=["raw"],
            bits=[8],
            features=FEATURES,
        )
        w["train"] = self.runner.train_terms()
        return w

    # -- the loop ------------------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        self.runner.expire(now)
        if self.heartbeat_ms <= 0:
            return
        limit = EXPIRY_INTERVALS * self.heartbeat_ms / 1e3
        for ident in [i for i, s in self.sessions.items() if now - s["last_seen"] > limit]:
            if self.runner.pending(ident) == 0:
                del self.sessions[ident]
                self.runner.forget(ident)

    def serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        last_tick = time.monotonic()
        while not self.stop_event.is_set():
            if poller.poll(100):
                parts = self.sock.recv_multipart(copy=True)
                ident, body = parts[0], parts[1:]
                out = self.handle(ident, body, time.monotonic())
                if out is not None:
                    try:
                        transport.send(self.sock, out[0], out[1], identity=ident)
                    except zmq.ZMQError:  # the peer is gone (ROUTER_MANDATORY)
                        self.sessions.pop(ident, None)
                        self.runner.forget(ident)
            now = time.monotonic()
            if now - last_tick > 0.5:
                self.tick(now)
                last_tick = now
        self.sock.close(linger=1000)
        if self.auth is not None:
            self.auth.stop()
        if self.ctx is not None:
            self.ctx.term()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="edgesplit body-serve",
        description="Serve an SFPrompt body package for split training and U-shaped inference (PROTOCOL.md §15).",
    )
    p.add_argument("package", help="the body package directory ('edgesplit export' of an SFPrompt student.pt)")
    p.add_argument("--bind", default="tcp://127.0.0.1:5570")
    p.add_argument("--credits", type=int, default=4)
    p.add_argument("--heartbeat-ms", type=int, default=5000)
    p.add_argument("--max-pending", type=int, default=8)
    p.add_argument("--replay", type=int, default=32)
    p.add_argument("--ttl-ms", type=int, default=60_000)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--curve-secret", default=None, help="the server's CURVE secret key file (edgesplit keys gen)")
    p.add_argument("--allow-keys", default=None, help="directory of the clients' public keys allowed to connect")
    a = p.parse_args(argv)
    if (a.curve_secret is None) != (a.allow_keys is None):
        p.error("--curve-secret and --allow-keys go together (CURVE without an allow-list would admit any key)")
    import torch

    torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    server = BodyServer(
        BodyPackage.load(a.package),
        a.bind,
        credits=a.credits,
        heartbeat_ms=a.heartbeat_ms,
        max_pending=a.max_pending,
        replay=a.replay,
        ttl_ms=a.ttl_ms,
        curve=None if a.curve_secret is None else ServerCurve.load(a.curve_secret, a.allow_keys),
    )
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: server.stop_event.set())
    print(json.dumps({"endpoint": server.endpoint, "package": server.package.hash}), flush=True)
    server.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
