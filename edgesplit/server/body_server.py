"""The body server (``edgesplit body-serve``): serves one SFPrompt body package for split training
and U-shaped inference over the wire protocol (docs/PROTOCOL.md §15).

One ROUTER socket, one thread: the socket and the loop are here; every message goes to a
:class:`~edgesplit.server.body_sessions.BodySessionTable` (the protocol's session lifecycle, shared
with the daemon, plus the body's hello, welcome and work), which validates it, answers it and
computes a training step in place (:class:`~edgesplit.server.body_runner.BodyRunner`). Sessions as
§6-§8: ``hello`` (refused UNKNOWN_BUNDLE for another package, UNSUPPORTED for an agent that is not
U-shaped), ``ping``/``pong``, a server ping per heartbeat interval, ``bye``, expiry after three
silent heartbeat intervals with no pending step. Single-threaded on purpose for now: a client's
steps are sequential (each waits for its answer), so there is nothing to batch within a session;
batching steps across clients is what moving this runner into
:class:`~edgesplit.server.daemon.Server`'s compute thread would add.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time

import zmq

from ..wire import protocol as P
from ..wire import transport
from ..wire.curve import ServerCurve
from .body_runner import BodyPackage, BodyRunner
from .body_sessions import BodySessionTable
from .stats import IoCounters

log = logging.getLogger("edgesplit.server")


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
        self.package = package
        self.runner = BodyRunner(package, max_pending=max_pending, replay=replay, ttl_ms=ttl_ms)
        self.counters = IoCounters()
        self.table = BodySessionTable(
            self.runner, self.counters, server_name=name, credits=credits, heartbeat_ms=heartbeat_ms, limits=limits
        )
        # looked at every min(0.5 s, heartbeat / 4), as PROTOCOL.md §8 says of the reference server
        self.tick_s = min(0.5, heartbeat_ms / 4e3) if heartbeat_ms > 0 else 0.5
        # CURVE: its own context, with the ZAP handler started before the bind (PROTOCOL.md §1)
        self.ctx = zmq.Context() if curve is not None else None
        self.auth = curve.start_authenticator(self.ctx) if curve is not None and self.ctx is not None else None
        self.sock, self.endpoint = transport.bind_router(bind, limits=limits, ctx=self.ctx, curve=curve)
        self.stop_event = threading.Event()

    def _send(self, identity: bytes, header: dict, frames: list) -> None:
        try:
            transport.send(self.sock, header, frames, identity=identity)
        except zmq.ZMQError:  # the peer is gone (ROUTER_MANDATORY): its session and steps go too
            self.table.drop(identity)

    def serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        last_tick = time.monotonic_ns()
        while not self.stop_event.is_set():
            if poller.poll(100):
                parts = self.sock.recv_multipart(copy=True)
                ident, body = parts[0], parts[1:]
                out = self.table.handle(ident, body, time.monotonic_ns())
                if out is not None:
                    self._send(ident, *out)
            now = time.monotonic_ns()
            if now - last_tick > self.tick_s * 1e9:
                for ident, ping in self.table.tick(now):
                    self._send(ident, ping, [])
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
